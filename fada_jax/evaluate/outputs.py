"""Evaluation outputs: prediction and colour PNGs, results.csv, the per-class table.

Layout under DIR/eval (`run.run_eval`):
  metrics.json   miou, macc, allacc, iou_per_class, class_names, checkpoint, num_images
                 (+ miou_13 for 16 classes); for a folder of checkpoints, those of the
                 best one plus every checkpoint's mIoU
  results.csv    one row per checkpoint: step, checkpoint, miou, per-class IoU
  predictions/<city>/<stem>.png   train ids (config.eval.save_predictions)
  color/<city>/<stem>.png         palette PNG: pixel value = train id, colours = the
                                  Cityscapes palette (same writer as pseudo labels)
  (several checkpoints: DIR/eval/<checkpoint name>/predictions/..., .../color/...)
"""

from __future__ import annotations

import concurrent.futures
import csv
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from fada_jax.data import labels as labels_lib

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.csv"


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
  save_image_atomic(palette_image(train_ids, num_classes), path)


def palette_image(train_ids: np.ndarray, num_classes: int) -> Image.Image:
  """Mode 'P' image of train ids with the Cityscapes palette (.convert('RGB') colours it)."""
  image = Image.fromarray(np.asarray(train_ids, np.uint8), mode="P")
  image.putpalette(_palette_bytes(num_classes))
  return image


def save_train_id_png(path: str | os.PathLike, train_ids: np.ndarray) -> None:
  """8-bit greyscale PNG of train ids."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_image_atomic(Image.fromarray(np.asarray(train_ids, np.uint8), mode="L"), path)


def save_image_atomic(image: Image.Image, path: pathlib.Path, image_format: str = "PNG",
                      **options) -> None:
  """`image.save(path, image_format, **options)` via a temporary file and rename."""
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  image.save(temporary, format=image_format, **options)
  os.replace(temporary, path)


class MaskWriter:
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


def prediction_writer(config, output_dir: pathlib.Path, writer: MaskWriter):
  num_classes = int(config.model.num_classes)

  def write(name: str, prediction: np.ndarray) -> None:
    writer.submit(save_train_id_png, output_dir / "predictions" / f"{name}.png", prediction)
    writer.submit(save_palette_png, output_dir / "color" / f"{name}.png", prediction,
                  num_classes)
  return write


# ----------------------------------------------------------------------------- tables


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


def write_results_csv(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
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
