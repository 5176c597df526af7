"""Multi-host training through `jax.distributed` on one machine (gloo CPU collectives).

Two processes with two CPU devices each must train what one process with four devices
trains (the same program; gloo sums across processes in another order, so up to float
rounding); processes started with different configs must fail with a clear error instead
of waiting for each other forever.
"""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from fada_jax.errors import UserError
from fada_jax.train import distributed
from tiny_runs import REPO, TINY, checkpoint_arrays, environment, main_command

TIMEOUT_S = 300
# Two steps, a checkpoint after each: the first is compared array by array (one step keeps
# rounding at rounding size), the second checks the logging and the data states.
MULTIHOST = {'solver.stop_iter': 2, 'solver.checkpoint_every': 1}
# Max |difference| per array over its max |value|, after one step. One process of 1
# device against one of 4 (a larger change of summation order than this test's) differ
# there by 3.5e-7; 1e-4 is still far below what a wrong reduction (a shard missing or
# counted twice: an error of order 1) gives.
ROUNDING_BOUND = 1e-4
MULTIHOST_FRAMES = TINY['data.synthetic_size']  # target train frames: pseudo labels


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, overrides=None, process=None, mode='train', checkpoint=None):
  command = main_command('configs/demo.py', workdir, dict(MULTIHOST, **(overrides or {})),
                         mode=mode)
  if checkpoint is not None:
    command.append(f'--checkpoint={checkpoint}')
  if process is not None:
    port, index, count = process
    command += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={count}',
                f'--process_id={index}']
  return command


