"""Parity of the Flax networks with plain torch.nn references of the same networks.

The torch modules come from tests/torch_reference.py (torchvision layout, the release's
frozen BN, DeepLab-v2 VGG/ASPP, FADA's discriminator); weights are random, BN statistics
are random but realistic, and the torch state dict is copied into Flax variables with the
names the converter relies on (OIHW -> HWIO).
"""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, PartitionSpec as P
from torch import nn as tnn

import torch_reference
from fada_jax import models
from fada_jax.errors import UserError
from fada_jax.models import conv_dispatch, heads, layers, resnet, vgg

PARITY_TOL = 1e-4  # max |jax - torch| / max |torch|


def relative_error(jax_out, torch_out) -> float:
  reference = torch_out.detach().numpy()
  if reference.ndim == 4:
    reference = reference.transpose(0, 2, 3, 1)
  diff = np.max(np.abs(np.asarray(jax_out, np.float64) - reference))
  return float(diff / np.max(np.abs(reference)))


def nhwc(t: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- torch -> flax


VGG_CONV_NAMES = [f"conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
                  for i in range(1, n + 1)] + ["fc6", "fc7"]


def flax_variables(state_dict, rename=lambda parts: parts):
  """torch state dict -> {'params', 'batch_stats'}: OIHW -> HWIO kernels, BN weight/bias
  -> scale/bias, running_mean/var -> mean/var. `rename` maps the module path."""
  params, batch_stats = {}, {}
  for key, tensor in state_dict.items():
    *path, leaf = key.split(".")
    if leaf == "num_batches_tracked":
      continue
    path = rename(path)
    value = tensor.detach().numpy()
    if leaf in ("running_mean", "running_var"):
      tree, leaf = batch_stats, {"running_mean": "mean", "running_var": "var"}[leaf]
    else:
      tree = params
      if leaf == "weight":
        leaf = "kernel" if value.ndim == 4 else "scale"
        if value.ndim == 4:
          value = value.transpose(2, 3, 1, 0)
    for part in path:
      tree = tree.setdefault(part, {})
    tree[leaf] = jnp.asarray(value)
  return {"params": params, "batch_stats": batch_stats}


def resnet_rename(path):
  if path[0].startswith("layer"):
    rest = path[2:]
    if rest[:1] == ["downsample"]:
      rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"]
    return [f"{path[0]}_{path[1]}"] + rest
  return path


def assert_same_tree(variables, reference):
  """The copied torch weights cover exactly the Flax module's variables, same shapes."""
  got = jax.tree_util.tree_map(lambda x: x.shape, flax.core.unfreeze(variables))
  want = jax.tree_util.tree_map(lambda x: x.shape, flax.core.unfreeze(reference))
  assert got == want


# ----------------------------------------------------------------------------- resize


RESIZE_CASES = [
    ((5, 7), (17, 29)),    # upsampling, odd factors
    ((33, 65), (257, 513)),  # logits -> image, x8
    ((40, 31), (13, 9)),   # downsampling
    ((6, 6), (1, 1)),      # 1-pixel output
    ((1, 1), (4, 3)),      # 1-pixel input
    ((9, 12), (9, 12)),    # identity
    ((8, 5), (1, 11)),     # mixed
    ((1, 7), (6, 7)),      # 1-pixel input height, identity width
]


@pytest.mark.parametrize("in_hw,out_hw", RESIZE_CASES)
def test_resize_matches_torch_align_corners(in_hw, out_hw):
  x = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(0))
  want = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=True)
  got = layers.resize_bilinear_align_corners(nhwc(x), out_hw)
  assert got.shape == (2, *out_hw, 3) and got.dtype == jnp.float32
  assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize("in_hw,out_hw", RESIZE_CASES)
def test_resize_gradient_matches_torch(in_hw, out_hw):
  x = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(1), requires_grad=True)
  weights = torch.randn(2, 3, *out_hw, generator=torch.Generator().manual_seed(2))
  (F.interpolate(x, size=out_hw, mode="bilinear", align_corners=True) * weights).sum().backward()
  grad = jax.jit(jax.grad(lambda x: jnp.sum(
      layers.resize_bilinear_align_corners(x, out_hw) * nhwc(weights))))(nhwc(x.detach()))
  assert relative_error(grad, x.grad) < 1e-6


