"""Training steps and optimisers against the release's iterations restated in torch.

The torch side is tests/torch_reference.py: the release's networks (state dicts in the
release's key layout) and its `train_src` / `train_adv` / `train_self_distill` iterations
with torch.optim. Each parity run writes the torch networks as a release checkpoint,
converts it with the project's converter and starts the JAX run from it through
`config.init_checkpoint`, as a user continuing from a released model would; the torch
networks after the steps are converted the same way to compare every parameter and
running statistic. The reference is torch in float64; torch's own float32 run of the same
steps measures how far float32 rounding alone moves each leaf (see `_compare_variables`).
The JAX steps run on the 4 simulated devices of tests/conftest.py, so
trainable BN is checked against torch BN over the whole batch (the release's SyncBatchNorm).
"""

import contextlib
import copy
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import torch_reference
from tiny_runs import brute_force_metrics
from fada_jax import config_lib, convert, losses, models
from fada_jax.errors import UserError
from fada_jax.train import initialization, parallel, state as state_lib, steps

WIDTH = 8
NUM_CLASSES = 5
BASE_LR, BASE_LR_D, MAX_ITER = 0.005, 1e-4, 10
STEPS = 2
# All against torch float64. Losses: float32 rounding of the same sums, relative.
LOSS_TOLERANCE = 1e-5
# Parameters and running statistics: max |jax - torch| over each leaf's max |torch|.
LEAF_TOLERANCE = 1e-5
# The change over the steps, norm-wise relative: an update far below a leaf's scale
# cannot hide behind LEAF_TOLERANCE.
UPDATE_TOLERANCE = 1e-4
# Where torch's own float32 run is further from float64 than the tolerances above,
# float32 itself is that imprecise there and JAX's float32 may be as far on another
# machine: a multiple of torch's error bounds it (see `_compare_variables`).
FLOAT32_NOISE_FACTOR = 4


def _config(stage, freeze_bn=True, depth=18, base_lr=BASE_LR, **model):
  # The published solver (temperature, clipping, adversarial weight), a small network.
  config = config_lib.make_config('g2c', stage, f'resnet{depth}')
  config.model.width = WIDTH
  config.model.num_classes = NUM_CLASSES
  config.model.freeze_bn = freeze_bn
  for key, value in model.items():
    config.model[key] = value
  config.solver.base_lr, config.solver.base_lr_d = base_lr, BASE_LR_D
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


def _rel(a, b):
  """Norm-wise relative error ||a - b|| / ||b||."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _tree_get(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


# ------------------------------------------------------------------ torch <-> converted


def _release_networks(freeze_bn, seed, discriminator, depth=18):
  """The release's modules: ResNet-`depth` (width 8) with frozen or trainable BN and random
  non-trivial BN statistics, ASPP with its N(0, 0.01) init, torch's default D init."""
  torch.manual_seed(seed)
  norm = torch_reference.FrozenBatchNorm2d if freeze_bn else nn.BatchNorm2d
  backbone = torch_reference.randomize(torch_reference.ResNet(depth, WIDTH, norm), seed)
  with torch.no_grad():
    # Two stem channels of tiny variance at the usual scale after BN: there BN's epsilon
    # (1e-5 when trained; none when frozen, as in the release) changes the output by tens
    # of percent, so a wrong one shows. Trained BN normalises by the batch variance, so
    # the conv's output is made small; frozen BN divides by the running variance alone,
    # and its weight is made small instead: a small conv kernel behind a x300 BN would
    # get a x300 gradient, and its first update would blow up those channels (and the
    # losses after it) far beyond what float32 can compare.
    if freeze_bn:
      backbone.bn1.weight[:2] *= 3e-3
    else:
      backbone.conv1.weight[:2] *= 3e-3
    backbone.bn1.running_var[:2] *= 1e-5
  feature_extractor = torch_reference.FeatureExtractor(backbone)
  classifier = torch_reference.ASPPClassifier(backbone.out_channels, NUM_CLASSES)
  disc = (torch_reference.PixelDiscriminator(backbone.out_channels, NUM_CLASSES)
          if discriminator else None)
  return feature_extractor, classifier, disc


