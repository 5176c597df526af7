"""The scanned ResNet stages (resnet.ResNetFeatureExtractor(scan=True), with and without
remat) compute what the unrolled blocks compute, on the unrolled variable layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fada_jax.models import resnet
from fada_jax.models import conv_dispatch

DEPTH, WIDTH = 50, 4
# ResNet-50's bottlenecks with 3 blocks in every stage instead of 3, 4, 6, 3: every stage
# still scans 2 blocks after its first, and the unrolled programs compile in 3/4 the time.
SHORT_STAGES = (True, (3, 3, 3, 3))


@pytest.fixture(autouse=True, scope="module")
def _short_stages():
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(resnet.STAGES, DEPTH, SHORT_STAGES)
    yield


@functools.lru_cache(maxsize=None)
def _variables(seed):
  """Initialised variables with BN affine maps and running statistics away from 1 / 0.
  (One initialiser program, compiled once: op by op, each initialiser compiles its own.)"""
  model = resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)

  def randomize(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'scale'" in name or "'var'" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    if "'bias'" in name or "'mean'" in name:
      return jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), jnp.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(randomize, variables)


def _images(seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, 48, 56, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _unrolled(freeze_bn, train, seed):
  """The unrolled network's results on _variables(seed), _images(seed + 1)."""
  model = resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH, freeze_bn=freeze_bn,
                                        scan=False)
  return _loss_outputs_grads(model, _variables(seed), _images(seed + 1), train)


def _loss_outputs_grads(model, variables, images, train, matmul_convs=False):
  @jax.jit
  def run(params, batch_stats, images):
    def loss(params):
      with conv_dispatch.use_matmul_convs(matmul_convs):
        features, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                        images, train=train, mutable=["batch_stats"])
      return jnp.mean(features ** 2), (features, updates.get("batch_stats", {}))
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, (features, stats)), grads = run(variables["params"], variables["batch_stats"],
                                         images)
  return loss, features, grads, stats


