"""Test-wide setup: four simulated CPU devices, float32 matmuls, quiet torch threads."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA_FLAGS above)

jax.config.update("jax_default_matmul_precision", "highest")

try:
  import torch  # noqa: E402

  torch.set_num_threads(2)
except ImportError:  # torch is only needed by the parity tests
  pass
