"""grain input pipelines for the three training stages and for evaluation.

Every training example is a pure function of (config.seed, stream, global position k):
which file it reads (the stream's order) and every random transform parameter (a numpy
Generator seeded with (seed, stream, k)). Step s of a stream with global batch B covers
positions s*B .. s*B + B - 1; JAX process p of P builds positions s*B + p*B/P + j,
j < B/P, so each process reads only its share and together they cover the global batch
exactly once. Batches are therefore identical whatever `config.data.workers` is, and the
iterator state is just the next step: `get_state()` -> {'step': s}; `set_state()` restarts
the grain pipeline there, so a resumed run sees exactly the batches of an uninterrupted one.

Per step a training iterator yields {'image': uint8 RGB [B/P, H, W, 3], 'label': uint8
[B/P, H, W] train ids (255 ignore)}. Images stay uint8 up to the device, a quarter of
float32's bytes; the step functions and the Predictor normalise them there
(`transforms.normalize_on_device`, config.data.normalization). Stage 'source_only': the
source stream gets the whole batch; 'adversarial': source and target get half each (as
the release), the target's batches {'image'} only (the step uses no target label, so none
is read); 'self_distill': the one labelled stream, the pseudo-labelled target named
by config.data.source ('cityscapes_pseudo', 'synthetic_target_pseudo'), gets the whole
batch, under 'source'.

With config.data.resize_on_device, training images come at full size on a canvas, with
the plans (`pil_exact`, keys 'image:<name>') that `device_augment` turns into exactly the
jittered, resized images on the device.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from fada_jax.constants import IGNORE_LABEL
from fada_jax.data import pil_exact
from fada_jax.data import sampling
from fada_jax.data import sources as sources_lib
from fada_jax.data import transforms
from fada_jax.errors import UserError

SOURCE_STREAM, TARGET_STREAM, EVAL_STREAM = 1, 2, 3
SYNTHETIC_NAMES = ("synthetic_source", "synthetic_target")
DATASET_NAMES = sources_lib.SOURCE_NAMES + SYNTHETIC_NAMES
_FAR_FUTURE = 1 << 40  # Training streams are endless; the loop decides when to stop.



# ----------------------------------------------------------------------------- sources


def _data_field(config, name: str, default: Any = None) -> Any:
  return config.data[name] if name in config.data else default


def open_source(config, name: str, split: str):
  """The random-access source of dataset `name`, split `split`, for this config."""
  num_classes = int(config.model.num_classes)
  if name in SYNTHETIC_NAMES:
    from fada_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    kwargs = {}
    image_size = _data_field(config, "synthetic_image_size")
    if image_size:
      kwargs["image_size"] = tuple(image_size)
    return synthetic.make_synthetic_source(
        name.split("_", 1)[1], split, num_classes, size=int(config.data.synthetic_size),
        seed=int(config.seed), **kwargs)
  if name not in sources_lib.SOURCE_NAMES:
    raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
  data_format = _data_field(config, "format", "folder")
  pseudo_label_dir = _data_field(config, "pseudo_label_dir") or None
  if data_format == "folder":
    return sources_lib.make_source(name, config.data.root, split, num_classes,
                                   pseudo_label_dir=pseudo_label_dir,
                                   skip_corrupt=bool(_data_field(config, "skip_corrupt")))
  if data_format == "array_record":
    from fada_jax.data import prepared  # pylint: disable=g-import-not-at-top
    return prepared.make_prepared_source(name, config.data.root, split, num_classes,
                                         pseudo_label_dir=pseudo_label_dir)
  raise UserError(f"config.data.format must be 'folder' or 'array_record', got {data_format!r}")


class PseudoLabelSource:
  """Another source's images with labels from <pseudo_label_dir>/<name>.png (train ids)."""

  def __init__(self, base, pseudo_label_dir: str):
    self.base = base
    self.pseudo_label_dir = str(pseudo_label_dir)
    self.names = list(getattr(base, "names", []))
    for name in self.names:
      path = pathlib.Path(self.pseudo_label_dir) / f"{name}.png"
      if not path.is_file():
        raise UserError(f"{name} has no pseudo label {path}")

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = dict(self.base[index])
    label = sources_lib.read_label_ids(f"{self.pseudo_label_dir}/{example['name']}.png")
    example["label"] = np.asarray(label, dtype=np.uint8)
    return example


