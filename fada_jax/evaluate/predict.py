"""`--mode=predict`: a model over any folder (or glob) of images, no ground truth needed.

    python -m fada_jax.main --config=CONFIG --mode=predict --checkpoint=PATH \
        --input=DIR_OR_GLOB --workdir=OUT [--opacity=0.5]

Layout under OUT/predictions, each input's path relative to the input folder (or to the
glob's folder) kept, with the suffix .png (.jpg for overlays):
  train_ids/<rel>.png   8-bit train ids, at the image's own size
  color/<rel>.png       palette PNG: pixel value = train id, Cityscapes colours
  overlay/<rel>.jpg     the image blended with its colours (`opacity` of the colours)
  classes.csv           each class's share of the pixels per image, and over all images

Each image is resized to config.data.test_size (bicubic, the test transform), predicted
by the evaluation's `Predictor` (every local device; config.eval.flip / config.eval.scales),
and the prediction upsampled to the image's own size. Frames of one size are batched
together (config.eval.batch_size); a background thread reads and resizes the next batches
while one is predicted, and PNGs are written on writer threads.

An unreadable or non-image file is reported by name and skipped. An image whose three
outputs exist already is not predicted again (its class shares are read back from its
train-id PNG), so an interrupted run, rerun with the same OUT, finishes the rest.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from fada_jax import checkpoint as checkpoint_lib
from fada_jax.data import labels as labels_lib
from fada_jax.data import sources
from fada_jax.data import transforms
from fada_jax.errors import UserError
from fada_jax.evaluate import outputs
from fada_jax.evaluate.inference import predictor_for
from fada_jax.evaluate.run import load_checkpoint_for_eval
from fada_jax.train.prefetch import Prefetcher

PREDICTIONS_DIR = "predictions"
CLASSES_FILE = "classes.csv"
KINDS = {"train_ids": ".png", "color": ".png", "overlay": ".jpg"}
# JPEG at 95 without chroma subsampling: class borders keep their colours.
_OVERLAY_QUALITY = 95
_READ_AHEAD = 2  # batches read while one is predicted


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class InputImage:
  path: pathlib.Path
  name: str  # relative output path without suffix, e.g. 'city/frame_000001'


def find_inputs(spec: str, exclude: pathlib.Path | None = None) -> list[InputImage]:
  """The files `spec` names: a folder (every file below it, hidden ones left out), one
  file, or a glob pattern ('**' recurses); with their output names. None is a UserError."""
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    base = path
    files = [p for p in path.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    what = f"folder {path} holds no files"
  elif path.is_file():
    base, files, what = path.parent, [path], ""
  elif glob.has_magic(str(spec)):
    base = _glob_base(str(path))
    files = [pathlib.Path(p) for p in glob.glob(str(path), recursive=True)
             if os.path.isfile(p)]
    what = f"{spec} matches no file"
  else:
    raise UserError(f"--input={spec}: no such file or folder")
  if exclude is not None:
    exclude = exclude.absolute()
    files = [f for f in files if not f.absolute().is_relative_to(exclude)]
  if not files:
    raise UserError(f"no input images: {what}")
  files.sort()
  stems = [str(f.relative_to(base).with_suffix("")) for f in files]
  taken = {s: stems.count(s) for s in stems}
  # frame.jpg and frame.png side by side keep their suffixes apart: frame.jpg.png, ...
  return [InputImage(f, s if taken[s] == 1 else str(f.relative_to(base)))
          for f, s in zip(files, stems)]


def _glob_base(pattern: str) -> pathlib.Path:
  """The folder above a pattern's first wildcard: outputs keep the paths below it."""
  parts = pathlib.Path(pattern).parts
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return pathlib.Path(*fixed) if fixed else pathlib.Path(".")


def output_path(root: pathlib.Path, kind: str, name: str) -> pathlib.Path:
  return root / kind / f"{name}{KINDS[kind]}"