def _launch_pair(workdir, cache_dir, overrides=(None, None), **command):
  """Starts two processes of one run; returns [(returncode, stderr)] of both."""
  port = _free_port()
  env = environment(cache_dir, devices=2)
  processes = [subprocess.Popen(_command(workdir, overrides[i], (port, i, 2), **command),
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  try:
    for process in processes:
      _, stderr = process.communicate(timeout=TIMEOUT_S)
      results.append((process.returncode, stderr))
  except subprocess.TimeoutExpired:
    pytest.fail(f'the two processes did not finish within {TIMEOUT_S} s (hang)')
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return results


def _rounding_comparable(name: str) -> bool:
  """Arrays that one step keeps at rounding distance from their exact values: the BN
  statistics (forward sums of positive terms) and the parameters SGD updated from a
  non-zero start, p - lr * (g + wd p), where a gradient's rounding enters scaled by lr.

  Left out, because rounding alone moves them far beyond rounding size, with or without
  parallelism (one process of 4 devices against one of 1, on this network: up to 8% of
  the array's scale):
  - gradients, i.e. the optimiser states (SGD traces, Adam moments): per-pixel terms of
    both signs that cancel heavily, so a sum in another order differs by much more than
    its own rounding;
  - the feature extractor's BN biases, which start at zero: after one step they are
    -lr times such a gradient alone;
  - the discriminator's parameters: Adam's first step is lr * g / (|g| + eps), +-lr for
    every element, whose sign rounding decides where g is near zero.
  The losses of the next step, which depend on all of them, are compared instead.
  """
  if not name.startswith("['variables']") or "['discriminator']" in name:
    return False
  return not (name.startswith("['variables']['feature_extractor']['params']")
              and name.endswith("['bias']"))


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, cache_dir):
  single = tmp_path / 'single'
  result = subprocess.run(_command(single), cwd=REPO, env=environment(cache_dir, 4),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]

  pair = tmp_path / 'pair'
  for index, (returncode, stderr) in enumerate(_launch_pair(pair, cache_dir)):
    assert returncode == 0, f'process {index}: {stderr[-3000:]}'

  expected = checkpoint_arrays(single / 'checkpoints' / '1')
  actual = checkpoint_arrays(pair / 'checkpoints' / '1')
  assert expected.keys() == actual.keys()
  compared, worst = 0, 0.0
  for name in expected:
    if expected[name].dtype.kind != 'f':
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
      continue
    if not _rounding_comparable(name):
      continue
    scale = float(np.max(np.abs(expected[name])))
    error = float(np.max(np.abs(actual[name] - expected[name])))
    assert error <= ROUNDING_BOUND * scale, f'{name}: max error {error:.3g} at scale {scale:.3g}'
    compared += 1
    worst = max(worst, error / max(scale, 1e-30))
  # BN statistics (synced over both processes) and parameters.
  assert any('batch_stats' in n for n in expected) and compared > 50
  print(f'\n1 x 4 devices vs 2 x 2: {compared} arrays, worst error/scale {worst:.1e}')

  # Step 2: the integer state agrees exactly, including each process's data position.
  expected = checkpoint_arrays(single / 'checkpoints' / '2')
  actual = checkpoint_arrays(pair / 'checkpoints' / '2')
  for name in expected:
    if expected[name].dtype.kind != 'f':
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
  # Process 0 alone logs; the data iterators of both processes are in the checkpoint.
  lines = [json.loads(line) for line in (pair / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines] == [2]
  # Losses are means of positive terms: well conditioned, so rounding stays rounding.
  (single_line,) = [json.loads(line)
                    for line in (single / 'metrics.jsonl').read_text().splitlines()]
  for name, value in single_line.items():
    if name.startswith('loss'):
      assert lines[0][name] == pytest.approx(value, rel=ROUNDING_BOUND), name
  data = json.loads((pair / 'checkpoints' / '2' / 'data' / 'metadata').read_text())
  assert data['process_count'] == 2 and len(data['states']) == 2
  single_data = json.loads((single / 'checkpoints' / '2' / 'data' / 'metadata').read_text())
  assert single_data['process_count'] == 1 and len(single_data['states']) == 1
  single_eval = json.loads((single / 'eval' / 'metrics.json').read_text())
  pair_eval = json.loads((pair / 'eval' / 'metrics.json').read_text())
  assert pair_eval['miou'] == pytest.approx(single_eval['miou'], abs=1e-4)

  # Pseudo labels (the demo's class-balanced ones: a histogram over both processes' images).
  labels = {}
  for name, processes in (('single', 1), ('pair', 2)):
    workdir = tmp_path / f'labels_{name}'
    command = dict(mode='pseudo_label', checkpoint=single / 'checkpoints' / '2')
    if processes == 1:
      result = subprocess.run(_command(workdir, **command), cwd=REPO,
                              env=environment(cache_dir, 4), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
      assert result.returncode == 0, result.stderr[-3000:]
    else:
      for index, (returncode, stderr) in enumerate(_launch_pair(workdir, cache_dir, **command)):
        assert returncode == 0, f'process {index}: {stderr[-3000:]}'
    files = sorted((workdir / 'pseudo_labels').rglob('*.png'))
    assert len(files) == MULTIHOST_FRAMES
    labels[name] = np.stack([np.asarray(Image.open(f)) for f in files])
  assert np.any(labels['single'] == 255) and np.any(labels['single'] != 255)
  # Equal but where rounding moves a pixel's confidence across a bin edge.
  assert np.mean(labels['pair'] == labels['single']) > 0.999


def test_processes_with_different_configs_fail_clearly_instead_of_hanging(tmp_path, cache_dir):
  results = _launch_pair(tmp_path / 'run', cache_dir,
                         overrides=({'solver.base_lr': 0.01}, {'solver.base_lr': 0.02}))
  for index, (returncode, stderr) in enumerate(results):
    assert returncode == 2, f'process {index}: {stderr[-3000:]}'
    assert 'error: ' in stderr and 'different configs' in stderr, stderr[-3000:]
    assert 'Traceback' not in stderr


@pytest.mark.parametrize('arguments, message', [
    (('127.0.0.1:1234', None, 0), 'missing --num_processes'),
    (('127.0.0.1:1234', 2, 2), r'--process_id=2 must be in \[0, 1\]'),
    (('127.0.0.1', 2, 0), 'must be HOST:PORT'),
    ((None, 0, None), 'missing --coordinator_address, --process_id'),
])
def test_bad_multihost_flags_are_user_errors(arguments, message):
  with pytest.raises(UserError, match=message):
    distributed.initialize(*arguments)


def test_a_single_process_needs_no_coordinator(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(distributed, '_initialized', False)
  for name in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_NTASKS',
               'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  distributed.initialize(None, None, None)
  distributed.initialize('127.0.0.1:1234', 1, 0)
  # A SLURM step of one task is a single process too; of two, jax is asked to join them.
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node1')
  monkeypatch.setenv('SLURM_PROCID', '0')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  distributed.initialize(None, None, None)
  assert calls == []
  monkeypatch.setenv('SLURM_NTASKS', '2')
  distributed.initialize(None, None, None)
  assert len(calls) == 1


_REPLICATE = """
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from fada_jax.errors import UserError
from fada_jax.train import parallel

port, index = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f'127.0.0.1:{port}', 2, index)


def per_leaf_comparison(*args, **kwargs):
  raise AssertionError('placing compared a leaf across processes')


# jax.device_put's own check of multi-process values: one collective per leaf.
multihost_utils.assert_equal = per_leaf_comparison
mesh = parallel.make_mesh()
tree = {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4), 'count': np.int32(7)}
placed = parallel.replicate(tree, mesh)
for name, value in tree.items():
  assert placed[name].sharding.is_fully_replicated and placed[name].shape == value.shape
  for shard in placed[name].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), value)
# Process 1 holds another value: both processes stop with the error.
try:
  parallel.replicate({'kernel': tree['kernel'] + index}, mesh, 'the test tree')
except UserError as error:
  print('error:', error)
"""


def test_replicated_placement_compares_processes_once_and_names_a_difference(tmp_path,
                                                                            cache_dir):
  script = tmp_path / 'replicate.py'
  script.write_text(_REPLICATE)
  port = _free_port()
  processes = [subprocess.Popen([sys.executable, str(script), str(port), str(index)],
                                cwd=REPO, env=environment(cache_dir, devices=2),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
  for index, process in enumerate(processes):
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, f'process {index}: {stderr[-3000:]}'
    assert stdout.splitlines()[-1] == ('error: processes 0 and 1 hold different values of '
                                       'the test tree; every process must load the same '
                                       'files'), stdout
