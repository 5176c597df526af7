"""The Python face of a trained model: `model = fada_jax.load(checkpoint); model.predict(images)`.

    import numpy as np, PIL.Image, fada_jax
    model = fada_jax.load('runs/g2c_sd/checkpoints/best')   # the config recorded beside it
    image = np.asarray(PIL.Image.open('frame.png').convert('RGB'))   # uint8 [H, W, 3]
    train_ids = model.predict(image)                                # uint8 [H, W]
    train_ids, probabilities = model.predict(image, probabilities=True)   # + [H, W, K]

`predict` computes what `--mode=eval` and `--mode=predict` compute, with the same
`Predictor` (evaluate/inference.py): each image is resized to config.data.test_size
(bicubic, the test transform), predicted on every local device (config.eval.flip and
config.eval.scales apply), and the prediction is upsampled back to the image's own size.
Each input size compiles once, on its first call.

A training checkpoint (DIR/checkpoints/<step>, DIR/checkpoints/best) records the config
that made it in its meta.json, and `load` uses it; converted weights
(tools/convert_torch_weights.py) and older checkpoints record none and need `config=`: a
config file ('configs/g2c_sd.py', 'configs/g2c_sd.py:vgg16') or an ml_collections
ConfigDict.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from fada_jax import checkpoint as checkpoint_lib
from fada_jax import config_lib
from fada_jax.data import labels as labels_lib
from fada_jax.data import transforms
from fada_jax.errors import UserError
from fada_jax.evaluate.inference import Predictor, predictor_for
from fada_jax.evaluate.run import load_checkpoint_for_eval


def config_of(checkpoint: str | os.PathLike, config: Any = None):
  """The config to run `checkpoint` with: `config` (a ConfigDict or a config file,
  'configs/g2c_sd.py[:ARG]'), else the one recorded in its meta.json."""
  if config is None:
    meta = checkpoint_lib.read_meta(checkpoint)
    recorded = meta.get('config')
    if not isinstance(recorded, dict):
      raise UserError(f'checkpoint {checkpoint} records no config (converted weights and '
                      'older checkpoints do not); name one: config=\'configs/g2c_sd.py\' '
                      'in fada_jax.load, --config=configs/g2c_sd.py for tools/export.py')
    config = config_lib.from_json_dict(recorded)
  elif isinstance(config, (str, os.PathLike)):
    config = config_lib.load_config_file(str(config))
  config_lib.validate(config)
  return config


class Model:
  """A loaded checkpoint on this process's devices; `predict` segments images."""

  def __init__(self, config, predictor: Predictor, variables: dict,
               checkpoint: str | os.PathLike):
    self.config = config
    self.predictor = predictor
    self.variables = variables  # placed (replicated on the mesh)
    self.checkpoint = pathlib.Path(checkpoint)
    self.test_size = tuple(int(v) for v in config.data.test_size)  # (width, height)

  @property
  def num_classes(self) -> int:
    return self.predictor.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return labels_lib.class_names(self.num_classes)

  def colorize(self, train_ids: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] Cityscapes-palette colours of a train-id map."""
    return labels_lib.colorize(train_ids, self.num_classes)

  def network_input(self, image: np.ndarray) -> np.ndarray:
    """The test transform: uint8 [H, W, 3] resized to config.data.test_size (bicubic)."""
    return transforms.resize_image(image, self.test_size)

  def predict(self, images, *, probabilities: bool = False):
    """Train ids of one uint8 [H, W, 3] RGB image ([H, W] uint8), or of a batch
    ([N, H, W, 3] array -> [N, H, W]; a list of images, any sizes -> a list).

    With `probabilities=True` it returns (train ids, float32 [..., K] class
    probabilities): the softmax of the upsampled logits, or the flip / multi-scale mean
    of probabilities whose argmax is the prediction.
    """
    single = isinstance(images, np.ndarray) and images.ndim == 3
    as_list = isinstance(images, (list, tuple))
    batch = [images] if single else list(images)
    batch = [check_image(np.asarray(image), index) for index, image in enumerate(batch)]
    outputs: list[Any] = [None] * len(batch)
    for out_hw, indices in group_by_size(batch).items():
      for chunk in chunks(indices, self.predictor.rows_per_call()):
        network_input = np.stack([self.network_input(batch[i]) for i in chunk])
        result = self.predictor.fetch(self.predictor.dispatch_predict(
            self.variables, network_input, out_hw, probabilities=probabilities), len(chunk))
        for j, i in enumerate(chunk):
          outputs[i] = (result[0][j], result[1][j]) if probabilities else result[j]
    if single:
      return outputs[0]
    if not as_list:
      if probabilities:
        return (np.stack([o[0] for o in outputs]) if outputs else np.zeros((0,), np.uint8),
                np.stack([o[1] for o in outputs]) if outputs else np.zeros((0,), np.float32))
      return np.stack(outputs) if outputs else np.zeros((0,), np.uint8)
    if probabilities:
      return [o[0] for o in outputs], [o[1] for o in outputs]
    return outputs


def check_image(image: np.ndarray, index: int = 0) -> np.ndarray:
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise UserError(f'image {index}: expected uint8 RGB [H, W, 3], got {image.dtype} '
                    f'{list(image.shape)}')
  return image


def group_by_size(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
  """(height, width) -> the indices of the images of that size, in order."""
  groups: dict[tuple[int, int], list[int]] = {}
  for index, image in enumerate(images):
    groups.setdefault(tuple(int(v) for v in image.shape[:2]), []).append(index)
  return groups


def chunks(items: Sequence, size: int):
  for start in range(0, len(items), size):
    yield list(items[start:start + size])


def load(checkpoint: str | os.PathLike, config: Any = None) -> Model:
  """The model of a checkpoint folder, on this process's devices, ready to `predict`.

  `config`: None (the config recorded in the checkpoint), a config file
  ('configs/g2c_sd.py', 'configs/g2c_sd.py:vgg16') or an ml_collections ConfigDict. A
  checkpoint that does not fit the config's network is a one-line UserError.
  """
  checkpoint = pathlib.Path(checkpoint).expanduser()
  config = config_of(checkpoint, config)
  predictor = predictor_for(config)
  variables, _ = load_checkpoint_for_eval(config, checkpoint, predictor)
  return Model(config, predictor, variables, checkpoint)
