"""Pseudo labels for stage 3: the stage-2 model's predictions on target train.

Written as <out_dir>/<city>/<stem>.png palette PNGs (pixel value = train id), the same
writer as the evaluation's colour masks.
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
from fada_jax.evaluate.inference import predictor_for
from fada_jax.evaluate.run import find_checkpoints, run_split

_log = logging.getLogger(__name__)


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
  writer = outputs.MaskWriter()

  def write(name: str, prediction: np.ndarray) -> None:
    writer.submit(outputs.save_palette_png, out_dir / f"{name}.png", prediction, num_classes)

  try:
    metrics = run_split(predictor, placed, config, split, mask_fn=write,
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
