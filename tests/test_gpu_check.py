"""tools/gpu_check.py, the prepared GPU check, run on the CPU in its --smoke mode.

The GPU machine has JAX, flax, optax and orbax but none of grain, ml_collections,
tensorflow-datasets, array-record or tensorboardX. The script runs here in subprocesses
whose `sitecustomize` makes those five unimportable, so an import of any of them on the
check's path fails these tests.
"""

import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from tiny_runs import REPO, TEST_XLA_FLAGS

SCRIPT = REPO / 'tools' / 'gpu_check.py'
MISSING_ON_GPU_MACHINE = ('grain', 'ml_collections', 'tensorflow_datasets', 'array_record',
                          'tensorboardX')

_BLOCKER = textwrap.dedent(f'''
    import importlib.abc
    import sys

    class _Missing(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {MISSING_ON_GPU_MACHINE!r}:
          raise ImportError(f'{{name}} is not installed on the GPU machine (test blocker)')
        return None

    sys.meta_path.insert(0, _Missing())
''')


@pytest.fixture
def gpu_like_env(tmp_path, cache_dir):
  """The environment of a process (and its children) without the five packages."""
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(_BLOCKER)
  env = dict(os.environ)
  env.update({'PYTHONPATH': os.pathsep.join([str(site), str(REPO)]),
              'JAX_PLATFORMS': 'cpu',
              'XLA_FLAGS': TEST_XLA_FLAGS,  # one device, like the one GPU
              'JAX_COMPILATION_CACHE_DIR': str(cache_dir)})
  env.pop('OUT', None)
  # The blocker must work, or the tests below would pass vacuously.
  for module in MISSING_ON_GPU_MACHINE:
    probe = subprocess.run([sys.executable, '-c', f'import {module}'], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and 'test blocker' in probe.stderr, module
  return env


def _run(env, out, *flags, timeout=900):
  result = subprocess.run([sys.executable, str(SCRIPT), '--smoke', f'--out={out}', *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  lines = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
  assert (out / 'gpu_check.jsonl').read_text().splitlines() == result.stdout.splitlines()
  return result, lines


def _positive(line, *fields):
  for field in fields:
    assert isinstance(line[field], (int, float)) and math.isfinite(line[field]), (field, line)
    assert line[field] > 0, (field, line)


def test_smoke_measures_everything_without_the_missing_packages(gpu_like_env, tmp_path):
  # Stage 1 and stage 2 in float32 run the same code as stage2_bfloat16 with other
  # tools/benchmark.py arguments (checked at paper size below): left out for time.
  names = ['peak', 'stage2_bfloat16', 'parity_float32', 'eval', 'input_on_device']
  result, lines = _run(gpu_like_env, tmp_path / 'out', f'--only={",".join(names)}')
  assert result.returncode == 0, result.stderr[-4000:]
  assert [line['measurement'] for line in lines] == names
  by_name = {line['measurement']: line for line in lines}
  for line in lines:
    assert line['ok'] is True and line['smoke'] is True and 'error' not in line, line
    _positive(line, 'wall_seconds')

  peak = by_name['peak']
  assert peak['platform'] == 'cpu' and peak['devices'] == 1
  _positive(peak, 'matmul_bf16_tflops', 'matmul_float32_tflops')
  assert peak['datasheet_bf16_tflops'] is None  # no datasheet rate for a CPU

  line = by_name['stage2_bfloat16']
  assert (line['mode'], line['stage'], line['dtype'], line['remat']) == (
      'train', 'adversarial', 'bfloat16', True)
  assert (line['batch'], line['size'], line['target_size']) == (2, '64x32', '64x32')
  assert line['benchmark_command'].startswith('python tools/benchmark.py --mode=train')
  _positive(line, 'compile_seconds', 'step_seconds_median', 'steps_per_second',
            'images_per_second', 'flops_per_step', 'model_flops_per_step',
            'mfu_measured_bf16')
  assert line['steps_per_second'] == pytest.approx(1 / line['step_seconds_median'], rel=1e-2)
  expected_mfu = (line['model_flops_per_step'] * line['steps_per_second']
                  / (peak['matmul_bf16_tflops'] * 1e12))
  assert line['mfu_measured_bf16'] == pytest.approx(expected_mfu, rel=2e-2)
  assert line['mfu_datasheet_bf16'] is None
  _positive(line['memory'], 'temp_size_in_bytes', 'peak_estimate_bytes')
  assert 'peak_bytes_in_use' in line and 'peak_gib' in line  # None on the CPU backend

  evaluation = by_name['eval']
  assert evaluation['mode'] == 'eval'
  _positive(evaluation, 'compile_seconds', 'images_per_second', 'flops_per_step')
  assert 'peak_gib' in evaluation

  planned = by_name['input_on_device']
  assert planned['matches_host'] is True and planned['images'] == 2
  _positive(planned, 'bytes_per_batch', 'compile_seconds', 'batch_seconds_median',
            'images_per_second')

  parity = by_name['parity_float32']
  assert parity['backends'] == ['cpu', 'cpu']
  _positive(parity, 'max_abs_cpu')
  for precision in ('default', 'highest'):
    errors = parity[precision]
    assert errors['finite'] is True and errors['argmax_agreement'] == 1.0
    # The same backend twice: equal up to float32 rounding of differently fused programs.
    assert errors['relative_error'] <= 1e-5
    assert errors['max_abs_error'] <= 1e-5 * parity['max_abs_cpu']


def test_paper_measurements_take_the_published_sizes(gpu_like_env, tmp_path):
  result = subprocess.run([sys.executable, str(SCRIPT), '--dry-run'], cwd=REPO,
                          env=gpu_like_env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  argv = {line['measurement']: line['benchmark_argv']
          for line in map(json.loads, result.stdout.splitlines())}
  paper = ['--arch=resnet101', '--num-classes=19']
  stage2 = ['--mode=train', '--stage=adversarial', '--batch=8', '--size=1280x720',
            '--target-size=1024x512', '--remat', '--memory', *paper]
  assert set(argv['stage2_bfloat16']) >= {*stage2, '--dtype=bfloat16'}
  assert set(argv['stage2_float32']) >= {*stage2, '--dtype=float32'}
  assert set(argv['stage1_bfloat16']) >= {'--mode=train', '--stage=source_only', '--batch=8',
                                          '--size=1280x720', '--dtype=bfloat16', '--remat',
                                          *paper}
  assert not any(a.startswith('--target-size') for a in argv['stage1_bfloat16'])
  assert set(argv['eval']) >= {'--mode=eval', '--size=2048x1024', '--batch=2', *paper}
  assert argv['peak'] is None and argv['parity_float32'] is None


def test_a_failure_is_a_line_and_is_run_again_with_the_xla_dump(gpu_like_env, tmp_path):
  # 0.2 s is too short for any measurement to start JAX: both runs time out.
  result, lines = _run(gpu_like_env, tmp_path / 'out', '--only=peak', '--time-limit=0.2')
  assert result.returncode == 1
  assert [line['measurement'] for line in lines][:1] == ['peak']
  failed = lines[0]
  assert failed['ok'] is False and failed['error'].startswith('timeout after')
  assert 'stderr_tail' in failed
  assert failed['dump_run']['error'].startswith('timeout after')


def test_measurements_past_the_budget_are_skipped_with_a_line(gpu_like_env, tmp_path):
  result, lines = _run(gpu_like_env, tmp_path / 'out', '--only=peak,eval', '--budget=0.5',
                       '--time-limit=0.2')
  assert result.returncode == 1
  by_name = {line['measurement']: line for line in lines}
  assert by_name['peak']['error'].startswith('timeout after')
  assert 'dump_run' not in by_name['peak']  # no budget left for it
  assert by_name['eval']['ok'] is False and by_name['eval']['error'].startswith('skipped')


def test_xla_dumps_are_packed_by_priority_within_the_size_limit(gpu_like_env, tmp_path):
  out = tmp_path / 'out'
  limit_mib = 0.02  # well under what all of the dump takes
  result, lines = _run(gpu_like_env, out, '--only=peak', '--dump=always',
                       f'--dump-limit-mib={limit_mib}')
  assert result.returncode == 0, result.stderr[-4000:]
  assert [line['measurement'] for line in lines] == ['peak', 'xla_dumps']
  packed = lines[1]
  archive = out / packed['file']
  assert packed['bytes'] == archive.stat().st_size <= limit_mib * 2**20
  assert packed['files_left_out'] > 0  # the limit forced a choice
  with tarfile.open(archive) as tar:
    members = tar.getnames()
  assert members == packed['members'] and len(members) == packed['files_packed']
  assert all(member.startswith('peak/') for member in members)
  # Memory reports and buffer assignments come before the rest; the matrix product's
  # module is among them.
  kinds = ['memory-usage-report' in m or m.endswith('buffer-assignment.txt') for m in members]
  assert kinds == sorted(kinds, reverse=True)
  assert any('matmul' in m and 'memory-usage-report' in m for m in members)
  assert any('matmul' in m and m.endswith('buffer-assignment.txt') for m in members)


def test_configs_without_ml_collections_equal_the_published_ones(gpu_like_env):
  """The stand-in ConfigDict gives config_lib's values, field for field, and stays locked."""
  from fada_jax import config_lib

  def plain(config):
    return {key: plain(value) if hasattr(value, 'items') else value
            for key, value in config.items()}

  program = textwrap.dedent(f'''
      import json, sys
      sys.path.insert(0, {str(REPO / 'tools')!r})
      import gpu_check
      gpu_check.ensure_config_dict()
      import ml_collections
      assert ml_collections.ConfigDict is gpu_check.StandInConfigDict
      from fada_jax import config_lib

      def plain(config):
        return {{key: plain(value) if hasattr(value, 'items') else value
                 for key, value in config.items()}}

      out = {{}}
      for task in config_lib.TASKS:
        for stage in config_lib.STAGES:
          config = config_lib.make_config(task, stage)
          config_lib.validate(config)
          copied = config.copy_and_resolve_references()
          copied.model.width = 3
          assert config.model.width != 3 and config.model.get('dtype') == 'float32'
          try:
            config.model.no_such_field = 1
            raise SystemExit('a locked config took a new field')
          except AttributeError:
            pass
          out[task + '/' + stage] = plain(config)
      print(json.dumps(out))
  ''')
  result = subprocess.run([sys.executable, '-c', program], env=gpu_like_env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  stand_in = json.loads(result.stdout)
  for task in config_lib.TASKS:
    for stage in config_lib.STAGES:
      published = json.loads(json.dumps(plain(config_lib.make_config(task, stage))))
      assert stand_in[f'{task}/{stage}'] == published, (task, stage)
