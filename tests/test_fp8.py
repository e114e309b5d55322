"""dynrefer_jax/models/fp8.py against a hand-computed reference (quantised with ml_dtypes'
float8_e4m3fn in numpy, dequantised and multiplied in float64), and its wiring into the EVA ViT:
off is bit-identical, on gives fp8 dots for exactly the four matmuls per block, and the features
stay within the measured tolerance of the bf16 tower."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dynrefer_jax import functional
from dynrefer_jax.models import eva_vit, fp8, layers

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
  plain = fp8.dense(x, k, b, recipe=None, dtype=jnp.bfloat16)
  einsum = jnp.einsum("blc,cshd->blshd", x, k) + b
  np.testing.assert_array_equal(np.asarray(plain, np.float32), np.asarray(einsum, np.float32))
  quant = fp8.dense(x, k, b, recipe="rowwise", role="qkv", dtype=jnp.bfloat16)
  assert quant.dtype == jnp.bfloat16 and quant.shape == plain.shape
  assert rel(np.asarray(quant, np.float32), np.asarray(plain, np.float32)) < 5e-2
  # The enabled path really multiplies fp8 operands (what XLA maps to the fp8 tensor cores).
  hlo = jax.jit(lambda a: fp8.dense(a, k, b, recipe="rowwise", role="qkv")).lower(x).as_text()
  assert "dot_general" in hlo and "f8E4M3FN" in hlo
  hlo = jax.jit(lambda a: fp8.dense(a, k, b, recipe=None)).lower(x).as_text()
  assert "f8E4M3FN" not in hlo


def test_plain_dot_is_the_einsum_bit_for_bit():
  """The disabled path keeps the einsums' dimension numbers: same bits on XLA:CPU in float32."""
  rs = np.random.RandomState(5)
  out = jnp.asarray(rs.randn(2, 9, 4, 16), jnp.float32)
  k = jnp.asarray(rs.randn(4, 16, 64), jnp.float32)
  got = jax.jit(lambda a, b: fp8.dense(a, b, contract=2, recipe=None))(out, k)
  want = jax.jit(lambda a, b: jnp.einsum("blhd,hdc->blc", a, b))(out, k)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def reference_blockwise(x, w, block, contract=1) -> np.ndarray:
  """numpy: x per (row, K block), w per (K block, N block) tile, dequantised, float64 product."""
  k = int(np.prod(w.shape[:contract]))
  x2 = x.reshape(-1, k).astype(np.float32)
  w2 = w.reshape(k, -1).astype(np.float32)
  dx, dw = np.zeros(x2.shape), np.zeros(w2.shape)
  for k0 in range(0, k, block):
    q, s = reference_quantize(x2[:, k0:k0 + block], (1,))
    dx[:, k0:k0 + block] = q.astype(np.float64) * s
    for n0 in range(0, w2.shape[1], block):
      q, s = reference_quantize(w2[k0:k0 + block, n0:n0 + block], None)
      dw[k0:k0 + block, n0:n0 + block] = q.astype(np.float64) * s
  return (dx @ dw).reshape(x.shape[:x.ndim - contract] + w.shape[contract:])


@pytest.mark.parametrize("contract", [1, 2])
def test_blockwise_matches_hand_reference(contract):
  """Tiles of 16 on K = 40 and N = 24: ragged last blocks (zero padding must not change the
  scales), one scale per 1×16 activation tile and per 16×16 weight tile."""
  rs = np.random.RandomState(6)
  x = (rs.randn(3, 5, 40) * rs.uniform(0.01, 3.0, (1, 1, 40))).astype(np.float32)
  w = (rs.randn(40, 24) * rs.uniform(0.01, 2.0, (40, 1))).astype(np.float32)
  if contract == 2:
    x, w = x.reshape(3, 5, 4, 10), w.reshape(4, 10, 24)
  y = jax.jit(lambda a, b: fp8.blockwise_matmul(a, b, contract=contract, block=16,
                                                dtype=jnp.float32))(x, w)
  ref = reference_blockwise(x, w, 16, contract)
  assert y.shape == (3, 5, 24)
  assert rel(y, ref) < 1e-6


def test_weight_only_rounds_the_weights_and_multiplies_in_the_compute_dtype():
  rs = np.random.RandomState(7)
  x = rs.randn(4, 6, 32).astype(np.float32)
  w = (rs.randn(32, 16) * rs.uniform(0.01, 2.0, (1, 16))).astype(np.float32)
  y = jax.jit(lambda a, b: fp8.weight_only(a, b, dtype=jnp.float32))(x, w)
  qw, sw = reference_quantize(w, (0,))
  ref = np.tensordot(x.astype(np.float64), qw.astype(np.float64) * sw, axes=(2, 0))
  assert rel(y, ref) < 1e-6
  # No dot has an fp8 operand: this recipe cannot use the fp8 tensor cores.
  hlo = jax.jit(lambda a, b: fp8.weight_only(a, b, dtype=jnp.bfloat16)).lower(x, w).as_text()
  assert "f8E4M3FN" in hlo
  assert not [line for line in hlo.splitlines() if "dot_general" in line and "f8E4M3FN" in line]


