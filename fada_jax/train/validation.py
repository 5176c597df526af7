"""Validation during training and the best model so far.

Every `config.eval.every` steps (the defaults divide `solver.stop_iter`) the current
model is evaluated on `config.eval.split` of the target with the same sharded inference
as `--mode=eval` (the process-wide `Predictor` of `evaluate.predictor_for`, so its step
compiles once however often it runs). Every process takes part (the metric counts are
summed over all of them inside the compiled step); process 0 alone writes.

The best model so far lives in DIR/checkpoints/best (`checkpoint.save_best`, a model
checkpoint that `checkpoint.load_model` reads), whose meta.json carries its `step` and
`val_miou`.
"""

from __future__ import annotations

import json
import pathlib
import time

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import report
from fada_jax.train import distributed


def read_best(checkpoints_dir: str | pathlib.Path) -> dict | None:
  """{'step', 'val_miou'} of DIR/checkpoints/best, or None when there is none."""
  meta_path = checkpoint_lib.best_checkpoint(checkpoints_dir) / checkpoint_lib.META_FILE
  try:
    meta = json.loads(meta_path.read_text())
    return {'step': int(meta['step']), 'val_miou': float(meta['val_miou'])}
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _best_of_rows(metrics_path: pathlib.Path, up_to_step: int) -> dict | None:
  """The highest val_miou among metrics.jsonl's rows up to `up_to_step`."""
  best = None
  try:
    rows = report.read_rows(metrics_path)
  except OSError:
    return None
  for row in rows:
    if 'val_miou' not in row or row['step'] > up_to_step:
      continue
    if best is None or row['val_miou'] > best['val_miou']:
      best = {'step': int(row['step']), 'val_miou': float(row['val_miou'])}
  return best


def resumed_best(checkpoints_dir: pathlib.Path, metrics_path: pathlib.Path,
                 start_step: int) -> dict | None:
  """The best-so-far record of a run resumed at `start_step`.

  checkpoints/best written at or before the resumed step is the record itself. One
  written in the lost stretch after it (validation more often than checkpoints) is not
  part of the resumed run's past: the record is then the best of metrics.jsonl's val
  rows up to the resumed step, and the rerun of that stretch replaces the folder as soon
  as it beats that record (the same step again, for a deterministic run).
  """
  saved = read_best(checkpoints_dir)
  if saved is not None and saved['step'] <= start_step:
    return saved
  return _best_of_rows(metrics_path, start_step)


class Validation:
  """`due(step)` says when; `run(step, variables, meta)` evaluates, keeps the best model,
  and returns the metrics.jsonl row."""

  def __init__(self, config, checkpoints_dir: pathlib.Path, metrics_path: pathlib.Path,
               start_step: int):
    self.config = config
    self.every = int(config.eval.get('every', 0))
    self.checkpoints_dir = pathlib.Path(checkpoints_dir)
    self.best = (resumed_best(self.checkpoints_dir, metrics_path, start_step)
                 if self.every and start_step else None)
    self._predictor = None

  @property
  def enabled(self) -> bool:
    return self.every > 0

  def due(self, step: int) -> bool:
    return self.enabled and step % self.every == 0

  def run(self, step: int, variables: dict, meta: dict) -> dict:
    """Evaluates host `variables` (feature extractor and classifier) at `step`."""
    from fada_jax import evaluate  # pylint: disable=g-import-not-at-top
    from fada_jax.evaluate.run import run_split  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    if self._predictor is None:
      self._predictor = evaluate.predictor_for(self.config)
    placed = self._predictor.place_variables(variables)
    metrics = run_split(self._predictor, placed, self.config, self.config.eval.split,
                        description=f'val {step}')
    del placed
    row = {'step': step, 'val_miou': float(metrics['miou']),
           'val_macc': float(metrics['macc'])}
    for name, iou in zip(metrics['class_names'], metrics['iou_per_class']):
      row[f'val_iou/{name}'] = float(iou)
    if self.best is None or row['val_miou'] > self.best['val_miou']:
      self.best = {'step': step, 'val_miou': row['val_miou']}
      if distributed.is_main_process():
        checkpoint_lib.save_best(checkpoint_lib.best_checkpoint(self.checkpoints_dir), variables,
                  dict(meta, step=step, val_miou=row['val_miou'], val_macc=row['val_macc'],
                       val_split=str(self.config.eval.split), source='best validation'))
    row['val_best_miou'] = self.best['val_miou']
    row['val_best_step'] = self.best['step']
    row['val_seconds'] = time.perf_counter() - start
    return row

  def line(self, row: dict) -> str:
    """The printed line: step, mIoU, best so far and the time it took."""
    return (f'step {row["step"]}: val mIoU {100 * row["val_miou"]:.2f} '
            f'(best {100 * row["val_best_miou"]:.2f} at step {row["val_best_step"]}) '
            f'in {row["val_seconds"]:.1f}s')