def is_done(root: pathlib.Path, name: str) -> bool:
  return all(output_path(root, kind, name).is_file() for kind in KINDS)


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Batch:
  """What the reader hands over: images of one size (original and network input),
  images already predicted by an earlier run (their class counts), failures."""
  out_hw: tuple[int, int] | None = None
  names: list[str] = dataclasses.field(default_factory=list)
  images: list[np.ndarray] = dataclasses.field(default_factory=list)
  network_input: np.ndarray | None = None
  done: list[tuple[str, np.ndarray]] = dataclasses.field(default_factory=list)
  failed: list[tuple[pathlib.Path, str]] = dataclasses.field(default_factory=list)


class _Reader(Iterator):
  """Batches of decoded, resized images, grouped by size (for the Prefetcher's thread).

  Sizes come from the file headers first (no decoding), so that each batch holds frames
  of one size; a file that cannot be opened is a failure there, one that fails to decode
  is a failure of its batch.
  """

  def __init__(self, images: list[InputImage], root: pathlib.Path, test_size, rows: int,
               num_classes: int):
    self._plan = self._batches(images, root, rows, num_classes)
    self.test_size = tuple(int(v) for v in test_size)

  def _batches(self, images, root, rows, num_classes) -> Iterator[Batch]:
    groups: dict[tuple[int, int], list[InputImage]] = {}
    pending = Batch()
    for image in images:
      if is_done(root, image.name):
        pending.done.append((image.name, _class_counts_of_png(
            output_path(root, "train_ids", image.name), num_classes)))
      else:
        try:
          with Image.open(image.path) as opened:
            width, height = opened.size
          groups.setdefault((height, width), []).append(image)
        except (OSError, ValueError, SyntaxError) as e:
          pending.failed.append((image.path, _reason(e)))
      if len(pending.done) + len(pending.failed) >= 64:
        yield pending
        pending = Batch()
    if pending.done or pending.failed:
      yield pending
    for out_hw, members in groups.items():
      for start in range(0, len(members), rows):
        yield self._read(out_hw, members[start:start + rows])

  def _read(self, out_hw, members: list[InputImage]) -> Batch:
    batch = Batch(out_hw=out_hw)
    inputs = []
    for member in members:
      try:
        image = sources.read_image(member.path)
      except UserError as e:
        batch.failed.append((member.path, str(e)))
        continue
      if image.shape[:2] != out_hw:  # a header that lies: never batch another size
        batch.failed.append((member.path, f"decoded size {image.shape[:2]} differs from "
                                          f"its header's {out_hw}"))
        continue
      batch.names.append(member.name)
      batch.images.append(image)
      inputs.append(transforms.resize_image(image, self.test_size))
    if inputs:
      batch.network_input = np.stack(inputs)
    return batch

  def __next__(self) -> Batch:
    return next(self._plan)

  def get_state(self) -> Any:
    return None


def _reason(error: Exception) -> str:
  return f"not an image or unreadable ({type(error).__name__}: {error})"


def _class_counts_of_png(path: pathlib.Path, num_classes: int) -> np.ndarray:
  with Image.open(path) as image:
    return class_counts(np.asarray(image), num_classes)


def class_counts(train_ids: np.ndarray, num_classes: int) -> np.ndarray:
  """Pixels of each class ([K] int64)."""
  return np.bincount(np.asarray(train_ids, np.uint8).ravel(), minlength=256)[:num_classes]


# ----------------------------------------------------------------------------- writing


def write_outputs(root: pathlib.Path, name: str, image: np.ndarray, train_ids: np.ndarray,
                  num_classes: int, opacity: float) -> None:
  """The three files of one image; the overlay last, so a finished image has all three.

  Everything in PIL's C code (about 65 ms for a 2048x1024 frame; a float blend and a
  lossless RGB PNG took 1.8 s, which on a busy CPU slowed the prediction itself).
  """
  outputs.save_train_id_png(output_path(root, "train_ids", name), train_ids)
  outputs.save_palette_png(output_path(root, "color", name), train_ids, num_classes)
  colours = outputs.palette_image(train_ids, num_classes).convert("RGB")
  overlay = Image.blend(Image.fromarray(image), colours, float(opacity))
  path = output_path(root, "overlay", name)
  path.parent.mkdir(parents=True, exist_ok=True)
  outputs.save_image_atomic(overlay, path, "JPEG", quality=_OVERLAY_QUALITY, subsampling=0)


