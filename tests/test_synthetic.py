"""The synthetic domain shift: determinism, label statistics, domain gap, folder writer."""

import numpy as np
import pytest

from fada_jax.data import labels as labels_lib
from fada_jax.data import sources as sources_lib
from fada_jax.data import synthetic
from fada_jax.errors import UserError

SIZE = (128, 64)


def test_frames_are_deterministic_and_vary():
  first = synthetic.make_synthetic_source("source", "train", 19, 4, seed=3, image_size=SIZE)
  again = synthetic.make_synthetic_source("source", "train", 19, 4, seed=3, image_size=SIZE)
  for i in range(4):
    a, b = first[i], again[i]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["image"].shape == (SIZE[1], SIZE[0], 3) and a["image"].dtype == np.uint8
    assert a["label"].shape == (SIZE[1], SIZE[0]) and a["label"].dtype == np.uint8
  other_seed = synthetic.make_synthetic_source("source", "train", 19, 4, seed=4, image_size=SIZE)
  val = synthetic.make_synthetic_source("source", "val", 19, 4, seed=3, image_size=SIZE)
  assert not np.array_equal(first[0]["label"], first[1]["label"])
  assert not np.array_equal(first[0]["label"], other_seed[0]["label"])
  assert not np.array_equal(first[0]["label"], val[0]["label"])
  assert first[0]["name"] != first[1]["name"]


def test_label_statistics_cover_the_classes_with_a_street_layout():
  source = synthetic.make_synthetic_source("target", "train", 19, 80, seed=0, image_size=SIZE)
  presence = source.class_presence()
  assert presence.shape == (80, 19)
  assert presence.any(axis=0).all(), np.flatnonzero(~presence.any(axis=0))
  # Road, sidewalk, building and sky are in (nearly) every frame; the train is rare.
  assert presence[:, [0, 1, 2, 10]].mean() > 0.9
  assert presence[:, 16].mean() < 0.3
  rows_sky, rows_road = [], []
  for i in range(10):
    label = source[i]["label"]
    ys = np.arange(label.shape[0])[:, None] * np.ones_like(label)
    rows_sky.append(ys[label == 10].mean())
    rows_road.append(ys[label == 0].mean())
    assert set(np.unique(label)) <= set(range(19)) | {255}
  assert np.mean(rows_sky) < np.mean(rows_road)  # Sky above, road below.
  # The presence table is what the frames hold.
  for i in range(5):
    np.testing.assert_array_equal(
        np.flatnonzero(presence[i]), [c for c in np.unique(source[i]["label"]) if c < 19])


def test_sixteen_class_labels_map_the_shared_classes():
  s19 = synthetic.make_synthetic_source("source", "train", 19, 6, seed=1, image_size=SIZE)
  s16 = synthetic.make_synthetic_source("source", "train", 16, 6, seed=1, image_size=SIZE)
  lut = np.full(256, 255, np.uint8)
  lut[:19] = labels_lib.label_lookup("cityscapes", 16)[synthetic.LABEL_IDS_19]
  for i in range(6):
    np.testing.assert_array_equal(s16[i]["label"], lut[s19[i]["label"]])
    assert s16[i]["label"][s16[i]["label"] != 255].max() < 16


def _class_means(source, frames, standardise=False):
  sums, counts = np.zeros((19, 3)), np.zeros(19)
  for i in frames:
    item = source[i]
    image = _standardised(item["image"]) if standardise else item["image"]
    for c in range(19):
      mask = item["label"] == c
      sums[c] += image[mask].sum(axis=0)
      counts[c] += mask.sum()
  return sums / np.maximum(counts, 1)[:, None], counts


def _standardised(image):
  """Per-image, per-channel zero mean and unit variance: a crude unsupervised alignment."""
  pixels = image.reshape(-1, 3).astype(np.float64)
  return (image - pixels.mean(0)) / (pixels.std(0) + 1e-6)


def _nearest_mean_accuracy(data, frames, means, counts, standardise=False):
  correct = total = 0
  for i in frames:
    item = data[i]
    valid = item["label"] != 255
    image = _standardised(item["image"]) if standardise else item["image"].astype(np.float64)
    distance = ((image[valid][:, None, :] - means[None]) ** 2).sum(-1)
    distance[:, ~(counts > 0)] = np.inf
    correct += (distance.argmin(1) == item["label"][valid]).sum()
    total += valid.sum()
  return correct / total