def _within_half_bfloat16_ulp(got, exact):
  """|got - exact| <= half a bfloat16 ulp of `exact` (plus float32 rounding before it)."""
  exact = np.asarray(exact, np.float64)
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
  return np.abs(np.asarray(got, np.float64) - exact) <= 0.5 * ulp + 1e-6 * np.abs(exact)


def test_resize_bfloat16_interpolates_in_float32_and_rounds_once():
  x = torch.randn(1, 2, 9, 13, generator=torch.Generator().manual_seed(3))
  x_bf16 = nhwc(x).astype(jnp.bfloat16)
  got = layers.resize_bilinear_align_corners(x_bf16, (50, 71))
  assert got.dtype == jnp.bfloat16
  exact = F.interpolate(torch.from_numpy(np.asarray(x_bf16, np.float64).transpose(0, 3, 1, 2)),
                        size=(50, 71), mode="bilinear", align_corners=True)
  assert np.all(_within_half_bfloat16_ulp(got, exact.numpy().transpose(0, 2, 3, 1)))


def test_resize_compiles_without_gather_or_scatter():
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(
      layers.resize_bilinear_align_corners(x, (40, 70)))))).lower(
          jnp.zeros((2, 5, 9, 3))).compile().as_text()
  assert not re.findall(r"\s(?:gather|scatter)\(", hlo)


def test_resize_is_not_half_pixel():
  x = jnp.arange(4.0).reshape(1, 1, 4, 1)
  got = layers.resize_bilinear_align_corners(x, (1, 7))[0, 0, :, 0]
  np.testing.assert_allclose(got, np.linspace(0, 3, 7), atol=1e-6)


# ----------------------------------------------------------------------------- max pool


@pytest.mark.parametrize("kernel,stride,padding,in_hw", [
    (3, 2, 1, (13, 17)),  # the ResNet stem's MaxPool2d(3, 2, padding=1), overlapping windows
    (3, 2, 1, (12, 16)),
    (2, 2, 0, (12, 17)),  # VGG's MaxPool2d(2, 2), odd width floored
])
def test_max_pool_matches_torch_values_and_gradient_with_ties(kernel, stride, padding, in_hw):
  rng = np.random.default_rng(4)
  # ReLU'd and coarsely rounded: many windows hold several equal maxima (zeros), where
  # the gradient must go to the first one in row-major order, as in torch.
  x = np.maximum(np.round(rng.standard_normal((2, 3, *in_hw)) * 2) / 2, 0).astype(np.float32)
  x_torch = torch.from_numpy(x).requires_grad_()
  pooled = F.max_pool2d(x_torch, kernel, stride, padding)
  weights = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(5))
  (pooled * weights).sum().backward()
  pool = functools.partial(layers.max_pool, window=(kernel, kernel), strides=(stride, stride),
                           padding=((padding, padding), (padding, padding)))
  got, grad = jax.value_and_grad(lambda v: jnp.sum(pool(v) * nhwc(weights)))(nhwc(x_torch.detach()))
  np.testing.assert_array_equal(np.asarray(pool(nhwc(x_torch.detach()))),
                                pooled.detach().numpy().transpose(0, 2, 3, 1))
  assert relative_error(grad, x_torch.grad) < 1e-6


def test_max_pool_gradient_compiles_without_scatter():
  pool = lambda v: layers.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1)))  # noqa: E731
  hlo = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(pool(v))))).lower(
      jnp.zeros((2, 12, 16, 3))).compile().as_text()
  assert not re.findall(r"\s(?:select-and-)?scatter\(", hlo)


# ----------------------------------------------------------------------------- batch norm


def _bn_stats(n, seed):
  rng = np.random.default_rng(seed)
  return dict(weight=rng.uniform(0.5, 1.5, n), bias=rng.normal(0, 0.3, n),
              mean=rng.normal(0, 0.5, n), var=rng.uniform(0.5, 2.0, n))


def _bn_variables(stats):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"params": {"scale": f32(stats["weight"]), "bias": f32(stats["bias"])},
          "batch_stats": {"mean": f32(stats["mean"]), "var": f32(stats["var"])}}


