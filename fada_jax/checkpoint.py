"""Checkpoints on disk: model variables (this part) and, later, training state.

A *model checkpoint* is a folder

  DIR/meta.json     {"format": "fada_jax.model", "format_version": 1, "arch", "num_classes",
                     "kind", "source", ...}
  DIR/variables/    an orbax (StandardCheckpointHandler) tree of numpy float32 arrays:
                    {'feature_extractor': {'params', 'batch_stats'}, 'classifier': {'params'},
                     'discriminator': {'params'}}, any subset of the three parts.

`save_model` writes the whole folder under a temporary name next to DIR and renames it
into place, so DIR either holds a complete checkpoint or does not exist. `load_model`
reads meta.json and dispatches on its "format" through `register_model_loader`, so other
on-disk layouts that hold model variables (the training state written during training,
the best validated model) can be read by the same call. Training records its config in
the meta.json of both (`"config"`), which `fada_jax.load` uses.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fada_jax.errors import UserError
from fada_jax.train import distributed

META_FILE = 'meta.json'
VARIABLES_DIR = 'variables'
MODEL_FORMAT = 'fada_jax.model'
MODEL_FORMAT_VERSION = 1
MODEL_PARTS = ('feature_extractor', 'classifier', 'discriminator')

Variables = dict[str, Any]
Meta = dict[str, Any]
# A loader gets the checkpoint folder and its parsed meta.json and returns (variables, meta).
ModelLoader = Callable[[pathlib.Path, Meta], tuple[Variables, Meta]]

_MODEL_LOADERS: dict[str, ModelLoader] = {}


def register_model_loader(format_name: str, loader: ModelLoader) -> None:
  """Lets `load_model` read folders whose meta.json says `"format": format_name`."""
  _MODEL_LOADERS[format_name] = loader


# ---------------------------------------------------------------------------------------
# Small helpers shared by every checkpoint kind.


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON to `path` via a temporary file and rename (never a half-written file)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` via a temporary file and rename (never a half-written file)."""
  write_bytes_atomic(path, text.encode())


# The process's umask, read once (setting it to read it is not thread-safe): files written
# through mkstemp (mode 0600) get the mode an ordinary open() would give them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and rename (never a half-written file),
  with the mode the umask gives a new file."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_meta(path: str | os.PathLike) -> Meta:
  """Parses DIR/meta.json; a missing folder or file, or bad JSON, is a UserError."""
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f'checkpoint not found: {path}')
  if not path.is_dir():
    raise UserError(f'not a checkpoint folder (a file): {path}')
  meta_path = path / META_FILE
  if not meta_path.is_file():
    raise UserError(f'not a fada_jax checkpoint (no {META_FILE}): {path}')
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'unreadable checkpoint metadata {meta_path}: {e}') from None
  if not isinstance(meta, dict):
    raise UserError(f'unreadable checkpoint metadata {meta_path}: not a JSON object')
  return meta


