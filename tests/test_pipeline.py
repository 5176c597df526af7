"""grain pipelines: shapes per stage, determinism across workers, resume, sharding, eval."""

import multiprocessing
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from fada_jax import config_lib
from fada_jax.data import labels as labels_lib
from fada_jax.data import pipeline
from fada_jax.data import transforms
from fada_jax.errors import UserError


def _rgb(seed, height, width):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _ids(seed, height, width):
  rng = np.random.default_rng(seed + 1000)
  ids = np.full((height, width), 7, np.uint8)  # road everywhere...
  ids[: height // 2] = rng.choice([11, 21, 23], (height // 2, width))  # ...sky, trees, houses
  if seed % 5 == 0:
    ids[-4:, :6] = 33  # a rare bicycle
  return ids


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return write_data(tmp_path_factory.mktemp("data"))


def write_data(root):
  """Small GTA5 (one frame larger than the rest) and Cityscapes folders under root."""
  (root / "gta5" / "images").mkdir(parents=True)
  (root / "gta5" / "labels").mkdir(parents=True)
  for i in range(10):
    height, width = (26, 48) if i != 3 else (28, 50)  # one frame of another size
    Image.fromarray(_rgb(i, height, width)).save(root / "gta5" / "images" / f"{i:05d}.png")
    Image.fromarray(_ids(i, height, width)).save(root / "gta5" / "labels" / f"{i:05d}.png")
  for split, count in (("train", 6), ("val", 5)):
    for i in range(count):
      city = "aachen" if i % 2 else "bonn"
      stem = f"{city}_{i:06d}_000019"
      image_dir = root / "cityscapes" / "leftImg8bit" / split / city
      label_dir = root / "cityscapes" / "gtFine" / split / city
      image_dir.mkdir(parents=True, exist_ok=True)
      label_dir.mkdir(parents=True, exist_ok=True)
      Image.fromarray(_rgb(100 + i, 32, 64)).save(image_dir / f"{stem}_leftImg8bit.png")
      Image.fromarray(_ids(100 + i, 32, 64)).save(label_dir / f"{stem}_gtFine_labelIds.png")
      pseudo = root / "pseudo" / city
      pseudo.mkdir(parents=True, exist_ok=True)
      train_ids = np.random.default_rng(i).integers(0, 19, (32, 64)).astype(np.uint8)
      Image.fromarray(train_ids).save(pseudo / f"{stem}.png")
  return root


def _config(root, stage="adversarial", batch=4, workers=0):
  config = config_lib.make_config("g2c", stage)
  config.data.root = str(root)
  config.data.workers = workers
  config.data.source_size = (24, 12)
  config.data.target_size = (32, 16)
  config.data.test_size = (32, 16)
  config.data.crop_size = (40, 20)
  config.solver.batch_size = batch
  config.solver.max_iter = config.solver.stop_iter = 20
  config.eval.batch_size = 4
  if stage == "self_distill":
    config.data.pseudo_label_dir = str(root / "pseudo")
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert set(a) == set(b) and "image" in a
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_adversarial_batches(data_root):
  iterators = pipeline.make_train_iterators(_config(data_root))
  assert set(iterators) == {"source", "target"}
  source, target = next(iterators["source"]), next(iterators["target"])
  # uint8 pixels (normalised on the device), a quarter of float32's bytes.
  assert source["image"].shape == (2, 12, 24, 3) and source["image"].dtype == np.uint8
  assert target["image"].dtype == np.uint8
  assert source["label"].shape == (2, 12, 24) and source["label"].dtype == np.uint8
  assert target["image"].shape == (2, 16, 32, 3)
  assert set(target) == {"image"}  # the step uses no target label: none is read
  assert set(np.unique(source["label"])) <= {0, 2, 8, 10, 18, 255}
  for iterator in iterators.values():
    iterator.close()


def test_source_only_and_self_distill_streams(data_root):
  source_only = pipeline.make_train_iterators(_config(data_root, "source_only"))
  assert set(source_only) == {"source"}
  assert next(source_only["source"])["image"].shape == (4, 12, 24, 3)
  self_distill = pipeline.make_train_iterators(_config(data_root, "self_distill"))
  assert set(self_distill) == {"source"}
  batch = next(self_distill["source"])
  assert batch["image"].shape == (4, 20, 40, 3) and batch["label"].shape == (4, 20, 40)
  # Pseudo labels are train ids as stored; scale-up crops of 32x64 frames rarely need padding.
  assert set(np.unique(batch["label"])) <= set(range(19)) | {255}
  with pytest.raises(UserError, match="no target stream"):
    pipeline.target_loader(_config(data_root, "source_only"))


def test_same_batches_whatever_the_worker_count(data_root):
  # Worker processes take seconds to start: one stream (jittered, class-balanced) suffices.
  serial = pipeline.source_loader(_config(data_root, workers=0))
  parallel = pipeline.source_loader(_config(data_root, workers=2))
  _assert_same(_take(serial, 4), _take(parallel, 4))
  parallel.close()


def test_resume_mid_epoch_gives_the_identical_continuation(data_root):
  config = _config(data_root)
  uninterrupted = pipeline.source_loader(config)
  reference = _take(uninterrupted, 6)  # 12 draws: past the 10-file "epoch"
  interrupted = pipeline.source_loader(config)
  _take(interrupted, 2)
  state = interrupted.get_state()
  assert state == {"step": 2}
  interrupted.close()
  resumed = pipeline.source_loader(config)
  resumed.set_state(state)
  _assert_same(_take(resumed, 4), reference[2:])
  _assert_same(_take(pipeline.target_loader(config, start_step=3), 2),
               _take(pipeline.target_loader(config), 5)[3:])
  _assert_same(_take(pipeline.source_loader(config, start_step=4), 2), reference[4:6])


def test_processes_share_each_global_batch_exactly_once(data_root):
  config = _config(data_root, "source_only", batch=4)
  whole = _take(pipeline.source_loader(config), 3)
  shares = [_take(pipeline.source_loader(config, p, 2), 3) for p in range(2)]
  for step in range(3):
    for key in ("image", "label"):
      assert shares[0][step][key].shape[0] == 2
      np.testing.assert_array_equal(
          np.concatenate([shares[0][step][key], shares[1][step][key]]), whole[step][key])
  with pytest.raises(UserError, match="not divisible"):
    pipeline.source_loader(config, 0, 3)


def test_source_stream_is_class_balanced(data_root):
  config = _config(data_root, "source_only", batch=10)
  batches = _take(pipeline.source_loader(config), 6)
  with_bicycle = np.mean([(label == 18).any() for b in batches for label in b["label"]])
  assert with_bicycle > 0.2 + 0.1  # 2 of 10 files hold the rare class


def test_different_seeds_give_different_batches(data_root):
  config = _config(data_root)
  other = _config(data_root)
  other.seed = 1
  a = next(pipeline.source_loader(config))["image"]
  b = next(pipeline.source_loader(other))["image"]
  assert not np.array_equal(a, b)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_loader_is_ordered_full_resolution_and_sharded(data_root, process_count):
  config = _config(data_root)
  names, labels = [], []
  steps = pipeline.num_eval_steps(config)
  assert steps == 2  # 5 frames, global batch 4
  for process in range(process_count):
    loader = pipeline.eval_loader(config, "val", process, process_count)
    batches = list(loader)
    assert len(batches) == steps
    for batch in batches:
      assert batch["image"].shape == (4 // process_count, 16, 32, 3)
      assert batch["label"].shape[1:] == (32, 64)
      for j in np.flatnonzero(batch["valid"]):
        names.append(batch["name"][j])
        labels.append(batch["label"][j])
      assert (batch["label"][~batch["valid"]] == 255).all()
  order = sorted(range(len(names)), key=names.__getitem__)
  assert sorted(names) == ["aachen/aachen_000001_000019", "aachen/aachen_000003_000019",
                           "bonn/bonn_000000_000019", "bonn/bonn_000002_000019",
                           "bonn/bonn_000004_000019"]
  first = labels[order[2]]  # bonn_000000
  np.testing.assert_array_equal(first, labels_lib.label_lookup("cityscapes", 19)[
      _ids(100, 32, 64)])


def test_synthetic_streams(data_root):
  config = config_lib.make_config("demo", "adversarial")
  config.data.synthetic_size = 6
  config.solver.max_iter = config.solver.stop_iter = 4
  iterators = pipeline.make_train_iterators(config)
  batch = next(iterators["source"])
  assert batch["image"].dtype == np.uint8  # normalised on the device
  assert batch["image"].shape[0] == config.solver.batch_size // 2
  assert batch["image"].shape[1:3] == tuple(config.data.source_size)[::-1]
  assert next(iterators["target"])["image"].dtype == np.uint8


def test_unknown_dataset_and_format_are_user_errors(data_root):
  config = _config(data_root)
  config.data.source = "kitti"
  with pytest.raises(UserError, match="kitti"):
    pipeline.make_train_iterators(config)
  config = _config(data_root)
  with pytest.raises(UserError, match=r"gta5/images"):
    config.data.root = str(data_root / "cityscapes")
    pipeline.source_loader(config)


def test_synthetic_self_distill_reads_pseudo_labels(tmp_path):
  config = config_lib.make_config("demo", "self_distill")
  config.data.synthetic_size = 3
  config.data.pseudo_label_dir = str(tmp_path)
  config.solver.max_iter = config.solver.stop_iter = 2
  config.solver.batch_size = 2
  config.data.scale_range = (1.0, 1.0)
  config.data.flip = False
  for i in range(3):
    (tmp_path / "synthetic_target").mkdir(exist_ok=True)
    Image.fromarray(np.full((128, 256), 5, np.uint8)).save(
        tmp_path / "synthetic_target" / f"train_{i:06d}.png")
  iterators = pipeline.make_train_iterators(config)
  batch = next(iterators["source"])
  width, height = config.data.crop_size
  assert batch["image"].shape == (2, height, width, 3)
  assert set(np.unique(batch["label"])) <= {5, 255}
  (tmp_path / "synthetic_target" / "train_000001.png").unlink()
  with pytest.raises(UserError, match="train_000001"):
    pipeline.make_train_iterators(config)


def test_jitter_first_follows_the_release_order():
  """config.data.jitter_first: jitter the full frame, then resize (the release's order)."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  label = rng.integers(0, 19, (37, 53), dtype=np.uint8)
  strengths = (0.5, 0.5, 0.5, 0.2)
  size = (24, 16)
  first = pipeline.ResizeTransform(size, strengths, jitter_first=True)
  after = pipeline.ResizeTransform(size, strengths, jitter_first=False)
  got_first, _ = first({"image": image, "label": label}, np.random.default_rng(5))
  got_after, _ = after({"image": image, "label": label}, np.random.default_rng(5))
  expected = transforms.resize_image(
      transforms.color_jitter(image, strengths, np.random.default_rng(5)), size)
  # uint8 pixels: the device normalises them.
  assert got_first.dtype == np.uint8
  np.testing.assert_array_equal(got_first, expected)
  # The cheap order is close but not identical: rounding happens at another resolution.
  assert not np.array_equal(got_first, got_after)
  assert np.abs(got_first.astype(np.float32) - got_after).mean() < 6  # levels of 255


@pytest.mark.parametrize("crop", [(24, 16), (60, 48)])  # inside the frame; padded
def test_stage3_transform_is_the_releases_sequence_of_transforms(crop):
  """Jitter, flip, random scale, random crop, each drawing in turn from one generator."""
  transform = pipeline.ScaleCropTransform(crop, (0.5, 1.5), True, (0.5, 0.5, 0.5, 0.2))
  for seed in range(6):
    image, label = _rgb(seed, 37, 53), _ids(seed, 37, 53)
    rng = np.random.default_rng(seed)
    want_image = transforms.color_jitter(image, (0.5, 0.5, 0.5, 0.2), rng)
    want_image, want_label = transforms.random_flip(want_image, label, rng)
    want_image, want_label = transforms.random_scale(want_image, want_label, (0.5, 1.5), rng)
    want_image, want_label = transforms.random_crop(want_image, want_label, crop, rng)
    got_image, got_label = transform({"image": image, "label": label},
                                     np.random.default_rng(seed))
    np.testing.assert_array_equal(got_image, want_image)
    np.testing.assert_array_equal(got_label, want_label)


def test_a_data_error_in_a_worker_process_is_the_same_one_line_error(data_root, tmp_path,
                                                                   capfd):
  root = tmp_path / "data"
  shutil.copytree(data_root / "cityscapes", root / "cityscapes")
  broken = next((root / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
  broken.write_bytes(broken.read_bytes()[:40])  # truncated
  loader = pipeline.eval_loader(_config(root, workers=2), "val")
  with pytest.raises(UserError, match=broken.name):
    for _ in loader:
      pass
  loader.close()
  assert "Traceback" not in capfd.readouterr().err  # workers print nothing of their own


class _NumberedBatches:
  """step -> a batch filled with the step (picklable, for worker processes)."""

  def __call__(self, step):
    return {"image": np.full((2, 4, 4, 3), step, np.uint8)}


@pytest.mark.parametrize("steps, worker_processes", [(1, 0), (2, 1)])
def test_workers_start_only_for_the_batches_after_the_first(steps, worker_processes):
  """A worker's start-up (seconds of imports) buys nothing for one batch; a loader of N
  batches starts at most N - 1 of its workers, with the same batches."""
  loader = pipeline.BatchIterator(_NumberedBatches(), 0, workers=2, num_steps=steps)
  batches = [next(loader)]
  assert len(multiprocessing.active_children()) == worker_processes
  batches.extend(loader)
  loader.close()
  assert [int(b["image"][0, 0, 0, 0]) for b in batches] == list(range(steps))


_HOLD_BATCHES_IN_JAX_UNTIL_EXIT = """
import sys
import jax
import numpy as np
from fada_jax.data import pipeline

class Steps:
  def __call__(self, step):
    return {"image": np.full((2, 32, 64, 3), step, np.uint8), "label": np.zeros((2, 32, 64), np.uint8)}

if __name__ == "__main__":
  loader = pipeline.BatchIterator(Steps(), 0, workers=2)
  # JAX on CPU aliases aligned host memory, so these device arrays keep the batches'
  # memory alive to the end of the interpreter.
  held = [jax.device_put(next(loader)["image"]) for _ in range(3)]
  loader.close()
  assert [int(np.asarray(x)[0, 0, 0, 0]) for x in held] == [0, 1, 2]
  print("held", len(held))
"""


def test_batches_from_workers_leave_no_shared_memory_behind_whoever_holds_them(tmp_path):
  import os
  import subprocess
  import sys
  script = tmp_path / "hold.py"
  script.write_text(_HOLD_BATCHES_IN_JAX_UNTIL_EXIT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent.parent),
                                         os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "held 3" in result.stdout, result.stderr[-2000:]
  assert "leaked" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("jitter_first", [True, False])
def test_image_only_path_gives_the_images_of_the_labelled_one(jitter_first):
  transform = pipeline.ResizeTransform((24, 12), (0.5, 0.5, 0.5, 0.2), jitter_first)
  example = {"image": _rgb(3, 26, 48), "label": _ids(3, 26, 48)}
  for position in range(4):
    image, _ = transform(example, np.random.default_rng([0, 2, position]))
    alone = transform.image_only(example["image"], np.random.default_rng([0, 2, position]))
    np.testing.assert_array_equal(alone, image)


def test_target_stream_reads_no_label_and_keeps_its_images(data_root, monkeypatch):
  config = _config(data_root)
  labelled = pipeline._make_stream(config, "target", 2, 0, 1)  # pylint: disable=protected-access
  labelled.with_labels = True
  expected = [labelled(step)["image"] for step in range(3)]
  serial = pipeline.target_loader(config)
  config.data.workers = 2
  parallel = pipeline.target_loader(config)
  got_serial, got_parallel = _take(serial, 3), _take(parallel, 3)
  parallel.close()
  for want, a, b in zip(expected, got_serial, got_parallel):
    np.testing.assert_array_equal(a["image"], want)
    np.testing.assert_array_equal(b["image"], want)
  # Not one label file is opened on the way.
  monkeypatch.setattr(pipeline.sources_lib, "read_label_ids",
                      lambda path: pytest.fail(f"read the label {path}"))
  next(pipeline.target_loader(_config(data_root)))


def test_frames_prepared_at_the_training_size_give_the_same_batches(data_root, tmp_path):
  from fada_jax.data import prepared
  from fada_jax.data.builders import preparation
  root = tmp_path / "data"
  for name in ("gta5", "cityscapes"):
    shutil.copytree(data_root / name, root / name)
  config = _config(root, batch=4)
  config.data.jitter_first = False  # jitter after the resize: the resized frame suffices
  folder = [_take(pipeline.source_loader(config), 3), _take(pipeline.target_loader(config), 3)]
  for name, size in (("gta5", (24, 12)), ("cityscapes", (32, 16))):
    for image_size in (None, size):
      preparation.prepare(name, root, root / "prepared", 19, progress=False,
                          image_size=image_size)
  config.data.format = "array_record"
  source, target = pipeline.source_loader(config), pipeline.target_loader(config)
  assert source._make_batch.source.image_size == (24, 12)  # pylint: disable=protected-access
  assert target._make_batch.source.image_size == (32, 16)  # pylint: disable=protected-access
  assert prepared.make_prepared_source("gta5", root, "train", 19)[3]["image"].shape == (
      28, 50, 3)  # the full-size dataset is untouched
  _assert_same(folder[0], _take(source, 3))
  _assert_same(folder[1], _take(target, 3))
  # The release's order jitters the full-size frame: the source stream reads that one.
  config.data.jitter_first = True
  jittered = pipeline.source_loader(config)
  assert jittered._make_batch.source.image_size is None  # pylint: disable=protected-access
  config.data.format = "folder"
  _assert_same(_take(pipeline.source_loader(config), 2), _take(jittered, 2))


def test_training_sizes_of_the_preparation_are_the_configs():
  from fada_jax.data import prepare
  for task, source in (("g2c", "gta5"), ("s2c", "synthia")):
    config = config_lib.make_config(task, "adversarial")
    assert prepare.TRAINING_SIZES[source] == tuple(config.data.source_size)
    assert prepare.TRAINING_SIZES["cityscapes"] == tuple(config.data.target_size)