def _pseudo_labelled_source(config, name: str):
  """Stage 3's stream: 'cityscapes_pseudo' or '<dataset>_pseudo' (e.g. synthetic_target_pseudo)."""
  if name == "cityscapes_pseudo" or name in sources_lib.SOURCE_NAMES:
    return open_source(config, name, "train")
  base = name[:-len("_pseudo")] if name.endswith("_pseudo") else name
  if base not in DATASET_NAMES:
    raise UserError(f"unknown dataset {name!r}; expected cityscapes_pseudo or "
                    "synthetic_target_pseudo in stage self_distill")
  if not _data_field(config, "pseudo_label_dir"):
    raise UserError(f"{name} needs config.data.pseudo_label_dir (the pseudo-label folder)")
  return PseudoLabelSource(open_source(config, base, "train"), config.data.pseudo_label_dir)


def _training_source(config, stream: str):
  """The source of the 'source' or 'target' stream of config.stage."""
  if stream == "source":
    if config.stage == "self_distill":
      return _pseudo_labelled_source(config, config.data.source)
    return open_source(config, config.data.source, "train")
  return open_source(config, config.data.target, "train")


# ----------------------------------------------------------------------------- per example


@dataclasses.dataclass(frozen=True)
class ResizeTransform:
  """Stages 1-2: fixed-size resize (image bicubic, label nearest), optional jitter.

  `jitter_first` jitters the full frame before resizing, as the release does; jitter
  commutes with resizing up to rounding, so jittering the smaller frame is a cheaper
  near-equivalent (config.data.jitter_first=False).

  With a `canvas` (width, height) the image is left to the device
  (config.data.resize_on_device): it comes as a `pil_exact` plan, the full frame on the
  canvas with the same jitter draw, which `device_augment` turns into the same pixels.
  """
  size: tuple[int, int]
  color_jitter: tuple[float, float, float, float]
  jitter_first: bool = True
  canvas: tuple[int, int] | None = None

  def __call__(self, example, rng: np.random.Generator):
    image = self.image_only(example["image"], rng)
    return image, transforms.resize_label(example["label"], self.size)

  def image_only(self, image: np.ndarray, rng: np.random.Generator):
    """The image __call__ would give (same draws), for streams whose labels go unused."""
    if self.canvas is not None:
      params = (transforms.sample_jitter(self.color_jitter, rng) if any(self.color_jitter)
                else None)
      return pil_exact.plan_example(image, self.size, self.canvas, params)
    if self.jitter_first and any(self.color_jitter):
      return transforms.resize_image(transforms.color_jitter(image, self.color_jitter, rng),
                                     self.size)
    return transforms.resize_and_jitter(image, self.size, self.color_jitter, rng)


@dataclasses.dataclass(frozen=True)
class ScaleCropTransform:
  """Stage 3: random scale, crop (padding image 0 / label 255), flip, jitter.

  With a `canvas` (and `jitter_first`) the image is left to the device, as a `pil_exact`
  plan of the same draws (see ResizeTransform).
  """
  crop_size: tuple[int, int]
  scale_range: tuple[float, float]
  flip: bool
  color_jitter: tuple[float, float, float, float]
  jitter_first: bool = True
  canvas: tuple[int, int] | None = None

  def __call__(self, example, rng: np.random.Generator):
    image, label = example["image"], example["label"]
    if self.jitter_first:
      # The release's order: jitter the full frame, flip, scale, crop (drawn in that order).
      params = (transforms.sample_jitter(self.color_jitter, rng) if any(self.color_jitter)
                else None)
      geometry = transforms.draw_flip_scale_crop(*image.shape[:2], self.flip,
                                                 self.scale_range, self.crop_size, rng)
      label = transforms.flip_scale_crop(label, self.crop_size, *geometry, is_label=True)
      if self.canvas is not None:
        return pil_exact.plan_scale_crop(image, self.canvas, self.crop_size,
                                         self.scale_range[0], params, *geometry), label
      if params is not None:
        image = transforms.apply_jitter(image, params)
      return transforms.flip_scale_crop(image, self.crop_size, *geometry), label
    # Jitter commutes with scaling up to rounding, and on the crop it costs a fraction.
    image, label = transforms.random_scale(image, label, self.scale_range, rng)
    image, label = transforms.random_crop(image, label, self.crop_size, rng)
    if self.flip:
      image, label = transforms.random_flip(image, label, rng)
    image = transforms.color_jitter(np.ascontiguousarray(image), self.color_jitter, rng)
    # Crop padding is uint8 0 here, normalised on the device like every other pixel, as
    # the release pads the image before normalising it.
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


