"""Training steps and optimisers against a PyTorch transcription of the release's step.

The torch side is written here from the method description (FADA_REFERENCE.md and the
release's train_adv.py): a functional torch ResNet-18/ASPP/discriminator that reads the
same weights, torch.optim.SGD / Adam, and the release's order of operations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fada_jax import config_lib, losses, models
from fada_jax.errors import UserError
from fada_jax.train import parallel, state as state_lib, steps

WIDTH = 8
NUM_CLASSES = 5
BASE_LR, BASE_LR_D, MAX_ITER = 0.005, 1e-4, 10


def _config(stage, freeze_bn=True, **model):
  # The published solver (temperature, clipping, adversarial weight), a small network.
  config = config_lib.make_config('g2c', stage, 'resnet18')
  config.model.width = WIDTH
  config.model.num_classes = NUM_CLASSES
  config.model.freeze_bn = freeze_bn
  for key, value in model.items():
    config.model[key] = value
  config.solver.base_lr, config.solver.base_lr_d = BASE_LR, BASE_LR_D
  config.solver.max_iter = config.solver.stop_iter = MAX_ITER
  config.solver.batch_size = 8
  return config


def _variables(config, seed=0):
  """Initial variables with non-trivial BN statistics (frozen BN is then not an identity)."""
  variables = models.init_variables(models.build(config), jax.random.PRNGKey(seed), config)
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if "'var'" in name or "'scale'" in name:
      return jnp.asarray(1.0 + 0.2 * np.abs(noise))
    if "'mean'" in name or ("'bias'" in name and 'feature_extractor' in name):
      return jnp.asarray(0.1 * noise)
    return leaf

  return jax.tree_util.tree_map_with_path(perturb, variables)


def _flat(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _rel(a, b):
  """Norm-wise relative error ||a - b|| / ||b||."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------ torch transcription


