"""Convolutions as matrix products or as the backend's convolutions: one dispatcher.

On XLA:CPU (jaxlib 0.10, whose convolutions and products run on YNNPACK), 1x1 and
narrow convolutions run up to 3x faster as matrix products, forward and backward, and the
kernel gradients of stride-1 convolutions as one product per tap 2-3x faster than XLA's
(which computes dW by another convolution in which the batch and spatial axes play the
window, down to a tiny [KH, KW, C, O] output); XLA's own convolution gradients win for
strided and widening convolutions. GPUs and TPUs run convolutions and their gradients on
kernels built for them (cuDNN, XLA:TPU), where the rewrites would only add slices, pads
and copies. So the rewrites below are switched by backend, with one setting:
`config.model.matmul_convs` in {'auto', 'on', 'off'}, 'auto' = on for CPU only.

When on, every flax `nn.Conv` applied inside `use_matmul_convs()` (training and
evaluation alike) goes through `conv_general_dilated`, and `conv_rule` decides per conv:
  - 1x1, no padding (any stride): a strided slice and one product; autodiff gives
    dW = x^T g.
  - stride 1, 'same' padding, few output channels from many more inputs (the ASPP
    classifier's K, the discriminator heads): one product with all taps side by side,
    [rows, C] x [C, KH*KW*O], the tap outputs shifted into place and summed.
  - other stride-1 convs with at most as many outputs as inputs (the backbone's 3x3s):
    XLA's convolution forward and input gradient, and the kernel gradient as one product
    per tap, each reading a contiguous run of the flattened, padded output gradient:
      dW[kh, kw] = sum_{n,i,j} x[n, i, j, :]^T g[n, i - kh*d + pad, j - kw*d + pad, :].
    Without differentiation (evaluation) this is XLA's convolution alone.
  - otherwise (strided, or widening: the stem, VGG's first convs of a stage): XLA's
    convolution and both its gradients, which XLA:CPU runs as YNNPACK convolutions. Their
    kernel gradients as products would be one [C, O] product per tap, over every output
    position, which the product kernels run poorly: the ResNet stem's at 512x256 took
    148 ms against XLA's 9 ms.
Each equals the convolution (and its gradients) up to float summation order.

The same setting gives the programs XLA:CPU options (`compiler_options`): YNNPACK fusions
that take elementwise work (batch norm, residual adds, ReLUs) with the products. Without
them, XLA:CPU's fusion pass duplicates cheap elementwise producers into each consumer, and
along a ResNet stage's residual stream (block k's output feeds block k+1's first conv and
its residual add) every block's output fusion recomputes the whole chain of adds before
it: ResNet-101's 23-block layer3 costs O(23^2) elementwise passes, forward and backward
(about a third of the stage-2 step's CPU time at 512x256). YNNPACK fusions are materialised,
which ends the chains.
"""

import contextlib
import contextvars
import functools
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fada_jax.errors import UserError

SETTINGS = ('auto', 'on', 'off')

PRODUCT_1X1 = '1x1 product'
PRODUCT_TAPS = 'taps product'
CONV_MATMUL_KERNEL_GRAD = 'convolution, matmul kernel gradient'
CONVOLUTION = 'convolution'

# With this few output channels (and at least 4x as many inputs) a k x k conv's own
# kernels use the machine poorly, and one product with all taps side by side does better,
# forward and backward. Fewer inputs make the tap product's [rows, KH*KW*O] output larger
# than the conv's input, where the convolution wins.
_NARROW_FEATURES = 64
_NARROW_INPUT_RATIO = 4

_NHWC = ('NHWC', 'HWIO', 'NHWC')

# Whether the code being traced runs inside `use_matmul_convs(True)`.
_ACTIVE = contextvars.ContextVar('fada_jax_matmul_convs', default=False)


def matmul_convs_enabled(setting: Union[str, bool, None] = 'auto',
                         backend: Optional[str] = None) -> bool:
  """Whether convolutions run as matrix products: 'on' / True, 'off' / False, or
  'auto' / None = on for the CPU backend (`backend`, default `jax.default_backend()`)."""
  if setting is True or setting == 'on':
    return True
  if setting is False or setting == 'off':
    return False
  if setting is None or setting == 'auto':
    return (jax.default_backend() if backend is None else backend) == 'cpu'
  raise UserError(f'matmul_convs={setting!r} is not one of {", ".join(SETTINGS)}')


