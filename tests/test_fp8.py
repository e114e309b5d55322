"""dynrefer_jax/models/fp8.py against a hand-computed reference: quantised with ml_dtypes'
float8_e4m3fn in numpy, dequantised and multiplied in float64."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dynrefer_jax.models import fp8

E4M3 = ml_dtypes.float8_e4m3fn


def reference_quantize(x: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
  """numpy: absmax · (1/448) per slice (float32, as the JAX code), cast with ml_dtypes."""
  x = np.asarray(x, np.float32)
  amax = np.max(np.abs(x), axis=axes, keepdims=True)
  scale = np.where(amax > 0, amax * np.float32(1.0 / 448.0), np.float32(1.0)).astype(np.float32)
  q = np.clip(x / scale, -448.0, 448.0).astype(np.float32).astype(E4M3)
  return q, scale


def reference_matmul(x, w, contract=1, per_channel=True) -> np.ndarray:
  """Dequantised operands multiplied in float64."""
  x_axes = tuple(range(x.ndim - contract, x.ndim))
  w_axes = tuple(range(contract))
  qx, sx = reference_quantize(x, x_axes if per_channel else None)
  qw, sw = reference_quantize(w, w_axes if per_channel else None)
  dx = qx.astype(np.float64) * sx
  dw = qw.astype(np.float64) * sw
  return np.tensordot(dx, dw, axes=(x_axes, w_axes))


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("axes", [(1,), (0,), None])
def test_quantize_matches_ml_dtypes(axes):
  rs = np.random.RandomState(0)
  # Several decades of magnitude: normal and subnormal e4m3 values, and an exact zero row.
  x = (rs.randn(16, 64) * 10.0 ** rs.uniform(-4, 2, (16, 1))).astype(np.float32)
  x[3] = 0.0
  q, s = jax.jit(lambda v: fp8.quantize(v, axes))(x)
  q_ref, s_ref = reference_quantize(x, axes)
  assert q.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(s), s_ref)
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))
  assert np.all(np.isfinite(np.asarray(q, np.float32)))
  # The largest |x| of each slice lands on ±448 (the zero row stays 0).
  expected = np.where(np.max(np.abs(x), axis=axes) > 0, 448.0, 0.0)
  np.testing.assert_array_equal(np.max(np.abs(np.asarray(q, np.float32)), axis=axes), expected)


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_matches_hand_reference(per_channel):
  rs = np.random.RandomState(1)
  x = rs.randn(2, 24, 96).astype(np.float32)
  x[0, 5] = 0.0  # an all-zero token: scale 1, output row exactly 0
  w = (rs.randn(96, 48) * rs.uniform(0.01, 2.0, (1, 48))).astype(np.float32)
  y = jax.jit(lambda a, b: fp8.matmul(a, b, per_channel=per_channel, dtype=jnp.float32))(x, w)
  ref = reference_matmul(x, w, per_channel=per_channel)
  assert y.shape == (2, 24, 48) and y.dtype == jnp.float32
  # Only float32 accumulation and rescaling separate the two: products of e4m3 are exact.
  assert rel(y, ref) < 1e-6
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  np.testing.assert_array_equal(np.asarray(y)[0, 5], 0.0)


def test_matmul_contracts_two_axes_like_the_attention_output():
  """The ViT's attention output: out[B, L, H, D] · out_kernel[H, D, C]; and qkv: x[B, L, C] ·
  qkv_kernel[C, 3, H, D] → [B, L, 3, H, D]."""
  rs = np.random.RandomState(2)
  out = rs.randn(2, 10, 4, 16).astype(np.float32)
  k_out = rs.randn(4, 16, 32).astype(np.float32) * 0.1
  y = fp8.matmul(out, k_out, contract=2, dtype=jnp.float32)
  assert y.shape == (2, 10, 32)
  assert rel(y, reference_matmul(out, k_out, contract=2)) < 1e-6
  x = rs.randn(2, 10, 32).astype(np.float32)
  k_qkv = rs.randn(32, 3, 4, 16).astype(np.float32) * 0.1
  y = fp8.matmul(x, k_qkv, contract=1, dtype=jnp.float32)
  assert y.shape == (2, 10, 3, 4, 16)
  assert rel(y, reference_matmul(x, k_qkv)) < 1e-6


def test_fp8_error_against_bf16_and_f32_matmuls_is_small():
  """On random inputs fp8 (3 mantissa bits, unit roundoff 2^-4) stays within a few percent of the
  exact product; bf16 (unit roundoff 2^-8) within a few tenths of a percent."""
  rs = np.random.RandomState(3)
  x = rs.randn(256, 512).astype(np.float32)
  w = (rs.randn(512, 384) / np.sqrt(512)).astype(np.float32)
  exact = x.astype(np.float64) @ w.astype(np.float64)
  y8 = fp8.matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), dtype=jnp.float32)
  y16 = jnp.dot(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
                preferred_element_type=jnp.float32)
  y32 = jnp.dot(x, w, precision="highest")
  e8, e16, e32 = rel(y8, exact), rel(y16, exact), rel(y32, exact)
  assert e32 < 1e-5
  assert e16 < 1e-2
  # Each product carries at most ~2·2^-4 relative error, and the errors average out over K.
  assert 1e-3 < e8 < 5e-2, e8
  assert rel(y8, y16) < 5e-2


def test_dense_disabled_is_the_plain_dot_and_enabled_is_fp8():
  rs = np.random.RandomState(4)
  x = jnp.asarray(rs.randn(3, 7, 32), jnp.bfloat16)
  k = jnp.asarray(rs.randn(32, 3, 2, 8) * 0.1, jnp.bfloat16)
  b = jnp.asarray(rs.randn(3, 2, 8), jnp.bfloat16)
  plain = fp8.dense(x, k, b, enabled=False, dtype=jnp.bfloat16)
  einsum = jnp.einsum("blc,cshd->blshd", x, k) + b
  np.testing.assert_array_equal(np.asarray(plain, np.float32), np.asarray(einsum, np.float32))
  quant = fp8.dense(x, k, b, enabled=True, dtype=jnp.bfloat16)
  assert quant.dtype == jnp.bfloat16 and quant.shape == plain.shape
  assert rel(np.asarray(quant, np.float32), np.asarray(plain, np.float32)) < 5e-2
  # The enabled path really multiplies fp8 operands (what XLA maps to the fp8 tensor cores).
  hlo = jax.jit(lambda a: fp8.dense(a, k, b, enabled=True)).lower(x).as_text()
  assert "dot_general" in hlo and "f8E4M3FN" in hlo
  hlo = jax.jit(lambda a: fp8.dense(a, k, b, enabled=False)).lower(x).as_text()
  assert "f8E4M3FN" not in hlo


def test_vit_enabled_reads_the_flag_and_refuses_a_trainable_tower():
  import ml_collections  # pylint: disable=import-outside-toplevel
  m = ml_collections.ConfigDict(dict(train_vision_encoder=False))
  assert fp8.vit_enabled(m) is False
  m.vit_fp8 = True
  assert fp8.vit_enabled(m) is True
  m.train_vision_encoder = True
  with pytest.raises(ValueError, match="frozen vision tower"):
    fp8.vit_enabled(m)


def test_mismatched_contraction_is_an_error():
  with pytest.raises(ValueError, match="contracted axes differ"):
    fp8.matmul(jnp.ones((2, 8)), jnp.ones((4, 3)))
