"""The evaluation metric against a brute-force count, and the mask file format."""

import numpy as np
import pytest
from PIL import Image

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fada_jax import evaluate
from fada_jax.data import labels as labels_lib
from fada_jax.data import sources


def brute_force_counts(predictions, labels, num_classes, ignore=255):
  """The release's numpy `intersectionAndUnion`, pixel by pixel in plain Python terms."""
  intersection = np.zeros(num_classes, np.int64)
  area_pred = np.zeros(num_classes, np.int64)
  area_target = np.zeros(num_classes, np.int64)
  for p, t in zip(predictions.ravel().tolist(), labels.ravel().tolist()):
    if t == ignore:
      continue
    if p < num_classes:
      area_pred[p] += 1
    if t < num_classes:
      area_target[t] += 1
      if p == t:
        intersection[p] += 1
  return intersection, area_pred + area_target - intersection, area_target


def random_batch(rng, batch, height, width, num_classes, absent=()):
  """Predictions and labels with ignore pixels and some classes absent from the labels."""
  present = [c for c in range(num_classes) if c not in absent]
  labels = rng.choice(present, size=(batch, height, width)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.2] = 255
  # Predictions agree with the label ~half the time, otherwise any class (absent ones too).
  predictions = rng.integers(0, num_classes, size=labels.shape).astype(np.uint8)
  agree = (rng.random(labels.shape) < 0.5) & (labels != 255)
  predictions[agree] = labels[agree]
  return predictions, labels


@pytest.mark.parametrize("num_classes", [19, 16])
def test_counts_match_brute_force(num_classes):
  rng = np.random.default_rng(num_classes)
  predictions, labels = random_batch(rng, 3, 17, 23, num_classes, absent=(4, 9))
  valid = np.ones(3, bool)
  counts = jax.jit(evaluate.confusion_counts, static_argnums=3)(
      predictions, labels, valid, num_classes)
  expected = brute_force_counts(predictions, labels, num_classes)
  np.testing.assert_array_equal(np.asarray(counts), np.stack(expected))
  # Absent classes: no target pixels, but predicted pixels still make a union.
  assert counts[2, 4] == 0 and counts[2, 9] == 0
  assert counts[1, 4] > 0 and counts[0, 4] == 0


def test_padded_examples_count_nowhere_and_sharding_is_transparent():
  num_classes = 19
  rng = np.random.default_rng(0)
  predictions, labels = random_batch(rng, 8, 12, 20, num_classes)
  valid = np.array([True] * 5 + [False] * 3)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  args = [jax.device_put(x, sharded) for x in (predictions, labels, valid)]
  counts = jax.jit(evaluate.confusion_counts, static_argnums=3)(*args, num_classes)
  expected = brute_force_counts(predictions[:5], labels[:5], num_classes)
  np.testing.assert_array_equal(np.asarray(counts), np.stack(expected))


def test_metrics_formulas_over_a_split_with_absent_classes():
  num_classes = 19
  rng = np.random.default_rng(1)
  accumulator = evaluate.MetricAccumulator(num_classes)
  totals = np.zeros((3, num_classes), np.int64)
  for _ in range(3):
    predictions, labels = random_batch(rng, 2, 9, 11, num_classes, absent=(16, 17))
    counts = np.stack(brute_force_counts(predictions, labels, num_classes))
    totals += counts
    accumulator.add(counts, num_images=2)
  result = accumulator.result()
  i, u, t = totals.astype(np.float64)
  iou = i / (u + 1e-10)
  assert result["num_images"] == 6
  assert result["miou"] == pytest.approx(iou.mean())  # mean over ALL 19 classes
  assert result["iou_per_class"][16] == 0.0 and result["iou_per_class"][17] == 0.0
  assert result["macc"] == pytest.approx(np.mean(i / (t + 1e-10)))
  assert result["allacc"] == pytest.approx(i.sum() / t.sum())
  assert result["class_names"] == list(labels_lib.CITYSCAPES_CLASS_NAMES)
  assert "miou_13" not in result


def test_miou_13_of_the_16_class_setting():
  counts = np.zeros((3, 16), np.int64)
  counts[0] = np.arange(16) + 1  # intersection
  counts[1] = 2 * (np.arange(16) + 1)  # union
  counts[2] = counts[1]
  result = evaluate.metrics_from_counts(*counts, num_classes=16)
  assert result["miou"] == pytest.approx(0.5)
  assert result["miou_13"] == pytest.approx(0.5)
  counts[0, [3, 4, 5]] = 0  # wall, fence, pole: left out of the 13-class mean
  result = evaluate.metrics_from_counts(*counts, num_classes=16)
  assert result["miou_13"] == pytest.approx(0.5)
  assert result["miou"] == pytest.approx(13 * 0.5 / 16)
  assert len(result["class_names"]) == 16


def test_int64_accumulation_does_not_overflow():
  accumulator = evaluate.MetricAccumulator(2)
  big = np.full((3, 2), 2**31 - 1, np.int64)
  for _ in range(4):
    accumulator.add(big)
  assert accumulator.counts[0, 0] == 4 * (2**31 - 1)


@pytest.mark.parametrize("num_classes", [19, 16])
def test_palette_png_holds_train_ids_and_cityscapes_colours(tmp_path, num_classes):
  train_ids = (np.arange(64 * 32) % num_classes).reshape(32, 64).astype(np.uint8)
  path = tmp_path / "city" / "frame.png"
  evaluate.save_palette_png(path, train_ids, num_classes)
  with Image.open(path) as image:
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), train_ids)
    colours = np.asarray(image.convert("RGB"))
  np.testing.assert_array_equal(colours, labels_lib.palette(num_classes)[train_ids])
  if num_classes == 19:
    assert tuple(colours[0, 0]) == (128, 64, 128)  # road
  # Stage 3 reads pixel values as labels: the data readers give the train ids back.
  np.testing.assert_array_equal(sources.read_label_ids(path), train_ids)


def test_train_id_png_round_trip(tmp_path):
  train_ids = np.random.default_rng(0).integers(0, 19, (16, 24)).astype(np.uint8)
  path = tmp_path / "a" / "b.png"
  evaluate.save_train_id_png(path, train_ids)
  with Image.open(path) as image:
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), train_ids)


def test_table_lists_every_class_and_the_summary():
  counts = np.array([[5, 0], [10, 4], [5, 2]])
  result = evaluate.metrics_from_counts(*np.pad(counts, ((0, 0), (0, 17))), num_classes=19)
  result["num_images"] = 1
  table = evaluate.format_table(result)
  assert len(table.splitlines()) == 19 + 2
  assert "road" in table and "bicycle" in table and "mIoU 2.63" in table