# XLA:CPU's default YNNPACK fusions are single products and convolutions; adding 'dot'
# and 'eltwise' lets them take the elementwise producers and consumers of a product.
_YNN_FUSION_TYPES = ('LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
                     'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION',
                     'LIBRARY_FUSION_TYPE_DOT', 'LIBRARY_FUSION_TYPE_ELTWISE')
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ','.join(_YNN_FUSION_TYPES)}


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
  """Whether this jaxlib's XLA takes _CPU_OPTIONS (an experimental option that a later
  XLA may rename): one tiny compilation per process."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(
        jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def compiler_options(enabled: bool) -> dict:
  """XLA options for a program built with `use_matmul_convs(enabled)`: with the matrix
  product forms (the CPU), YNNPACK fusions that take elementwise work too (see the
  module docstring); otherwise none, so GPU and TPU programs are unchanged."""
  if not enabled or not _cpu_options_supported():
    return {}
  return dict(_CPU_OPTIONS)


def enabled_for(config, override: Optional[bool] = None) -> bool:
  """`override` if given, else config.model.matmul_convs (default 'auto'), for the
  default backend."""
  if override is not None:
    return bool(override)
  return matmul_convs_enabled(config.model.get('matmul_convs', 'auto'))


def conv_rule(kernel_shape, strides, padding, rhs_dilation) -> str:
  """Which form a plain NHWC/HWIO conv takes: PRODUCT_1X1, PRODUCT_TAPS,
  CONV_MATMUL_KERNEL_GRAD or CONVOLUTION. `padding` is ((top, bottom), (left, right))."""
  kh_size, kw_size, channels, features = kernel_shape
  if (kh_size, kw_size) == (1, 1) and tuple(map(tuple, padding)) == ((0, 0), (0, 0)):
    return PRODUCT_1X1
  same = all(lo == hi == d * (k // 2) for (lo, hi), d, k in
             zip(padding, rhs_dilation, (kh_size, kw_size)))
  if (features <= _NARROW_FEATURES and channels >= _NARROW_INPUT_RATIO * features
      and tuple(strides) == (1, 1) and same and kh_size % 2 and kw_size % 2):
    return PRODUCT_TAPS
  if tuple(strides) == (1, 1) and features <= channels:
    return CONV_MATMUL_KERNEL_GRAD
  return CONVOLUTION


# ----------------------------------------------------------------------------- the forms


def _kept_transpose(a):
  """a^T for a row-major [rows, m], kept as a copy for the products that take it. XLA:CPU
  gives a product that contracts its left operand's leading axis to Eigen, whose thread
  pool then competes with YNNPACK's for the cores; with the transpose kept (an
  optimisation barrier stops XLA folding it into the product) YNNPACK takes it."""
  return lax.optimization_barrier(a.T)


def _transposed_product(a, b, precision):
  """a^T b for row-major [rows, m] and [rows, n], on YNNPACK (`_kept_transpose`)."""
  return jnp.dot(_kept_transpose(a), b, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _product(x, w, precision):
  """x w for [rows, C] and [C, O], its kernel gradient as `_transposed_product`."""
  return jnp.dot(x, w, precision=precision)


def _product_fwd(x, w, precision):
  return _product(x, w, precision), (x, w)


def _product_bwd(precision, residuals, grad):
  x, w = residuals
  return (jnp.dot(grad, w.T, precision=precision).astype(x.dtype),
          _transposed_product(x, grad, precision).astype(w.dtype))


_product.defvjp(_product_fwd, _product_bwd)


def conv_1x1_as_product(x, kernel, strides, precision):
  """A 1x1 conv (no padding) is a strided slice and one product, dW = x^T g."""
  if tuple(strides) != (1, 1):
    x = x[:, ::strides[0], ::strides[1], :]
  channels, features = kernel.shape[-2:]
  out = _product(x.reshape(-1, channels), kernel.reshape(channels, features), precision)
  return out.reshape(*x.shape[:-1], features)


def conv_taps_as_product(x, kernel, padding, rhs_dilation, precision):
  """Stride-1 'same' k x k conv: y[p] = sum_t (x W_t)[p + offset_t], one
  [rows, C] x [C, KH*KW*O] product; its gradients are products of the same shapes."""
  kh_size, kw_size, channels, features = kernel.shape
  batch, height, width, _ = x.shape
  taps = jnp.dot(x, jnp.transpose(kernel, (2, 0, 1, 3)).reshape(
      channels, kh_size * kw_size * features), precision=precision)
  taps = taps.reshape(batch, height, width, kh_size, kw_size, features)
  (pt, pb), (pl, pr) = padding
  taps = jnp.pad(taps, ((0, 0), (pt, pb), (pl, pr), (0, 0), (0, 0), (0, 0)))
  out = None
  for kh in range(kh_size):
    for kw in range(kw_size):
      oy, ox = kh * rhs_dilation[0], kw * rhs_dilation[1]
      tap = taps[:, oy:oy + height, ox:ox + width, kh, kw, :]
      out = tap if out is None else out + tap
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_with_matmul_kernel_grad(x, kernel, strides, padding, rhs_dilation, precision):
  """XLA's NHWC convolution whose kernel gradient is computed by `_kernel_grad`."""
  return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=rhs_dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, kernel, strides, padding, rhs_dilation, precision):
  return (conv_with_matmul_kernel_grad(x, kernel, strides, padding, rhs_dilation, precision),
          (x, kernel))