class TorchFADA:
  """The release's networks and `train_adv` iteration, functional torch on given weights."""

  def __init__(self, variables, frozen_bn):
    def tensors(tree):
      out = {}
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = '/'.join(str(k.key) for k in path)
        value = np.asarray(leaf, np.float32)
        if key.endswith('kernel'):
          value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[key] = torch.tensor(np.ascontiguousarray(value))
      return out

    self.frozen_bn = frozen_bn
    self.fe = tensors(variables['feature_extractor']['params'])
    self.stats = tensors(variables['feature_extractor']['batch_stats'])
    self.cls = tensors(variables['classifier']['params'])
    self.disc = tensors(variables['discriminator']['params'])
    # Frozen BN weight/bias are buffers in the release: not given to the optimiser.
    fe_trainable = [v for k, v in self.fe.items()
                    if not (frozen_bn and 'bn' in k.split('/')[-2])]
    for value in fe_trainable + list(self.cls.values()) + list(self.disc.values()):
      value.requires_grad_(True)
    self.opt_fea = torch.optim.SGD(fe_trainable, lr=BASE_LR, momentum=0.9, weight_decay=5e-4)
    self.opt_cls = torch.optim.SGD(list(self.cls.values()), lr=BASE_LR * 10, momentum=0.9,
                                   weight_decay=5e-4)
    self.opt_d = torch.optim.Adam(list(self.disc.values()), lr=BASE_LR_D, betas=(0.9, 0.99))

  def _bn(self, x, name):
    weight, bias = self.fe[name + '/scale'], self.fe[name + '/bias']
    mean, var = self.stats[name + '/mean'], self.stats[name + '/var']
    if self.frozen_bn:
      scale = weight * var.rsqrt()
      shift = bias - mean * scale
      return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    return F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5)

  def features(self, x):
    """torchvision ResNet-18, layer3/4 dilated (2, 4), both convs of a block dilated."""
    p = self.fe
    x = F.relu(self._bn(F.conv2d(x, p['conv1/kernel'], stride=2, padding=3), 'bn1'))
    x = F.max_pool2d(x, 3, 2, 1)
    in_channels, dilation = WIDTH, 1
    for stage in range(4):
      planes, stride, previous = WIDTH * 2**stage, (1 if stage == 0 else 2), dilation
      if stage >= 2:
        dilation, stride = dilation * stride, 1
      for j in range(2):
        name = f'layer{stage + 1}_{j}'
        s, d = (stride, previous) if j == 0 else (1, dilation)
        out = F.conv2d(x, p[name + '/conv1/kernel'], stride=s, padding=d, dilation=d)
        out = F.relu(self._bn(out, name + '/bn1'))
        out = self._bn(F.conv2d(out, p[name + '/conv2/kernel'], padding=d, dilation=d),
                       name + '/bn2')
        if j == 0 and (s != 1 or in_channels != planes):
          x = self._bn(F.conv2d(x, p[name + '/downsample_conv/kernel'], stride=s),
                       name + '/downsample_bn')
        x = F.relu(out + x)
        in_channels = planes
    return x

  def classifier(self, x, size):
    out = sum(F.conv2d(x, self.cls[f'conv_{i}/kernel'], self.cls[f'conv_{i}/bias'],
                       padding=d, dilation=d) for i, d in enumerate((6, 12, 18, 24)))
    return F.interpolate(out, size=size, mode='bilinear', align_corners=True)

  def discriminator(self, x, size):
    p = self.disc
    x = F.leaky_relu(F.conv2d(x, p['conv1/kernel'], p['conv1/bias'], padding=1), 0.2)
    x = F.leaky_relu(F.conv2d(x, p['conv2/kernel'], p['conv2/bias'], padding=1), 0.2)
    out = torch.cat([F.conv2d(x, p['cls_source/kernel'], p['cls_source/bias'], padding=1),
                     F.conv2d(x, p['cls_target/kernel'], p['cls_target/bias'], padding=1)], 1)
    return F.interpolate(out, size=size, mode='bilinear', align_corners=True)

  def adversarial_step(self, iteration, src_input, src_label, tgt_input):
    """train_adv.py's loop body."""
    def soft_ce(pred, soft):
      return torch.mean(torch.sum(-soft * F.log_softmax(pred, dim=1), dim=1))

    lr = BASE_LR * (1 - iteration / MAX_ITER) ** 0.9
    lr_d = BASE_LR_D * (1 - iteration / MAX_ITER) ** 0.9
    for group in self.opt_fea.param_groups:
      group['lr'] = lr
    for group in self.opt_cls.param_groups:
      group['lr'] = lr * 10
    for group in self.opt_d.param_groups:
      group['lr'] = lr_d
    for optimizer in (self.opt_fea, self.opt_cls, self.opt_d):
      optimizer.zero_grad()
    src_size, tgt_size = src_input.shape[-2:], tgt_input.shape[-2:]
    src_fea = self.features(src_input)
    src_pred = self.classifier(src_fea, src_size) / 1.8
    loss_seg = torch.nn.CrossEntropyLoss(ignore_index=255)(src_pred, src_label)
    loss_seg.backward()
    src_soft = F.softmax(src_pred, dim=1).detach()
    src_soft[src_soft > 0.9] = 0.9
    tgt_fea = self.features(tgt_input)
    tgt_pred = self.classifier(tgt_fea, tgt_size) / 1.8
    tgt_soft = F.softmax(tgt_pred, dim=1).detach()
    tgt_soft[tgt_soft > 0.9] = 0.9
    tgt_d = self.discriminator(tgt_fea, tgt_size)
    loss_adv_tgt = 0.001 * soft_ce(tgt_d, torch.cat((tgt_soft, torch.zeros_like(tgt_soft)), 1))
    loss_adv_tgt.backward()
    self.opt_fea.step()
    self.opt_cls.step()
    self.opt_d.zero_grad()
    src_d = self.discriminator(src_fea.detach(), src_size)
    loss_d_src = 0.5 * soft_ce(src_d, torch.cat((src_soft, torch.zeros_like(src_soft)), 1))
    loss_d_src.backward()
    tgt_d = self.discriminator(tgt_fea.detach(), tgt_size)
    loss_d_tgt = 0.5 * soft_ce(tgt_d, torch.cat((torch.zeros_like(tgt_soft), tgt_soft), 1))
    loss_d_tgt.backward()
    self.opt_d.step()
    return {'loss_seg': loss_seg.item(), 'loss_adv_tgt': loss_adv_tgt.item(),
            'loss_D_src': loss_d_src.item(), 'loss_D_tgt': loss_d_tgt.item(),
            'loss_D': loss_d_src.item() + loss_d_tgt.item(), 'lr': lr}


