"""The FADA losses against torch's definitions of the same quantities."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fada_jax import losses
from fada_jax.models import conv_dispatch


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_cross_entropy_matches_torch_with_ignored_pixels():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (2, 5, 7)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.3] = 255
  expected = torch.nn.CrossEntropyLoss(ignore_index=255)(
      _nchw(logits), torch.from_numpy(labels.astype(np.int64)))
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)


def test_cross_entropy_gradient_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((1, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (1, 3, 4)).astype(np.int32)
  labels[0, 0, :2] = 255
  torch_logits = _nchw(logits).requires_grad_()
  torch.nn.CrossEntropyLoss(ignore_index=255)(
      torch_logits, torch.from_numpy(labels.astype(np.int64))).backward()
  grad = jax.grad(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2),
                             torch_logits.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_all_ignored_is_zero_not_nan():
  logits = jnp.ones((1, 2, 2, 3))
  labels = jnp.full((1, 2, 2), 255, jnp.uint8)
  value, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
  assert float(value) == 0.0
  assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).sum()) == 0.0


def test_soft_cross_entropy_matches_release_formula():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
  soft = rng.random((2, 3, 4, 6)).astype(np.float32)
  expected = torch.mean(torch.sum(-_nchw(soft) * F.log_softmax(_nchw(logits), dim=1), dim=1))
  got = losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(soft))
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)


@pytest.mark.parametrize("matmul_convs", [False, True])
def test_soft_cross_entropy_value_gradient_and_form_follow_the_dispatcher(matmul_convs):
  # With the CPU product forms on, the class sum is a product with ones (XLA:CPU's
  # reduce-window of a full multiply-and-sum is slow); without them, a plain sum.
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((1, 5, 7, 38)).astype(np.float32) * 3
  soft = np.minimum(rng.dirichlet(np.ones(19), (1, 5, 7)), 0.9).astype(np.float32)
  soft = np.concatenate([soft, np.zeros_like(soft)], axis=-1)
  torch_logits = torch.tensor(_nchw(logits).numpy(), dtype=torch.float64, requires_grad=True)
  expected = torch.mean(torch.sum(-_nchw(soft).double() * F.log_softmax(torch_logits, dim=1),
                                  dim=1))
  expected.backward()

  def loss(x):
    with conv_dispatch.use_matmul_convs(matmul_convs):
      return losses.soft_cross_entropy(x, jnp.asarray(soft))

  value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
  np.testing.assert_allclose(float(value), float(expected.detach()), rtol=1e-6)
  # Per-element bound: float32 rounding of softmax terms, scaled by the largest gradient.
  expected_grad = torch_logits.grad.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(grad), expected_grad,
                             atol=1e-6 * np.abs(expected_grad).max(), rtol=0)
  jaxpr = str(jax.make_jaxpr(loss)(jnp.asarray(logits)))
  assert ("dot_general" in jaxpr) == matmul_convs


def test_soft_labels_clip_without_renormalising_and_stop_gradient():
  logits = jnp.asarray([[[[8.0, 0.0, 0.0], [0.1, 0.2, 0.3]]]])
  soft = losses.soft_labels(logits, 0.9)
  probs = jax.nn.softmax(logits, axis=-1)
  assert float(soft[0, 0, 0, 0]) == pytest.approx(0.9)          # clipped
  assert float(jnp.sum(soft[0, 0, 0])) < 0.95                   # not renormalised
  np.testing.assert_allclose(np.asarray(soft[0, 0, 1]), np.asarray(probs[0, 0, 1]), rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(losses.soft_labels(x, 0.9) * x))(logits)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(soft), rtol=1e-6)  # no grad through


def test_domain_encodings_put_the_distribution_in_the_right_half():
  soft = jnp.asarray([[[[0.2, 0.8]]]])
  np.testing.assert_allclose(np.asarray(losses.source_domain_encoding(soft)),
                                [[[[0.2, 0.8, 0.0, 0.0]]]], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(losses.target_domain_encoding(soft)),
                                [[[[0.0, 0.0, 0.2, 0.8]]]], rtol=1e-7)


def test_cross_entropy_gradient_compiles_without_gather_or_scatter():
  # A gather's gradient is a scatter-add: atomics, so non-deterministic, on GPUs.
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 5, (2, 3, 4)), jnp.uint8)
  hlo = jax.jit(jax.grad(losses.cross_entropy)).lower(
      jnp.zeros((2, 3, 4, 5)), labels).compile().as_text()
  assert not re.findall(r"\s(?:gather|scatter)\(", hlo)
