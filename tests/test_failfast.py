"""Bad input is found before a run writes or compiles anything, and ends in one line.

Each preflight case calls the check a run makes first (`train.preflight`) on a tiny
folder dataset; a few go through `python -m fada_jax.main` to show what a user sees:
one `error:` line, exit status 2, and no workdir created. Damaged training checkpoints
and a full disk are exercised on `checkpoint.TrainingCheckpoints` with small trees.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from fada_jax import checkpoint
from fada_jax import config_lib
from fada_jax.constants import TRAIN_METRICS_FILE
from fada_jax.data import prepared
from fada_jax.data import synthetic
from fada_jax.errors import UserError
from fada_jax.train import preflight
from tiny_runs import REPO, environment, set_fields, truncate_arrays

TINY_FOLDER = {'model.arch': 'resnet18', 'model.width': 4, 'data.source_size': (32, 16),
               'data.target_size': (32, 16), 'data.test_size': (32, 16),
               'data.crop_size': (32, 16), 'solver.batch_size': 8}


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  """GTA5 and Cityscapes layouts with a few small frames."""
  root = tmp_path_factory.mktemp('data')
  synthetic.write_synthetic_folders(root, 2, 2, 2, image_size=(64, 32))
  return root


def _config(stage='source_only', **overrides):
  config = config_lib.make_config('g2c', stage, 'resnet18')
  return set_fields(config, dict(TINY_FOLDER, **overrides))


# ---------------------------------------------------------------------------------------
# Config ranges.


@pytest.mark.parametrize('field, value, expected', [
    ('data.color_jitter', (0.5, 0.5, 0.5, 0.7), r'color_jitter=.*hue in \[0, 0.5\]'),
    ('data.color_jitter', (-0.1, 0.0, 0.0, 0.0), r'color_jitter=.*>= 0'),
    ('data.scale_range', (1.5, 0.5), r'scale_range=\(1.5, 0.5\).*0 < low <= high'),
    ('data.scale_range', (0.0, 1.0), r'scale_range=.*0 < low'),
    ('data.crop_size', (0, 16), r'crop_size=\(0, 16\).*positive'),
    ('solver.keep_checkpoints', 0, r'keep_checkpoints=0 must be a positive integer'),
    ('solver.momentum', 1.0, r'momentum=1.0 must be in \[0, 1\)'),
    ('solver.base_lr', -1e-3, r'base_lr=-0.001 must be a number >= 0'),
    ('solver.temperature', 0.0, r'temperature=0.0 must be > 0'),
    ('data.workers', -1, r'workers=-1 must be an integer >= 0'),
    ('pseudo_label.keep_fraction', 0.0, r'keep_fraction=0.0 must be in \(0, 1\]'),
    ('pseudo_label.keep_confidence', 1.5, r'keep_confidence=1.5 must be in \(0, 1\]'),
])
def test_config_ranges(field, value, expected):
  with pytest.raises(UserError, match=expected):
    config_lib.validate(_config(**{field: value}))


def test_torchvision_jitter_limits_are_accepted():
  config_lib.validate(_config(**{'data.color_jitter': (2.0, 0.0, 1.5, 0.5),
                                 'data.scale_range': (1.0, 1.0)}))


# ---------------------------------------------------------------------------------------
# Everything a training run will read, before it starts.


def _without_val(data_root, tmp_path):
  root = tmp_path / 'no_val'
  shutil.copytree(data_root, root)
  for kind in ('leftImg8bit', 'gtFine'):
    shutil.rmtree(root / 'cityscapes' / kind / 'val')
  return root


def _other_width_checkpoint(tmp_path):
  """A model checkpoint of the tiny network at width 8 (zeros; only shapes matter)."""
  import jax  # pylint: disable=import-outside-toplevel
  from fada_jax import models as models_lib  # pylint: disable=import-outside-toplevel
  config = _config(**{'model.width': 8})
  abstract = jax.eval_shape(
      lambda r: models_lib.init_variables(models_lib.build(config), r, config),
      jax.random.PRNGKey(0))
  zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  return checkpoint.save_model(tmp_path / 'width8', {'feature_extractor': zeros['feature_extractor']},
                               {'arch': 'resnet18', 'num_classes': None, 'kind': 'imagenet'})


@pytest.mark.parametrize('case', [
    'target_val_missing', 'no_data_root', 'pseudo_label_dir_missing', 'pseudo_label_dir_unset',
    'init_checkpoint_missing', 'init_checkpoint_other_width', 'batch_over_devices',
    'workdir_is_a_file', 'workdir_below_a_file'])
def test_training_inputs_are_checked_before_anything_is_written(case, data_root, tmp_path,
                                                                monkeypatch):
  workdir = tmp_path / 'run'
  stage, overrides = 'source_only', {'data.root': str(data_root)}
  if case == 'target_val_missing':
    overrides['data.root'] = str(_without_val(data_root, tmp_path))
    expected = r'cityscapes: folder .*no_val/cityscapes/leftImg8bit/val does not exist'
  elif case == 'no_data_root':
    monkeypatch.chdir(tmp_path)
    overrides['data.root'] = ''
    expected = (rf'gta5: no folder {tmp_path}/gta5 \(config.data.root is not set.*'
                r'--config.data.root=PATH')
  elif case == 'pseudo_label_dir_missing':
    stage = 'self_distill'
    overrides['data.pseudo_label_dir'] = str(tmp_path / 'labels')
    expected = rf'config.data.pseudo_label_dir={tmp_path}/labels: no folder'
  elif case == 'pseudo_label_dir_unset':
    stage = 'self_distill'
    expected = r'config.data.source=cityscapes_pseudo needs config.data.pseudo_label_dir'
  elif case == 'init_checkpoint_missing':
    overrides['init_checkpoint'] = str(tmp_path / 'imagenet')
    expected = rf'config.init_checkpoint={tmp_path}/imagenet: not found'
  elif case == 'init_checkpoint_other_width':
    overrides['init_checkpoint'] = str(_other_width_checkpoint(tmp_path))
    expected = r'config.init_checkpoint=.*width8\b.*: feature_extractor/\S+ has shape'
  elif case == 'batch_over_devices':
    stage, overrides['solver.batch_size'] = 'adversarial', 6
    expected = r'config.solver.batch_size=6: .*does not split evenly over 4 devices'
  elif case == 'workdir_is_a_file':
    workdir.write_text('')
    expected = rf'--workdir={workdir} is a file; expected a folder'
  else:
    (tmp_path / 'file').write_text('')
    workdir = tmp_path / 'file' / 'run'
    expected = rf'--workdir={workdir} cannot be created: {tmp_path}/file is a file'
  before = sorted(tmp_path.rglob('*'))
  with pytest.raises(UserError, match=expected):
    preflight.check_training(_config(stage, **overrides), workdir, resuming=False)
  assert sorted(tmp_path.rglob('*')) == before  # nothing written


def test_pipeline_checks_the_val_split_of_every_stage_first(data_root, tmp_path):
  from fada_jax import pipeline  # pylint: disable=import-outside-toplevel
  config = _config(**{'data.root': str(_without_val(data_root, tmp_path))})
  with pytest.raises(UserError, match=r'cityscapes: folder .*leftImg8bit/val does not exist'):
    pipeline.run_pipeline(config, tmp_path / 'pipeline')
  assert not (tmp_path / 'pipeline').exists()


def test_eval_and_pseudo_label_inputs(data_root, tmp_path):
  config = _config(**{'data.root': str(_without_val(data_root, tmp_path))})
  with pytest.raises(UserError, match=rf'checkpoint not found: {tmp_path}/nothing '
                                      rf'\(--checkpoint={tmp_path}/nothing\)'):
    preflight.check_eval(config, tmp_path / 'nothing', tmp_path / 'eval')
  (tmp_path / 'ckpt').mkdir()
  with pytest.raises(UserError, match=r'leftImg8bit/val does not exist'):
    preflight.check_eval(config, tmp_path / 'ckpt', tmp_path / 'eval')
  (tmp_path / 'out').write_text('')
  with pytest.raises(UserError, match=rf'--output={tmp_path}/out is a file'):
    preflight.check_pseudo_label(config, tmp_path / 'ckpt', tmp_path / 'out')
  preflight.check_pseudo_label(config, tmp_path / 'ckpt', tmp_path / 'labels')
  assert not (tmp_path / 'eval').exists() and not (tmp_path / 'labels').exists()

  # A damaged model checkpoint is found before the evaluation folder is made.
  variables, _ = _tree(2)
  damaged = checkpoint.save_model(tmp_path / 'damaged', variables, {'arch': 'resnet18'})
  truncate_arrays(damaged)
  with pytest.raises(UserError, match=rf'cannot read model variables in {damaged}/variables'):
    preflight.check_eval(config, damaged, tmp_path / 'eval')
  assert not (tmp_path / 'eval').exists()


def test_unwritable_workdir(tmp_path, monkeypatch):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.geteuid() == 0:
    # root passes every permission check; judge by the permission bits instead.
    real_access = os.access
    monkeypatch.setattr(preflight.os, 'access', lambda path, mode: real_access(path, mode) and (
        not mode & os.W_OK or bool(os.stat(path).st_mode & stat.S_IWUSR)))
  try:
    with pytest.raises(UserError, match=rf'--workdir={locked} is not writable'):
      preflight.check_writable_folder(locked, '--workdir')
    with pytest.raises(UserError, match=rf'--workdir={locked}/run cannot be created: {locked} '
                                        r'is not writable'):
      preflight.check_writable_folder(locked / 'run', '--workdir')
  finally:
    locked.chmod(stat.S_IRWXU)


def _main(args, cwd, cache_dir):
  return subprocess.run([sys.executable, '-m', 'fada_jax.main', *args], cwd=cwd,
                        env=environment(cache_dir), capture_output=True, text=True,
                        timeout=120)


def test_the_command_line_says_one_line_and_exits_2(data_root, tmp_path, cache_dir):
  # The README's own command, from a folder without the datasets.
  result = _main([f'--config={REPO}/configs/g2c_adv.py', '--workdir=runs/x'], tmp_path,
                 cache_dir)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      f'error: gta5: no folder {tmp_path}/gta5 (config.data.root is not set, so the current '
      'folder was used); give the folder that holds gta5/ with --config.data.root=PATH']
  assert not (tmp_path / 'runs').exists()

  (tmp_path / 'a_file').write_text('')
  for flag, expected in [
      ('--workdir=a_file', f'error: --workdir={tmp_path}/a_file is a file; expected a folder'),
      ('--config.data.color_jitter=(0.5,0.5,0.5,0.7)',
       'error: config.data.color_jitter=(0.5, 0.5, 0.5, 0.7) must be (brightness, contrast, '
       'saturation, hue): strengths >= 0, and hue in [0, 0.5]')]:
    result = _main([f'--config={REPO}/configs/demo.py', '--workdir=runs/y', flag], tmp_path,
                   cache_dir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [expected]
  assert not (tmp_path / 'runs').exists()


# ---------------------------------------------------------------------------------------
# Damaged training checkpoints.


def _tree(seed):
  rng = np.random.default_rng(seed)
  variables = {'feature_extractor': {
      'params': {f'conv{i}': {'kernel': rng.normal(size=(3, 3, 4, 8)).astype(np.float32)}
                 for i in range(8)},
      'batch_stats': {'bn': {'mean': rng.normal(size=8).astype(np.float32)}}}}
  train = {'step': np.array(seed, np.int32), 'momentum': rng.normal(size=(64, 64)).astype(np.float32)}
  return variables, train


META = {'config': {'stage': 'source_only', 'model': {'arch': 'resnet18', 'width': 4}}}
EXPECTED = {'stage': 'source_only', 'model.arch': 'resnet18', 'model.width': 4}


def _save_steps(directory, steps, keep=5):
  store = checkpoint.TrainingCheckpoints(directory, keep=keep)
  for step in steps:
    variables, train = _tree(step)
    store.save(step, variables, train, {'states': [{'step': step}]}, META)
  store.close()


def _targets():
  return _tree(0)


def _all_files(directory):
  return sorted(str(p.relative_to(directory)).split('/', 1)[1] for p in directory.rglob('*')
                if p.is_file())


@pytest.mark.parametrize('damage', ['truncated_arrays', 'missing_manifest', 'cut_data_state'])
def test_resume_passes_over_unfinished_and_unreadable_steps(damage, tmp_path, capfd):
  directory = tmp_path / 'checkpoints'
  _save_steps(directory, [2, 4, 6])
  if damage == 'truncated_arrays':
    truncate_arrays(directory / '6')
  elif damage == 'missing_manifest':
    (directory / '6' / 'train' / 'manifest.ocdbt').unlink()
  else:
    (directory / '6' / 'data' / 'metadata').write_text('{"sta')
  # A save killed after orbax renamed the folder but before its commit marker, and one
  # killed earlier (orbax's temporary folder).
  shutil.copytree(directory / '4', directory / '8')
  for marker in ('commit_success.txt', '_CHECKPOINT_METADATA'):
    (directory / '8' / marker).unlink()
  shutil.copytree(directory / '4', directory / '10.orbax-checkpoint-tmp-1')
  files_before = _all_files(directory)
  capfd.readouterr()

  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  resumed, notes = store.restore_newest(*_targets(), EXPECTED)
  assert resumed.step == 4
  expected_variables, expected_train = _tree(4)
  np.testing.assert_array_equal(resumed.train['momentum'], expected_train['momentum'])
  np.testing.assert_array_equal(resumed.variables['feature_extractor']['params']['conv3']['kernel'],
                                expected_variables['feature_extractor']['params']['conv3']['kernel'])
  assert resumed.data == {'states': [{'step': 4}]}
  assert len(notes) == 2
  assert notes[0] == (f'checkpoint {directory}/8 is unfinished (no commit marker): passed over '
                      f'and kept as {directory}/8.unfinished')
  assert notes[1].startswith(f'checkpoint {directory}/6 is unreadable (')
  assert notes[1].endswith(f'): passed over and kept as {directory}/6.unreadable')
  assert '\n' not in ''.join(notes)

  # Training goes on: step 6 is written again beside the kept damaged one.
  variables, train = _tree(6)
  store.save(6, variables, train, {'states': []}, META)
  store.close()
  names = sorted(p.name for p in directory.iterdir() if not p.name.startswith('10.'))
  assert names == ['2', '4', '6', '6.unreadable', '8.unfinished']
  # Nothing was deleted: every file is still there, under its folder's new name.
  after = _all_files(directory)
  assert all(path in after for path in files_before)
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'Event loop is closed' not in err


def test_no_readable_step_is_one_line_naming_each(tmp_path):
  directory = tmp_path / 'checkpoints'
  _save_steps(directory, [2, 4])
  truncate_arrays(directory / '2')
  (directory / '4' / 'train' / 'manifest.ocdbt').unlink()
  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  try:
    with pytest.raises(UserError) as error:
      store.restore_newest(*_targets(), EXPECTED)
  finally:
    store.close()
  message = str(error.value)
  assert '\n' not in message
  assert f'{directory}/4: unreadable (train: manifest.ocdbt is missing)' in message
  assert f'{directory}/2: unreadable (' in message
  assert sorted(p.name for p in directory.iterdir()) == ['2', '4']  # nothing moved


def test_only_unfinished_steps_start_afresh(tmp_path):
  directory = tmp_path / 'checkpoints'
  _save_steps(directory, [2])
  for marker in ('commit_success.txt', '_CHECKPOINT_METADATA'):
    (directory / '2' / marker).unlink()
  assert checkpoint.latest_training_checkpoint(directory) is None
  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  resumed, notes = store.restore_newest(*_targets(), EXPECTED)
  store.close()
  assert resumed is None and len(notes) == 1 and '2.unfinished' in notes[0]


def test_a_checkpoint_of_another_config_is_not_passed_over(tmp_path):
  directory = tmp_path / 'checkpoints'
  _save_steps(directory, [2, 4])
  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  try:
    with pytest.raises(UserError, match=rf'{directory}/4 was written with config.model.width=4, '
                                        r'this run has 8; use a new --workdir'):
      store.restore_newest(*_targets(), dict(EXPECTED, **{'model.width': 8}))
  finally:
    store.close()
  assert sorted(p.name for p in directory.iterdir()) == ['2', '4']


def test_a_fault_of_ours_while_restoring_keeps_its_traceback(tmp_path, monkeypatch):
  directory = tmp_path / 'checkpoints'
  _save_steps(directory, [2])

  def broken_restore(*args, **kwargs):
    raise TypeError('a bug in our code')

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', broken_restore)
  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  try:
    with pytest.raises(TypeError, match='a bug in our code'):
      store.restore_newest(*_targets(), EXPECTED)
  finally:
    store.close()


# ---------------------------------------------------------------------------------------
# Saving on a full disk or into a folder that became unwritable.

# What tensorstore raised when a tmpfs filled up during an orbax save (the path shortened).
_TENSORSTORE_DISK_FULL = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "feature_extractor.params.w/0" in OCDBT database at '
    'local file "/x/2.orbax-checkpoint-tmp/variables.orbax-checkpoint-tmp/ocdbt.process_0/": '
    'Failed to write 617678 bytes to file 7: No space left on device [os_error_code=\'28\']')


@pytest.mark.parametrize('failure, reason', [
    (_TENSORSTORE_DISK_FULL, 'no space left on device'),
    (OSError(errno.ENOSPC, 'No space left on device'), 'no space left on device'),
    (PermissionError(errno.EACCES, 'Permission denied'), 'permission denied'),
])
def test_a_failed_save_names_the_last_good_checkpoint(failure, reason, tmp_path, monkeypatch):
  directory = tmp_path / 'checkpoints'
  _save_steps(directory, [2])

  def failing_save(*args, **kwargs):
    raise failure

  monkeypatch.setattr(ocp.CheckpointManager, 'save', failing_save)
  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  variables, train = _tree(4)
  try:
    with pytest.raises(UserError) as error:
      store.save(4, variables, train, {'states': []}, META)
  finally:
    store.close()
  assert str(error.value) == (
      f'cannot save step 4 in {directory}: {reason}; the last good checkpoint is '
      f'{directory}/2 (free space or fix the folder, then rerun the same command to resume)')
  monkeypatch.undo()
  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  resumed, _ = store.restore_newest(*_targets(), EXPECTED)
  store.close()
  assert resumed.step == 2


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
  directory = tmp_path / 'checkpoints'
  _save_steps(directory, [2])
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage',
                      lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
  store = checkpoint.TrainingCheckpoints(directory, keep=5)
  variables, train = _tree(4)
  try:
    with pytest.raises(UserError, match=rf'cannot save step 4 in {directory}: it needs about '
                                        r'\S+ MiB and the disk has 4.0 KiB free; the last good '
                                        rf'checkpoint is {directory}/2'):
      store.save(4, variables, train, {'states': []}, META)
  finally:
    store.close()
  assert sorted(p.name for p in directory.iterdir()) == ['2']


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
def test_a_full_disk_while_logging_is_one_line(tmp_path):
  """metrics.jsonl on a device that is always full (/dev/full: every write is ENOSPC)."""
  from fada_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = _config()
  logger = loop._Logger(config, tmp_path, 0)  # pylint: disable=protected-access
  try:
    logger.write({'step': 1, 'loss_seg': 1.0})
    (tmp_path / TRAIN_METRICS_FILE).unlink()
    (tmp_path / TRAIN_METRICS_FILE).symlink_to('/dev/full')
    with pytest.raises(UserError) as error:
      logger.write({'step': 2, 'loss_seg': 0.5})
  finally:
    logger.close()
  assert str(error.value) == (
      f'cannot write {tmp_path / TRAIN_METRICS_FILE}: no space left on device; free space (or '
      'fix the folder), then rerun the same command: it resumes from the newest checkpoint')


def test_a_fault_of_ours_while_saving_keeps_its_traceback(tmp_path):
  store = checkpoint.TrainingCheckpoints(tmp_path / 'checkpoints', keep=5)
  variables, train = _tree(2)
  try:
    with pytest.raises(TypeError):
      store.save(2, variables, train, {'not json': object()}, META)
  finally:
    store.close()


# ---------------------------------------------------------------------------------------
# Prepared datasets.


@pytest.mark.parametrize('content, expected', [
    ('{"num_classes": 19, "train": {"na', r'unreadable prepared-dataset metadata .*JSONDecodeError'),
    ('[1, 2]', r'malformed prepared-dataset metadata .*not a JSON object'),
    ('{"train": {"names": ["a"], "classes": [[0]]}}', r"no field 'num_classes'"),
    ('{"num_classes": 19, "train": {"names": ["a"]}}', r"no field 'classes'"),
    ('{"num_classes": "many", "train": {"names": [], "classes": []}}', r'ValueError'),
    ('{"num_classes": 19, "train": {"names": ["a"], "classes": 7}}', r'TypeError'),
    ('{"num_classes": 19, "train": {"names": ["a", "b"], "classes": [[0]]}}',
     r'2 names but 1 class lists'),
])
def test_malformed_prepared_metadata_is_one_line(content, expected, tmp_path):
  folder = tmp_path / 'prepared' / 'cityscapes' / '19'
  folder.mkdir(parents=True)
  (folder / 'metadata.json').write_text(content)
  with pytest.raises(UserError, match=expected) as error:
    prepared.PreparedSource(folder, 'train')
  assert str(folder / 'metadata.json') in str(error.value)
  assert 'prepare the dataset again' in str(error.value) or 'no split' in str(error.value)


def test_well_formed_prepared_metadata_reads(tmp_path):
  folder = tmp_path / 'prepared' / 'cityscapes' / '19'
  folder.mkdir(parents=True)
  (folder / 'metadata.json').write_text(json.dumps(
      {'num_classes': 19, 'train': {'names': ['a', 'b'], 'classes': [[0, 3], [18]]}}))
  source = prepared.PreparedSource(folder, 'train')
  assert len(source) == 2 and source.class_presence()[1, 18] and source.class_presence()[0, 3]

