"""Colour jitter and resizing on the device (config.data.resize_on_device): PIL's pixels,
bit for bit, against the host transforms, per frame and through the training batches."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from fada_jax.data import device_augment
from fada_jax.data import pil_exact
from fada_jax.data import pipeline
from fada_jax.data import synthetic
from fada_jax.data import transforms
from fada_jax.train import loop
from fada_jax.train import parallel

from test_pipeline import _config, write_data

RELEASE_JITTER = (0.5, 0.5, 0.5, 0.2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return write_data(tmp_path_factory.mktemp("data"))


@functools.lru_cache(maxsize=1)
def _tables():
  return tuple(jax.device_put(t) for t in pil_exact.hsv_tables())


_apply = jax.jit(device_augment.apply_plans)


def _on_device(image, size, canvas, params):
  plan = pil_exact.plan_example(image, size, canvas, params)
  canvases = plan.pop("image")[None]
  plans = {name: value[None] for name, value in plan.items()}
  return np.asarray(_apply(canvases, plans, *_tables()))[0]


def _on_host(image, size, strengths, seed):
  jittered = transforms.color_jitter(image, strengths, np.random.default_rng(seed))
  return transforms.resize_image(jittered, size)


def _frame(kind, height, width, seed):
  if kind == "noise":
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  return synthetic.render_frame("source", "train", seed, 0, (width, height))[0]


# (frame height, width), training size (w, h), canvas (w, h): shrinking by the GTA5 and
# Cityscapes ratios, a frame smaller than the canvas, one larger (resized on the host),
# growing, one axis unchanged.
CASES = [
    ((105, 191), (128, 72), (191, 105)),
    ((100, 180), (128, 72), (191, 105)),
    ((120, 200), (128, 72), (191, 105)),
    ((64, 128), (64, 32), (128, 64)),
    ((30, 50), (96, 40), (96, 40)),
    ((40, 96), (96, 24), (96, 40)),
]


@pytest.mark.parametrize("frame, size, canvas", CASES)
@pytest.mark.parametrize("kind", ["noise", "scene"])
def test_plans_give_the_host_transforms_pixels(frame, size, canvas, kind):
  for seed in range(3):
    image = _frame(kind, *frame, seed)
    params = transforms.sample_jitter(RELEASE_JITTER, np.random.default_rng(seed))
    np.testing.assert_array_equal(_on_device(image, size, canvas, params),
                                  _on_host(image, size, RELEASE_JITTER, seed))


@pytest.mark.parametrize("strengths", [
    (0.0, 0.0, 0.0, 0.0),       # resize only
    (0.0, 0.0, 0.0, 0.5),       # hue alone, the widest shift
    (0.9, 0.9, 0.9, 0.0),       # factors up to 1.9: blends past 255 that PIL clips
    (0.5, 0.0, 0.5, 0.2),       # an op left out
])
def test_every_jitter_setting_gives_the_host_pixels(strengths):
  for seed in range(4):
    image = _frame("scene", 90, 160, seed)
    rng = np.random.default_rng(seed)
    params = transforms.sample_jitter(strengths, rng) if any(strengths) else None
    np.testing.assert_array_equal(_on_device(image, (64, 36), (160, 90), params),
                                  _on_host(image, (64, 36), strengths, seed))


def test_gta5_frames_at_the_paper_size():
  # GTA5's 1914x1052 -> 1280x720: 7 taps across, 7 down, one full-size jittered frame.
  image = _frame("scene", 1052, 1914, 0)
  params = transforms.sample_jitter(RELEASE_JITTER, np.random.default_rng(5))
  np.testing.assert_array_equal(_on_device(image, (1280, 720), (1914, 1052), params),
                                _on_host(image, (1280, 720), RELEASE_JITTER, 5))


def test_too_few_taps_is_refused():
  assert pil_exact.taps(1914, 1280) == 7
  with pytest.raises(ValueError, match="needs 7 taps"):
    pil_exact.resize_weights(1914, 1280, 5)


def _read_and_finish(config, mesh, steps):
  """(the host batches, the step's batches) of the first `steps` steps."""
  iterator = loop._StageBatches(config)
  transfer = loop._batch_transfer(config, mesh)
  try:
    host = [next(iterator) for _ in range(steps)]
  finally:
    iterator.close()
  return host, [jax.device_get(transfer(batch)) for batch in host]


@pytest.mark.parametrize("stage", ["adversarial", "source_only", "self_distill"])
def test_training_batches_are_the_host_batches(data_root, stage):
  # Two devices; stage 2's plans come through a reading process (grain's shared memory).
  mesh = parallel.make_mesh(jax.devices()[:2])
  config = _config(data_root, stage, batch=4, workers=0)
  config.data.resize_on_device = "off"
  _, expected = _read_and_finish(config, mesh, steps=4)
  config.data.resize_on_device = "on"
  config.data.workers = 1 if stage == "adversarial" else 0
  host, got = _read_and_finish(config, mesh, steps=4)
  image_key = "source_image" if stage == "adversarial" else "image"
  frame = (32, 64) if stage == "self_distill" else (26, 48)  # Cityscapes / GTA5
  assert host[0][image_key].shape[1:] == (*frame, 3)  # full frames on the canvas
  for want, have in zip(expected, got):
    assert set(have) == set(want)
    for key in want:
      np.testing.assert_array_equal(have[key], want[key], err_msg=key)


def _scale_crop(transform, image, label, seed):
  return transform({"image": image, "label": label}, np.random.default_rng(seed))


# Frame (height, width), crop (w, h), scale range: crops inside the scaled frame, crops
# of a frame scaled below the crop size (padding on one or both axes), enlarging.
SCALE_CROP_CASES = [((72, 128), (64, 32), (0.5, 1.5)),
                    ((72, 128), (96, 60), (0.5, 1.0)),
                    ((40, 60), (48, 24), (1.2, 1.8))]


@pytest.mark.parametrize("frame, crop, scale_range", SCALE_CROP_CASES)
def test_stage3_plans_give_the_host_crops(frame, crop, scale_range):
  host = pipeline.ScaleCropTransform(crop, scale_range, True, RELEASE_JITTER)
  device = dataclasses.replace(host, canvas=(frame[1], frame[0]))
  for seed in range(6):  # both flips among them
    image, label = synthetic.render_frame("target", "train", seed, 0, (frame[1], frame[0]))
    want_image, want_label = _scale_crop(host, image, label, seed)
    plan, got_label = _scale_crop(device, image, label, seed)
    canvases = plan.pop("image")[None]
    got = np.asarray(_apply(canvases, {k: v[None] for k, v in plan.items()}, *_tables()))[0]
    np.testing.assert_array_equal(got, want_image)
    np.testing.assert_array_equal(got_label, want_label)


def test_stage3_frames_beyond_the_canvas_or_its_taps_are_cropped_on_the_host():
  host = pipeline.ScaleCropTransform((32, 16), (0.3, 0.305), True, RELEASE_JITTER)
  device = dataclasses.replace(host, canvas=(64, 36))
  # Larger than the canvas; 13 columns scaled to 3, more taps than 64 scaled to 19 need.
  for size, seed in (((40, 80), 0), ((20, 13), 1)):
    image, label = synthetic.render_frame("target", "train", seed, 0, (size[1], size[0]))
    plan, _ = _scale_crop(device, image, label, seed)
    assert plan["frame_size"].tolist() == [16, 32]  # the host's crop, left as it is
    canvases = plan.pop("image")[None]
    got = np.asarray(_apply(canvases, {k: v[None] for k, v in plan.items()}, *_tables()))[0]
    np.testing.assert_array_equal(got, _scale_crop(host, image, label, seed)[0])