def _adversarial_batches(seed=0, count=2):
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    labels = rng.integers(0, NUM_CLASSES, (4, 48, 64)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255
    batches.append({
        'source_image': rng.standard_normal((4, 48, 64, 3)).astype(np.float32),
        'source_label': labels,
        'target_image': rng.standard_normal((4, 40, 56, 3)).astype(np.float32),
    })
  return batches


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def adversarial_run():
  """Two stage-2 steps, JAX on the 4-device mesh and torch, from the same weights."""
  config = _config('adversarial')
  network = models.build(config)
  variables = jax.tree_util.tree_map(np.asarray, _variables(config))  # host copy: donation
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(0))
  mesh = parallel.make_mesh()
  shardings = parallel.state_sharding(state, mesh)
  step = parallel.jit_step(steps.make_step(config, network, state), mesh, shardings)
  state = jax.device_put(state, shardings)
  reference = TorchFADA(variables, frozen_bn=True)
  jax_metrics, torch_metrics = [], []
  for i, batch in enumerate(_adversarial_batches()):
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    jax_metrics.append({k: float(v) for k, v in metrics.items()})
    torch_metrics.append(reference.adversarial_step(
        i, _nchw(batch['source_image']), torch.from_numpy(batch['source_label'].astype(np.int64)),
        _nchw(batch['target_image'])))
  return dict(config=config, variables=variables, state=jax.device_get(state),
              reference=reference, jax_metrics=jax_metrics, torch_metrics=torch_metrics)


def test_adversarial_losses_match_torch(adversarial_run):
  for jax_metrics, torch_metrics in zip(adversarial_run['jax_metrics'],
                                        adversarial_run['torch_metrics']):
    for name in ('loss_seg', 'loss_adv_tgt', 'loss_D', 'loss_D_src', 'loss_D_tgt', 'lr'):
      assert jax_metrics[name] == pytest.approx(torch_metrics[name], rel=1e-5), name


def test_adversarial_parameters_match_torch(adversarial_run):
  state, reference = adversarial_run['state'], adversarial_run['reference']
  initial = adversarial_run['variables']
  for module, torch_params in (('feature_extractor', reference.fe),
                               ('classifier', reference.cls), ('discriminator', reference.disc)):
    jax_params = state.params[module]
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax_params)[0]:
      key = '/'.join(str(k.key) for k in path)
      got = np.asarray(leaf)
      start = np.asarray(_tree_get(initial[module]['params'], path))
      expected = torch_params[key].detach().numpy()
      if key.endswith('kernel'):
        expected = expected.transpose(2, 3, 1, 0)
      assert _rel(got, expected) < 1e-5, (module, key)
      # The updates themselves, so that a tiny learning rate cannot hide a wrong step.
      if np.any(expected != start):
        assert _rel(got - start, expected - start) < 1e-3, (module, key)