def _to_numpy_tree(tree: Any) -> Any:
  """Host numpy copies of every leaf: the file then carries no device or sharding, and
  restores as numpy on any topology (callers place the arrays on their own mesh)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _save_tree(directory: pathlib.Path, tree: Any) -> None:
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(directory.absolute(), args=ocp.args.StandardSave(tree))


def _restore_tree(directory: pathlib.Path) -> Any:
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    return checkpointer.restore(directory.absolute())


def _check_output_dir(path: pathlib.Path, overwrite: bool) -> None:
  if path.exists():
    if not path.is_dir():
      raise UserError(f'output exists and is a file, not a folder: {path}')
    if any(path.iterdir()) and not overwrite:
      raise UserError(f'output folder exists and is not empty: {path} (pass --overwrite)')


def _publish_dir(staging: pathlib.Path, path: pathlib.Path) -> None:
  """Moves the complete `staging` folder to `path`, replacing what is there."""
  if path.exists():
    # Rename the old folder away first, so a crash leaves either the old or the new
    # checkpoint at `path` (plus a stale backup), never a mixture.
    backup = pathlib.Path(tempfile.mkdtemp(prefix=f'.{path.name}.old-', dir=path.parent))
    backup.rmdir()
    os.rename(path, backup)
    os.rename(staging, path)
    shutil.rmtree(backup, ignore_errors=True)
  else:
    os.rename(staging, path)


# ---------------------------------------------------------------------------------------
# Model variables.


def save_model(path: str | os.PathLike, variables: Variables, meta: Meta,
               overwrite: bool = False) -> pathlib.Path:
  """Writes a model checkpoint folder at `path` atomically and returns its path.

  `variables`: {'feature_extractor'?, 'classifier'?, 'discriminator'?}, each a flax
  variables dict. `meta`: JSON-serialisable facts about it ('arch', 'num_classes',
  'kind', 'source', ...). An existing non-empty folder is refused unless `overwrite`.
  """
  path = pathlib.Path(path)
  unknown = sorted(set(variables) - set(MODEL_PARTS))
  if unknown or not variables:
    raise ValueError(f'model variables must be a non-empty subset of {MODEL_PARTS}, '
                     f'got {sorted(variables)}')
  _check_output_dir(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = dict(meta, format=MODEL_FORMAT, format_version=MODEL_FORMAT_VERSION,
              parts=sorted(variables))
  try:
    json.dumps(meta)
  except TypeError as e:
    raise ValueError(f'model meta is not JSON-serialisable: {e}') from None
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{path.name}.tmp-', dir=path.parent))
  try:
    _save_tree(staging / VARIABLES_DIR, _to_numpy_tree(variables))
    # meta.json last: its presence marks a complete checkpoint.
    write_json_atomic(staging / META_FILE, meta)
    _publish_dir(staging, path)
  except BaseException:
    _remove_abandoned(staging)
    raise
  return path


def _remove_abandoned(staging: pathlib.Path, settle: float = 0.2, timeout: float = 5.0) -> None:
  """Removes the staging folder of a failed save. When one array of a save fails, orbax
  does not wait for the writes it already handed to tensorstore; they can land after a
  first removal (2 failed saves in 30 here), so the folder is removed until it stays
  gone for `settle` seconds."""
  deadline = time.monotonic() + timeout
  while True:
    shutil.rmtree(staging, ignore_errors=True)
    time.sleep(settle)
    if not staging.exists() or time.monotonic() > deadline:
      return


# What orbax and tensorstore raise for damaged or missing files: tensorstore's errors
# (truncated data, a missing manifest) are ValueErrors, a missing metadata file is a
# FileNotFoundError, a cut JSON item a JSONDecodeError (a ValueError), a missing item a
# KeyError. Anything else is a fault of ours and keeps its traceback.
DAMAGED_FILE_ERRORS = (OSError, ValueError, KeyError)


def _first_line(error: Exception, limit: int = 300) -> str:
  """A library error's first line, without tensorstore's spec dump."""
  line = (str(error).strip().splitlines() or [''])[0].split(' [tensorstore_spec=')[0]
  return line if len(line) <= limit else line[:limit - 3] + '...'


def _unreadable(variables_dir: pathlib.Path, error: Exception | str) -> UserError:
  """One line for a damaged array folder: the first line of the library's message."""
  reason = error if isinstance(error, str) else f'{type(error).__name__}: {_first_line(error)}'
  return UserError(f'cannot read model variables in {variables_dir} (damaged or '
                   f'incomplete?): {reason}')


def _readable_variables_dir(path: pathlib.Path, kind: str = 'model') -> pathlib.Path:
  """The checkpoint's variables folder, once it exists and its array files read back."""
  variables_dir = path / VARIABLES_DIR
  if not variables_dir.is_dir():
    raise UserError(f'{kind} checkpoint is incomplete (no {VARIABLES_DIR}/): {path}')
  damage = _damaged_tree(variables_dir) if (variables_dir / '_METADATA').is_file() else None
  if damage:
    raise _unreadable(variables_dir, damage)
  return variables_dir


