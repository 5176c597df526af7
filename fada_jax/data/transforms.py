"""The release's training and test transforms as pure functions of numpy arrays.

Images are uint8 [H, W, 3] RGB, labels uint8 [H, W] train ids (255 = ignore). Randomness
comes only from the `np.random.Generator` passed in, so a transform is reproducible from
(seed, example index) whichever process applies it. Sizes are (width, height), as in the
config.

Geometry follows torchvision on PIL images: bicubic image / nearest label resizing, random
scale `lo + (hi - lo) * U` of the full image with `int()` sizes, random crop that first pads
BOTH sides of a too-small dimension by the missing amount (image 0, label 255), horizontal
flip. Colour jitter follows torchvision's ColorJitter on PIL images: brightness, contrast
and saturation factors uniform in [max(0, 1 - s), 1 + s] applied with PIL's ImageEnhance,
a hue shift uniform in [-h, h] (of a full turn) applied to PIL's 8-bit HSV hue channel,
the four in a random order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance

from fada_jax.constants import IGNORE_LABEL

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)

_RAMP = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (3, 1)).T[None])


def _size(size: Sequence[int]) -> tuple[int, int]:
  width, height = (int(v) for v in size)
  return width, height


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bicubic resize (PIL) of uint8 [H, W, 3] to (width, height)."""
  width, height = _size(size)
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def resize_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize (PIL) of a label map to (width, height)."""
  width, height = _size(size)
  if label.shape[:2] == (height, width):
    return label
  return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


def draw_scaled_size(height: int, width: int, scale_range: Sequence[float],
                     rng: np.random.Generator) -> tuple[int, int]:
  """(width, height) of a frame scaled by one factor uniform in scale_range (truncated)."""
  low, high = float(scale_range[0]), float(scale_range[1])
  scale = low + (high - low) * rng.random()
  return int(width * scale), int(height * scale)


def random_scale(image: np.ndarray, label: np.ndarray, scale_range: Sequence[float],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Rescales both by one factor uniform in scale_range (sizes truncated to int)."""
  size = draw_scaled_size(*image.shape[:2], scale_range, rng)
  return resize_image(image, size), resize_label(label, size)


def crop_padding(height: int, width: int, crop_size: Sequence[int]) -> tuple[int, int]:
  """(pad_y, pad_x): torchvision's pad_if_needed gives a dimension short by d d on both
  sides."""
  crop_width, crop_height = _size(crop_size)
  return max(0, crop_height - height), max(0, crop_width - width)


def _pad(array: np.ndarray, pad_y: int, pad_x: int, value: int) -> np.ndarray:
  if pad_x == 0 and pad_y == 0:
    return array
  pads = ((pad_y, pad_y), (pad_x, pad_x)) + ((0, 0),) * (array.ndim - 2)
  return np.pad(array, pads, constant_values=value)


