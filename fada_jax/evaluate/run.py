"""Evaluation runs: a model over a split, one checkpoint, a folder of checkpoints.

`run_eval(config, PATH, DIR)` (`--mode=eval`) evaluates PATH (one checkpoint, a folder of
them, or a training run's folder) on config.eval.split of the target into DIR/eval (the
layout is in `outputs`). Each process reads its own share of the images (the eval loader)
and writes the masks of its own images; the compiled step sums the metric counts over all
processes.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from fada_jax import checkpoint as checkpoint_lib
from fada_jax.constants import IGNORE_LABEL
from fada_jax.errors import UserError
from fada_jax.evaluate import outputs
from fada_jax.evaluate.inference import CONFIDENCE_BINS, Predictor, pad_rows, predictor_for
from fada_jax.evaluate.metrics import MetricAccumulator


# ----------------------------------------------------------------------------- a split


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
  images = np.asarray(batch["image"])  # uint8: the Predictor normalises on the device
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
        images=pad_rows(images[select], rows, 0.0),
        labels=pad_rows(chunk_labels, rows, IGNORE_LABEL),
        valid=pad_rows(valid[select], rows, False),
        names=[n for n, s in zip(names, select) if s],
        shapes=shapes[select])


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


def run_split(predictor: Predictor, variables: dict, config, split: str, *,
              mask_fn=None, description: str = "eval",
              min_confidence_bin: np.ndarray | None = None) -> dict[str, Any]:
  """Evaluates the placed `variables` on `split` of the target; returns the metrics.

  `mask_fn(name, prediction)` (optional) receives each of this process's predictions,
  cropped to its label size. With `min_confidence_bin` ([K] ints) it runs the pseudo-label
  step instead: the predictions handed to `mask_fn` are ignored (255) wherever a pixel's
  confidence bin is below `min_confidence_bin[its class]`, and the metrics (of the
  unfiltered predictions) gain 'confidence_histogram', [K, CONFIDENCE_BINS] pixel counts
  of the whole split (`Predictor.pseudo_label_step`).
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

  histogram = None
  thresholds = (None if min_confidence_bin is None
                else predictor.place_thresholds(min_confidence_bin))

  def consume(step_outputs, chunk: _Chunk) -> None:
    nonlocal histogram
    counts, num_valid, predictions = step_outputs[:3]
    accumulator.add(np.asarray(counts), int(num_valid))
    if len(step_outputs) == 4:
      step_histogram = np.asarray(step_outputs[3], np.int64)
      histogram = step_histogram if histogram is None else histogram + step_histogram
    progress.update(int(num_valid))
    if with_predictions:
      rows = predictor.local_rows(predictions)
      for j, name in enumerate(chunk.names):
        if chunk.valid[j]:
          mask_fn(name, rows[j, :chunk.shapes[j][0], :chunk.shapes[j][1]])

  try:
    for batch in loader:
      for chunk in _chunks(batch, multiple):
        if min_confidence_bin is None:
          step_outputs = predictor.eval_step(variables, chunk.images, chunk.labels,
                                             chunk.valid, with_predictions=with_predictions)
        else:
          step_outputs = predictor.pseudo_label_step(variables, chunk.images, chunk.labels,
                                                     chunk.valid, thresholds)
        # Dispatch is asynchronous: fetch the previous step's results while this one runs.
        while pending:
          consume(*pending.pop(0))
        pending.append((step_outputs, chunk))
    while pending:
      consume(*pending.pop(0))
  finally:
    progress.close()
    close = getattr(loader, "close", None)
    if close is not None:
      close()
  result = accumulator.result()
  if min_confidence_bin is not None:
    result["confidence_histogram"] = (
        np.zeros((predictor.num_classes, CONFIDENCE_BINS), np.int64)
        if histogram is None else histogram)
  return result


# ----------------------------------------------------------------------------- one checkpoint


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
  writer = outputs.MaskWriter() if config.eval.save_predictions else None
  mask_fn = outputs.prediction_writer(config, output_dir, writer) if writer else None
  start = time.perf_counter()
  try:
    metrics = run_split(predictor, variables, config, config.eval.split, mask_fn=mask_fn,
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


# ----------------------------------------------------------------------------- folders of checkpoints


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
    # A run's checkpoints/best (its best validated model) is evaluated by naming it.
    found = [c for c in folder.iterdir()
             if c.is_dir() and not c.name.startswith(".") and c.name != checkpoint_lib.BEST_DIR
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


def run_eval(config, checkpoint_path: str | os.PathLike,
             workdir: str | os.PathLike) -> dict[str, Any]:
  """`--mode=eval`: evaluates PATH (one checkpoint or a folder of them) into DIR/eval.

  Prints the per-class table of each checkpoint, writes results.csv (a row per
  checkpoint), metrics.json (the best checkpoint's metrics) and summary.png (the split's
  first frames as the best checkpoint predicts them), returns the metrics.
  """
  checkpoints = find_checkpoints(checkpoint_path)
  output_dir = pathlib.Path(workdir) / outputs.EVAL_DIR
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
      print(f"\n{path}\n{outputs.format_table(metrics)}", flush=True)
      outputs.write_results_csv(output_dir / outputs.RESULTS_FILE, records)
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
    checkpoint_lib.write_json_atomic(output_dir / outputs.METRICS_FILE, best)
  from fada_jax.evaluate import summary_sheet  # pylint: disable=g-import-not-at-top
  sheet = summary_sheet.write_summary_sheet(
      config, [summary_sheet.Model(pathlib.Path(best["checkpoint"]).name, best["checkpoint"],
                                   best["miou"])],
      output_dir / summary_sheet.SUMMARY_IMAGE)
  if main_process:
    print(f"summary sheet: {sheet}", flush=True)
  return best