class BatchMaker:
  """step -> this process's share of the stream's global batch (a picklable function)."""

  def __init__(self, source, transform: Callable, seed: int, stream_id: int,
               global_batch: int, process_index: int, process_count: int,
               order: np.ndarray | None = None, with_labels: bool = True):
    if global_batch % process_count:
      raise UserError(f"global batch size {global_batch} is not divisible by the "
                      f"{process_count} JAX processes")
    self.source = source
    self.transform = transform
    self.seed, self.stream_id = int(seed), int(stream_id)
    self.global_batch = int(global_batch)
    self.local_batch = self.global_batch // process_count
    self.offset = process_index * self.local_batch
    self.order = order
    self.num_files = len(source)
    # Stage 2's target stream: its labels go unused, so they are neither read nor decoded.
    self.with_labels = bool(with_labels)

  def positions(self, step: int) -> range:
    start = int(step) * self.global_batch + self.offset
    return range(start, start + self.local_batch)

  def file_index(self, position: int) -> int:
    if self.order is not None:
      return int(self.order[position % self.order.size])
    return sampling.epoch_order(position, self.num_files, self.seed * 7919 + self.stream_id)

  def example(self, position: int):
    rng = np.random.default_rng([self.seed, self.stream_id, position])
    index = self.file_index(position)
    if not self.with_labels:
      read_image = getattr(self.source, "read_image", None)
      image = read_image(index) if read_image else self.source[index]["image"]
      return self.transform.image_only(image, rng)
    return self.transform(self.source[index], rng)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if not self.with_labels:
      return _stack_images([self.example(k) for k in self.positions(step)])
    images, labels = zip(*(self.example(k) for k in self.positions(step)))
    return {**_stack_images(images), "label": np.stack(labels)}


def _stack_images(images: Sequence[Any]) -> dict[str, np.ndarray]:
  if isinstance(images[0], dict):  # plans for the device
    return pil_exact.stack_plans(list(images))
  return {"image": np.stack(images)}


# ----------------------------------------------------------------------------- iterators


_ERROR_KEY = "_user_error"


class _ErrorAsValue:
  """Carries a UserError out of grain's worker processes as data.

  grain re-raises a worker's exception as a bare error with a traceback; returning the
  message lets the consumer raise the original one-line error instead.
  """

  def __init__(self, make_batch: Callable[[int], Any]):
    self.make_batch = make_batch

  def __call__(self, step: int):
    try:
      return self.make_batch(step)
    except UserError as e:
      return {_ERROR_KEY: str(e)}


def _out_of_shared_memory(value: Any) -> Any:
  """A batch array from grain's workers as an ordinary array, its shared memory unlinked.

  grain hands a worker's arrays over in shared memory that is unlinked only when the
  array is deleted. Batches go on to JAX, which on CPU aliases host memory instead of
  copying it and drops its references late, from its own threads: the arrays of the last
  steps then outlive the interpreter's exit handlers, and Python's resource tracker
  reports their blocks as leaked (flakily, as it depends on when the device work ends).
  One copy here (a few ms for a stage-2 batch) ends the block's life at once, whoever
  holds the batch.
  """
  shm = getattr(value, "shm", None)
  if shm is None or not isinstance(value, np.ndarray):
    return value
  owned = np.array(value, copy=True, subok=False)
  if getattr(value, "_unlink_on_del", False):
    value._unlink_on_del = False  # pylint: disable=protected-access  (unlinked here, once)
    shm.unlink()
  return owned


def _finish_shared_memory_unlinks(timeout: float = 30.0) -> None:
  """Waits for grain's pending unlinks of the shared memory behind batches from workers.

  Batches handed out are unlinked at once (`_out_of_shared_memory`); those grain read
  ahead and drops when an iterator closes are unlinked as their arrays are deleted, on
  grain's one daemon thread. Drops just before exit leave unlinks that the exit cuts
  short, and Python's resource tracker reports each as a leaked shared_memory object.
  Run at exit: collect what is unreferenced, then wait for a no-op queued behind those
  unlinks.
  """
  gc.collect()
  shared_memory_array = getattr(grain.multiprocessing, "SharedMemoryArray", None)
  pool = getattr(shared_memory_array, "_del_thread_pool", None)
  if pool is not None:
    try:
      pool.apply_async(int).wait(timeout)
    except ValueError:  # the pool was closed already: nothing can be pending on it
      pass