def _load_model_format(path: pathlib.Path, meta: Meta) -> tuple[Variables, Meta]:
  version = meta.get('format_version')
  if version != MODEL_FORMAT_VERSION:
    raise UserError(f'model checkpoint {path} has format version {version}; this fada_jax '
                    f'reads version {MODEL_FORMAT_VERSION}')
  variables_dir = _readable_variables_dir(path)
  try:
    variables = _restore_tree(variables_dir)
  except DAMAGED_FILE_ERRORS as e:
    raise _unreadable(variables_dir, e) from None
  if not isinstance(variables, dict) or not variables or set(variables) - set(MODEL_PARTS):
    raise UserError(f'model checkpoint {path} holds unexpected parts '
                    f'{sorted(variables) if isinstance(variables, dict) else type(variables)}')
  return variables, meta


register_model_loader(MODEL_FORMAT, _load_model_format)


def check_model_readable(path: str | os.PathLike) -> None:
  """What `load_model` would refuse, found without loading: a missing or unknown
  meta.json, a missing variables folder, or array files that do not read back."""
  path = pathlib.Path(path)
  meta = read_meta(path)
  if meta.get('format') not in _MODEL_LOADERS:
    raise UserError(f'{path} is not a model checkpoint (format {meta.get("format")!r}; '
                    f'readable: {sorted(_MODEL_LOADERS)})')
  _readable_variables_dir(path)


def load_model(path: str | os.PathLike) -> tuple[Variables, Meta]:
  """Reads model variables (numpy arrays) and meta from a checkpoint folder.

  Any folder whose meta.json names a registered format is accepted; a missing path, a
  folder without meta.json, or an unknown format is a UserError naming the path.
  """
  path = pathlib.Path(path)
  meta = read_meta(path)
  format_name = meta.get('format')
  loader = _MODEL_LOADERS.get(format_name)
  if loader is None:
    raise UserError(f'{path} is not a model checkpoint (format {format_name!r}; '
                    f'readable: {sorted(_MODEL_LOADERS)})')
  return loader(path, meta)


# =======================================================================================
# The best validated model of a run (written by `fada_jax.train.validation`).
#
# DIR/checkpoints/best/ holds the model of the highest val mIoU so far: meta.json (with its
# `step` and `val_miou`) and variables/arrays.npz. Process 0 writes it alone, so it is
# written without orbax, whose saves wait for every process. It is not a step folder:
# orbax's step discovery, retention and `latest_training_checkpoint` read numeric folder
# names only, and `evaluate.find_checkpoints` leaves it out of a folder of step checkpoints.

BEST_DIR = 'best'
BEST_FORMAT = 'fada_jax.best'
BEST_FORMAT_VERSION = 1
_ARRAYS_FILE = 'arrays.npz'


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}/'))
    else:
      out[f'{prefix}{key}'] = np.asarray(value)
  return out


