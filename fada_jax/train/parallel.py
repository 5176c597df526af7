"""Explicit data parallelism over every device of every process.

One mesh axis, 'data', over all devices (`jax.devices()` spans every process after
`jax.distributed.initialize`). The train state is replicated; each batch array is
sharded along its first axis. Steps are jit-compiled with these shardings as explicit
input and output shardings, so the compiled program is the SPMD partition of the
single-device step: gradients, losses and trainable-BN statistics are reduced over the
global batch by the collectives XLA inserts. No per-device code is written by hand.

The global batch keeps the release's meaning whatever the device count: stage 2's
`solver.batch_size = 8` is 4 source + 4 target images per step in total, spread over
the devices; stages 1 and 3 take `batch_size` labelled images. Each process feeds only
its local share (`local_batch_sizes`), which `shard_batch` assembles into global arrays.
"""

import zlib
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fada_jax.constants import DATA_AXIS, make_mesh  # make_mesh: the training code's name
from fada_jax.errors import UserError
from fada_jax.train import distributed


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', everything else whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def state_sharding(state: Any, mesh: Mesh) -> Any:
  """Every leaf of the train state replicated on every device."""
  replicated = replicated_sharding(mesh)
  return jax.tree_util.tree_map(lambda _: replicated, state)


def replicate(tree: Any, mesh: Mesh, what: str = 'the variables') -> Any:
  """Places a host tree (identical on every process) replicated over the mesh.

  With several processes, each copies its own values to its own devices, after one
  check that every process holds the same bytes (a checksum per leaf, gathered once).
  `jax.device_put` would instead gather every leaf from every process to compare it:
  one cross-process program and collective per leaf, seconds per placement of even a
  tiny network. `what` names the tree in the error.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, state_sharding(tree, mesh))
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  leaves = [np.asarray(leaf) for leaf in leaves]
  leaves = [leaf.astype(jax.dtypes.canonicalize_dtype(leaf.dtype), copy=False)
            for leaf in leaves]
  checksums = [[leaf.dtype.str, list(leaf.shape), zlib.crc32(np.ascontiguousarray(leaf))]
               for leaf in leaves]
  gathered = distributed.allgather_json(checksums)
  differing = [i for i, other in enumerate(gathered) if other != gathered[0]]
  if differing:
    raise UserError(f'processes 0 and {", ".join(map(str, differing))} hold different '
                    f'values of {what}; every process must load the same files')
  sharding = replicated_sharding(mesh)
  return jax.tree_util.tree_unflatten(treedef, [
      jax.make_array_from_callback(leaf.shape, sharding, lambda index, leaf=leaf: leaf[index])
      for leaf in leaves])


def global_batch_sizes(config) -> dict:
  """Images per step of each batch array, over all devices: the release's meaning."""
  batch_size = int(config.solver.batch_size)
  if config.stage == 'adversarial':
    if batch_size < 2 or batch_size % 2:
      raise UserError(f'config.solver.batch_size={batch_size}: stage 2 splits the global '
                      'batch into equal source and target halves, so it must be even')
    half = batch_size // 2
    return {'source_image': half, 'source_label': half, 'target_image': half}
  if batch_size < 1:
    raise UserError(f'config.solver.batch_size={batch_size} must be positive')
  return {'image': batch_size, 'label': batch_size}


def local_batch_sizes(config, mesh: Mesh) -> dict:
  """Images of each batch array this process must supply; checks the split is even."""
  sizes = global_batch_sizes(config)
  num_devices = mesh.devices.size
  num_processes = len({d.process_index for d in mesh.devices.flat})
  what = 'each half (source, target) of ' if config.stage == 'adversarial' else ''
  for size in set(sizes.values()):
    if size % num_devices:
      raise UserError(
          f'config.solver.batch_size={config.solver.batch_size}: {what}the global batch '
          f'({size} images) does not split evenly over {num_devices} devices; use a '
          f'multiple of {num_devices * (2 if config.stage == "adversarial" else 1)}')
  return {key: size // num_processes for key, size in sizes.items()}


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """This process's share of a batch (numpy, leading axis = local images) -> global arrays.

  The global array concatenates every process's share in process order.
  """
  sharding = batch_sharding(mesh)
  local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise UserError(f'batch[{key!r}] has {value.shape[0] if value.ndim else 0} images on '
                      f'this process, not a multiple of its {local_devices} devices')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def jit_step(step_fn: Callable, mesh: Mesh, state_shardings: Any,
             compiler_options: Optional[dict] = None) -> Callable:
  """`step_fn(state, batch) -> (state, metrics)` compiled for the mesh.

  State in and out with `state_shardings` (donated: updated in place), the batch split
  along 'data', metrics replicated (every process can read them). `compiler_options`:
  XLA options, e.g. `steps.compiler_options(config)`.
  """
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated_sharding(mesh)),
                 donate_argnums=(0,), compiler_options=compiler_options or None)
