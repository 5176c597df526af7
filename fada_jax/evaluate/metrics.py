"""The release's segmentation metric (`test.py`).

Per class, intersection, union and target pixel counts are accumulated over the whole
split (ignore label excluded), then IoU = I / (U + 1e-10), mIoU = mean over all K classes,
mAcc = mean of I / (T + 1e-10), allAcc = sum(I) / sum(T). 16-class (SYNTHIA) runs also
report the 13-class mIoU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fada_jax.constants import IGNORE_LABEL
from fada_jax.data import labels as labels_lib

EPSILON = 1e-10  # the release's guard in I / (U + eps), I / (T + eps)


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
