"""Helpers of the tests that train through `python -m fada_jax.main` in subprocesses.

The runs use a tiny version of the demo (ResNet-18 of width 4, 32x16 frames, 8 frames
per synthetic split) and share the session's persistent compilation cache, so each step
function compiles once however many runs need it.
"""

import os
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import TEST_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parent.parent

TINY = {
    'model.width': 4,
    'data.synthetic_size': 8,
    'data.source_size': (32, 16),
    'data.target_size': (32, 16),
    'data.test_size': (32, 16),
    'data.crop_size': (32, 16),
    'solver.max_iter': 30,
    'solver.stop_iter': 30,
    'log_every': 2,
}


def set_fields(config, fields: dict):
  """`config` with each dotted field ('data.source_size', ...) of `fields` set."""
  for name, value in fields.items():
    node = config
    *parents, leaf = name.split('.')
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


def config_flag(name, value) -> str:
  if isinstance(value, tuple):
    value = '(' + ','.join(str(v) for v in value) + ')'
  return f'--config.{name}={value}'


def environment(cache_dir, devices: int = 4) -> dict:
  env = dict(os.environ)
  env.update({
      'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}',
      'JAX_PLATFORMS': 'cpu',
      'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
      'PYTHONPATH': str(REPO) + os.pathsep + env.get('PYTHONPATH', ''),
  })
  return env


def main_command(config, workdir, overrides=None, mode='train') -> list[str]:
  """`python -m fada_jax.main` on `config` with TINY and `overrides` as config flags."""
  flags = dict(TINY, **(overrides or {}))
  return ([sys.executable, '-m', 'fada_jax.main', f'--config={config}', f'--mode={mode}',
           f'--workdir={workdir}', '--verbosity=-1']
          + [config_flag(k, v) for k, v in flags.items()])


def checkpoint_arrays(step_dir) -> dict[str, np.ndarray]:
  """Every array of a training checkpoint (variables and train state) by its path."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(pathlib.Path(step_dir).absolute(), args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
  tree = {'variables': restored['variables'], 'train': restored['train']}
  return {jax.tree_util.keystr(path): np.asarray(value)
          for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]}


def truncate_arrays(step_dir):
  """Cuts every array data file of a checkpoint step folder to 10 bytes."""
  data_files = [p for p in pathlib.Path(step_dir).rglob('*')
                if p.is_file() and p.parent.name == 'd']
  assert data_files
  for path in data_files:
    path.write_bytes(path.read_bytes()[:10])


def brute_force_metrics(pairs, num_classes=19):
  """mIoU / allAcc of (prediction, label) pairs, counted with numpy one class at a time
  (the release's formula: mean over all classes of I / (U + 1e-10))."""
  i = np.zeros(num_classes)
  u = np.zeros(num_classes)
  t = np.zeros(num_classes)
  for prediction, label in pairs:
    keep = label != 255
    for c in range(num_classes):
      p_c, l_c = (prediction == c) & keep, (label == c) & keep
      i[c] += np.sum(p_c & l_c)
      u[c] += np.sum(p_c | l_c)
      t[c] += np.sum(l_c)
  return np.mean(i / (u + 1e-10)), i.sum() / t.sum()


def synthetic_target_val_miou(predictions_dir, frames: int = TINY['data.synthetic_size'],
                              seed: int = 0, num_classes: int = 19) -> float:
  """mIoU of the prediction PNGs an evaluation wrote (config.eval.save_predictions) on the
  synthetic target val split, counted by `brute_force_metrics`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from fada_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  source = synthetic.make_synthetic_source('target', 'val', num_classes, size=frames, seed=seed)
  pairs = []
  for index in range(frames):
    example = source[index]
    with Image.open(pathlib.Path(predictions_dir) / f"{example['name']}.png") as image:
      pairs.append((np.asarray(image), example['label']))
  return float(brute_force_metrics(pairs, num_classes)[0])
