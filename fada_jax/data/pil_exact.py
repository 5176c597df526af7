"""The host half of resizing and colour-jittering frames on the device, exactly as PIL does.

A training frame can cross to the device whole, on a fixed-size uint8 canvas, with a
small plan of what to do to it; `device_augment.apply_plans` then gives the pixels that
the host path gives (stages 1-2: `transforms.color_jitter`, then `resize_image`; stage 3:
jitter, flip, random scale, padded random crop), bit for bit, without its ~150 ms of
PIL work per GTA5 frame in the reading process:
- Brightness, contrast and saturation are PIL blends of two uint8 values with a float
  factor (of 0, of the grey mean, of each pixel's grey value). A 256x256 table of PIL's
  own `Image.blend` gives every such blend.
- Hue goes through PIL's 8-bit HSV. Two tables over all 2^24 colours, made by PIL's own
  conversions, give both directions.
- The bicubic resize is PIL's two passes (horizontal first), each a sum of uint8 taps
  times 22-bit fixed-point weights. The weights are computed here with the double
  arithmetic of Pillow's Resample.c, in its order. A crop keeps the rows and columns of
  the resize it needs (padding gets no weight: 0, PIL's pad value), a flip reverses the
  columns it reads.

Numpy and PIL only: this runs in the reading processes, which import no JAX.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from fada_jax.data import transforms

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2
BICUBIC_SUPPORT = 2.0
# Blend kinds of a plan's slots; a slot of kind NONE leaves the image as it is.
NONE, BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2, 3
_KIND_OF_OP = {0: BRIGHTNESS, 1: CONTRAST, 2: SATURATION}  # JitterParams.order codes
NO_HUE = -1
# The device sums a frame's grey values in int32 (contrast's mean): larger frames are
# done on the host.
MAX_FRAME_PIXELS = (2**31 - 1) // 255
# A planned batch holds each plan array next to its image key K, as 'K:name'.
PLAN_SEPARATOR = ":"


def plan_key(image_key: str, name: str) -> str:
  return f"{image_key}{PLAN_SEPARATOR}{name}"


def stack_plans(plans: list[dict[str, np.ndarray]], image_key: str = "image") -> dict:
  """Per-example plans -> batch arrays: the canvases under image_key, the rest as
  'image_key:name'."""
  return {image_key if name == "image" else plan_key(image_key, name):
          np.stack([plan[name] for plan in plans]) for name in plans[0]}


def _bicubic(x: np.ndarray) -> np.ndarray:
  # Pillow's bicubic_filter (a = -0.5), each expression in its order of operations.
  a = -0.5
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def taps(in_size: int, out_size: int) -> int:
  """The number of weights per output pixel PIL's bicubic resize uses (its ksize)."""
  scale = max(float(in_size) / out_size, 1.0)
  return int(np.ceil(BICUBIC_SUPPORT * scale)) * 2 + 1


@functools.lru_cache(maxsize=32)
def resize_weights(in_size: int, out_size: int, num_taps: int) -> tuple[np.ndarray, np.ndarray]:
  """PIL's bicubic resampling of one axis, in_size -> out_size, as (index, weight).

  Both int32 [out_size, num_taps]: output pixel i is
  clip8((sum_t input[index[i, t]] * weight[i, t] + 2^21) >> 22). Taps past PIL's own
  count have weight 0 (and a valid index). `num_taps` >= `taps(in_size, out_size)`.
  """
  needed = taps(in_size, out_size)
  if num_taps < needed:
    raise ValueError(f"resizing {in_size} -> {out_size} needs {needed} taps, got {num_taps}")
  scale = float(in_size) / out_size
  filterscale = max(scale, 1.0)
  support = BICUBIC_SUPPORT * filterscale
  inv_filterscale = 1.0 / filterscale
  center = (np.arange(out_size) + 0.5) * scale
  first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): toward 0
  count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
  offsets = np.arange(num_taps)
  used = offsets[None, :] < count[:, None]
  position = first[:, None] + offsets[None, :]
  weight = np.where(used, _bicubic((position - center[:, None] + 0.5) * inv_filterscale), 0.0)
  total = np.zeros(out_size)
  for t in range(num_taps):  # PIL sums left to right; numpy's sum would pair terms up
    total = total + weight[:, t]
  weight = np.where(total[:, None] != 0.0, weight / np.where(total == 0.0, 1.0, total)[:, None],
                    weight)
  scaled = weight * float(1 << PRECISION_BITS)
  fixed = np.where(weight < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled))
  index = np.where(used, position, 0)
  return index.astype(np.int32), fixed.astype(np.int32)


