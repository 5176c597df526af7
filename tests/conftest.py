"""Test-wide setup: four simulated CPU devices, a compilation cache, quiet torch threads."""

import os
import tempfile

import pytest

# Compiling is most of what this suite spends (many small programs, each run a few times).
# LLVM at -O0 compiles them 30-40 % faster and runs them slower (the tiny stage-2 step of
# the subprocess runs: 0.32 s instead of 0.03 s), which the suite's few steps afford.
# XLA's HLO passes still run as they do for users, so the tests check the same HLO
# programs, in machine code that may round differently (FMA contraction, vectorisation).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small networks, in this process and in subprocesses
# (multi-process and resume runs): a shared persistent cache compiles each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "fada_jax_tests_jax_cache"))

import jax  # noqa: E402  (must follow the XLA_FLAGS above)

jax.config.update("jax_default_matmul_precision", "highest")

try:
  import torch  # noqa: E402

  torch.set_num_threads(2)
except ImportError:  # torch is only needed by the parity tests
  pass


@pytest.fixture(scope="session")
def cache_dir():
  """The compilation cache that subprocess runs share with this process."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


# The files that take longest first: the README's `-n 2 --dist loadfile` hands whole files
# to the two workers in collection order (setup.cfg turns off xdist's reordering by test
# count), first and third to one worker, second and fourth to the other, so both finish
# together instead of one taking a long file last while the other waits. The training runs
# in subprocesses (test_loop, then test_multihost, test_validation, ...) share compiled
# programs through the persistent cache: they queue behind one another on one worker while
# the other compiles ResNet-50s, rather than compiling the same programs at once.
SLOW_FILES_FIRST = ('test_steps.py', 'test_loop.py', 'test_resnet_scan.py',
                    'test_multihost.py', 'test_validation.py', 'test_pipeline_e2e.py',
                    'test_gpu_check.py', 'test_evaluate.py', 'test_models.py', 'test_hlo.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
