"""The published FADA configurations, built in one place.

Every file in `configs/` is a thin `get_config()` over `make_config(task, stage, arch)`,
so the six published settings (GTA5 or SYNTHIA to Cityscapes, three stages each) and the
synthetic demo share one definition of every field. The numbers are those of the PyTorch
release (see the project README); a deliberate difference is a field whose default is
the published behaviour.
"""

import math

import ml_collections

from fada_jax.constants import STAGES
from fada_jax.errors import UserError

TASKS = ('g2c', 's2c', 'demo')
ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg16')

# Fields that describe the experiment rather than one stage: `--mode=pipeline` carries
# them from the user's config into the configs of every stage it runs.
SHARED_FIELDS = (
    'seed', 'log_every',
    'model.arch', 'model.num_classes', 'model.dtype', 'model.remat', 'model.width',
    'model.matmul_convs',
    'data.root', 'data.format', 'data.workers', 'data.skip_corrupt', 'data.synthetic_size',
    'data.resize_on_device', 'eval.batch_size',
)

_SOURCE = {'g2c': 'gta5', 's2c': 'synthia', 'demo': 'synthetic_source'}
_TARGET = {'g2c': 'cityscapes', 's2c': 'cityscapes', 'demo': 'synthetic_target'}
_SOURCE_SIZE = {'g2c': (1280, 720), 's2c': (1280, 760), 'demo': (160, 80)}
_NUM_CLASSES = {'g2c': 19, 's2c': 16, 'demo': 19}


def _solver(stage, task):
  """Learning rates and schedule lengths of the release, per stage."""
  solver = ml_collections.ConfigDict()
  if stage == 'adversarial':
    solver.base_lr, solver.base_lr_d = 2.5e-4, 1e-4
    solver.max_iter, solver.stop_iter = 62500, 40000
  else:
    solver.base_lr, solver.base_lr_d = 5e-4, 1e-4
    solver.max_iter, solver.stop_iter = 31250, 20000
  solver.batch_size = 8  # global; stage 2 splits it into 4 source + 4 target
  solver.classifier_lr_mult = 10.0
  solver.momentum = 0.9
  solver.weight_decay = 5e-4
  solver.lr_power = 0.9
  solver.adam_b1 = 0.9
  solver.adam_b2 = 0.99
  solver.checkpoint_every = 2000
  solver.keep_checkpoints = 3
  solver.temperature = 1.8      # stage 2: source and target logits are divided by it
  solver.soft_label_max = 0.9   # stage 2: soft labels clipped (not renormalised) at this
  solver.adv_weight = 0.001     # stage 2: weight of the generator's adversarial loss
  if task == 'demo':
    # Small networks from scratch on a short schedule: larger rates, and a stronger
    # adversarial signal so that 300 iterations of stage 2 move the target features.
    solver.base_lr, solver.base_lr_d = 1e-2, 5e-4
    solver.adv_weight = 0.01
    solver.max_iter = solver.stop_iter = 300
    solver.checkpoint_every = 100
    if stage == 'self_distill':
      # Stage 3 starts from stage 2's model (no ImageNet weights to restart from). On the
      # demo's confident pseudo labels (see config.pseudo_label), stage 3 alone from the
      # stage-2 models of seeds 1 and 2 (val mIoU 26.25 / 26.70): 200 steps at 1e-2
      # 27.20 / 27.79, 300 steps at 1e-2 27.35 / 27.88, 200 at 2e-2 27.52 / 27.88,
      # 300 at 2e-2 27.85 / 27.96.
      solver.base_lr = 2e-2
  return solver


