"""Inference: the jit-compiled `Predictor`, its settings, and its variable transforms.

What the release computes (`test.py`): the image is resized to the test size (bicubic, in
the eval loader) and normalised (here on the device, the first op of `scores`), the
logits are upsampled with align_corners=True to the full label resolution, the
prediction is their argmax.

Optional inference modes, in the release's order of operations: flip averages
softmax(upsample(logits(x))) with the mirrored softmax of the mirrored image; multi-scale
resizes the (normalised, test-size) image bilinearly with align_corners to
int(h * s) x int(w * s) for every s in config.eval.scales and averages the softmax
probabilities, each upsampled to the label size (plus their flipped counterparts).

Inference runs jit-compiled on a 1-D device mesh ('data'): the batch is split over all
devices of all processes, the variables are replicated, and the metric counts are summed
over the global batch inside the compiled step, so every process ends with the counts of
the whole split.

Two transforms make inference faster with the same arithmetic up to float rounding:
batch norm folded into the convolution before it (`fold_batch_norm`), and, where the
backend's convolutions are slow (config.model.matmul_convs, 'auto' = CPU), some
convolutions run as matrix products by the dispatcher training uses
(models/conv_dispatch.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fada_jax import models as models_lib
from fada_jax.constants import DATA_AXIS, IGNORE_LABEL, make_mesh
from fada_jax.data import transforms
from fada_jax.errors import UserError
from fada_jax.evaluate.metrics import confusion_counts
from fada_jax.models import conv_dispatch, layers
from fada_jax.models import variables as variables_lib
from fada_jax.train import parallel


# Resolution of the confidence histogram of confidence-filtered pseudo labels.
CONFIDENCE_BINS = 1000


# ----------------------------------------------------------------------------- batch norm folding


def fold_batch_norm(feature_extractor_variables: dict, frozen: bool = True) -> dict:
  """Folds every BN's inference-time affine map into the conv before it.

  In inference BN computes y = x * m + s with m = scale * rsqrt(var + eps) (eps 0 for the
  release's frozen BN, 1e-5 otherwise), s = bias - mean * m. A conv (no bias) followed
  by it equals the conv with its kernel's output channels scaled by m followed by x + s;
  the BN variables are rewritten to that shift alone (scale 1, mean 0, var such that
  rsqrt(var + eps) = 1, bias s), so the unchanged network computes the same function up
  to float rounding. Pairs follow the module names (`conv1`/`bn1`,
  `downsample_conv`/`downsample_bn`). Done on every backend: it runs once on the host
  and leaves a per-channel shift that every compiler fuses as it fuses BN, one multiply
  per element fewer.
  """
  epsilon = 0.0 if frozen else layers.BN_EPSILON
  params = jax.tree_util.tree_map(np.asarray, dict(feature_extractor_variables["params"]))
  stats = jax.tree_util.tree_map(np.asarray, dict(feature_extractor_variables["batch_stats"]))

  def fold(param_scope: dict, stats_scope: dict) -> tuple[dict, dict]:
    param_scope, stats_scope = dict(param_scope), dict(stats_scope)
    for bn_name in list(stats_scope):
      conv_name = bn_name.replace("bn", "conv")
      bn_stats = stats_scope[bn_name]
      if "mean" not in bn_stats:  # a sub-module (a block): recurse
        param_scope[bn_name], stats_scope[bn_name] = fold(param_scope[bn_name], bn_stats)
        continue
      bn_params = param_scope[bn_name]
      multiplier = bn_params["scale"] / np.sqrt(bn_stats["var"].astype(np.float64) + epsilon)
      shift = (bn_params["bias"] - bn_stats["mean"] * multiplier).astype(np.float32)
      conv = dict(param_scope[conv_name])
      conv["kernel"] = (conv["kernel"] * multiplier).astype(np.float32)
      param_scope[conv_name] = conv
      ones = np.ones(multiplier.shape, np.float32)
      param_scope[bn_name] = {"scale": ones, "bias": shift}
      stats_scope[bn_name] = {"mean": np.zeros_like(ones), "var": ones - np.float32(epsilon)}
    return param_scope, stats_scope

  params, stats = fold(params, stats)
  return {"params": params, "batch_stats": stats}


# ----------------------------------------------------------------------------- the predictor


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """The release's multi-scale size: int(h * s), int(w * s)."""
  return int(height * scale), int(width * scale)


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  flip: bool = False
  scales: tuple[float, ...] = (1.0,)

  @classmethod
  def from_config(cls, config) -> "InferenceSettings":
    scales = tuple(float(s) for s in config.eval.scales)
    if not scales or min(scales) <= 0:
      raise UserError(f"config.eval.scales={scales} must be positive numbers")
    return cls(flip=bool(config.eval.flip), scales=scales)

  @property
  def single(self) -> bool:
    return not self.flip and self.scales == (1.0,)


class Predictor:
  """Jit-compiled inference of feature extractor + classifier on a device mesh.

  `predict(variables, images, out_hw)` -> uint8 [B, out_h, out_w] train ids;
  `eval_step(variables, images, labels, valid)` -> ([3, K] counts, number of valid
  examples, predictions). Images are uint8 RGB NHWC, normalised on the device
  (config.data.normalization; floating-point images are taken as normalised already);
  variables are those of `place_variables`.
  """

  def __init__(self, config, mesh: Mesh | None = None,
               settings: InferenceSettings | None = None, *, fold_batch_norm: bool = True,
               convs_as_matmuls: bool | None = None):
    self.config = config.copy_and_resolve_references()
    self.fold_batch_norm = fold_batch_norm
    # None: config.model.matmul_convs ('auto' = on for the CPU backend).
    self.convs_as_matmuls = conv_dispatch.enabled_for(config, convs_as_matmuls)
    self.num_classes = int(config.model.num_classes)
    self.normalization = transforms.normalization_mode(config)
    if self.num_classes > 255:
      raise UserError(f"config.model.num_classes={self.num_classes}: train-id masks are "
                      "8-bit, at most 255 classes")
    self.models = models_lib.build(config)
    self.mesh = mesh or make_mesh()
    self.settings = settings or InferenceSettings.from_config(config)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharded = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    options = conv_dispatch.compiler_options(self.convs_as_matmuls) or None
    self._eval_step = jax.jit(
        self._eval_step_impl, static_argnames=("with_predictions",),
        out_shardings=(self.replicated, self.replicated, self.batch_sharded),
        compiler_options=options)
    self._predict = jax.jit(self._predict_impl, static_argnames=("out_hw",),
                            out_shardings=self.batch_sharded, compiler_options=options)
    self._predict_with_probabilities = jax.jit(
        self._predict_with_probabilities_impl, static_argnames=("out_hw",),
        out_shardings=(self.batch_sharded, self.batch_sharded), compiler_options=options)
    self._pseudo_label_step = jax.jit(
        self._pseudo_label_step_impl,
        out_shardings=(self.replicated, self.replicated, self.batch_sharded, self.replicated),
        compiler_options=options)

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  # -- variables

  def check_variables(self, variables: dict, where: str) -> None:
    """Refuses variables that do not fit config.model (a different arch, width, K)."""
    for part in ("feature_extractor", "classifier"):
      if part not in variables:
        raise UserError(f"{where} holds no {part} variables (parts: "
                        f"{', '.join(sorted(variables))}); evaluation needs a full model "
                        "(feature extractor and classifier)")
    expected = jax.eval_shape(
        lambda: models_lib.init_variables(self.models, jax.random.PRNGKey(0), self.config))
    for part in ("feature_extractor", "classifier"):
      variables_lib.check_fit(part, variables[part], expected[part], where, self.config.model)

  def place_variables(self, variables: dict) -> dict:
    """Feature extractor + classifier variables as float32, replicated on the mesh."""
    used = {part: variables[part] for part in ("feature_extractor", "classifier")}
    used = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), used)
    if self.fold_batch_norm and used["feature_extractor"].get("batch_stats"):
      used["feature_extractor"] = fold_batch_norm(
          used["feature_extractor"], frozen=bool(self.config.model.get("freeze_bn", True)))
    return parallel.replicate(used, self.mesh)

  # -- compiled functions

  def logits(self, variables: dict, images: jax.Array) -> jax.Array:
    """float32 class scores at feature resolution (stride 8)."""
    fe = variables["feature_extractor"]
    fe_variables = {"params": fe["params"]}
    if fe.get("batch_stats"):
      fe_variables["batch_stats"] = fe["batch_stats"]
    classifier_variables = {"params": variables["classifier"]["params"]}
    with conv_dispatch.use_matmul_convs(self.convs_as_matmuls):
      features = self.models.feature_extractor.apply(fe_variables, images, train=False)
      logits = self.models.classifier.apply(classifier_variables, features)
    return logits.astype(jnp.float32)

  def scores(self, variables: dict, images: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """[B, out_h, out_w, K] scores whose argmax is the prediction.

    Single scale without flip: the upsampled logits (softmax would not change the
    argmax). Otherwise the release's average of softmax probabilities at label size.
    uint8 images are normalised first (float32), so that multi-scale resizes the
    normalised image, as the release does.
    """
    images = transforms.normalize_on_device(images, self.normalization)
    settings = self.settings
    if settings.single:
      return layers.resize_bilinear_align_corners(self.logits(variables, images), out_hw)

    def probabilities(x):
      logits = layers.resize_bilinear_align_corners(self.logits(variables, x), out_hw)
      return jax.nn.softmax(logits, axis=-1)

    height, width = images.shape[1:3]
    total = None
    for scale in settings.scales:
      size = scaled_size(height, width, scale)
      x = images if size == (height, width) else layers.resize_bilinear_align_corners(
          images, size)
      probs = probabilities(x)
      if settings.flip:
        probs = probs + jnp.flip(probabilities(jnp.flip(x, axis=2)), axis=2)
      total = probs if total is None else total + probs
    return total / (len(settings.scales) * (2 if settings.flip else 1))

  def _predict_impl(self, variables, images, out_hw):
    return jnp.argmax(self.scores(variables, images, out_hw), axis=-1).astype(jnp.uint8)

  def _predict_with_probabilities_impl(self, variables, images, out_hw):
    scores = self.scores(variables, images, out_hw)
    predictions = jnp.argmax(scores, axis=-1).astype(jnp.uint8)
    # Single scale without flip scores with logits; otherwise with mean probabilities.
    return predictions, jax.nn.softmax(scores, axis=-1) if self.settings.single else scores

  def _eval_step_impl(self, variables, images, labels, valid, with_predictions: bool):
    predictions = self._predict_impl(variables, images, labels.shape[1:3])
    counts = confusion_counts(predictions, labels, valid, self.num_classes)
    num_valid = jnp.sum(valid.astype(jnp.int32))
    if not with_predictions:
      predictions = jnp.zeros((predictions.shape[0],), jnp.uint8)
    return counts, num_valid, predictions

  def _pseudo_label_step_impl(self, variables, images, labels, valid, min_bin):
    scores = self.scores(variables, images, labels.shape[1:3])
    predictions = jnp.argmax(scores, axis=-1).astype(jnp.uint8)
    counts = confusion_counts(predictions, labels, valid, self.num_classes)
    num_valid = jnp.sum(valid.astype(jnp.int32))
    # Single scale without flip scores with logits; otherwise with mean probabilities.
    probabilities = jax.nn.softmax(scores, axis=-1) if self.settings.single else scores
    bins = jnp.floor(jnp.max(probabilities, axis=-1) * CONFIDENCE_BINS).astype(jnp.int32)
    bins = jnp.clip(bins, 0, CONFIDENCE_BINS - 1)
    # Integer bincount: exact in any order. Padding examples go to a last, dropped bucket.
    size = self.num_classes * CONFIDENCE_BINS
    index = jnp.where(valid[:, None, None], predictions.astype(jnp.int32) * CONFIDENCE_BINS + bins,
                      size)
    histogram = jnp.bincount(index.ravel(), length=size + 1)[:size]
    kept = jnp.where(bins >= min_bin[predictions.astype(jnp.int32)], predictions,
                     jnp.uint8(IGNORE_LABEL))
    return counts, num_valid, kept, histogram.reshape(self.num_classes, CONFIDENCE_BINS)

  def predict(self, variables, images: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """uint8 [B, out_h, out_w] train ids of this process's `images`, uint8 pixels or
    normalised floats (any B: padded to a multiple of the local devices and cropped back)."""
    return self.fetch(self.dispatch_predict(variables, images, out_hw), len(images))

  def dispatch_predict(self, variables, images: np.ndarray, out_hw: Sequence[int], *,
                       probabilities: bool = False):
    """Starts `predict` and returns at once (JAX dispatches asynchronously): the global
    predictions (and, with `probabilities`, the [B, out_h, out_w, K] float32 class
    probabilities: softmax of the logits, or the flip / multi-scale mean), for `fetch`."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
      images = images.astype(np.float32)
    rows = -(-len(images) // self.local_batch_multiple()) * self.local_batch_multiple()
    step = self._predict_with_probabilities if probabilities else self._predict
    return step(variables, self.global_batch(pad_rows(images, rows, 0)),
                out_hw=tuple(int(v) for v in out_hw))

  def fetch(self, dispatched, count: int):
    """The first `count` of this process's rows of `dispatch_predict`'s result(s), as numpy."""
    if isinstance(dispatched, tuple):
      return tuple(self.local_rows(array)[:count] for array in dispatched)
    return self.local_rows(dispatched)[:count]

  def eval_step(self, variables, images, labels, valid, with_predictions: bool = False):
    return self._eval_step(variables, self.global_batch(images), self.global_batch(labels),
                           self.global_batch(valid), with_predictions=with_predictions)

  # -- host <-> mesh

  def place_thresholds(self, min_bin: np.ndarray) -> jax.Array:
    """[K] per-class confidence bins, replicated on the mesh for `pseudo_label_step`
    (placed once per split: with several processes a placement compares them)."""
    return parallel.replicate(np.asarray(min_bin, np.int32), self.mesh,
                              "the confidence thresholds")

  def pseudo_label_step(self, variables, images, labels, valid, min_bin: jax.Array):
    """The eval step for confidence-filtered pseudo labels: ([3, K] counts of the plain
    predictions, number of valid examples, predictions with the ignore label wherever
    the pixel's confidence bin is below `min_bin[its class]` (`place_thresholds`),
    [K, CONFIDENCE_BINS] pixel counts of the valid examples by predicted class and
    confidence bin).

    A pixel's confidence is its highest class probability (softmax of the logits, or the
    averaged probabilities of flip / multi-scale); bin b holds [b, b + 1) / CONFIDENCE_BINS.
    """
    return self._pseudo_label_step(variables, self.global_batch(images),
                                   self.global_batch(labels), self.global_batch(valid),
                                   min_bin)

  def local_batch_multiple(self) -> int:
    """This process's batch must be a multiple of its device count."""
    return max(1, len(self.mesh.local_devices))

  def rows_per_call(self) -> int:
    """Images per compiled call: config.eval.batch_size, rounded up to the local devices."""
    multiple = self.local_batch_multiple()
    return -(-max(1, int(self.config.eval.batch_size)) // multiple) * multiple

  def global_batch(self, local: np.ndarray | jax.Array) -> jax.Array:
    """A process-local batch -> the global array sharded over 'data'."""
    if isinstance(local, jax.Array) and local.sharding == self.batch_sharded:
      return local
    return jax.make_array_from_process_local_data(self.batch_sharded, np.asarray(local))

  def local_rows(self, array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, as numpy."""
    if jax.process_count() == 1:
      return np.asarray(array)
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        array, self.mesh, PartitionSpec(DATA_AXIS)))


_PREDICTORS: dict[tuple, Predictor] = {}


def predictor_for(config) -> Predictor:
  """A Predictor for config's network and inference settings, shared within the process
  so that evaluating again (another checkpoint, another stage) reuses its compilations."""
  settings = InferenceSettings.from_config(config)
  model = config.model
  key = (model.arch, int(model.get("width", 64)), int(model.num_classes),
         bool(model.get("freeze_bn", True)), str(model.get("dtype", "float32")),
         conv_dispatch.enabled_for(config), settings, transforms.normalization_mode(config),
         tuple(d.id for d in jax.devices()))
  if key not in _PREDICTORS:
    _PREDICTORS[key] = Predictor(config, settings=settings)
  return _PREDICTORS[key]


def pad_rows(array: np.ndarray, rows: int, fill) -> np.ndarray:
  if array.shape[0] == rows:
    return array
  pad = np.full((rows - array.shape[0],) + array.shape[1:], fill, dtype=array.dtype)
  return np.concatenate([array, pad])
