"""Evaluation end to end: inference modes, CLI, checkpoint folders, masks, pseudo labels,
bad input, and the real Cityscapes frame in ../shared/fixtures when present."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fada_jax import checkpoint, config_lib, evaluate, models
from fada_jax.data import labels as labels_lib
from fada_jax.data import pipeline, sources, synthetic
from fada_jax.errors import UserError
from fada_jax.models import layers
from tiny_runs import brute_force_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
IMAGE_SIZE = (64, 32)  # (width, height): also the test size, so the loader's resize is exact
CITIES = ("aachen", "bremen")
NUM_VAL = 3  # per city


def make_config(root, **eval_overrides):
  config = config_lib.make_config("g2c", "source_only", "resnet18")
  config.model.width = 8
  config.data.root = str(root)
  config.data.test_size = IMAGE_SIZE
  config.data.workers = 0
  config.eval.batch_size = 4
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return config


def random_variables(config, seed):
  """Random variables of config's network: He-scaled kernels, non-trivial frozen BN
  statistics, and a loud classifier so that predictions vary over the image. (Filled
  with numpy on the shapes of `init_variables`: no initialiser to compile.)"""
  shapes = jax.eval_shape(
      lambda: models.init_variables(models.build(config), jax.random.PRNGKey(0), config))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      scale = 0.3 if "classifier" in name else np.sqrt(2.0 / fan_in)
      return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)
    if "'var'" in name or "'scale'" in name:
      return (1.0 + 0.2 * rng.random(leaf.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def save(path, variables, arch="resnet18", **meta):
  return checkpoint.save_model(path, variables, dict(
      {"arch": arch, "num_classes": 19, "kind": "fada", "source": "test"}, **meta))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  for seed, city in enumerate(CITIES):
    synthetic.write_synthetic_folders(root, 0, 2, NUM_VAL, image_size=IMAGE_SIZE,
                                      seed=seed, city=city)
  return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  config = make_config("unused")
  variables = random_variables(config, 0)
  path = save(tmp_path_factory.mktemp("ckpt") / "model", variables)
  return variables, path


def val_examples(config):
  source = pipeline.open_source(config, "cityscapes", "val")
  return [source[i] for i in range(len(source))]


def normalized(images):
  from fada_jax.data import transforms
  return np.stack([transforms.normalize(image, "imagenet") for image in images])


# ----------------------------------------------------------------------------- inference


def test_single_scale_prediction_is_argmax_of_upsampled_logits(data_root, model):
  config = make_config(data_root)
  variables, _ = model
  predictor = evaluate.predictor_for(config)
  placed = predictor.place_variables(variables)
  images = normalized([e["image"] for e in val_examples(config)[:4]])
  out_hw = (2 * IMAGE_SIZE[1], 2 * IMAGE_SIZE[0])
  predictions = np.asarray(predictor.predict(placed, images, out_hw))
  assert predictions.shape == (4,) + out_hw and predictions.dtype == np.uint8
  # Unsharded, unjitted reference of the same computation.
  built = models.build(config)

  @jax.jit
  def reference(images):
    features = built.feature_extractor.apply(variables["feature_extractor"], images,
                                             train=False)
    logits = built.classifier.apply(variables["classifier"], features)
    return jnp.argmax(layers.resize_bilinear_align_corners(logits, out_hw), -1)

  expected = np.asarray(reference(images))
  assert np.mean(predictions == expected) > 0.999
  assert len(np.unique(expected)) > 2  # the test model does not predict a constant


@pytest.mark.parametrize("arch, freeze_bn", [("resnet18", True), ("resnet50", False)])
def test_inference_transforms_keep_the_logits(data_root, arch, freeze_bn):
  """BN folded into the convs and 1x1 convs as matrix products: the same function (the
  1x1 convs really are rewritten: fewer convolutions in the program)."""
  config = make_config(data_root)
  config.model.arch, config.model.freeze_bn = arch, freeze_bn
  config.model.width = 4
  variables = random_variables(config, 2)
  images = normalized([e["image"] for e in val_examples(config)[:4]])
  plain = evaluate.Predictor(config, fold_batch_norm=False, convs_as_matmuls=False)
  fast = evaluate.Predictor(config)
  results = []
  for predictor in (plain, fast):
    placed = predictor.place_variables(variables)
    logits = jax.jit(predictor.logits)
    results.append(np.asarray(logits(placed, images)))
    convs = str(jax.make_jaxpr(predictor.logits)(placed, images)).count("conv_general_dilated")
    results.append(convs)
  plain_logits, plain_convs, fast_logits, fast_convs = results
  scale = np.abs(plain_logits).max()
  np.testing.assert_allclose(fast_logits, plain_logits, atol=1e-4 * scale)
  assert fast_convs < plain_convs
  # The folded BN variables are the identity plus a shift.
  folded = evaluate.fold_batch_norm(variables["feature_extractor"], frozen=freeze_bn)
  np.testing.assert_array_equal(folded["params"]["bn1"]["scale"], 1.0)


def test_flip_and_multi_scale_average_probabilities_at_label_size(data_root, model):
  config = make_config(data_root)
  variables, _ = model
  images = normalized([e["image"] for e in val_examples(config)[:2]])
  out_hw = (48, 80)  # labels need not share the image's aspect
  built = models.build(config)

  @jax.jit
  def probabilities(x):
    features = built.feature_extractor.apply(variables["feature_extractor"], x, train=False)
    logits = built.classifier.apply(variables["classifier"], features)
    return jax.nn.softmax(layers.resize_bilinear_align_corners(logits, out_hw), -1)

  scales = (0.7, 1.0)
  ms = evaluate.Predictor(config, settings=evaluate.InferenceSettings(flip=True, scales=scales))
  placed = ms.place_variables(variables)
  scores = np.asarray(jax.jit(ms.scores, static_argnums=2)(placed, images, out_hw))
  assert scores.shape == (2, 48, 80, 19)
  np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)
  # The release's order: resize the image (bilinear, align corners) to int(s*h) x int(s*w),
  # softmax of logits upsampled to the label size, flipped back, all averaged.
  expected = 0
  for s in scales:
    x = layers.resize_bilinear_align_corners(images, (int(32 * s), int(64 * s)))
    expected = expected + probabilities(x) + jnp.flip(probabilities(jnp.flip(x, 2)), 2)
  np.testing.assert_allclose(scores, np.asarray(expected) / 4, atol=1e-4)


def mirror_dataset(root, mirrored_root):
  for split_dir in ("leftImg8bit", "gtFine"):
    for path in (root / "cityscapes" / split_dir).rglob("*.png"):
      target = mirrored_root / path.relative_to(root)
      target.parent.mkdir(parents=True, exist_ok=True)
      with Image.open(path) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)


def test_flip_inference_is_mirror_equivariant(data_root, model, tmp_path):
  """With flip averaging, a mirrored dataset gives the same metrics (a model alone is not
  mirror-equivariant)."""
  _, path = model
  mirrored = tmp_path / "mirrored"
  mirror_dataset(data_root, mirrored)
  config = make_config(data_root, flip=True)
  predictor = evaluate.predictor_for(config)
  original = evaluate.evaluate_checkpoint(config, path, tmp_path / "a", predictor=predictor)
  config_mirrored = make_config(mirrored, flip=True)
  flipped = evaluate.evaluate_checkpoint(config_mirrored, path, tmp_path / "b",
                                         predictor=predictor)
  assert original["num_images"] == flipped["num_images"] == len(CITIES) * NUM_VAL
  np.testing.assert_allclose(flipped["iou_per_class"], original["iou_per_class"], atol=1e-3)
  assert flipped["allacc"] == pytest.approx(original["allacc"], abs=1e-4)


# ----------------------------------------------------------------------------- end to end


def test_eval_in_process_matches_a_count_of_the_written_masks(data_root, model, tmp_path):
  variables, path = model
  config = make_config(data_root, save_predictions=True)  # 6 images: a padded last batch
  metrics = evaluate.run_eval(config, path, tmp_path)
  out = tmp_path / "eval"
  saved = json.loads((out / "metrics.json").read_text())
  for key in ("miou", "macc", "allacc", "iou_per_class", "class_names", "checkpoint",
              "num_images"):
    assert key in saved
  assert "miou_13" not in saved
  assert saved["num_images"] == len(CITIES) * NUM_VAL
  assert saved["miou"] == pytest.approx(metrics["miou"])
  pairs = []
  for example in val_examples(config):
    prediction_path = out / "predictions" / f"{example['name']}.png"
    color_path = out / "color" / f"{example['name']}.png"
    with Image.open(prediction_path) as image:
      prediction = np.asarray(image)
    with Image.open(color_path) as image:
      assert image.mode == "P"
      np.testing.assert_array_equal(np.asarray(image), prediction)
    assert prediction.shape == example["label"].shape
    pairs.append((prediction, example["label"]))
  miou, allacc = brute_force_metrics(pairs)
  assert saved["miou"] == pytest.approx(miou, abs=1e-9)
  assert saved["allacc"] == pytest.approx(allacc, abs=1e-9)
  rows = list(csv.reader(open(out / "results.csv")))
  assert len(rows) == 2 and rows[0][:3] == ["step", "checkpoint", "miou"]


def test_folder_of_checkpoints_gives_one_row_each_and_the_best(data_root, model, tmp_path):
  variables, _ = model
  config = make_config(data_root, save_predictions=True)
  folder = tmp_path / "checkpoints"
  save(folder / "200", variables)
  other = jax.tree_util.tree_map(np.copy, variables)
  for branch in other["classifier"]["params"].values():
    branch["kernel"] = branch["kernel"][..., ::-1]  # another model: classes permuted
  save(folder / "100", other)
  (folder / "notes").mkdir()  # not a checkpoint: ignored
  best = evaluate.run_eval(config, folder, tmp_path / "run")
  for name in ("100", "200"):  # each checkpoint's masks apart
    assert len(list((tmp_path / "run" / "eval" / name / "color").rglob("*.png"))) == 6
  rows = list(csv.DictReader(open(tmp_path / "run" / "eval" / "results.csv")))
  assert [row["step"] for row in rows] == ["100", "200"]
  assert list(rows[0])[3:] == list(labels_lib.CITYSCAPES_CLASS_NAMES)
  mious = [float(row["miou"]) for row in rows]
  assert best["miou"] == pytest.approx(max(mious), abs=1e-6)
  saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
  assert saved["checkpoint"] == rows[int(np.argmax(mious))]["checkpoint"]
  assert len(saved["evaluated"]) == 2


def test_cli_eval_writes_metrics_csv_and_masks(data_root, model, tmp_path):
  _, path = model
  workdir = tmp_path / "work"
  command = [
      sys.executable, "-m", "fada_jax.main", "--config=configs/g2c_src.py", "--mode=eval",
      f"--checkpoint={path}", f"--workdir={workdir}", "--config.model.arch=resnet18",
      "--config.model.width=8", f"--config.data.root={data_root}",
      "--config.data.test_size=(64,32)", "--config.data.workers=0",
      "--config.eval.batch_size=4", "--config.eval.save_predictions=True"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mIoU" in result.stdout and "bicycle" in result.stdout
  saved = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert saved["num_images"] == len(CITIES) * NUM_VAL
  assert len(saved["iou_per_class"]) == 19
  pairs = []
  for example in val_examples(make_config(data_root)):
    with Image.open(workdir / "eval" / "predictions" / f"{example['name']}.png") as image:
      pairs.append((np.asarray(image), example["label"]))
  miou, allacc = brute_force_metrics(pairs)
  assert saved["miou"] == pytest.approx(miou, abs=1e-9)
  assert saved["allacc"] == pytest.approx(allacc, abs=1e-9)
  assert len(list(csv.reader(open(workdir / "eval" / "results.csv")))) == 2
  for kind in ("predictions", "color"):
    for city in CITIES:
      assert len(list((workdir / "eval" / kind / city).glob("*.png"))) == NUM_VAL


def test_pseudo_labels_are_full_resolution_palette_pngs_of_the_predictions(
    data_root, model, tmp_path):
  variables, _ = model
  config = make_config(data_root)
  out = tmp_path / "pseudo"
  metrics = evaluate.write_pseudo_labels(config, variables, out, split="train")
  source = pipeline.open_source(config, "cityscapes", "train")
  assert metrics["num_images"] == len(source) == 2 * len(CITIES)
  predictor = evaluate.predictor_for(config)
  placed = predictor.place_variables(variables)
  examples = [source[i] for i in range(len(source))]
  expected = np.asarray(predictor.predict(
      placed, normalized([e["image"] for e in examples]), IMAGE_SIZE[::-1]))
  for example, prediction in zip(examples, expected):
    with Image.open(out / f"{example['name']}.png") as image:
      assert image.mode == "P"
      np.testing.assert_array_equal(np.asarray(image), prediction)
  # Stage 3 reads them back as labels.
  pseudo = sources.make_source("cityscapes_pseudo", data_root, "train", 19,
                               pseudo_label_dir=out)
  np.testing.assert_array_equal(pseudo[0]["label"], expected[0])


def _brute_force_thresholds(classes, bins, keep_fraction, cap_bin, num_classes=19):
  """Per class: the bin of its ceil(keep_fraction * N)-th most confident pixel, capped."""
  thresholds = np.full(num_classes, cap_bin)
  for c in range(num_classes):
    ordered = np.sort(bins[classes == c])[::-1]
    if ordered.size:
      needed = int(np.ceil(keep_fraction * ordered.size - 1e-9))
      thresholds[c] = min(ordered[needed - 1], cap_bin)
  return thresholds


@pytest.mark.parametrize("keep_fraction, keep_confidence", [(0.5, 0.6), (0.3, 1.0), (1.0, 0.9)])
def test_class_thresholds_keep_each_class_s_most_confident_fraction(keep_fraction,
                                                                    keep_confidence):
  rng = np.random.default_rng(0)
  bins = evaluate.CONFIDENCE_BINS
  # Classes of very different sizes (one empty), confidences clustered so that ties and
  # bins holding many pixels occur.
  classes = rng.choice(19, 20000, p=np.r_[0.3, 0.2, 0.0, np.full(16, 0.5 / 16)])
  confidence_bin = np.minimum((rng.beta(2, 1, classes.size) * 60).astype(int) * 16, bins - 1)
  histogram = np.zeros((19, bins), np.int64)
  np.add.at(histogram, (classes, confidence_bin), 1)
  got = evaluate.class_thresholds(histogram, keep_fraction, keep_confidence)
  cap_bin = int(round(keep_confidence * bins))
  want = _brute_force_thresholds(classes, confidence_bin, keep_fraction, cap_bin)
  present = np.bincount(classes, minlength=19) > 0
  np.testing.assert_array_equal(got[present], want[present])
  for c in np.flatnonzero(present):
    kept = np.sum(confidence_bin[classes == c] >= got[c])
    assert kept >= keep_fraction * np.sum(classes == c) - 1e-9


@pytest.mark.parametrize("flip", [False, True])
def test_confident_pseudo_labels_keep_each_class_s_most_confident_pixels(
    data_root, model, tmp_path, flip):
  """config.pseudo_label below 1 against the same selection done with numpy on the
  model's own class probabilities."""
  variables, _ = model
  config = make_config(data_root, flip=flip)
  config.pseudo_label.keep_fraction = 0.4
  config.pseudo_label.keep_confidence = 0.95
  out = tmp_path / "pseudo"
  metrics = evaluate.write_pseudo_labels(config, variables, out, split="train")
  source = pipeline.open_source(config, "cityscapes", "train")
  examples = [source[i] for i in range(len(source))]
  predictor = evaluate.predictor_for(config)
  placed = predictor.place_variables(variables)
  scores = jax.jit(predictor.scores, static_argnums=2)(
      placed, jnp.asarray(normalized([e["image"] for e in examples])), IMAGE_SIZE[::-1])
  scores = np.asarray(scores, np.float64)
  if flip:  # averaged probabilities
    probabilities = scores
  else:  # logits
    probabilities = np.exp(scores - scores.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
  classes = probabilities.argmax(-1)
  scaled = probabilities.max(-1) * evaluate.CONFIDENCE_BINS
  bins = np.minimum(np.floor(scaled), evaluate.CONFIDENCE_BINS - 1).astype(int)
  thresholds = _brute_force_thresholds(classes, bins, 0.4, 950)
  expected = np.where(bins >= thresholds[classes], classes, 255)
  written = []
  for example in examples:
    with Image.open(out / f"{example['name']}.png") as image:
      written.append(np.asarray(image))
  written = np.stack(written)
  # float32 against float64 rounding may move a pixel lying on a bin edge to the next bin.
  on_edge = np.abs(scaled - np.round(scaled)) < 1e-3
  assert np.all((written == expected) | on_edge)
  assert np.mean(written == expected) > 0.99
  assert 0.4 <= metrics["kept_fraction"] < 1 and np.any(written == 255)
  assert metrics["kept_fraction"] == pytest.approx(np.mean(written != 255))


# ----------------------------------------------------------------------------- bad input


def test_bad_checkpoints_are_one_line_user_errors(data_root, model, tmp_path):
  variables, path = model
  config = make_config(data_root)
  with pytest.raises(UserError, match="checkpoint not found"):
    evaluate.run_eval(config, tmp_path / "missing", tmp_path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="not a checkpoint"):
    evaluate.run_eval(config, tmp_path / "empty", tmp_path)
  wide = make_config(data_root)
  wide.model.width = 16
  with pytest.raises(UserError, match="does not match config.model.*shape"):
    evaluate.run_eval(wide, path, tmp_path)
  other = make_config(data_root)
  other.model.arch = "resnet34"
  with pytest.raises(UserError, match="resnet18"):
    evaluate.run_eval(other, path, tmp_path)
  backbone_only = save(tmp_path / "imagenet",
                       {"feature_extractor": variables["feature_extractor"]}, kind="imagenet")
  with pytest.raises(UserError, match="no classifier"):
    evaluate.run_eval(config, backbone_only, tmp_path)


def test_bad_data_is_a_user_error_naming_the_file(data_root, model, tmp_path):
  _, path = model
  with pytest.raises(UserError, match="does not exist"):
    evaluate.run_eval(make_config(tmp_path / "nowhere"), path, tmp_path)
  broken = tmp_path / "broken"
  shutil.copytree(data_root, broken)
  label_dir = broken / "cityscapes" / "gtFine" / "val" / CITIES[0]
  orphan = sorted(label_dir.glob("*.png"))[0]
  orphan.unlink()
  image_name = orphan.name.replace("_gtFine_labelIds", "_leftImg8bit")
  with pytest.raises(UserError, match=f"{image_name} has no label"):
    evaluate.run_eval(make_config(broken), path, tmp_path)
  shutil.rmtree(broken)
  shutil.copytree(data_root, broken)
  image_path = sorted((broken / "cityscapes" / "leftImg8bit" / "val" / CITIES[1]).glob("*"))[1]
  image_path.write_bytes(image_path.read_bytes()[:200])  # truncated
  with pytest.raises(UserError, match=image_path.name):
    evaluate.run_eval(make_config(broken), path, tmp_path)


def test_cli_reports_a_missing_checkpoint_in_one_line(data_root, tmp_path):
  command = [sys.executable, "-m", "fada_jax.main", "--config=configs/g2c_src.py",
             "--mode=eval", f"--checkpoint={tmp_path / 'nope'}", f"--workdir={tmp_path}",
             f"--config.data.root={data_root}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")


# ----------------------------------------------------------------------------- real frame


@pytest.fixture
def fixture_root():
  if not (FIXTURES / "cityscapes").is_dir():
    pytest.skip("fixture absent: ../shared/fixtures/cityscapes")
  return FIXTURES


def test_real_frame_label_against_itself_is_perfect(fixture_root):
  config = make_config(fixture_root)
  config.data.test_size = (128, 64)
  batch = next(iter(pipeline.eval_loader(config, "val")))
  labels = np.asarray(batch["label"])
  assert labels.shape[1:] == (128, 256)  # full label resolution, not the test size
  counts = np.asarray(evaluate.confusion_counts(labels, labels, np.asarray(batch["valid"]), 19))
  result = evaluate.metrics_from_counts(*counts, num_classes=19)
  present = counts[2] > 0
  assert present.sum() >= 5  # a real street scene
  assert result["allacc"] == pytest.approx(1.0)
  np.testing.assert_allclose(np.asarray(result["iou_per_class"])[present], 1.0)
  np.testing.assert_allclose(np.asarray(result["iou_per_class"])[~present], 0.0)


def test_real_frame_evaluates_end_to_end(fixture_root, model, tmp_path):
  _, path = model
  config = make_config(fixture_root, save_predictions=True)
  config.data.test_size = (128, 64)
  metrics = evaluate.run_eval(config, path, tmp_path)
  assert metrics["num_images"] == 1
  prediction_files = list((tmp_path / "eval" / "predictions").rglob("*.png"))
  assert [p.relative_to(tmp_path / "eval" / "predictions").as_posix()
          for p in prediction_files] == ["frankfurt/frankfurt_000000_000294.png"]
  with Image.open(prediction_files[0]) as image:
    assert image.size == (256, 128)
  (example,) = val_examples(config)
  with Image.open(prediction_files[0]) as image:
    miou, allacc = brute_force_metrics([(np.asarray(image), example["label"])])
  assert metrics["miou"] == pytest.approx(miou, abs=1e-9)
  assert metrics["allacc"] == pytest.approx(allacc, abs=1e-9)