def test_recipe_names():
  assert fp8.recipe(False) is None and fp8.recipe(None) is None and fp8.recipe("") is None
  assert fp8.recipe(True) == "rowwise"
  for name in fp8.RECIPES:
    assert fp8.recipe(name) == name
    assert set(fp8.RECIPES[name]) == set(fp8.ROLES)
  with pytest.raises(ValueError, match="unknown fp8 recipe"):
    fp8.recipe("e5m2")


def test_vit_enabled_reads_the_flag_and_refuses_a_trainable_tower():
  import ml_collections  # pylint: disable=import-outside-toplevel
  m = ml_collections.ConfigDict(dict(train_vision_encoder=False))
  assert fp8.vit_enabled(m) is False
  m.vit_fp8 = True
  assert fp8.vit_enabled(m) == "rowwise"
  with m.ignore_type():
    m.vit_fp8 = "fc2_bf16"
  assert fp8.vit_enabled(m) == "fc2_bf16"
  m.train_vision_encoder = True
  with pytest.raises(ValueError, match="frozen vision tower"):
    fp8.vit_enabled(m)


def test_mismatched_contraction_is_an_error():
  with pytest.raises(ValueError, match="contracted axes differ"):
    fp8.matmul(jnp.ones((2, 8)), jnp.ones((4, 3)))


# ------------------------------------------------------------------------------ the EVA ViT

# configs/synthetic.py:smoke's tower (4×4 patches of a 32-px view, 17 tokens).
TOY_VIT = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
               qkv_bias="qv", act="gelu", ln_eps=1e-6, pos_init="sincos2d")


def tower(seed=0, **kw):
  """(graphdef, params rounded to bf16 as the frozen tower is stored) of a toy ViT."""
  model = eva_vit.VisionTransformer(**{**TOY_VIT, **kw}, rngs=nnx.Rngs(seed))
  graphdef, params, _ = functional.split(model)
  return graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)


def forward(graphdef, params, images):
  return np.asarray(jax.jit(lambda p, x: functional.merge(graphdef, p)(x))(params, images)
                    .astype(jnp.float32))


def einsum_forward(graphdef, params, images):
  """The unrolled tower as written before fp8 existed: the four matmuls as jnp.einsum / the
  Dense layers, the rest through the same modules."""
  def run(params, images):
    vit = functional.merge(graphdef, params)
    x = vit.embed(images)
    for block in vit.blocks:
      a = block.attn
      dtype = a.dtype or x.dtype
      h = block.norm1(x)
      qkv = jnp.einsum("blc,cshd->blshd", h.astype(dtype), a.qkv_kernel[...].astype(dtype))
      q = qkv[:, :, 0] + a.q_bias[...].astype(dtype)
      v = qkv[:, :, 2] + a.v_bias[...].astype(dtype)
      out = layers.dot_product_attention(q, qkv[:, :, 1], v)
      y = jnp.einsum("blhd,hdc->blc", out, a.out_kernel[...].astype(dtype))
      x = x + (y + a.out_bias[...].astype(dtype)).astype(x.dtype)
      mlp = block.mlp
      x = x + mlp.fc2(mlp.act(mlp.fc1(block.norm2(x)))).astype(x.dtype)
    return x
  return np.asarray(jax.jit(run)(params, images).astype(jnp.float32))


