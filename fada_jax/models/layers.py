"""Shared building blocks: batch norm (frozen or trainable), torch-style inits, resize."""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch.


def compute_dtype(dtype: Dtype) -> jnp.dtype:
  """Accepts 'float32' / 'bfloat16' strings from the config as well as jnp dtypes."""
  return jnp.dtype(dtype)


def torch_default_uniform(fan_in: int):
  """torch's default Conv2d init for weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  (kaiming_uniform with a=sqrt(5) reduces to the same bound for the weights.)
  """
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1,
         padding: Optional[int] = None, use_bias: bool, dtype: Dtype, name: str,
         kernel_init=None, bias_init=None, in_features: Optional[int] = None) -> nn.Conv:
  """A torch-semantics Conv2d in NHWC: explicit symmetric padding (default `dilation`
  for 3x3, 0 for 1x1), HWIO kernel, float32 params, `dtype` compute."""
  if padding is None:
    padding = dilation * (kernel // 2)
  if kernel_init is None or (use_bias and bias_init is None):
    if in_features is None:
      raise ValueError("in_features is needed for torch's default init")
    default = torch_default_uniform(in_features * kernel * kernel)
    kernel_init = kernel_init or default
    bias_init = bias_init or default
  kwargs = dict(bias_init=bias_init) if use_bias else {}
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 kernel_dilation=(dilation, dilation), use_bias=use_bias,
                 dtype=compute_dtype(dtype), param_dtype=jnp.float32,
                 kernel_init=kernel_init, name=name, **kwargs)


class BatchNorm(nn.Module):
  """Batch norm over the channel (last) axis with torch's variables and semantics.

  Variables: params {'scale', 'bias'} (torch weight, bias) and batch_stats {'mean', 'var'}
  (torch running_mean, running_var), whatever the mode.

  frozen=True: the release's FrozenBatchNorm2d, an affine map with fixed statistics and
  NO epsilon: y = x * s + (bias - mean * s), s = scale * rsqrt(var). scale and bias are
  wrapped in stop_gradient so no gradient reaches them.
  frozen=False: ordinary batch norm (eps 1e-5). When `use_running_average` is False the
  batch statistics are used (reduced over `axis_name` when given, like SyncBatchNorm) and
  the running statistics are updated with momentum 0.9, the variance with the unbiased
  batch variance as torch does.
  """
  use_running_average: bool = True
  frozen: bool = True
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean",
                                 lambda: jnp.zeros((channels,), jnp.float32))
    running_var = self.variable("batch_stats", "var",
                                lambda: jnp.ones((channels,), jnp.float32))
    dtype = compute_dtype(self.dtype)

    if self.frozen:
      scale = jax.lax.stop_gradient(scale)
      bias = jax.lax.stop_gradient(bias)
      multiplier = scale * jax.lax.rsqrt(running_var.value)
      shift = bias - running_mean.value * multiplier
      return x.astype(dtype) * multiplier.astype(dtype) + shift.astype(dtype)

    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      # Statistics in float32 whatever the compute dtype; two passes for accuracy.
      x32 = x.astype(jnp.float32)
      reduce_axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=reduce_axes)
      count = np.prod([x.shape[a] for a in reduce_axes])
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased_var = var * (count / jnp.maximum(count - 1, 1))
        running_mean.value = (BN_MOMENTUM * running_mean.value
                              + (1.0 - BN_MOMENTUM) * mean)
        running_var.value = (BN_MOMENTUM * running_var.value
                             + (1.0 - BN_MOMENTUM) * unbiased_var)
    multiplier = scale * jax.lax.rsqrt(var + BN_EPSILON)
    shift = bias - mean * multiplier
    return x.astype(dtype) * multiplier.astype(dtype) + shift.astype(dtype)


@functools.lru_cache(maxsize=256)
def _align_corners_taps(in_size: int, out_size: int):
  """Source indices (lo, hi) and their weights for each output position, as torch's
  bilinear align_corners=True computes them (source = dst * (in-1)/(out-1); 0 if out==1)."""
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = np.arange(out_size, dtype=np.float64) * scale
  lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  weight_hi = (src - lo).astype(np.float32)
  weight_lo = np.float32(1.0) - weight_hi
  return lo, hi, weight_lo, weight_hi


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  lo, hi, weight_lo, weight_hi = _align_corners_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  x_lo = jnp.take(x, jnp.asarray(lo), axis=axis, indices_are_sorted=True, mode="clip")
  x_hi = jnp.take(x, jnp.asarray(hi), axis=axis, indices_are_sorted=True, mode="clip")
  # torch's formula: w_lo * x[lo] + w_hi * x[hi].
  return (x_lo * jnp.asarray(weight_lo, x.dtype).reshape(shape)
          + x_hi * jnp.asarray(weight_hi, x.dtype).reshape(shape))


def resize_bilinear_align_corners(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """Bilinear resize of NHWC `x` to `out_hw` = (height, width) with torch's
  F.interpolate(mode='bilinear', align_corners=True) semantics.

  Separable: two gathers + lerp per axis, so the cost is linear in the output size (no
  dense interpolation matrices; this runs on 19 x 1024 x 2048 logits). Height first,
  while the tensor is still narrow.
  """
  out_h, out_w = int(out_hw[0]), int(out_hw[1])
  if x.ndim != 4:
    raise ValueError(f"expected NHWC, got shape {x.shape}")
  if x.shape[1] != out_h:
    x = _resize_axis(x, 1, out_h)
  if x.shape[2] != out_w:
    x = _resize_axis(x, 2, out_w)
  return x


def as_float32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)
