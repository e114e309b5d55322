"""Scaled fp8 (float8_e4m3fn) matmuls for the frozen vision tower (issue 9).

    y = matmul(x, kernel, contract=1, dtype=jnp.bfloat16)    # x float[..., K], kernel float[K, N]

Each operand is scaled by its absolute maximum to e4m3's range (±448) and cast to
`jnp.float8_e4m3fn`: activations per row (one scale per token, over the contracted axes),
weights per output channel (one scale per column), or both per tensor (`per_channel=False`). The
dot runs on the fp8 operands with `preferred_element_type=float32`; the float32 result is
multiplied by the two scales and cast to the compute dtype. On H100/H200 XLA lowers an f8×f8 dot
to a cuBLASLt fp8 GEMM on the fp8 tensor cores (2× the bf16 rate); on a CPU it is emulated with
the same numbers (e4m3 × e4m3 products are exact in float32), which tests/test_fp8.py checks
against a numpy/ml_dtypes reference.

Only the frozen tower uses it: there is no backward here, so `vit_enabled` refuses a trainable
tower.

## In the EVA ViT

`config.model.vit_fp8` (absent = False) names a recipe, read once by `vit_enabled` in
`DynRefer.__init__` and passed to `eva_vit.VisionTransformer(fp8=...)`, whose blocks hand it to
`Attention` and `Mlp` as a plain string attribute: static, so every block has the same graphdef
and the scanned stack (`layers.call_blocks`) still scans. Four matmuls per block go through
`dense(..., recipe=..., role=...)`: qkv, the attention output, MLP fc1 and fc2. The patch
embedding (raw pixels, <1% of the FLOPs), attention scores and attention·V (~3%), the LayerNorms,
`ln_vision` and everything after the tower stay in the compute dtype.

| `vit_fp8`       | qkv, out, fc1      | fc2      | scales (activation, weight)  | H100 fp8 GEMMs |
|-----------------|--------------------|----------|------------------------------|----------------|
| True, "rowwise" | e4m3 × e4m3        | same     | per token, per output column | all four       |
| "per_tensor"    | e4m3 × e4m3        | same     | one each (cuBLASLt epilogue) | all four       |
| "fc2_bf16"      | e4m3 × e4m3        | bf16 [1] | per token, per output column | 3 of 4, ~2/3   |
| "blockwise"     | e4m3 × e4m3        | same     | 1×128 tiles, 128×128 tiles   | no (see below) |
| "weight_only"   | bf16 × e4m3 → bf16 | same     | none, per output column      | none           |

[1] the compute dtype (model.dtype). "blockwise" scales do not factor out of the K-sum: XLA has
no fused kernel for them on Hopper, so they cost float32 partials per K block. "weight_only"
runs as a bf16 GEMM (Hopper's fp8 GEMMs need both operands fp8).

The default (True) is "rowwise": both operands fp8, hence the fp8 GEMM rate, and per-token
activation scales that an outlier token cannot spoil. Measured feature errors against bf16
(BENCHMARKS.md, issue 9; tools/fp8_error.py), random-weight towers, after ln_vision: every
e4m3×e4m3 recipe lands within 0.2 points of the others (rowwise 2.8% on the toy ViT, 4.6% and
6.2% at width 256 and depth 8 and 24, with bf16 itself 0.5%, 0.8%, 1.1% from float32): the
error is e4m3's 3-bit mantissa (relative rounding up to 2^-4 per operand), which no choice of
scales removes; only keeping matmuls out of fp8 lowers it, and not below the issue's 1e-2 (even
"weight_only" is 2.1-5.0%). "blockwise" and "weight_only" are kept to measure that, not for
speed.

Tuning left to the GPU session: a bfloat16 `accum_dtype` halves the GEMM's output bytes (the
float32 output of fc1 is as large as its operands); "per_tensor" lets cuBLASLt apply the scales
in its epilogue, where "rowwise" multiplies the float32 output (time both); the feature error on
the H100 against this CPU emulation's on the same weights (an fp8 GEMM may accumulate less
exactly than float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn; larger values would become NaN (no inf)
BLOCK = 128  # "blockwise": the tile edge along K (and N for weights), DeepSeek-V3's

# model.vit_fp8 → recipe: how each of a ViT block's four matmuls runs (None: compute dtype).
ROLES = ("qkv", "out", "fc1", "fc2")
RECIPES = {
    "rowwise": dict(qkv="rowwise", out="rowwise", fc1="rowwise", fc2="rowwise"),
    "per_tensor": dict(qkv="per_tensor", out="per_tensor", fc1="per_tensor", fc2="per_tensor"),
    "fc2_bf16": dict(qkv="rowwise", out="rowwise", fc1="rowwise", fc2=None),
    "blockwise": dict(qkv="blockwise", out="blockwise", fc1="blockwise", fc2="blockwise"),
    "weight_only": dict(qkv="weight_only", out="weight_only", fc1="weight_only",
                        fc2="weight_only"),
}


def recipe(value) -> str | None:
  """A model.vit_fp8 value → recipe name (True = "rowwise") or None (False/None/"")."""
  if value is None or value is False or value == "":
    return None
  if value is True:
    return "rowwise"
  if value not in RECIPES:
    raise ValueError(f"unknown fp8 recipe {value!r}: False, True or one of {sorted(RECIPES)}")
  return value


def vit_enabled(model_config):
  """config.model.vit_fp8 (default False) → False or the recipe name; refuses fp8 for a
  trainable vision tower."""
  name = recipe(model_config.get("vit_fp8", False))
  if name and model_config.get("train_vision_encoder", False):
    raise ValueError("model.vit_fp8 needs a frozen vision tower (model.train_vision_encoder=False):"
                     " the fp8 matmuls have no backward")
  return name or False


def quantize(x: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
  """Absmax scaling to float8_e4m3fn.

  x: float[...]; axes: the axes each scale covers (None = one scale for the whole tensor).
  Returns (q float8_e4m3fn[x.shape], scale float32 broadcastable to x.shape, size-1 on `axes`)
  with x ≈ q · scale; an all-zero slice gets scale 1.
  """
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
  # amax · (1/448) in float32, spelled out: XLA rewrites a division by a constant into this
  # multiply anyway, and the numpy reference in the tests does the same.
  scale = jnp.where(amax > 0, amax * jnp.float32(1.0 / E4M3_MAX), 1.0)
  # Clip: rounding x / scale can land a hair above 448, which e4m3fn turns into NaN.
  q = jnp.clip(xf / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)
  return q, scale


def matmul(x: jax.Array, kernel: jax.Array, *, contract: int = 1, dtype=None,
           per_channel: bool = True, accum_dtype=jnp.float32) -> jax.Array:
  """x float[..., K1..Kc] · kernel float[K1..Kc, N...] in fp8 → dtype[..., N...].

  contract: how many trailing axes of x meet the leading axes of kernel. Scales: per row of x
  and per output column of kernel (per_channel), else one per tensor. dtype: the output dtype
  (default x.dtype).
  """
  if x.shape[x.ndim - contract:] != kernel.shape[:contract]:
    raise ValueError(f"contracted axes differ: x {x.shape}, kernel {kernel.shape}, "
                     f"contract={contract}")
  x_axes = tuple(range(x.ndim - contract, x.ndim))
  k_axes = tuple(range(contract))
  qx, sx = quantize(x, x_axes if per_channel else None)     # sx [..., 1..1]
  qk, sk = quantize(kernel, k_axes if per_channel else None)  # sk [1..1, N...]
  y = jax.lax.dot_general(qx, qk, ((x_axes, k_axes), ((), ())),
                          preferred_element_type=accum_dtype)
  batch = x.ndim - contract
  sx = sx.reshape(sx.shape[:batch] + (1,) * (kernel.ndim - contract))
  sk = sk.reshape((1,) * batch + sk.shape[contract:])
  y = y.astype(jnp.float32) * sx * sk
  return y.astype(dtype or x.dtype)


def blockwise_matmul(x: jax.Array, kernel: jax.Array, *, contract: int = 1, dtype=None,
                     block: int = BLOCK) -> jax.Array:
  """x float[..., K1..Kc] · kernel float[K1..Kc, N...] with DeepSeek-V3's fp8 block scales →
  dtype[..., N...].

  K = K1·…·Kc is cut into G = ⌈K/block⌉ blocks (zero-padded): x gets one scale per token and K
  block (1×block tiles), the kernel one per block×block tile (N padded too). Such scales do not
  factor out of a K-sum, so each K block's partial product is rescaled on its own: one batched
  f8 dot makes float32[G, M, N] partials (G times the output: a measurement, not a fast path;
  DeepSeek's kernel promotes them in registers instead).
  """
  if x.shape[x.ndim - contract:] != kernel.shape[:contract]:
    raise ValueError(f"contracted axes differ: x {x.shape}, kernel {kernel.shape}, "
                     f"contract={contract}")
  batch_shape, out_shape = x.shape[:x.ndim - contract], kernel.shape[contract:]
  k, n = math.prod(kernel.shape[:contract]), math.prod(out_shape)
  pad_k, pad_n = -k % block, -n % block
  g, nb = (k + pad_k) // block, (n + pad_n) // block
  x2 = jnp.pad(x.reshape(-1, k).astype(jnp.float32), ((0, 0), (0, pad_k)))          # [M, G·b]
  w2 = jnp.pad(kernel.reshape(k, n).astype(jnp.float32), ((0, pad_k), (0, pad_n)))  # [G·b, NB·b]
  qx, sx = quantize(x2.reshape(-1, g, block), (2,))                   # sx [M, G, 1]
  qw, sw = quantize(w2.reshape(g, block, nb, block), (1, 3))          # sw [G, 1, NB, 1]
  qw = qw.reshape(g, block, nb * block)
  partial = jax.lax.dot_general(qx, qw, (((2,), (1,)), ((1,), (0,))),
                                preferred_element_type=jnp.float32)   # [G, M, NB·b]
  sw = jnp.broadcast_to(sw, (g, 1, nb, block)).reshape(g, 1, nb * block)
  y = jnp.sum(partial * jnp.transpose(sx, (1, 0, 2)) * sw, axis=0)[:, :n]
  return y.reshape(batch_shape + out_shape).astype(dtype or x.dtype)


def weight_only(x: jax.Array, kernel: jax.Array, *, contract: int = 1, dtype=None) -> jax.Array:
  """x float[..., K1..Kc] · kernel float[K1..Kc, N...] with the kernel rounded to e4m3 (one
  scale per output column), dequantised to `dtype` and multiplied in `dtype` → dtype[..., N...].

  XLA does not run a mixed bf16 × f8 dot on the fp8 tensor cores (Hopper's fp8 GEMMs need both
  operands fp8): this is a bf16 GEMM with fp8's weight error, kept to measure that error.
  """
  dtype = dtype or x.dtype
  qk, sk = quantize(kernel, tuple(range(contract)))
  return plain_dot(x.astype(dtype), (qk.astype(jnp.float32) * sk).astype(dtype), contract)


def plain_dot(x: jax.Array, kernel: jax.Array, contract: int) -> jax.Array:
  """x[..., K1..Kc] · kernel[K1..Kc, N...] in x's dtype, with the dimension numbers that
  `jnp.einsum` gave the tower's matmuls before fp8 existed ("blhd,hdc->blc" contracts d, then h):
  XLA:CPU's result bits depend on that order, and the disabled path must keep them."""
  x_axes = tuple(range(x.ndim - 1, x.ndim - contract - 1, -1))
  k_axes = tuple(range(contract - 1, -1, -1))
  return jax.lax.dot_general(x, kernel, ((x_axes, k_axes), ((), ())),
                             preferred_element_type=x.dtype)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
          recipe: str | None, role: str = "", contract: int = 1, dtype=None) -> jax.Array:
  """What a ViT matmul calls: the fp8 matmul that `recipe` (a RECIPES name or None) gives
  `role` (one of ROLES), else the plain dot in `dtype`; plus bias.

  x float[..., K1..Kc], kernel float[K1..Kc, N...], bias float[N...] or None → dtype[..., N...]
  (dtype default x.dtype). With recipe None this is exactly the einsum the tower had before.
  """
  dtype = dtype or x.dtype
  how = RECIPES[recipe][role] if recipe else None
  if how in ("rowwise", "per_tensor"):
    y = matmul(x, kernel, contract=contract, dtype=dtype, per_channel=how == "rowwise")
  elif how == "blockwise":
    y = blockwise_matmul(x, kernel, contract=contract, dtype=dtype)
  elif how == "weight_only":
    y = weight_only(x, kernel, contract=contract, dtype=dtype)
  elif how is None:
    y = plain_dot(x.astype(dtype), kernel.astype(dtype), contract)
  else:
    raise ValueError(f"unknown fp8 matmul {how!r}")
  if bias is not None:
    y = y + bias.astype(dtype)
  return y
