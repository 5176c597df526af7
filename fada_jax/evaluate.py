"""Target-domain evaluation, inference modes, prediction masks and pseudo labels.

What the release computes (`test.py`): the image is resized to the test size (bicubic, in
the eval loader), the logits are upsampled with align_corners=True to the full label
resolution, the prediction is their argmax. Per class, intersection, union and target
pixel counts are accumulated over the whole split (ignore label excluded), then
IoU = I / (U + 1e-10), mIoU = mean over all K classes, mAcc = mean of I / (T + 1e-10),
allAcc = sum(I) / sum(T). 16-class (SYNTHIA) runs also report the 13-class mIoU.

Optional inference modes, in the release's order of operations: flip averages
softmax(upsample(logits(x))) with the mirrored softmax of the mirrored image; multi-scale
resizes the (normalised, test-size) image bilinearly with align_corners to
int(h * s) x int(w * s) for every s in config.eval.scales and averages the softmax
probabilities, each upsampled to the label size (plus their flipped counterparts).

Inference runs jit-compiled on a 1-D device mesh ('data'): the batch is split over all
devices of all processes, the variables are replicated, and the metric counts are summed
over the global batch inside the compiled step, so every process ends with the counts of
the whole split. Each process reads its own share of the images (the eval loader) and
writes the masks of its own images.

Outputs of `run_eval(config, PATH, DIR)`:
  DIR/eval/metrics.json   miou, macc, allacc, iou_per_class, class_names, checkpoint,
                          num_images (+ miou_13 for 16 classes); for a folder of
                          checkpoints, those of the best one plus every checkpoint's mIoU
  DIR/eval/results.csv    one row per checkpoint: step, checkpoint, miou, per-class IoU
  DIR/eval/predictions/<city>/<stem>.png   train ids (config.eval.save_predictions)
  DIR/eval/color/<city>/<stem>.png         palette PNG: pixel value = train id, colours =
                                           the Cityscapes palette (same writer as pseudo labels)
  (several checkpoints: DIR/eval/<checkpoint name>/predictions/..., .../color/...)
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import logging
import os
import pathlib
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn_linen
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image
from tqdm import tqdm

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import models as models_lib
from fada_jax.data import labels as labels_lib
from fada_jax.errors import UserError
from fada_jax.models import layers

IGNORE_LABEL = 255
EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.csv"
DATA_AXIS = "data"
EPSILON = 1e-10  # the release's guard in I / (U + eps), I / (T + eps)

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- metric


def confusion_counts(predictions: jax.Array, labels: jax.Array, valid: jax.Array,
                     num_classes: int) -> jax.Array:
  """int32 [3, K]: per-class intersection, union and target pixel counts of a batch.

  predictions, labels: [B, H, W] integer maps; valid: bool [B] (False = padding example).
  As the release's `intersectionAndUnionGPU`: pixels whose label is the ignore label
  (and every pixel of a padding example) count nowhere; a prediction counts for its
  class wherever the label is not ignored. One-hot compare-and-sum reductions: XLA
  fuses them into elementwise loops (no scatter), and they split over the batch axis.
  """
  keep = (labels != IGNORE_LABEL) & valid[:, None, None]
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  predicted = (predictions.astype(jnp.int32)[..., None] == classes) & keep[..., None]
  target = (labels.astype(jnp.int32)[..., None] == classes) & keep[..., None]
  axes = (0, 1, 2)
  intersection = jnp.sum(predicted & target, axis=axes, dtype=jnp.int32)
  area_predicted = jnp.sum(predicted, axis=axes, dtype=jnp.int32)
  area_target = jnp.sum(target, axis=axes, dtype=jnp.int32)
  return jnp.stack([intersection, area_predicted + area_target - intersection, area_target])


def metrics_from_counts(intersection: np.ndarray, union: np.ndarray, target: np.ndarray,
                        num_classes: int) -> dict[str, Any]:
  """The release's mIoU / mAcc / allAcc from split-wide counts (means over ALL classes)."""
  intersection = np.asarray(intersection, np.float64)
  union = np.asarray(union, np.float64)
  target = np.asarray(target, np.float64)
  iou = intersection / (union + EPSILON)
  accuracy = intersection / (target + EPSILON)
  result = {
      "miou": float(np.mean(iou)),
      "macc": float(np.mean(accuracy)),
      "allacc": float(np.sum(intersection) / (np.sum(target) + EPSILON)),
      "iou_per_class": [float(v) for v in iou],
      "acc_per_class": [float(v) for v in accuracy],
      "class_names": list(labels_lib.class_names(num_classes)),
  }
  if num_classes == 16:
    result["miou_13"] = float(np.mean(iou[list(labels_lib.CLASSES_13)]))
  return result


