"""RoI-Align with torchvision semantics (SPEC §3), written as two small matmuls per RoI.

torchvision's RoIAlign averages `sampling_ratio²` bilinear samples per output bin. Bilinear
interpolation is separable and so is torchvision's "sample is zero outside [-1, H] × [-1, W]"
rule (a sample is dropped when its row OR its column is out of range, i.e. the product of two
indicators), so the whole pooling of RoI n is

    out[n] = Wy[n] @ F[n] @ Wx[n]^T          Wy: float[out, H], Wx: float[out, W]

where Wy[n, p, r] = (1/s) Σ_k valid(y_k) · hat(clamp(y_k, 0, H-1) − r) over the s samples y_k of
output row p (hat(d) = max(0, 1 − |d|)). This is exactly torchvision's
`bilinear_interpolate` (clamp to the border, the top/left neighbour rule, `y_low >= H-1`
collapsing onto the last row), and it runs as dense einsums: no gathers, static shapes, cheap on
GPU/TPU, and its gradient w.r.t. the features is another pair of matmuls instead of a scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _axis_weights(start: jax.Array, length: jax.Array, size: int, output_size: int,
                  sampling_ratio: int) -> jax.Array:
  """Interpolation matrix along one axis.

  start, length: float[N] RoI start and extent in feature-map coordinates.
  Returns float[N, output_size, size]: row p holds the bin-p average of the bilinear weights.
  """
  bin_size = length / output_size                                   # [N]
  bins = jnp.arange(output_size, dtype=jnp.float32)                 # [P]
  # Sample k of bin p sits at (p + (k + 0.5) / s) * bin_size from the RoI start.
  frac = (jnp.arange(sampling_ratio, dtype=jnp.float32) + 0.5) / sampling_ratio  # [S]
  coords = start[:, None, None] + (bins[None, :, None] + frac[None, None, :]) * bin_size[:, None, None]
  valid = (coords >= -1.0) & (coords <= size)                       # [N, P, S]
  clamped = jnp.clip(coords, 0.0, size - 1)
  pixels = jnp.arange(size, dtype=jnp.float32)                      # [size]
  hat = jnp.maximum(0.0, 1.0 - jnp.abs(clamped[..., None] - pixels))  # [N, P, S, size]
  hat = jnp.where(valid[..., None], hat, 0.0)
  return hat.sum(axis=2) / sampling_ratio


def roi_align(features: jax.Array, boxes: jax.Array, *, output_size: int = 16,
              spatial_scale: float = 1.0 / 14, sampling_ratio: int = 2,
              aligned: bool = False) -> jax.Array:
  """torchvision `roi_align` where RoI k reads feature map k (one box per map).

  Args:
    features: float[N, H, W, C], channels-last. Feature pixel i sits at coordinate i.
    boxes: float[N, 4] as (x1, y1, x2, y2) in input coordinates (224-px view space in DynRefer).
    output_size: bins per side.
    spatial_scale: input coordinates → feature coordinates (1/14 for patch-14 ViTs).
    sampling_ratio: samples per bin per axis; must be a static int > 0. torchvision's adaptive
      mode (ratio ≤ 0: ceil(roi_size / output_size) samples, different per RoI) needs dynamic
      shapes and is not supported; DynRefer uses 2.
    aligned: if True, shift by −0.5 pixel (torchvision `aligned=True`) and allow RoIs smaller
      than one pixel; if False (DynRefer), no shift and RoI width/height are at least 1.

  Returns:
    float[N, output_size, output_size, C] in the features' dtype (computed in float32).
  """
  if not isinstance(sampling_ratio, int) or sampling_ratio <= 0:
    raise ValueError(f"sampling_ratio must be a static int > 0, got {sampling_ratio!r} "
                     "(adaptive sampling is not supported)")
  n, h, w, _ = features.shape
  if boxes.shape != (n, 4):
    raise ValueError(f"boxes must be [{n}, 4] (one RoI per feature map), got {boxes.shape}")
  offset = 0.5 if aligned else 0.0
  b = boxes.astype(jnp.float32) * spatial_scale - offset
  x0, y0 = b[:, 0], b[:, 1]
  rw, rh = b[:, 2] - x0, b[:, 3] - y0
  if not aligned:
    rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
  # Weights stay float32 and the contraction runs in float32 whatever the feature dtype, as
  # torchvision's roi_align does under autocast (it is on autocast's fp32 list).
  wy = _axis_weights(y0, rh, h, output_size, sampling_ratio)           # [N, P, H]
  wx = _axis_weights(x0, rw, w, output_size, sampling_ratio)           # [N, Q, W]
  rows = jnp.einsum("nph,nhwc->npwc", wy, features.astype(jnp.float32))
  return jnp.einsum("nqw,npwc->npqc", wx, rows).astype(features.dtype)
