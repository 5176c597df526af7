"""FADA's stage-2 (adversarial) training step in plain PyTorch: the comparison side of
`tools/benchmark.py --mode=train --backend=torch`.

Written from the method description (see the project README and FADA_REFERENCE): a
DeepLab-v2 ResNet with frozen BN, the ASPP-v2 classifier, the fine-grained
discriminator, SGD (torch semantics) for the generator with the classifier at 10x, Adam
(0.9, 0.99) for the discriminator, and the release's order of operations.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference  # noqa: E402  (a sibling file, not a package)


class FeatureExtractor(nn.Module):
  """The dilated ResNet of `torch_reference.DeepLabResNet`, without its ASPP head."""

  def __init__(self, network: torch_reference.DeepLabResNet):
    super().__init__()
    self.network = network

  def forward(self, x):
    net = self.network
    x = net.maxpool(F.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


class Classifier(nn.Module):
  def __init__(self, network: torch_reference.DeepLabResNet):
    super().__init__()
    self.aspp = network.aspp

  def forward(self, x, size):
    out = sum(conv(x) for conv in self.aspp)
    return F.interpolate(out, size=size, mode="bilinear", align_corners=True)


class Discriminator(nn.Module):
  def __init__(self, in_channels: int, num_classes: int, hidden: int = 256):
    super().__init__()
    self.body = nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(hidden, hidden // 2, 3, padding=1), nn.LeakyReLU(0.2))
    self.cls_source = nn.Conv2d(hidden // 2, num_classes, 3, padding=1)
    self.cls_target = nn.Conv2d(hidden // 2, num_classes, 3, padding=1)

  def forward(self, x, size):
    x = self.body(x)
    out = torch.cat([self.cls_source(x), self.cls_target(x)], dim=1)
    return F.interpolate(out, size=size, mode="bilinear", align_corners=True)


def soft_cross_entropy(logits, soft_labels):
  return torch.mean(torch.sum(-soft_labels * F.log_softmax(logits, dim=1), dim=1))


class AdversarialTrainer:
  """Networks, optimisers and the `step(source, labels, target)` of the release."""

  def __init__(self, depth: int = 101, num_classes: int = 19, width: int = 64,
               base_lr: float = 2.5e-4, base_lr_d: float = 1e-4):
    network = torch_reference.DeepLabResNet(depth, num_classes, width)
    torch_reference.randomize_batch_norm(network)
    self.feature_extractor = FeatureExtractor(network)
    self.classifier = Classifier(network)
    channels = width * 8 * (4 if depth >= 50 else 1)
    self.discriminator = Discriminator(channels, num_classes)
    backbone = [p for n, p in network.named_parameters() if not n.startswith("aspp.")]
    self.optimizer_fea = torch.optim.SGD(backbone, lr=base_lr, momentum=0.9,
                                         weight_decay=5e-4)
    self.optimizer_cls = torch.optim.SGD(self.classifier.parameters(), lr=base_lr * 10,
                                         momentum=0.9, weight_decay=5e-4)
    self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=base_lr_d,
                                        betas=(0.9, 0.99))
    self.criterion = nn.CrossEntropyLoss(ignore_index=255)

  def step(self, source, labels, target, temperature=1.8):
    for optimizer in (self.optimizer_fea, self.optimizer_cls, self.optimizer_d):
      optimizer.zero_grad()
    source_size, target_size = source.shape[-2:], target.shape[-2:]
    source_fea = self.feature_extractor(source)
    source_pred = self.classifier(source_fea, source_size) / temperature
    loss_seg = self.criterion(source_pred, labels)
    loss_seg.backward()
    source_soft = F.softmax(source_pred, dim=1).detach().clamp(max=0.9)

    target_fea = self.feature_extractor(target)
    target_pred = self.classifier(target_fea, target_size) / temperature
    target_soft = F.softmax(target_pred, dim=1).detach().clamp(max=0.9)
    target_d = self.discriminator(target_fea, target_size)
    loss_adv_tgt = 0.001 * soft_cross_entropy(
        target_d, torch.cat([target_soft, torch.zeros_like(target_soft)], dim=1))
    loss_adv_tgt.backward()
    self.optimizer_fea.step()
    self.optimizer_cls.step()

    self.optimizer_d.zero_grad()
    source_d = self.discriminator(source_fea.detach(), source_size)
    loss_d_src = 0.5 * soft_cross_entropy(
        source_d, torch.cat([source_soft, torch.zeros_like(source_soft)], dim=1))
    loss_d_src.backward()
    target_d = self.discriminator(target_fea.detach(), target_size)
    loss_d_tgt = 0.5 * soft_cross_entropy(
        target_d, torch.cat([torch.zeros_like(target_soft), target_soft], dim=1))
    loss_d_tgt.backward()
    self.optimizer_d.step()
    return {"loss_seg": loss_seg.item(), "loss_adv_tgt": loss_adv_tgt.item(),
            "loss_D_src": loss_d_src.item(), "loss_D_tgt": loss_d_tgt.item()}
