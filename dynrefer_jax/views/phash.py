"""Perceptual hashes of crops, batched inside jit (SPEC §8).

`opencv_phash` is the original's image prior: OpenCV RGB→GRAY, crop the integer box, resize to
224×224 with OpenCV's bilinear filter (half-pixel centres, edge clamping, no antialiasing),
orthonormal 2-D DCT-II (`cv2.dct`), keep the top-left 8×8 block (DC included), bit = coefficient
> mean of the 64. Only those 64 coefficients are needed, so resize and DCT fold into two small
matrices per crop: coef = A_y · gray · A_xᵀ with A = D₈ · R, where R[224, S] is the bilinear
resize matrix of the crop (two taps per row) and D₈[8, 224] the first DCT basis rows. A is
built without materialising R: R has two taps per output, at monotone source indices, so
A[:, y] is a difference of prefix sums of D₈'s weighted columns taken at the range of outputs
whose taps land on y.

`imagehash_phash` reproduces `imagehash.phash(crop)` (hash_size 8, highfreq_factor 4): PIL "L"
conversion, PIL LANCZOS resize to 32×32 (antialiased, 8-bit rounding; `crop_resize` does it),
scipy's DCT-II along both axes, top-left 8×8, bit = coefficient > median.

Shapes: B regions, N crops per region, S the padded image side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynrefer_jax.views import crop_resize

HASH_SIZE = 8
CV_RESIZE = 224  # the original resizes every crop to 224×224 before its DCT
IMAGEHASH_RESIZE = 32  # imagehash: hash_size · highfreq_factor
_HIGHEST = jax.lax.Precision.HIGHEST  # hash bits hinge on small coefficient differences


def gray_opencv(images: jax.Array) -> jax.Array:
  """cv2.cvtColor(RGB2GRAY) on uint8, exactly (OpenCV's 15-bit fixed-point weights).

  uint8[B, H, W, 3] → float32[B, H, W] with integer values 0..255.
  """
  x = images.astype(jnp.int32)
  y = (x[..., 0] * 9798 + x[..., 1] * 19235 + x[..., 2] * 3735 + (1 << 14)) >> 15
  return y.astype(jnp.float32)


def gray_pil(images: jax.Array) -> jax.Array:
  """PIL `convert("L")` on RGB, exactly (PIL's 16-bit fixed-point ITU-R 601-2 weights).

  uint8[B, H, W, 3] → float32[B, H, W] with integer values 0..255.
  """
  x = images.astype(jnp.int32)
  y = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
  return y.astype(jnp.float32)


def dct_basis(n: int, k: int = HASH_SIZE, orthonormal: bool = True) -> np.ndarray:
  """First k rows of the DCT-II matrix of length n: float64[k, n].

  orthonormal: cv2.dct's scaling (√(1/n) for the DC row, √(2/n) otherwise); else scipy's
  unnormalised type II (factor 2 on every row).
  """
  u = np.arange(k)[:, None]
  i = np.arange(n)[None, :]
  basis = np.cos(np.pi * (2 * i + 1) * u / (2 * n))
  if orthonormal:
    return basis * np.where(u == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
  return 2.0 * basis


def bilinear_taps(lo: jax.Array, hi: jax.Array, out_size: int) -> tuple[jax.Array, jax.Array]:
  """OpenCV INTER_LINEAR taps of the crop [lo, hi) of one axis (float32 image path).

  Returns:
    src: int32[out] crop-local index of the first tap (the second is src + 1).
    frac: float32[out] weight of the second tap (the first gets 1 − frac); both are clamped at
      the crop's edges as OpenCV does (frac = 0 there).
  """
  size = jnp.maximum(hi - lo, 1)
  scale = size.astype(jnp.float32) / out_size
  fx = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
  src = jnp.floor(fx)
  frac = fx - src
  src = src.astype(jnp.int32)
  before = src < 0
  after = src >= size - 1
  frac = jnp.where(before | after, 0.0, frac)
  src = jnp.where(before, 0, jnp.where(after, size - 1, src))
  return src, frac


def bilinear_dct_projection(lo: jax.Array, hi: jax.Array, size: int, basis: jax.Array) -> jax.Array:
  """A = basis · R: the low DCT rows of the bilinear resize of crop [lo, hi), over the padded axis.

  Args:
    lo, hi: int scalars, the crop (hi − lo >= 1).
    size: padded axis length S (static).
    basis: float32[k, out] DCT rows.
  Returns:
    float32[k, S], zero outside the crop.
  """
  k, out_size = basis.shape
  src, frac = bilinear_taps(lo, hi, out_size)
  zero = jnp.zeros((k, 1), jnp.float32)
  prefix0 = jnp.concatenate([zero, jnp.cumsum(basis * (1.0 - frac), axis=1)], axis=1)
  prefix1 = jnp.concatenate([zero, jnp.cumsum(basis * frac, axis=1)], axis=1)
  v = jnp.arange(-1, size + 1, dtype=jnp.int32) - lo  # crop-local index of y − 1, y, y + 1
  below = jnp.searchsorted(src, v, side="left", method="compare_all")  # #{d : src_d < v}
  c_prev, c_here, c_next = below[:-2], below[1:-1], below[2:]  # at y−1, y, y+1
  # Outputs whose first tap is y: d in [c(y), c(y+1)); whose second tap is y: [c(y−1), c(y)).
  first = jnp.take(prefix0, c_next, axis=1) - jnp.take(prefix0, c_here, axis=1)
  second = jnp.take(prefix1, c_here, axis=1) - jnp.take(prefix1, c_prev, axis=1)
  return first + second


def _bits(coef: jax.Array, threshold: jax.Array) -> jax.Array:
  return (coef > threshold).reshape(coef.shape[:-2] + (-1,))


def opencv_phash(images: jax.Array, boxes: jax.Array) -> jax.Array:
  """The original's hash of every crop.

  Args:
    images: uint8[B, S, S, 3] zero-padded images.
    boxes: int[B, N, 4] integer crop boxes inside the true images.
  Returns:
    bool[B, N, 64] hash bits in row-major order of the 8×8 block.
  """
  gray = gray_opencv(images)  # [B, S_y, S_x]
  s_y, s_x = gray.shape[1], gray.shape[2]
  basis = jnp.asarray(dct_basis(CV_RESIZE), jnp.float32)
  proj = jax.vmap(jax.vmap(bilinear_dct_projection, in_axes=(0, 0, None, None)),
                  in_axes=(0, 0, None, None))
  a_y = proj(boxes[..., 1], boxes[..., 3], s_y, basis)  # [B, N, 8, S_y]
  a_x = proj(boxes[..., 0], boxes[..., 2], s_x, basis)  # [B, N, 8, S_x]
  rows = jnp.einsum("bnuy,byx->bnux", a_y, gray, precision=_HIGHEST)
  coef = jnp.einsum("bnux,bnvx->bnuv", rows, a_x, precision=_HIGHEST)  # [B, N, 8, 8]
  return _bits(coef, jnp.mean(coef, axis=(-2, -1), keepdims=True))


def imagehash_phash(images: jax.Array, boxes: jax.Array, *, method: str = "banded") -> jax.Array:
  """`imagehash.phash(Image.fromarray(crop))` of every crop.

  Args:
    images: uint8[B, S, S, 3]; boxes: int[B, N, 4].
  Returns:
    bool[B, N, 64].
  """
  gray = gray_pil(images)[..., None]
  small = crop_resize.resize_levels(gray, boxes, IMAGEHASH_RESIZE, kernel="lanczos",
                                    method=method)[..., 0]  # [B, N, 32, 32]
  basis = jnp.asarray(dct_basis(IMAGEHASH_RESIZE, orthonormal=False), jnp.float32)
  coef = jnp.einsum("uy,bnyx,vx->bnuv", basis, small, basis, precision=_HIGHEST)
  flat = coef.reshape(coef.shape[:2] + (-1,))
  return _bits(coef, jnp.median(flat, axis=-1)[..., None, None])