def _release_file(folder, name, networks, iteration):
  """The networks as a release checkpoint: 'module.' prefixes, the release's extra entries."""
  path = folder / f'{name}.pth'
  checkpoint = torch_reference.fada_checkpoint(*networks, ddp_prefix=True, iteration=iteration)
  checkpoint['optimizer_fea'] = {'state': {}, 'param_groups': []}
  torch.save(checkpoint, path)
  return path


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _images(rng, shape):
  """Rows of different scales: BN statistics per device differ from the global ones."""
  spread = 1.0 + 0.5 * np.arange(shape[0], dtype=np.float32)[:, None, None, None]
  return (rng.standard_normal(shape).astype(np.float32) * spread)


def _labels(rng, shape):
  labels = rng.integers(0, NUM_CLASSES, shape).astype(np.uint8)
  labels[rng.random(shape) < 0.2] = 255
  labels[0, : shape[1] // 2] = 255  # uneven ignore counts across devices
  return labels


def _segmentation_batches(seed=1):
  # Not seed 0: its early-layer updates jump by 1e-3 (relative) under a 1e-5 relative
  # perturbation of the logits' gradient, so float32 rounding picks one of two results
  # there. Seed 1 moves by under 1e-6 up to 1e-4 perturbations (torch float32, frozen BN).
  rng = np.random.default_rng(seed)
  return [{'image': _images(rng, (8, 48, 64, 3)), 'label': _labels(rng, (8, 48, 64))}
          for _ in range(STEPS)]


def _adversarial_batches(seed=0):
  rng = np.random.default_rng(seed)
  return [{'source_image': _images(rng, (4, 48, 64, 3)),
           'source_label': _labels(rng, (4, 48, 64)),
           'target_image': _images(rng, (4, 40, 56, 3))} for _ in range(STEPS)]


def _jax_steps(config, variables, batches):
  """`STEPS` steps of config.stage on the 4-device mesh; (host state, [metrics])."""
  network = models.build(config)
  variables = jax.tree_util.tree_map(np.asarray, variables)  # host copy: donation
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(0))
  mesh = parallel.make_mesh()
  assert mesh.size == 4, 'tests/conftest.py provides 4 CPU devices'
  shardings = parallel.state_sharding(state, mesh)
  step = parallel.jit_step(steps.make_step(config, network, state), mesh, shardings)
  state = jax.device_put(state, shardings)
  history = []
  for batch in batches:
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    history.append({k: float(v) for k, v in metrics.items()})
  return jax.device_get(state), history


def _torch_steps(networks, batches, adversarial, dtype, base_lr=BASE_LR):
  """The release's iterations over `networks` (trained in place) in `dtype`; [metrics]."""
  trainer = torch_reference.ReleaseTrainer(*networks, base_lr=base_lr, base_lr_d=BASE_LR_D,
                                           max_iter=MAX_ITER)
  metrics = []
  for i, batch in enumerate(batches):
    if adversarial:
      metrics.append(trainer.adversarial_step(
          _nchw(batch['source_image']).to(dtype),
          torch.from_numpy(batch['source_label'].astype(np.int64)),
          _nchw(batch['target_image']).to(dtype), iteration=i))
    else:
      metrics.append(trainer.segmentation_step(
          _nchw(batch['image']).to(dtype), torch.from_numpy(batch['label'].astype(np.int64)),
          iteration=i))
  return metrics


def _converted_change(folder, before, networks, arch):
  """The change of float64 `networks` since the checkpoint `before`, in the converted
  layout, float64. The converter writes float32, so it converts the change (a layout
  map, linear): rounding the change, not the leaf, keeps the update exact to float32."""
  after = torch_reference.fada_checkpoint(*networks)
  change = {part: {key: (value - before[part][key]) if value.is_floating_point() else value
                   for key, value in state.items()}
            for part, state in after.items() if part != 'iteration'}
  change['iteration'] = 0
  path = folder / 'change.pth'
  torch.save(change, path)
  return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64),
                                convert.convert_file(path, arch, progress=False).variables)


