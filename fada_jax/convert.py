"""PyTorch weights -> a fada_jax model checkpoint.

Reads, with torch's weights-only unpickler (a pickled callable is refused, never run):
  * torchvision ImageNet ResNet state dicts (any depth) -> feature extractor;
  * ImageNet VGG-16 state dicts, torchvision or Caffe-converted layout -> conv1_1..conv5_3
    (fc6/fc7 get the fresh nn.Conv2d init the release gives them, seeded);
  * FADA training checkpoints {'feature_extractor', 'classifier', ['model_D'], ...},
    keys with or without DistributedDataParallel's 'module.' prefix -> the full model.

The expected tensors come from the flax model itself (`jax.eval_shape` of its init for
the requested arch and number of classes): each flax variable names the torch key it
must come from, so every tensor of the file is accounted for. A missing key, an
unexpected key or a shape mismatch is one UserError naming it, raised before anything
is written.
"""

import argparse
import dataclasses
import os
import pathlib
import pickle
import re
import struct
import sys
from typing import Any, Iterable, Optional

import jax
import numpy as np
from tqdm import tqdm

from fada_jax import checkpoint, config_lib, models
from fada_jax.errors import UserError

ARCHS = config_lib.ARCHS
DEFAULT_NUM_CLASSES = 19  # only shapes the (unused) heads when converting ImageNet weights

# VGG-16 conv layers in order; their indices in torchvision's `features` Sequential and
# in the release's `backbone` Sequential (pool4 removed, so conv5_* move down by one and
# fc6/fc7 follow).
VGG_CONVS = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
             'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3')
VGG_IMAGENET_INDEX = dict(zip(VGG_CONVS, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)))
VGG_FADA_INDEX = dict(zip(VGG_CONVS + ('fc6', 'fc7'),
                          (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31)))
DISCRIMINATOR_MODULES = {'conv1': 'D.0', 'conv2': 'D.2', 'cls_source': 'cls1',
                         'cls_target': 'cls2'}

# flax (collection, leaf) -> torch attribute, for convs and batch norms alike.
_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
# FADA checkpoint key -> model part, and back (messages use the file's names).
_FADA_PARTS = {'feature_extractor': 'feature_extractor', 'classifier': 'classifier',
               'model_D': 'discriminator'}
_FADA_FILE_KEYS = {part: key for key, part in _FADA_PARTS.items()}


@dataclasses.dataclass
class Conversion:
  """The converted variables and what happened to every tensor of the file."""
  variables: dict
  meta: dict
  tensors: int                                   # torch tensors converted
  parameters: int                                # numbers in them
  dropped: list = dataclasses.field(default_factory=list)      # descriptions
  random_init: list = dataclasses.field(default_factory=list)  # flax paths
  notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Target:
  """Where one torch tensor goes: part, flax path inside it, expected flax shape."""
  part: str
  path: tuple
  shape: tuple
  dtype: Any

  @property
  def is_kernel(self) -> bool:
    return self.path[-1] == 'kernel'

  def torch_shape(self) -> tuple:
    # flax HWIO kernel <- torch OIHW weight.transpose(2, 3, 1, 0)
    if self.is_kernel:
      h, w, i, o = self.shape
      return (o, i, h, w)
    return self.shape


# ---------------------------------------------------------------------------------------
# Reading the file.


# What torch.load raises for a damaged file: an empty file EOFError; a truncated zip or
# legacy file RuntimeError ('failed finding central directory', 'unexpected EOF'); bytes
# that are no archive at all KeyError or ValueError; an unreadable file OSError.
_DAMAGED_TORCH_FILE_ERRORS = (EOFError, RuntimeError, KeyError, ValueError, OSError,
                              struct.error)