def write_classes_csv(path: pathlib.Path, counts: dict[str, np.ndarray],
                      class_names: tuple[str, ...]) -> None:
  """classes.csv: per image (in name order) and over all of them, each class's share of
  the pixels, and the pixel count."""
  lines = [",".join(["image", "pixels", *class_names])]
  total = np.zeros(len(class_names), np.int64)
  for name in sorted(counts):
    row = counts[name]
    total += row
    lines.append(_csv_row(name, row))
  lines.append(_csv_row("all", total))
  checkpoint_lib.write_text_atomic(path, "\n".join(lines) + "\n")


def _csv_row(name: str, counts: np.ndarray) -> str:
  pixels = int(counts.sum())
  shares = counts / max(pixels, 1)
  quoted = '"' + name.replace('"', '""') + '"' if any(c in name for c in ',"\n') else name
  return ",".join([quoted, str(pixels), *(f"{share:.6f}" for share in shares)])


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class PredictSummary:
  predicted: int
  already_done: int
  skipped: list[tuple[str, str]]  # (file, reason)
  output_dir: pathlib.Path

  @property
  def written(self) -> int:
    return self.predicted + self.already_done

  def line(self) -> str:
    return (f"{self.predicted} image(s) predicted, {self.already_done} already done, "
            f"{len(self.skipped)} skipped (unreadable or not images): {self.output_dir}")


def run_predict(config, checkpoint: str | os.PathLike, input_spec: str,
                workdir: str | os.PathLike, *, opacity: float = 0.5) -> PredictSummary:
  """Predicts every image `input_spec` names into WORKDIR/predictions (see the module doc)."""
  if not 0.0 <= float(opacity) <= 1.0:
    raise UserError(f"--opacity={opacity} must be in [0, 1]")
  if jax.process_count() > 1:
    raise UserError("--mode=predict runs in one process (on all of its devices); start it "
                    "without --num_processes")
  root = pathlib.Path(workdir) / PREDICTIONS_DIR
  images = find_inputs(input_spec, exclude=root)
  predictor = predictor_for(config)
  variables, _ = load_checkpoint_for_eval(config, checkpoint, predictor)
  num_classes = predictor.num_classes
  rows = predictor.rows_per_call()
  root.mkdir(parents=True, exist_ok=True)

  counts: dict[str, np.ndarray] = {}
  skipped: list[tuple[str, str]] = []
  predicted = already_done = 0
  progress = tqdm(total=len(images), unit="img", desc="predict", dynamic_ncols=True,
                  file=sys.stderr, smoothing=0.1)
  writer = outputs.MaskWriter()
  reader = Prefetcher(_Reader(images, root, config.data.test_size, rows, num_classes),
                      transfer=lambda batch: batch, depth=_READ_AHEAD)

  def consume(dispatched, batch: Batch) -> None:
    nonlocal predicted
    predictions = predictor.fetch(dispatched, len(batch.names))
    for name, image, train_ids in zip(batch.names, batch.images, predictions):
      counts[name] = class_counts(train_ids, num_classes)
      writer.submit(write_outputs, root, name, image, train_ids, num_classes, float(opacity))
    predicted += len(batch.names)
    progress.update(len(batch.names))

  pending = None
  try:
    for batch in reader:
      for path, reason in batch.failed:
        progress.write(f"skipped {path}: {reason}", file=sys.stderr)
        skipped.append((str(path), reason))
      for name, done_counts in batch.done:
        counts[name] = done_counts
      already_done += len(batch.done)
      progress.update(len(batch.failed) + len(batch.done))
      dispatched = None
      if batch.names:
        dispatched = predictor.dispatch_predict(variables, batch.network_input, batch.out_hw)
      # Dispatch is asynchronous: write the previous batch while this one runs.
      if pending is not None:
        consume(*pending)
        pending = None
      if dispatched is not None:
        pending = (dispatched, batch)
    if pending is not None:
      consume(*pending)
  finally:
    reader.close()
    progress.close()
    writer.close()
  if counts:
    write_classes_csv(root / CLASSES_FILE, counts, labels_lib.class_names(num_classes))
  return PredictSummary(predicted, already_done, skipped, root)
