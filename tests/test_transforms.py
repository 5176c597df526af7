"""Transforms against straightforward reference computations (PIL, numpy)."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from fada_jax.data import transforms as T


def _image(height=40, width=60, seed=0):
  rng = np.random.default_rng(seed)
  smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize(
      (width, height), Image.BILINEAR)).astype(np.int16)
  noisy = smooth + rng.integers(-20, 21, smooth.shape)
  return np.clip(noisy, 0, 255).astype(np.uint8)


def _label(height=40, width=60, seed=0):
  return np.random.default_rng(seed).integers(0, 19, (height, width)).astype(np.uint8)


def test_resize_matches_pil_bicubic_and_nearest():
  image, label = _image(), _label()
  expected = np.asarray(Image.fromarray(image).resize((33, 17), Image.BICUBIC))
  np.testing.assert_array_equal(T.resize_image(image, (33, 17)), expected)
  resized = T.resize_label(label, (33, 17))
  assert resized.shape == (17, 33)
  np.testing.assert_array_equal(resized,
                                np.asarray(Image.fromarray(label).resize((33, 17), Image.NEAREST)))
  assert set(np.unique(resized)) <= set(np.unique(label))  # nearest never invents classes


def test_random_scale_uses_one_uniform_factor_in_range():
  image, label = _image(), _label()
  scales = []
  for seed in range(200):
    scaled_image, scaled_label = T.random_scale(image, label, (0.5, 1.5),
                                                np.random.default_rng(seed))
    scale = 0.5 + 1.0 * np.random.default_rng(seed).random()
    assert scaled_image.shape[:2] == (int(40 * scale), int(60 * scale))
    assert scaled_label.shape == scaled_image.shape[:2]
    scales.append(scale)
  assert 0.5 <= min(scales) < 0.6 and 1.4 < max(scales) <= 1.5


def test_random_crop_pads_both_sides_and_covers_every_offset():
  image, label = _image(20, 30), _label(20, 30)
  crop = (40, 16)  # wider than the image: 10 columns of padding on each side
  tops, lefts = set(), set()
  for seed in range(400):
    out_image, out_label = T.random_crop(image, label, crop, np.random.default_rng(seed))
    assert out_image.shape == (16, 40, 3) and out_label.shape == (16, 40)
    padded_image = np.zeros((20, 50, 3), np.uint8)
    padded_image[:, 10:40] = image
    padded_label = np.full((20, 50), 255, np.uint8)
    padded_label[:, 10:40] = label
    rng = np.random.default_rng(seed)
    top, left = int(rng.integers(0, 5)), int(rng.integers(0, 11))
    np.testing.assert_array_equal(out_image, padded_image[top:top + 16, left:left + 40])
    np.testing.assert_array_equal(out_label, padded_label[top:top + 16, left:left + 40])
    tops.add(top)
    lefts.add(left)
  assert tops == set(range(5)) and lefts == set(range(11))  # inclusive bounds, as randint


def test_random_crop_of_exact_size_is_identity():
  image, label = _image(16, 40), _label(16, 40)
  out_image, out_label = T.random_crop(image, label, (40, 16), np.random.default_rng(0))
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)


def test_flip_probability_and_content():
  image, label = _image(), _label()
  flips = 0
  for seed in range(400):
    out_image, out_label = T.random_flip(image, label, np.random.default_rng(seed))
    if np.array_equal(out_image, image):
      np.testing.assert_array_equal(out_label, label)
    else:
      np.testing.assert_array_equal(out_image, image[:, ::-1])
      np.testing.assert_array_equal(out_label, label[:, ::-1])
      flips += 1
  assert 160 < flips < 240


def test_jitter_parameter_ranges_and_orders():
  draws = [T.sample_jitter((0.5, 0.3, 1.5, 0.2), np.random.default_rng(seed))
           for seed in range(3000)]
  brightness = np.array([d.brightness for d in draws])
  contrast = np.array([d.contrast for d in draws])
  saturation = np.array([d.saturation for d in draws])
  hue = np.array([d.hue for d in draws])
  for values, low, high in ((brightness, 0.5, 1.5), (contrast, 0.7, 1.3), (saturation, 0.0, 2.5),
                            (hue, -0.2, 0.2)):
    assert low <= values.min() < low + 0.02 and high - 0.02 < values.max() <= high
    assert abs(values.mean() - (low + high) / 2) < 0.03 * (high - low)
  assert {d.order for d in draws} == set(itertools.permutations(range(4)))
  off = T.sample_jitter((0.0, 0.4, 0.0, 0.0), np.random.default_rng(0))
  assert off.brightness is None and off.saturation is None and off.hue is None
  assert off.contrast is not None
  image = _image()
  np.testing.assert_array_equal(T.color_jitter(image, (0, 0, 0, 0), np.random.default_rng(0)),
                                image)


@pytest.mark.parametrize("factor", [0.0, 0.37, 1.0, 1.5])
def test_brightness_and_contrast_equal_imageenhance(factor):
  pil = Image.fromarray(_image())
  np.testing.assert_array_equal(np.asarray(T.adjust_brightness(pil, factor)),
                                np.asarray(ImageEnhance.Brightness(pil).enhance(factor)))
  np.testing.assert_array_equal(np.asarray(T.adjust_contrast(pil, factor)),
                                np.asarray(ImageEnhance.Contrast(pil).enhance(factor)))


def _reference_hue(pil, hue_factor):
  # torchvision.transforms.functional_pil.adjust_hue, written out.
  h, s, v = pil.convert("HSV").split()
  np_h = np.array(h, dtype=np.uint8)
  np_h = (np_h.astype(np.int64) + int(hue_factor * 255)) % 256
  return Image.merge("HSV", (Image.fromarray(np_h.astype(np.uint8), "L"), s, v)).convert("RGB")


@pytest.mark.parametrize("hue_factor", [-0.5, -0.2, -0.013, 0.0, 0.07, 0.2, 0.5])
def test_hue_shift_equals_torchvision_pil_path(hue_factor):
  rng = np.random.default_rng(1)
  image = np.concatenate([_image(30, 64), rng.integers(0, 256, (30, 64, 3), dtype=np.uint8)])
  pil = Image.fromarray(image)
  expected = np.asarray(_reference_hue(pil, hue_factor))
  np.testing.assert_array_equal(np.asarray(T.adjust_hue(pil, hue_factor)), expected)


def test_jitter_applies_the_four_ops_in_the_drawn_order():
  image = _image()
  for seed in range(6):
    params = T.sample_jitter((0.5, 0.5, 0.5, 0.2), np.random.default_rng(seed))
    pil = Image.fromarray(image)
    for op in params.order:
      if op == 0:
        pil = ImageEnhance.Brightness(pil).enhance(params.brightness)
      elif op == 1:
        pil = ImageEnhance.Contrast(pil).enhance(params.contrast)
      elif op == 2:
        pil = ImageEnhance.Color(pil).enhance(params.saturation)
      else:
        pil = _reference_hue(pil, params.hue)
    np.testing.assert_array_equal(T.apply_jitter(image, params), np.asarray(pil))
    np.testing.assert_array_equal(
        T.color_jitter(image, (0.5, 0.5, 0.5, 0.2), np.random.default_rng(seed)),
        np.asarray(pil))
    big = np.asarray(Image.fromarray(image).resize((90, 70), Image.BICUBIC))
    np.testing.assert_array_equal(
        T.resize_and_jitter(big, (60, 40), (0.5, 0.5, 0.5, 0.2), np.random.default_rng(seed)),
        T.color_jitter(T.resize_image(big, (60, 40)), (0.5, 0.5, 0.5, 0.2),
                       np.random.default_rng(seed)))


def test_normalization():
  image = _image()
  imagenet = T.normalize(image, "imagenet")
  assert imagenet.dtype == np.float32 and imagenet.shape == image.shape
  expected = (image / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(imagenet, expected, rtol=0, atol=2e-6)
  caffe = T.normalize(image, "caffe")
  np.testing.assert_allclose(caffe, image[..., ::-1] - np.array([103.939, 116.779, 123.68]),
                             rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="bgr"):
    T.normalize(image, "bgr")
