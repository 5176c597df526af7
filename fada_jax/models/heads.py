"""DeepLab-v2 ASPP classifier and FADA's fine-grained (pixel-wise, 2K-way) discriminator."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fada_jax.models import layers

Dtype = Any

ASPP_DILATIONS = (6, 12, 18, 24)


class ASPPClassifier(nn.Module):
  """Four parallel 3x3 convs (dilation = padding = 6, 12, 18, 24, with bias) summed.

  Weights N(0, 0.01), biases torch's default uniform init. Output at feature resolution,
  float32."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    dtype = layers.compute_dtype(self.dtype)
    features = features.astype(dtype)
    in_channels = features.shape[-1]
    out = None
    for i, dilation in enumerate(ASPP_DILATIONS):
      branch = layers.conv(self.num_classes, 3, dilation=dilation, padding=dilation,
                           use_bias=True, dtype=dtype, name=f"conv_{i}",
                           kernel_init=nn.initializers.normal(0.01),
                           in_features=in_channels)(features)
      out = branch if out is None else out + branch
    return layers.as_float32(out)


class FineGrainedDiscriminator(nn.Module):
  """3x3 conv -> 256, LeakyReLU(0.2), 3x3 conv -> 128, LeakyReLU(0.2), then two 3x3 heads
  to K channels (source, target), concatenated source first: 2K channels, float32."""
  num_classes: int
  hidden: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    dtype = layers.compute_dtype(self.dtype)
    x = features.astype(dtype)

    def conv3x3(channels, name, inputs):
      return layers.conv(channels, 3, use_bias=True, dtype=dtype, name=name,
                         in_features=inputs.shape[-1])(inputs)

    x = nn.leaky_relu(conv3x3(self.hidden, "conv1", x), 0.2)
    x = nn.leaky_relu(conv3x3(self.hidden // 2, "conv2", x), 0.2)
    source = conv3x3(self.num_classes, "cls_source", x)
    target = conv3x3(self.num_classes, "cls_target", x)
    return layers.as_float32(jnp.concatenate([source, target], axis=-1))
