"""The convolution dispatcher: each rule's form equals the convolution, values and
gradients, and the backend decides whether the rules apply.

The reference is torch's float64 convolution and its autograd. Each float32 (bfloat16)
result must lie within the worst-case rounding bound of a sum of n products in any order,
|error| <= (c + n) * u * (|x| conv |w|), elementwise: the same convolution of the absolute
values bounds the cancellation, so the tolerance follows the conditioning of each entry,
not a figure that passed once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fada_jax import config_lib, models
from fada_jax.errors import UserError
from fada_jax.models import conv_dispatch
from fada_jax.train import state as state_lib, steps

NHWC = ('NHWC', 'HWIO', 'NHWC')
F32_UNIT = 2.0 ** -24
BF16_UNIT = 2.0 ** -8


def _torch_conv(x, w, cotangent, stride, padding, dilation):
  """float64 value, input and kernel gradients of sum(conv(x, w) * cotangent), NHWC."""
  x = torch.tensor(np.transpose(x, (0, 3, 1, 2)), dtype=torch.float64, requires_grad=True)
  w = torch.tensor(np.transpose(w, (3, 2, 0, 1)), dtype=torch.float64, requires_grad=True)
  (top, bottom), (left, right) = padding
  y = F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=stride, dilation=dilation)
  cot = torch.tensor(np.transpose(cotangent, (0, 3, 1, 2)), dtype=torch.float64)
  grad_x, grad_w = torch.autograd.grad((y * cot).sum(), (x, w))
  return (np.transpose(y.detach().numpy(), (0, 2, 3, 1)),
          np.transpose(grad_x.numpy(), (0, 2, 3, 1)),
          np.transpose(grad_w.numpy(), (2, 3, 1, 0)))


# (kernel, stride, dilation, padding, channels, features, image hw, rule)
CASES = {
    '1x1 strided (downsample)': (1, 2, 1, ((0, 0), (0, 0)), 16, 32, (13, 17),
                                 conv_dispatch.PRODUCT_1X1),
    '1x1 (bottleneck)': (1, 1, 1, 'VALID', 32, 8, (13, 17), conv_dispatch.PRODUCT_1X1),
    '7x7/2 stem': (7, 2, 1, ((3, 3), (3, 3)), 3, 8, (29, 35), conv_dispatch.CONVOLUTION),
    '3x3/2': (3, 2, 1, ((1, 1), (1, 1)), 6, 7, (13, 17), conv_dispatch.CONVOLUTION),
    '3x3 dilated 2': (3, 1, 2, ((2, 2), (2, 2)), 8, 8, (13, 17),
                      conv_dispatch.CONV_MATMUL_KERNEL_GRAD),
    '3x3 dilated 2, narrowing': (3, 1, 2, ((2, 2), (2, 2)), 12, 8, (13, 17),
                                 conv_dispatch.CONV_MATMUL_KERNEL_GRAD),
    # More outputs than inputs: XLA's convolution.
    '3x3 dilated 2, widening': (3, 1, 2, ((2, 2), (2, 2)), 6, 12, (13, 17),
                                conv_dispatch.CONVOLUTION),
    '3x3 dilated 4, odd padding': (3, 1, 4, ((4, 1), (0, 5)), 40, 20, (13, 17),
                                   conv_dispatch.CONV_MATMUL_KERNEL_GRAD),
    'ASPP 3x3 dilated 6': (3, 1, 6, ((6, 6), (6, 6)), 40, 5, (13, 17),
                           conv_dispatch.PRODUCT_TAPS),
    'ASPP 3x3 dilated 12': (3, 1, 12, ((12, 12), (12, 12)), 40, 5, (13, 17),
                            conv_dispatch.PRODUCT_TAPS),
    'ASPP 3x3 dilated 18': (3, 1, 18, ((18, 18), (18, 18)), 40, 5, (13, 17),
                            conv_dispatch.PRODUCT_TAPS),
    'ASPP 3x3 dilated 24': (3, 1, 24, ((24, 24), (24, 24)), 40, 5, (13, 29),
                            conv_dispatch.PRODUCT_TAPS),
    'discriminator 3x3': (3, 1, 1, ((1, 1), (1, 1)), 64, 16, (9, 11),
                          conv_dispatch.PRODUCT_TAPS),
}


@pytest.mark.parametrize('name', list(CASES))
def test_dispatched_conv_matches_the_convolution(name):
  kernel, stride, dilation, padding, channels, features, (height, width), rule = CASES[name]
  pads = ((0, 0), (0, 0)) if padding == 'VALID' else padding
  assert conv_dispatch.conv_rule((kernel, kernel, channels, features), (stride, stride),
                                 pads, (dilation, dilation)) == rule
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, height, width, channels)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, channels, features)).astype(np.float32)
  args = dict(window_strides=(stride, stride), padding=padding,
              rhs_dilation=(dilation, dilation), dimension_numbers=NHWC)
  out_shape = jax.eval_shape(
      lambda: jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), **args)).shape
  cotangent = rng.standard_normal(out_shape).astype(np.float32)

  exact = _torch_conv(x, w, cotangent, stride, pads, dilation)
  magnitude = _torch_conv(np.abs(x), np.abs(w), np.abs(cotangent), stride, pads, dilation)
  # Terms per entry: the value and the input gradient sum over kernel taps x channels
  # (x features), the kernel gradient over batch x output positions.
  terms = (kernel * kernel * channels, kernel * kernel * features,
           2 * out_shape[1] * out_shape[2])

  def loss(conv, x, w, cotangent):
    y = conv(x, w, **args)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y

  def value_and_grads(conv, dtype):
    grads, y = jax.jit(jax.grad(functools.partial(loss, conv), (0, 1), has_aux=True))(
        jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(cotangent))
    return (y,) + grads

  for dtype, unit, extra in ((jnp.float32, F32_UNIT, 2),
                             (jnp.bfloat16, BF16_UNIT, kernel * kernel + 3)):
    got = value_and_grads(conv_dispatch.conv_general_dilated, dtype)
    for what, result, want, bound, n in zip(('value', 'input grad', 'kernel grad'), got,
                                            exact, magnitude, terms):
      assert result.dtype == dtype, (name, what)
      if dtype == jnp.bfloat16:
        # Inputs rounded to bfloat16 (2 units per product), products summed in float32
        # or better, bfloat16 partial results of the taps summed (KH*KW roundings).
        tolerance = (extra * unit + n * F32_UNIT) * bound
      else:
        tolerance = (extra + n) * unit * bound
      error = np.abs(np.asarray(result, np.float64) - want)
      assert np.all(error <= tolerance), (name, what, dtype, float(np.max(error / bound)))
    if dtype == jnp.float32:
      # The check can fail: a one-tap shift of the kernel breaks it.
      shifted = np.roll(np.asarray(got[0], np.float64), 1, axis=2)
      assert not np.all(np.abs(shifted - exact[0]) <= (extra + terms[0]) * unit * magnitude[0])


@pytest.mark.parametrize('backend,expected', [
    ('cpu', True), ('gpu', False), ('cuda', False), ('rocm', False), ('tpu', False)])
def test_auto_uses_products_on_cpu_only(backend, expected):
  assert conv_dispatch.matmul_convs_enabled('auto', backend) is expected
  assert conv_dispatch.matmul_convs_enabled(None, backend) is expected
  assert conv_dispatch.matmul_convs_enabled('on', backend) is True
  assert conv_dispatch.matmul_convs_enabled('off', backend) is False


def test_unknown_setting_is_refused():
  with pytest.raises(UserError, match='matmul_convs'):
    conv_dispatch.matmul_convs_enabled('yes', 'cpu')
  config = config_lib.make_config('g2c', 'source_only', 'resnet18')
  config.model.matmul_convs = 'always'
  with pytest.raises(UserError, match=r"config\.model\.matmul_convs='always'"):
    config_lib.validate(config)


def _traced_ops(config, override):
  """(convolutions, matrix products) in the jaxpr of config's training step."""
  network = models.build(config)
  variables = models.init_variables(network, jax.random.PRNGKey(0), config)
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(1))
  step = steps.make_step(config, network, state, override)
  batch = {'image': jnp.zeros((2, 32, 32, 3)), 'label': jnp.zeros((2, 32, 32), jnp.uint8)}
  text = str(jax.make_jaxpr(step)(state, batch))
  return text.count('conv_general_dilated'), text.count('dot_general')


def test_training_follows_the_setting():
  """'auto' on this CPU backend is 'on': the step's 1x1 and narrow convs become products;
  'off' (or matmul_convs=False) leaves every conv to XLA."""
  config = config_lib.make_config('g2c', 'source_only', 'resnet18')
  config.model.width, config.model.num_classes = 4, 5
  counts = {}
  for setting in ('auto', 'on', 'off'):
    config.model.matmul_convs = setting
    counts[setting] = _traced_ops(config, None)
  assert counts['auto'] == counts['on']
  assert counts['on'][0] < counts['off'][0] and counts['on'][1] > counts['off'][1]
  config.model.matmul_convs = 'on'
  assert _traced_ops(config, False) == counts['off']
