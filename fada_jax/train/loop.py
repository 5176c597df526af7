"""The training loop of every FADA stage: `train_and_evaluate(config, workdir)`.

One loop for the three stages; `config.stage` picks the step function (`train.steps`)
and the data streams (`data.pipeline`). The run lives in one folder:

  DIR/checkpoints/<step>/   orbax training checkpoints (see `checkpoint.TrainingCheckpoints`):
                            every `solver.checkpoint_every` steps and at `solver.stop_iter`,
                            the last `solver.keep_checkpoints` kept
  DIR/metrics.jsonl         one JSON object every `log_every` steps (process 0)
  DIR/tensorboard/          the same scalars as TensorBoard events (tensorboardX)
  DIR/checkpoints/best/     the model of the highest val mIoU so far (`train.validation`),
                            when `eval.every` > 0; metrics.jsonl then holds its val rows
  DIR/eval/metrics.json     target-domain evaluation of the final model

Restarting with the same DIR resumes from the newest complete checkpoint: parameters,
batch statistics, optimiser states, step, RNG and every process's data-iterator
position, so the rest of the run computes exactly what an uninterrupted run computes.
"""

import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import models as models_lib
from fada_jax.constants import TRAIN_METRICS_FILE
from fada_jax.errors import UserError
from fada_jax.train import distributed
from fada_jax.train import initialization
from fada_jax.train import parallel
from fada_jax.train import prefetch
from fada_jax.train import preflight
from fada_jax.train import state as state_lib
from fada_jax.train import steps as steps_lib
from fada_jax.train import validation as validation_lib

CHECKPOINTS_DIR = 'checkpoints'
EVAL_DIR = 'eval'
EVAL_METRICS_FILE = 'metrics.json'


# ---------------------------------------------------------------------------------------
# State <-> checkpoint items.


def _checkpoint_items(state: state_lib.TrainState) -> tuple[dict, dict]:
  """(model variables in the model-checkpoint layout, the rest of the train state)."""
  variables = {'feature_extractor': {'params': state.params['feature_extractor'],
                                     'batch_stats': state.batch_stats['feature_extractor']},
               'classifier': {'params': state.params['classifier']}}
  if 'discriminator' in state.params:
    variables['discriminator'] = {'params': state.params['discriminator']}
  train = {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}
  return variables, train


def _state_from_items(state: state_lib.TrainState, variables: dict,
                      train: dict) -> state_lib.TrainState:
  params = {name: variables[name]['params'] for name in state.params}
  batch_stats = dict(state.batch_stats,
                     feature_extractor=variables['feature_extractor']['batch_stats'])
  return state.replace(step=train['step'], params=params, batch_stats=batch_stats,
                       opt_state=train['opt_state'], rng=train['rng'])


def _checkpoint_meta(config, variables: dict) -> dict:
  return {'arch': config.model.arch, 'num_classes': int(config.model.num_classes),
          'kind': 'fada', 'stage': config.stage, 'task': config.task,
          'source': 'training', 'parts': sorted(variables),
          'config': json.loads(config.to_json())}


# ---------------------------------------------------------------------------------------
# Data.


class _StageBatches:
  """This process's share of each step's batch, in the step function's layout.

  source_only / self_distill: {'image', 'label'} of the labelled stream; adversarial:
  {'source_image', 'source_label', 'target_image'}. The state is that of every stream
  (the next step of each), so a resumed run reads exactly the batches it would have.
  """

  def __init__(self, config, start_step: int = 0):
    from fada_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
    self._adversarial = config.stage == 'adversarial'
    self._streams = data_pipeline.make_train_iterators(
        config, process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step)

  def __next__(self) -> dict:
    if not self._adversarial:
      return dict(next(self._streams['source']))
    source, target = next(self._streams['source']), next(self._streams['target'])
    # 'image', 'label' and any device plans ('image:<name>') of each stream, prefixed.
    return {**{f'source_{key}': value for key, value in source.items()},
            **{f'target_{key}': value for key, value in target.items()}}

  def get_state(self) -> dict:
    return {name: stream.get_state() for name, stream in self._streams.items()}

  def set_state(self, state: dict) -> None:
    if sorted(state) != sorted(self._streams):
      raise UserError(f'the checkpoint\'s data state has streams {sorted(state)}, this '
                      f'stage reads {sorted(self._streams)}')
    for name, stream in self._streams.items():
      if stream.get_state() != state[name]:  # restarting a stream costs its workers
        stream.set_state(state[name])

  def close(self) -> None:
    for stream in self._streams.values():
      stream.close()


