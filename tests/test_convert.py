"""The torch weight importer: parity of converted weights and its refusals.

Reference networks come from tests/torch_reference.py, in plain torch.nn with the
release's (and torchvision's) module names, so their state dicts have the real key layout. They get
random weights and calibrated, non-trivial BN statistics; the converted flax models must
reproduce their outputs in float32.
"""

import os
import pathlib
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from torch import nn

from fada_jax import checkpoint, config_lib, convert, models
from fada_jax.errors import UserError
from torch_reference import (ASPPClassifier, FeatureExtractor, FrozenBatchNorm2d,
                             PixelDiscriminator, ResNet, deeplab_vgg_backbone, vgg16_features)

REPO = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max |flax - torch| relative to max |torch|
NUM_CLASSES = 7


# ---------------------------------------------------------------------------------------
# torch reference networks (release / torchvision layout).


def _kaiming_convs(module):
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      if m.bias is not None:
        nn.init.normal_(m.bias, 0, 0.1)


def calibrated_resnet(depth, width, seed, with_fc=False):
  """A ResNet with trainable-BN modules whose running statistics are those of real
  activations (cumulative over random batches) and whose affine is random."""
  torch.manual_seed(seed)
  net = ResNet(depth, width, nn.BatchNorm2d, with_fc)
  _kaiming_convs(net)
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = None  # cumulative average
  net.train()
  with torch.no_grad():
    for _ in range(3):
      net(torch.randn(2, 3, 48, 48))
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.normal_(0, 0.2)
  return net.eval()


def frozen_copy(depth, width, state_dict):
  """The same weights in the release's frozen-BN network (num_batches_tracked and fc go)."""
  net = ResNet(depth, width, FrozenBatchNorm2d)
  net.load_state_dict({k: v for k, v in state_dict.items()
                       if not k.endswith('num_batches_tracked') and not k.startswith('fc.')})
  return net.eval()


def vgg16_reference(seed):
  torch.manual_seed(seed)
  features = vgg16_features()
  _kaiming_convs(features)
  return features


# ---------------------------------------------------------------------------------------
# flax side.

_APPLY_CACHE = {}


def _model_config(arch, num_classes=NUM_CLASSES, width=64, freeze_bn=True):
  config = config_lib.make_config('g2c', 'adversarial', arch)
  config.model.num_classes = num_classes
  config.model.width = width
  config.model.freeze_bn = freeze_bn
  return config


def _jitted_apply(config, part):
  """One compiled apply per network and config, shared by the tests (compiling is the
  slow part on CPU)."""
  key = (config.model.arch, config.model.width, config.model.num_classes,
         config.model.freeze_bn, part)
  if key not in _APPLY_CACHE:
    module = getattr(models.build(config), part)
    kwargs = {'train': False} if part == 'feature_extractor' else {}
    _APPLY_CACHE[key] = jax.jit(lambda variables, x: module.apply(variables, x, **kwargs))
  return _APPLY_CACHE[key]


def flax_forward(config, variables, images_nchw, parts=('feature_extractor',)):
  """NCHW outputs of the feature extractor (then classifier, discriminator) in flax."""
  features = _jitted_apply(config, 'feature_extractor')(
      variables['feature_extractor'], images_nchw.numpy().transpose(0, 2, 3, 1))
  outputs = [features] + [_jitted_apply(config, part)(variables[part], features)
                          for part in parts[1:]]
  return [np.asarray(o).transpose(0, 3, 1, 2) for o in outputs]


def relative_error(actual, expected):
  expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def run_cli(capsys, *args):
  """Runs the converter's CLI function; returns (exit status, stdout, stderr)."""
  status = convert.main([str(a) for a in args] + ['--no-progress'])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def assert_one_line_error(status, err, *fragments):
  assert status == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith('error: ')
  assert 'Traceback' not in err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def assert_nothing_written(output):
  output = pathlib.Path(output)
  assert not output.exists()
  leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f'.{output.name}')]
  assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------
# Fixtures: state dict files.


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  return tmp_path_factory.mktemp('pth')


@pytest.fixture(scope='module')
def resnet18_imagenet(files):
  """torchvision-layout ResNet-18 (width 16) with fc and num_batches_tracked."""
  net = calibrated_resnet(18, 16, seed=0, with_fc=True)
  state_dict = net.state_dict()
  path = files / 'resnet18_imagenet.pth'
  torch.save(state_dict, path)
  return path, net, state_dict


@pytest.fixture(scope='module')
def vgg16_imagenet(files):
  features = vgg16_reference(seed=1)
  return features, {f'features.{k}': v for k, v in features.state_dict().items()}


# ---------------------------------------------------------------------------------------
# Parity.


