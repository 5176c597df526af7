"""Model checkpoint folders: round trip, atomic writes, and clear refusals."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from fada_jax import checkpoint
from fada_jax.errors import UserError

META = {'arch': 'resnet18', 'num_classes': 5, 'kind': 'fada', 'source': '/x/model.pth'}


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'feature_extractor': {
          'params': {'conv1': {'kernel': jnp.asarray(rng.normal(size=(7, 7, 3, 8)),
                                                     jnp.float32)},
                     'layer1_0': {'bn1': {'scale': rng.normal(size=8).astype(np.float32),
                                          'bias': rng.normal(size=8).astype(np.float32)}}},
          'batch_stats': {'layer1_0': {'bn1': {'mean': np.zeros(8, np.float32),
                                               'var': np.ones(8, np.float32)}}},
      },
      'classifier': {'params': {'conv_0': {'kernel': rng.normal(size=(3, 3, 8, 5))
                                                     .astype(np.float32),
                                           'bias': np.arange(5, dtype=np.float32)}}},
  }


def _assert_same_tree(actual, expected):
  if isinstance(expected, dict):
    assert isinstance(actual, dict) and set(actual) == set(expected), (actual, expected)
    for key in expected:
      _assert_same_tree(actual[key], expected[key])
  else:
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(actual, np.asarray(expected))


def _staging_leftovers(path: pathlib.Path):
  return [p.name for p in path.parent.iterdir() if p.name.startswith(f'.{path.name}.')]


def test_round_trip(tmp_path):
  variables = _variables()
  path = checkpoint.save_model(tmp_path / 'ckpt', variables, META)
  loaded, meta = checkpoint.load_model(path)
  _assert_same_tree(loaded, variables)
  for key, value in META.items():
    assert meta[key] == value
  assert meta['format'] == checkpoint.MODEL_FORMAT
  assert meta['parts'] == ['classifier', 'feature_extractor']
  assert sorted(p.name for p in path.iterdir()) == ['meta.json', 'variables']
  assert not _staging_leftovers(path)


def test_empty_collections_and_subsets_survive(tmp_path):
  """A VGG feature extractor has batch_stats {}; ImageNet weights are one part only."""
  variables = {'feature_extractor': {'params': {'fc6': {'bias': np.ones(4, np.float32)}},
                                     'batch_stats': {}}}
  path = checkpoint.save_model(tmp_path / 'vgg', variables, dict(META, num_classes=None))
  loaded, meta = checkpoint.load_model(path)
  assert loaded['feature_extractor']['batch_stats'] == {}
  _assert_same_tree(loaded, variables)
  assert meta['num_classes'] is None


def test_existing_output(tmp_path):
  path = tmp_path / 'ckpt'
  path.mkdir()  # an empty folder may be filled
  checkpoint.save_model(path, _variables(0), META)
  with pytest.raises(UserError, match='not empty.*ckpt'):
    checkpoint.save_model(path, _variables(1), META)
  loaded, _ = checkpoint.load_model(path)
  _assert_same_tree(loaded, _variables(0))  # untouched

  checkpoint.save_model(path, _variables(1), dict(META, arch='resnet50'), overwrite=True)
  loaded, meta = checkpoint.load_model(path)
  _assert_same_tree(loaded, _variables(1))
  assert meta['arch'] == 'resnet50'
  assert not _staging_leftovers(path)

  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(UserError, match='is a file'):
    checkpoint.save_model(a_file, _variables(), META, overwrite=True)


# orbax's async machinery complains on its way out of a failed save/restore; harmless.
_ORBAX_EXIT_NOISE = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


@_ORBAX_EXIT_NOISE
def test_failed_save_leaves_previous_checkpoint(tmp_path):
  path = tmp_path / 'ckpt'
  checkpoint.save_model(path, _variables(0), META)
  broken = _variables(1)
  broken['classifier']['params']['conv_0']['bias'] = object()  # orbax cannot write this
  with pytest.raises(Exception):
    checkpoint.save_model(path, broken, META, overwrite=True)
  with pytest.raises(ValueError, match='JSON'):
    checkpoint.save_model(tmp_path / 'other', _variables(), dict(META, source=object()))
  assert not (tmp_path / 'other').exists()
  assert not _staging_leftovers(path) and not _staging_leftovers(tmp_path / 'other')
  loaded, _ = checkpoint.load_model(path)
  _assert_same_tree(loaded, _variables(0))


def test_load_refusals(tmp_path):
  with pytest.raises(UserError, match='checkpoint not found: .*nowhere'):
    checkpoint.load_model(tmp_path / 'nowhere')

  a_file = tmp_path / 'weights.pth'
  a_file.write_bytes(b'PK')
  with pytest.raises(UserError, match='a file.*weights.pth'):
    checkpoint.load_model(a_file)

  folder = tmp_path / 'folder'
  folder.mkdir()
  (folder / 'something.txt').write_text('x')
  with pytest.raises(UserError, match='no meta.json.*folder'):
    checkpoint.load_model(folder)

  (folder / 'meta.json').write_text('{"format": ')
  with pytest.raises(UserError, match='unreadable checkpoint metadata .*meta.json'):
    checkpoint.load_model(folder)

  (folder / 'meta.json').write_text(json.dumps({'format': 'something_else'}))
  with pytest.raises(UserError, match="not a model checkpoint .*'something_else'"):
    checkpoint.load_model(folder)

  (folder / 'meta.json').write_text(json.dumps({'format': checkpoint.MODEL_FORMAT,
                                                'format_version': 1}))
  with pytest.raises(UserError, match='incomplete .*folder'):
    checkpoint.load_model(folder)


@_ORBAX_EXIT_NOISE
def test_damaged_variables(tmp_path):
  path = checkpoint.save_model(tmp_path / 'ckpt', _variables(), META)
  data_files = [p for p in (path / 'variables').rglob('*')
                if p.is_file() and p.parent.name == 'd']
  assert data_files
  for p in data_files:
    p.write_bytes(p.read_bytes()[:10])
  with pytest.raises(UserError, match='cannot read model variables in .*ckpt'):
    checkpoint.load_model(path)


def test_other_formats_plug_in(tmp_path):
  """Training checkpoints register their own reader; load_model dispatches on meta."""
  def read_train_state(path, meta):
    variables, _ = checkpoint.load_model(path / 'model')
    return variables, dict(meta, step=meta['step'])

  checkpoint.register_model_loader('test.train_state', read_train_state)
  step_dir = tmp_path / 'checkpoints' / '100'
  step_dir.mkdir(parents=True)
  checkpoint.save_model(step_dir / 'model', _variables(), META)
  checkpoint.write_json_atomic(step_dir / 'meta.json', {'format': 'test.train_state',
                                                       'step': 100})
  variables, meta = checkpoint.load_model(step_dir)
  _assert_same_tree(variables, _variables())
  assert meta['step'] == 100