def _batch_transfer(config, mesh):
  """host batch -> the step's batch on the mesh. With config.data.resize_on_device the
  full-size images are jittered and resized there, as their plans say; PIL's HSV tables
  are placed first (replicated), here on the calling thread, for a multi-process
  placement compares the processes' values with a collective."""
  from fada_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  if not data_pipeline.resizes_on_device(config):
    return lambda batch: parallel.shard_batch(batch, mesh)
  from fada_jax.data import device_augment, pil_exact  # pylint: disable=g-import-not-at-top
  tables = parallel.replicate(pil_exact.hsv_tables(), mesh, "PIL's HSV tables")
  finish = jax.jit(device_augment.finish_batch, out_shardings=parallel.batch_sharding(mesh))

  def transfer(batch):
    placed = parallel.shard_batch(batch, mesh)
    return finish(placed, *tables) if device_augment.has_plans(batch) else placed

  return transfer


def _gather_data_states(iterator) -> dict:
  """Every process's iterator state, for process 0's checkpoint."""
  state = iterator.get_state()
  return {'process_count': jax.process_count(),
          'states': distributed.allgather_json(state)}


def _restore_data_state(iterator, data: dict, step_dir: pathlib.Path) -> None:
  count = int(data.get('process_count', 1))
  if count != jax.process_count():
    raise UserError(f'{step_dir} was written by {count} process(es); resume it with '
                    f'--num_processes={count} (this run has {jax.process_count()})')
  iterator.set_state(data['states'][jax.process_index()])


# ---------------------------------------------------------------------------------------
# Logging (process 0).


def summary_writer(logdir: pathlib.Path):
  """tensorboardX's SummaryWriter on `logdir`, imported without torch where torch is not
  loaded yet: tensorboardX imports torch (1.5 s of every run's start) only to accept torch
  tensors, and this writer is given floats."""
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  else:
    sys.modules['torch'] = None  # `import torch` raises ImportError while this is here
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    finally:
      del sys.modules['torch']
  return SummaryWriter(str(logdir))


