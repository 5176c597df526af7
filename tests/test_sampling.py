"""Class-balanced source sampling and per-epoch target orders."""

import numpy as np
import pytest

from fada_jax.data import sampling
from fada_jax.errors import UserError


def _presence(num_files, num_classes, rows):
  table = np.zeros((num_files, num_classes), bool)
  for file_index, classes in rows.items():
    table[file_index, classes] = True
  return table


def _skewed_set():
  """60 files: road (0) in all, car (1) in 30, bus (2) in 3, bicycle (3) in 1."""
  rows = {}
  for i in range(60):
    classes = [0]
    if i % 2 == 0:
      classes.append(1)
    if i in (5, 25, 45):
      classes.append(2)
    if i == 17:
      classes.append(3)
    rows[i] = classes
  return _presence(60, 4, rows)


def test_deterministic_from_seed():
  presence = _skewed_set()
  first = sampling.class_balanced_order(presence, 4000, seed=3)
  np.testing.assert_array_equal(first, sampling.class_balanced_order(presence, 4000, seed=3))
  assert not np.array_equal(first, sampling.class_balanced_order(presence, 4000, seed=4))
  assert first.shape == (4000,) and first.min() >= 0 and first.max() < 60


def test_rare_classes_are_drawn_more_often_than_uniform_file_sampling():
  presence = _skewed_set()
  order = sampling.class_balanced_order(presence, 6000, seed=0)
  drawn = presence[order].mean(axis=0)  # fraction of draws holding each class
  uniform = presence.mean(axis=0)
  assert drawn[3] > 10 * uniform[3]  # bicycle: 1 of 60 files
  assert drawn[2] > 4 * uniform[2]   # bus: 3 of 60 files
  assert drawn[1] <= uniform[1] + 0.05


def test_disjoint_classes_are_balanced_and_files_cycle_through_each_class():
  # Each file holds one class: 50, 10 and 2 files. The rule drives class counts equal.
  classes = [0] * 50 + [1] * 10 + [2] * 2
  presence = _presence(62, 3, {i: [c] for i, c in enumerate(classes)})
  draws = sampling.class_balanced_draws(presence, 3000, np.random.default_rng(0))
  class_share = np.bincount(np.array(classes)[draws], minlength=3) / draws.size
  np.testing.assert_allclose(class_share, 1 / 3, atol=0.01)
  # Class 1's ten files are each used before any is reused: 1000 draws / 10 = 100 each.
  uses = np.bincount(draws, minlength=62)[50:60]
  assert uses.max() - uses.min() <= 1


def test_counts_restart_every_sub_epoch():
  # Road in all 60 files, a rare class in file 7 alone. Restarting the counts before every
  # draw makes each draw uniform over the two classes: file 7 half the time (+1/120).
  # Counting over a sub-epoch of 3000 draws favours it more (road's share stays high).
  presence = np.zeros((60, 2), bool)
  presence[:, 0] = True
  presence[7, 1] = True
  fresh = sampling.class_balanced_draws(presence, 6000, np.random.default_rng(0), 1)
  assert abs((fresh == 7).mean() - (0.5 + 1 / 120)) < 0.03
  counted = sampling.class_balanced_draws(presence, 6000, np.random.default_rng(0))
  assert (counted == 7).mean() > 0.57


def test_classes_in_no_file_are_never_drawn_and_empty_tables_fail():
  presence = _presence(4, 3, {0: [0], 1: [0], 2: [1], 3: [1]})  # class 2 absent
  draws = sampling.class_balanced_draws(presence, 500, np.random.default_rng(0))
  assert set(draws.tolist()) == {0, 1, 2, 3}
  with pytest.raises(UserError, match="no file"):
    sampling.class_balanced_order(np.zeros((3, 2), bool), 10, 0)


def test_num_draws_in_whole_sub_epochs():
  assert sampling.num_class_balanced_draws(10) == 3000
  assert sampling.num_class_balanced_draws(250000) == 252000


def test_epoch_order_is_a_fresh_permutation_per_epoch():
  epochs = [[sampling.epoch_order(e * 7 + i, 7, seed=1) for i in range(7)] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(7))
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
  assert epochs[0] == [sampling.epoch_order(i, 7, seed=1) for i in range(7)]
