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
    first_line = (str(e).strip().splitlines() or [''])[0]
    raise UserError(f'cannot read model variables in {variables_dir}: '
                    f'{type(e).__name__}: {first_line}') from None
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
