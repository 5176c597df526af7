"""DeepLab-v2 ResNet feature extractor (torchvision layout, output stride 8 by dilation).

Memory (docs/memory.md): the blocks after the first of a stage are identical, so with
`remat` they run as one `jax.lax.scan` over their stacked variables whose body (two blocks
where they divide the stage) is a `jax.checkpoint`. The variables stay one sub-tree per
block (`layer3_5/conv1/kernel`): they are stacked at apply time and trainable BN's running
statistics are written back per block, so checkpoints and the torch-weight importer see
the unrolled layout.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fada_jax.models import conv_dispatch, layers

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


def conv_norm(module: nn.Module, conv: nn.Conv, norm: layers.BatchNorm, x: jax.Array,
              saved_as: Optional[str] = None) -> jax.Array:
  """`norm(conv(x))` for two submodules of `module`; `saved_as` names the result of the
  conv for REMAT_POLICIES.

  A frozen norm inside `use_matmul_convs()` (the CPU) is folded into the convolution
  instead, conv(x, kernel * multiplier) + shift, equal up to rounding. Applied after the
  conv, the per-channel multiplier is broadcast to the activation's shape, and the source
  and target passes and the input gradient share that broadcast; XLA:CPU's YNNPACK fusions
  take in a broadcast only where it has one user, so here it was materialised and kept
  from the forward pass to the backward pass: folded, the stage-2 step's temporary at
  512x256 falls from 2.61 to 2.39 GiB (README, Benchmarks).
  """
  if not (norm.frozen and conv_dispatch.active()) or module.is_initializing():
    out = conv(x)
    if saved_as:
      out = checkpoint_name(out, saved_as)
    return norm(out)
  params, stats = module.variables["params"], module.variables["batch_stats"]
  multiplier, shift = layers.frozen_affine(**params[norm.name], **stats[norm.name])
  kernel = params[conv.name]["kernel"] * multiplier
  out = conv.clone(parent=None).apply({"params": {"kernel": kernel}}, x)
  out = out + shift.astype(out.dtype)
  return checkpoint_name(out, saved_as) if saved_as else out


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
    return conv_norm(self, _conv(out_channels, 1, "downsample_conv", self.dtype,
                                 stride=self.stride), self.norm("downsample_bn", train), x)


class BasicBlock(_Block):
  """3x3 -> 3x3. torchvision refuses dilation here; we dilate both convs (used only by
  the small test/demo depths)."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    out = nn.relu(conv_norm(self, _conv(self.planes, 3, "conv1", self.dtype, self.stride,
                                        self.dilation), self.norm("bn1", train), x))
    out = conv_norm(self, _conv(self.planes, 3, "conv2", self.dtype, 1, self.dilation),
                    self.norm("bn2", train), out)
    return nn.relu(out + self.shortcut(x, self.planes, train))


class Bottleneck(_Block):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 x4, as torchvision (ResNet v1.5)."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    # The two narrow conv outputs are named for REMAT_POLICIES (no effect without remat).
    out = nn.relu(conv_norm(self, _conv(self.planes, 1, "conv1", self.dtype),
                            self.norm("bn1", train), x, saved_as="bottleneck_conv1"))
    out = nn.relu(conv_norm(self, _conv(self.planes, 3, "conv2", self.dtype, self.stride,
                                        self.dilation),
                            self.norm("bn2", train), out, saved_as="bottleneck_conv2"))
    out = conv_norm(self, _conv(self.planes * 4, 1, "conv3", self.dtype),
                    self.norm("bn3", train), out)
    return nn.relu(out + self.shortcut(x, self.planes * 4, train))


# What the checkpointed scan body keeps for the backward pass besides its input (the scan
# carry, always kept): nothing, so its blocks are recomputed whole. Measured against the
# alternative in docs/memory.md.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "conv1_conv2": jax.checkpoint_policies.save_only_these_names(
        "bottleneck_conv1", "bottleneck_conv2"),
}
REMAT_POLICY = "nothing"