def read_torch_file(path: str | os.PathLike) -> Any:
  """torch.load with the weights-only unpickler, every failure as a UserError."""
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f'input file not found: {path}')
  if not path.is_file():
    raise UserError(f'input is not a file: {path}')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError('converting PyTorch weights needs torch: '
                    'pip install "fada_jax[convert]"') from None
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # The weights-only unpickler names the refused global on one of its lines.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if 'GLOBAL' in line or 'Unsupported' in line),
                  'content outside the weights-only allow-list')
    raise UserError(f'{path}: refused: it holds pickled objects other than tensors and '
                    f'was not unpickled ({first_sentence(reason)})') from None
  except _DAMAGED_TORCH_FILE_ERRORS as e:
    raise UserError(f'{path}: not a readable PyTorch file (truncated or corrupt?): '
                    f'{type(e).__name__}: {first_sentence(str(e))}') from None


def first_sentence(message: str, limit: int = 200) -> str:
  """The first line and sentence of a library's error message, for one-line errors."""
  line = (message.strip().splitlines() or [''])[0]
  line = line.split('. ')[0].rstrip('.')
  return line if len(line) <= limit else line[:limit - 3] + '...'


def _is_state_dict(obj: Any) -> bool:
  import torch  # pylint: disable=import-outside-toplevel
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_module_prefix(state_dict: dict, where: str, source: pathlib.Path) -> dict:
  out = {}
  for key, value in state_dict.items():
    name = key[len('module.'):] if key.startswith('module.') else key
    if name in out:
      raise UserError(f'{source}: {where} holds {name!r} both with and without the '
                      f'"module." prefix')
    out[name] = value
  return out


# ---------------------------------------------------------------------------------------
# flax variable -> torch key.


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _torch_module_resnet(modules: tuple) -> str:
  """('layer3_22', 'conv2') -> 'layer3.22.conv2'; downsample_{conv,bn} -> downsample.{0,1}."""
  names = []
  for m in modules:
    match = re.fullmatch(r'layer(\d+)_(\d+)', m)
    if match:
      names.append(f'layer{match[1]}.{match[2]}')
    elif m == 'downsample_conv':
      names.append('downsample.0')
    elif m == 'downsample_bn':
      names.append('downsample.1')
    elif re.fullmatch(r'(conv|bn)\d', m):
      names.append(m)
    else:
      raise ValueError(f'unexpected ResNet module name {m!r} in the flax model')
  return '.'.join(names)


def _torch_module(layout: str, part: str, modules: tuple) -> Optional[str]:
  """torch module name for a flax module path; None: the file has no such tensor."""
  if part == 'feature_extractor':
    if layout == 'resnet':
      return _torch_module_resnet(modules)
    if layout == 'fada_resnet':
      return 'backbone.' + _torch_module_resnet(modules)
    (name,) = modules
    if layout == 'vgg':
      return f'features.{VGG_IMAGENET_INDEX[name]}' if name in VGG_IMAGENET_INDEX else None
    if layout == 'fada_vgg':
      return f'backbone.{VGG_FADA_INDEX[name]}'
  elif part == 'classifier':
    (name,) = modules
    match = re.fullmatch(r'conv_(\d+)', name)
    if match:
      return f'conv2d_list.{match[1]}'
  elif part == 'discriminator':
    (name,) = modules
    if name in DISCRIMINATOR_MODULES:
      return DISCRIMINATOR_MODULES[name]
  raise ValueError(f'no torch name for flax {part} module {modules} ({layout})')


def _expected_targets(layout: str, part: str, abstract_part: dict
                      ) -> tuple[dict[str, _Target], list[tuple]]:
  """torch key -> target for one part, and the flax paths that no torch key fills."""
  targets, unfilled = {}, []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_part)[0]:
    path = tuple(k.key for k in key_path)
    collection, *modules, leaf_name = path
    module = _torch_module(layout, part, tuple(modules))
    if module is None:
      unfilled.append(path)
      continue
    torch_key = f'{module}.{_LEAF_TO_TORCH[(collection, leaf_name)]}'
    targets[torch_key] = _Target(part, path, tuple(leaf.shape), leaf.dtype)
  return targets, unfilled


def _is_droppable(layout: str, key: str) -> bool:
  """Tensors of the file that are known and deliberately not used."""
  if key.endswith('num_batches_tracked'):  # trainable BN's step counter
    return True
  if layout == 'resnet':
    return key in ('fc.weight', 'fc.bias')  # ImageNet classification head
  if layout == 'vgg':
    return key.startswith('classifier.')  # fc layers; layouts differ between releases
  return False