def test_frozen_bn_matches_release_formula_without_epsilon():
  stats = _bn_stats(6, 0)
  stats["var"][:3] = [1e-6, 1e-5, 3e-5]  # an epsilon of 1e-5 would show here
  torch_bn = torch_reference.FrozenBatchNorm2d(6)
  for name, key in (("weight", "weight"), ("bias", "bias"), ("running_mean", "mean"),
                    ("running_var", "var")):
    getattr(torch_bn, name).copy_(torch.tensor(stats[key], dtype=torch.float32))
  x = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(1))
  variables = _bn_variables(stats)
  for train in (False, True):  # frozen: the same affine map in both modes
    bn = layers.BatchNorm(use_running_average=not train, frozen=True)
    got = bn.apply(variables, nhwc(x))
    assert relative_error(got, torch_bn(x)) < 1e-6
  # No gradient reaches the frozen affine parameters; the input still gets one.
  grads = jax.grad(lambda v, x: jnp.sum(bn.apply(v, x) ** 2), argnums=(0, 1))(
      variables, nhwc(x))
  assert not np.any(grads[0]["params"]["scale"]) and not np.any(grads[0]["params"]["bias"])
  assert np.any(grads[1])


def _torch_train_bn(stats, x):
  bn = tnn.BatchNorm2d(x.shape[1], eps=1e-5, momentum=0.1)
  with torch.no_grad():
    bn.weight.copy_(torch.tensor(stats["weight"]))
    bn.bias.copy_(torch.tensor(stats["bias"]))
    bn.running_mean.copy_(torch.tensor(stats["mean"]))
    bn.running_var.copy_(torch.tensor(stats["var"]))
  bn.train()
  return bn, bn(x)


def test_trainable_bn_matches_torch_train_and_eval_mode():
  stats = _bn_stats(5, 2)
  x = torch.randn(4, 5, 6, 7, generator=torch.Generator().manual_seed(3)) * 2 + 1
  torch_bn, want = _torch_train_bn(stats, x)
  bn = layers.BatchNorm(use_running_average=False, frozen=False)
  got, updates = bn.apply(_bn_variables(stats), nhwc(x), mutable=["batch_stats"])
  assert relative_error(got, want) < 1e-5
  np.testing.assert_allclose(updates["batch_stats"]["mean"],
                             torch_bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  # torch's running var uses the unbiased batch variance.
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             torch_bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
  torch_bn.eval()
  eval_bn = layers.BatchNorm(use_running_average=True, frozen=False)
  got = eval_bn.apply({"params": _bn_variables(stats)["params"], **updates}, nhwc(x))
  assert relative_error(got, torch_bn(x)) < 1e-5


def test_trainable_bn_syncs_statistics_across_devices():
  devices = jax.devices()
  assert len(devices) == 4, "conftest provides 4 simulated CPU devices"
  stats = _bn_stats(3, 4)
  variables = _bn_variables(stats)
  # Per-device batches with different distributions, so unsynced statistics would differ.
  x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 5, 4, 3))
                  * np.arange(1, 9)[:, None, None, None], jnp.float32)

  single = layers.BatchNorm(use_running_average=False, frozen=False)
  want, want_updates = single.apply(variables, x, mutable=["batch_stats"])

  synced = layers.BatchNorm(use_running_average=False, frozen=False, axis_name="batch")
  mesh = Mesh(np.array(devices), ("batch",))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("batch")),
                     out_specs=(P("batch"), P()))
  def sharded(variables, x):
    return synced.apply(variables, x, mutable=["batch_stats"])

  got, got_updates = jax.jit(sharded)(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(got_updates["batch_stats"][name],
                               want_updates["batch_stats"][name], rtol=1e-5, atol=1e-6)

  # And the whole-batch result is torch's BatchNorm2d over the whole batch.
  torch_bn, torch_out = _torch_train_bn(stats, torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)))
  assert relative_error(want, torch_out) < 1e-5
  np.testing.assert_allclose(want_updates["batch_stats"]["var"],
                             torch_bn.running_var.numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- networks


def _resnet_parity(depth, width, input_nchw, seed):
  torch_model = torch_reference.randomize(torch_reference.ResNet(depth, width), seed)
  x = torch.randn(*input_nchw, generator=torch.Generator().manual_seed(seed))
  with torch.no_grad():
    want = torch_model(x)
  model = resnet.ResNetFeatureExtractor(depth=depth, width=width)
  variables = flax_variables(torch_model.state_dict(), resnet_rename)
  assert_same_tree(variables, jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.PRNGKey(0), nhwc(x)))
  got = jax.jit(functools.partial(model.apply, train=False))(variables, nhwc(x))
  return got, want


