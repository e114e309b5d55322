"""The three heads' losses (SPEC §7a, §7b, §7c)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def asymmetric_loss(logits: jax.Array, targets: jax.Array, *, gamma_neg: float = 7.0,
                    gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8,
                    mask: jax.Array | None = None) -> jax.Array:
  """AsymmetricLoss, summed (not averaged) over batch × tags, as the original.

  logits, targets: float[B, K]; mask: optional bool[B] (padding rows contribute nothing).
  L = −Σ [ y·log(max(p, eps)) + (1−y)·log(max(p_neg, eps)) ] · w, with p = σ(x),
  p_neg = min(1 − p + clip, 1) and the focusing weight w = (1 − p_t)^γ computed without gradient.
  """
  logits = logits.astype(jnp.float32)
  y = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  p_neg = jnp.minimum(1.0 - p + clip, 1.0) if clip > 0 else 1.0 - p
  loss = y * jnp.log(jnp.maximum(p, eps)) + (1 - y) * jnp.log(jnp.maximum(p_neg, eps))
  pt = p * y + p_neg * (1 - y)
  gamma = gamma_pos * y + gamma_neg * (1 - y)
  weight = jax.lax.stop_gradient(jnp.power(1.0 - pt, gamma))
  loss = loss * weight
  if mask is not None:
    loss = loss * mask[:, None].astype(loss.dtype)
  return -loss.sum()


def siglip_loss(logits: jax.Array, mask: jax.Array | None = None,
                labels: jax.Array | None = None, weights: jax.Array | None = None) -> jax.Array:
  """One direction of the sigmoid loss: rows are queries, the positive is the diagonal.

  logits: float[N, M] (already scaled by exp(t) and shifted by b). Returns −Σ w·log σ(y·l) / N,
  with y = +1 on the diagonal, −1 elsewhere (the original), or y = 2·labels − 1 when `labels`
  (bool[N, M], several positives per row allowed) is given; `weights` (float[N, M]) zeroes
  ignored pairs. `mask` (bool[N], N = M) drops padding rows and columns; N counts valid rows.
  """
  n = logits.shape[0]
  if labels is None:
    labels = jnp.eye(n, logits.shape[1], dtype=bool)
  y = 2.0 * labels.astype(jnp.float32) - 1.0
  terms = jax.nn.log_sigmoid(y * logits.astype(jnp.float32))
  if weights is not None:
    terms = terms * weights.astype(jnp.float32)
  if mask is None:
    return -terms.sum() / n
  m = mask.astype(jnp.float32)
  terms = terms * m[:, None] * m[None, :]
  return -terms.sum() / jnp.maximum(m.sum(), 1.0)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
  """Token-mean cross-entropy over positions where label_mask is True (HF's −100 = ignore)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = label_mask.astype(jnp.float32)
  return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)