class MetricAccumulator:
  """Host-side int64 sums of per-batch [3, K] counts."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.counts = np.zeros((3, num_classes), np.int64)
    self.num_images = 0

  def add(self, counts: np.ndarray, num_images: int = 0) -> None:
    self.counts += np.asarray(counts, np.int64)
    self.num_images += int(num_images)

  def result(self) -> dict[str, Any]:
    result = metrics_from_counts(*self.counts, num_classes=self.num_classes)
    result["num_images"] = self.num_images
    return result


# ----------------------------------------------------------------------------- inference transforms


def fold_batch_norm(feature_extractor_variables: dict, frozen: bool = True) -> dict:
  """Folds every BN's inference-time affine map into the conv before it.

  In inference BN computes y = x * m + s with m = scale * rsqrt(var + eps) (eps 0 for the
  release's frozen BN, 1e-5 otherwise), s = bias - mean * m. A conv (no bias) followed
  by it equals the conv with its kernel's output channels scaled by m followed by x + s;
  the BN variables are rewritten to that shift alone (scale 1, mean 0, var such that
  rsqrt(var + eps) = 1, bias s), so the unchanged network computes the same function up
  to float rounding. Pairs follow the module names (`conv1`/`bn1`,
  `downsample_conv`/`downsample_bn`).
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


# Below this many output channels a conv's own kernels use the machine poorly (the ASPP
# classifier's 19), and one matrix product over all kernel taps does better.
_NARROW_CONV_CHANNELS = 64


def _conv_padding(module) -> tuple[tuple[int, int], ...] | None:
  padding = module.padding
  if padding == "VALID":
    return ((0, 0), (0, 0))
  if isinstance(padding, (list, tuple)) and len(padding) == 2 and all(
      isinstance(p, (list, tuple)) and len(p) == 2 for p in padding):
    return tuple((int(p[0]), int(p[1])) for p in padding)
  return None


def _pair(value, default: int) -> tuple[int, int]:
  if value is None:
    return default, default
  if isinstance(value, int):
    return value, value
  return tuple(int(v) for v in value)


def _conv_as_matmul(next_fun, args, kwargs, context):
  """Method interceptor (inference): some nn.Conv calls as matrix products, the same
  arithmetic up to float summation order.

  - 1x1 convs (any stride): a strided slice and one matrix product. XLA:CPU lowers
    convolutions, 1x1 ones included, to a generic path, and matrix products to its tuned
    GEMM kernels, which run these ~1.5-2x faster.
  - k x k convs, stride 1, "same" padding, few output channels (the ASPP classifier): one
    product of the input with all k*k taps side by side, [N, C] x [C, k*k*O], then the
    tap outputs shifted into place and summed: y[p] = sum_t (x W_t)[p + offset_t].
  Everything else goes to the module unchanged.
  """
  module = context.module
  if (not isinstance(module, nn_linen.Conv) or context.method_name != "__call__"
      or kwargs or len(args) != 1 or getattr(args[0], "ndim", 0) != 4
      or module.feature_group_count != 1 or len(module.kernel_size) != 2
      or _pair(module.input_dilation, 1) != (1, 1)):
    return next_fun(*args, **kwargs)
  x = args[0]
  kh, kw = module.kernel_size
  strides = _pair(module.strides, 1)
  dilation = _pair(module.kernel_dilation, 1)
  padding = _conv_padding(module)
  dtype = module.dtype or jnp.float32
  kernel = module.get_variable("params", "kernel").astype(dtype)
  if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
    y = layers.conv_1x1_as_product(x.astype(dtype), kernel, strides, module.precision)
  elif (module.features <= _NARROW_CONV_CHANNELS and strides == (1, 1) and kh % 2 and kw % 2
        and padding == ((dilation[0] * (kh // 2),) * 2, (dilation[1] * (kw // 2),) * 2)):
    y = layers.conv_narrow_as_product(x.astype(dtype), kernel, padding, dilation,
                                      module.precision)
  else:
    return next_fun(*args, **kwargs)
  if module.use_bias:
    y = y + module.get_variable("params", "bias").astype(dtype)
  return y


# ----------------------------------------------------------------------------- inference


def make_mesh() -> Mesh:
  """1-D mesh 'data' over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


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
  examples, predictions). Images are normalised float32 NHWC; variables are those of
  `place_variables`.
  """

  def __init__(self, config, mesh: Mesh | None = None,
               settings: InferenceSettings | None = None, *, fold_batch_norm: bool = True,
               convs_as_matmuls: bool = True):
    self.config = config.copy_and_resolve_references()
    self.fold_batch_norm = fold_batch_norm
    self.convs_as_matmuls = convs_as_matmuls
    self.num_classes = int(config.model.num_classes)
    if self.num_classes > 255:
      raise UserError(f"config.model.num_classes={self.num_classes}: train-id masks are "
                      "8-bit, at most 255 classes")
    self.models = models_lib.build(config)
    self.mesh = mesh or make_mesh()
    self.settings = settings or InferenceSettings.from_config(config)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharded = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    self._eval_step = jax.jit(
        self._eval_step_impl, static_argnames=("with_predictions",),
        out_shardings=(self.replicated, self.replicated, self.batch_sharded))
    self._predict = jax.jit(self._predict_impl, static_argnames=("out_hw",),
                            out_shardings=self.batch_sharded)

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
      want = {k: v for k, v in expected[part].items() if v}
      have = {k: v for k, v in variables[part].items() if v}
      want_flat = dict(jax.tree_util.tree_flatten_with_path(want)[0])
      have_flat = dict(jax.tree_util.tree_flatten_with_path(have)[0])
      for path, leaf in want_flat.items():
        name = f"{part}/{jax.tree_util.keystr(path, simple=True, separator='/')}"
        if path not in have_flat:
          raise UserError(f"{where} does not match config.model (arch "
                          f"{self.config.model.arch}, width {self.config.model.get('width', 64)}, "
                          f"{self.num_classes} classes): missing {name}")
        if tuple(np.shape(have_flat[path])) != tuple(leaf.shape):
          raise UserError(f"{where} does not match config.model (arch "
                          f"{self.config.model.arch}, width {self.config.model.get('width', 64)}, "
                          f"{self.num_classes} classes): {name} has shape "
                          f"{tuple(np.shape(have_flat[path]))}, expected {tuple(leaf.shape)}")
      extra = sorted(set(have_flat) - set(want_flat))
      if extra:
        name = jax.tree_util.keystr(extra[0], simple=True, separator="/")
        raise UserError(f"{where} does not match config.model (arch {self.config.model.arch}):"
                        f" unexpected variable {part}/{name}")

  def place_variables(self, variables: dict) -> dict:
    """Feature extractor + classifier variables as float32, replicated on the mesh."""
    used = {part: variables[part] for part in ("feature_extractor", "classifier")}
    used = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), used)
    if self.fold_batch_norm and used["feature_extractor"].get("batch_stats"):
      used["feature_extractor"] = fold_batch_norm(
          used["feature_extractor"], frozen=bool(self.config.model.get("freeze_bn", True)))
    return jax.device_put(used, self.replicated)

  # -- compiled functions

  def logits(self, variables: dict, images: jax.Array) -> jax.Array:
    """float32 class scores at feature resolution (stride 8)."""
    fe = variables["feature_extractor"]
    fe_variables = {"params": fe["params"]}
    if fe.get("batch_stats"):
      fe_variables["batch_stats"] = fe["batch_stats"]
    classifier_variables = {"params": variables["classifier"]["params"]}
    if not self.convs_as_matmuls:
      features = self.models.feature_extractor.apply(fe_variables, images, train=False)
      return self.models.classifier.apply(classifier_variables, features).astype(jnp.float32)
    with nn_linen.intercept_methods(_conv_as_matmul):
      features = self.models.feature_extractor.apply(fe_variables, images, train=False)
      logits = self.models.classifier.apply(classifier_variables, features)
    return logits.astype(jnp.float32)

  def scores(self, variables: dict, images: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """[B, out_h, out_w, K] scores whose argmax is the prediction.

    Single scale without flip: the upsampled logits (softmax would not change the
    argmax). Otherwise the release's average of softmax probabilities at label size.
    """
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

  def _eval_step_impl(self, variables, images, labels, valid, with_predictions: bool):
    predictions = self._predict_impl(variables, images, labels.shape[1:3])
    counts = confusion_counts(predictions, labels, valid, self.num_classes)
    num_valid = jnp.sum(valid.astype(jnp.int32))
    if not with_predictions:
      predictions = jnp.zeros((predictions.shape[0],), jnp.uint8)
    return counts, num_valid, predictions

  def predict(self, variables, images: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """uint8 [B, out_h, out_w] train ids of this process's normalised `images`
    (any B: padded to a multiple of the local devices and cropped back)."""
    images = np.asarray(images, np.float32)
    rows = -(-len(images) // self.local_batch_multiple()) * self.local_batch_multiple()
    predictions = self._predict(variables, self.global_batch(_pad_rows(images, rows, 0.0)),
                                out_hw=tuple(int(v) for v in out_hw))
    return self.local_rows(predictions)[:len(images)]

  def eval_step(self, variables, images, labels, valid, with_predictions: bool = False):
    return self._eval_step(variables, self.global_batch(images), self.global_batch(labels),
                           self.global_batch(valid), with_predictions=with_predictions)

  # -- host <-> mesh

  def local_batch_multiple(self) -> int:
    """This process's batch must be a multiple of its device count."""
    return max(1, len(self.mesh.local_devices))

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
         bool(model.get("freeze_bn", True)), str(model.get("dtype", "float32")), settings,
         tuple(d.id for d in jax.devices()))
  if key not in _PREDICTORS:
    _PREDICTORS[key] = Predictor(config, settings=settings)
  return _PREDICTORS[key]


def _pad_rows(array: np.ndarray, rows: int, fill) -> np.ndarray:
  if array.shape[0] == rows:
    return array
  pad = np.full((rows - array.shape[0],) + array.shape[1:], fill, dtype=array.dtype)
  return np.concatenate([array, pad])


@dataclasses.dataclass
class _Chunk:
  """One compiled step's worth of this process's examples (one label size)."""
  images: np.ndarray
  labels: np.ndarray
  valid: np.ndarray
  names: list[str]
  shapes: np.ndarray


def _chunks(batch: dict[str, Any], multiple: int) -> Iterable[_Chunk]:
  """Splits a loader batch by label size and pads it to a multiple of the local devices.

  The logits are upsampled to the label size, so a step needs one label size; the loader
  pads mixed-size labels with 255 to the largest (rare: Cityscapes is all 2048x1024).
  """
  images = np.asarray(batch["image"], np.float32)
  labels = np.asarray(batch["label"], np.uint8)
  valid = np.asarray(batch["valid"], bool)
  names = [str(n) for n in batch["name"]]
  shapes = np.asarray(batch.get("label_shape", np.tile(labels.shape[1:3], (len(labels), 1))))
  shapes = np.where(valid[:, None], shapes, np.asarray(labels.shape[1:3])[None])
  distinct = sorted({tuple(int(v) for v in s) for s in shapes})
  rows = -(-len(images) // multiple) * multiple
  for shape in distinct:
    select = np.all(shapes == shape, axis=1)
    chunk_labels = labels[select][:, :shape[0], :shape[1]]
    yield _Chunk(
        images=_pad_rows(images[select], rows, 0.0),
        labels=_pad_rows(chunk_labels, rows, IGNORE_LABEL),
        valid=_pad_rows(valid[select], rows, False),
        names=[n for n, s in zip(names, select) if s],
        shapes=shapes[select])


# ----------------------------------------------------------------------------- masks


def _palette_bytes(num_classes: int) -> bytes:
  colours = np.zeros((256, 3), np.uint8)
  colours[:num_classes] = labels_lib.palette(num_classes)
  return colours.tobytes()


def save_palette_png(path: str | os.PathLike, train_ids: np.ndarray, num_classes: int) -> None:
  """Mode 'P' PNG: pixel value = train id, colours = the Cityscapes palette.

  Reading its pixel values (not its colours) gives the train ids back: the pseudo-label
  format of stage 3.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(np.asarray(train_ids, np.uint8), mode="P")
  image.putpalette(_palette_bytes(num_classes))
  _save_atomic(image, path)


def save_train_id_png(path: str | os.PathLike, train_ids: np.ndarray) -> None:
  """8-bit greyscale PNG of train ids."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _save_atomic(Image.fromarray(np.asarray(train_ids, np.uint8), mode="L"), path)


def _save_atomic(image: Image.Image, path: pathlib.Path) -> None:
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  image.save(temporary, format="PNG")
  os.replace(temporary, path)


class _MaskWriter:
  """Writes PNGs on background threads (compression is slower than it needs to be on
  the critical path) and re-raises the first failure."""

  def __init__(self, workers: int = 4):
    self._pool = concurrent.futures.ThreadPoolExecutor(workers)
    self._pending: list[concurrent.futures.Future] = []

  def submit(self, fn, *args) -> None:
    self._pending.append(self._pool.submit(fn, *args))
    if len(self._pending) > 64:
      self._drain(32)

  def _drain(self, keep: int) -> None:
    while len(self._pending) > keep:
      self._pending.pop(0).result()

  def close(self) -> None:
    try:
      self._drain(0)
    finally:
      self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- loops


def _loader(config, split: str, process_index: int, process_count: int):
  from fada_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.eval_loader(config, split, process_index, process_count)


def _num_images(config, split: str) -> int | None:
  """Images in the split (for the progress bar); None when the source cannot be opened
  (the loader then reports why)."""
  from fada_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    return len(pipeline.open_source(config, config.data.target.removesuffix("_pseudo"), split))
  except UserError:
    return None


def _run_split(predictor: Predictor, variables: dict, config, split: str, *,
               mask_fn=None, description: str = "eval") -> dict[str, Any]:
  """Evaluates the placed `variables` on `split` of the target; returns the metrics.

  `mask_fn(name, prediction)` (optional) receives each of this process's predictions,
  cropped to its label size.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  loader = _loader(config, split, process_index, process_count)
  total = _num_images(config, split)
  accumulator = MetricAccumulator(predictor.num_classes)
  multiple = predictor.local_batch_multiple()
  with_predictions = mask_fn is not None
  progress = tqdm(total=total, unit="img", desc=description, dynamic_ncols=True,
                  disable=process_index != 0, file=sys.stderr, smoothing=0.1)
  pending: list[tuple[Any, _Chunk]] = []

  def consume(outputs, chunk: _Chunk) -> None:
    counts, num_valid, predictions = outputs
    accumulator.add(np.asarray(counts), int(num_valid))
    progress.update(int(num_valid))
    if with_predictions:
      rows = predictor.local_rows(predictions)
      for j, name in enumerate(chunk.names):
        if chunk.valid[j]:
          mask_fn(name, rows[j, :chunk.shapes[j][0], :chunk.shapes[j][1]])

  try:
    for batch in loader:
      for chunk in _chunks(batch, multiple):
        outputs = predictor.eval_step(variables, chunk.images, chunk.labels, chunk.valid,
                                      with_predictions=with_predictions)
        # Dispatch is asynchronous: fetch the previous step's results while this one runs.
        while pending:
          consume(*pending.pop(0))
        pending.append((outputs, chunk))
    while pending:
      consume(*pending.pop(0))
  finally:
    progress.close()
    close = getattr(loader, "close", None)
    if close is not None:
      close()
  return accumulator.result()


def _prediction_writer(config, output_dir: pathlib.Path, writer: _MaskWriter):
  num_classes = int(config.model.num_classes)

  def write(name: str, prediction: np.ndarray) -> None:
    writer.submit(save_train_id_png, output_dir / "predictions" / f"{name}.png", prediction)
    writer.submit(save_palette_png, output_dir / "color" / f"{name}.png", prediction,
                  num_classes)
  return write


def load_checkpoint_for_eval(config, checkpoint_path: str | os.PathLike,
                             predictor: Predictor) -> tuple[dict, dict]:
  """(variables placed on the mesh, meta) of a checkpoint, checked against the config."""
  variables, meta = checkpoint_lib.load_model(checkpoint_path)
  num_classes = meta.get("num_classes")
  if num_classes is not None and int(num_classes) != predictor.num_classes:
    raise UserError(f"checkpoint {checkpoint_path} has {num_classes} classes but "
                    f"config.model.num_classes={predictor.num_classes}")
  arch = meta.get("arch")
  if arch and arch != config.model.arch:
    raise UserError(f"checkpoint {checkpoint_path} is a {arch} but config.model.arch="
                    f"{config.model.arch}")
  predictor.check_variables(variables, f"checkpoint {checkpoint_path}")
  return predictor.place_variables(variables), meta


def evaluate_checkpoint(config, checkpoint_path: str | os.PathLike,
                        output_dir: str | os.PathLike, *,
                        predictor: Predictor | None = None) -> dict[str, Any]:
  """Evaluates ONE model checkpoint on config.eval.split of the target; returns metrics.

  `output_dir` is the evaluation folder itself (e.g. WORKDIR/eval): masks go to
  output_dir/predictions and output_dir/color when config.eval.save_predictions.
  Writes no metrics file (`run_eval` does).
  """
  predictor = predictor or predictor_for(config)
  variables, meta = load_checkpoint_for_eval(config, checkpoint_path, predictor)
  output_dir = pathlib.Path(output_dir)
  writer = _MaskWriter() if config.eval.save_predictions else None
  mask_fn = _prediction_writer(config, output_dir, writer) if writer else None
  start = time.perf_counter()
  try:
    metrics = _run_split(predictor, variables, config, config.eval.split, mask_fn=mask_fn,
                         description=f"eval {pathlib.Path(checkpoint_path).name}")
  finally:
    if writer is not None:
      writer.close()
  metrics["checkpoint"] = str(checkpoint_path)
  metrics["seconds"] = time.perf_counter() - start
  metrics["flip"] = predictor.settings.flip
  metrics["scales"] = list(predictor.settings.scales)
  step = checkpoint_step(checkpoint_path, meta)
  if step is not None:
    metrics["step"] = step
  return metrics


# ----------------------------------------------------------------------------- folders


def checkpoint_step(path: str | os.PathLike, meta: dict | None = None) -> int | None:
  """Training step of a checkpoint: meta's 'step', else the last number in its name."""
  if meta and meta.get("step") is not None:
    return int(meta["step"])
  numbers = re.findall(r"\d+", pathlib.Path(path).name)
  return int(numbers[-1]) if numbers else None


def find_checkpoints(path: str | os.PathLike) -> list[pathlib.Path]:
  """The checkpoint(s) PATH names: itself, its checkpoint subfolders, or those of
  PATH/checkpoints (a training run's folder). Ordered by step, then name."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise UserError(f"checkpoint not found: {path}")
  if (path / checkpoint_lib.META_FILE).is_file() or not path.is_dir():
    return [path]  # load_model reports what is wrong with it, if anything

  def children(folder: pathlib.Path) -> list[pathlib.Path]:
    found = [c for c in folder.iterdir()
             if c.is_dir() and not c.name.startswith(".")
             and (c / checkpoint_lib.META_FILE).is_file()]
    return sorted(found, key=lambda c: (checkpoint_step(c) is None, checkpoint_step(c) or 0,
                                        c.name))

  found = children(path)
  if not found and (path / "checkpoints").is_dir():
    found = children(path / "checkpoints")
  if not found:
    raise UserError(f"not a checkpoint (no {checkpoint_lib.META_FILE}) nor a folder of "
                    f"checkpoints: {path}")
  return found


def format_table(metrics: dict[str, Any]) -> str:
  """Per-class IoU / accuracy table and the summary line."""
  names = metrics["class_names"]
  width = max(len(n) for n in names) + 2
  lines = [f"{'class':<{width}}{'IoU':>8}{'Acc':>8}"]
  for name, iou, acc in zip(names, metrics["iou_per_class"], metrics["acc_per_class"]):
    lines.append(f"{name:<{width}}{100 * iou:8.2f}{100 * acc:8.2f}")
  summary = (f"mIoU {100 * metrics['miou']:.2f}  mAcc {100 * metrics['macc']:.2f}  "
             f"allAcc {100 * metrics['allacc']:.2f}")
  if "miou_13" in metrics:
    summary += f"  mIoU(13) {100 * metrics['miou_13']:.2f}"
  lines.append(summary + f"  ({metrics['num_images']} images)")
  return "\n".join(lines)


def _write_results_csv(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  names = records[0]["class_names"]
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(temporary, "w", newline="") as f:
    writer = csv.writer(f)
    header = ["step", "checkpoint", "miou"] + (["miou_13"] if "miou_13" in records[0] else [])
    writer.writerow(header + list(names))
    for record in records:
      row = [record.get("step", ""), record["checkpoint"], f"{record['miou']:.6f}"]
      if "miou_13" in record:
        row.append(f"{record['miou_13']:.6f}")
      writer.writerow(row + [f"{v:.6f}" for v in record["iou_per_class"]])
  os.replace(temporary, path)


def run_eval(config, checkpoint_path: str | os.PathLike,
             workdir: str | os.PathLike) -> dict[str, Any]:
  """`--mode=eval`: evaluates PATH (one checkpoint or a folder of them) into DIR/eval.

  Prints the per-class table of each checkpoint, writes results.csv (a row per
  checkpoint) and metrics.json (the best checkpoint's metrics), returns the latter.
  """
  checkpoints = find_checkpoints(checkpoint_path)
  output_dir = pathlib.Path(workdir) / EVAL_DIR
  main_process = jax.process_index() == 0
  if main_process:
    output_dir.mkdir(parents=True, exist_ok=True)
  predictor = predictor_for(config)
  records = []
  for path in checkpoints:
    # Several checkpoints: each one's masks in a folder of its own name.
    masks_dir = output_dir if len(checkpoints) == 1 else output_dir / path.name
    metrics = evaluate_checkpoint(config, path, masks_dir, predictor=predictor)
    records.append(metrics)
    if main_process:
      print(f"\n{path}\n{format_table(metrics)}", flush=True)
      _write_results_csv(output_dir / RESULTS_FILE, records)
  best = max(records, key=lambda r: r["miou"])
  best = dict(best)
  if len(records) > 1:
    best["evaluated"] = [{"checkpoint": r["checkpoint"], "step": r.get("step"),
                          "miou": r["miou"]} for r in records]
    if main_process:
      step = f" (step {best['step']})" if "step" in best else ""
      print(f"\nbest: {best['checkpoint']}{step} mIoU {100 * best['miou']:.2f} "
            f"of {len(records)} checkpoints", flush=True)
  if main_process:
    checkpoint_lib.write_json_atomic(output_dir / METRICS_FILE, best)
  return best


# ----------------------------------------------------------------------------- pseudo labels


def write_pseudo_labels(config, variables: dict, out_dir: str | os.PathLike,
                        split: str = "train") -> dict[str, Any]:
  """Predicts every image of the target's `split` at full label resolution and writes
  <out_dir>/<city>/<stem>.png palette PNGs (pixel value = train id).

  `config` gives the inference settings: pass the stage-2 config (its test size, flip and
  scales) as the release does. `variables` are the model's (host or device arrays).
  Returns the metrics of the pseudo labels against the split's own labels (informative).
  """
  predictor = predictor_for(config)
  predictor.check_variables(variables, "pseudo-labelling model")
  placed = predictor.place_variables(variables)
  out_dir = pathlib.Path(out_dir)
  num_classes = predictor.num_classes
  writer = _MaskWriter()

  def write(name: str, prediction: np.ndarray) -> None:
    writer.submit(save_palette_png, out_dir / f"{name}.png", prediction, num_classes)

  try:
    metrics = _run_split(predictor, placed, config, split, mask_fn=write,
                         description="pseudo labels")
  finally:
    writer.close()
  if jax.process_index() == 0:
    _log.info("pseudo labels written to %s (%d images; mIoU against the %s labels %.2f)",
              out_dir, metrics["num_images"], split, 100 * metrics["miou"])
  return metrics


def run_pseudo_label(config, checkpoint_path: str | os.PathLike,
                     output_dir: str | os.PathLike) -> dict[str, Any]:
  """`--mode=pseudo_label`: the stage-2 checkpoint's pseudo labels for target train."""
  checkpoints = find_checkpoints(checkpoint_path)
  if len(checkpoints) != 1:
    raise UserError(f"--mode=pseudo_label needs one checkpoint, {checkpoint_path} holds "
                    f"{len(checkpoints)}")
  variables, _ = checkpoint_lib.load_model(checkpoints[0])
  metrics = write_pseudo_labels(config, variables, output_dir)
  if jax.process_index() == 0:
    print(f"pseudo labels of {metrics['num_images']} images written to {output_dir}",
          flush=True)
  return metrics
