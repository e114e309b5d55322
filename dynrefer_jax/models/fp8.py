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

## Wiring into the EVA ViT (pending: eva_vit.py and layers.py are being restructured)

The flag is `config.model.vit_fp8` (absent = False), read once with `vit_enabled(config.model)`.
After the restructuring lands, wire it as follows; nothing else changes:

1. `models/dynrefer.py`, `DynRefer.__init__`: build the tower with
   `eva_vit.VisionTransformer(**vit, fp8=fp8.vit_enabled(c), dtype=dtype, rngs=rngs)`.
2. `models/eva_vit.py`: `VisionTransformer(..., fp8: bool = False)` passes `fp8` to every
   `Block`, which passes it to its `Attention` and `Mlp` (stored as a plain Python bool, so it is
   static in the graphdef). Four matmuls per block switch, each through `fp8.dense(...)` with
   `enabled=self.fp8` (which is the plain bf16 dot when False, so one code path serves both):
   - qkv: `jnp.einsum("blc,cshd->blshd", x, qkv_kernel)` →
     `fp8.dense(x, self.qkv_kernel[...], contract=1, enabled=self.fp8, dtype=dtype)`
     (`qkv_kernel[C, 3, H, D]`; the result is `[B, L, 3, H, D]` as before; biases unchanged);
   - attention output: `jnp.einsum("blhd,hdc->blc", out, out_kernel)` →
     `fp8.dense(out, self.out_kernel[...], contract=2, enabled=self.fp8, dtype=dtype)`
     (`out_kernel[H, D, C]`, contracting heads and head_dim);
   - MLP fc1 and fc2 (`layers.Dense` kernels `[C, mlp]`, `[mlp, C]`):
     `fp8.dense(x, fc.kernel[...], fc.bias[...], enabled=self.fp8, dtype=dtype)`.
3. Stay in bf16: the patch embedding (K = 14·14·3, <1% of the tower's FLOPs, raw pixels), the
   attention scores and attention·V (`layers.dot_product_attention`, ~3% of the FLOPs),
   LayerNorms, `ln_vision` and everything after the tower.
4. Check: `python tools/benchmark.py --config configs/synthetic.py:smoke --regions 8 --steps 2
   --vit-fp8` then prints a `vit_fp8` line with the feature error instead of "pending" (it looks
   for f8 dots in the lowered ViT forward).

Tuning left to the GPU session: a bfloat16 `accum_dtype` halves the GEMM's output bytes (the
float32 output of fc1 is as large as its operands); per-tensor scales let cuBLASLt apply them in
its epilogue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn; larger values would become NaN (no inf)


def vit_enabled(model_config) -> bool:
  """config.model.vit_fp8 (default False); refuses fp8 for a trainable vision tower."""
  on = bool(model_config.get("vit_fp8", False))
  if on and model_config.get("train_vision_encoder", False):
    raise ValueError("model.vit_fp8 needs a frozen vision tower (model.train_vision_encoder=False):"
                     " the fp8 matmuls have no backward")
  return on


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


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
          enabled: bool, contract: int = 1, dtype=None) -> jax.Array:
  """What a ViT matmul calls: `matmul` when `enabled`, else the plain dot in `dtype`, plus bias.

  x float[..., K1..Kc], kernel float[K1..Kc, N...], bias float[N...] or None → dtype[..., N...]
  (dtype default x.dtype). With enabled=False this is exactly the tower's current einsum.
  """
  dtype = dtype or x.dtype
  if enabled:
    y = matmul(x, kernel, contract=contract, dtype=dtype)
  else:
    x_axes = tuple(range(x.ndim - contract, x.ndim))
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            ((x_axes, tuple(range(contract))), ((), ())))
  if bias is not None:
    y = y + bias.astype(dtype)
  return y