class _Logger:
  """metrics.jsonl, TensorBoard and the progress bar; silent on processes other than 0."""

  def __init__(self, config, workdir: pathlib.Path, start_step: int):
    self.active = distributed.is_main_process()
    self._writer = None
    self._bar = None
    if not self.active:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / TRAIN_METRICS_FILE
    # Lines logged after the checkpoint we resume from belong to the lost stretch of
    # the interrupted run; they are about to be computed again.
    if self._path.exists():
      kept = []
      for line in self._path.read_text().splitlines():
        try:
          if json.loads(line).get('step', 0) <= start_step:
            kept.append(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
      self._guard(lambda: checkpoint_lib.write_text_atomic(
          self._path, ''.join(f'{line}\n' for line in kept)))
    self._writer = summary_writer(workdir / 'tensorboard')
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm(total=int(config.solver.stop_iter), initial=start_step,
                     desc=config.stage, unit='step', dynamic_ncols=True, smoothing=0.1)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def write(self, record: dict) -> None:
    if not self.active:
      return
    self._append(record)
    step = record['step']
    for key, value in record.items():
      if key != 'step':
        self._writer.add_scalar(f'train/{key}', value, step)
    self._writer.flush()
    if self._bar is not None:
      shown = {k: f'{v:.4g}' for k, v in record.items() if k.startswith('loss')}
      self._bar.set_postfix(shown, refresh=False)

  def write_validation(self, row: dict, line: str) -> None:
    """A val row to metrics.jsonl, val/mIoU and val/mAcc to TensorBoard, `line` printed."""
    if not self.active:
      return
    self._append(row)
    self._writer.add_scalar('val/mIoU', row['val_miou'], row['step'])
    self._writer.add_scalar('val/mAcc', row['val_macc'], row['step'])
    self._writer.flush()
    self.note(line)

  def _append(self, row: dict) -> None:
    def append():
      with open(self._path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    self._guard(append)

  def _guard(self, write) -> None:
    """Runs `write`; a full disk or an unwritable folder is a one-line UserError."""
    try:
      write()
    except OSError as e:
      reason = checkpoint_lib.storage_failure(e)
      if reason is None:
        raise
      raise UserError(f'cannot write {self._path}: {reason}; free space (or fix the folder), '
                      'then rerun the same command: it resumes from the newest '
                      'checkpoint') from None

  def note(self, message: str) -> None:
    if not self.active:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()


class _PendingMetrics:
  """Step metrics kept on device until the next log or checkpoint (no sync every step)."""

  def __init__(self):
    self._items = []

  def add(self, step: int, metrics: dict) -> None:
    self._items.append((step, metrics))

  def drain(self) -> list:
    """[(step, {name: float})] in step order; a non-finite loss is a UserError."""
    items = jax.device_get(self._items)
    self._items = []
    out = []
    for step, metrics in items:
      values = {k: float(v) for k, v in metrics.items()}
      for name, value in values.items():
        if name.startswith('loss') and not math.isfinite(value):
          raise _NonFiniteLoss(f'{name} is {value} at step {step}')
      out.append((step, values))
    return out


class _NonFiniteLoss(Exception):
  """Training diverged; `what` says how, e.g. 'loss_seg is nan at step 12'."""

  def __init__(self, what: str):
    super().__init__(what)
    self.what = what


# ---------------------------------------------------------------------------------------
# The loop.


def _evaluate(config, workdir: pathlib.Path, checkpoint_dir: pathlib.Path) -> dict:
  """Target-domain evaluation of a checkpoint into DIR/eval/metrics.json."""
  from fada_jax import evaluate  # pylint: disable=g-import-not-at-top
  out_dir = workdir / EVAL_DIR
  metrics = evaluate.evaluate_checkpoint(config, str(checkpoint_dir), str(out_dir))
  if distributed.is_main_process():
    out_dir.mkdir(parents=True, exist_ok=True)
    record = dict(metrics, checkpoint=str(checkpoint_dir))
    checkpoint_lib.write_json_atomic(out_dir / EVAL_METRICS_FILE, jsonable(record))
    print(f'\n{config.stage}: {checkpoint_dir} on {config.data.target} '
          f'{config.eval.split}\n{evaluate.format_table(metrics)}', flush=True)
  return metrics


def jsonable(value):
  """`value` with numpy/jax arrays and scalars turned into JSON types."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return jsonable(np.asarray(value).tolist())
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value


def _host_tree(tree) -> Any:
  """Numpy copies of a replicated tree (every process holds the whole of each array)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(x.dtype, np.floating))


def train(config, workdir: str | os.PathLike) -> pathlib.Path:
  """Trains `config.stage` up to `solver.stop_iter`; returns the final checkpoint folder."""
  workdir = pathlib.Path(workdir).absolute()
  distributed.check_same_config(config, extra=str(workdir))
  solver = config.solver
  stop_iter = int(solver.stop_iter)
  checkpoint_every = int(solver.checkpoint_every)
  log_every = max(1, int(config.log_every))

  # Everything the run will read or write, before anything is written or compiled.
  preflight.check_training(config, workdir,
                           resuming=preflight.resuming(workdir, CHECKPOINTS_DIR))
  mesh = parallel.make_mesh()
  models = models_lib.build(config)
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, state_rng = jax.random.split(rng)

  def make_state(variables, state_rng):
    return state_lib.create_train_state(config, models, variables, state_rng)

  # Shapes only (no compilation): what the state, its shardings and the step look like.
  abstract_variables = jax.eval_shape(
      lambda r: models_lib.init_variables(models, r, config), init_rng)
  abstract_state = jax.eval_shape(make_state, abstract_variables, state_rng)
  shardings = parallel.state_sharding(abstract_state, mesh)
  step_fn = parallel.jit_step(steps_lib.make_step(config, models, abstract_state), mesh,
                              shardings, steps_lib.compiler_options(config))

  checkpoints = checkpoint_lib.TrainingCheckpoints(workdir / CHECKPOINTS_DIR,
                                                   keep=solver.keep_checkpoints)
  iterator = None
  try:
    start_step = 0
    resumed, passed_over = None, []
    if checkpoints.all_steps():
      target_variables, target_train = _checkpoint_items(_host_zeros(abstract_state))
      resumed, passed_over = checkpoints.restore_newest(target_variables, target_train,
                                                        _resume_fields(config))
      del target_variables, target_train
    if resumed is None:
      variables = initialization.initial_variables(config, models, init_rng)
      state = jax.jit(make_state, out_shardings=shardings)(variables, state_rng)
      del variables
    else:
      state = parallel.replicate(
          _state_from_items(abstract_state, resumed.variables, resumed.train), mesh,
          f'the train state of {checkpoints.step_dir(resumed.step)}')
      start_step = int(resumed.train['step'])
      if start_step != resumed.step:
        raise UserError(f'{checkpoints.step_dir(resumed.step)} holds step {start_step}, '
                        f'not {resumed.step}')
      checkpoints.write_meta(start_step, _checkpoint_meta(config, resumed.variables))
    if start_step > stop_iter:
      raise UserError(f'{checkpoints.step_dir(start_step)} is past config.solver.stop_iter='
                      f'{stop_iter}; use a new --workdir or a larger stop_iter')
    iterator = _StageBatches(config, start_step)
    if resumed is not None:
      _restore_data_state(iterator, resumed.data, checkpoints.step_dir(start_step))
    logger = _Logger(config, workdir, start_step)
    validation = validation_lib.Validation(config, checkpoints.directory,
                                           workdir / TRAIN_METRICS_FILE, start_step)
  except BaseException:
    # Closed here on a failed start (the loop below closes them otherwise): an open
    # orbax manager or grain pipeline fails noisily at interpreter exit.
    if iterator is not None:
      iterator.close()
    checkpoints.close()
    raise
  for note in passed_over:
    logger.note(note)
  if resumed is not None:
    logger.note(f'resumed from {checkpoints.step_dir(start_step)} (step {start_step})')
  last_good = start_step if resumed is not None else None
  batch_images = int(solver.batch_size)
  pending = _PendingMetrics()
  # The next batches are read and put on the mesh while a step runs; checkpoints record
  # the consumed position (batches.get_state()), not the prefetched one.
  batches = prefetch.Prefetcher(iterator, _batch_transfer(config, mesh),
                                depth=2, limit=stop_iter - start_step)
  window = []  # (step, metrics) since the last log
  window_start = None
  window_steps = 0
  window_excluded = 0.0  # seconds of validation inside the window, not step time

  try:
    for step in range(start_step + 1, stop_iter + 1):
      batch = next(batches)
      if step == start_step + 1 and jax.process_count() > 1:
        # Compile first, then meet: a process still compiling when another reaches the
        # step's first cross-process collective makes gloo's 30 s set-up time out.
        step_fn.lower(state, batch).compile()  # jit's call below reuses this executable
        distributed.barrier('fada_step_compiled')
      state, metrics = step_fn(state, batch)
      pending.add(step, metrics)
      if window_start is None:
        # The first step compiles; time the steady state from the end of it.
        jax.block_until_ready(metrics)
        window_start = time.perf_counter()
      else:
        window_steps += 1
      logger.advance()

      if step % log_every == 0 or step == stop_iter:
        window.extend(pending.drain())
        record = {'step': step}
        for name in window[-1][1]:
          if name.startswith('loss'):
            record[name] = float(np.mean([values[name] for _, values in window]))
          else:
            record[name] = window[-1][1][name]
        if window_steps:
          step_time = (time.perf_counter() - window_start - window_excluded) / window_steps
          record['step_time'] = step_time
          record['images_per_second'] = batch_images / step_time
        logger.write(record)
        window, window_steps, window_start = [], 0, time.perf_counter()
        window_excluded = 0.0

      if step % checkpoint_every == 0 or step == stop_iter:
        # Never save a state that a non-finite loss may have produced: every loss up to
        # this step is checked first, then the parameters themselves.
        window.extend(pending.drain())
        item_variables, item_train = _host_tree(_checkpoint_items(state))
        if not _all_finite(item_variables):
          raise _NonFiniteLoss(f'the parameters hold NaN or Inf after step {step}')
        checkpoints.save(step, item_variables, item_train, _gather_data_states(batches),
                         _checkpoint_meta(config, item_variables))
        last_good = step
        del item_variables, item_train

      if validation.due(step):
        jax.block_until_ready(state)  # the steps before it count as step time
        item_variables = _host_tree(_checkpoint_items(state)[0])
        row = validation.run(step, item_variables, _checkpoint_meta(config, item_variables))
        del item_variables
        logger.write_validation(row, validation.line(row))
        window_excluded += row['val_seconds']
  except _NonFiniteLoss as e:
    last = (f'the last good checkpoint is {checkpoints.step_dir(last_good)}'
            if last_good is not None else 'no checkpoint was written')
    raise UserError(f'{e.what} of {config.stage} (config.solver.base_lr={solver.base_lr}): '
                    f'training diverged and stopped; {last}') from None
  finally:
    logger.close()
    batches.close()  # and the iterator under it
    checkpoints.close()
  return checkpoints.step_dir(stop_iter)


def _resume_fields(config) -> dict:
  """The config fields a checkpoint must have been written with for this run to resume it."""
  return {'stage': config.stage, 'model.arch': config.model.arch,
          'model.num_classes': int(config.model.num_classes),
          'model.width': int(config.model.width)}


def _host_zeros(abstract) -> Any:
  return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
  """Trains the stage `config` describes (resuming if DIR holds checkpoints), then
  evaluates the final model on the target validation split. Returns the eval metrics."""
  workdir = pathlib.Path(workdir).absolute()
  final = train(config, workdir)
  return _evaluate(config, workdir, final)
