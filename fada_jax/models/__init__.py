"""The three FADA networks and their construction from a config."""

from collections.abc import Sequence
from typing import Any, Dict, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fada_jax.errors import UserError
from fada_jax.models import heads, layers, resnet, vgg
from fada_jax.models.heads import ASPPClassifier, FineGrainedDiscriminator
from fada_jax.models.layers import BatchNorm, resize_bilinear_align_corners
from fada_jax.models.resnet import ResNetFeatureExtractor
from fada_jax.models.vgg import VGGFeatureExtractor

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16")
DTYPES = ("float32", "bfloat16")

# Shapes of the variables do not depend on the input size; keep init cheap.
_INIT_HW = (65, 65)


class Models(NamedTuple):
  feature_extractor: nn.Module
  classifier: nn.Module
  discriminator: nn.Module


def _model_settings(config) -> Dict[str, Any]:
  model = config.model
  arch = model.arch
  if arch not in ARCHS:
    raise UserError(f"config.model.arch={arch!r} is not one of {', '.join(ARCHS)}")
  dtype = model.get("dtype", "float32")
  if str(dtype) not in DTYPES:
    raise UserError(f"config.model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
  width = int(model.get("width", 64))
  if width < 1:
    raise UserError(f"config.model.width={width} must be a positive integer")
  num_classes = int(model.num_classes)
  if num_classes < 1:
    raise UserError(f"config.model.num_classes={num_classes} must be positive")
  return dict(arch=arch, dtype=jnp.dtype(dtype), width=width, num_classes=num_classes,
              freeze_bn=bool(model.get("freeze_bn", True)),
              remat=bool(model.get("remat", False)))


def feature_channels(config) -> int:
  """Channels of the feature extractor's output (input of classifier/discriminator)."""
  settings = _model_settings(config)
  if settings["arch"] == "vgg16":
    return vgg.OUTPUT_CHANNELS
  return resnet.output_channels(int(settings["arch"][len("resnet"):]), settings["width"])


def build(config, axis_name: Optional[str] = None) -> Models:
  """Feature extractor, classifier and discriminator for `config.model`.

  `axis_name` names the device axis over which trainable BN syncs its batch statistics.
  """
  settings = _model_settings(config)
  dtype = settings["dtype"]
  if settings["arch"] == "vgg16":
    feature_extractor = VGGFeatureExtractor(dtype=dtype)
  else:
    feature_extractor = ResNetFeatureExtractor(
        depth=int(settings["arch"][len("resnet"):]), width=settings["width"],
        freeze_bn=settings["freeze_bn"], dtype=dtype, remat=settings["remat"],
        axis_name=axis_name)
  classifier = ASPPClassifier(num_classes=settings["num_classes"], dtype=dtype)
  discriminator = FineGrainedDiscriminator(num_classes=settings["num_classes"], dtype=dtype)
  return Models(feature_extractor, classifier, discriminator)


PARTS = ("feature_extractor", "classifier", "discriminator")


def init_variables(models: Models, rng: jax.Array, config,
                   parts: Sequence[str] = PARTS) -> Dict[str, Dict[str, Any]]:
  """Freshly initialised variables of the three networks:
  {'feature_extractor': {'params', 'batch_stats'}, 'classifier': {'params'},
   'discriminator': {'params'}} (VGG's batch_stats is {}).

  Only `parts` are initialised (and returned), each with the values it has in the full
  initialisation: a run whose checkpoint fills the feature extractor neither compiles
  nor runs its initialiser.
  """
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise ValueError(f"unknown network parts {sorted(unknown)}; expected some of {PARTS}")
  channels = feature_channels(config)
  # axis_name only matters for trainable BN in train mode; init runs in eval mode.
  feature_extractor = models.feature_extractor
  if isinstance(feature_extractor, ResNetFeatureExtractor):
    feature_extractor = feature_extractor.clone(axis_name=None)
  images = jnp.zeros((1, *_INIT_HW, 3), jnp.float32)
  features = jnp.zeros((1, 9, 9, channels), jnp.float32)
  initialisers = {
      "feature_extractor": lambda r: feature_extractor.init(r, images, train=False),
      "classifier": lambda r: models.classifier.init(r, features),
      "discriminator": lambda r: models.discriminator.init(r, features),
  }
  wanted = tuple(part for part in PARTS if part in parts)

  @jax.jit
  def init_all(rng):
    # The same three-way split whichever parts are wanted: a part's values never depend
    # on which others are initialised with it.
    rngs = dict(zip(PARTS, jax.random.split(rng, len(PARTS))))
    return {part: initialisers[part](rngs[part]) for part in wanted}

  # XLA:CPU compiles one threefry kernel per parameter, which takes minutes for a
  # ResNet; the 'rbg' generator (seeded deterministically from `rng`) compiles ~4x faster.
  rbg_rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
  initialised = init_all(rbg_rng)
  variables = {part: {"params": initialised[part]["params"]} for part in wanted}
  if "feature_extractor" in variables:
    variables["feature_extractor"]["batch_stats"] = initialised["feature_extractor"].get(
        "batch_stats", {})
  return variables


__all__ = [
    "ARCHS", "Models", "build", "feature_channels", "init_variables", "heads", "layers",
    "resnet", "vgg", "ASPPClassifier", "FineGrainedDiscriminator", "BatchNorm",
    "resize_bilinear_align_corners", "ResNetFeatureExtractor", "VGGFeatureExtractor",
]
