"""Pseudo labels for stage 3: the stage-2 model's predictions on target train.

Written as <out_dir>/<city>/<stem>.png palette PNGs (pixel value = train id), the same
writer as the evaluation's colour masks.

The release labels every pixel with the argmax (config.pseudo_label.keep_fraction = 1).
Below 1, labels are class-balanced and confident, as in CBST (Zou et al., ECCV 2018): per
class, only the most confident `keep_fraction` of the pixels predicted as that class keep
their label, and every pixel at least `keep_confidence` confident keeps it; the others
are ignored (255). This takes two passes over the split: a histogram of the confidences
by predicted class, then the labels.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np

from fada_jax import checkpoint as checkpoint_lib
from fada_jax.errors import UserError
from fada_jax.evaluate import outputs
from fada_jax.evaluate.inference import CONFIDENCE_BINS, predictor_for
from fada_jax.evaluate.run import find_checkpoints, run_split

_log = logging.getLogger(__name__)


def class_thresholds(histogram: np.ndarray, keep_fraction: float,
                     keep_confidence: float) -> np.ndarray:
  """[K] lowest confidence bins that keep their label, from the [K, BINS] pixel counts by
  predicted class and confidence bin: per class the highest bin at which at least
  `keep_fraction` of the class's pixels are at or above it, but no higher than the bin of
  `keep_confidence`."""
  histogram = np.asarray(histogram, np.int64)
  bins = histogram.shape[1]
  at_or_above = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]  # [K, BINS]
  needed = np.ceil(keep_fraction * at_or_above[:, :1] - 1e-9)
  enough = at_or_above >= needed
  highest = bins - 1 - np.argmax(enough[:, ::-1], axis=1)
  cap = int(np.floor(keep_confidence * bins + 1e-9))
  return np.minimum(highest, cap).astype(np.int32)


def write_pseudo_labels(config, variables: dict, out_dir: str | os.PathLike,
                        split: str = "train") -> dict[str, Any]:
  """Predicts every image of the target's `split` at full label resolution and writes
  <out_dir>/<city>/<stem>.png palette PNGs (pixel value = train id, 255 = ignored).

  `config` gives the inference settings: pass the stage-2 config (its test size, flip and
  scales) as the release does, and config.pseudo_label the class-balanced filter (see the
  module docstring). `variables` are the model's (host or device arrays). Returns the
  metrics of the unfiltered predictions against the split's own labels (informative),
  with 'kept_fraction', the share of pixels that keep a label.
  """
  predictor = predictor_for(config)
  predictor.check_variables(variables, "pseudo-labelling model")
  placed = predictor.place_variables(variables)
  out_dir = pathlib.Path(out_dir)
  num_classes = predictor.num_classes
  writer = outputs.MaskWriter()

  def write(name: str, prediction: np.ndarray) -> None:
    writer.submit(outputs.save_palette_png, out_dir / f"{name}.png", prediction, num_classes)

  keep_fraction = float(config.pseudo_label.keep_fraction)
  keep_confidence = float(config.pseudo_label.keep_confidence)
  min_bin = None
  if keep_fraction < 1:
    everything = np.zeros(num_classes, np.int32)
    histogram = run_split(predictor, placed, config, split, min_confidence_bin=everything,
                          description="confidences")["confidence_histogram"]
    min_bin = class_thresholds(histogram, keep_fraction, keep_confidence)
  try:
    metrics = run_split(predictor, placed, config, split, mask_fn=write,
                        description="pseudo labels", min_confidence_bin=min_bin)
  finally:
    writer.close()
  metrics["kept_fraction"] = 1.0
  if min_bin is not None:
    histogram = metrics.pop("confidence_histogram")
    kept = sum(int(histogram[k, min_bin[k]:].sum()) for k in range(num_classes))
    metrics["kept_fraction"] = kept / max(int(histogram.sum()), 1)
    metrics["class_thresholds"] = (min_bin / CONFIDENCE_BINS).tolist()
  if jax.process_index() == 0:
    _log.info("pseudo labels written to %s (%d images; mIoU against the %s labels %.2f; "
              "%.1f%% of the pixels labelled)", out_dir, metrics["num_images"], split,
              100 * metrics["miou"], 100 * metrics["kept_fraction"])
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
    print(f"pseudo labels of {metrics['num_images']} images written to {output_dir} "
          f"({100 * metrics['kept_fraction']:.1f}% of the pixels labelled)", flush=True)
  return metrics