def make_config(task: str, stage: str, arch: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config of one stage of one task (`g2c`, `s2c` or `demo`)."""
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; expected one of {STAGES}')
  arch = arch or ('resnet18' if task == 'demo' else 'resnet101')
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; expected one of {ARCHS}')
  demo = task == 'demo'

  config = ml_collections.ConfigDict()
  config.task = task
  config.stage = stage
  config.seed = 0
  config.log_every = 10 if demo else 20
  # Stage 1 and 3 start from converted ImageNet weights, stage 2 from stage 1's
  # checkpoint; '' is random initialisation (the demo's choice: nothing to download).
  config.init_checkpoint = ''

  config.model = ml_collections.ConfigDict()
  config.model.arch = arch
  config.model.num_classes = _NUM_CLASSES[task]
  # The release freezes BN everywhere except GTA5 self-distillation. The demo trains a
  # small ResNet from scratch, which needs trainable BN to learn at all.
  config.model.freeze_bn = not (demo or (task == 'g2c' and stage == 'self_distill'))
  config.model.dtype = 'float32'
  config.model.remat = False
  config.model.width = 16 if demo else 64
  # Convolutions as matrix products (models/conv_dispatch.py): 'auto' = on for the CPU
  # backend, where XLA's convolutions are slow; GPUs/TPUs keep their convolutions.
  config.model.matmul_convs = 'auto'

  config.data = ml_collections.ConfigDict()
  config.data.root = ''
  config.data.format = 'folder'
  config.data.source = 'cityscapes_pseudo' if stage == 'self_distill' else _SOURCE[task]
  if demo and stage == 'self_distill':
    config.data.source = 'synthetic_target_pseudo'
  config.data.target = _TARGET[task]
  config.data.source_size = (320, 160) if demo and stage == 'self_distill' else _SOURCE_SIZE[task]
  config.data.target_size = (160, 80) if demo else (1024, 512)
  config.data.test_size = (160, 80) if demo else (
      (2048, 1024) if stage == 'self_distill' else (1024, 512))
  # Stage 3 only: random scale of the full image, then a crop of this size.
  config.data.crop_size = (160, 80) if demo else (1024, 512)
  config.data.scale_range = (0.5, 1.5)
  config.data.flip = stage == 'self_distill'
  config.data.color_jitter = (0.0, 0.0, 0.0, 0.0) if stage == 'source_only' else (
      0.5, 0.5, 0.5, 0.2)
  if demo and stage == 'self_distill':
    # The release's stage-3 augmentation suits crops of 2048x1024 frames tested at full
    # size. The demo tests its 256x128 frames at 160x80 (scale 0.625): scales 0.5-1.5
    # would show objects up to 2.4 times their test size, and strong colour jitter on the
    # dim, low-contrast target frames takes the student away from what its teacher
    # labelled. With both (width 8, 150 steps a stage, seed 0) stage 3 fell from the
    # teacher's 15.4 mIoU to 11.6; with scales around the test scale and no jitter, 14.7.
    config.data.scale_range = (0.5, 0.75)
    config.data.color_jitter = (0.0, 0.0, 0.0, 0.0)
  # The release jitters the full source frame before resizing it; False jitters after
  # the resize: equal up to rounding and much cheaper on large frames.
  config.data.jitter_first = True
  # Training frames cross to the device at full size and are jittered and resized (stage
  # 3: also flipped and cropped) there (data/device_augment.py), the same pixels as PIL
  # gives on the host; the reading processes then mostly decode. 'auto' = on for
  # GPUs/TPUs, off for the CPU backend.
  config.data.resize_on_device = 'auto'
  config.data.normalization = 'caffe' if arch == 'vgg16' else 'imagenet'
  config.data.pseudo_label_dir = ''
  config.data.workers = 0 if demo else 4
  config.data.skip_corrupt = False
  config.data.synthetic_size = 200  # frames per synthetic split

  config.solver = _solver(stage, task)
  if demo:
    config.solver.batch_size = 8

  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'val'
  config.eval.batch_size = 8 if demo else 2
  config.eval.flip = False
  config.eval.scales = (1.0,)
  config.eval.save_predictions = False
  # Validation during training every this many steps (0: off); the best model so far
  # is kept in DIR/checkpoints/best.
  config.eval.every = 100 if demo else config.solver.checkpoint_every

  # Pseudo labels for stage 3 (written with the stage-2 config). The release labels every
  # pixel with the argmax (keep_fraction 1). Below 1, CBST's class-balanced filter: per
  # class the most confident keep_fraction of its pixels, and every pixel at least
  # keep_confidence confident, keep their label; the rest is ignored.
  config.pseudo_label = ml_collections.ConfigDict()
  config.pseudo_label.keep_fraction = 1.0
  config.pseudo_label.keep_confidence = 0.9
  if demo:
    # Started from stage 2's model (no ImageNet weights to restart from), stage 3 on
    # every pixel's argmax reproduces its teacher and drops rarer classes (terrain,
    # truck). Stage 3 alone, 200 steps at 1e-2, from the stage-2 models of seeds 1 and 2
    # (val mIoU 26.25 / 26.70): every pixel 26.23 / 26.72; keep 0.5 27.20 / 27.79;
    # keep 0.7 27.49 / 27.37; keep 0.3 (seed 1) 26.75.
    config.pseudo_label.keep_fraction = 0.5

  config.pipeline = ml_collections.ConfigDict()
  # --mode=pipeline hands each stage's final model on, as the release does; True hands
  # on its best validated model (DIR/<stage>/checkpoints/best) instead.
  config.pipeline.use_best = False

  config.lock()
  return config



def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the values a typo or a wrong override can break; raises `UserError`."""
  choices = {'task': TASKS, 'stage': STAGES, 'model.arch': ARCHS,
             'model.dtype': ('float32', 'bfloat16'), 'model.matmul_convs': ('auto', 'on', 'off'),
             'data.format': ('folder', 'array_record'),
             'data.resize_on_device': ('auto', 'on', 'off'),
             'data.normalization': ('imagenet', 'caffe')}
  for field, allowed in choices.items():
    value = _get(config, field)
    if value not in allowed:
      raise UserError(f'config.{field}={value!r} is not one of {", ".join(allowed)}')
  for field in ('data.source_size', 'data.target_size', 'data.test_size', 'data.crop_size'):
    size = _get(config, field)
    if len(size) != 2 or any(not isinstance(v, int) or v <= 0 for v in size):
      raise UserError(f'config.{field}={tuple(size)} must be (width, height), positive integers')
  jitter = tuple(config.data.color_jitter)
  if (len(jitter) != 4 or not all(_is_number(v) for v in jitter) or min(jitter) < 0
      or jitter[3] > 0.5):
    # torchvision's ColorJitter: any strength >= 0 for the first three, hue in [0, 0.5].
    raise UserError(f'config.data.color_jitter={jitter} must be (brightness, contrast, '
                    'saturation, hue): strengths >= 0, and hue in [0, 0.5]')
  scale_range = tuple(config.data.scale_range)
  if (len(scale_range) != 2 or not all(_is_number(v) for v in scale_range)
      or not 0 < scale_range[0] <= scale_range[1]):
    raise UserError(f'config.data.scale_range={scale_range} must be (low, high) with '
                    '0 < low <= high')
  if not config.eval.scales or min(config.eval.scales) <= 0:
    raise UserError(f'config.eval.scales={tuple(config.eval.scales)} must be positive')
  for field in ('solver.batch_size', 'solver.max_iter', 'solver.stop_iter',
                'solver.checkpoint_every', 'solver.keep_checkpoints', 'model.num_classes',
                'model.width', 'eval.batch_size', 'log_every', 'data.synthetic_size'):
    value = _get(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise UserError(f'config.{field}={value!r} must be a positive integer')
  if not isinstance(config.data.workers, int) or config.data.workers < 0:
    raise UserError(f'config.data.workers={config.data.workers!r} must be an integer >= 0 '
                    '(0 reads in the training process)')
  for field in ('solver.base_lr', 'solver.base_lr_d', 'solver.classifier_lr_mult',
                'solver.weight_decay', 'solver.lr_power', 'solver.adv_weight'):
    value = _get(config, field)
    if not _is_number(value) or value < 0:
      raise UserError(f'config.{field}={value!r} must be a number >= 0')
  for field in ('solver.momentum', 'solver.adam_b1', 'solver.adam_b2'):
    value = _get(config, field)
    if not _is_number(value) or not 0 <= value < 1:
      raise UserError(f'config.{field}={value!r} must be in [0, 1)')
  if not _is_number(config.solver.temperature) or config.solver.temperature <= 0:
    raise UserError(f'config.solver.temperature={config.solver.temperature!r} must be > 0')
  if not _is_number(config.solver.soft_label_max) or not 0 < config.solver.soft_label_max <= 1:
    raise UserError(f'config.solver.soft_label_max={config.solver.soft_label_max!r} must be '
                    'in (0, 1]')
  if config.solver.stop_iter > config.solver.max_iter:
    raise UserError(f'config.solver.stop_iter={config.solver.stop_iter} exceeds '
                    f'config.solver.max_iter={config.solver.max_iter}')
  for field in ('pseudo_label.keep_fraction', 'pseudo_label.keep_confidence'):
    value = _get(config, field)
    if not _is_number(value) or not 0 < value <= 1:
      raise UserError(f'config.{field}={value!r} must be in (0, 1]')
  if config.stage == 'adversarial' and config.solver.batch_size % 2:
    raise UserError(f'config.solver.batch_size={config.solver.batch_size} must be even in '
                    'the adversarial stage (half source, half target)')


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _get(config, dotted):
  for key in dotted.split('.'):
    config = config[key]
  return config


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of a config file, as `--config=` reads it: 'configs/g2c_sd.py' or
  'configs/g2c_sd.py:vgg16' (the part after ':' is get_config's argument)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path, _, argument = str(spec).partition(':')
  if not pathlib.Path(path).is_file():
    raise UserError(f'config file not found: {path}')
  module_spec = importlib.util.spec_from_file_location(f'_fada_config_{pathlib.Path(path).stem}',
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (a user's file: one line)
    raise UserError(f'config file {path} fails to load: {type(e).__name__}: {e}') from None
  if not hasattr(module, 'get_config'):
    raise UserError(f'config file {path} has no get_config()')
  return module.get_config(argument) if argument else module.get_config()


def from_json_dict(fields: dict) -> ml_collections.ConfigDict:
  """A config recorded as JSON (a checkpoint's meta.json 'config'), lists back to tuples."""
  def tuples(value):
    if isinstance(value, dict):
      return {key: tuples(v) for key, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value
  return ml_collections.ConfigDict(tuples(fields))