@pytest.mark.parametrize("depth,input_nchw", [
    (18, (2, 3, 64, 64)),
    (50, (1, 3, 64, 64)),
    (101, (1, 3, 33, 41)),  # odd sizes: padding and floor behaviour of every stride
])
def test_resnet_matches_torch(depth, input_nchw):
  got, want = _resnet_parity(depth, 64, input_nchw, seed=depth)
  assert got.dtype == jnp.float32
  assert got.shape == tuple(want.permute(0, 2, 3, 1).shape)
  error = relative_error(got, want)
  print(f"resnet{depth} parity relative error {error:.2e}")
  assert error < PARITY_TOL


def test_resnet_output_stride_and_channels():
  for depth, width in ((18, 8), (50, 8)):
    model = resnet.ResNetFeatureExtractor(depth=depth, width=width)
    shapes = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0],
        jnp.zeros((2, 96, 128, 3)))
    assert shapes.shape == (2, 12, 16, resnet.output_channels(depth, width))
  assert resnet.output_channels(101) == 2048 and resnet.output_channels(34) == 512


def test_frozen_bn_folded_into_the_convs_on_the_product_path():
  """Inside use_matmul_convs() (the CPU's training and evaluation) each frozen BN is folded
  into the conv before it: torch's features, the unfolded network's gradients, and no
  activation multiplied by a per-channel vector in the forward pass. (Bottlenecks, scanned
  or not: test_resnet_scan's matmul test compares them folded with the unfolded blocks.)"""
  torch_model = torch_reference.randomize(torch_reference.ResNet(18, 8), 18)
  x = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(18))
  with torch.no_grad():
    want = torch_model(x)
  model = resnet.ResNetFeatureExtractor(depth=18, width=8)
  variables = flax_variables(torch_model.state_dict(), resnet_rename)

  def features(params, folded):
    with conv_dispatch.use_matmul_convs(folded):
      return model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                         nhwc(x), train=True)

  def loss(params, folded):
    out = features(params, folded)
    return jnp.sum(out ** 2), out

  run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, folded_features), folded_grads = run(variables["params"], True)
  (_, plain_features), plain_grads = run(variables["params"], False)
  assert relative_error(folded_features, want) < PARITY_TOL
  assert relative_error(plain_features, want) < PARITY_TOL
  for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(folded_grads),
                                   jax.tree_util.tree_leaves(plain_grads)):
    # Frozen BN's own gradients are zero on both paths; the kernels' differ by rounding.
    error = np.max(np.abs(np.asarray(got, np.float64) - expected))
    assert error <= 1e-5 * np.max(np.abs(expected)), (jax.tree_util.keystr(path), error)

  def activation_products(folded):  # the batch of 2 leads only activations' shapes
    jaxpr = str(jax.make_jaxpr(features, static_argnums=1)(variables["params"], folded))
    return len(re.findall(r"f32\[2,\d+,\d+,\d+\] = mul ", jaxpr))

  assert activation_products(False) > 0
  assert activation_products(True) == 0


def test_vgg16_matches_torch():
  torch_model = torch_reference.randomize(
      torch_reference.deeplab_vgg_backbone(torch_reference.vgg16_features()), 16)
  x = torch.randn(1, 3, 45, 61, generator=torch.Generator().manual_seed(16)) * 50
  with torch.no_grad():
    want = torch_model(x)
  convs = [k for k, m in torch_model.named_children() if isinstance(m, tnn.Conv2d)]
  assert len(convs) == len(VGG_CONV_NAMES)
  names = dict(zip(convs, VGG_CONV_NAMES))
  variables = flax_variables(torch_model.state_dict(), lambda path: [names[path[0]]])
  model = vgg.VGGFeatureExtractor()
  reference = jax.eval_shape(model.init, jax.random.PRNGKey(0), nhwc(x))
  assert_same_tree({"params": variables["params"]}, reference)
  got = jax.jit(model.apply)({"params": variables["params"]}, nhwc(x))
  assert got.shape == (1, 5, 7, 1024)  # 45 -> 22 -> 11 -> 5; 61 -> 30 -> 15 -> 7 (floor)
  error = relative_error(got, want)
  print(f"vgg16 parity relative error {error:.2e}")
  assert error < PARITY_TOL


