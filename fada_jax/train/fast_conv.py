"""Convolution whose weight gradient is computed as matrix products (for XLA:CPU).

XLA differentiates a convolution's kernel by another convolution in which the batch and
spatial axes of the activations play the role of the window: an [N, H, W, C] x
[N, H, W, O] contraction down to a tiny [KH, KW, C, O] output. XLA:CPU runs these
through its generic convolution path with almost no parallelism over that tiny output
(and, for strided or dilated kernels, through a naive emitted loop), several times slower
than the forward convolutions and slow to compile. Written per kernel tap,

  dW[kh, kw] = sum_{n,i,j} x_pad[n, i*s + kh*d, j*s + kw*d, :]^T g[n, i, j, :]

it is KH*KW ordinary matrix products of [N*OH*OW, C]^T x [N*OH*OW, O], which XLA:CPU
runs on its tuned, multi-threaded GEMM. The forward pass and the input gradient are left
to XLA. The result equals the convolution's gradient up to float summation order.

`conv_general_dilated` has lax's signature, so a flax `nn.Conv` can use it
(`nn.Conv(..., conv_general_dilated=conv_general_dilated)`); `use_dot_weight_grads()`
installs it in every `nn.Conv` called inside the context without touching the networks.
"""

import contextlib
import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fada_jax.models import layers

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_plain_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nhwc(x, kernel, strides, padding, rhs_dilation, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=rhs_dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, kernel, strides, padding, rhs_dilation, precision):
  return _conv_nhwc(x, kernel, strides, padding, rhs_dilation, precision), (x, kernel)


def _conv_bwd(strides, padding, rhs_dilation, precision, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(
      lambda inputs: lax.conv_general_dilated(
          inputs, kernel, strides, padding, rhs_dilation=rhs_dilation,
          dimension_numbers=_NHWC, precision=precision), x)
  (grad_x,) = input_vjp(grad)
  return grad_x, _kernel_grad(x, grad, kernel.shape, strides, padding, rhs_dilation,
                              precision).astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_fwd, _conv_bwd)


def _kernel_grad(x, grad, kernel_shape, strides, padding, rhs_dilation, precision):
  """dW by matrix products, in whichever of two layouts copies less data.

  Stride 1 with fewer output than input channels: the gradient shifted once per tap and
  stacked, G = [rows, KH*KW*O], and one product x^T G. Otherwise one product per tap,
  g^T x_tap, over the tap's strided window of the padded input.
  """
  kh_size, kw_size, channels, features = kernel_shape
  sh, sw = strides
  dh, dw = rhs_dilation
  (pt, pb), (pl, pr) = padding
  batch, out_h, out_w, _ = grad.shape
  if (sh, sw) == (1, 1) and features < channels:
    # G_t[q] = g[q + pad - offset_t] (zero outside): dW_t = sum_q x[q] G_t[q].
    ah, aw = (kh_size - 1) * dh + pt + pb, (kw_size - 1) * dw + pl + pr
    grad_padded = jnp.pad(grad, ((0, 0), (ah, ah), (aw, aw), (0, 0)))
    height, width = x.shape[1:3]
    shifted = [lax.slice(grad_padded, (0, ah + pt - kh * dh, aw + pl - kw * dw, 0),
                         (batch, ah + pt - kh * dh + height, aw + pl - kw * dw + width,
                          features))
               for kh in range(kh_size) for kw in range(kw_size)]
    stacked = jnp.concatenate(shifted, axis=-1).reshape(-1, kh_size * kw_size * features)
    product = jnp.dot(x.reshape(-1, channels).T, stacked, precision=precision)
    return product.reshape(channels, kh_size, kw_size, features).transpose(1, 2, 0, 3)
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
  taps = []
  for kh in range(kh_size):
    for kw in range(kw_size):
      patch = lax.slice(x, (0, kh * dh, kw * dw, 0),
                        (batch, kh * dh + (out_h - 1) * sh + 1,
                         kw * dw + (out_w - 1) * sw + 1, channels),
                        (1, sh, sw, 1))
      taps.append(lax.dot_general(grad, patch, dims, precision=precision).T)
  return jnp.stack(taps).reshape(kernel_shape)


# With this few output channels (and many more input channels) a k x k conv's own
# kernels use the machine poorly (the ASPP classifier's and the discriminator heads' K),
# and one product with all taps side by side does better, forward and backward.
_NARROW_FEATURES = 64


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` as matrix products where XLA:CPU's convolutions are slow.

  Plain NHWC/HWIO convs (explicit padding, no input dilation, no groups): 1x1 convs and
  narrow stride-1 convs become products outright; any other gets lax's forward and input
  gradient and a matmul kernel gradient. Anything else goes to lax as is.
  """
  plain = (_is_plain_nhwc(dimension_numbers) and not isinstance(padding, str)
           and (lhs_dilation is None or all(d == 1 for d in lhs_dilation))
           and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None and lhs.ndim == 4)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  kh_size, kw_size, channels, features = rhs.shape
  if (kh_size, kw_size) == (1, 1) and pads == ((0, 0), (0, 0)):
    return layers.conv_1x1_as_product(lhs, rhs, strides, precision)
  same = all(lo == hi == d * (k // 2) for (lo, hi), d, k in
             zip(pads, dilation, (kh_size, kw_size)))
  if (features <= _NARROW_FEATURES and channels >= 4 * features and strides == (1, 1)
      and same and kh_size % 2 and kw_size % 2):
    return layers.conv_narrow_as_product(lhs, rhs, pads, dilation, precision)
  return _conv_nhwc(lhs, rhs, strides, pads, dilation, precision)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != '__call__' or type(module) is not nn.Conv
      or module.conv_general_dilated is not None or module.is_initializing()
      or not module.has_variable('params', 'kernel')):
    return next_fun(*args, **kwargs)
  replacement = module.clone(parent=None, conv_general_dilated=conv_general_dilated)
  return replacement.apply({'params': module.variables['params']}, *args, **kwargs)


@contextlib.contextmanager
def use_dot_weight_grads(enabled: bool = True):
  """Every flax `nn.Conv` applied inside the context differentiates its kernel by matmuls."""
  if not enabled:
    yield
    return
  with nn.intercept_methods(_interceptor):
    yield


def default_enabled() -> bool:
  """Worth it where XLA's convolution weight gradients are slow: the CPU backend."""
  return jax.default_backend() == 'cpu'

