"""DeepLab-v2 VGG-16 feature extractor: pool4/pool5 removed, dilated conv5, fc6/fc7 convs."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fada_jax.models import layers

Dtype = Any

OUTPUT_CHANNELS = 1024

# (stage, channels, convs, dilation, pool after the stage)
_STAGES = (
    (1, 64, 2, 1, True),
    (2, 128, 2, 1, True),
    (3, 256, 3, 1, True),
    (4, 512, 3, 1, False),  # pool4 removed
    (5, 512, 3, 2, False),  # pool5 removed; conv5 dilated by 2 (padding 2)
)


class VGGFeatureExtractor(nn.Module):
  """VGG-16 convs conv1_1..conv5_3 (ReLU after each), then fc6 = 3x3 conv 512->1024 and
  fc7 = 3x3 conv 1024->1024, both dilation 4 (padding 4) + ReLU. Stride 8, 1024 channels.
  Max pools are torch's MaxPool2d(2, 2) (floor mode). Returns float32 features."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no batch norm or dropout in the feature extractor
    dtype = layers.compute_dtype(self.dtype)
    x = x.astype(dtype)
    in_channels = x.shape[-1]
    for stage, channels, num_convs, dilation, pool in _STAGES:
      for i in range(num_convs):
        x = layers.conv(channels, 3, dilation=dilation, use_bias=True, dtype=dtype,
                        name=f"conv{stage}_{i + 1}", in_features=in_channels)(x)
        x = nn.relu(x)
        in_channels = channels
      if pool:
        x = layers.max_pool(x, (2, 2), (2, 2), ((0, 0), (0, 0)))
    for name in ("fc6", "fc7"):
      x = layers.conv(OUTPUT_CHANNELS, 3, dilation=4, use_bias=True, dtype=dtype,
                      name=name, in_features=in_channels)(x)
      x = nn.relu(x)
      in_channels = OUTPUT_CHANNELS
    return layers.as_float32(x)
