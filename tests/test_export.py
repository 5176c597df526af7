"""tools/export.py: the serialized inference function, loaded in a fresh process with plain
jax (fada_jax never imported), predicts what model.predict predicts, pixel for pixel."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import fada_jax
from fada_jax import export
from fada_jax.errors import UserError
from fada_jax.models import layers
from test_api import save_training_step
from test_evaluate import make_config, random_variables

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter, outside the repository, with only jax and numpy.
PLAIN_JAX = """
import sys
import jax, numpy as np
images = np.load(sys.argv[2])
for index, path in enumerate(sys.argv[3:]):
  exported = jax.export.deserialize(open(path, 'rb').read())
  arrays = [v for k, v in sorted(images.items()) if k.startswith(f'{index}_')]
  np.savez(f'{sys.argv[1]}_{index}.npz', *[np.asarray(exported.call(a)) for a in arrays])
assert not any(name.split('.')[0] == 'fada_jax' for name in sys.modules), 'fada_jax imported'
"""


@pytest.mark.parametrize("in_size, out_size", [(5, 40), (40, 5), (7, 7), (1, 9), (9, 1),
                                               (33, 257), (129, 1024)])
def test_traced_interpolation_matrix_is_the_host_one(in_size, out_size):
  # pylint: disable=protected-access
  host = layers._align_corners_matrix(in_size, out_size)
  traced = np.asarray(layers._traced_align_corners_matrix(in_size, out_size))
  # The same non-zeros; weights within one float32 rounding (XLA may divide by a constant
  # as a product with its reciprocal).
  np.testing.assert_array_equal(traced != 0, host != 0)
  np.testing.assert_allclose(traced, host, rtol=0, atol=np.finfo(np.float32).eps)  # w <= 1
  np.testing.assert_allclose(traced.sum(axis=1), 1.0, rtol=1e-6)


def test_export_round_trip_in_a_process_without_fada_jax(tmp_path):
  config = make_config("unused")
  step_dir = save_training_step(tmp_path / "checkpoints", config, random_variables(config, 4))
  fixed = tmp_path / "model.jax"
  result = subprocess.run(
      [sys.executable, "tools/export.py", f"--checkpoint={step_dir}", f"--output={fixed}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith(f"wrote {fixed} (") and "uint8[n, 32, 64, 3]" in result.stdout
  described = json.loads((tmp_path / "model.jax.json").read_text())
  assert (described["height"], described["width"]) == (32, 64)
  assert len(described["class_names"]) == 19

  model = fada_jax.load(step_dir)
  symbolic = tmp_path / "any_size.jax"
  export.write_export(export.export_model(model, export.SYMBOLIC), model, symbolic,
                      export.SYMBOLIC)

  rng = np.random.default_rng(7)
  batch = rng.integers(0, 256, (3, 32, 64, 3), np.uint8)  # at the test size
  other = rng.integers(0, 256, (2, 48, 80, 3), np.uint8)  # any multiple of 8
  np.savez(tmp_path / "images.npz", **{"0_a": batch, "1_a": batch, "1_b": other})
  result = subprocess.run(
      [sys.executable, "-c", PLAIN_JAX, str(tmp_path / "out"), str(tmp_path / "images.npz"),
       str(fixed), str(symbolic)],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]

  expected = model.predict(batch)  # the test size: no resize, ids at the input size
  assert len(np.unique(expected)) > 1
  with np.load(tmp_path / "out_0.npz") as out:
    np.testing.assert_array_equal(out["arr_0"], expected)
    assert out["arr_0"].dtype == np.uint8
  with np.load(tmp_path / "out_1.npz") as out:
    np.testing.assert_array_equal(out["arr_0"], expected)
    # Another size: the Predictor on that input, upsampled to it.
    np.testing.assert_array_equal(out["arr_1"],
                                  model.predictor.predict(model.variables, other, (48, 80)))


def test_multi_scale_needs_a_fixed_size(tmp_path):
  config = make_config("unused", scales=(0.75, 1.0))
  step_dir = save_training_step(tmp_path / "checkpoints", config, random_variables(config, 4))
  model = fada_jax.load(step_dir)
  with pytest.raises(UserError, match="--size=symbolic: this network cannot"):
    export.export_model(model, export.SYMBOLIC)
  exported = export.export_model(model)  # a fixed size is fine
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 64, 3), np.uint8)
  np.testing.assert_array_equal(np.asarray(exported.call(images)), model.predict(images))
  assert jax.export.is_symbolic_dim(exported.in_avals[0].shape[0])