def pad_for_crop(image: np.ndarray, label: np.ndarray,
                 crop_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """torchvision's pad_if_needed: image with 0, label with 255."""
  pad_y, pad_x = crop_padding(*image.shape[:2], crop_size)
  return _pad(image, pad_y, pad_x, 0), _pad(label, pad_y, pad_x, IGNORE_LABEL)


def draw_crop_offset(height: int, width: int, crop_size: Sequence[int],
                     rng: np.random.Generator) -> tuple[int, int]:
  """(top, left) of a crop of (width, height) crop_size in a frame of height x width,
  after `pad_for_crop`'s padding, which `height` and `width` include."""
  crop_width, crop_height = _size(crop_size)
  top = int(rng.integers(0, height - crop_height + 1))
  left = int(rng.integers(0, width - crop_width + 1))
  return top, left


def random_crop(image: np.ndarray, label: np.ndarray, crop_size: Sequence[int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Pads when needed, then crops (width, height) at a uniform integer offset."""
  crop_width, crop_height = _size(crop_size)
  image, label = pad_for_crop(image, label, crop_size)
  top, left = draw_crop_offset(*image.shape[:2], crop_size, rng)
  return (image[top:top + crop_height, left:left + crop_width],
          label[top:top + crop_height, left:left + crop_width])


def draw_flip_scale_crop(height: int, width: int, flip: bool, scale_range: Sequence[float],
                         crop_size: Sequence[int], rng: np.random.Generator
                         ) -> tuple[bool, tuple[int, int], int, int]:
  """The draws of `random_flip` (if `flip`), `random_scale` and `random_crop`, in that
  order, for a frame of height x width: (flipped, scaled (width, height), top, left)."""
  flipped = flip and draw_flip(rng)
  scaled = draw_scaled_size(height, width, scale_range, rng)
  pad_y, pad_x = crop_padding(scaled[1], scaled[0], crop_size)
  top, left = draw_crop_offset(scaled[1] + 2 * pad_y, scaled[0] + 2 * pad_x, crop_size, rng)
  return flipped, scaled, top, left


def flip_scale_crop(array: np.ndarray, crop_size: Sequence[int], flipped: bool,
                    scaled: Sequence[int], top: int, left: int,
                    is_label: bool = False) -> np.ndarray:
  """What `random_flip`, `random_scale` and `random_crop` make of an image (or label)
  with the draws of `draw_flip_scale_crop`."""
  if flipped:
    array = array[:, ::-1]
  array = (resize_label if is_label else resize_image)(np.ascontiguousarray(array), scaled)
  array = _pad(array, *crop_padding(*array.shape[:2], crop_size),
               IGNORE_LABEL if is_label else 0)
  crop_width, crop_height = _size(crop_size)
  return np.ascontiguousarray(array[top:top + crop_height, left:left + crop_width])


def draw_flip(rng: np.random.Generator, probability: float = 0.5) -> bool:
  return bool(rng.random() < probability)


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                probability: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Horizontal flip of both with the given probability."""
  if draw_flip(rng, probability):
    return image[:, ::-1], label[:, ::-1]
  return image, label


# ----------------------------------------------------------------------------- colour


@dataclasses.dataclass(frozen=True)
class JitterParams:
  """One draw of ColorJitter: op order (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
  order: tuple[int, ...]
  brightness: float | None
  contrast: float | None
  saturation: float | None
  hue: float | None


def _factor_range(strength: float) -> tuple[float, float] | None:
  strength = float(strength)
  if strength < 0:
    raise ValueError(f"colour jitter strength must be >= 0, got {strength}")
  if strength == 0:
    return None  # torchvision: a zero strength disables the op.
  return max(0.0, 1.0 - strength), 1.0 + strength


def sample_jitter(strengths: Sequence[float], rng: np.random.Generator) -> JitterParams:
  """Draws the permutation and factors as torchvision's ColorJitter.get_params does."""
  brightness, contrast, saturation, hue = (float(s) for s in strengths)
  if hue > 0.5:
    raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
  order = tuple(int(i) for i in rng.permutation(4))
  factors = []
  for strength in (brightness, contrast, saturation):
    bounds = _factor_range(strength)
    factors.append(None if bounds is None else float(rng.uniform(*bounds)))
  hue_factor = float(rng.uniform(-hue, hue)) if hue > 0 else None
  return JitterParams(order, *factors, hue_factor)


def _lut_image(image: Image.Image, enhancer_on_ramp) -> Image.Image:
  # Brightness and contrast blend every channel value with a constant: a per-value map.
  # Applying PIL's own blend to the 256 values and using the result as a lookup table
  # gives PIL's exact output at a fraction of the cost of blending the whole image.
  lut = np.asarray(enhancer_on_ramp(_RAMP))[0, :, 0]
  return image.point(np.tile(lut, 3).tolist())


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
  return _lut_image(image, lambda ramp: ImageEnhance.Brightness(ramp).enhance(factor))


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
  # ImageEnhance.Contrast blends with the rounded mean of the greyscale image.
  grey = image.convert("L")
  mean = int(np.asarray(grey.histogram(), np.float64) @ np.arange(256) / (
      grey.size[0] * grey.size[1]) + 0.5)
  degenerate = Image.new("RGB", _RAMP.size, (mean, mean, mean))
  return _lut_image(image, lambda ramp: Image.blend(degenerate, ramp, factor))


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Color(image).enhance(factor)


def hue_shift_of(hue_factor: float) -> int:
  """torchvision's hue step on PIL's 8-bit hue: np.uint8 of the truncated factor * 255."""
  return int(hue_factor * 255) % 256


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision's PIL hue shift: through HSV, adding the shift (wrapping) to h.

  (Tabulating PIL's conversions over all 2^24 colours was tried: on real frames, with
  many distinct colours, the random gathers into the 64 MB tables cost as much as the
  conversions.)
  """
  shift = hue_shift_of(hue_factor)
  # One table for the three bands (h shifted, s and v unchanged): the result of shifting
  # the split-off h band and merging, without the split and merge copies.
  table = [(value + shift) % 256 for value in range(256)] + list(range(256)) * 2
  return image.convert("HSV").point(table).convert("RGB")


def jitter_pil(image: Image.Image, params: JitterParams) -> Image.Image:
  """Applies a JitterParams draw to an RGB PIL image."""
  for op in params.order:
    if op == 0 and params.brightness is not None:
      image = adjust_brightness(image, params.brightness)
    elif op == 1 and params.contrast is not None:
      image = adjust_contrast(image, params.contrast)
    elif op == 2 and params.saturation is not None:
      image = adjust_saturation(image, params.saturation)
    elif op == 3 and params.hue is not None:
      image = adjust_hue(image, params.hue)
  return image


def apply_jitter(image: np.ndarray, params: JitterParams) -> np.ndarray:
  """Applies a JitterParams draw to uint8 [H, W, 3] RGB."""
  return np.asarray(jitter_pil(Image.fromarray(image), params))


def color_jitter(image: np.ndarray, strengths: Sequence[float],
                 rng: np.random.Generator) -> np.ndarray:
  """torchvision ColorJitter(*strengths) on uint8 RGB; all-zero strengths: unchanged."""
  if not any(float(s) for s in strengths):
    return image
  return apply_jitter(image, sample_jitter(strengths, rng))


def resize_and_jitter(image: np.ndarray, size: Sequence[int], strengths: Sequence[float],
                      rng: np.random.Generator) -> np.ndarray:
  """`color_jitter(resize_image(image, size), ...)` without leaving PIL in between."""
  width, height = _size(size)
  pil = Image.fromarray(image)
  if image.shape[:2] != (height, width):
    pil = pil.resize((width, height), Image.BICUBIC)
  if any(float(s) for s in strengths):
    pil = jitter_pil(pil, sample_jitter(strengths, rng))
  return np.asarray(pil)


# ----------------------------------------------------------------------------- normalise
# Batches cross to the device as uint8 (a quarter of float32's bytes); the step functions
# and the Predictor normalise on the device with `normalize_on_device`. `normalize` is the
# same map on the host, the reference the device version is tested against.

NORMALIZATIONS = ("imagenet", "caffe")


def normalization_mode(config) -> str:
  """The network's input normalisation, config.data.normalization: 'imagenet' (ResNet) or
  'caffe' (VGG-16). The one place that reads it."""
  mode = str(config.data.normalization)
  if mode not in NORMALIZATIONS:
    from fada_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError(f"config.data.normalization={mode!r} is not one of "
                    f"{', '.join(NORMALIZATIONS)}")
  return mode


def _affine(mode: str) -> tuple[np.ndarray, np.ndarray, bool]:
  """(per-channel scale, per-channel offset, swap RGB to BGR first) of a mode, float32."""
  if mode == "imagenet":
    return 1.0 / (255.0 * IMAGENET_STD), -IMAGENET_MEAN / IMAGENET_STD, False
  if mode == "caffe":
    return np.ones(3, np.float32), -CAFFE_BGR_MEAN, True
  raise ValueError(f"unknown normalization {mode!r}; expected 'imagenet' or 'caffe'")


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
  """uint8 RGB -> float32 network input, on the host.

  'imagenet': RGB / 255, minus mean, over std (ResNet). 'caffe': BGR in 0..255 minus the
  Caffe channel means (VGG-16).
  """
  height, width = image.shape[:2]
  scale, offset, bgr = _affine(mode)
  source = image
  if bgr:
    # PIL swaps channels in C; a numpy [..., ::-1] copy runs length-3 strided loops.
    source = np.asarray(Image.merge("RGB", Image.fromarray(image).split()[::-1]))
  # Per-channel constants repeated along a whole row: numpy then runs long contiguous
  # inner loops instead of length-3 ones (several times faster).
  out = np.array(source, dtype=np.float32, order="C").reshape(height, width * 3)
  out *= np.tile(scale.astype(np.float32), width)
  out += np.tile(offset.astype(np.float32), width)
  return out.reshape(height, width, 3)


def normalize_on_device(images, mode: str, dtype=None):
  """uint8 RGB [..., 3] -> network input, traced (jit) on the device: `normalize`'s map.

  Computed in float32 with `normalize`'s constants, then cast to `dtype` (the network's
  compute dtype; default float32). Floating-point `images` are taken as network input
  already (parity tests feed normalised floats) and only cast.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (grain workers need no jax)
  dtype = jnp.float32 if dtype is None else jnp.dtype(dtype)
  if images.dtype != jnp.uint8:
    return images.astype(dtype)
  scale, offset, bgr = _affine(mode)
  x = images.astype(jnp.float32)
  if bgr:
    x = x[..., ::-1]
  return (x * jnp.asarray(scale, jnp.float32) + jnp.asarray(offset, jnp.float32)).astype(dtype)
