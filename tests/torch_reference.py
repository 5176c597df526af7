"""The release's networks and training iterations in plain torch: the one torch reference
of every parity test and of `tools/benchmark.py --backend=torch`.

Written from the method description (FADA_REFERENCE.md), not from the release's code.
Module names follow the release and torchvision, so state dicts have the release's key
layout: a FADA checkpoint is {'feature_extractor': FeatureExtractor(...).state_dict()
('backbone.*' keys), 'classifier': ASPPClassifier (`conv2d_list.*`), 'model_D':
PixelDiscriminator (`D.0.*`, `D.2.*`, `cls1.*`, `cls2.*`)}.

`ReleaseTrainer` restates the release's iterations: `train_src` / `train_self_distill`
(`segmentation_step`) and `train_adv` (`adversarial_step`), with its optimisers (torch
SGD with momentum and weight decay on every parameter, the classifier at 10x, Adam for D)
and its poly schedule set before every iteration.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ASPP_DILATIONS = (6, 12, 18, 24)


# ---------------------------------------------------------------------------------------
# Networks.


class FrozenBatchNorm2d(nn.Module):
  """The release's frozen BN: buffers only, y = x w rsqrt(var) + (b - mean w rsqrt(var)),
  no epsilon."""

  def __init__(self, channels: int):
    super().__init__()
    self.register_buffer('weight', torch.ones(channels))
    self.register_buffer('bias', torch.zeros(channels))
    self.register_buffer('running_mean', torch.zeros(channels))
    self.register_buffer('running_var', torch.ones(channels))

  def forward(self, x):
    scale = self.weight * self.running_var.rsqrt()
    shift = self.bias - self.running_mean * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, dilation, downsample, norm):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
    self.bn1 = norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
    self.bn2 = norm(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample

  @property
  def last_bn(self):
    return self.bn2

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, dilation, downsample, norm):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
    self.bn2 = norm(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = norm(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  @property
  def last_bn(self):
    return self.bn3

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


RESNET_BLOCKS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                 50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                 152: (Bottleneck, (3, 8, 36, 3))}


class ResNet(nn.Module):
  """torchvision's ResNet (v1.5) with replace_stride_with_dilation=[False, True, True]:
  the first block of a dilated stage keeps the previous dilation; output stride 8.
  `norm` is FrozenBatchNorm2d (FREEZE_BN) or nn.BatchNorm2d; `with_fc` adds the ImageNet
  head (never applied) so the state dict has torchvision's keys."""

  def __init__(self, depth=101, width=64, norm=FrozenBatchNorm2d, with_fc=False):
    super().__init__()
    block, counts = RESNET_BLOCKS[depth]
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = norm(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes, dilation = width, 1
    for stage, count in enumerate(counts):
      planes, stride = width * 2**stage, (1 if stage == 0 else 2)
      previous_dilation = dilation
      if stage >= 2:
        dilation, stride = dilation * stride, 1
      downsample = None
      if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            norm(planes * block.expansion))
      blocks = [block(inplanes, planes, stride, previous_dilation, downsample, norm)]
      inplanes = planes * block.expansion
      blocks += [block(inplanes, planes, 1, dilation, None, norm) for _ in range(count - 1)]
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.out_channels = inplanes
    if with_fc:
      self.fc = nn.Linear(inplanes, 10)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
             512, 512, 512, 'M')


def vgg16_features() -> nn.Sequential:
  """torchvision's VGG-16 `features` Sequential (31 modules)."""
  layers, in_channels = [], 3
  for v in VGG16_CFG:
    if v == 'M':
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.ReLU()]
      in_channels = v
  return nn.Sequential(*layers)


def deeplab_vgg_backbone(features: nn.Sequential) -> nn.Sequential:
  """The release's VGG backbone: pool4 and pool5 removed, conv5_x dilated 2, then fc6 and
  fc7 (3x3, dilation 4) with ReLUs, at indices 29 and 31."""
  kept = [features[i] for i in list(range(23)) + list(range(24, 30))]
  for i in (23, 25, 27):
    kept[i].dilation, kept[i].padding = (2, 2), (2, 2)
  fc6 = nn.Conv2d(512, 1024, 3, padding=4, dilation=4)
  fc7 = nn.Conv2d(1024, 1024, 3, padding=4, dilation=4)
  return nn.Sequential(*kept, fc6, nn.ReLU(), fc7, nn.ReLU())


class FeatureExtractor(nn.Module):
  """Holds the backbone as `backbone`, giving the release's 'backbone.*' keys."""

  def __init__(self, backbone: nn.Module):
    super().__init__()
    self.backbone = backbone

  def forward(self, x):
    return self.backbone(x)


def _upsample(x, size):
  if size is None:
    return x
  return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=True)


