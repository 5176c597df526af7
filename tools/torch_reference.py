"""A plain torch.nn DeepLab-v2 ResNet + ASPP, the PyTorch side of `tools/benchmark.py`.

Written from the method description (torchvision-layout ResNet, layer3/layer4 dilated to
output stride 8, frozen BN without epsilon, ASPP-v2 summing four dilated 3x3 convs), with
random weights: it exists to time the same network in PyTorch under the same conditions,
not to load checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
           152: (3, 8, 36, 3)}


class FrozenBatchNorm2d(nn.Module):
  """y = x * w * rsqrt(var) + (b - mean * w * rsqrt(var)), no epsilon, as the release."""

  def __init__(self, channels: int):
    super().__init__()
    self.register_buffer("weight", torch.ones(channels))
    self.register_buffer("bias", torch.zeros(channels))
    self.register_buffer("running_mean", torch.zeros(channels))
    self.register_buffer("running_var", torch.ones(channels))

  def forward(self, x):
    scale = self.weight * self.running_var.rsqrt()
    shift = self.bias - self.running_mean * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=dilation,
                           dilation=dilation, bias=False)
    self.bn1 = FrozenBatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = FrozenBatchNorm2d(channels)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_channels, channels, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
    self.bn1 = FrozenBatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, stride, padding=dilation,
                           dilation=dilation, bias=False)
    self.bn2 = FrozenBatchNorm2d(channels)
    self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
    self.bn3 = FrozenBatchNorm2d(channels * 4)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + identity)


class DeepLabResNet(nn.Module):
  """Dilated ResNet (stride 8) feature extractor followed by the ASPP-v2 classifier."""

  def __init__(self, depth: int = 101, num_classes: int = 19, width: int = 64):
    super().__init__()
    block = Bottleneck if depth >= 50 else BasicBlock
    self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
    self.bn1 = FrozenBatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, padding=1)
    self._in_channels = width
    self._dilation = 1
    stages = []
    # (channels, stride, dilate): layer3 and layer4 trade their stride for dilation.
    for index, (count, (factor, stride, dilate)) in enumerate(zip(
        _BLOCKS[depth], ((1, 1, False), (2, 2, False), (4, 2, True), (8, 2, True)))):
      stages.append(self._make_layer(block, width * factor, count, stride, dilate))
      self.add_module(f"layer{index + 1}", stages[-1])
    feature_channels = width * 8 * block.expansion
    self.aspp = nn.ModuleList(
        nn.Conv2d(feature_channels, num_classes, 3, padding=d, dilation=d, bias=True)
        for d in (6, 12, 18, 24))
    for conv in self.aspp:
      conv.weight.data.normal_(0, 0.01)

  def _make_layer(self, block, channels, count, stride, dilate):
    previous_dilation = self._dilation
    if dilate:
      self._dilation *= stride
      stride = 1
    downsample = None
    if stride != 1 or self._in_channels != channels * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self._in_channels, channels * block.expansion, 1, stride, bias=False),
          FrozenBatchNorm2d(channels * block.expansion))
    layers = [block(self._in_channels, channels, stride, previous_dilation, downsample)]
    self._in_channels = channels * block.expansion
    layers += [block(self._in_channels, channels, 1, self._dilation)
               for _ in range(1, count)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return sum(conv(x) for conv in self.aspp)


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> None:
  """Realistic non-trivial frozen statistics (so no layer is an identity)."""
  generator = torch.Generator().manual_seed(seed)
  for module in model.modules():
    if isinstance(module, FrozenBatchNorm2d):
      n = module.weight.numel()
      module.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=generator))
      module.bias.copy_(0.1 * torch.randn(n, generator=generator))
      module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
      module.running_var.copy_(1.0 + 0.5 * torch.rand(n, generator=generator))


def segment(model: nn.Module, images: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
  """NCHW float images -> int64 train-id map [N, out_h, out_w] (align-corners upsampling)."""
  logits = model(images)
  logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=True)
  return logits.argmax(1)
