"""The device half of training-frame colour jitter, resizing and cropping: plans
(`pil_exact`) applied.

Integer arithmetic and table lookups only, so every backend gives PIL's pixels exactly
(the tests compare with the host path bit for bit). A batch read with
`config.data.resize_on_device` holds, next to each full-size image key K ('image',
'source_image', 'target_image'), the plan's arrays under 'K:plan_name'; `finish_batch`
returns the batch with K at the training size (stage 3: the crop size) and the plan
keys gone, so the step functions see the batch they always see.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fada_jax.data import pil_exact

PLAN_KEYS = ("frame_size", "columns", "column_weights", "rows", "row_weights",
             "blend_before", "blend_after", "hue_shift", "blend_tables")


def _luma(pixels):
  # PIL's RGB -> L: (19595 r + 38470 g + 7471 b + 2^15) >> 16.
  return (pixels[..., 0] * 19595 + pixels[..., 1] * 38470 + pixels[..., 2] * 7471
          + 0x8000) >> 16


def _blend(pixels, kind, tables, frame_size):
  """One brightness / contrast / saturation op of kind `kind` (NONE: unchanged)."""
  luma = _luma(pixels)
  height, width = frame_size[0], frame_size[1]
  inside = ((jnp.arange(pixels.shape[0]) < height)[:, None]
            & (jnp.arange(pixels.shape[1]) < width)[None, :])
  # ImageEnhance.Contrast blends with int(mean grey + 0.5) of the frame (not the canvas):
  # floor(total / n + 1/2) in integers.
  total = jnp.sum(jnp.where(inside, luma, 0))
  count = height * width
  mean = total // count + (2 * (total % count) >= count).astype(jnp.int32)
  anchor = jnp.where(kind == pil_exact.SATURATION, luma,
                     jnp.where(kind == pil_exact.CONTRAST, mean, 0))
  table = tables[jnp.clip(kind - 1, 0, 2)].reshape(-1).astype(jnp.int32)
  blended = table[anchor[..., None] * 256 + pixels]
  return jnp.where(kind == pil_exact.NONE, pixels, blended)


def _hue(pixels, shift, rgb_to_hsv, hsv_to_rgb):
  """torchvision's PIL hue op: add `shift` (mod 256) to PIL's 8-bit HSV hue."""
  code = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
  hsv = rgb_to_hsv[code]
  hue = ((hsv >> 16) + shift) & 255
  rgb = hsv_to_rgb[(hue << 16) | (hsv & 0xFFFF)]
  shifted = jnp.stack([(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255], axis=-1)
  return jnp.where(shift == pil_exact.NO_HUE, pixels, shifted)


def _resample(pixels, index, weight, axis: int):
  """One pass of PIL's fixed-point resampling along `axis` (0 rows, 1 columns)."""
  total = jnp.int32(1 << (pil_exact.PRECISION_BITS - 1))
  for tap in range(index.shape[1]):
    taken = jnp.take(pixels, index[:, tap], axis=axis, mode="clip")
    scale = weight[:, tap][:, None, None] if axis == 0 else weight[:, tap][None, :, None]
    total = total + taken * scale
  return jnp.clip(total >> pil_exact.PRECISION_BITS, 0, 255)


def apply_plan(image, plan: Mapping[str, Any], rgb_to_hsv, hsv_to_rgb):
  """uint8 [H, W, 3] canvas + one frame's plan -> uint8 [h, w, 3] at the training size."""
  pixels = image.astype(jnp.int32)
  frame_size, tables = plan["frame_size"], plan["blend_tables"]
  for slot in range(3):
    pixels = _blend(pixels, plan["blend_before"][slot], tables, frame_size)
  pixels = _hue(pixels, plan["hue_shift"], rgb_to_hsv, hsv_to_rgb)
  for slot in range(3):
    pixels = _blend(pixels, plan["blend_after"][slot], tables, frame_size)
  pixels = _resample(pixels, plan["columns"], plan["column_weights"], axis=1)
  pixels = _resample(pixels, plan["rows"], plan["row_weights"], axis=0)
  return pixels.astype(jnp.uint8)


def apply_plans(images, plans: Mapping[str, Any], rgb_to_hsv, hsv_to_rgb):
  """`apply_plan` over a batch: uint8 [B, H, W, 3] and plans with a leading B axis."""
  return jax.vmap(apply_plan, in_axes=(0, 0, None, None))(images, dict(plans), rgb_to_hsv,
                                                           hsv_to_rgb)


def has_plans(batch: Mapping[str, Any]) -> bool:
  return any(pil_exact.PLAN_SEPARATOR in key for key in batch)


def finish_batch(batch: Mapping[str, Any], rgb_to_hsv, hsv_to_rgb) -> dict[str, Any]:
  """The batch with every planned image jittered and resized (traceable)."""
  out = {key: value for key, value in batch.items() if pil_exact.PLAN_SEPARATOR not in key}
  for key in out:
    if pil_exact.plan_key(key, PLAN_KEYS[0]) in batch:
      plans = {name: batch[pil_exact.plan_key(key, name)] for name in PLAN_KEYS}
      out[key] = apply_plans(batch[key], plans, rgb_to_hsv, hsv_to_rgb)
  return out
