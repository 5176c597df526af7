"""The losses of FADA's three stages, on NHWC logits.

All losses compute in float32 whatever the network's compute dtype, and reduce to a
scalar over the whole (global) batch: under `jit` with a batch sharded over devices the
means below are global means, so one device and N devices give the same loss.
"""

import jax
import jax.numpy as jnp

from fada_jax.constants import IGNORE_LABEL
from fada_jax.models import conv_dispatch


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """torch's `CrossEntropyLoss(ignore_index=255)`: mean over the non-ignored pixels.

  Args:
    logits: [N, H, W, K] unnormalised scores.
    labels: [N, H, W] integer train ids; `ignore_label` pixels do not count.
  Returns:
    A float32 scalar; 0 (not NaN) when every pixel is ignored, where torch gives NaN.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_label
  # Ignored pixels may hold 255 >= K: point them at class 0 and mask them out after.
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  # The label's log-probability by compare-and-select, not take_along_axis: a gather's
  # gradient is a scatter-add, which GPUs run with atomics (non-deterministic). The sum
  # adds exact zeros to the one selected value, so the value is unchanged.
  classes = jnp.arange(log_probs.shape[-1], dtype=jnp.int32)
  picked = jnp.sum(jnp.where(safe_labels[..., None] == classes, log_probs, 0.0), axis=-1)
  losses = jnp.where(valid, -picked, 0.0)
  count = jnp.sum(valid).astype(jnp.float32)
  return jnp.sum(losses) / jnp.maximum(count, 1.0)


def soft_cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
  """The release's `soft_label_cross_entropy`: mean over pixels of sum_c -q_c log_softmax(d)_c.

  Args:
    logits: [N, H, W, C] scores (the discriminator's 2K channels).
    soft_labels: [N, H, W, C] targets; not renormalised (FADA clips them at 0.9).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_pixel = conv_dispatch.last_axis_sum(-soft_labels.astype(jnp.float32) * log_probs)
  return jnp.mean(per_pixel)


def soft_labels(logits: jax.Array, maximum: float) -> jax.Array:
  """Stop-gradient softmax over classes, every value above `maximum` set to it (no renorm)."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits.astype(jnp.float32)), axis=-1)
  return jnp.minimum(probs, maximum)


def source_domain_encoding(soft: jax.Array) -> jax.Array:
  """[a, 0]: the class distribution in the discriminator's source half, zeros in its target half."""
  return jnp.concatenate([soft, jnp.zeros_like(soft)], axis=-1)


def target_domain_encoding(soft: jax.Array) -> jax.Array:
  """[0, a]: zeros in the discriminator's source half, the class distribution in its target half."""
  return jnp.concatenate([jnp.zeros_like(soft), soft], axis=-1)
