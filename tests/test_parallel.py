"""Data parallelism: 4 simulated devices (tests/conftest.py) equal 1 on the same global batch.

Equal up to float rounding: the two programs sum the batch in another order. The
comparison is made where rounding stays at rounding size (see
test_four_devices_equal_one_device_with_trainable_bn), so it holds on any machine.
"""

import jax
import numpy as np
import pytest

from fada_jax import config_lib, models
from fada_jax.errors import UserError
from fada_jax.train import parallel, state as state_lib, steps


def _config(stage='source_only', batch_size=4):
  config = config_lib.make_config('g2c', stage, 'resnet18')
  config.model.width = 8
  config.model.num_classes = 5
  config.model.freeze_bn = False  # trainable BN: its statistics must be global
  config.solver.batch_size = batch_size
  config.solver.base_lr = 0.05
  return config


def _train(config, mesh, variables, batches):
  """(host state after the first step, the loss of every step)."""
  network = models.build(config)
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(0))
  shardings = parallel.state_sharding(state, mesh)
  # lax convolutions (cheaper to compile); test_steps covers the matmul convs on 4 devices.
  step = parallel.jit_step(steps.make_step(config, network, state, matmul_convs=False), mesh,
                           shardings)
  state = jax.device_put(state, shardings)
  history, first = [], None
  for batch in batches:
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    history.append(float(metrics['loss_seg']))
    if first is None:
      first = jax.device_get(state)
  return first, history


def test_four_devices_equal_one_device_with_trainable_bn():
  config = _config()
  assert jax.device_count() == 4
  variables = jax.tree_util.tree_map(
      np.asarray, models.init_variables(models.build(config), jax.random.PRNGKey(0), config))
  rng = np.random.default_rng(0)
  # BN affines of a trained network rather than the init's zero biases: a leaf that
  # starts at zero is, after one step, its gradient alone, whose rounding is not small.
  for block in jax.tree_util.tree_leaves(
      variables['feature_extractor']['params'], is_leaf=lambda node: 'scale' in node):
    if isinstance(block, dict) and 'scale' in block:
      block['scale'] = (1 + 0.2 * rng.standard_normal(block['scale'].shape)).astype(np.float32)
      block['bias'] = (0.2 * rng.standard_normal(block['bias'].shape)).astype(np.float32)
  batches = []
  for _ in range(2):
    labels = rng.integers(0, 5, (4, 32, 32)).astype(np.uint8)
    labels[:2, :16] = 255  # uneven ignore counts across devices: the mean must be global
    batches.append({'image': rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
                    'label': labels})
  one_state, one_losses = _train(config, parallel.make_mesh(jax.devices()[:1]), variables,
                                 batches)
  four_state, four_losses = _train(config, parallel.make_mesh(), variables, batches)
  # Losses are means of positive terms (well conditioned); the second one depends on
  # every update of the first step.
  np.testing.assert_allclose(four_losses, one_losses, rtol=1e-5)
  # After one step: the running statistics (global means, forward only) and the
  # parameters p - lr * (g + wd p), where the gradient's rounding enters scaled by lr.
  # Not the gradients themselves (the SGD traces): BN's bias and scale gradients are
  # sums of terms that cancel heavily, whose rounding is far above rounding size and
  # machine dependent; nor states after several steps, which compound it.
  worst = 0.0
  for tree in ('params', 'batch_stats'):
    one = jax.tree_util.tree_leaves_with_path(getattr(one_state, tree))
    four = jax.tree_util.tree_leaves(getattr(four_state, tree))
    for (path, a), b in zip(one, four):
      scale = max(float(np.max(np.abs(a))), 1e-6)
      error = float(np.max(np.abs(a - b))) / scale
      worst = max(worst, error)
      assert error < 2e-5, jax.tree_util.keystr(path)
  print(f'\n1 vs 4 devices after one step: worst error/scale {worst:.1e}')
  # The running statistics moved, so the comparison above covers the BN sync.
  initial = variables['feature_extractor']['batch_stats']
  moved = [float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(one_state.batch_stats['feature_extractor']),
      jax.tree_util.tree_leaves(initial))]
  assert max(moved) > 1e-3


def test_batch_sizes_keep_the_release_meaning():
  mesh = parallel.make_mesh()
  assert parallel.local_batch_sizes(_config('adversarial', 8), mesh) == {
      'source_image': 4, 'source_label': 4, 'target_image': 4}
  assert parallel.local_batch_sizes(_config('source_only', 8), mesh) == {'image': 8, 'label': 8}
  with pytest.raises(UserError, match='batch_size=4'):
    parallel.local_batch_sizes(_config('adversarial', 4), mesh)  # 2 + 2 over 4 devices
  with pytest.raises(UserError, match='even'):
    parallel.local_batch_sizes(_config('adversarial', 7), parallel.make_mesh(jax.devices()[:1]))
  with pytest.raises(UserError, match='batch_size=6'):
    parallel.local_batch_sizes(_config('source_only', 6), mesh)


def test_shard_batch_places_rows_on_devices_in_order():
  mesh = parallel.make_mesh()
  images = np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3)
  batch = parallel.shard_batch({'image': images}, mesh)
  assert batch['image'].shape == (8, 2, 2, 3)
  np.testing.assert_array_equal(np.asarray(batch['image']), images)
  for shard in batch['image'].addressable_shards:
    assert shard.data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(shard.data), images[shard.index])
  with pytest.raises(UserError, match='multiple of its 4 devices'):
    parallel.shard_batch({'image': images[:6]}, mesh)