_unlinks_awaited_at_exit = False


def _await_unlinks_at_exit() -> None:
  global _unlinks_awaited_at_exit
  if not _unlinks_awaited_at_exit:
    # Registered after multiprocessing's own exit handler, so it runs before it, while
    # grain's deletion thread still runs.
    atexit.register(_finish_shared_memory_unlinks)
    _unlinks_awaited_at_exit = True


class BatchIterator(Iterator):
  """Iterator of per-step batches with checkpointable state {'step': int}."""

  def __init__(self, make_batch: Callable[[int], Any], start_step: int = 0,
               workers: int = 0, num_steps: int = _FAR_FUTURE):
    self._make_batch = make_batch
    self._workers = int(workers)
    self._num_steps = int(num_steps)
    self._iterator = None
    self._reading_workers = 0
    self._step = int(start_step)
    self._start(self._step)

  def _start(self, step: int) -> None:
    self.close()
    self._step = int(step)
    dataset = grain.MapDataset.range(self._step, max(self._step, self._num_steps))
    dataset = dataset.map(_ErrorAsValue(self._make_batch))
    # A worker process repays its start-up (a second or two of imports) only over several
    # batches: no more workers than batches after the first, which the in-process read
    # gives as soon (a validation split of one batch reads in-process).
    self._reading_workers = min(self._workers, max(0, self._num_steps - self._step - 1))
    if self._reading_workers > 0:
      # grain's worker processes read its absl flags; outside an absl app (tests, notebooks,
      # tools) they are unparsed, so take their defaults.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      _await_unlinks_at_exit()
      dataset = dataset.to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._reading_workers,
                                       per_worker_buffer_size=2))
    else:
      dataset = dataset.to_iter_dataset(
          grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    self._iterator = iter(dataset)

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  def __next__(self):
    batch = next(self._iterator)
    if _ERROR_KEY in batch:
      raise UserError(batch[_ERROR_KEY])
    self._step += 1
    if self._reading_workers > 0:
      batch = {key: _out_of_shared_memory(value) for key, value in batch.items()}
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    self._start(int(state["step"]))

  def close(self) -> None:
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
      pass


def _stream_batches(config) -> dict[str, int]:
  """Global batch size of each training stream for config.stage."""
  batch = int(config.solver.batch_size)
  if config.stage == "source_only":
    return {"source": batch}
  if config.stage == "adversarial":
    if batch % 2:
      raise UserError(f"stage adversarial splits config.solver.batch_size={batch} into "
                      "half source, half target: it must be even")
    return {"source": batch // 2, "target": batch // 2}
  if config.stage == "self_distill":
    # One labelled stream, the pseudo-labelled target (config.data.source in this stage).
    return {"source": batch}
  raise UserError(f"unknown config.stage {config.stage!r}")


def _jitter(config) -> tuple[float, float, float, float]:
  return tuple(float(v) for v in config.data.color_jitter)


def _jitter_first(config) -> bool:
  return bool(_data_field(config, "jitter_first", True))


def resizes_on_device(config) -> bool:
  """Whether config's training streams leave jittering, resizing (and stage 3's flip and
  crop) to the device: config.data.resize_on_device 'on', or 'auto' where JAX's backend is
  not the CPU (whose cores the reading processes need)."""
  mode = _data_field(config, "resize_on_device", "off")
  if mode == "auto":
    import jax  # pylint: disable=g-import-not-at-top  (the training process has it loaded)
    return jax.default_backend() != "cpu"
  return mode == "on"


def _canvas(source, size: tuple[int, int]) -> tuple[int, int]:
  """(width, height) of the canvas planned frames cross on: the first frame's size (a
  dataset's frames mostly share one), at least the training size. Larger frames are
  resized on the host and cross at the training size."""
  read_image = getattr(source, "read_image", None)
  first = read_image(0) if read_image else source[0]["image"]
  return max(int(first.shape[1]), size[0]), max(int(first.shape[0]), size[1])


def _class_presence(source, num_classes: int) -> np.ndarray:
  """bool [N, K] label-info table; sources that store or cache one provide it."""
  if hasattr(source, "class_presence"):
    presence = np.asarray(source.class_presence(progress=True), dtype=bool)
  else:  # Generic fallback: read every label once.
    presence = np.stack([
        np.bincount(source[i]["label"].ravel(), minlength=256)[:num_classes] > 0
        for i in range(len(source))])
  return presence[:, :num_classes]


def _resized_source(config, stream: str, size: tuple[int, int],
                    jitter: tuple[float, float, float, float]):
  """The stream's train split prepared at its training size, when that gives exactly the
  batches of the full-size frames: the resize comes first (no jitter, or jitter after
  it). None otherwise, or when it is not prepared (`prepare_data.py --at_training_size`)."""
  if _data_field(config, "format", "folder") != "array_record" or config.stage not in (
      "source_only", "adversarial"):
    return None
  if any(jitter) and _jitter_first(config):
    return None  # The release jitters the full-size frame: only that frame gives its pixels.
  from fada_jax.data import prepared  # pylint: disable=g-import-not-at-top
  name = config.data.source if stream == "source" else config.data.target
  return prepared.resized_source_if_prepared(name, config.data.root,
                                             int(config.model.num_classes), size)


def _make_stream(config, stream: str, global_batch: int, process_index: int,
                 process_count: int) -> BatchMaker:
  stream_id = SOURCE_STREAM if stream == "source" else TARGET_STREAM
  if config.stage != "self_distill":
    size = tuple(int(v) for v in (config.data.source_size if stream == "source"
                                  else config.data.target_size))
    jitter = (_jitter(config) if stream == "source" and config.stage == "adversarial"
              else (0.0, 0.0, 0.0, 0.0))
    source = _resized_source(config, stream, size, jitter)
    if source is None:
      source = _training_source(config, stream)
  else:
    source = _training_source(config, stream)
  if config.stage == "self_distill":
    crop_size = tuple(int(v) for v in config.data.crop_size)
    canvas = (_canvas(source, crop_size)
              if resizes_on_device(config) and _jitter_first(config) and len(source) else None)
    transform = ScaleCropTransform(
        crop_size, tuple(float(v) for v in config.data.scale_range), bool(config.data.flip),
        _jitter(config), _jitter_first(config), canvas)
    return BatchMaker(source, transform, config.seed, stream_id, global_batch,
                      process_index, process_count)
  canvas = None
  if (resizes_on_device(config) and (_jitter_first(config) or not any(jitter))
      and getattr(source, "image_size", None) is None and len(source)):
    canvas = _canvas(source, size)  # (a source prepared at `size` has nothing to resize)
  if stream == "source":
    transform = ResizeTransform(size, jitter, _jitter_first(config), canvas)
    total = int(config.solver.max_iter) * global_batch
    presence = _class_presence(source, int(config.model.num_classes))
    order = sampling.class_balanced_order(
        presence, sampling.num_class_balanced_draws(total), int(config.seed))
    return BatchMaker(source, transform, config.seed, stream_id, global_batch,
                      process_index, process_count, order)
  transform = ResizeTransform(size, jitter, canvas=canvas)
  return BatchMaker(source, transform, config.seed, stream_id, global_batch,
                    process_index, process_count, with_labels=False)


def _stream_iterator(config, stream: str, global_batch: int, process_index: int,
                     process_count: int, start_step: int) -> BatchIterator:
  return BatchIterator(_make_stream(config, stream, global_batch, process_index, process_count),
                       start_step, int(_data_field(config, "workers", 0) or 0))


def make_train_iterators(config, process_index: int = 0, process_count: int = 1,
                         start_step: int = 0) -> dict[str, BatchIterator]:
  """{'source': ..., 'target': ...} iterators of config.stage (only the streams it uses)."""
  return {stream: _stream_iterator(config, stream, batch, process_index, process_count,
                                   start_step)
          for stream, batch in _stream_batches(config).items()}


def _loader(config, stream: str, process_index: int, process_count: int,
            start_step: int) -> BatchIterator:
  batches = _stream_batches(config)
  if stream not in batches:
    raise UserError(f"stage {config.stage} has no {stream} stream")
  return _stream_iterator(config, stream, batches[stream], process_index, process_count,
                          start_step)


def source_loader(config, process_index: int = 0, process_count: int = 1,
                  start_step: int = 0) -> BatchIterator:
  """The labelled stream: source frames (stages 1-2) or pseudo-labelled target (stage 3)."""
  return _loader(config, "source", process_index, process_count, start_step)


def target_loader(config, process_index: int = 0, process_count: int = 1,
                  start_step: int = 0) -> BatchIterator:
  """The unlabelled target stream of stage 'adversarial'."""
  return _loader(config, "target", process_index, process_count, start_step)


# ----------------------------------------------------------------------------- evaluation


class EvalBatchMaker:
  """step -> this process's share of an ordered evaluation batch.

  Positions past the end of the split are padding: 'valid' False, label all 255, so every
  process runs the same number of steps and padding never counts in the metrics. Labels
  keep their full resolution; a batch with labels of other sizes than the split's first
  frame is padded with 255 to the largest, and 'label_shape' gives each example's
  (height, width). Images are uint8, normalised on the device by the Predictor.
  """

  def __init__(self, source, size: tuple[int, int], global_batch: int,
               process_index: int, process_count: int):
    if global_batch % process_count:
      raise UserError(f"eval batch size {global_batch} is not divisible by the "
                      f"{process_count} JAX processes")
    self.source = source
    self.size = tuple(int(v) for v in size)
    self.global_batch = int(global_batch)
    self.local_batch = self.global_batch // process_count
    self.offset = process_index * self.local_batch
    # All-padding batches (the tail of some processes) still need a label shape: that of
    # the split's first frame, the same on every process.
    self.default_label_shape = tuple(np.shape(source[0]["label"])) if len(source) else (
        self.size[1], self.size[0])

  def num_steps(self) -> int:
    return -(-len(self.source) // self.global_batch)

  def __call__(self, step: int) -> dict[str, Any]:
    width, height = self.size
    images, labels, names, valid = [], [], [], []
    for j in range(self.local_batch):
      position = int(step) * self.global_batch + self.offset + j
      if position < len(self.source):
        example = self.source[position]
        images.append(transforms.resize_image(example["image"], self.size))
        labels.append(np.asarray(example["label"], np.uint8))
        names.append(example["name"])
        valid.append(True)
      else:
        images.append(None)
        labels.append(None)
        names.append("")
        valid.append(False)
    shapes = [l.shape for l in labels if l is not None] + [self.default_label_shape]
    label_height = max(s[0] for s in shapes)
    label_width = max(s[1] for s in shapes)
    image_batch = np.zeros((self.local_batch, height, width, 3), np.uint8)
    label_batch = np.full((self.local_batch, label_height, label_width), IGNORE_LABEL,
                          np.uint8)
    label_shape = np.zeros((self.local_batch, 2), np.int32)
    for j, (image, label) in enumerate(zip(images, labels)):
      if image is not None:
        image_batch[j] = image
        label_batch[j, :label.shape[0], :label.shape[1]] = label
        label_shape[j] = label.shape
    return {"image": image_batch, "label": label_batch, "label_shape": label_shape,
            "name": np.array(names, dtype=object), "valid": np.array(valid)}


def eval_loader(config, split: str | None = None, process_index: int = 0,
                process_count: int = 1, *, dataset: str | None = None,
                size: Sequence[int] | None = None) -> BatchIterator:
  """Ordered, unshuffled batches of `dataset` (default config.data.target) `split`.

  Images are resized to `size` (default config.data.test_size, bicubic); labels stay at
  full resolution. Global batch config.eval.batch_size, sharded over processes. Pseudo
  labelling reads 'cityscapes' 'train' through here too.
  """
  split = split or config.eval.split
  name = dataset or config.data.target
  if name.endswith("_pseudo"):
    name = name[:-len("_pseudo")]
  source = open_source(config, name, split)
  maker = EvalBatchMaker(source, tuple(size or config.data.test_size),
                         int(config.eval.batch_size), process_index, process_count)
  return BatchIterator(maker, 0, int(_data_field(config, "workers", 0) or 0),
                       num_steps=maker.num_steps())


def num_eval_steps(config, split: str | None = None, *, dataset: str | None = None) -> int:
  """Steps of `eval_loader` (the same on every process)."""
  source = open_source(config, dataset or config.data.target, split or config.eval.split)
  return -(-len(source) // int(config.eval.batch_size))
