"""DeepLab-v2 ResNet feature extractor (torchvision layout, output stride 8 by dilation)."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fada_jax.models import layers

Dtype = Any

# depth -> (bottleneck?, blocks per stage)
STAGES = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


def output_channels(depth: int, width: int = 64) -> int:
  bottleneck, _ = STAGES[depth]
  return 8 * width * (4 if bottleneck else 1)


def _conv(features, kernel, name, dtype, stride=1, dilation=1):
  return layers.conv(features, kernel, stride=stride, dilation=dilation, use_bias=False,
                     dtype=dtype, name=name, kernel_init=layers.kaiming_normal_fan_out)


class _Block(nn.Module):
  """Common attributes of the two block types (torchvision BasicBlock / Bottleneck)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  freeze_bn: bool = True
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  def norm(self, name: str, train: bool) -> layers.BatchNorm:
    return layers.BatchNorm(use_running_average=not train, frozen=self.freeze_bn,
                            axis_name=self.axis_name, dtype=self.dtype, name=name)

  def shortcut(self, x, out_channels: int, train: bool):
    if not self.downsample:
      return x
    x = _conv(out_channels, 1, "downsample_conv", self.dtype, stride=self.stride)(x)
    return self.norm("downsample_bn", train)(x)


class BasicBlock(_Block):
  """3x3 -> 3x3. torchvision refuses dilation here; we dilate both convs (used only by
  the small test/demo depths)."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    out = _conv(self.planes, 3, "conv1", self.dtype, self.stride, self.dilation)(x)
    out = nn.relu(self.norm("bn1", train)(out))
    out = _conv(self.planes, 3, "conv2", self.dtype, 1, self.dilation)(out)
    out = self.norm("bn2", train)(out)
    return nn.relu(out + self.shortcut(x, self.planes, train))


class Bottleneck(_Block):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 x4, as torchvision (ResNet v1.5)."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out = _conv(self.planes, 1, "conv1", self.dtype)(x)
    out = nn.relu(self.norm("bn1", train)(out))
    out = _conv(self.planes, 3, "conv2", self.dtype, self.stride, self.dilation)(out)
    out = nn.relu(self.norm("bn2", train)(out))
    out = _conv(self.planes * 4, 1, "conv3", self.dtype)(out)
    out = self.norm("bn3", train)(out)
    return nn.relu(out + self.shortcut(x, self.planes * 4, train))


class ResNetFeatureExtractor(nn.Module):
  """ResNet-`depth` without avgpool/fc, with torchvision's
  replace_stride_with_dilation=[False, True, True]: layer3 and layer4 keep stride 1 and
  dilate (2 and 4), the first block of each using the previous stage's dilation.

  `width` is the stem width (64 = published); all channels scale with it.
  Returns float32 features at stride 8.
  """
  depth: int = 101
  width: int = 64
  freeze_bn: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.depth not in STAGES:
      raise ValueError(f"unsupported ResNet depth {self.depth}; one of {sorted(STAGES)}")
    bottleneck, blocks_per_stage = STAGES[self.depth]
    block_cls = Bottleneck if bottleneck else BasicBlock
    if self.remat:
      # `train` (argument 2 counting self) is a Python bool, so static.
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    dtype = layers.compute_dtype(self.dtype)

    x = x.astype(dtype)
    x = _conv(self.width, 7, "conv1", dtype, stride=2, dilation=1)(x)
    x = layers.BatchNorm(use_running_average=not train, frozen=self.freeze_bn,
                         axis_name=self.axis_name, dtype=dtype, name="bn1")(x)
    x = nn.relu(x)
    # torch MaxPool2d(3, 2, padding=1): padded cells never win (reduce_window pads -inf).
    x = layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

    in_channels = self.width
    dilation = 1
    for stage, num_blocks in enumerate(blocks_per_stage):
      planes = self.width * 2**stage
      stride = 1 if stage == 0 else 2
      previous_dilation = dilation
      if stage >= 2:  # replace_stride_with_dilation = [False, True, True]
        dilation *= stride
        stride = 1
      out_channels = planes * block_cls.expansion
      for j in range(num_blocks):
        first = j == 0
        x = block_cls(
            planes=planes,
            stride=stride if first else 1,
            dilation=previous_dilation if first else dilation,
            downsample=first and (stride != 1 or in_channels != out_channels),
            freeze_bn=self.freeze_bn,
            axis_name=self.axis_name,
            dtype=dtype,
            name=f"layer{stage + 1}_{j}",
        )(x, train)
        in_channels = out_channels
    return layers.as_float32(x)
