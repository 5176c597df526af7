"""Checks of everything a run will need, before it compiles, trains or writes anything.

A paper-scale stage trains for hours before its final evaluation, so a missing split or
an unwritable folder must be found at the start, not at the end. Each check raises a
`UserError` that names the field or path at fault and what is expected; none of them
creates a file or folder.

  check_training(config, workdir, resuming=...)   one stage: `train.loop`
  check_pipeline(workdir, stage_configs, first_stage_started=...)
                                     the three stages of `--mode=pipeline`
  check_eval(config, checkpoint, workdir)
  check_pseudo_label(config, checkpoint, output)
"""

import os
import pathlib

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import config_lib
from fada_jax.errors import UserError

# The folder each dataset's files live in, under config.data.root (format 'folder').
_DATASET_FOLDERS = {'gta5': 'gta5', 'synthia': 'synthia', 'cityscapes': 'cityscapes',
                    'cityscapes_pseudo': 'cityscapes'}
_PREPARED_FOLDER = 'prepared'


# ---------------------------------------------------------------------------------------
# Folders.


def check_writable_folder(path: str | os.PathLike, what: str) -> pathlib.Path:
  """`path` is, or can be created as, a folder this process may write into.

  `what` names the setting in the message (e.g. '--workdir'). Returns the absolute path.
  """
  path = pathlib.Path(path).expanduser().absolute()
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    where = 'is a file' if existing == path else f'cannot be created: {existing} is a file'
    raise UserError(f'{what}={path} {where}; expected a folder')
  if not os.access(existing, os.W_OK | os.X_OK):
    where = '' if existing == path else f'cannot be created: {existing} '
    raise UserError(f'{what}={path} {where}is not writable; '
                    'expected a folder this user may write into')
  return path


# ---------------------------------------------------------------------------------------
# Data.


def _check_data_root(config, dataset: str) -> None:
  """The data root holds the dataset's folder; the message names the absolute path."""
  data_format = config.data.format
  folder = _PREPARED_FOLDER if data_format == 'array_record' else _DATASET_FOLDERS.get(dataset)
  if folder is None:
    return  # synthetic data, or an unknown name `open_source` reports
  root = pathlib.Path(os.path.expanduser(str(config.data.root)))
  if (root / folder).is_dir():
    return
  given = (f'config.data.root={config.data.root!r}' if config.data.root
           else 'config.data.root is not set, so the current folder was used')
  raise UserError(f'{dataset}: no folder {(root / folder).absolute()} ({given}); give the '
                  f'folder that holds {folder}/ with --config.data.root=PATH')


def _check_pseudo_label_dir(config) -> None:
  folder = config.data.pseudo_label_dir
  if not folder:
    raise UserError(f'config.data.source={config.data.source} needs '
                    'config.data.pseudo_label_dir: the folder of pseudo labels written by '
                    '--mode=pseudo_label')
  path = pathlib.Path(os.path.expanduser(str(folder))).absolute()
  if not path.is_dir():
    raise UserError(f'config.data.pseudo_label_dir={folder}: no folder {path}; expected the '
                    'pseudo labels written by --mode=pseudo_label')


def check_training_data(config) -> None:
  """Opens every split a stage trains on (listing files, reading no image)."""
  from fada_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  streams = ['source'] + (['target'] if config.stage == 'adversarial' else [])
  for stream in streams:
    if stream == 'source' and config.stage == 'self_distill':
      _check_pseudo_label_dir(config)
      _check_data_root(config, config.data.source)
    else:
      _check_data_root(config, config.data[stream])
    data_pipeline._training_source(config, stream)  # pylint: disable=protected-access


def check_target_split(config, split: str) -> None:
  """Opens `split` of the target domain, as evaluation and pseudo labelling read it."""
  from fada_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  name = config.data.target.removesuffix('_pseudo')
  _check_data_root(config, name)
  data_pipeline.open_source(config, name, split)


# ---------------------------------------------------------------------------------------
# Networks and checkpoints.


