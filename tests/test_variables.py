"""The one check that loaded variables fit the config's network (models/variables.py)."""

import jax
import ml_collections
import numpy as np
import pytest

from fada_jax.errors import UserError
from fada_jax.models import variables as variables_lib

MODEL = ml_collections.ConfigDict({"arch": "resnet18", "width": 8, "num_classes": 19})
EXPECTED = {"params": {"conv1": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 8), np.float32)},
                       "bn1": {"scale": jax.ShapeDtypeStruct((8,), np.float32)}},
            "batch_stats": {"bn1": {"mean": jax.ShapeDtypeStruct((8,), np.float32)}}}


def _loaded(dtype=np.float32):
  return jax.tree_util.tree_map(lambda s: np.arange(np.prod(s.shape), dtype=dtype)
                                .reshape(s.shape), EXPECTED)


def test_fit_returns_the_loaded_values_in_the_expected_dtypes():
  loaded = _loaded(np.float64)
  fitted = variables_lib.fit("feature_extractor", loaded, EXPECTED, "checkpoint c", MODEL)
  assert jax.tree_util.tree_structure(fitted) == jax.tree_util.tree_structure(EXPECTED)
  for got, given in zip(jax.tree_util.tree_leaves(fitted), jax.tree_util.tree_leaves(loaded)):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, given)


@pytest.mark.parametrize("change, message", [
    (lambda v: v["params"].pop("bn1"),
     r"checkpoint c does not match config.model \(arch=resnet18, width=8, num_classes=19\): "
     r"feature_extractor/params/bn1/scale is missing \(1 tensor"),
    (lambda v: v["batch_stats"]["bn1"].update(var=np.ones(8, np.float32)),
     r"feature_extractor/batch_stats/bn1/var is not a tensor of the config's network"),
    (lambda v: v["params"]["conv1"].update(kernel=np.ones((3, 3, 3, 16), np.float32)),
     r"feature_extractor/params/conv1/kernel has shape \(3, 3, 3, 16\), the config's "
     r"network needs \(3, 3, 3, 8\)$"),
])
def test_a_tensor_that_does_not_fit_is_named(change, message):
  loaded = _loaded()
  change(loaded)
  with pytest.raises(UserError, match=message):
    variables_lib.check_fit("feature_extractor", loaded, EXPECTED, "checkpoint c", MODEL)
  with pytest.raises(UserError, match=message):
    variables_lib.fit("feature_extractor", loaded, EXPECTED, "checkpoint c", MODEL)