class ASPPClassifier(nn.Module):
  """DeepLab-v2 ASPP: four dilated 3x3 convs summed; weights N(0, 0.01); optionally
  upsampled (align corners) to `size`, as the release's classifier does."""

  def __init__(self, in_channels: int, num_classes: int):
    super().__init__()
    self.conv2d_list = nn.ModuleList(
        nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in ASPP_DILATIONS)
    for conv in self.conv2d_list:
      conv.weight.data.normal_(0, 0.01)

  def forward(self, x, size=None):
    return _upsample(sum(conv(x) for conv in self.conv2d_list), size)


class PixelDiscriminator(nn.Module):
  """FADA's fine-grained discriminator: 2K channels, the source head (cls1) first."""

  def __init__(self, in_channels: int, num_classes: int, ndf: int = 256):
    super().__init__()
    self.D = nn.Sequential(nn.Conv2d(in_channels, ndf, 3, padding=1), nn.LeakyReLU(0.2),
                           nn.Conv2d(ndf, ndf // 2, 3, padding=1), nn.LeakyReLU(0.2))
    self.cls1 = nn.Conv2d(ndf // 2, num_classes, 3, padding=1)
    self.cls2 = nn.Conv2d(ndf // 2, num_classes, 3, padding=1)

  def forward(self, x, size=None):
    out = self.D(x)
    return _upsample(torch.cat([self.cls1(out), self.cls2(out)], dim=1), size)


class DeepLabResNet(nn.Module):
  """Feature extractor then classifier, logits at feature resolution (the benchmark's
  inference network)."""

  def __init__(self, depth: int = 101, num_classes: int = 19, width: int = 64,
               norm=FrozenBatchNorm2d):
    super().__init__()
    self.feature_extractor = FeatureExtractor(ResNet(depth, width, norm))
    self.classifier = ASPPClassifier(self.feature_extractor.backbone.out_channels,
                                     num_classes)

  def forward(self, x):
    return self.classifier(self.feature_extractor(x))


def segment(model: nn.Module, images: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
  """NCHW float images -> int64 train-id map [N, out_h, out_w] (align-corners upsampling)."""
  return _upsample(model(images), out_hw).argmax(1)


def randomize(module: nn.Module, seed: int) -> nn.Module:
  """Random weights and realistic BN statistics, so that no layer is an identity:
  He-normal convs, small random biases, BN running_var in [0.5, 2], and the last BN of
  each residual branch damped, as in trained networks (which keeps deep ResNets'
  activations bounded). Works on frozen and trainable BN alike; returns `module`."""
  generator = torch.Generator().manual_seed(seed)

  def rand(*shape):
    return torch.rand(*shape, generator=generator)

  damped = {id(m.last_bn) for m in module.modules() if isinstance(m, (BasicBlock, Bottleneck))}
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2 / fan_in)**0.5)
        if m.bias is not None:
          m.bias.copy_((rand(m.bias.shape[0]) - 0.5) * 0.2)
      elif isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
        n = m.weight.shape[0]
        m.weight.copy_((0.1 + 0.4 * rand(n)) if id(m) in damped else (0.5 + rand(n)))
        m.bias.copy_((rand(n) - 0.5) * 0.4)
        m.running_mean.copy_((rand(n) - 0.5) * 0.4)
        m.running_var.copy_(0.5 + 1.5 * rand(n))
  return module


def fada_checkpoint(feature_extractor: nn.Module, classifier: nn.Module,
                    discriminator: nn.Module | None = None, *, ddp_prefix: bool = False,
                    iteration: int = 0) -> dict:
  """A training checkpoint in the release's layout (what `torch.save` writes there)."""

  def state(module):
    return {('module.' if ddp_prefix else '') + k: v.detach().clone()
            for k, v in module.state_dict().items()}

  checkpoint = {'iteration': iteration, 'feature_extractor': state(feature_extractor),
                'classifier': state(classifier)}
  if discriminator is not None:
    checkpoint['model_D'] = state(discriminator)
  return checkpoint


# ---------------------------------------------------------------------------------------
# Training iterations.


def soft_label_cross_entropy(logits, soft_labels):
  return torch.mean(torch.sum(-soft_labels * F.log_softmax(logits, dim=1), dim=1))


class ReleaseTrainer:
  """The release's optimisers and iterations over given networks (trained in place).

  SGD (torch semantics: v = mu v + g + wd p) on `feature_extractor.parameters()` (frozen
  BN holds buffers, not parameters, so it is not trained) and on the classifier at 10x
  the rate; Adam (0.9, 0.99) on the discriminator; every rate
  `base * (1 - iteration / max_iter) ** power`, set before the iteration.
  """

  def __init__(self, feature_extractor, classifier, discriminator=None, *, base_lr,
               max_iter, base_lr_d=1e-4, power=0.9, momentum=0.9, weight_decay=5e-4,
               temperature=1.8, soft_label_max=0.9, adv_weight=0.001):
    self.feature_extractor, self.classifier = feature_extractor, classifier
    self.discriminator = discriminator
    self.base_lr, self.base_lr_d, self.max_iter, self.power = base_lr, base_lr_d, max_iter, power
    self.temperature, self.soft_label_max, self.adv_weight = (temperature, soft_label_max,
                                                             adv_weight)
    self.optimizer_fea = torch.optim.SGD(feature_extractor.parameters(), lr=base_lr,
                                         momentum=momentum, weight_decay=weight_decay)
    self.optimizer_cls = torch.optim.SGD(classifier.parameters(), lr=base_lr * 10,
                                         momentum=momentum, weight_decay=weight_decay)
    self.optimizer_d = None
    if discriminator is not None:
      self.optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=base_lr_d,
                                          betas=(0.9, 0.99))
    self.criterion = nn.CrossEntropyLoss(ignore_index=255)

  def _poly(self, base, iteration):
    return base * (1 - iteration / self.max_iter) ** self.power

  def _start(self, iteration):
    lr = self._poly(self.base_lr, iteration)
    for group in self.optimizer_fea.param_groups:
      group['lr'] = lr
    for group in self.optimizer_cls.param_groups:
      group['lr'] = lr * 10
    if self.optimizer_d is not None:
      for group in self.optimizer_d.param_groups:
        group['lr'] = self._poly(self.base_lr_d, iteration)
    for module in (self.feature_extractor, self.classifier, self.discriminator):
      if module is not None:
        module.train()
    self.optimizer_fea.zero_grad()
    self.optimizer_cls.zero_grad()
    return lr

  def segmentation_step(self, images, labels, iteration=0) -> dict:
    """train_src / train_self_distill: CE (ignore 255) of the logits upsampled to the
    label size, no temperature."""
    lr = self._start(iteration)
    logits = self.classifier(self.feature_extractor(images), labels.shape[-2:])
    loss_seg = self.criterion(logits, labels)
    loss_seg.backward()
    self.optimizer_fea.step()
    self.optimizer_cls.step()
    return {'loss_seg': loss_seg.item(), 'lr': lr}

  def _soft_labels(self, logits):
    return F.softmax(logits, dim=1).detach().clamp(max=self.soft_label_max)

  def adversarial_step(self, source, labels, target, iteration=0) -> dict:
    """train_adv: the generator from loss_seg + loss_adv_tgt (D's gradients of it are
    dropped by zero_grad), then D from loss_D on the detached, pre-update features."""
    lr = self._start(iteration)
    self.optimizer_d.zero_grad()
    source_size, target_size = source.shape[-2:], target.shape[-2:]
    source_fea = self.feature_extractor(source)
    source_pred = self.classifier(source_fea, source_size) / self.temperature
    loss_seg = self.criterion(source_pred, labels)
    loss_seg.backward()
    source_soft = self._soft_labels(source_pred)

    target_fea = self.feature_extractor(target)
    target_pred = self.classifier(target_fea, target_size) / self.temperature
    target_soft = self._soft_labels(target_pred)
    target_d = self.discriminator(target_fea, target_size)
    loss_adv_tgt = self.adv_weight * soft_label_cross_entropy(
        target_d, torch.cat([target_soft, torch.zeros_like(target_soft)], dim=1))
    loss_adv_tgt.backward()
    self.optimizer_fea.step()
    self.optimizer_cls.step()

    self.optimizer_d.zero_grad()
    source_d = self.discriminator(source_fea.detach(), source_size)
    loss_d_src = 0.5 * soft_label_cross_entropy(
        source_d, torch.cat([source_soft, torch.zeros_like(source_soft)], dim=1))
    loss_d_src.backward()
    target_d = self.discriminator(target_fea.detach(), target_size)
    loss_d_tgt = 0.5 * soft_label_cross_entropy(
        target_d, torch.cat([torch.zeros_like(target_soft), target_soft], dim=1))
    loss_d_tgt.backward()
    self.optimizer_d.step()
    return {'loss_seg': loss_seg.item(), 'loss_adv_tgt': loss_adv_tgt.item(),
            'loss_D_src': loss_d_src.item(), 'loss_D_tgt': loss_d_tgt.item(),
            'loss_D': loss_d_src.item() + loss_d_tgt.item(), 'lr': lr,
            'lr_D': self._poly(self.base_lr_d, iteration)}


class AdversarialTrainer(ReleaseTrainer):
  """A randomly initialised DeepLab-v2 ResNet with frozen BN, its discriminator and the
  stage-2 optimisers: `step(source, labels, target)` (the benchmark's torch side)."""

  def __init__(self, depth: int = 101, num_classes: int = 19, width: int = 64,
               base_lr: float = 2.5e-4, base_lr_d: float = 1e-4, max_iter: int = 62500):
    network = randomize(DeepLabResNet(depth, num_classes, width), seed=0)
    channels = network.feature_extractor.backbone.out_channels
    super().__init__(network.feature_extractor, network.classifier,
                     PixelDiscriminator(channels, num_classes), base_lr=base_lr,
                     base_lr_d=base_lr_d, max_iter=max_iter)

  def step(self, source, labels, target):
    return self.adversarial_step(source, labels, target)
