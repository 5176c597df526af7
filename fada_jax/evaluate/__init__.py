"""Target-domain evaluation and pseudo labels, one job per module.

  metrics        the release's confusion counts, mIoU / mAcc / allAcc, the accumulator
  inference      `Predictor` (jit-compiled inference on a device mesh), its settings,
                 batch-norm folding, convolutions as matrix products
  outputs        prediction and colour PNGs, results.csv, the per-class table
  run            a model over a split, `evaluate_checkpoint`, `run_eval` (--mode=eval),
                 checkpoint discovery
  pseudo_labels  `write_pseudo_labels`, `run_pseudo_label` (--mode=pseudo_label)
  predict        `run_predict` (--mode=predict): any folder of images, no ground truth

The names below are the package's interface: `from fada_jax import evaluate;
evaluate.run_eval(...)`.
"""

from fada_jax.evaluate.inference import (CONFIDENCE_BINS, InferenceSettings, Predictor,
                                         fold_batch_norm, predictor_for, scaled_size)
from fada_jax.evaluate.metrics import (EPSILON, MetricAccumulator, confusion_counts,
                                       metrics_from_counts)
from fada_jax.evaluate.outputs import (EVAL_DIR, METRICS_FILE, RESULTS_FILE, format_table,
                                       save_palette_png, save_train_id_png)
from fada_jax.evaluate.predict import run_predict
from fada_jax.evaluate.pseudo_labels import (class_thresholds, run_pseudo_label,
                                             write_pseudo_labels)
from fada_jax.evaluate.run import (checkpoint_step, evaluate_checkpoint, find_checkpoints,
                                   load_checkpoint_for_eval, run_eval)

__all__ = [
    "CONFIDENCE_BINS", "EPSILON", "EVAL_DIR", "METRICS_FILE", "RESULTS_FILE",
    "InferenceSettings", "MetricAccumulator", "Predictor", "checkpoint_step", "class_thresholds",
    "confusion_counts", "evaluate_checkpoint", "find_checkpoints", "fold_batch_norm",
    "format_table", "load_checkpoint_for_eval", "metrics_from_counts",
    "predictor_for", "run_eval", "run_predict", "run_pseudo_label", "save_palette_png",
    "save_train_id_png", "scaled_size", "write_pseudo_labels",
]