def _conv_bwd(strides, padding, rhs_dilation, precision, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(
      lambda inputs: lax.conv_general_dilated(
          inputs, kernel, strides, padding, rhs_dilation=rhs_dilation,
          dimension_numbers=_NHWC, precision=precision), x)
  (grad_x,) = input_vjp(grad)
  return grad_x, _kernel_grad(x, grad, kernel.shape, padding, rhs_dilation,
                              precision).astype(kernel.dtype)


conv_with_matmul_kernel_grad.defvjp(_conv_fwd, _conv_bwd)


def _kernel_grad(x, grad, kernel_shape, padding, rhs_dilation, precision):
  """dW of a stride-1 conv with at most as many outputs as inputs, one product per tap
  with no strided copies: x is padded on the right to a common row width, the gradient
  padded with zero rows and columns in that width, and both flattened, so that tap t's
  pairs (x[i, j], g[i + pt - kh*dh, j + pl - kw*dw]) lie a constant distance apart and
      dW[kh, kw] = X^T G[offset_t : offset_t + rows]
  takes a contiguous run of the flattened gradient (zeros where the tap falls outside
  it; x's padding columns are zero, so what they meet adds nothing). Stacking the taps'
  shifted gradients side by side instead (one [rows, KH*KW*O] operand) copies 9 strided
  windows, which cost as much as the products they feed at ResNet-101's layer3 shapes."""
  kh_size, kw_size, channels, features = kernel_shape
  dh, dw = rhs_dilation
  (pt, _), (pl, _) = padding
  batch, height, width, _ = x.shape
  out_height, out_width = grad.shape[1:3]
  # Margins of the gradient: every tap's column j + pl - kw*dw + left stays in one row of
  # `row_width`, and every tap's row i + pt - kh*dh + top in the padded rows.
  left = max(0, (kw_size - 1) * dw - pl)
  row_width = max(width + pl + left, left + out_width)
  top = max(0, (kh_size - 1) * dh - pt)
  # (one more row where the last tap's run ends past its last row's start)
  bottom = max(0, height + pt - out_height + (1 if left + pl else 0))
  grad_rows = top + out_height + bottom
  grad_flat = jnp.pad(grad, ((0, 0), (top, bottom), (left, row_width - left - out_width),
                             (0, 0))).reshape(batch, grad_rows * row_width, features)
  rows = height * row_width
  x_flat = jnp.pad(x, ((0, 0), (0, 0), (0, row_width - width), (0, 0))).reshape(
      batch * rows, channels)
  x_transposed = _kept_transpose(x_flat)  # one transpose serves every tap
  taps = []
  for kh in range(kh_size):
    for kw in range(kw_size):
      offset = (top + pt - kh * dh) * row_width + left + pl - kw * dw
      shifted = lax.slice(grad_flat, (0, offset, 0), (batch, offset + rows, features))
      taps.append(jnp.dot(x_transposed, shifted.reshape(batch * rows, features),
                          precision=precision))
  return jnp.stack(taps).reshape(kh_size, kw_size, channels, features)


# ----------------------------------------------------------------------------- dispatch


def _is_plain_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` in the form `conv_rule` picks.

  Only plain NHWC/HWIO 2-D convs (explicit or 'VALID' padding, no input dilation, no
  groups) are rewritten; anything else goes to lax as is.
  """
  if padding == 'VALID':
    padding = ((0, 0), (0, 0))
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
  rule = conv_rule(rhs.shape, strides, pads, dilation)
  if rule == PRODUCT_1X1:
    return conv_1x1_as_product(lhs, rhs, strides, precision)
  if rule == PRODUCT_TAPS:
    return conv_taps_as_product(lhs, rhs, pads, dilation, precision)
  if rule == CONV_MATMUL_KERNEL_GRAD:
    return conv_with_matmul_kernel_grad(lhs, rhs, strides, pads, dilation, precision)
  return lax.conv_general_dilated(lhs, rhs, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != '__call__' or type(module) is not nn.Conv
      or module.conv_general_dilated is not None or module.is_initializing()
      or not module.has_variable('params', 'kernel')):
    return next_fun(*args, **kwargs)
  replacement = module.clone(parent=None, conv_general_dilated=conv_general_dilated)
  return replacement.apply({'params': module.variables['params']}, *args, **kwargs)


@contextlib.contextmanager
def use_matmul_convs(enabled: bool = True):
  """Every flax `nn.Conv` applied inside the context goes through `conv_general_dilated`
  (the networks are untouched); `enabled=False` leaves them to XLA's convolutions."""
  if not enabled:
    yield
    return
  token = _ACTIVE.set(True)
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _ACTIVE.reset(token)


def active() -> bool:
  """Whether the code being traced runs inside `use_matmul_convs(True)`."""
  return _ACTIVE.get()


def last_axis_sum(x: jax.Array) -> jax.Array:
  """`x.sum(-1)`; inside `use_matmul_convs()` a product with a vector of ones.

  A loss's elementwise product summed over classes and then averaged over pixels becomes
  one full reduction, which XLA:CPU splits into a 32x32x32 reduce-window that its YNNPACK
  fusions run slowly: the stage-2 soft cross-entropy at 512x256 (38 channels) took 118 ms
  forward and backward, against 29 ms as a product. Other backends sum as before.
  """
  if not active():
    return jnp.sum(x, axis=-1)
  return jnp.dot(x, jnp.ones(x.shape[-1:], x.dtype), precision=lax.Precision.HIGHEST)