def _run(tmp_path_factory, stage, freeze_bn, depth=18, base_lr=BASE_LR):
  """The same `STEPS` steps in JAX (from the converted release checkpoint) and in torch,
  float64 and float32, of a ResNet-`depth` (width WIDTH)."""
  folder = tmp_path_factory.mktemp(f'{stage}_{"frozen" if freeze_bn else "trainable"}_{depth}')
  adversarial = stage == 'adversarial'
  arch = f'resnet{depth}'
  networks = _release_networks(freeze_bn, seed=1, discriminator=adversarial, depth=depth)
  networks64 = tuple(None if n is None else copy.deepcopy(n).double() for n in networks)
  before64 = torch_reference.fada_checkpoint(*networks64)
  config = _config(stage, freeze_bn=freeze_bn, depth=depth, base_lr=base_lr)
  converted = folder / 'initial'
  convert.convert_and_save(_release_file(folder, 'initial', networks, iteration=18000),
                           converted, arch, progress=False)
  config.init_checkpoint = str(converted)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    variables = initialization.initial_variables(
        config, models.build(config), jax.random.PRNGKey(3))

  batches = _adversarial_batches() if adversarial else _segmentation_batches()
  torch_metrics = _torch_steps(networks64, batches, adversarial, torch.float64, base_lr)
  _torch_steps(networks, batches, adversarial, torch.float32, base_lr)
  state, jax_metrics = _jax_steps(config, variables, batches)
  torch32 = convert.convert_file(_release_file(folder, 'trained', networks, iteration=0),
                                 arch, progress=False).variables
  return dict(config=config, initial=jax.device_get(variables), state=state,
              change=_converted_change(folder, before64, networks64, arch), torch32=torch32,
              jax_metrics=jax_metrics, torch_metrics=torch_metrics,
              printed=printed.getvalue(), init_checkpoint=str(converted))


def _compare_losses(run, names):
  worst = 0.0
  for jax_metrics, torch_metrics in zip(run['jax_metrics'], run['torch_metrics']):
    for name in names:
      error = abs(jax_metrics[name] - torch_metrics[name]) / abs(torch_metrics[name])
      worst = max(worst, error)
      assert error <= LOSS_TOLERANCE, (name, jax_metrics[name], torch_metrics[name])
  return worst


