"""Class names, the Cityscapes palette and dataset label id -> train id lookup tables.

Train ids are 0..K-1 for the K evaluated classes; every other label id maps to 255 (ignore),
as in the published release. GTA5 annotations use the Cityscapes label ids; SYNTHIA uses its
own ids (stored in channel 0 of a 16-bit PNG), so its table covers the full 16-bit range.
"""

from __future__ import annotations

import numpy as np

from fada_jax.constants import IGNORE_LABEL
from fada_jax.errors import UserError

CITYSCAPES_CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")

# The 16 classes shared by SYNTHIA and Cityscapes: the 19 minus terrain, truck and train.
CLASS_NAMES_16: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign",
    "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle")

# Train ids (16-class setting) of the 13 classes reported as "mIoU*" (no wall, fence, pole).
CLASSES_13: tuple[int, ...] = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)

# Cityscapes label id -> train id.
_CITYSCAPES_19 = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_16 = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10, 25: 11,
    26: 12, 28: 13, 32: 14, 33: 15}
# SYNTHIA (RAND_CITYSCAPES) label id -> train id of the 16-class setting.
_SYNTHIA_16 = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12,
    19: 13, 12: 14, 11: 15}

# The Cityscapes 19-class train id of each 16-class train id (for palettes and names).
_TRAIN_16_TO_19 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

# Datasets whose label files hold Cityscapes label ids.
_CITYSCAPES_ID_DATASETS = ("cityscapes", "gta5", "synthetic_source", "synthetic_target")


def _check_num_classes(num_classes: int) -> None:
  if num_classes not in (16, 19):
    raise UserError(f"num_classes must be 16 or 19, got {num_classes!r}")


def class_names(num_classes: int) -> tuple[str, ...]:
  """The class names of the 19-class (GTA5) or 16-class (SYNTHIA) setting."""
  _check_num_classes(num_classes)
  return CITYSCAPES_CLASS_NAMES if num_classes == 19 else CLASS_NAMES_16


def palette(num_classes: int) -> np.ndarray:
  """uint8 [num_classes, 3] colours for train ids, the Cityscapes colours of each class."""
  _check_num_classes(num_classes)
  if num_classes == 19:
    return PALETTE.copy()
  return PALETTE[list(_TRAIN_16_TO_19)].copy()


def _mapping(dataset: str, num_classes: int) -> tuple[dict[int, int], int]:
  """(label id -> train id, table size) of a dataset's label files."""
  _check_num_classes(num_classes)
  if dataset == "synthia":
    if num_classes != 16:
      raise UserError("SYNTHIA labels only exist in the 16-class setting (num_classes=16), "
                      f"got num_classes={num_classes}")
    return _SYNTHIA_16, 65536
  if dataset in _CITYSCAPES_ID_DATASETS:
    return (_CITYSCAPES_19 if num_classes == 19 else _CITYSCAPES_16), 256
  raise UserError(f"no label id map for dataset {dataset!r}; expected one of "
                  f"{', '.join(_CITYSCAPES_ID_DATASETS + ('synthia',))}")


def label_lookup(dataset: str, num_classes: int) -> np.ndarray:
  """uint8 lookup table `lut[label_id] = train_id` (255 for every unmapped id).

  256 entries for Cityscapes-id datasets (8-bit label PNGs); 65536 for SYNTHIA (16-bit).
  """
  mapping, size = _mapping(dataset, num_classes)
  lut = np.full((size,), IGNORE_LABEL, dtype=np.uint8)
  for label_id, train_id in mapping.items():
    lut[label_id] = train_id
  return lut


def id_to_train_id(num_classes: int, dataset: str) -> np.ndarray:
  """Alias of `label_lookup` with the argument order of the interface document."""
  return label_lookup(dataset, num_classes)


def map_labels(label_ids: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """Applies a lookup table; ids beyond the table (impossible for uint8/uint16) -> 255."""
  label_ids = np.asarray(label_ids)
  if label_ids.dtype not in (np.uint8, np.uint16):
    label_ids = label_ids.astype(np.int64)
    out_of_range = (label_ids < 0) | (label_ids >= lut.shape[0])
    mapped = lut[np.clip(label_ids, 0, lut.shape[0] - 1)]
    mapped[out_of_range] = IGNORE_LABEL
    return mapped
  if label_ids.dtype == np.uint16 and lut.shape[0] < 65536:
    lut = np.concatenate([lut, np.full((65536 - lut.shape[0],), IGNORE_LABEL, np.uint8)])
  return np.take(lut, label_ids)  # faster than lut[label_ids] for large maps


def colorize(train_ids: np.ndarray, num_classes: int = 19) -> np.ndarray:
  """RGB uint8 [H, W, 3] image of a train-id map (255 and unknown ids -> black)."""
  colours = np.zeros((256, 3), dtype=np.uint8)
  colours[:num_classes] = palette(num_classes)
  return colours[np.asarray(train_ids, dtype=np.uint8)]