def test_aspp_classifier_and_discriminator_match_torch():
  channels, num_classes = 64, 19
  features = torch.relu(torch.randn(2, channels, 13, 27,
                                    generator=torch.Generator().manual_seed(7)))
  aspp = torch_reference.randomize(torch_reference.ASPPClassifier(channels, num_classes), 7)
  with torch.no_grad():
    want = aspp(features)
  variables = flax_variables(aspp.state_dict(), lambda path: [f"conv_{path[1]}"])
  classifier = heads.ASPPClassifier(num_classes=num_classes)
  assert_same_tree({"params": variables["params"]},
                   jax.eval_shape(classifier.init, jax.random.PRNGKey(0), nhwc(features)))
  got = classifier.apply({"params": variables["params"]}, nhwc(features))
  error = relative_error(got, want)
  print(f"aspp parity relative error {error:.2e}")
  assert got.shape == (2, 13, 27, num_classes) and error < PARITY_TOL

  disc = torch_reference.randomize(torch_reference.PixelDiscriminator(channels, num_classes), 8)
  with torch.no_grad():
    want = disc(features)
  rename = {"D.0": "conv1", "D.2": "conv2", "cls1": "cls_source", "cls2": "cls_target"}
  variables = flax_variables(disc.state_dict(), lambda path: [rename[".".join(path)]])
  discriminator = heads.FineGrainedDiscriminator(num_classes=num_classes)
  assert_same_tree({"params": variables["params"]},
                   jax.eval_shape(discriminator.init, jax.random.PRNGKey(0),
                                  nhwc(features)))
  got = discriminator.apply({"params": variables["params"]}, nhwc(features))
  error = relative_error(got, want)
  print(f"discriminator parity relative error {error:.2e}")
  assert got.shape == (2, 13, 27, 2 * num_classes) and error < PARITY_TOL
  # Source half first.
  with torch.no_grad():
    source_only = disc.cls1(disc.D(features))
  assert relative_error(got[..., :num_classes], source_only) < PARITY_TOL


def test_head_initialisation_follows_torch():
  classifier = heads.ASPPClassifier(num_classes=19)
  params = classifier.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 256)))["params"]
  kernels = np.concatenate([np.ravel(params[f"conv_{i}"]["kernel"]) for i in range(4)])
  assert abs(kernels.std() - 0.01) < 0.0005 and abs(kernels.mean()) < 0.0005
  bound = 1 / np.sqrt(256 * 9)
  biases = np.concatenate([params[f"conv_{i}"]["bias"] for i in range(4)])
  assert np.all(np.abs(biases) <= bound) and np.any(np.abs(biases) > bound / 2)


# ----------------------------------------------------------------------------- dtype / remat


def _small_resnet_variables(depth, width, seed):
  torch_model = torch_reference.randomize(torch_reference.ResNet(depth, width), seed)
  return flax_variables(torch_model.state_dict(), resnet_rename)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  variables = _small_resnet_variables(18, 8, 3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 48, 48, 3)), jnp.float32)
  outputs = {}
  for dtype in ("float32", "bfloat16"):
    feature_extractor = resnet.ResNetFeatureExtractor(depth=18, width=8, dtype=dtype)
    classifier = heads.ASPPClassifier(num_classes=5, dtype=dtype)
    cls_params = classifier.init(jax.random.PRNGKey(1), jnp.zeros((1, 6, 6, 64)))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(cls_params))

    @jax.jit
    def forward(variables, cls_params, x):
      return classifier.apply(cls_params, feature_extractor.apply(variables, x, train=False))

    outputs[dtype] = forward(variables, cls_params, x)
    assert outputs[dtype].dtype == jnp.float32
  scale = np.max(np.abs(outputs["float32"]))
  error = np.max(np.abs(outputs["bfloat16"] - outputs["float32"])) / scale
  # bfloat16 rounds to u = 2**-8 relative; ~20 rounded layers add up to about
  # sqrt(20) u (2.4 u to 4.7 u measured over seeds). Above u / 4: the computation did run
  # in bfloat16 (float32 alone differs by ~1e-6); below 16 u: nothing worse than rounding.
  unit_roundoff = 2.0**-8
  assert unit_roundoff / 4 < error < 16 * unit_roundoff, error