def ln(x):
  """ln_vision at init (unit scale, zero bias), float64."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5)


def f8_dot_outputs(hlo: str) -> list[str]:
  """The result shapes ("2x17x32") of the dots whose operands are fp8, in program order."""
  lines = [line for line in hlo.splitlines() if "dot_general" in line and "f8E4M3FN" in line]
  return [re.search(r"-> tensor<([0-9x]+)x[a-z0-9]+>", line).group(1) for line in lines]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scan", [False, True])
def test_vit_fp8_off_is_bit_identical(dtype, scan):
  """vit_fp8 False: the same graphdef, parameters and output bits as a tower built without the
  flag, and (unrolled) as the einsums the tower had before the wiring."""
  images = jax.random.normal(jax.random.key(3), (6, 32, 32, 3))
  g0, p0 = tower(dtype=dtype, scan_layers=scan)
  g1, p1 = tower(dtype=dtype, scan_layers=scan, fp8=False)
  assert g0 == g1
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  out = forward(g1, p1, images)
  np.testing.assert_array_equal(out, forward(g0, p0, images))
  if not scan:
    np.testing.assert_array_equal(out, einsum_forward(g0, p0, images))
  assert "f8E4M3FN" not in jax.jit(lambda p, x: functional.merge(g1, p)(x)).lower(
      p1, images).as_text()


@pytest.mark.parametrize("recipe,per_block", [("rowwise", 4), ("per_tensor", 4), ("blockwise", 4),
                                              ("fc2_bf16", 3), ("weight_only", 0)])
def test_vit_fp8_lowers_f8_dots_for_the_four_matmuls_of_each_block(recipe, per_block):
  """Exactly qkv, attention output, fc1, fc2 get fp8 operands (patch embedding, scores and
  attention·V do not), in every block; the recipe is static, so all blocks share one graphdef
  and the scanned stack is one loop holding one block's f8 dots."""
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.bfloat16)
  lower = lambda g, p: jax.jit(lambda p, x: functional.merge(g, p)(x)).lower(p, images).as_text()
  graphdef, params = tower(depth=3, fp8=recipe, dtype=jnp.bfloat16)
  hlo = lower(graphdef, params)
  outputs = f8_dot_outputs(hlo)
  assert len(outputs) == 3 * per_block
  assert sum("dot_general" in line for line in hlo.splitlines()) == 1 + 3 * 6
  if recipe == "rowwise":  # [B, L, 3, H, D], [B, L, C], [B, L, mlp], [B, L, C] per block
    assert outputs == ["2x17x3x4x8", "2x17x32", "2x17x64", "2x17x32"] * 3
  model = functional.merge(graphdef, params)
  assert layers._period(model.blocks) == 1  # pylint: disable=protected-access
  graphdef, params = tower(depth=3, fp8=recipe, dtype=jnp.bfloat16, scan_layers=True)
  hlo = lower(graphdef, params)
  assert hlo.count("stablehlo.while") == 1
  assert len(f8_dot_outputs(hlo)) == per_block


@pytest.mark.parametrize("scan", [False, True])
def test_vit_fp8_features_are_within_the_measured_tolerance_of_bf16(scan):
  """The default recipe against the bf16 tower on the same bf16 weights and images, after
  ln_vision. Measured here over seeds 0-5: 2.3-2.8% relative error (Frobenius), worst token
  6-9%; bf16 itself is 0.5% from float32 (BENCHMARKS.md, issue 9). The bounds, 4.5% and 15%,
  are ~1.6× the worst seen; the lower bound (4× bf16's own error) shows fp8 arithmetic at work.
  The issue's 1e-2 is not met by any fp8 recipe on random weights (tools/fp8_error.py)."""
  images = jax.random.normal(jax.random.key(100), (24, 32, 32, 3))
  bf16 = ln(forward(*tower(dtype=jnp.bfloat16, scan_layers=scan), images))
  f32 = ln(forward(*tower(dtype=jnp.float32, scan_layers=scan), images))
  q = ln(forward(*tower(dtype=jnp.bfloat16, scan_layers=scan, fp8=True), images))
  token = np.linalg.norm(q - bf16, axis=-1) / np.linalg.norm(bf16, axis=-1)
  assert 2e-2 < rel(q, bf16) < 4.5e-2, rel(q, bf16)
  assert token.max() < 0.15, token.max()
  assert rel(bf16, f32) < 1e-2


def test_fp8_error_tool_reports_the_three_comparisons():
  """tools/fp8_error.py on the toy tower: bf16 against float32, each recipe against both."""
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
  import fp8_error  # pylint: disable=import-outside-toplevel
  records = list(fp8_error.measure("toy", ["rowwise", "attn_only"]))
  assert [r["recipe"] for r in records] == ["bf16", "rowwise", "attn_only"]
  assert set(records[0]) >= {"vs_f32"} and "vs_bf16" not in records[0]
  keys = {"rel_ln", "worst_token_ln", "rel_raw", "cos_dist_ln"}
  for r in records[1:]:
    assert set(r["vs_bf16"]) == keys and set(r["vs_f32"]) == keys
    assert r["vs_bf16"]["rel_ln"] <= r["vs_bf16"]["worst_token_ln"]
  bf16, rowwise, attn_only = (r.get("vs_bf16", r["vs_f32"])["rel_ln"] for r in records)
  assert bf16 < 1e-2 < attn_only < rowwise < 4.5e-2
  table = fp8_error.markdown(records)
  assert table.count("\n| toy |") == 3
