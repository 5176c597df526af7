"""Images cross to the device as uint8 and are normalised there: the same values as the
host normalisation (transforms.normalize), in the steps and in the Predictor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fada_jax import config_lib, evaluate, models
from fada_jax.data import transforms
from fada_jax.errors import UserError
from fada_jax.train import state as state_lib
from fada_jax.train import steps

EPS32 = np.finfo(np.float32).eps


def _pixels(shape, seed=0):
  images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  images.reshape(-1, 3)[:2] = [[0, 0, 0], [255, 255, 255]]  # both ends of the range
  return images


def _host(images, mode):
  return np.stack([transforms.normalize(image, mode) for image in images])


def _rounding_bound(images, mode):
  """A few float32 roundings of the two-term affine map, elementwise (a fused
  multiply-add on the device rounds once where numpy rounds twice)."""
  scale, offset, bgr = transforms._affine(mode)  # pylint: disable=protected-access
  x = images[..., ::-1] if bgr else images
  return 4 * EPS32 * (np.abs(x * scale) + np.abs(offset))


@pytest.mark.parametrize("mode", ["imagenet", "caffe"])
def test_device_normalisation_equals_the_host_one(mode):
  images = _pixels((3, 17, 23, 3))
  expected = _host(images, mode)
  got = jax.jit(transforms.normalize_on_device, static_argnums=1)(images, mode)
  assert got.dtype == jnp.float32 and got.shape == images.shape
  assert np.all(np.abs(np.asarray(got) - expected) <= _rounding_bound(images, mode))
  # In the compute dtype: float32 first, then one rounding to bfloat16.
  half = jax.jit(transforms.normalize_on_device, static_argnums=(1, 2))(images, mode,
                                                                        "bfloat16")
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), expected, rtol=2.0**-8, atol=0)
  # Normalised floats are network input already: unchanged.
  np.testing.assert_array_equal(np.asarray(transforms.normalize_on_device(expected, mode)),
                                expected)


def test_the_mode_comes_from_the_config_and_a_bad_one_is_a_user_error():
  assert transforms.normalization_mode(config_lib.make_config("g2c", "source_only",
                                                              "vgg16")) == "caffe"
  config = config_lib.make_config("g2c", "source_only", "resnet101")
  assert transforms.normalization_mode(config) == "imagenet"
  config.data.normalization = "bgr"
  with pytest.raises(UserError, match=r"config.data.normalization='bgr'"):
    transforms.normalization_mode(config)


def _tiny_config(stage, normalization):
  config = config_lib.make_config("g2c", stage, "resnet18")
  config.model.width = 4
  config.model.num_classes = 5
  config.data.normalization = normalization
  config.solver.batch_size = 4
  return config


def test_the_step_normalises_uint8_batches_as_the_host_did():
  """Stage 2 (both image keys), Caffe mode picked from the config: a uint8 batch gives
  the step of the host-normalised float batch."""
  config = _tiny_config("adversarial", "caffe")
  network = models.build(config)
  variables = models.init_variables(network, jax.random.PRNGKey(0), config)
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(1))
  step = jax.jit(steps.make_step(config, network, state, matmul_convs=False))
  rng = np.random.default_rng(0)
  pixels = {"source_image": _pixels((2, 24, 32, 3), 1),
            "source_label": rng.integers(0, 5, (2, 24, 32)).astype(np.uint8),
            "target_image": _pixels((2, 16, 24, 3), 2)}
  host = dict(pixels, source_image=_host(pixels["source_image"], "caffe"),
              target_image=_host(pixels["target_image"], "caffe"))
  got_state, got = step(state, pixels)
  want_state, want = step(state, host)
  for name in want:
    assert float(got[name]) == pytest.approx(float(want[name]), rel=1e-5, abs=1e-6), name
  moved = jax.tree_util.tree_map(lambda new, old: np.abs(np.asarray(new - old)).max(),
                                 want_state.params, state.params)
  differ = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a - b)).max(),
                                  got_state.params, want_state.params)
  # The updates agree to a small fraction of their own size.
  assert max(jax.tree_util.tree_leaves(differ)) <= 1e-4 * max(jax.tree_util.tree_leaves(moved))
  # A wrong mode would be far off: the test can fail.
  wrong = dict(host, source_image=_host(pixels["source_image"], "imagenet"),
               target_image=_host(pixels["target_image"], "imagenet"))
  assert float(step(state, wrong)[1]["loss_seg"]) != pytest.approx(float(got["loss_seg"]),
                                                                   rel=1e-3)


def test_predictor_normalises_before_multi_scale_resizing():
  """uint8 images: the scores of the host-normalised images, with flip and two scales
  (the normalised image is what gets resized, as in the release)."""
  config = _tiny_config("source_only", "imagenet")
  variables = models.init_variables(models.build(config), jax.random.PRNGKey(3), config)
  predictor = evaluate.Predictor(
      config, settings=evaluate.InferenceSettings(flip=True, scales=(0.75, 1.0)))
  placed = predictor.place_variables(variables)
  pixels = _pixels((4, 24, 40, 3), 4)
  scores = jax.jit(predictor.scores, static_argnums=2)
  got = np.asarray(scores(placed, pixels, (30, 50)))
  want = np.asarray(scores(placed, _host(pixels, "imagenet"), (30, 50)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  predictions = predictor.predict(placed, pixels[:3], (30, 50))  # padded to the devices
  assert predictions.shape == (3, 30, 50) and predictions.dtype == np.uint8
  assert np.mean(predictions == np.argmax(got[:3], -1)) > 0.999