def test_resnet_imagenet_parity(resnet18_imagenet, tmp_path, capsys):
  path, net, state_dict = resnet18_imagenet
  output = tmp_path / 'r18'
  status, out, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet18')
  assert status == 0, err
  summary = out.strip().splitlines()
  assert len(summary) == 1
  assert 'converted 100 tensors' in summary[0]
  assert 'fc.weight' in summary[0] and '20 num_batches_tracked' in summary[0]

  variables, meta = checkpoint.load_model(output)
  assert meta['kind'] == 'imagenet' and meta['arch'] == 'resnet18'
  assert meta['num_classes'] is None and meta['width'] == 16
  assert meta['source'] == str(path.absolute())
  assert set(variables) == {'feature_extractor'}
  parameters = sum(v.numel() for k, v in state_dict.items()
                   if not k.endswith('num_batches_tracked') and not k.startswith('fc.'))
  assert f'{parameters:,} parameters' in summary[0]

  images = torch.randn(2, 3, 41, 53)
  with torch.no_grad():
    frozen_reference = frozen_copy(18, 16, state_dict)(images)
    trainable_reference = net(images)  # nn.BatchNorm2d in eval mode: eps 1e-5
  (frozen,) = flax_forward(_model_config('resnet18', width=16), variables, images)
  (trainable,) = flax_forward(_model_config('resnet18', width=16, freeze_bn=False),
                              variables, images)
  errors = (relative_error(frozen, frozen_reference),
            relative_error(trainable, trainable_reference))
  print(f'\nparity resnet18 ImageNet: frozen BN {errors[0]:.2e}, eval-mode BN {errors[1]:.2e}')
  assert max(errors) < TOLERANCE
  # The two BN formulas differ (epsilon): the comparison can tell them apart.
  assert relative_error(frozen, trainable_reference) > 10 * errors[1]


@pytest.mark.parametrize('layout', ['torchvision', 'caffe'])
def test_vgg_imagenet_parity(vgg16_imagenet, files, tmp_path, capsys, layout):
  features, state_dict = vgg16_imagenet
  state_dict = dict(state_dict)
  # The fc layers are dropped whatever they look like; the two releases number them
  # differently (shapes shrunk here: they are never read).
  indices = (0, 3, 6) if layout == 'torchvision' else (1, 4, 6)
  for i in indices:
    state_dict[f'classifier.{i}.weight'] = torch.randn(4, 8)
    state_dict[f'classifier.{i}.bias'] = torch.randn(4)
  path = files / f'vgg16_{layout}.pth'
  torch.save(state_dict, path)
  output = tmp_path / 'vgg'
  status, out, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'vgg16')
  assert status == 0, err
  assert 'converted 26 tensors' in out
  assert 'random init (not in the file): fc6, fc7' in out
  assert 'classifier.*' in out or f'classifier.{indices[0]}.weight' in out

  variables, meta = checkpoint.load_model(output)
  assert meta['random_init'] == ['feature_extractor/params/fc6', 'feature_extractor/params/fc7']
  assert variables['feature_extractor']['batch_stats'] == {}
  if layout == 'caffe':
    return  # same tensors as the torchvision layout, whose parity is checked

  # fc6/fc7 are not in an ImageNet file: give the torch reference the flax init.
  backbone = deeplab_vgg_backbone(features)
  params = variables['feature_extractor']['params']
  with torch.no_grad():
    for index, name in ((29, 'fc6'), (31, 'fc7')):
      backbone[index].weight.copy_(torch.from_numpy(
          params[name]['kernel'].transpose(3, 2, 0, 1).copy()))
      backbone[index].bias.copy_(torch.from_numpy(params[name]['bias']))
    images = torch.randn(2, 3, 36, 44)
    reference = backbone(images)
  (actual,) = flax_forward(_model_config('vgg16'), variables, images)
  error = relative_error(actual, reference)
  print(f'\nparity vgg16 ImageNet: {error:.2e}')
  assert error < TOLERANCE


