"""Multi-host training through `jax.distributed` on one machine (gloo CPU collectives).

Two processes with two CPU devices each must train exactly what one process with four
devices trains; processes started with different configs must fail with a clear error
instead of waiting for each other forever.
"""

import json
import socket
import subprocess

import jax
import numpy as np
import pytest

from fada_jax.errors import UserError
from fada_jax.train import distributed
from tiny_runs import REPO, checkpoint_arrays, environment, main_command

TIMEOUT_S = 300
MULTIHOST = {'solver.stop_iter': 4, 'solver.checkpoint_every': 2}


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, overrides=None, process=None):
  command = main_command('configs/demo.py', workdir, dict(MULTIHOST, **(overrides or {})))
  if process is not None:
    port, index, count = process
    command += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={count}',
                f'--process_id={index}']
  return command


def _launch_pair(workdir, cache_dir, overrides=(None, None)):
  """Starts two processes of one run; returns [(returncode, stderr)] of both."""
  port = _free_port()
  env = environment(cache_dir, devices=2)
  processes = [subprocess.Popen(_command(workdir, overrides[i], (port, i, 2)), cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for i in range(2)]
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


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, cache_dir):
  single = tmp_path / 'single'
  result = subprocess.run(_command(single), cwd=REPO, env=environment(cache_dir, 4),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]

  pair = tmp_path / 'pair'
  for index, (returncode, stderr) in enumerate(_launch_pair(pair, cache_dir)):
    assert returncode == 0, f'process {index}: {stderr[-3000:]}'

  expected = checkpoint_arrays(single / 'checkpoints' / '4')
  actual = checkpoint_arrays(pair / 'checkpoints' / '4')
  assert expected.keys() == actual.keys()
  for name in expected:
    if expected[name].dtype.kind != 'f':
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
      continue
    # The same SPMD program, but gloo sums across processes in another order: float
    # rounding. Adam normalises the discriminator's near-zero gradients, which turns
    # their rounding into steps of up to lr_D per update; everything else stays within
    # 1e-4 of each array's scale.
    scale = float(np.max(np.abs(expected[name]))) + 1e-12
    error = float(np.max(np.abs(actual[name] - expected[name])))
    bound = 2e-2 if 'discriminator' in name else 1e-4
    assert error <= bound * scale, f'{name}: max error {error:.3g} at scale {scale:.3g}'
  # Process 0 alone logs; the data iterators of both processes are in the checkpoint.
  lines = (pair / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [2, 4]
  data = json.loads((pair / 'checkpoints' / '4' / 'data' / 'metadata').read_text())
  assert data['process_count'] == 2 and len(data['states']) == 2
  single_eval = json.loads((single / 'eval' / 'metrics.json').read_text())
  pair_eval = json.loads((pair / 'eval' / 'metrics.json').read_text())
  assert pair_eval['miou'] == pytest.approx(single_eval['miou'], abs=1e-4)


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


def test_a_single_process_needs_no_coordinator():
  distributed.initialize(None, None, None)
  distributed.initialize('127.0.0.1:1234', 1, 0)
  assert jax.process_count() == 1
