"""The project's shared constants and its device mesh, each defined once.

Free of jax at import time: the data modules (run in grain workers and by
tools/prepare_data.py) read the ignore label from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import jax
  from jax.sharding import Mesh

# The train id of pixels that count nowhere (the release's ignore_index / label fill).
IGNORE_LABEL = 255

# FADA's three training stages, in the order the pipeline runs them.
STAGES = ('source_only', 'adversarial', 'self_distill')

# The one mesh axis: the batch is split along it, everything else is replicated.
DATA_AXIS = 'data'

# A training run's log: one JSON row every log_every steps and per validation.
TRAIN_METRICS_FILE = 'metrics.jsonl'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top,redefined-outer-name
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))