def _model_config(arch: str, num_classes: int, width: int):
  config = config_lib.make_config('g2c', 'adversarial', arch)
  config.model.num_classes = num_classes
  config.model.width = width
  config.model.dtype = 'float32'
  return config


def _abstract_variables(config) -> dict:
  built = models.build(config)
  return jax.eval_shape(lambda rng: models.init_variables(built, rng, config),
                        jax.random.PRNGKey(0))


def _fresh_torch_convs(paths: list[tuple], abstract: dict, seed: int) -> dict[tuple, Any]:
  """Values for the variables the file does not hold (VGG-16's fc6/fc7 from ImageNet
  weights): each module is initialised as the fresh torch nn.Conv2d that the release
  builds in its place, with torch's RNG seeded by `seed` (XLA is not needed for this)."""
  import torch  # pylint: disable=import-outside-toplevel
  modules = sorted({path[:-1] for path in paths})
  out = {}
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    for module in modules:
      leaves = _get_path(abstract, module)
      if module[1] != 'params' or set(leaves) - {'kernel', 'bias'} or 'kernel' not in leaves:
        raise ValueError(f'cannot initialise {"/".join(module)} ({sorted(leaves)}) '
                         f'as a torch conv')
      h, w, i, o = leaves['kernel'].shape
      conv = torch.nn.Conv2d(i, o, (h, w), bias='bias' in leaves)
      out[(*module, 'kernel')] = np.ascontiguousarray(
          conv.weight.detach().numpy().transpose(2, 3, 1, 0))
      if 'bias' in leaves:
        out[(*module, 'bias')] = conv.bias.detach().numpy().copy()
  return out