def test_fada_checkpoint_resnet_parity(files, tmp_path, capsys):
  """A stage-2 style checkpoint, DistributedDataParallel 'module.' prefix included."""
  state_dict = calibrated_resnet(50, 16, seed=2).state_dict()
  net = frozen_copy(50, 16, state_dict)
  feature_extractor = FeatureExtractor(net)
  torch.manual_seed(3)
  classifier = ASPPClassifier(net.out_channels, NUM_CLASSES)
  discriminator = PixelDiscriminator(net.out_channels, NUM_CLASSES)
  optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
  classifier(torch.randn(1, net.out_channels, 3, 3)).sum().backward()
  optimizer.step()

  def with_prefix(module):
    return {f'module.{k}': v for k, v in module.state_dict().items()}

  path = files / 'fada_r50.pth'
  torch.save({'iteration': 18000, 'feature_extractor': with_prefix(feature_extractor),
              'classifier': with_prefix(classifier), 'model_D': with_prefix(discriminator),
              'optimizer_fea': optimizer.state_dict(), 'optimizer_cls': optimizer.state_dict(),
              'optimizer_D': optimizer.state_dict()}, path)

  output = tmp_path / 'fada'
  status, out, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet50')
  assert status == 0, err
  assert f'{NUM_CLASSES} classes' in out and 'optimizer_fea' in out and 'iteration' in out
  variables, meta = checkpoint.load_model(output)
  assert meta['kind'] == 'fada' and meta['num_classes'] == NUM_CLASSES
  assert set(variables) == {'feature_extractor', 'classifier', 'discriminator'}

  images = torch.randn(2, 3, 41, 53)
  with torch.no_grad():
    features = feature_extractor(images)
    references = (features, classifier(features), discriminator(features))
  actual = flax_forward(_model_config('resnet50', width=16), variables, images,
                        parts=('feature_extractor', 'classifier', 'discriminator'))
  errors = [relative_error(a, r) for a, r in zip(actual, references)]
  print('\nparity FADA resnet50 checkpoint: features {:.2e}, logits {:.2e}, '
        'discriminator {:.2e}'.format(*errors))
  assert max(errors) < TOLERANCE


def test_fada_checkpoint_vgg_parity(vgg16_imagenet, files, tmp_path, capsys):
  """A stage-3 style checkpoint: VGG backbone, no discriminator, no prefix."""
  features, _ = vgg16_imagenet
  torch.manual_seed(4)
  backbone = deeplab_vgg_backbone(vgg16_reference(seed=1))
  _kaiming_convs(backbone[29:])
  feature_extractor = FeatureExtractor(backbone)
  classifier = ASPPClassifier(1024, NUM_CLASSES)
  path = files / 'fada_vgg.pth'
  torch.save({'iteration': 2000, 'feature_extractor': feature_extractor.state_dict(),
              'classifier': classifier.state_dict()}, path)

  output = tmp_path / 'fada_vgg'
  status, out, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'vgg16',
                             '--num-classes', NUM_CLASSES)
  assert status == 0, err
  assert 'converted 38 tensors' in out and 'random init' not in out
  variables, meta = checkpoint.load_model(output)
  assert set(variables) == {'feature_extractor', 'classifier'}
  assert 'random_init' not in meta

  images = torch.randn(2, 3, 36, 44)
  with torch.no_grad():
    features = feature_extractor(images)
    references = (features, classifier(features))
  actual = flax_forward(_model_config('vgg16'), variables, images,
                        parts=('feature_extractor', 'classifier'))
  errors = [relative_error(a, r) for a, r in zip(actual, references)]
  print('\nparity FADA vgg16 checkpoint: features {:.2e}, logits {:.2e}'.format(*errors))
  assert max(errors) < TOLERANCE


def test_cli_script_subprocess(resnet18_imagenet, tmp_path):
  path, _, _ = resnet18_imagenet
  output = tmp_path / 'cli'
  result = subprocess.run(
      [sys.executable, str(REPO / 'tools' / 'convert_torch_weights.py'), '--input', str(path),
       '--output', str(output), '--arch', 'resnet18'],
      capture_output=True, text=True, timeout=300, cwd=tmp_path,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.strip().splitlines()) == 1
  assert 'converting' in result.stderr  # the progress bar
  variables, _ = checkpoint.load_model(output)
  assert variables['feature_extractor']['params']['conv1']['kernel'].shape == (7, 7, 3, 16)


# ---------------------------------------------------------------------------------------
# Refusals: one line naming the culprit, exit 2, nothing written.


@pytest.mark.parametrize('edit, fragments', [
    ('missing', ('1 missing tensor(s): layer2.1.bn2.running_var',)),
    ('unexpected', ('1 unexpected tensor(s): layer4.0.conv3.weight',)),
    ('mismatch', ('1 shape mismatch(es): layer1.0.conv2.weight is (16, 16, 1, 1) in the file',
                  'expects (16, 16, 3, 3)')),
])
def test_bad_state_dict(resnet18_imagenet, tmp_path, capsys, edit, fragments):
  path, _, state_dict = resnet18_imagenet
  state_dict = dict(state_dict)
  if edit == 'missing':
    del state_dict['layer2.1.bn2.running_var']
  elif edit == 'unexpected':
    state_dict['layer4.0.conv3.weight'] = torch.zeros(128, 128, 1, 1)
  else:
    state_dict['layer1.0.conv2.weight'] = torch.zeros(16, 16, 1, 1)
  bad = tmp_path / f'{edit}.pth'
  torch.save(state_dict, bad)
  output = tmp_path / 'out'
  status, _, err = run_cli(capsys, '--input', bad, '--output', output, '--arch', 'resnet18')
  assert_one_line_error(status, err, str(bad), *fragments)
  assert_nothing_written(output)