def save_best(path: pathlib.Path, variables: dict, meta: dict) -> None:
  """Writes the model at `path` atomically (a crash leaves the old or the new one)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{path.name}.tmp-', dir=path.parent))
  try:
    (staging / VARIABLES_DIR).mkdir()
    np.savez(staging / VARIABLES_DIR / _ARRAYS_FILE, **_flatten(variables))
    write_json_atomic(staging / META_FILE, dict(
        meta, format=BEST_FORMAT, format_version=BEST_FORMAT_VERSION,
        parts=sorted(variables)))
    _publish_dir(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _load_best(path: pathlib.Path, meta: dict) -> tuple[dict, dict]:
  arrays_path = path / VARIABLES_DIR / _ARRAYS_FILE
  try:
    with np.load(arrays_path) as arrays:
      flat = {name: arrays[name] for name in arrays.files}
  except (OSError, ValueError, EOFError) as e:
    raise UserError(f'{arrays_path} cannot be read ({type(e).__name__}: {e}); it is a '
                    'copy of the best validated model, another is written at the next '
                    'improvement') from None
  variables: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = variables
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return variables, meta


register_model_loader(BEST_FORMAT, _load_best)


def best_checkpoint(checkpoints_dir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(checkpoints_dir) / BEST_DIR


# =======================================================================================
# Training checkpoints (written and resumed by `fada_jax.train.loop`).
#
# DIR/checkpoints/<step>/ is one step of an orbax CheckpointManager:
#   variables/  the model variables, in the layout of a model checkpoint (numpy copies
#               of the replicated arrays, written once, by process 0)
#   train/      {'step', 'opt_state', 'rng'}: the rest of the train state
#   data/       JSON {'process_count': P, 'states': [the data iterator state of each process]}
#   meta.json   {"format": "fada_jax.train", "step", "stage", "arch", "num_classes", ...}
# orbax writes a step under a temporary name and renames it when complete, so a step
# folder that exists is whole; a killed save leaves only a temporary folder, which is
# never listed as a step and is removed when the manager next starts. meta.json is
# written after the rename (and rewritten on resume if a kill came in between); it lets
# `load_model` read a step folder as a model checkpoint, e.g. to start stage 2 from
# stage 1 or to evaluate it.

TRAIN_FORMAT = 'fada_jax.train'
TRAIN_FORMAT_VERSION = 1
TRAIN_ITEMS = ('variables', 'train', 'data')


def _load_train_format(path: pathlib.Path, meta: Meta) -> tuple[Variables, Meta]:
  version = meta.get('format_version')
  if version != TRAIN_FORMAT_VERSION:
    raise UserError(f'training checkpoint {path} has format version {version}; this '
                    f'fada_jax reads version {TRAIN_FORMAT_VERSION}')
  variables_dir = _readable_variables_dir(path, 'training')
  try:
    # Through the step's composite layout (reads its metadata); the arrays were saved
    # as numpy, so they come back as numpy whatever devices this process has.
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      variables = checkpointer.restore(path.absolute(), args=ocp.args.Composite(
          variables=ocp.args.StandardRestore()))['variables']
  except DAMAGED_FILE_ERRORS as e:
    raise _unreadable(variables_dir, e) from None
  return variables, meta


register_model_loader(TRAIN_FORMAT, _load_train_format)


@dataclasses.dataclass
class Resumed:
  """The step `TrainingCheckpoints.restore_newest` read."""
  step: int
  variables: Any
  train: Any
  data: dict


class TrainingCheckpoints:
  """The training checkpoints of one run, under DIR/checkpoints (see above).

  Every process of a multi-host run creates one and calls `save`/`restore_newest`
  together. Saving is synchronous: when `save` returns, the step is on disk and complete.
  """

  def __init__(self, directory: str | os.PathLike, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)), create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=TRAIN_ITEMS,
                                          options=options)

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(int(step))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _last_good(self, up_to: int | None = None) -> str:
    """Names the newest committed step (up to `up_to`) for an error message."""
    good = [s for s in self.all_steps()
            if (up_to is None or s <= up_to) and is_committed(self.step_dir(s))]
    return (f'the last good checkpoint is {self.step_dir(good[-1])}' if good
            else 'no checkpoint was written before')

  def save(self, step: int, variables: Variables, train: Any, data: dict,
           meta: Meta) -> pathlib.Path:
    """Writes step `step`: model variables, the rest of the train state and the data state.

    Arrays are saved as host numpy copies (`_to_numpy_tree`): orbax then writes each
    once, from process 0, and the files restore on any device topology. The train state
    is replicated, so every process holds the same copy. A full disk or a folder that
    became unwritable is a UserError naming the last good checkpoint, which stays.
    """
    step = int(step)
    variables, train = _to_numpy_tree(variables), _to_numpy_tree(train)
    _check_free_space(self.directory, step, (variables, train), self._last_good())
    try:
      with _quiet_orbax_threads():
        self._manager.save(step, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data)), force=True)
        self._manager.wait_until_finished()
      self.write_meta(step, meta)
    except (OSError, ValueError) as e:
      reason = storage_failure(e)
      if reason is None:
        raise
      # orbax may have committed this step before meta.json failed (resume rewrites it).
      raise UserError(f'cannot save step {step} in {self.directory}: {reason}; '
                      f'{self._last_good(up_to=step)} (free space or fix the folder, then '
                      'rerun the same command to resume)') from None
    return self.step_dir(step)

  def write_meta(self, step: int, meta: Meta) -> None:
    """meta.json of a finished step (process 0 writes it; idempotent)."""
    if jax.process_index() != 0:
      return
    meta = dict(meta, format=TRAIN_FORMAT, format_version=TRAIN_FORMAT_VERSION,
                parts=sorted(MODEL_PARTS), step=int(step))
    write_json_atomic(self.step_dir(step) / META_FILE, meta)

  def restore_newest(self, variables_target: Any, train_target: Any,
                     expected: dict[str, Any]) -> tuple[Resumed | None, list[str]]:
    """The newest step that reads back, as numpy trees shaped like the targets, and one
    line for each newer step folder passed over on the way.

    A step folder without orbax's commit marker (a save that was killed) and a committed
    step whose files cannot be read are passed over, newest first, and renamed to
    `<step>.unfinished` / `<step>.unreadable` (nothing is deleted) so that this run can
    write its steps again. `expected` maps dotted config fields ('model.arch', ...) to
    this run's values: a step written with other values is a UserError, not damage.
    None when no step was ever finished (the run starts afresh); a UserError when
    finished steps exist and none of them can be read.
    """
    passed_over: list[tuple[pathlib.Path, str, str]] = []  # (folder, suffix, reason)
    for step in sorted(self._manager.all_steps(), reverse=True):
      step_dir = self.step_dir(step)
      if not is_committed(step_dir):
        passed_over.append((step_dir, 'unfinished', 'unfinished (no commit marker)'))
        continue
      _check_written_by(step_dir, expected)
      damage = _damaged_arrays(step_dir)
      if damage:
        passed_over.append((step_dir, 'unreadable', f'unreadable ({damage})'))
        continue
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(variables_target),
            train=ocp.args.StandardRestore(train_target),
            data=ocp.args.JsonRestore()))
      # With the arrays' bytes checked, what is left of damage: a missing metadata file
      # (FileNotFoundError), a cut JSON item, a missing item (KeyError). A ValueError
      # here is a target that does not fit: ours to fix, with its traceback.
      except (OSError, json.JSONDecodeError, KeyError) as e:
        passed_over.append((step_dir, 'unreadable',
                            f'unreadable ({type(e).__name__}: {_first_line(e, 200)})'))
        continue
      notes = self._set_aside(passed_over)
      return Resumed(step, restored['variables'], restored['train'], restored['data']), notes
    if any(suffix == 'unreadable' for _, suffix, _ in passed_over):
      listed = '; '.join(f'{folder}: {reason}' for folder, _, reason in passed_over)
      raise UserError(f'no checkpoint in {self.directory} can be read ({listed}); '
                      'use a new --workdir, or move these folders away to start afresh')
    return None, self._set_aside(passed_over)

  def _set_aside(self, passed_over: list[tuple[pathlib.Path, str, str]]) -> list[str]:
    notes = []
    moves = []
    for folder, suffix, reason in passed_over:
      target = folder.with_name(f'{folder.name}.{suffix}')
      number = 1
      while target.exists():
        number += 1
        target = folder.with_name(f'{folder.name}.{suffix}-{number}')
      moves.append((folder, target))
      notes.append(f'checkpoint {folder} is {reason}: passed over and kept as {target}')
    if moves:
      if jax.process_index() == 0:
        for folder, target in moves:
          os.rename(folder, target)
      distributed.barrier('fada_checkpoints_set_aside')
      self._manager.reload()
    return notes

  def close(self) -> None:
    self._manager.close()


def is_committed(step_dir: pathlib.Path) -> bool:
  """Whether orbax finished writing the step (its commit marker or metadata file is there)."""
  return ((step_dir / 'commit_success.txt').exists()
          or (step_dir / '_CHECKPOINT_METADATA').exists())


def _damaged_arrays(step_dir: pathlib.Path) -> str | None:
  """Why the array items of a step cannot be read back, or None when every byte reads.

  Reads every stored value of each item's OCDBT database in turn. orbax's own restore
  stops at the first bad read while the other reads are still in flight, whose
  completions then print 'Event loop is closed' tracebacks; this check fails cleanly.
  """
  for item in TRAIN_ITEMS:
    item_dir = step_dir / item
    if not (item_dir / '_METADATA').is_file():
      continue  # a JSON item, or a missing one: orbax's restore names it
    damage = _damaged_tree(item_dir)
    if damage:
      return f'{item}: {damage}'
  return None


def _damaged_tree(tree_dir: pathlib.Path) -> str | None:
  """Why an orbax array tree folder cannot be read back, or None when every byte reads."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  if not (tree_dir / 'manifest.ocdbt').is_file():
    return 'manifest.ocdbt is missing'
  try:
    store = ts.KvStore.open({'driver': 'ocdbt',
                             'base': f'file://{tree_dir.absolute()}/'}).result()
    for key in store.list().result():
      store.read(key).result()
  except ValueError as e:  # tensorstore's error for every failed read
    return _first_line(e, 200)
  return None