def test_domains_share_layout_statistics():
  source = synthetic.make_synthetic_source("source", "train", 19, 60, seed=0, image_size=SIZE)
  target = synthetic.make_synthetic_source("target", "train", 19, 60, seed=0, image_size=SIZE)
  np.testing.assert_allclose(source.class_presence().mean(0), target.class_presence().mean(0),
                             atol=0.2)
  fractions = []
  for data in (source, target):
    counts = sum(np.bincount(data.label19(i).ravel(), minlength=256) for i in range(60))
    fractions.append(counts[:19] / counts.sum())
  np.testing.assert_allclose(fractions[0], fractions[1], atol=0.03)
  assert np.argsort(fractions[0])[-4:].tolist() == np.argsort(fractions[1])[-4:].tolist()


def test_domains_differ_by_a_global_appearance_change():
  source = synthetic.make_synthetic_source("source", "train", 19, 50, seed=0, image_size=SIZE)
  target = synthetic.make_synthetic_source("target", "train", 19, 50, seed=0, image_size=SIZE)
  source_means, source_counts = _class_means(source, range(20))
  source_means_b, _ = _class_means(source, range(20, 40))
  target_means, target_counts = _class_means(target, range(20))
  seen = (source_counts > 0) & (target_counts > 0)
  across = np.abs(source_means - target_means).mean(axis=1)[seen]
  within = np.abs(source_means - source_means_b).mean(axis=1)[seen]
  # Class colours move clearly, but by a bounded amount (no arbitrary recolouring).
  assert np.median(across) > 3 * np.median(within), (across, within)
  assert np.median(across) > 15 and across.max() < 90, across
  # The change is mostly one colour transform for all classes: an affine map of the source
  # class colours explains most of it, and the brightness order of the classes survives.
  design = np.concatenate([source_means[seen], np.ones((seen.sum(), 1))], axis=1)
  fit, *_ = np.linalg.lstsq(design, target_means[seen], rcond=None)
  residual = np.abs(design @ fit - target_means[seen]).mean(axis=1)
  assert np.median(residual) < np.median(across) / 3, (residual, across)
  luminance = np.array([0.299, 0.587, 0.114])
  source_rank = np.argsort(np.argsort(source_means[seen] @ luminance))
  target_rank = np.argsort(np.argsort(target_means[seen] @ luminance))
  assert np.corrcoef(source_rank, target_rank)[0, 1] > 0.7

  # Nearest class-mean colour, fitted on source frames: fine on the source, poor on the
  # target; standardising each image's colours (domain alignment at its crudest)
  # recovers part of the loss.
  frames = range(40, 50)
  source_accuracy = _nearest_mean_accuracy(source, frames, source_means, source_counts)
  target_accuracy = _nearest_mean_accuracy(target, frames, source_means, source_counts)
  assert source_accuracy > 0.6, source_accuracy
  assert target_accuracy < source_accuracy - 0.3, (source_accuracy, target_accuracy)
  means, counts = _class_means(source, range(20), standardise=True)
  aligned_accuracy = _nearest_mean_accuracy(target, frames, means, counts, standardise=True)
  assert aligned_accuracy > target_accuracy + 0.1, (target_accuracy, aligned_accuracy)


def test_written_folders_read_back_through_the_folder_sources(tmp_path):
  synthetic.write_synthetic_folders(tmp_path, num_source=3, num_target_train=2,
                                    num_target_val=2, image_size=(64, 32), seed=5)
  gta = sources_lib.make_source("gta5", tmp_path, "train", 19)
  assert len(gta) == 3
  for i in range(3):
    image, label = synthetic.render_frame("source", "train", i, 5, (64, 32))
    np.testing.assert_array_equal(gta[i]["image"], image)
    np.testing.assert_array_equal(gta[i]["label"], label)
  for split in ("train", "val"):
    city = sources_lib.make_source("cityscapes", tmp_path, split, 19)
    assert len(city) == 2
    for i in range(2):
      image, label = synthetic.render_frame("target", split, i, 5, (64, 32))
      assert city[i]["name"] == f"synthetic/synthetic_000000_{i:06d}"
      np.testing.assert_array_equal(city[i]["image"], image)
      np.testing.assert_array_equal(city[i]["label"], label)


def test_bad_arguments_are_user_errors():
  with pytest.raises(UserError, match="domain"):
    synthetic.make_synthetic_source("middle", "train", 19, 4, seed=0)
  with pytest.raises(UserError, match="split"):
    synthetic.make_synthetic_source("source", "test", 19, 4, seed=0)
  with pytest.raises(UserError, match="num_classes"):
    synthetic.make_synthetic_source("source", "train", 13, 4, seed=0)
