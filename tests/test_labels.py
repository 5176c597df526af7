"""Class names, palette and label-id -> train-id tables against FADA_REFERENCE.md."""

import numpy as np
import pytest

from fada_jax.data import labels
from fada_jax.errors import UserError

# The maps as printed in the reference (label id -> train id).
CITYSCAPES_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10,
                 25: 11, 26: 12, 28: 13, 32: 14, 33: 15}
SYNTHIA_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11,
              8: 12, 19: 13, 12: 14, 11: 15}


def _expected(mapping, size):
  return np.array([mapping.get(i, 255) for i in range(size)], np.uint8)


@pytest.mark.parametrize("dataset,num_classes,mapping,size", [
    ("cityscapes", 19, CITYSCAPES_19, 256), ("gta5", 19, CITYSCAPES_19, 256),
    ("cityscapes", 16, CITYSCAPES_16, 256), ("synthia", 16, SYNTHIA_16, 65536)])
def test_lookup_tables_match_reference(dataset, num_classes, mapping, size):
  lut = labels.label_lookup(dataset, num_classes)
  assert lut.dtype == np.uint8 and lut.shape == (size,)
  np.testing.assert_array_equal(lut, _expected(mapping, size))
  np.testing.assert_array_equal(labels.id_to_train_id(num_classes, dataset), lut)


def test_names_palette_and_13_classes():
  assert len(labels.CITYSCAPES_CLASS_NAMES) == 19 and len(labels.class_names(16)) == 16
  assert labels.class_names(19)[13] == "car" and labels.class_names(16)[12] == "car"
  assert labels.PALETTE.shape == (19, 3) and labels.PALETTE.dtype == np.uint8
  assert tuple(labels.PALETTE[0]) == (128, 64, 128) and tuple(labels.PALETTE[18]) == (119, 11, 32)
  # 16-class palette: each class keeps its Cityscapes colour (sky, car, bicycle).
  assert tuple(labels.palette(16)[9]) == (70, 130, 180)
  assert tuple(labels.palette(16)[12]) == (0, 0, 142)
  assert tuple(labels.palette(16)[15]) == (119, 11, 32)
  names16 = labels.class_names(16)
  assert sorted(names16[i] for i in labels.CLASSES_13) == sorted(
      set(names16) - {"wall", "fence", "pole"})


def test_map_labels_ignores_ids_outside_the_table():
  lut = labels.label_lookup("cityscapes", 19)
  ids = np.array([[7, 26, 300, 65535], [0, 33, 34, 255]], np.uint16)
  np.testing.assert_array_equal(labels.map_labels(ids, lut),
                                [[0, 13, 255, 255], [255, 18, 255, 255]])
  np.testing.assert_array_equal(labels.map_labels(np.array([-1, 7, 999]), lut), [255, 0, 255])
  colours = labels.colorize(np.array([[0, 255]], np.uint8))
  np.testing.assert_array_equal(colours, [[[128, 64, 128], [0, 0, 0]]])


def test_bad_arguments_are_user_errors():
  with pytest.raises(UserError, match="16"):
    labels.label_lookup("synthia", 19)
  with pytest.raises(UserError, match="kitti"):
    labels.label_lookup("kitti", 19)
  with pytest.raises(UserError, match="17"):
    labels.class_names(17)