class ResNetFeatureExtractor(nn.Module):
  """ResNet-`depth` without avgpool/fc, with torchvision's
  replace_stride_with_dilation=[False, True, True]: layer3 and layer4 keep stride 1 and
  dilate (2 and 4), the first block of each using the previous stage's dilation.

  `width` is the stem width (64 = published); all channels scale with it.
  `scan`: run each stage's blocks after the first (identical in shape) as one
  `lax.scan` (None: only with remat, see docs/memory.md); `remat`: recompute those blocks
  in the backward pass (the scan body, `blocks_per_step` blocks where they divide the
  stage, is a `jax.checkpoint` under `remat_policy`, a key of REMAT_POLICIES). Neither
  changes the variables or the function computed.
  Returns float32 features at stride 8.
  """
  depth: int = 101
  width: int = 64
  freeze_bn: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False
  scan: Optional[bool] = None
  remat_policy: str = REMAT_POLICY
  blocks_per_step: int = 2
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.depth not in STAGES:
      raise ValueError(f"unsupported ResNet depth {self.depth}; one of {sorted(STAGES)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; one of "
                       f"{sorted(REMAT_POLICIES)}")
    bottleneck, blocks_per_stage = STAGES[self.depth]
    block_cls = Bottleneck if bottleneck else BasicBlock
    dtype = layers.compute_dtype(self.dtype)

    x = x.astype(dtype)
    x = nn.relu(conv_norm(
        self, _conv(self.width, 7, "conv1", dtype, stride=2, dilation=1),
        layers.BatchNorm(use_running_average=not train, frozen=self.freeze_bn,
                         axis_name=self.axis_name, dtype=dtype, name="bn1"), x))
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
      settings = dict(planes=planes, freeze_bn=self.freeze_bn, axis_name=self.axis_name,
                      dtype=dtype)
      first = block_cls(stride=stride, dilation=previous_dilation,
                        downsample=stride != 1 or in_channels != out_channels,
                        name=f"layer{stage + 1}_0", **settings)
      # The first block differs in shape from the rest; unrolled, remat does not lower
      # XLA:CPU's plan (docs/memory.md), so it runs as is.
      x = first(x, train)
      names = [f"layer{stage + 1}_{j}" for j in range(1, num_blocks)]
      rest = dict(dilation=dilation, **settings)
      scan = self.remat if self.scan is None else self.scan
      if scan and len(names) > 1 and not self.is_initializing():
        x = self._scan_blocks(block_cls(parent=None, **rest), names, x, train)
      else:
        block = nn.remat(block_cls, static_argnums=(2,)) if self.remat else block_cls
        for name in names:
          x = block(name=name, **rest)(x, train)
      in_channels = out_channels
    return layers.as_float32(x)

  def _scan_blocks(self, block: nn.Module, names, x, train: bool):
    """`block` (unbound) applied in turn with the variables of each of `names`.

    With remat, each scan step runs `blocks_per_step` blocks (when they divide the
    stage into 2 or more steps) and keeps only its input, so a stage saves
    len(names) / blocks_per_step inputs; each block is still recomputed once.
    """
    per_step = self.blocks_per_step if self.remat else 1
    if len(names) % per_step or len(names) // per_step < 2:
      per_step = 1
    stacked = {col: jax.tree_util.tree_map(
        lambda *leaves: jnp.stack(leaves).reshape(
            (len(names) // per_step, per_step) + leaves[0].shape),
        *[self.variables[col][name] for name in names])
               for col in ("params", "batch_stats")}
    update_stats = train and not self.freeze_bn

    def body(carry, variables):
      stats = []
      for i in range(per_step):
        block_variables = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], variables)
        if update_stats:
          carry, updated = block.apply(block_variables, carry, train, mutable=["batch_stats"])
          stats.append(updated["batch_stats"])
        else:
          carry = block.apply(block_variables, carry, train)
      if not update_stats:
        return carry, None
      return carry, jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *stats)

    if self.remat:
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy])
    x, stats = jax.lax.scan(body, x, stacked)
    if update_stats:
      stats = jax.tree_util.tree_map(
          lambda leaf: leaf.reshape((len(names),) + leaf.shape[2:]), stats)
      for i, name in enumerate(names):
        self.put_variable("batch_stats", name,
                          jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stats))
    return x
