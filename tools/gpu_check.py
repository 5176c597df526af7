"""The prepared GPU check: the paper-size measurements of fada_jax, one JSON line each.

  bash tools/gpu_check.sh                 # on a GPU machine; files land in $OUT
  python tools/gpu_check.py --smoke       # tiny sizes on any backend (what the CPU test runs)

Measurements, in this order (each in its own process, with its own time limit):
  peak            the card, the JAX version, and the measured bf16 matmul rate (8192^3
                  product of random matrices; the float32 default-precision rate beside it)
                  with the datasheet's dense bf16 rate for reference
  stage2_bfloat16 the paper's stage-2 step (ResNet-101, 4 source 1280x720 + 4 target
                  1024x512 images) in bfloat16 with remat
  parity_float32  the float32 network's logits on the default backend against the CPU
                  backend, same variables and input (512x256), in one process
  eval            single-scale inference of 1024x2048 images (stage 3's test size), as
                  tools/benchmark.py's eval mode runs it (float32, batch 2)
  input_on_device the stage-2 input's jitter and resizing on the device
                  (config.data.resize_on_device): 4 GTA5-size 1914x1052 frames to
                  1280x720 with the published colour jitter and 4 Cityscapes-size
                  2048x1024 frames to 1024x512, the transfer and the work timed apart,
                  and whether every pixel equals PIL's on the host
  stage1_bfloat16 stage 1 at the paper batch (8 x 1280x720), bfloat16 with remat
  stage2_float32  the stage-2 step in float32 with remat

Training lines carry compile seconds, steps/s, images/s, XLA's FLOP count of the compiled
step (with remat it includes the recomputed forward), MFU = that count x steps/s over the
card's peak (the measured bf16 rate, and the datasheet's), XLA's memory plan and the peak
device memory from `memory_stats()`. Sizes, batches and architecture come from
fada_jax.config_lib (the published configs); the timing, FLOP count and memory plan from
tools/benchmark.py, run as its command line would.

Each measurement runs in a child process (`--measure NAME`), so that its peak memory is
its own and a hung compile can be killed. A failed or timed-out one prints a line with
its error, and, while the time budget lasts, is run again with XLA's dump on; the buffer
assignment, memory-usage report and HLO of those runs are packed into
OUT/xla_dumps.tar.gz (at most 15 MiB). The measurements stay within --budget seconds;
with start-up and packing the whole run takes at most 8 minutes.

The check needs only JAX, flax, optax, orbax-checkpoint, numpy and pillow: it imports
nothing of the data pipeline (grain, tensorflow-datasets, array-record) nor tensorboardX,
and builds the published configs without ml_collections where that is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import types
import zlib
from collections.abc import Callable
from typing import Any

_TOOLS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TOOLS)
sys.path.insert(0, _REPO)
sys.path.insert(0, _TOOLS)

MEASUREMENTS = ('peak', 'stage2_bfloat16', 'parity_float32', 'eval', 'input_on_device',
                'stage1_bfloat16', 'stage2_float32')
# Seconds each may take, process start and JAX's GPU start-up included. A cold compile of
# the paper step is the long part; the whole run is capped by --budget as well.
# The goal is a compile under 2 minutes: stage 2 gets that, start-up and steps.
TIME_LIMITS = {'peak': 45, 'stage2_bfloat16': 150, 'parity_float32': 75, 'eval': 75,
               'input_on_device': 45, 'stage1_bfloat16': 120, 'stage2_float32': 120}
# Seconds for the measurements; packing the dumps and start-up fit in the 8 minutes
# that the prepared device call allows.
DEFAULT_BUDGET = 430
SMOKE_BUDGET = 900
DUMP_RESERVE = 100  # seconds kept, after a failure, for its run with XLA's dump
DUMP_LIMIT_MIB = 15.0  # the device tool brings back files of at most 16 MiB
# Dense bf16 matrix rate by the vendor's datasheets, TFLOP/s, by `device_kind`.
DATASHEET_BF16_TFLOPS = {'NVIDIA H200': 989.4, 'NVIDIA H100 80GB HBM3': 989.4,
                         'NVIDIA A100-SXM4-80GB': 312.0, 'NVIDIA A100-SXM4-40GB': 312.0}


# ------------------------------------------------------------------ configs without ml_collections


class StandInConfigDict:
  """The part of `ml_collections.ConfigDict` that config_lib and the code it feeds use:
  attribute and item access, `get`, `lock` (no new fields after it) and
  `copy_and_resolve_references`. Installed only where ml_collections is missing (the GPU
  machine's image), so that the published values keep one home, config_lib."""

  def __init__(self):
    object.__setattr__(self, '_fields', {})
    object.__setattr__(self, '_locked', False)

  def __getattr__(self, name):
    if name.startswith('__') or name in ('_fields', '_locked'):
      raise AttributeError(name)  # copy/pickle protocol lookups before __init__ ran
    try:
      return self._fields[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name, value):
    if self._locked and name not in self._fields:
      raise AttributeError(f'config is locked: no field {name!r}')
    self._fields[name] = value

  def __getitem__(self, name):
    return self._fields[name]

  def __contains__(self, name):
    return name in self._fields

  def get(self, name, default=None):
    return self._fields.get(name, default)

  def keys(self):
    return self._fields.keys()

  def items(self):
    return self._fields.items()

  def lock(self):
    object.__setattr__(self, '_locked', True)
    for value in self._fields.values():
      if isinstance(value, StandInConfigDict):
        value.lock()
    return self

  def copy_and_resolve_references(self):
    return copy.deepcopy(self)


def ensure_config_dict() -> None:
  """Makes `import ml_collections` give the stand-in where the package is missing."""
  try:
    import ml_collections  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    module = types.ModuleType('ml_collections')
    module.ConfigDict = StandInConfigDict
    module.__doc__ = 'tools/gpu_check.py: a stand-in for the missing ml_collections'
    sys.modules['ml_collections'] = module


def _published(stage: str):
  ensure_config_dict()
  from fada_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.make_config('g2c', stage)


def _significant(value: float) -> float:
  return float(f'{value:.4g}')


def _size(width_height) -> str:
  return f'{width_height[0]}x{width_height[1]}'


# ------------------------------------------------------------------ measurements (child process)

_SMOKE_MODEL = ['--arch=resnet18', '--width=4']
_SMOKE_SIZE = (64, 32)


def _benchmark(argv: list[str]) -> dict[str, Any]:
  """tools/benchmark.py's JSON line for `argv`, run in this process."""
  import benchmark  # pylint: disable=g-import-not-at-top
  ensure_config_dict()
  captured = io.StringIO()
  with contextlib.redirect_stdout(captured):
    benchmark.main(argv + ['--json'])
  lines = [line for line in captured.getvalue().splitlines() if line.startswith('{')]
  if not lines:
    raise RuntimeError(f'tools/benchmark.py {" ".join(argv)} printed no JSON line')
  return json.loads(lines[-1])


def _device_memory() -> dict[str, Any]:
  """Peak and limit of the first device's allocator (None where the backend has none)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  gib = lambda key: round(stats[key] / 2**30, 3) if key in stats else None  # noqa: E731
  return {'peak_bytes_in_use': stats.get('peak_bytes_in_use'),
          'peak_gib': gib('peak_bytes_in_use'), 'bytes_limit_gib': gib('bytes_limit')}


_TRAIN = {'stage2_bfloat16': ('adversarial', 'bfloat16'),
          'stage1_bfloat16': ('source_only', 'bfloat16'),
          'stage2_float32': ('adversarial', 'float32')}


def benchmark_argv(name: str, smoke: bool) -> list[str] | None:
  """The tools/benchmark.py arguments of measurement `name` (None: not a benchmark run).

  The paper sizes are config_lib's: the stage's source frame, stage 2's target frame,
  the global batch (stage 2: half source, half target), and stage 3's test size with the
  evaluation batch.
  """
  if name in _TRAIN:
    stage, dtype = _TRAIN[name]
    config = _published(stage)
    if smoke:
      batch, size, target, model, steps = 2, _SMOKE_SIZE, _SMOKE_SIZE, _SMOKE_MODEL, 1
    else:
      batch, size, steps = config.solver.batch_size, config.data.source_size, 10
      target = config.data.target_size if stage == 'adversarial' else None
      model = [f'--arch={config.model.arch}']
    argv = ['--mode=train', f'--stage={stage}', f'--batch={batch}', f'--size={_size(size)}',
            f'--steps={steps}', f'--dtype={dtype}', '--remat', '--memory',
            f'--num-classes={config.model.num_classes}', *model]
    return argv + ([f'--target-size={_size(target)}'] if target else [])
  if name == 'eval':
    config = _published('self_distill')  # stage 3 tests at Cityscapes' full 2048x1024
    if smoke:
      batch, size, model, steps = 1, _SMOKE_SIZE, _SMOKE_MODEL, 1
    else:
      batch, size, steps = config.eval.batch_size, config.data.test_size, 5
      model = [f'--arch={config.model.arch}']
    return ['--mode=eval', f'--batch={batch}', f'--size={_size(size)}', f'--steps={steps}',
            f'--num-classes={config.model.num_classes}', *model]
  return None


def _via_benchmark(name: str, smoke: bool) -> dict[str, Any]:
  argv = benchmark_argv(name, smoke)
  result = _benchmark(argv)
  result['benchmark_command'] = ' '.join(['python tools/benchmark.py', *argv, '--json'])
  result.update(_device_memory())
  return result


# Variables that change what JAX and XLA do on the device, recorded with the card.
_SETTINGS = ('JAX_PLATFORMS', 'XLA_FLAGS', 'XLA_PYTHON_CLIENT_PREALLOCATE',
             'XLA_PYTHON_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_ALLOCATOR',
             'CUDA_VISIBLE_DEVICES', 'JAX_DEFAULT_MATMUL_PRECISION')


def _peak(smoke: bool) -> dict[str, Any]:
  """The card, and its matrix rate measured on random data (bf16 and float32)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  n = 256 if smoke else 8192

  def rate(dtype) -> float:
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    # Two input pairs in turn: no product reads what the previous one left in cache.
    pairs = [(jax.random.normal(keys[i], (n, n), dtype),
              jax.random.normal(keys[i + 2], (n, n), dtype)) for i in range(2)]
    product = jax.jit(jnp.matmul)

    def seconds(count: int) -> float:
      start = time.perf_counter()
      for i in range(count):
        out = product(*pairs[i % 2])  # queued in order: blocking on the last waits for all
      out.block_until_ready()
      return time.perf_counter() - start

    # Half a second of products first: compilation, and the clocks up from idle.
    warm, count = 0.0, 0
    while warm < 0.5:
      warm += seconds(4)
      count += 4
    per_product = warm / count
    repeats = max(3, int(0.1 / per_product))  # about 0.1 s a sample
    samples = sorted(seconds(repeats) for _ in range(5))
    return _significant(2 * n**3 * repeats / samples[2] / 1e12)  # the median sample

  return {'platform': device.platform, 'device_kind': device.device_kind,
          'devices': jax.device_count(), 'jax_version': jax.__version__,
          'jaxlib_version': jaxlib.__version__, 'matmul_size': n,
          'matmul_bf16_tflops': rate(jnp.bfloat16),
          'matmul_float32_tflops': rate(jnp.float32),
          'datasheet_bf16_tflops': DATASHEET_BF16_TFLOPS.get(device.device_kind),
          'environment': {key: os.environ[key] for key in _SETTINGS if key in os.environ},
          **_device_memory()}


def _parity(smoke: bool) -> dict[str, Any]:
  """float32 logits of feature extractor + classifier on the default backend vs the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import benchmark  # pylint: disable=g-import-not-at-top
  from fada_jax import models  # pylint: disable=g-import-not-at-top
  config = _published('source_only')
  # Half stage 2's target frame: the CPU reference of ResNet-101 stays within the limit.
  width, height = (v // 2 for v in config.data.target_size)
  if smoke:
    config.model.arch, config.model.width = 'resnet18', 4
    width, height = _SMOKE_SIZE
  network = models.build(config)
  variables = benchmark._random_variables(config)  # pylint: disable=protected-access
  variables = {part: variables[part] for part in ('feature_extractor', 'classifier')}
  images = np.random.default_rng(1).standard_normal((1, height, width, 3), dtype=np.float32)

  def logits(variables, images):
    features = network.feature_extractor.apply(variables['feature_extractor'], images,
                                               train=False)
    return network.classifier.apply(variables['classifier'], features)

  device, cpu = jax.devices()[0], jax.devices('cpu')[0]

  def run(where):
    return np.asarray(jax.jit(logits)(*jax.device_put((variables, images), where)),
                      np.float64)

  # At the default precision XLA may run float32 convolutions as TF32 on NVIDIA GPUs;
  # 'highest' asks for full float32, which is what the CPU reference computes.
  jax.config.update('jax_default_matmul_precision', 'highest')
  reference = run(cpu)
  result = {'backends': [device.platform, cpu.platform], 'arch': config.model.arch,
            'size': _size((width, height)), 'max_abs_cpu': float(np.max(np.abs(reference)))}
  for precision in ('default', 'highest'):
    jax.config.update('jax_default_matmul_precision', None if precision == 'default'
                      else precision)
    output = run(device)
    difference = output - reference
    result[precision] = {
        'max_abs_error': float(np.max(np.abs(difference))),
        'relative_error': float(np.linalg.norm(difference) / np.linalg.norm(reference)),
        'argmax_agreement': float(np.mean(np.argmax(output, -1) == np.argmax(reference, -1))),
        'finite': bool(np.isfinite(output).all())}
  jax.config.update('jax_default_matmul_precision', None)
  return result


# Frame sizes (width, height) of GTA5 and Cityscapes files.
_FRAMES = {'source': (1914, 1052), 'target': (2048, 1024)}


def _input_on_device(smoke: bool) -> dict[str, Any]:
  """Stage 2's input batch jittered and resized on the device, against PIL on the host."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fada_jax.data import device_augment  # pylint: disable=g-import-not-at-top
  from fada_jax.data import pil_exact  # pylint: disable=g-import-not-at-top
  from fada_jax.data import transforms  # pylint: disable=g-import-not-at-top
  config = _published('adversarial')
  half = 1 if smoke else config.solver.batch_size // 2
  streams = {'source': (config.data.source_size, tuple(config.data.color_jitter)),
             'target': (config.data.target_size, (0.0, 0.0, 0.0, 0.0))}
  batch, host = {}, {}
  rng = np.random.default_rng(0)
  for stream, (size, jitter) in streams.items():
    frame = (96, 53) if smoke else _FRAMES[stream]
    size = _SMOKE_SIZE if smoke else tuple(size)
    plans = []
    for i in range(half):
      # A smooth scene with noise: many distinct colours, as in real frames.
      ramp = np.linspace(0, 255, frame[0])[None, :, None] * np.linspace(
          0.2, 1.0, frame[1])[:, None, None] * np.array([1.0, 0.7, 0.4])
      image = np.clip(ramp + rng.normal(0, 20, (frame[1], frame[0], 3)), 0, 255).astype(
          np.uint8)
      params = (transforms.sample_jitter(jitter, np.random.default_rng(i)) if any(jitter)
                else None)
      plans.append(pil_exact.plan_example(image, size, frame, params))
      if i == 0:
        jittered = transforms.apply_jitter(image, params) if params else image
        host[stream] = transforms.resize_image(jittered, size)
    batch.update(pil_exact.stack_plans(plans, f'{stream}_image'))
  tables = [jax.device_put(t) for t in pil_exact.hsv_tables()]
  start = time.perf_counter()
  placed = jax.block_until_ready(jax.device_put(batch))
  transfer = time.perf_counter() - start
  finish = jax.jit(device_augment.finish_batch)
  start = time.perf_counter()
  out = jax.block_until_ready(finish(placed, *tables))
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(3 if smoke else 10):
    start = time.perf_counter()
    jax.block_until_ready(finish(placed, *tables))
    times.append(time.perf_counter() - start)
  median = sorted(times)[len(times) // 2]
  return {'frames': {stream: _size((96, 53) if smoke else _FRAMES[stream]) for stream in streams},
          'images': 2 * half, 'bytes_per_batch': int(sum(v.nbytes for v in batch.values())),
          'transfer_seconds': _significant(transfer), 'compile_seconds':
          _significant(compile_seconds), 'batch_seconds_median': _significant(median),
          'images_per_second': _significant(2 * half / median),
          'matches_host': all(np.array_equal(np.asarray(out[f'{stream}_image'][0]), pixels)
                              for stream, pixels in host.items())}


MEASURE: dict[str, Callable[[bool], dict[str, Any]]] = {
    'peak': _peak,
    'stage2_bfloat16': lambda smoke: _via_benchmark('stage2_bfloat16', smoke),
    'parity_float32': _parity,
    'eval': lambda smoke: _via_benchmark('eval', smoke),
    'input_on_device': _input_on_device,
    'stage1_bfloat16': lambda smoke: _via_benchmark('stage1_bfloat16', smoke),
    'stage2_float32': lambda smoke: _via_benchmark('stage2_float32', smoke),
}


def measure(name: str, smoke: bool) -> int:
  """Child process: one measurement, printed as one JSON line on stdout."""
  try:
    result = MEASURE[name](smoke)
  except BaseException as error:  # pylint: disable=broad-except  (SystemExit of benchmark.py too)
    if isinstance(error, KeyboardInterrupt):
      raise
    message = str(error) or type(error).__name__
    print(json.dumps({'error': f'{type(error).__name__}: {message}'[:4000]}), flush=True)
    return 1
  print(json.dumps(result), flush=True)
  return 0


# ------------------------------------------------------------------ the driver


def derived_rates(result: dict[str, Any], peak: dict[str, Any] | None) -> dict[str, Any]:
  """steps/s, and MFU against the measured and the datasheet bf16 rates."""
  median = result.get('step_seconds_median')
  if not median:
    return {}
  out = {'steps_per_second': _significant(1 / median)}
  # The model's FLOPs: with remat the compiled count sees a scanned loop body once.
  flops = result.get('model_flops_per_step') or result.get('flops_per_step')
  for key, field in (('mfu_measured_bf16', 'matmul_bf16_tflops'),
                     ('mfu_datasheet_bf16', 'datasheet_bf16_tflops')):
    tflops = (peak or {}).get(field)
    out[key] = _significant(flops / median / (tflops * 1e12)) if flops and tflops else None
  return out


def _tail(text: str, chars: int = 3000) -> str:
  return text[-chars:]


class Driver:
  """Runs the measurements in child processes within one time budget."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.deadline = time.monotonic() + args.budget
    self.out = args.out
    os.makedirs(self.out, exist_ok=True)
    self.work = tempfile.mkdtemp(prefix='gpu_check_')
    self.jsonl = open(os.path.join(self.out, 'gpu_check.jsonl'), 'w', encoding='utf-8')
    self.log = open(os.path.join(self.out, 'gpu_check.log'), 'w', encoding='utf-8')
    self.dumps: dict[str, str] = {}

  def remaining(self) -> float:
    return self.deadline - time.monotonic()

  def child(self, name: str, timeout: float, dump_dir: str | None = None) -> dict[str, Any]:
    """Runs `--measure name`; returns its JSON (or an error), with wall seconds."""
    command = [sys.executable, os.path.abspath(__file__), f'--measure={name}']
    if self.args.smoke:
      command.append('--smoke')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if dump_dir:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + f' --xla_dump_to={dump_dir}'
                          ' --xla_dump_hlo_as_text').strip()
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=_REPO, start_new_session=True)
    timed_out = False
    try:
      stdout, stderr = process.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(process.pid, signal.SIGKILL)
      stdout, stderr = process.communicate()
    wall = round(time.monotonic() - start, 1)
    self.log.write(f'==== {name}{" (XLA dump)" if dump_dir else ""}: rc={process.returncode}, '
                   f'{wall} s\n{_tail(stderr, 200_000)}\n')
    self.log.flush()
    lines = [line for line in stdout.splitlines() if line.startswith('{')]
    result: dict[str, Any] = {}
    if lines:
      try:
        result = json.loads(lines[-1])
      except json.JSONDecodeError:
        result = {'error': f'unreadable output: {lines[-1][:500]}'}
    if timed_out:
      result = {'error': f'timeout after {wall} s (limit {round(timeout)} s)'}
    elif process.returncode != 0 and 'error' not in result:
      result = {'error': f'exit status {process.returncode}'}
    elif not result:
      result = {'error': 'no JSON line'}
    if 'error' in result:
      result['stderr_tail'] = _tail(stderr)
    result['wall_seconds'] = wall
    return result

  def limit_of(self, name: str) -> float:
    # Smoke runs are for slow, shared CPUs: only the budget bounds them.
    return self.args.time_limit or (self.args.budget if self.args.smoke else TIME_LIMITS[name])

  def limit(self, name: str) -> float:
    return min(self.limit_of(name), self.remaining())

  def emit(self, line: dict[str, Any]) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    self.jsonl.write(text + '\n')
    self.jsonl.flush()

  def run(self) -> int:
    names = self.args.only or MEASUREMENTS
    results: dict[str, dict[str, Any]] = {}
    failed, skipped = [], []
    for name in names:
      # Once a measurement has failed, time is kept for running it again with the dump.
      reserve = DUMP_RESERVE if failed and self.args.dump == 'failures' else 0
      available = self.remaining() - reserve
      if available < min(30, 0.25 * self.limit_of(name)):
        results[name] = {'error': f'skipped: {max(0, round(available))} s of the time '
                                  'budget left'}
        skipped.append(name)
        continue
      dump = None
      if self.args.dump == 'always':
        dump = os.path.join(self.work, name)
      results[name] = self.child(name, min(self.limit_of(name), available), dump)
      if dump:
        self.dumps[name] = dump
      if 'error' in results[name]:
        failed.append(name)
      else:
        self.finish(name, results)
    # Second pass, with what is left of the budget: the failures again, with XLA's dump
    # (buffer assignment, memory report, HLO), so that one call brings back what is
    # needed to fix them.
    for name in failed:
      if self.args.dump == 'failures' and name not in self.dumps and self.remaining() >= 10:
        dump = os.path.join(self.work, name)
        again = self.child(name, self.limit(name), dump)
        self.dumps[name] = dump
        results[name]['dump_run'] = {k: again[k] for k in ('error', 'wall_seconds') if k in again}
      self.finish(name, results)
    for name in skipped:
      self.finish(name, results)
    if self.dumps:
      self.emit(dict({'measurement': 'xla_dumps', 'ok': True, 'smoke': self.args.smoke},
                     **pack_dumps(self.dumps, os.path.join(self.out, 'xla_dumps.tar.gz'),
                                  int(self.args.dump_limit_mib * 2**20))))
    shutil.rmtree(self.work, ignore_errors=True)
    self.summary(names, results)
    failures = sum(1 for name in names if 'error' in results[name])
    return 1 if failures else 0

  def finish(self, name: str, results: dict[str, dict[str, Any]]) -> None:
    result = results[name]
    line = {'measurement': name, 'ok': 'error' not in result, 'smoke': self.args.smoke}
    line.update(result)
    line.update(derived_rates(result, results.get('peak')))
    self.emit(line)

  def summary(self, names, results) -> None:
    """A short table on stderr, the end of what the device tool brings back."""
    print('\nmeasurement      ok  compile_s  steps/s  images/s  MFU(meas)  peak GiB',
          file=sys.stderr)
    for name in names:
      r = dict(results[name], **derived_rates(results[name], results.get('peak')))
      cells = [r.get('compile_seconds'), r.get('steps_per_second'), r.get('images_per_second'),
               r.get('mfu_measured_bf16'), r.get('peak_gib')]
      print(f'{name:16} {"no" if "error" in r else "yes":3} '
            + ' '.join(f'{"-" if c is None else c:>9}' for c in cells), file=sys.stderr)


def pack_dumps(dumps: dict[str, str], archive: str, limit: int) -> dict[str, Any]:
  """Packs the useful part of XLA's dumps into one tar.gz of at most `limit` bytes.

  By priority: memory-usage reports, buffer assignments, optimised HLO, the buffers'
  values, HLO before optimisation; within each, the largest module (the step) first.
  Files that would take the archive past `limit` are left out. Returns what was packed
  and what was left out.
  """
  priorities = ('memory-usage-report', 'buffer-assignment.txt', 'after_optimizations.txt',
                'buffer-assignment-values.txt', 'before_optimizations.txt')
  chosen: list[tuple[str, str]] = []
  seen: set[str] = set()
  for pattern in priorities:
    candidates = []
    for name, folder in dumps.items():
      if not os.path.isdir(folder):
        continue
      for file_name in os.listdir(folder):
        path = os.path.join(folder, file_name)
        if pattern in file_name and path not in seen and os.path.isfile(path):
          candidates.append((os.path.getsize(path), name, path))
    for _, name, path in sorted(candidates, key=lambda c: -c[0]):
      chosen.append((f'{name}/{os.path.basename(path)}', path))
      seen.add(path)
  # What fits, by each file's size compressed at the fastest level (an upper bound of
  # what the archive's level takes); the written archive is checked after.
  kept, total = [], 0
  for arcname, path in chosen:
    with open(path, 'rb') as f:
      size = len(zlib.compress(f.read(), 1)) + 100  # + its tar header, compressed
    if total + size <= limit:
      kept.append((arcname, path))
      total += size
  while kept:
    _write_archive(archive, kept)
    if os.path.getsize(archive) <= limit:
      break
    kept.pop()
  if not kept:
    if os.path.exists(archive):
      os.remove(archive)
    return {'file': None, 'bytes': 0, 'files_packed': 0, 'files_left_out': len(chosen)}
  return {'file': os.path.basename(archive), 'bytes': os.path.getsize(archive),
          'files_packed': len(kept), 'files_left_out': len(chosen) - len(kept),
          'members': [arcname for arcname, _ in kept][:50]}


def _write_archive(archive: str, members: list[tuple[str, str]]) -> None:
  with tarfile.open(archive, 'w:gz', compresslevel=6) as tar:
    for arcname, path in members:
      tar.add(path, arcname=arcname)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--smoke', action='store_true',
                      help='tiny network and sizes: checks the script on any backend')
  parser.add_argument('--out', default=os.environ.get('OUT') or os.path.join(
      tempfile.gettempdir(), 'gpu_check_out'), help='folder for gpu_check.jsonl, '
                      'gpu_check.log, xla_dumps.tar.gz (default: $OUT)')
  parser.add_argument('--budget', type=float, default=None,
                      help=f'seconds for the whole run (default {DEFAULT_BUDGET}, '
                           f'{SMOKE_BUDGET} with --smoke)')
  parser.add_argument('--time-limit', type=float, default=None,
                      help='seconds for each measurement (default: its own limit)')
  parser.add_argument('--only', type=lambda s: s.split(','), default=None,
                      help=f'comma-separated subset of {",".join(MEASUREMENTS)}')
  parser.add_argument('--dump', choices=('failures', 'always', 'never'), default='failures',
                      help="XLA dumps: of failed measurements (run again), of all, or none")
  parser.add_argument('--dump-limit-mib', type=float, default=DUMP_LIMIT_MIB,
                      help='size limit of xla_dumps.tar.gz')
  parser.add_argument('--dry-run', action='store_true',
                      help="print each measurement's tools/benchmark.py arguments; run nothing")
  parser.add_argument('--measure', choices=MEASUREMENTS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.budget is None:
    args.budget = SMOKE_BUDGET if args.smoke else DEFAULT_BUDGET
  if args.measure:
    return measure(args.measure, args.smoke)
  unknown = [name for name in args.only or () if name not in MEASUREMENTS]
  if unknown:
    parser.error(f'--only: unknown measurement {unknown[0]!r}; choose from '
                 f'{", ".join(MEASUREMENTS)}')
  if args.dry_run:
    for name in args.only or MEASUREMENTS:
      print(json.dumps({'measurement': name, 'smoke': args.smoke,
                        'benchmark_argv': benchmark_argv(name, args.smoke)}))
    return 0
  return Driver(args).run()


if __name__ == '__main__':
  sys.exit(main())
