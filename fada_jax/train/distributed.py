"""Multi-host start-up: `jax.distributed.initialize` and a check that all processes agree.

One process (the default) needs nothing. Several processes, one per host (or several per
host on CPU), are joined either by the flags

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I

given identically (except `process_id`) to every process, or by a cluster environment
that jax recognises on its own (SLURM `srun`, Open MPI `mpirun`, `JAX_COORDINATOR_ADDRESS`
with `JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`). On CPU the cross-process collectives use gloo.
"""

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from fada_jax.errors import UserError

# Environments in which `jax.distributed.initialize()` finds its arguments by itself,
# each with the variable that holds the process count there.
_CLUSTER_ENVS = (
    ('SLURM', ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID'), 'SLURM_NTASKS'),
    ('Open MPI', ('OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_RANK'), 'OMPI_COMM_WORLD_SIZE'),
)

_initialized = False


def _detected_cluster() -> str | None:
  """Name of a multi-process cluster environment jax can join by itself, else None.

  A SLURM allocation running a single task is not a multi-process run: initialising
  the distributed runtime there would only add a coordinator to wait for.
  """
  for name, required, count_var in _CLUSTER_ENVS:
    if all(var in os.environ for var in required):
      try:
        count = int(os.environ.get(count_var, '1'))
      except ValueError:
        count = 1
      if count > 1:
        return name
  return None


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'--coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.1:1234')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins the processes of a multi-host run; a no-op for a single process.

  With none of the three flags, joins only when a cluster environment with several
  processes is detected. With some of them, all three must be given and consistent
  (`0 <= process_id < num_processes`); `num_processes=1` runs alone.
  """
  global _initialized
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if all(v is None for v in given.values()):
    cluster = _detected_cluster()
    if cluster is None or _initialized:
      return
    try:
      jax.distributed.initialize(initialization_timeout=timeout_s)
    except (RuntimeError, ValueError) as e:
      raise UserError(f'cannot join the {cluster} job\'s processes: '
                      f'{str(e).strip().splitlines()[0]}') from None
    _initialized = True
    return

  missing = [f'--{name}' for name, value in given.items() if value is None]
  if missing:
    raise UserError(f'multi-host runs need --coordinator_address, --num_processes and '
                    f'--process_id together; missing {", ".join(missing)}')
  _check_address(coordinator_address)
  if num_processes < 1:
    raise UserError(f'--num_processes={num_processes} must be at least 1')
  if not 0 <= process_id < num_processes:
    raise UserError(f'--process_id={process_id} must be in [0, {num_processes - 1}] '
                    f'for --num_processes={num_processes}')
  if num_processes == 1 or _initialized:
    return
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
  except (RuntimeError, ValueError) as e:
    # e.g. the coordinator did not come up, or a port already in use.
    raise UserError(f'cannot join the processes at {coordinator_address} as process '
                    f'{process_id} of {num_processes}: '
                    f'{str(e).strip().splitlines()[0]}') from None
  _initialized = True


def config_fingerprint(config) -> str:
  """A short hash of everything in the config (sorted JSON)."""
  text = config.to_json(sort_keys=True) if hasattr(config, 'to_json') else repr(config)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(config, extra: str = '') -> None:
  """Fails on every process, with a UserError, unless all processes run the same config.

  Called before anything whose shapes depend on the config: processes with different
  batch sizes or networks would otherwise block forever in their first collective. The
  fingerprints are exchanged with one fixed-size all-gather, which cannot itself hang
  on a mismatch.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  digest = hashlib.sha256((config_fingerprint(config) + extra).encode()).digest()
  local = np.frombuffer(digest[:16], dtype=np.uint32).copy()
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, 4]
  differing = [i for i in range(gathered.shape[0]) if not np.array_equal(gathered[i], gathered[0])]
  if differing:
    raise UserError(
        f'the {jax.process_count()} processes were started with different configs or '
        f'workdirs (process {jax.process_index()} holds {config_fingerprint(config)}; '
        f'processes {", ".join(map(str, differing))} differ from process 0): give every '
        'process the same --config, overrides and --workdir')


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
  return jax.process_index() == 0


def allgather_json(obj: Any) -> list:
  """[obj of process 0, obj of process 1, ...]: a JSON-serialisable value from every process."""
  encoded = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8)
  if jax.process_count() == 1:
    return [json.loads(encoded.tobytes().decode())]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int32)))
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(gathered[i, :int(lengths[i, 0])].tobytes().decode())
          for i in range(gathered.shape[0])]