def _assert_trees_close(got, want, rtol):
  """Leaf by leaf, relative to the leaf's largest magnitude (summation order differs)."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(got),
                        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-30)
    assert np.max(np.abs(a - b)) <= rtol * scale, (jax.tree_util.keystr(path[0]),
                                                   np.max(np.abs(a - b)) / scale)


def test_scan_keeps_the_unrolled_variable_layout():
  images = jnp.zeros((1, 32, 32, 3))
  shapes = {scan: jax.tree_util.tree_map(jnp.shape, jax.eval_shape(
      resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH, scan=scan).init,
      jax.random.PRNGKey(0), images)) for scan in (False, True)}
  assert shapes[True] == shapes[False]
  assert {f"layer3_{j}" for j in range(3)} <= set(shapes[True]["params"])
  assert "layer3_3" not in shapes[True]["params"]
  assert shapes[True]["params"]["layer3_2"]["conv1"]["kernel"] == (1, 1, 16 * WIDTH, 4 * WIDTH)


def test_scan_is_used_and_unrolled_is_not():
  variables, images = _variables(0), _images()

  def count_scans(scan):
    model = resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH, scan=scan)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    return str(jaxpr).count(" scan[")

  assert count_scans(False) == 0
  assert count_scans(True) == 4  # one per stage


@pytest.mark.parametrize("freeze_bn, remat", [(True, True), (False, False), (False, True)])
def test_scanned_stages_equal_unrolled_blocks(freeze_bn, remat):
  variables, images = _variables(0), _images()
  scanned = resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH, freeze_bn=freeze_bn,
                                          scan=True, remat=remat)
  want = _unrolled(freeze_bn, True, 0)
  got = _loss_outputs_grads(scanned, variables, images, train=True)
  # Same arithmetic in another order; trainable BN divides by batch standard deviations
  # of 2 x 6 x 7 values per channel in layer4, which amplifies rounding in the gradients.
  rtol = 1e-5 if freeze_bn else 2e-4
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  _assert_trees_close(got[1], want[1], 1e-5)
  _assert_trees_close(got[2], want[2], rtol)
  _assert_trees_close(got[3], want[3], 1e-5)
  # Trainable BN: every block's running statistics moved, layer3_2's included.
  moved = jax.tree_util.tree_map(lambda new, old: bool(np.any(new != old)), got[3],
                                 variables["batch_stats"])
  assert all(jax.tree_util.tree_leaves(moved)) != freeze_bn
  assert all(np.any(got[2]["layer3_2"][conv]["kernel"]) for conv in ("conv1", "conv2", "conv3"))


def test_scanned_stages_with_matmul_weight_gradients():
  # Frozen BN: well conditioned, so the products' summation order stays at rounding level.
  variables, images = _variables(0), _images()
  scanned = resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH, freeze_bn=True,
                                          scan=True, remat=True)
  want = _unrolled(True, True, 0)
  got = _loss_outputs_grads(scanned, variables, images, train=True, matmul_convs=True)
  _assert_trees_close(got[1], want[1], 1e-5)
  _assert_trees_close(got[2], want[2], 1e-5)


def test_scanned_stages_in_eval_mode_use_and_keep_the_running_statistics():
  variables, images = _variables(0), _images()
  scanned = resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH, freeze_bn=False,
                                          scan=True)
  want = _unrolled(False, False, 0)
  got = _loss_outputs_grads(scanned, variables, images, train=False)
  _assert_trees_close(got[1], want[1], 1e-5)
  _assert_trees_close(got[2], want[2], 1e-5)
  _assert_trees_close(got[3], variables["batch_stats"], 0)


def test_scanned_stages_in_bfloat16():
  variables, images = _variables(0), _images()
  model = resnet.ResNetFeatureExtractor(depth=DEPTH, width=WIDTH, dtype="bfloat16",
                                        freeze_bn=True, scan=True, remat=True)
  _, features, grads, _ = _loss_outputs_grads(model, variables, images, train=True)
  assert features.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
  want = _unrolled(True, True, 0)[1]
  error = np.max(np.abs(features - want)) / np.max(np.abs(want))
  assert 0 < error < 0.1


def test_evaluation_folds_batch_norm_into_the_scanned_blocks():
  """Inference with remat on (stages scanned), BN folded and 1x1 convs as products,
  gives the logits of the plain unrolled network."""
  from fada_jax import config_lib, evaluate, models  # pylint: disable=g-import-not-at-top
  config = config_lib.make_config("g2c", "source_only", f"resnet{DEPTH}")
  config.model.width, config.model.num_classes, config.model.freeze_bn = WIDTH, 5, False
  variables = models.init_variables(models.build(config), jax.random.PRNGKey(0), config,
                                    parts=["classifier"])
  variables["feature_extractor"] = _variables(0)
  plain = evaluate.Predictor(config, fold_batch_norm=False, convs_as_matmuls=False)
  config.model.remat = True
  fast = evaluate.Predictor(config)
  assert fast.models.feature_extractor.remat
  images = _images()
  logits = [np.asarray(jax.jit(p.logits)(p.place_variables(variables), images))
            for p in (plain, fast)]
  np.testing.assert_allclose(logits[1], logits[0], atol=1e-4 * np.abs(logits[0]).max())


def test_remat_steps_of_two_blocks_equal_unrolled_blocks(monkeypatch):
  # A bottleneck net whose layer3 has 4 blocks after its first: 2 scan steps of 2 blocks.
  monkeypatch.setitem(resnet.STAGES, 26, (True, (2, 2, 5, 2)))
  variables = jax.jit(resnet.ResNetFeatureExtractor(depth=26, width=WIDTH).init)(
      jax.random.PRNGKey(5), jnp.zeros((1, 32, 32, 3)))
  variables["batch_stats"] = jax.tree_util.tree_map(
      lambda leaf: leaf + 0.3 * jnp.abs(jnp.sin(jnp.arange(leaf.size, dtype=jnp.float32))),
      variables["batch_stats"])
  images = _images()
  results = [_loss_outputs_grads(
      resnet.ResNetFeatureExtractor(depth=26, width=WIDTH, freeze_bn=False, **kwargs),
      variables, images, train=True) for kwargs in (dict(scan=False), dict(remat=True))]
  want, got = results
  _assert_trees_close(got[1], want[1], 1e-5)
  _assert_trees_close(got[2], want[2], 2e-4)
  _assert_trees_close(got[3], want[3], 1e-5)
  scanned = resnet.ResNetFeatureExtractor(depth=26, width=WIDTH, remat=True)
  jaxpr = str(jax.make_jaxpr(lambda v: scanned.apply(v, images, train=False))(variables))
  assert jaxpr.count(" scan[") == 1 and "length=2" in jaxpr
