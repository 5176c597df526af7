"""Command line: `python -m fada_jax.main --config=CONFIG --workdir=DIR [--mode=...]`.

Parses flags and hands off; all the work happens in `train.loop`, `evaluate` and
`pipeline`.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fada_jax import config_lib
from fada_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/g2c_adv.py or configs/g2c_adv.py:vgg16.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'pseudo_label', 'pipeline', 'predict'],
    'train: the stage the config describes; eval: evaluate --checkpoint on the target '
    'split; pseudo_label: write stage-3 labels of --checkpoint for the target training '
    'split; pipeline: stage 1 -> 2 -> 3 with an evaluation after each; predict: segment '
    'the images of --input into WORKDIR/predictions.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'eval / pseudo_label: a checkpoint folder, or a folder of several; '
    'predict: one checkpoint folder.')
_INPUT = flags.DEFINE_string(
    'input', None, 'predict: a folder of images (searched recursively), one image, or a '
    'glob pattern (quoted; ** recurses).')
_OPACITY = flags.DEFINE_float(
    'opacity', 0.5, 'predict: weight of the class colours in the overlay images (0 to 1).')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'pseudo_label: output folder (default WORKDIR/pseudo_labels).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
_DETERMINISTIC = flags.DEFINE_bool(
    'deterministic', True,
    'GPU: compile with XLA\'s deterministic kernels (--xla_gpu_deterministic_ops=true, '
    'appended to XLA_FLAGS unless they set it), so that a run resumed after a crash is '
    'bitwise identical to an uninterrupted one. --nodeterministic lets autotuning pick '
    'the fastest kernels, some of which add in a varying order. No effect on CPUs.')

GPU_DETERMINISM_FLAG = '--xla_gpu_deterministic_ops'


def with_gpu_determinism(xla_flags: str) -> str:
  """`xla_flags` plus --xla_gpu_deterministic_ops=true, unless they set that flag already.

  With it XLA:GPU takes the first working cuBLAS / cuDNN algorithm rather than the
  fastest-timed one (timings vary between compilations), deterministic ones only, and
  expands scatters into ordered loops. Select-and-scatter has no deterministic GPU
  kernel (XLA's docs/determinism.md), which is why the networks avoid it (layers.max_pool).
  """
  tokens = xla_flags.split()
  if any(t == GPU_DETERMINISM_FLAG or t.startswith(GPU_DETERMINISM_FLAG + '=') for t in tokens):
    return xla_flags  # the user's own choice, either way
  return ' '.join([*tokens, GPU_DETERMINISM_FLAG + '=true'])

flags.mark_flags_as_required(['config', 'workdir'])


def _run(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  # XLA reads XLA_FLAGS once, when the backend starts: nothing above touches jax.
  if _DETERMINISTIC.value:
    os.environ['XLA_FLAGS'] = with_gpu_determinism(os.environ.get('XLA_FLAGS', ''))
  logging.info('XLA_FLAGS=%s', os.environ.get('XLA_FLAGS', ''))
  config = _CONFIG.value
  workdir = _WORKDIR.value
  config_lib.validate(config)

  # Imported here so that `--help` and flag errors answer without loading JAX.
  from fada_jax.train import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  mode = _MODE.value
  if mode == 'train':
    from fada_jax.train import loop
    loop.train_and_evaluate(config, workdir)
  elif mode == 'eval':
    from fada_jax import evaluate
    from fada_jax.train import preflight
    if not _CHECKPOINT.value:
      raise UserError('--mode=eval needs --checkpoint=PATH')
    preflight.check_eval(config, _CHECKPOINT.value, workdir)
    evaluate.run_eval(config, _CHECKPOINT.value, workdir)
  elif mode == 'pseudo_label':
    from fada_jax import evaluate
    from fada_jax.train import preflight
    if not _CHECKPOINT.value:
      raise UserError('--mode=pseudo_label needs --checkpoint=PATH')
    output = _OUTPUT.value or f'{workdir}/pseudo_labels'
    preflight.check_pseudo_label(config, _CHECKPOINT.value, output)
    evaluate.run_pseudo_label(config, _CHECKPOINT.value, output)
  elif mode == 'pipeline':
    from fada_jax import pipeline
    pipeline.run_pipeline(config, workdir)
  elif mode == 'predict':
    from fada_jax.evaluate import predict
    from fada_jax.train import preflight
    if not _CHECKPOINT.value or not _INPUT.value:
      raise UserError('--mode=predict needs --checkpoint=PATH and --input=DIR_OR_GLOB')
    preflight.check_predict(_CHECKPOINT.value, workdir)
    summary = predict.run_predict(config, _CHECKPOINT.value, _INPUT.value, workdir,
                                  opacity=_OPACITY.value)
    print(summary.line(), flush=True)
    if not summary.written:
      raise UserError(f'no image could be read: all {len(summary.skipped)} input file(s) '
                      'were skipped')


def main(argv):
  try:
    _run(argv)
  except UserError as e:
    logging.flush()
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted; rerun the same command to resume', file=sys.stderr)
    sys.exit(130)


def _fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with one-line errors for a wrong config path, field or value."""
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg[len('--config='):].split(':', 1)[0]
      if not os.path.isfile(path):
        _fail(f'config file not found: {path}')
  if not any(arg.startswith(('--verbosity', '-v=', '--v=')) for arg in argv[1:]):
    # orbax and grain log every save and worker start at INFO; keep the console for
    # the progress bar, tables and errors.
    argv = [*argv, '--verbosity=-1']
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = e.flagname
    if name.startswith('config.'):
      _fail(f'unknown config field: {name[len("config."):]}')
    _fail(f'unknown flag: --{name}')
  except flags.Error as e:
    # A config file that fails to load carries the whole traceback in its message;
    # its last line names the problem.
    _fail(str(e).strip().splitlines()[-1])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip('\'"').replace('\\n', ' ').replace('\\\'', '')
    _fail(f'bad config override: {" ".join(message.split())}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