def _set_path(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get_path(tree: dict, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _list_keys(keys: Iterable[str], limit: int = 3) -> str:
  keys = sorted(keys, key=_natural_key)
  shown = ', '.join(keys[:limit])
  return shown + (f' (and {len(keys) - limit} more)' if len(keys) > limit else '')


def _group_dropped(keys: Iterable[str]) -> list[str]:
  keys = sorted(keys, key=_natural_key)
  counters = [k for k in keys if k.endswith('num_batches_tracked')]
  out = [k for k in keys if not k.endswith('num_batches_tracked')]
  if len(out) > 6:
    prefixes = sorted({k.split('.')[0] for k in out})
    out = [f'{len(out)} tensors under {", ".join(p + ".*" for p in prefixes)}']
  if counters:
    out.append(f'{len(counters)} num_batches_tracked')
  return out


# ---------------------------------------------------------------------------------------
# The conversion.


def convert_file(input_path: str | os.PathLike, arch: str,
                 num_classes: Optional[int] = None, progress: bool = True,
                 seed: int = 0) -> Conversion:
  """Reads a .pth file and returns the flax variables for `arch`; writes nothing.

  `num_classes`: checked against (FADA) or inferred from the file's classifier; unused
  for ImageNet weights. `seed`: torch's RNG seed for the variables a file does not
  provide (VGG-16's fc6/fc7 from ImageNet weights).
  """
  source = pathlib.Path(input_path)
  if arch not in ARCHS:
    raise UserError(f'unknown --arch {arch!r}; expected one of {", ".join(ARCHS)}')
  if num_classes is not None and num_classes < 1:
    raise UserError(f'--num-classes must be positive, got {num_classes}')
  family = 'vgg' if arch == 'vgg16' else 'resnet'
  obj = read_torch_file(source)

  dropped: list[str] = []
  notes: list[str] = []
  if isinstance(obj, dict) and 'feature_extractor' in obj:
    kind = 'fada'
    layout = f'fada_{family}'
    parts = {}
    for key, value in obj.items():
      if key in _FADA_PARTS:
        if not _is_state_dict(value):
          raise UserError(f'{source}: {key!r} is not a state dict of tensors')
        parts[_FADA_PARTS[key]] = _strip_module_prefix(value, repr(key), source)
      else:
        dropped.append(str(key))  # iteration, optimiser states: nothing to convert
    if 'classifier' not in parts:
      raise UserError(f'{source}: FADA checkpoint without a "classifier" state dict')
    backbone_keys = parts['feature_extractor']
    file_family = ('resnet' if 'backbone.conv1.weight' in backbone_keys
                   else 'vgg' if 'backbone.0.weight' in backbone_keys else None)
    if file_family is not None and file_family != family:
      raise UserError(f'{source} holds a {file_family.upper()} FADA model but --arch is {arch}')
    file_classes = parts['classifier'].get('conv2d_list.0.bias')
    file_classes = None if file_classes is None else int(file_classes.shape[0])
    if num_classes is not None and file_classes is not None and num_classes != file_classes:
      raise UserError(f'{source}: the classifier has {file_classes} classes but '
                      f'--num-classes is {num_classes}')
    num_classes = file_classes or num_classes or DEFAULT_NUM_CLASSES
    meta_classes = num_classes
  elif _is_state_dict(obj):
    kind = 'imagenet'
    file_family = ('vgg' if any(k.startswith(('features.', 'module.features.')) for k in obj)
                   else 'resnet' if any(k.startswith(('conv1.', 'layer1.', 'module.conv1.'))
                                        for k in obj) else None)
    if file_family is None:
      raise UserError(f'{source}: not a torchvision ResNet/VGG state dict nor a FADA '
                      f'checkpoint (first keys: {_list_keys(list(obj)[:50])})')
    if file_family != family:
      raise UserError(f'{source} holds {file_family.upper()} weights but --arch is {arch}')
    layout = family
    parts = {'feature_extractor': _strip_module_prefix(obj, 'the state dict', source)}
    if num_classes is not None:
      notes.append(f'--num-classes {num_classes} unused: ImageNet weights have no classifier')
    num_classes = DEFAULT_NUM_CLASSES
    meta_classes = None
  else:
    raise UserError(f'{source}: not a state dict of tensors nor a FADA checkpoint '
                    f'(top level: {type(obj).__name__}'
                    + (f' with keys {_list_keys(map(str, obj))})' if isinstance(obj, dict)
                       else ')'))

  # ResNet width (published 64; the small test/demo networks use less) is read off the
  # stem so that such networks convert too; the arch's depth is what gets checked.
  width = 64
  if family == 'resnet':
    stem = parts['feature_extractor'].get(
        'backbone.conv1.weight' if kind == 'fada' else 'conv1.weight')
    if stem is not None and stem.ndim == 4 and stem.shape[0] > 0:
      width = int(stem.shape[0])

  config = _model_config(arch, num_classes, width)
  abstract = _abstract_variables(config)

  # Match the file's keys against what the model expects, part by part.
  plan: list[tuple[str, Any, _Target]] = []
  random_init: list[tuple] = []
  missing, unexpected, mismatched = [], [], []
  for part, state_dict in parts.items():
    targets, unfilled = _expected_targets(layout, part, abstract[part])
    random_init += [(part, *path) for path in unfilled]
    where = '' if kind == 'imagenet' else f'{_FADA_FILE_KEYS[part]}:'
    # The file's own key spelling in messages (the 'module.' prefix is not repeated).
    for key in targets.keys() - state_dict.keys():
      missing.append(where + key)
    for key, tensor in state_dict.items():
      target = targets.get(key)
      if target is None:
        if _is_droppable(layout, key):
          dropped.append(key)
        else:
          unexpected.append(where + key)
      elif tuple(tensor.shape) != target.torch_shape():
        mismatched.append(f'{where}{key} is {tuple(tensor.shape)} in the file, '
                          f'{arch} expects {target.torch_shape()}')
      else:
        plan.append((key, tensor, target))

  problems = []
  if missing:
    problems.append(f'{len(missing)} missing tensor(s): {_list_keys(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected tensor(s): {_list_keys(unexpected)}')
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatch(es): {_list_keys(mismatched, 2)}')
  if problems:
    raise UserError(f'{source} does not fit --arch {arch}'
                    + (f' with {num_classes} classes' if kind == 'fada' else '')
                    + ': ' + '; '.join(problems) + '; nothing written')

  variables: dict = {}
  parameters = 0
  for key, tensor, target in tqdm(plan, desc='converting', unit='tensor',
                                  disable=not progress, file=sys.stderr):
    array = tensor.detach().cpu()
    if not array.is_floating_point():
      raise UserError(f'{source}: {key} holds {array.dtype}, not floating point')
    array = array.float().numpy()
    if target.is_kernel:
      array = array.transpose(2, 3, 1, 0)
    array = np.ascontiguousarray(array, dtype=target.dtype)
    _set_path(variables, (target.part, *target.path), array)
    parameters += array.size

  for path, array in _fresh_torch_convs(random_init, abstract, seed).items():
    _set_path(variables, path, array)
  # Keep every collection the model has (e.g. VGG's empty batch_stats) for its parts.
  for part in parts:
    for collection in abstract[part]:
      variables.setdefault(part, {}).setdefault(collection, {})

  meta = {'arch': arch, 'num_classes': meta_classes, 'kind': kind,
          'source': str(source.absolute())}
  if family == 'resnet':
    meta['width'] = width
  if random_init:
    meta['random_init'] = sorted({'/'.join(p[:-1]) for p in random_init})
    meta['random_init_seed'] = seed
  return Conversion(variables=variables, meta=meta, tensors=len(plan), parameters=parameters,
                    dropped=_group_dropped(dropped),
                    random_init=meta.get('random_init', []), notes=notes)


def summary(conversion: Conversion, output: str | os.PathLike) -> str:
  """One line: what was converted, what was dropped, what stays at random init."""
  meta = conversion.meta
  what = f'{meta["kind"]} {meta["arch"]}'
  if meta['num_classes']:
    what += f', {meta["num_classes"]} classes'
  parts = [f'converted {conversion.tensors} tensors ({conversion.parameters:,} parameters, '
           f'{what}, parts: {", ".join(sorted(conversion.variables))}) '
           f'from {pathlib.Path(meta["source"]).name} to {output}']
  parts.append('dropped: ' + (', '.join(conversion.dropped) or 'nothing'))
  if conversion.random_init:
    names = ', '.join(p.rsplit('/', 1)[-1] for p in conversion.random_init)
    parts.append(f'random init (not in the file): {names}')
  parts += conversion.notes
  return '; '.join(parts)


def convert_and_save(input_path: str | os.PathLike, output: str | os.PathLike, arch: str,
                     num_classes: Optional[int] = None, overwrite: bool = False,
                     progress: bool = True) -> Conversion:
  """Converts `input_path` and writes the model checkpoint folder `output`."""
  output = pathlib.Path(output)
  # Refuse an occupied output before the (slow) conversion, and again when saving.
  if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
    raise UserError(f'output exists and is not an empty folder: {output} (pass --overwrite)')
  conversion = convert_file(input_path, arch, num_classes, progress=progress)
  checkpoint.save_model(output, conversion.variables, conversion.meta, overwrite=overwrite)
  return conversion


def main(argv: Optional[list[str]] = None) -> int:
  """CLI: `tools/convert_torch_weights.py --input FILE.pth --output DIR --arch ARCH`."""
  parser = argparse.ArgumentParser(
      description='Convert PyTorch weights (torchvision ImageNet ResNet/VGG-16, or a FADA '
                  'training checkpoint) into a fada_jax model checkpoint folder.')
  parser.add_argument('--input', required=True, help='the .pth file')
  parser.add_argument('--output', required=True, help='checkpoint folder to write')
  parser.add_argument('--arch', required=True, choices=ARCHS)
  parser.add_argument('--num-classes', type=int, default=None,
                      help='FADA checkpoints: checked against the classifier '
                           '(inferred when omitted)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing non-empty output folder')
  parser.add_argument('--no-progress', action='store_true', help='no progress bar')
  args = parser.parse_args(argv)
  try:
    conversion = convert_and_save(args.input, args.output, args.arch, args.num_classes,
                                  overwrite=args.overwrite, progress=not args.no_progress)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(summary(conversion, args.output))
  return 0