def _check_written_by(step_dir: pathlib.Path, expected: dict[str, Any]) -> None:
  """A UserError when the step's meta.json records other values of `expected`'s fields."""
  try:
    config = json.loads((step_dir / META_FILE).read_text()).get('config')
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
    return  # no or damaged meta.json: the restore itself decides
  if not isinstance(config, dict):
    return
  for field, value in expected.items():
    recorded = config
    for key in field.split('.'):
      recorded = recorded.get(key) if isinstance(recorded, dict) else None
    if recorded is None:
      continue
    if isinstance(value, (tuple, list)):
      value, recorded = list(value), list(recorded) if isinstance(recorded, list) else recorded
    if recorded != value:
      raise UserError(f'{step_dir} was written with config.{field}={recorded!r}, this run has '
                      f'{value!r}; use a new --workdir for another configuration')


def storage_failure(error: Exception) -> str | None:
  """Why a write failed, when the disk or the folder is at fault (else None: our bug)."""
  if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
    return os.strerror(error.errno).lower()
  # tensorstore reports a failed write as a ValueError with a status code in front.
  message = str(error)
  if isinstance(error, ValueError) and message.startswith(
      ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED')):
    for code in _STORAGE_ERRNOS:
      if f"[os_error_code='{code}']" in message:
        return os.strerror(code).lower()
    return _first_line(error, 200)
  return None


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
# A step's files take a little more than its arrays (orbax's metadata, our meta.json);
# with this margin a save that would fill the disk is refused before orbax starts, since
# a write that fails midway leaves tensorstore printing 'Event loop is closed' tracebacks
# (from its own threads, past any Python hook) above our one-line error.
_SAVE_MARGIN_BYTES = 1 << 20
_SAVE_MARGIN_FRACTION = 0.05


def _check_free_space(directory: pathlib.Path, step: int, trees: Any, last_good: str) -> None:
  arrays = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(trees))
  needed = int(arrays * (1 + _SAVE_MARGIN_FRACTION)) + _SAVE_MARGIN_BYTES
  probe = directory
  while not probe.exists():
    probe = probe.parent
  free = shutil.disk_usage(probe).free
  if free < needed:
    raise UserError(f'cannot save step {step} in {directory}: it needs about '
                    f'{_size(needed)} and the disk has {_size(free)} free; '
                    f'{last_good} (free space, then rerun the same command to resume)')


def _size(num_bytes: int) -> str:
  for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
    if num_bytes < 1024 or unit == 'GiB':
      return f'{num_bytes:.0f} {unit}' if unit == 'bytes' else f'{num_bytes:.1f} {unit}'
    num_bytes /= 1024
  return ''  # unreachable


@contextlib.contextmanager
def _quiet_orbax_threads():
  """Drops orbax's log of an exception in its writer threads while saving: the same
  exception reaches `save`, which reports it in one line (or re-raises it)."""
  orbax_thread_failure = 'raised an exception'

  def keep(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and orbax_thread_failure in str(record.getMessage()))

  loggers = [logging.getLogger('absl'), logging.getLogger()]
  for logger in loggers:
    logger.addFilter(keep)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(keep)


def latest_training_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
  """The newest complete step folder under DIR/checkpoints (None when there is none).

  Reads the folder names only (no orbax manager, no multi-process coordination): a step
  folder is complete when orbax's commit marker or metadata file is in it.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return None
  steps = []
  for child in directory.iterdir():
    if child.is_dir() and child.name.isdigit() and is_committed(child):
      steps.append(int(child.name))
  return directory / str(max(steps)) if steps else None
