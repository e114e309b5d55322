"""The heads' losses against hand-written PyTorch references of the original's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dynrefer_jax import losses


def _torch_asl(x, y, gamma_neg=7.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
  # The original's AsymmetricLoss (SPEC §7a), written out.
  xs_pos = torch.sigmoid(x)
  xs_neg = (1 - xs_pos + clip).clamp(max=1)
  los = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
  with torch.no_grad():
    pt = xs_pos * y + xs_neg * (1 - y)
    w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
  return -(los * w).sum()


def test_asl_value_and_gradient_match_torch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 11)).astype(np.float32) * 3
  y = (rng.random((4, 11)) < 0.3).astype(np.float32)
  tx = torch.tensor(x, requires_grad=True)
  ref = _torch_asl(tx, torch.tensor(y))
  ref.backward()
  val, grad = jax.value_and_grad(lambda a: losses.asymmetric_loss(a, y))(jnp.asarray(x))
  np.testing.assert_allclose(val, ref.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_asl_mask_drops_rows():
  x = np.array([[2.0, -1.0], [5.0, 5.0]], np.float32)
  y = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
  full = losses.asymmetric_loss(x[:1], y[:1])
  masked = losses.asymmetric_loss(x, y, mask=np.array([True, False]))
  np.testing.assert_allclose(masked, full, rtol=1e-6)


def test_siglip_by_hand():
  l = np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
  # −Σ log σ(y·l) / N with y = +1 on the diagonal.
  ls = lambda v: np.log(1 / (1 + np.exp(-v)))
  expected = -(ls(2.0) + ls(1.0) + ls(-0.5) + ls(3.0)) / 2
  np.testing.assert_allclose(losses.siglip_loss(jnp.asarray(l)), expected, rtol=1e-6)


def test_token_cross_entropy_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(2, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  t_labels = torch.tensor(np.where(mask, labels, -100))
  ref = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 7), t_labels.reshape(-1))
  np.testing.assert_allclose(losses.token_cross_entropy(logits, labels, mask), ref.item(), rtol=1e-6)
