"""View aligners (SPEC §4): warp a context view's RoI features onto the reference view.

Two variants, selected by `build_aligner(kind)`:
- "dcnv4": `DeformableAligner`, what the original code runs (`cvem_align`, a DCNv4-style
  modulated deformable 3×3 sampling whose offsets/masks are predicted from concat[x, ref]).
- "offset": `OffsetAligner`, the paper's description (conv on concat[x, ref] → one 2-D offset
  per pixel → bilinear resample of x).

Both sample with *zero padding*: a sample at (row, col) reads the four integer neighbours with
bilinear weights, and neighbours outside the map contribute 0 (so a sample with row ≤ −1,
col ≤ −1, row ≥ H or col ≥ W is exactly 0). Sampling is done with separable "hat" weight
matrices and einsums rather than gathers (see `_sampling_matrix`): everything is a matmul on
GPU/TPU and the backward pass has no scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax.models import layers


def _hat(coords: jax.Array, size: int) -> jax.Array:
  """Bilinear weights of continuous `coords` onto integer pixels 0..size-1, zero padding.

  coords: float[...]; returns float[..., size] with max(0, 1 − |coord − pixel|).
  """
  pixels = jnp.arange(size, dtype=coords.dtype)
  return jnp.maximum(0.0, 1.0 - jnp.abs(coords[..., None] - pixels))


def _sampling_matrix(rows: jax.Array, cols: jax.Array, weights: jax.Array, h: int,
                     w: int) -> jax.Array:
  """Dense matrix that applies weighted bilinear sampling: out = S @ value.

  rows, cols, weights: float[M, H*W, G, P] sample positions (pixel units) and their scalar
  weights (the modulation), P samples summed per output pixel and group.
  Returns float[M, H*W, G, h*w]. Built as Σ_p (weight·hat_rows) ⊗ hat_cols, a batched matmul
  over P; at DynRefer's size (16×16 maps, G=4, P=9) it is 256×256 per (map, group).
  """
  wr = _hat(rows, h) * weights[..., None]                            # [M, O, G, P, h]
  wc = _hat(cols, w)                                                 # [M, O, G, P, w]
  s = jnp.einsum("mogpr,mogps->mogrs", wr, wc)
  return s.reshape(*s.shape[:3], h * w)


def _apply_sampling(s: jax.Array, value: jax.Array, groups: int) -> jax.Array:
  """s: float[M, O, G, H*W]; value: float[M, H, W, C] → float[M, O, C] (group g reads its
  C/G channel block)."""
  m, h, w, c = value.shape
  v = value.reshape(m, h * w, groups, c // groups)
  out = jnp.einsum("mogk,mkgc->mogc", s.astype(value.dtype), v)
  return out.reshape(m, -1, c)


class GroupedConv(nnx.Module):
  """A 2-D convolution with PyTorch Conv2d semantics (stride 1, 'same' zero padding, groups).

  kernel: float[k, k, in/groups, out] (PyTorch weight permuted (2, 3, 1, 0)); bias: float[out].
  Grouping follows PyTorch: group g reads the g-th contiguous block of input channels.
  """

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
               groups: int = 1, rngs: nnx.Rngs, kernel_init: layers.Initializer | None = None,
               bias_init: layers.Initializer | None = None, axes=(None, None, None, "embed"),
               dtype=None, param_dtype=jnp.float32):
    if in_features % groups or out_features % groups:
      raise ValueError(f"channels {in_features}->{out_features} not divisible by {groups} groups")
    fan_in = in_features // groups * kernel_size * kernel_size
    # PyTorch Conv2d default: kaiming_uniform(a=√5) on fan_in = in/groups·k·k, i.e.
    # U(±1/√fan_in), and the bias U(±1/√fan_in) too.
    kernel_init = kernel_init or nnx.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3)
    bias_init = bias_init or layers.torch_linear_bias(fan_in)
    shape = (kernel_size, kernel_size, in_features // groups, out_features)
    self.kernel = layers.param(rngs, kernel_init, shape, axes, param_dtype)
    self.bias = layers.param(rngs, bias_init, (out_features,), (axes[3],), param_dtype)
    self.groups = groups
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[M, H, W, in] → float[M, H, W, out]."""
    dtype = self.dtype or x.dtype
    kernel = self.kernel[...].astype(dtype)
    k, _, per_group, out = kernel.shape
    if self.groups == out:
      # One output per group (DynRefer's offset_mask_dw: 2 inputs per output). Written as
      # k·k shifted multiply-adds, which XLA fuses into one elementwise kernel; a
      # feature-grouped conv gets a pathologically slow kernel gradient (≈1000× the forward
      # on XLA:CPU) and poor cuDNN kernels for 2-channel groups.
      m, h, w, _ = x.shape
      pad = k // 2
      xp = jnp.pad(x.astype(dtype), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      xp = xp.reshape(m, h + 2 * pad, w + 2 * pad, out, per_group)
      y = sum((xp[:, dy:dy + h, dx:dx + w] * kernel[dy, dx].T).sum(-1)
              for dy in range(k) for dx in range(k))
      return y + self.bias[...].astype(dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel, window_strides=(1, 1),
        padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)
    return y + self.bias[...].astype(dtype)


class DeformableAligner(nnx.Module):
  """DynRefer's `CustomDCNv4` (`cvem_align`): modulated deformable 3×3 sampling, SPEC §4.

  Steps (per pixel (h, w), group g < G, kernel point p = i·3 + j, i the x index):
    value  = value_proj(x)                                        float[M, H, W, C]
    feat   = offset_mask_dw(concat[x, ref])  (3×3, groups = C)     float[M, H, W, C]
             quirk kept: output channel o reads concatenated channels 2o, 2o+1, so the first
             C/2 outputs see only x and the rest only ref.
    om     = offset_mask(feat)                                    float[M, H, W, ceil(G·27/8)·8]
             per group 27 consecutive channels: 9 (Δx, Δy) pairs, then 9 raw modulations;
             the trailing padding channels are ignored.
    s      = Σ_p m_gp · bilinear(value_g, row = h − 1 + j + Δy, col = w − 1 + i + Δx), zero pad
    out    = output_proj(s); no residual.
  Init: value_proj/output_proj xavier-uniform with zero bias; offset_mask all zeros (so the
  output is exactly 0 at step 0); offset_mask_dw PyTorch's Conv2d default.
  """

  def __init__(self, channels: int, *, groups: int = 4, kernel_size: int = 3,
               offset_scale: float = 1.0, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    if channels % groups:
      raise ValueError(f"channels {channels} not divisible by groups {groups}")
    if kernel_size != 3:
      raise ValueError("only the 3×3 kernel of DynRefer is implemented")
    self.channels, self.groups, self.kernel_size = channels, groups, kernel_size
    self.offset_scale = offset_scale
    points = kernel_size * kernel_size
    self.offset_mask_width = -(-groups * points * 3 // 8) * 8   # ceil(G·K·3 / 8)·8 = 112 at G=4
    dense = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.value_proj = layers.Dense(channels, channels, axes=("embed", "mlp"),
                                   kernel_init=layers.xavier_uniform, bias_init=layers.zeros,
                                   **dense)
    self.offset_mask_dw = GroupedConv(2 * channels, channels, kernel_size=3, groups=channels,
                                      **dense)
    self.offset_mask = layers.Dense(channels, self.offset_mask_width, axes=("embed", None),
                                    kernel_init=layers.zeros, bias_init=layers.zeros, **dense)
    self.output_proj = layers.Dense(channels, channels, axes=("mlp", "embed"),
                                    kernel_init=layers.xavier_uniform, bias_init=layers.zeros,
                                    **dense)

  def __call__(self, x: jax.Array, ref: jax.Array) -> jax.Array:
    """x: float[M, H, W, C] (context-view RoI features), ref: float[M, H, W, C] (view-0 RoI
    features) → float[M, H, W, C] aligned context features."""
    m, h, w, c = x.shape
    g, k = self.groups, self.kernel_size
    points = k * k
    value = self.value_proj(x)
    feat = self.offset_mask_dw(jnp.concatenate([x, ref], axis=-1))
    om = self.offset_mask(feat)[..., :g * points * 3].reshape(m, h * w, g, points * 3)
    om = om.astype(jnp.float32)
    offsets = om[..., :2 * points].reshape(m, h * w, g, points, 2) * self.offset_scale
    modulation = om[..., 2 * points:]                                # raw, no softmax
    # Kernel point p = i·k + j: i steps along x (outer), j along y (inner).
    i, j = jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij")
    di = (i.reshape(-1) - (k - 1) // 2).astype(jnp.float32)          # [P] x displacement
    dj = (j.reshape(-1) - (k - 1) // 2).astype(jnp.float32)          # [P] y displacement
    hh, ww = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    rows = hh.reshape(1, h * w, 1, 1) + dj + offsets[..., 1]         # [M, HW, G, P]
    cols = ww.reshape(1, h * w, 1, 1) + di + offsets[..., 0]
    s = _sampling_matrix(rows, cols, modulation, h, w)
    sampled = _apply_sampling(s, value, g).reshape(m, h, w, c)
    return self.output_proj(sampled)


class OffsetAligner(nnx.Module):
  """The paper's aligner: a 3×3 conv over concat[x, ref] predicts one (Δx, Δy) per pixel, and
  x is resampled bilinearly (zero padding) at (row + Δy, col + Δx).

  Param: `offset_conv` (kernel float[3, 3, 2C, 2], bias float[2]), zero-initialised so that the
  module starts as the identity warp (our choice: the paper gives no init; starting at identity
  keeps context views intact at step 0, unlike the DCNv4 variant which starts at zero output).
  """

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    self.channels = channels
    self.offset_conv = GroupedConv(2 * channels, 2, kernel_size=3, groups=1, rngs=rngs,
                                   kernel_init=layers.zeros, bias_init=layers.zeros,
                                   axes=(None, None, "embed", None), dtype=dtype,
                                   param_dtype=param_dtype)

  def __call__(self, x: jax.Array, ref: jax.Array) -> jax.Array:
    """x, ref: float[M, H, W, C] → float[M, H, W, C]."""
    m, h, w, c = x.shape
    offsets = self.offset_conv(jnp.concatenate([x, ref], axis=-1)).astype(jnp.float32)
    hh, ww = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    rows = (hh + offsets[..., 1]).reshape(m, h * w, 1, 1)
    cols = (ww + offsets[..., 0]).reshape(m, h * w, 1, 1)
    s = _sampling_matrix(rows, cols, jnp.ones_like(rows), h, w)
    return _apply_sampling(s, x, 1).reshape(m, h, w, c)


ALIGNERS = {"dcnv4": DeformableAligner, "offset": OffsetAligner}


def build_aligner(kind: str, **kwargs) -> nnx.Module:
  """`build_aligner("dcnv4", channels=1408, groups=4, rngs=...)` or `("offset", channels=...)`."""
  if kind not in ALIGNERS:
    raise ValueError(f"unknown aligner {kind!r}; choose one of {sorted(ALIGNERS)}")
  return ALIGNERS[kind](**kwargs)