def _compare_variables(run):
  """Every parameter and running statistic after the steps against torch float64's.

  SGD leaves and running statistics: max |jax - torch| over the leaf's max |torch|.
  Adam leaves (the discriminator): Adam divides each gradient element by its own running
  RMS, so an element whose gradient is at rounding level moves by up to the learning rate
  whatever its rounding; their bound is norm-wise over the leaf instead. Moved leaves
  also bound the change over the steps, norm-wise relative (UPDATE_TOLERANCE).

  Each bound is LEAF_TOLERANCE (UPDATE_TOLERANCE) or FLOAT32_NOISE_FACTOR times torch
  float32's own error on that leaf, whichever is larger. The second term is float32's
  conditioning measured, not assumed: with the data of seed 0 (see
  `_segmentation_batches`) torch float32 was 1e-3 off float64 in the updates of the
  layers before layer3 (up to 5e-5 of their scale) while JAX was 3e-6 off, and either
  could be the far one on another machine or with another summation order (with a
  gather-and-lerp resize, whose gradient sums in torch's order, JAX was as far as torch
  and within 1e-7 of it).
  A wrong learning rate or update formula moves every leaf, the late layers included,
  where float32 is well conditioned and the fixed tolerances hold.
  Returns the worst (max-wise error, norm-wise error, update error), each over its bound.
  """
  state, change, initial, torch32 = run['state'], run['change'], run['initial'], run['torch32']
  got = {part: {'params': state.params[part]} for part in state.params}
  got['feature_extractor']['batch_stats'] = state.batch_stats['feature_extractor']
  worst_leaf = worst_norm = worst_update = 0.0
  moved = 0
  for part in got:
    for path, leaf in jax.tree_util.tree_flatten_with_path(got[part])[0]:
      name = f'{part}{jax.tree_util.keystr(path)}'
      start = np.asarray(_tree_get(initial[part], path), np.float64)
      step = _tree_get(change[part], path)
      want = start + step
      leaf = np.asarray(leaf, np.float64)
      leaf32 = np.asarray(_tree_get(torch32[part], path), np.float64)

      def errors(x):
        return float(np.max(np.abs(x - want)) / np.max(np.abs(want))), _rel(x, want)

      (error, norm_error), (error32, norm_error32) = errors(leaf), errors(leaf32)
      if part == 'discriminator':
        error, error32 = norm_error, norm_error32
      bound = max(LEAF_TOLERANCE, FLOAT32_NOISE_FACTOR * error32)
      worst_leaf = max(worst_leaf, error / bound)
      worst_norm = max(worst_norm, norm_error / max(LEAF_TOLERANCE,
                                                    FLOAT32_NOISE_FACTOR * norm_error32))
      assert error <= bound, (name, error, bound)
      if np.any(step != 0):
        moved += 1
        update_error = _rel(leaf - start, step)
        update_bound = max(UPDATE_TOLERANCE,
                           FLOAT32_NOISE_FACTOR * _rel(leaf32 - start, step))
        worst_update = max(worst_update, update_error / update_bound)
        assert update_error <= update_bound, (name, update_error, update_bound)
      else:
        np.testing.assert_array_equal(leaf, start, err_msg=name)
  assert moved > 0
  return worst_leaf, worst_norm, worst_update


SEGMENTATION_RUNS = [('source_only', True), ('source_only', False),
                     ('self_distill', True), ('self_distill', False)]


@pytest.fixture(scope='module', params=SEGMENTATION_RUNS,
                ids=[f'{s}-{"frozen" if f else "trainable"}_bn' for s, f in SEGMENTATION_RUNS])
def segmentation_run(request, tmp_path_factory):
  return _run(tmp_path_factory, *request.param)


def test_segmentation_steps_match_the_release(segmentation_run):
  """Stages 1 and 3: losses, parameters and (trainable BN) running statistics."""
  loss_error = _compare_losses(segmentation_run, ('loss_seg', 'lr'))
  leaf_error, norm_error, update_error = _compare_variables(segmentation_run)
  config = segmentation_run['config']
  print(f'\n{config.stage} freeze_bn={config.model.freeze_bn}: loss rel {loss_error:.1e}, '
        f'max leaf error/bound {leaf_error:.2f} (norm-wise {norm_error:.2f}), '
        f'update error/bound {update_error:.2f}')
  batch_stats = segmentation_run['state'].batch_stats['feature_extractor']
  initial = segmentation_run['initial']['feature_extractor']['batch_stats']
  stats_moved = any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(batch_stats), jax.tree_util.tree_leaves(initial)))
  assert stats_moved != config.model.freeze_bn


# (depth, base rate). Bottlenecks: the published configs' blocks (1x1 convs, the stride on
# the 3x3, three frozen BNs, a downsample in every stage), at the published stage-2 rate:
# their 256 output channels give the classifier larger gradients, and at BASE_LR its
# first update would be 3x its norm (loss_seg 2.5 -> 302), where float32 compares poorly.
ADVERSARIAL_RUNS = [(18, BASE_LR), (50, 2.5e-4)]


@pytest.fixture(scope='module', params=ADVERSARIAL_RUNS,
                ids=[f'resnet{depth}' for depth, _ in ADVERSARIAL_RUNS])
def adversarial_run(request, tmp_path_factory):
  """Stage 2 continued from a converted stage-2 release checkpoint holding model_D, with
  basic blocks and with bottlenecks."""
  depth, base_lr = request.param
  return _run(tmp_path_factory, 'adversarial', True, depth=depth, base_lr=base_lr)


