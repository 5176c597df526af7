"""Data parallelism: 4 simulated devices (tests/conftest.py) equal 1 on the same global batch."""

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
  network = models.build(config)
  state = state_lib.create_train_state(config, network, variables, jax.random.PRNGKey(0))
  shardings = parallel.state_sharding(state, mesh)
  # lax convolutions (cheaper to compile); test_steps covers the matmul convs on 4 devices.
  step = parallel.jit_step(steps.make_step(config, network, state, matmul_convs=False), mesh,
                           shardings)
  state = jax.device_put(state, shardings)
  history = []
  for batch in batches:
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    history.append(float(metrics['loss_seg']))
  return jax.device_get(state), history


def test_four_devices_equal_one_device_with_trainable_bn():
  config = _config()
  assert jax.device_count() == 4
  variables = jax.tree_util.tree_map(
      np.asarray, models.init_variables(models.build(config), jax.random.PRNGKey(0), config))
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    labels = rng.integers(0, 5, (4, 32, 32)).astype(np.uint8)
    labels[:2, :16] = 255  # uneven ignore counts across devices: the mean must be global
    batches.append({'image': rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
                    'label': labels})
  one_state, one_losses = _train(config, parallel.make_mesh(jax.devices()[:1]), variables,
                                 batches)
  four_state, four_losses = _train(config, parallel.make_mesh(), variables, batches)
  np.testing.assert_allclose(four_losses, one_losses, rtol=1e-5)
  for tree in ('params', 'batch_stats'):
    one = jax.tree_util.tree_leaves_with_path(getattr(one_state, tree))
    four = jax.tree_util.tree_leaves(getattr(four_state, tree))
    for (path, a), b in zip(one, four):
      scale = max(float(np.max(np.abs(a))), 1e-6)
      assert float(np.max(np.abs(a - b))) / scale < 2e-5, jax.tree_util.keystr(path)
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
