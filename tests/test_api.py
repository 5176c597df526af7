"""fada_jax.load / Model.predict: the config recorded by training, predictions equal to
--mode=eval's, and one-line errors for a checkpoint without a config or of another network."""

import pathlib

import numpy as np
import pytest
from PIL import Image

import fada_jax
from fada_jax import checkpoint, evaluate
from fada_jax.errors import UserError
from fada_jax.train import loop
from test_evaluate import make_config, random_variables, save, val_examples
from fada_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def save_training_step(directory, config, variables, step=10) -> pathlib.Path:
  """A step checkpoint as the training loop writes it (meta.json records the config)."""
  store = checkpoint.TrainingCheckpoints(directory, keep=1)
  model_variables = {k: variables[k] for k in ("feature_extractor", "classifier")}
  store.save(step, model_variables, {"step": np.int32(step)}, {"states": []},
             loop._checkpoint_meta(config, model_variables))  # pylint: disable=protected-access
  store.close()
  return directory / str(step)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  # Frames of 72x40, resized to the 64x32 test size: the test transform matters.
  synthetic.write_synthetic_folders(root, 0, 0, 3, image_size=(72, 40), seed=3, city="ulm")
  return root


def test_load_uses_the_recorded_config_and_predicts_as_eval(data_root, tmp_path):
  config = make_config(data_root, save_predictions=True)
  step_dir = save_training_step(tmp_path / "checkpoints", config, random_variables(config, 2))
  model = fada_jax.load(step_dir)  # no config: the one in meta.json
  assert model.config.model.width == 8 and tuple(model.config.data.test_size) == (64, 32)
  evaluate.run_eval(config, step_dir, tmp_path / "work")
  examples = val_examples(config)
  predictions = model.predict([np.asarray(e["image"]) for e in examples])
  for example, prediction in zip(examples, predictions):
    with Image.open(tmp_path / "work" / "eval" / "predictions" / f"{example['name']}.png") as png:
      np.testing.assert_array_equal(prediction, np.asarray(png))
    assert prediction.shape == example["label"].shape
  assert len(np.unique(predictions[0])) > 1  # not a constant map


def test_a_checkpoint_without_config_needs_one(tmp_path):
  config = make_config("unused")
  path = save(tmp_path / "converted", random_variables(config, 0))
  with pytest.raises(UserError, match=r"records no config .*name one: "
                                      r"config='configs/g2c_sd\.py' in fada_jax\.load"):
    fada_jax.load(path)
  model = fada_jax.load(path, config=config)  # a ConfigDict
  assert model.predict(np.zeros((40, 70, 3), np.uint8)).shape == (40, 70)
  # A config file (ResNet-101 by default) that the tiny checkpoint does not fit.
  with pytest.raises(UserError, match=r"is a resnet18 but config\.model\.arch=resnet101"):
    fada_jax.load(path, config=str(REPO / "configs" / "g2c_src.py"))
  with pytest.raises(UserError, match="config file not found"):
    fada_jax.load(path, config="configs/nope.py")
  with pytest.raises(UserError, match=r"image 0: expected uint8 RGB \[H, W, 3\], got float32"):
    model.predict(np.zeros((4, 4, 3), np.float32))