@functools.lru_cache(maxsize=32)
def identity_weights(size: int, num_taps: int) -> tuple[np.ndarray, np.ndarray]:
  """(index, weight) that leave an axis of `size` pixels as it is."""
  index = np.zeros((size, num_taps), np.int32)
  index[:, 0] = np.arange(size)
  weight = np.zeros((size, num_taps), np.int32)
  weight[:, 0] = 1 << PRECISION_BITS
  return index, weight


_FIRST = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
_SECOND = np.ascontiguousarray(_FIRST.T)


def blend_table(factor: float) -> np.ndarray:
  """uint8 [256, 256]: [a, b] = PIL's Image.blend of value a with value b at `factor`."""
  return np.asarray(Image.blend(Image.fromarray(_FIRST), Image.fromarray(_SECOND),
                                float(factor)))


def _pack(data: bytes) -> np.ndarray:
  """Raw 3-channel pixels -> int32 (c0 << 16) | (c1 << 8) | c2 (a big-endian word)."""
  words = np.zeros((len(data) // 3, 4), np.uint8)
  words[:, 1:] = np.frombuffer(data, np.uint8).reshape(-1, 3)
  return words.view(">u4").reshape(-1).astype(np.int32)


@functools.lru_cache(maxsize=1)
def hsv_tables() -> tuple[np.ndarray, np.ndarray]:
  """(RGB -> HSV, HSV -> RGB) of PIL's 8-bit conversions, int32 [2^24] each.

  Index and value pack three channels as (c0 << 16) | (c1 << 8) | c2.
  """
  # Every colour once, in the order of its packed value: the low 3 bytes of 0 .. 2^24 - 1.
  every = np.arange(1 << 24, dtype=">u4").view(np.uint8).reshape(-1, 4)[:, 1:]
  triples = np.ascontiguousarray(every).reshape(4096, 4096, 3)
  to_hsv = Image.fromarray(triples, "RGB").convert("HSV").tobytes()
  to_rgb = Image.frombytes("HSV", (4096, 4096), triples.tobytes()).convert("RGB").tobytes()
  return _pack(to_hsv), _pack(to_rgb)


def jitter_plan(params: transforms.JitterParams | None) -> dict[str, np.ndarray]:
  """A jitter draw as a plan: blend slots before the hue, the hue shift, slots after.

  'blend_before' / 'blend_after' int32 [3] (kinds, NONE where unused), 'hue_shift' int32
  (NO_HUE: no hue op), 'blend_tables' uint8 [3, 256, 256] (brightness, contrast,
  saturation; the table of an unused op is never read).
  """
  before, after = [], []
  tables = np.zeros((3, 256, 256), np.uint8)
  hue_shift = NO_HUE
  if params is not None:
    factors = (params.brightness, params.contrast, params.saturation)
    slots = before
    for op in params.order:
      if op == 3:
        if params.hue is not None:
          hue_shift = transforms.hue_shift_of(params.hue)
          slots = after
        continue
      if factors[op] is not None:
        slots.append(_KIND_OF_OP[op])
        tables[op] = blend_table(factors[op])
  pad = lambda kinds: np.array(kinds + [NONE] * (3 - len(kinds)), np.int32)
  return {"blend_before": pad(before), "blend_after": pad(after),
          "hue_shift": np.array(hue_shift, np.int32), "blend_tables": tables}


def canvas_taps(canvas: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
  """(taps across, taps down) for frames up to `canvas` (width, height) resized to `size`."""
  return taps(canvas[0], size[0]), taps(canvas[1], size[1])


def _plan(image: np.ndarray, canvas: tuple[int, int], frame_size: tuple[int, int],
          columns, rows, params: transforms.JitterParams | None) -> dict[str, np.ndarray]:
  canvas_width, canvas_height = canvas
  frame_height, frame_width = frame_size
  if image.shape[:2] != (canvas_height, canvas_width):
    placed = np.zeros((canvas_height, canvas_width, 3), np.uint8)
    placed[:image.shape[0], :image.shape[1]] = image
    image = placed
  plan = {"image": np.ascontiguousarray(image),
          "frame_size": np.array([frame_height, frame_width], np.int32),
          "columns": columns[0], "column_weights": columns[1],
          "rows": rows[0], "row_weights": rows[1]}
  plan.update(jitter_plan(params))
  return plan


def _as_is(image: np.ndarray, canvas: tuple[int, int], num_taps: tuple[int, int]):
  """A plan that leaves an image (the host's result, at the output size) as it is."""
  height, width = image.shape[:2]
  return _plan(image, canvas, (height, width), identity_weights(width, num_taps[0]),
               identity_weights(height, num_taps[1]), None)


def _fits(image: np.ndarray, canvas: tuple[int, int], scaled: tuple[int, int],
          num_taps: tuple[int, int]) -> bool:
  height, width = image.shape[:2]
  return (width <= canvas[0] and height <= canvas[1] and height * width <= MAX_FRAME_PIXELS
          and taps(width, scaled[0]) <= num_taps[0] and taps(height, scaled[1]) <= num_taps[1])


def plan_example(image: np.ndarray, size: tuple[int, int], canvas: tuple[int, int],
                 params: transforms.JitterParams | None) -> dict[str, np.ndarray]:
  """Stages 1-2: one frame on the canvas with the plan that jitters (params, or None) and
  resizes it to `size`, as `color_jitter` and `resize_image` do.

  `canvas` and `size` are (width, height), canvas >= size. A frame larger than the canvas
  is jittered and resized here (on the host, the same pixels) and crosses as the result,
  with a plan that leaves it as it is.
  """
  num_taps = canvas_taps(canvas, size)
  if not _fits(image, canvas, size, num_taps):
    if params is not None:
      image = transforms.apply_jitter(image, params)
    return _as_is(transforms.resize_image(image, size), canvas, num_taps)
  height, width = image.shape[:2]
  return _plan(image, canvas, (height, width), resize_weights(width, size[0], num_taps[0]),
               resize_weights(height, size[1], num_taps[1]), params)


def _cropped(weights: tuple[np.ndarray, np.ndarray], start: int, count: int, size: int):
  """Rows start .. start + count of a resize's (index, weight); rows outside 0 .. size
  (the crop's padding) get no weight, which gives PIL's pad value 0."""
  position = start + np.arange(count)
  inside = (position >= 0) & (position < size)
  row = np.clip(position, 0, size - 1)
  return weights[0][row], np.where(inside[:, None], weights[1][row], 0).astype(np.int32)


def plan_scale_crop(image: np.ndarray, canvas: tuple[int, int], crop_size: tuple[int, int],
                    min_scale: float, params: transforms.JitterParams | None, flipped: bool,
                    scaled: tuple[int, int], top: int, left: int) -> dict[str, np.ndarray]:
  """Stage 3: the plan of the release's jitter, flip, random scale and padded random crop
  (`ScaleCropTransform`), from its draws: the frame scaled to `scaled` (width, height),
  padded as `pad_for_crop` pads, cropped at (top, left).

  The crop's rows and columns are those rows and columns of PIL's resize (a flip reads
  the frame's columns in reverse). A frame larger than the canvas, or scaled down by more
  than the canvas at `min_scale` needs taps for, is done on the host.
  """
  crop_width, crop_height = crop_size
  num_taps = (taps(canvas[0], max(1, int(canvas[0] * min_scale))),
              taps(canvas[1], max(1, int(canvas[1] * min_scale))))
  if not _fits(image, canvas, scaled, num_taps):
    if params is not None:
      image = transforms.apply_jitter(image, params)
    return _as_is(transforms.flip_scale_crop(image, crop_size, flipped, scaled, top, left),
                  canvas, num_taps)
  pad_y, pad_x = transforms.crop_padding(scaled[1], scaled[0], crop_size)
  height, width = image.shape[:2]
  columns = _cropped(resize_weights(width, scaled[0], num_taps[0]), left - pad_x, crop_width,
                     scaled[0])
  if flipped:
    columns = (width - 1 - columns[0], columns[1])
  rows = _cropped(resize_weights(height, scaled[1], num_taps[1]), top - pad_y, crop_height,
                  scaled[1])
  return _plan(image, canvas, (height, width), columns, rows, params)