def _tree_get(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


def test_frozen_bn_receives_no_update_and_no_optimiser_state(adversarial_run):
  state, initial = adversarial_run['state'], adversarial_run['variables']['feature_extractor']
  changed_kernels = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.params['feature_extractor'])[0]:
    name = jax.tree_util.keystr(path)
    before = np.asarray(_tree_get(initial['params'], path))
    if "'scale'" in name or "'bias'" in name:
      np.testing.assert_array_equal(np.asarray(leaf), before, err_msg=name)
    else:
      changed_kernels += int(np.any(np.asarray(leaf) != before))
  assert changed_kernels > 0
  for got, before in zip(jax.tree_util.tree_leaves(state.batch_stats['feature_extractor']),
                         jax.tree_util.tree_leaves(initial['batch_stats'])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(before))
  # Masked leaves carry no momentum buffers: only kernels have SGD traces.
  traces = [leaf for leaf in jax.tree_util.tree_leaves(state.opt_state['feature_extractor'])
            if getattr(leaf, 'ndim', 0) == 4]
  kernels = [leaf for leaf in jax.tree_util.tree_leaves(state.params['feature_extractor'])
             if leaf.ndim == 4]
  assert len(traces) == len(kernels)
  assert state.step == 2


# ------------------------------------------------------------------ optimisers


def _toy_tree(rng):
  return {
      'feature_extractor': {'conv': {'kernel': rng.standard_normal((3, 3, 2, 4))},
                            'bn': {'scale': rng.standard_normal(4), 'bias': rng.standard_normal(4)}},
      'classifier': {'conv_0': {'kernel': rng.standard_normal((3, 3, 4, 5)),
                                'bias': rng.standard_normal(5)}},
      'discriminator': {'conv1': {'kernel': rng.standard_normal((3, 3, 4, 6)),
                                  'bias': rng.standard_normal(6)}},
  }


