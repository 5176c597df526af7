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
on-disk layouts that hold model variables (the training state written during training)
can be read by the same call.
"""

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fada_jax.errors import UserError

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
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write('\n')
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
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return path


def _unreadable(variables_dir: pathlib.Path, error: Exception) -> UserError:
  """One line for a damaged array folder: orbax's first message line, without its spec."""
  reason = (str(error).strip().splitlines() or [''])[0].split(' [tensorstore_spec=')[0]
  if len(reason) > 300:
    reason = reason[:297] + '...'
  return UserError(f'cannot read model variables in {variables_dir} (damaged or '
                   f'incomplete?): {type(error).__name__}: {reason}')


def _load_model_format(path: pathlib.Path, meta: Meta) -> tuple[Variables, Meta]:
  version = meta.get('format_version')
  if version != MODEL_FORMAT_VERSION:
    raise UserError(f'model checkpoint {path} has format version {version}; this fada_jax '
                    f'reads version {MODEL_FORMAT_VERSION}')
  variables_dir = path / VARIABLES_DIR
  if not variables_dir.is_dir():
    raise UserError(f'model checkpoint is incomplete (no {VARIABLES_DIR}/): {path}')
  try:
    variables = _restore_tree(variables_dir)
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise _unreadable(variables_dir, e) from None
  if not isinstance(variables, dict) or not variables or set(variables) - set(MODEL_PARTS):
    raise UserError(f'model checkpoint {path} holds unexpected parts '
                    f'{sorted(variables) if isinstance(variables, dict) else type(variables)}')
  return variables, meta


register_model_loader(MODEL_FORMAT, _load_model_format)


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
  variables_dir = path / 'variables'
  if not variables_dir.is_dir():
    raise UserError(f'training checkpoint is incomplete (no variables/): {path}')
  try:
    # Through the step's composite layout (reads its metadata); the arrays were saved
    # as numpy, so they come back as numpy whatever devices this process has.
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      variables = checkpointer.restore(path.absolute(), args=ocp.args.Composite(
          variables=ocp.args.StandardRestore()))['variables']
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise _unreadable(variables_dir, e) from None
  return variables, meta


register_model_loader(TRAIN_FORMAT, _load_train_format)


class TrainingCheckpoints:
  """The training checkpoints of one run, under DIR/checkpoints (see above).

  Every process of a multi-host run creates one and calls `save`/`restore` together.
  Saving is synchronous: when `save` returns, the step is on disk and complete.
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

  def save(self, step: int, variables: Variables, train: Any, data: dict,
           meta: Meta) -> pathlib.Path:
    """Writes step `step`: model variables, the rest of the train state and the data state.

    Arrays are saved as host numpy copies (`_to_numpy_tree`): orbax then writes each
    once, from process 0, and the files restore on any device topology. The train state
    is replicated, so every process holds the same copy.
    """
    step = int(step)
    self._manager.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(_to_numpy_tree(variables)),
        train=ocp.args.StandardSave(_to_numpy_tree(train)),
        data=ocp.args.JsonSave(data)), force=True)
    self._manager.wait_until_finished()
    self.write_meta(step, meta)
    return self.step_dir(step)

  def write_meta(self, step: int, meta: Meta) -> None:
    """meta.json of a finished step (process 0 writes it; idempotent)."""
    if jax.process_index() != 0:
      return
    meta = dict(meta, format=TRAIN_FORMAT, format_version=TRAIN_FORMAT_VERSION,
                parts=sorted(MODEL_PARTS), step=int(step))
    write_json_atomic(self.step_dir(step) / META_FILE, meta)

  def restore(self, step: int, variables_target: Any, train_target: Any) -> tuple[Any, Any, dict]:
    """Reads step `step` as numpy trees shaped like the targets (trees of numpy arrays).

    The caller places the arrays on its mesh; a checkpoint therefore resumes on any
    number of devices.
    """
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(variables_target),
          train=ocp.args.StandardRestore(train_target),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # a damaged checkpoint, or one of another network/stage
      first_line = (str(e).strip().splitlines() or [''])[0]
      raise UserError(f'cannot resume from {self.step_dir(step)} (written by another '
                      f'config, or damaged; move it away to start afresh): '
                      f'{type(e).__name__}: {first_line[:300]}') from None
    return restored['variables'], restored['train'], restored['data']

  def close(self) -> None:
    self._manager.close()


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
    if child.is_dir() and child.name.isdigit() and (
        (child / 'commit_success.txt').exists() or (child / '_CHECKPOINT_METADATA').exists()):
      steps.append(int(child.name))
  return directory / str(max(steps)) if steps else None