def check_init_checkpoint(config) -> None:
  """config.init_checkpoint loads and fits the config's network: shapes only, nothing
  is computed or compiled (the initialisation is traced abstractly)."""
  if not config.init_checkpoint:
    return
  path = pathlib.Path(os.path.expanduser(str(config.init_checkpoint)))
  if not path.exists():
    raise UserError(f'config.init_checkpoint={config.init_checkpoint}: not found '
                    f'({path.absolute()} does not exist); expected a checkpoint folder '
                    '(tools/convert_torch_weights.py writes one from PyTorch weights)')
  import jax  # pylint: disable=g-import-not-at-top
  from fada_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  from fada_jax.train import initialization  # pylint: disable=g-import-not-at-top
  models = models_lib.build(config)
  try:
    jax.eval_shape(lambda rng: initialization.initial_variables(config, models, rng),
                   jax.random.PRNGKey(0))
  except UserError as e:
    if str(e).startswith('config.init_checkpoint='):
      raise
    raise UserError(f'config.init_checkpoint={config.init_checkpoint}: {e}') from None


def check_batch_split(config) -> None:
  """The global batch splits evenly over the devices of the mesh."""
  from fada_jax.train import parallel  # pylint: disable=g-import-not-at-top
  parallel.local_batch_sizes(config, parallel.make_mesh())


def check_checkpoint_path(path: str | os.PathLike, what: str) -> None:
  """`path` is a checkpoint folder, or a folder of checkpoint folders (eval)."""
  given = path
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise UserError(f'checkpoint not found: {path.absolute()} ({what}={given})')
  if not path.is_dir():
    raise UserError(f'{what}={given} is a file; expected a checkpoint folder')
  if (path / checkpoint_lib.META_FILE).is_file():
    checkpoint_lib.check_model_readable(path)  # one checkpoint (not a folder of several)


# ---------------------------------------------------------------------------------------
# Per mode.


def check_training(config, workdir: str | os.PathLike, *, resuming: bool) -> None:
  """One stage: config, workdir, training splits, the target split of the final
  evaluation, the batch split and (when starting afresh) the init checkpoint."""
  config_lib.validate(config)
  check_writable_folder(workdir, '--workdir')
  check_batch_split(config)
  check_training_data(config)
  check_target_split(config, config.eval.split)
  if not resuming:
    check_init_checkpoint(config)


def check_pipeline(workdir: str | os.PathLike, stage_configs: dict, *,
                   first_stage_started: bool) -> None:
  """The three stages (their configs validated by `pipeline.stage_config`): each stage's
  splits (stage 3's pseudo labels are made by the pipeline itself), and, unless stage 1
  has begun, its init checkpoint."""
  check_writable_folder(workdir, '--workdir')
  for stage, stage_cfg in stage_configs.items():
    check_batch_split(stage_cfg)
    if stage == 'self_distill':
      # Stage 3 reads the target's training images under the pseudo labels.
      check_target_split(stage_cfg, 'train')
    else:
      check_training_data(stage_cfg)
    check_target_split(stage_cfg, stage_cfg.eval.split)
  if not first_stage_started:
    check_init_checkpoint(stage_configs['source_only'])


def check_eval(config, checkpoint: str | os.PathLike, workdir: str | os.PathLike) -> None:
  check_checkpoint_path(checkpoint, '--checkpoint')
  check_writable_folder(workdir, '--workdir')
  check_target_split(config, config.eval.split)


def check_predict(checkpoint: str | os.PathLike, workdir: str | os.PathLike) -> None:
  check_checkpoint_path(checkpoint, '--checkpoint')
  check_writable_folder(workdir, '--workdir')


def check_pseudo_label(config, checkpoint: str | os.PathLike,
                       output: str | os.PathLike) -> None:
  check_checkpoint_path(checkpoint, '--checkpoint')
  check_writable_folder(output, '--output')
  check_target_split(config, 'train')


def resuming(workdir: str | os.PathLike, checkpoints_dir: str) -> bool:
  """Whether WORKDIR holds a finished training checkpoint to resume from."""
  return checkpoint_lib.latest_training_checkpoint(
      pathlib.Path(workdir) / checkpoints_dir) is not None