@pytest.mark.parametrize('freeze_bn', [True, False])
def test_optimisers_match_torch_optim(freeze_bn):
  """SGD (torch semantics, wd on biases), the classifier's 10x rate, Adam (0.9, 0.99) and
  the poly schedule at the pre-update step, over three steps of random gradients."""
  config = _config('adversarial', freeze_bn=freeze_bn)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), _toy_tree(rng))
  batch_stats = {'feature_extractor': {'bn': {'mean': jnp.zeros(4), 'var': jnp.ones(4)}}}
  optimizers = state_lib.make_optimizers(config, params, batch_stats)
  opt_state = {k: optimizers[k].init(params[k]) for k in params}
  torch_params = jax.tree_util.tree_map(
      lambda x: torch.tensor(np.asarray(x), requires_grad=True), params)
  frozen = {'scale', 'bias'} if freeze_bn else set()
  fea = [v for k, v in torch_params['feature_extractor']['conv'].items()] + [
      v for k, v in torch_params['feature_extractor']['bn'].items() if k not in frozen]
  opt_fea = torch.optim.SGD(fea, lr=BASE_LR, momentum=0.9, weight_decay=5e-4)
  opt_cls = torch.optim.SGD(jax.tree_util.tree_leaves(torch_params['classifier']),
                            lr=10 * BASE_LR, momentum=0.9, weight_decay=5e-4)
  opt_d = torch.optim.Adam(jax.tree_util.tree_leaves(torch_params['discriminator']),
                           lr=BASE_LR_D, betas=(0.9, 0.99))
  for it in range(3):
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    factor = (1 - it / MAX_ITER) ** 0.9
    for optimizer, lr in ((opt_fea, BASE_LR), (opt_cls, 10 * BASE_LR), (opt_d, BASE_LR_D)):
      for group in optimizer.param_groups:
        group['lr'] = lr * factor
    for t, g in zip(jax.tree_util.tree_leaves(torch_params), jax.tree_util.tree_leaves(grads)):
      t.grad = torch.tensor(np.asarray(g))
    for optimizer in (opt_fea, opt_cls, opt_d):
      optimizer.step()
    params, opt_state = state_lib.apply_updates(optimizers, params, grads, opt_state,
                                                params.keys())
    lrs = state_lib.schedules(config)
    assert float(lrs['classifier'](it)) == pytest.approx(10 * BASE_LR * factor, rel=1e-6)
    assert float(lrs['discriminator'](it)) == pytest.approx(BASE_LR_D * factor, rel=1e-6)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    expected = _tree_get(torch_params, path).detach().numpy()
    np.testing.assert_allclose(np.asarray(leaf), expected, rtol=2e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  bn_start = _toy_tree(np.random.default_rng(0))['feature_extractor']['bn']['scale']
  moved = not np.allclose(np.asarray(params['feature_extractor']['bn']['scale']), bn_start)
  assert moved != freeze_bn


@pytest.mark.parametrize('base_lr, max_iter', [(2.5e-4, 62500), (5e-3, 300), (1e-3, 7)])
def test_poly_schedule_is_the_release_formula(base_lr, max_iter):
  """base * (1 - it / max_iter)^0.9, compiled as the train step evaluates it; 0 from
  max_iter on."""
  schedule = jax.jit(state_lib.poly_schedule(base_lr, max_iter, 0.9))
  counts = np.unique(np.r_[np.arange(min(max_iter, 50)), np.linspace(0, max_iter - 1, 50),
                           np.arange(max(0, max_iter - 50), max_iter + 20)].astype(np.int32))
  got = np.asarray([schedule(jnp.int32(c)) for c in counts], np.float64)
  remaining = np.maximum(1 - counts / max_iter, 0)
  expected = base_lr * remaining ** 0.9
  before = counts < max_iter
  # float32 rounds it / max_iter by up to 2^-24 (absolute); the power turns that into a
  # relative error of 0.9 * 2^-24 / remaining, plus a few roundings of its own.
  bound = 0.9 * 2.0 ** -24 / remaining[before] + 8 * 2.0 ** -24
  np.testing.assert_array_less(np.abs(got[before] / expected[before] - 1), bound)
  np.testing.assert_array_equal(got[~before], 0.0)


def test_an_update_uses_the_learning_rate_of_the_updates_done_before_it():
  base_lr, max_iter = 0.5, 4
  optimizer = state_lib.torch_sgd(state_lib.poly_schedule(base_lr, max_iter, 0.9), 0.0, 0.0)
  params = jnp.zeros((), jnp.float32)
  opt_state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for it in range(max_iter + 1):
    updates, opt_state = update(jnp.ones((), jnp.float32), opt_state, params)
    expected = base_lr * (1 - it / max_iter) ** 0.9
    assert float(-updates) == pytest.approx(expected, rel=1e-6, abs=0)


def test_unknown_stage_is_a_user_error():
  with pytest.raises(UserError, match='config.stage'):
    state_lib.trainable_modules('warmup')


# ------------------------------------------------------------------ precision and remat


def test_bfloat16_with_remat_trains_with_float32_state():
  config = _config('source_only', freeze_bn=False, dtype='bfloat16', remat=True)
  network = models.build(config)
  variables = _variables(config)
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(0))
  # lax convolutions, as on the accelerators bfloat16 is meant for (cheaper to compile);
  # the matmul convolutions in bfloat16 are checked in tests/test_conv_dispatch.py.
  step = jax.jit(steps.make_step(config, network, state, matmul_convs=False))
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((2, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, NUM_CLASSES, (2, 32, 32)).astype(np.uint8)}
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss_seg']))
  for tree in (new_state.params, new_state.opt_state, new_state.batch_stats):
    for leaf in jax.tree_util.tree_leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  # The bfloat16 loss is the float32 loss up to bfloat16 rounding (a forward pass in
  # float32 of the same batch and weights, in training mode).
  network32 = models.build(_config('source_only', freeze_bn=False))

  @jax.jit
  def loss32(variables):
    fe = variables['feature_extractor']
    features, _ = network32.feature_extractor.apply(fe, batch['image'], train=True,
                                                    mutable=['batch_stats'])
    logits = network32.classifier.apply(variables['classifier'], features)
    logits = models.resize_bilinear_align_corners(logits, (32, 32))
    return losses.cross_entropy(logits, batch['label'])

  assert float(metrics['loss_seg']) == pytest.approx(float(loss32(variables)), rel=5e-2)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 new_state.params, state.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0