def test_resnet50_file_as_resnet101(files, tmp_path, capsys):
  """Real (width 64) ResNet-50 shapes; zeros keep it fast, only names/shapes matter."""
  state_dict = {k: torch.zeros_like(v) for k, v in
                ResNet(50, 64, nn.BatchNorm2d, with_fc=True).state_dict().items()}
  path = files / 'resnet50_imagenet.pth'
  torch.save(state_dict, path)
  output = tmp_path / 'out'
  status, _, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet101')
  assert_one_line_error(status, err, str(path), 'missing tensor(s): layer3.6.')
  assert_nothing_written(output)
  # The other way round the surplus blocks are unexpected.
  with pytest.raises(UserError, match=r'unexpected tensor\(s\): layer1\.0\.bn3\.'):
    convert.convert_file(path, 'resnet18', progress=False)


def test_wrong_family_and_num_classes(vgg16_imagenet, files, tmp_path, capsys):
  _, state_dict = vgg16_imagenet
  path = files / 'vgg16_features_only.pth'
  torch.save(state_dict, path)
  output = tmp_path / 'out'
  status, _, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet101')
  assert_one_line_error(status, err, str(path), 'VGG weights', 'resnet101')

  classifier = ASPPClassifier(64, NUM_CLASSES)
  resnet = FeatureExtractor(ResNet(18, 8, FrozenBatchNorm2d))
  fada = files / 'fada_r18.pth'
  torch.save({'feature_extractor': resnet.state_dict(), 'classifier': classifier.state_dict()},
             fada)
  status, _, err = run_cli(capsys, '--input', fada, '--output', output, '--arch', 'resnet18',
                           '--num-classes', 19)
  assert_one_line_error(status, err, str(fada), f'{NUM_CLASSES} classes', '--num-classes is 19')
  status, _, err = run_cli(capsys, '--input', fada, '--output', output, '--arch', 'vgg16')
  assert_one_line_error(status, err, str(fada), 'RESNET FADA model', 'vgg16')
  # Right count, but the discriminator of another class count is a shape mismatch.
  torch.save({'feature_extractor': resnet.state_dict(), 'classifier': classifier.state_dict(),
              'model_D': PixelDiscriminator(64, 19).state_dict()}, fada)
  status, _, err = run_cli(capsys, '--input', fada, '--output', output, '--arch', 'resnet18')
  assert_one_line_error(status, err, 'model_D:cls1.weight is (19, 128, 3, 3)')
  assert_nothing_written(output)


class _RunsCommand:
  """Unpickling this calls os.system: what a malicious .pth does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_pickled_callable_refused(files, tmp_path, capsys):
  marker = tmp_path / 'marker'
  path = files / 'malicious.pth'
  torch.save({'conv1.weight': torch.zeros(16, 3, 7, 7),
              'payload': _RunsCommand(f'touch {shlex.quote(str(marker))}')}, path)
  output = tmp_path / 'out'
  status, _, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet18')
  assert_one_line_error(status, err, str(path), 'refused')
  assert not marker.exists()
  assert_nothing_written(output)

  # The file is a working exploit: an unrestricted unpickler runs it.
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_truncated_and_missing_input(resnet18_imagenet, tmp_path, capsys):
  path, _, _ = resnet18_imagenet
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  output = tmp_path / 'out'
  status, _, err = run_cli(capsys, '--input', truncated, '--output', output, '--arch',
                           'resnet18')
  assert_one_line_error(status, err, str(truncated), 'not a readable PyTorch file')
  assert_nothing_written(output)

  missing = tmp_path / 'nowhere.pth'
  status, _, err = run_cli(capsys, '--input', missing, '--output', output, '--arch', 'resnet18')
  assert_one_line_error(status, err, 'input file not found', str(missing))
  assert_nothing_written(output)


def test_existing_output(resnet18_imagenet, tmp_path, capsys):
  path, _, _ = resnet18_imagenet
  output = tmp_path / 'out'
  output.mkdir()  # an empty folder is fine to fill
  status, _, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet18')
  assert status == 0, err
  status, _, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet18')
  assert_one_line_error(status, err, str(output), '--overwrite')
  status, _, err = run_cli(capsys, '--input', path, '--output', output, '--arch', 'resnet18',
                           '--overwrite')
  assert status == 0, err
  checkpoint.load_model(output)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