def test_adversarial_steps_from_a_release_checkpoint_match_the_release(adversarial_run):
  loss_error = _compare_losses(adversarial_run, ('loss_seg', 'loss_adv_tgt', 'loss_D',
                                                 'loss_D_src', 'loss_D_tgt', 'lr', 'lr_D'))
  leaf_error, norm_error, update_error = _compare_variables(adversarial_run)
  print(f'\nadversarial {adversarial_run["config"].model.arch} from a release checkpoint: '
        f'loss rel {loss_error:.1e}, '
        f'max leaf error/bound {leaf_error:.2f} (norm-wise {norm_error:.2f}), '
        f'update error/bound {update_error:.2f}')
  assert adversarial_run['printed'] == (
      'initial variables: loaded feature_extractor, classifier, discriminator from '
      f'{adversarial_run["init_checkpoint"]}\n')


def test_frozen_bn_has_no_optimiser_state(adversarial_run):
  """Frozen BN (unchanged, checked above) carries no momentum: only kernels have traces."""
  state = adversarial_run['state']
  traces = [leaf for leaf in jax.tree_util.tree_leaves(state.opt_state['feature_extractor'])
            if getattr(leaf, 'ndim', 0) == 4]
  kernels = [leaf for leaf in jax.tree_util.tree_leaves(state.params['feature_extractor'])
             if leaf.ndim == 4]
  vectors = [leaf for leaf in jax.tree_util.tree_leaves(state.opt_state['feature_extractor'])
             if getattr(leaf, 'ndim', 0) == 1]
  assert len(traces) == len(kernels) and not vectors
  assert state.step == STEPS


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


# ------------------------------------------------------------------ learning


def _brute_force_miou(predictions, labels, num_classes):
  return float(brute_force_metrics([(predictions, labels)], num_classes)[0])


def test_source_only_stage_learns_a_fixed_batch():
  """The step trains: on one fixed batch of synthetic street scenes the loss falls to a
  fraction of its start, and the trained network's mIoU on the batch (eval-mode BN, as
  evaluation runs it) beats the best constant prediction."""
  from fada_jax.data import synthetic, transforms  # pylint: disable=g-import-not-at-top
  config = config_lib.make_config('demo', 'source_only', 'resnet18')
  config.model.width = WIDTH
  config.solver.max_iter = config.solver.stop_iter = 1000  # a near-constant rate
  num_classes = int(config.model.num_classes)
  frames = synthetic.make_synthetic_source('source', 'train', num_classes, size=4, seed=0,
                                           image_size=(64, 32))
  batch = {'image': np.stack([transforms.normalize(frames[i]['image'], 'imagenet')
                              for i in range(4)]),
           'label': np.stack([frames[i]['label'] for i in range(4)])}
  network = models.build(config)
  variables = models.init_variables(network, jax.random.PRNGKey(0), config)
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(0))
  step = jax.jit(steps.make_step(config, network, state))
  losses_seen = []
  for _ in range(60):
    state, metrics = step(state, batch)
    losses_seen.append(float(metrics['loss_seg']))

  @jax.jit
  def predict(params, batch_stats):
    features = network.feature_extractor.apply(
        {'params': params['feature_extractor'], 'batch_stats': batch_stats['feature_extractor']},
        batch['image'], train=False)
    logits = network.classifier.apply({'params': params['classifier']}, features)
    return jnp.argmax(models.resize_bilinear_align_corners(logits, (32, 64)), axis=-1)

  predictions = np.asarray(predict(state.params, state.batch_stats))
  labels = batch['label']
  counts = np.bincount(labels[labels != 255].ravel(), minlength=num_classes)
  constant = max(_brute_force_miou(np.full_like(labels, c), labels, num_classes)
                 for c in np.flatnonzero(counts))
  miou = _brute_force_miou(predictions, labels, num_classes)
  print(f'\nloss {losses_seen[0]:.3f} -> {losses_seen[-1]:.3f}; mIoU {miou:.3f}, '
        f'best constant {constant:.3f}')
  assert np.mean(losses_seen[-5:]) < 0.5 * losses_seen[0]
  assert miou > 2 * constant
