"""--mode=predict: outputs at each image's size under its relative path, classes.csv
against counts of the written PNGs, resuming, and bad input (skipped files, exit status,
one-line errors)."""

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fada_jax import api
from fada_jax.data import labels as labels_lib
from fada_jax.data import transforms
from fada_jax.evaluate import inference, predict
from test_evaluate import make_config, random_variables, save

REPO = pathlib.Path(__file__).resolve().parents[1]
# (height, width) of the generated frames: two sizes, neither the test size (32, 64).
SIZES = {"street/a.png": (40, 72), "street/b.jpg": (40, 72), "street/deep/c.png": (40, 72),
         "d.png": (27, 50)}


def write_images(folder: pathlib.Path) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  images = {}
  for name, (height, width) in SIZES.items():
    # Smooth colour fields (plus noise), so that predictions vary over the frame.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 7 + k) * np.cos(y / 5 - k) for k in range(3)], -1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)
    with Image.open(path) as saved:  # the JPEG as decoded
      images[name] = np.asarray(saved.convert("RGB"))
  return images


def add_bad_files(folder: pathlib.Path) -> list[str]:
  (folder / "notes.txt").write_text("not an image\n")
  good = (folder / "d.png").read_bytes()
  (folder / "street" / "broken.png").write_bytes(good[:len(good) // 2])  # truncated
  return ["notes.txt", "broken.png"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  config = make_config("unused")
  return save(tmp_path_factory.mktemp("ckpt") / "model", random_variables(config, 0))


@pytest.fixture(scope="module")
def config():
  return make_config("unused", batch_size=2)


def read_png(path):
  with Image.open(path) as image:
    return image.mode, np.asarray(image)


def test_predict_writes_each_image_at_its_size_and_class_shares(config, model_path, tmp_path):
  inputs = tmp_path / "in"
  images = write_images(inputs)
  bad = add_bad_files(inputs)
  summary = predict.run_predict(config, model_path, str(inputs), tmp_path / "out",
                                opacity=0.25)
  assert (summary.predicted, summary.already_done) == (len(SIZES), 0)
  assert sorted(pathlib.Path(path).name for path, _ in summary.skipped) == sorted(bad)

  # Each image's prediction, computed directly with the Predictor: the test transform,
  # then the logits upsampled to the image's own size.
  predictor = inference.predictor_for(config)
  variables = predictor.place_variables(random_variables(config, 0))
  root = tmp_path / "out" / "predictions"
  expected_counts = {}
  for name, image in images.items():
    stem = str(pathlib.Path(name).with_suffix(""))
    expected = predictor.predict(
        variables, transforms.resize_image(image, config.data.test_size)[None],
        image.shape[:2])[0]
    mode, train_ids = read_png(root / "train_ids" / f"{stem}.png")
    assert mode == "L" and train_ids.shape == image.shape[:2]
    np.testing.assert_array_equal(train_ids, expected)
    mode, colour = read_png(root / "color" / f"{stem}.png")
    assert mode == "P"
    np.testing.assert_array_equal(colour, expected)
    mode, overlay = read_png(root / "overlay" / f"{stem}.jpg")
    colours = labels_lib.colorize(expected).astype(np.float64)
    error = np.mean(np.abs(overlay - (0.75 * image + 0.25 * colours)))
    assert mode == "RGB" and error < 5, error  # JPEG at 95, 4:4:4, of noisy frames
    assert np.mean(np.abs(overlay - (0.5 * image + 0.5 * colours))) > 2 * error
    expected_counts[stem] = np.array([(train_ids == k).sum() for k in range(19)])
  assert any((counts > 0).sum() > 1 for counts in expected_counts.values())  # not one class

  rows = list(csv.reader(open(root / "classes.csv")))
  assert rows[0] == ["image", "pixels", *labels_lib.CITYSCAPES_CLASS_NAMES]
  by_name = {row[0]: row for row in rows[1:]}
  assert set(by_name) == set(expected_counts) | {"all"}
  for stem, counts in expected_counts.items():
    assert int(by_name[stem][1]) == counts.sum()
    np.testing.assert_allclose([float(v) for v in by_name[stem][2:]], counts / counts.sum(),
                               atol=1e-6)
  total = sum(expected_counts.values())
  assert int(by_name["all"][1]) == total.sum()
  np.testing.assert_allclose([float(v) for v in by_name["all"][2:]], total / total.sum(),
                             atol=1e-6)

  # Rerun: only the image whose outputs are incomplete is predicted again; the others'
  # files are left alone and their shares read back.
  (root / "overlay" / "street" / "b.jpg").unlink()
  kept = root / "train_ids" / "street" / "a.png"
  os.utime(kept, (1, 1))
  again = predict.run_predict(config, model_path, str(inputs), tmp_path / "out", opacity=0.25)
  assert (again.predicted, again.already_done, len(again.skipped)) == (1, len(SIZES) - 1, 2)
  assert (root / "overlay" / "street" / "b.jpg").is_file()
  assert kept.stat().st_mtime == 1
  assert list(csv.reader(open(root / "classes.csv"))) == rows


def test_glob_input_keeps_paths_below_the_pattern_s_folder(config, model_path, tmp_path):
  write_images(tmp_path / "in")
  summary = predict.run_predict(config, model_path, str(tmp_path / "in" / "**" / "*.png"),
                                tmp_path / "out")
  assert summary.predicted == 3  # a.png, c.png, d.png (not b.jpg)
  written = sorted(str(p.relative_to(tmp_path / "out" / "predictions" / "train_ids"))
                   for p in (tmp_path / "out" / "predictions" / "train_ids").rglob("*.png"))
  assert written == ["d.png", "street/a.png", "street/deep/c.png"]


def test_api_predict_equals_predict_mode(config, model_path, tmp_path):
  images = write_images(tmp_path / "in")
  predict.run_predict(config, model_path, str(tmp_path / "in"), tmp_path / "out")
  model = api.load(model_path, config=config)
  names = list(images)
  batch = model.predict([images[n] for n in names])  # two sizes: a list back
  single = model.predict(images[names[-1]])
  both, probabilities = model.predict(np.stack([images[names[0]], images[names[1]]]),
                                      probabilities=True)
  for name, result in zip(names, batch):
    stem = str(pathlib.Path(name).with_suffix(""))
    _, written = read_png(tmp_path / "out" / "predictions" / "train_ids" / f"{stem}.png")
    np.testing.assert_array_equal(result, written)
  np.testing.assert_array_equal(single, batch[-1])
  np.testing.assert_array_equal(both, np.stack(batch[:2]))
  assert probabilities.shape == both.shape + (19,) and probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(probabilities, -1), both)


def run_cli(checkpoint, input_spec, workdir, *overrides):
  command = [sys.executable, "-m", "fada_jax.main", "--config=configs/g2c_src.py",
             "--mode=predict", f"--checkpoint={checkpoint}", f"--input={input_spec}",
             f"--workdir={workdir}", "--config.model.arch=resnet18", "--config.model.width=8",
             "--config.data.test_size=(64,32)", "--config.eval.batch_size=2", *overrides]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def error_lines(result):
  return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_cli_exit_status_and_one_line_errors(model_path, tmp_path):
  good = tmp_path / "good"
  write_images(good)
  add_bad_files(good)
  result = run_cli(model_path, good, tmp_path / "out")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"skipped {good / 'notes.txt'}: not an image" in result.stderr
  assert f"skipped {good / 'street' / 'broken.png'}: corrupt or truncated" in result.stderr
  assert f"{len(SIZES)} image(s) predicted, 0 already done, 2 skipped" in result.stdout

  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  (bad / "b.txt").write_text("text")
  result = run_cli(model_path, bad, tmp_path / "out_bad")
  assert result.returncode == 2
  assert error_lines(result) == [
      "error: no image could be read: all 2 input file(s) were skipped"]
  assert "Traceback" not in result.stderr

  (tmp_path / "empty").mkdir()
  result = run_cli(model_path, tmp_path / "empty", tmp_path / "out_empty")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: no input images: folder {tmp_path / 'empty'} holds no files")
  assert "Traceback" not in result.stderr

  result = run_cli(model_path, good, tmp_path / "out_wrong", "--config.model.width=16")
  assert result.returncode == 2
  assert len(error_lines(result)) == 1 and "Traceback" not in result.stderr
  assert error_lines(result)[0].startswith(f"error: checkpoint {model_path} does not match "
                                           "config.model (arch=resnet18, width=16")
  assert not (tmp_path / "out_wrong" / "predictions").exists()
