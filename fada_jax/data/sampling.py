"""Orders in which training streams visit their files, deterministic from a seed.

`class_balanced_order` is the release's source sampling: the list is built in sub-epochs
of 3000 draws; within one, a running count n[c] of the classes of the files drawn so far
sets P(c) ∝ 1 / log(1.01 + n[c] / Σn) (uniform while Σn = 0); a draw of class c takes the
next file of c's file list (reshuffled when used up) and adds 1 to n for every class in
that file. The loader then shuffles the whole list.

`epoch_order` is the target (and pseudo-label) stream: the release repeats the file list
and shuffles it; here each pass over the files is one permutation.
"""

from __future__ import annotations

import bisect
import functools
import math

import numpy as np

from fada_jax.errors import UserError

SUB_EPOCH_SIZE = 3000


def class_balanced_draws(class_presence: np.ndarray, num_draws: int,
                         rng: np.random.Generator,
                         sub_epoch_size: int = SUB_EPOCH_SIZE) -> np.ndarray:
  """int64 [num_draws] file indices in draw order (before the final shuffle).

  Classes present in no file cannot be drawn (the release would fail on them).
  """
  presence = np.asarray(class_presence, dtype=bool)
  num_files, num_classes = presence.shape
  files_of_class = [np.flatnonzero(presence[:, c]) for c in range(num_classes)]
  drawable = [c for c in range(num_classes) if files_of_class[c].size]
  if not drawable:
    raise UserError("class-balanced sampling: no file contains any class (are the labels "
                    "all ignore?)")
  classes_of_file = [np.flatnonzero(row) for row in presence]
  position = [0] * num_classes
  # Scalar Python arithmetic on 16-19 classes is several times faster per draw than numpy.
  uniforms = rng.random(num_draws)
  draws = np.empty(num_draws, dtype=np.int64)
  counts = [0] * num_classes
  total = 0
  for i in range(num_draws):
    if i % sub_epoch_size == 0:
      counts = [0] * num_classes
      total = 0
    if total == 0:
      weights = [1.0] * len(drawable)
    else:
      weights = [1.0 / math.log(1.01 + counts[c] / total) for c in drawable]
    cumulative = list(_accumulate(weights))
    pick = bisect.bisect_right(cumulative, uniforms[i] * cumulative[-1])
    c = drawable[min(pick, len(drawable) - 1)]
    files = files_of_class[c]
    if position[c] >= files.size:
      rng.shuffle(files)
      position[c] = 0
    chosen = int(files[position[c]])
    position[c] += 1
    draws[i] = chosen
    for present in classes_of_file[chosen]:
      counts[present] += 1
    total += classes_of_file[chosen].size
  return draws


def _accumulate(values):
  running = 0.0
  for value in values:
    running += value
    yield running


def class_balanced_order(class_presence: np.ndarray, num_draws: int, seed: int) -> np.ndarray:
  """The release's class-balanced list of `num_draws` file indices, then shuffled."""
  rng = np.random.default_rng([int(seed), 0xC1A55])
  draws = class_balanced_draws(class_presence, num_draws, rng)
  return draws[rng.permutation(num_draws)]


def num_class_balanced_draws(total_examples: int) -> int:
  """List length for `total_examples` training examples: whole sub-epochs, as the release."""
  return (int(total_examples) // SUB_EPOCH_SIZE + 1) * SUB_EPOCH_SIZE


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_files: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([int(seed), 0xE90C4, int(epoch)]).permutation(num_files)


def epoch_order(position: int, num_files: int, seed: int) -> int:
  """File index at `position` of the endless stream of per-epoch permutations."""
  epoch, offset = divmod(int(position), num_files)
  return int(_epoch_permutation(num_files, seed, epoch)[offset])