def test_remat_gives_identical_outputs_and_gradients():
  # Trainable BN in train mode: the hardest case (mutable batch_stats inside remat).
  variables = _small_resnet_variables(18, 8, 4)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  results = []
  for remat in (False, True):
    model = resnet.ResNetFeatureExtractor(depth=18, width=8, freeze_bn=False, remat=remat)

    @jax.jit
    def loss_and_grad(params, batch_stats, x):
      def loss(params):
        out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                   train=True, mutable=["batch_stats"])
        return jnp.mean(out ** 2), updates
      return jax.value_and_grad(loss, has_aux=True)(params)

    results.append(loss_and_grad(variables["params"], variables["batch_stats"], x))
  (loss_a, updates_a), grads_a = results[0]
  (loss_b, updates_b), grads_b = results[1]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         (grads_a, updates_a), (grads_b, updates_b))
  assert all(np.any(leaf) for leaf in jax.tree_util.tree_leaves(grads_a))


# ----------------------------------------------------------------------------- build


def _config(**model):
  return ml_collections.ConfigDict({"model": {"arch": "resnet18", "num_classes": 7,
                                              "freeze_bn": True, "dtype": "float32",
                                              **model}})


def test_build_and_init_variables():
  config = _config(width=8)
  built = models.build(config)
  assert built.feature_extractor.depth == 18 and built.feature_extractor.width == 8
  variables = models.init_variables(built, jax.random.PRNGKey(0), config)
  assert set(variables) == {"feature_extractor", "classifier", "discriminator"}
  assert set(variables["feature_extractor"]) == {"params", "batch_stats"}
  assert variables["classifier"]["params"]["conv_0"]["kernel"].shape == (3, 3, 64, 7)
  assert variables["discriminator"]["params"]["cls_target"]["kernel"].shape == (3, 3, 128, 7)
  assert variables["feature_extractor"]["params"]["layer3_0"]["downsample_conv"][
      "kernel"].shape == (1, 1, 16, 32)
  # Some parts alone (what a run whose checkpoint fills the others initialises): the
  # values they have in the full initialisation, the others not there.
  for parts in (["classifier", "discriminator"], ["feature_extractor"]):
    some = models.init_variables(built, jax.random.PRNGKey(0), config, parts=parts)
    assert list(some) == parts
    for part in parts:
      assert jax.tree_util.tree_structure(some[part]) == jax.tree_util.tree_structure(
          variables[part])
      assert all(np.array_equal(a, b) for a, b in zip(
          jax.tree_util.tree_leaves(some[part]), jax.tree_util.tree_leaves(variables[part])))
  assert models.feature_channels(config) == 64
  assert models.feature_channels(_config(arch="resnet101")) == 2048
  assert models.feature_channels(_config(arch="vgg16")) == 1024
  # Config without width/remat: published defaults.
  default = ml_collections.ConfigDict({"model": {"arch": "resnet50", "num_classes": 19,
                                                 "freeze_bn": False, "dtype": "bfloat16"}})
  built = models.build(default, axis_name="batch")
  assert built.feature_extractor.width == 64 and not built.feature_extractor.remat
  assert built.feature_extractor.axis_name == "batch"
  assert isinstance(models.build(_config(arch="vgg16")).feature_extractor,
                    vgg.VGGFeatureExtractor)


@pytest.mark.parametrize("field,value", [("arch", "resnet42"), ("dtype", "float16"),
                                         ("num_classes", 0)])
def test_build_rejects_bad_config_with_user_error(field, value):
  with pytest.raises(UserError, match=f"config.model.{field}"):
    models.build(_config(**{field: value}))
