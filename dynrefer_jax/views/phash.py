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

Two implementations, same bits up to float32 summation order (`impl`):
  "dense": all crops of the batch at once, 8·S² multiply-adds per crop (88·S² per region) in
           two batched matmuls over the whole padded image. Accelerators and sharded batches.
  "loop":  one region at a time (CPU): the gray image and the 11 projections of the region,
           then each crop contracted over the smallest window (32…512 px or S, per axis) that
           holds it, the branch picked by `lax.switch` so only that one runs. On photographs
           with boxes of all sizes that is ~0.4 of the dense work, and every intermediate is
           per-region (cache-sized, reused across iterations) instead of a batch-sized buffer.
"auto" takes "loop" on CPU with an unsharded batch, "dense" otherwise.

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


def _channels(images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """uint8[..., 3] → three int32[...] channels, read as one 32-bit word per pixel.

  Slicing the interleaved channels directly makes XLA:CPU do stride-3 byte loads (~5× slower
  for a whole image); padding each pixel to 4 bytes and bitcasting reads contiguous words.
  """
  word = jax.lax.bitcast_convert_type(
      jnp.pad(images, [(0, 0)] * (images.ndim - 1) + [(0, 1)]), jnp.uint32)
  # Byte k of the word is channel k on a little-endian host; the gray tests check it.
  shifts = (0, 8, 16) if np.little_endian else (24, 16, 8)
  return tuple(((word >> k) & 0xFF).astype(jnp.int32) for k in shifts)


def gray_opencv(images: jax.Array) -> jax.Array:
  """cv2.cvtColor(RGB2GRAY) on uint8, exactly (OpenCV's 15-bit fixed-point weights).

  uint8[..., H, W, 3] → float32[..., H, W] with integer values 0..255.
  """
  r, g, b = _channels(images)
  y = (r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15
  return y.astype(jnp.float32)


def gray_pil(images: jax.Array) -> jax.Array:
  """PIL `convert("L")` on RGB, exactly (PIL's 16-bit fixed-point ITU-R 601-2 weights).

  uint8[..., H, W, 3] → float32[..., H, W] with integer values 0..255.
  """
  r, g, b = _channels(images)
  y = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
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


def _taps_below(v: jax.Array, size: jax.Array, out_size: int) -> jax.Array:
  """#{d : src_d < v} for OpenCV's bilinear taps of a `size`-pixel crop, in exact integers.

  src_d < v (1 <= v <= size − 1) ⟺ (d + ½)·size/out − ½ < v ⟺ (2d + 1)·size < (2v + 1)·out.
  The float32 `floor` in `bilinear_taps` agrees: (2d + 1)·size − (2v + 1)·out is an integer, so
  fx_d is either exactly v or at least 1/(2·out) away from it, far beyond float32 error.
  """
  q = (2 * v + 1) * out_size
  m = (q - 1) // size  # the largest odd 2d + 1 with (2d + 1)·size < q is m or m − 1
  count = jnp.clip((m + 1) // 2, 0, out_size)
  return jnp.where(v <= 0, 0, jnp.where(v >= size, out_size, count))


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
  """float[k, n] → float[k, n + 1], [0, x0, x0 + x1, …], as two small triangular matmuls.

  jnp.cumsum lowers to an O(n²) reduce_window on CPU and associative_scan to many slices; a
  blocked matmul (n = a·b, blocks of b) is O(n·(a + b)) and runs on the matmul units.
  """
  k, n = x.shape
  b = max(d for d in range(1, 33) if n % d == 0)
  a = n // b
  within = jnp.einsum("kai,ij->kaj", x.reshape(k, a, b), jnp.triu(jnp.ones((b, b), x.dtype)),
                      precision=_HIGHEST)
  offsets = jnp.einsum("ki,ij->kj", within[:, :, -1], jnp.triu(jnp.ones((a, a), x.dtype), 1),
                       precision=_HIGHEST)
  inclusive = (within + offsets[:, :, None]).reshape(k, n)
  return jnp.concatenate([jnp.zeros((k, 1), x.dtype), inclusive], axis=1)


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
  _, frac = bilinear_taps(lo, hi, out_size)
  prefix1 = _exclusive_cumsum(basis * frac)
  prefix0 = _exclusive_cumsum(basis) - prefix1  # prefix sums of basis · (1 − frac)
  # Outputs whose first tap is pixel y are d in [c(y), c(y+1)); whose second tap is y (first
  # tap y − 1) are d in [c(y−1), c(y)), with c(v) = #{d : src_d < v} in crop coordinates.
  v = jnp.arange(-1, size + 1, dtype=jnp.int32) - lo  # y − 1 − lo for y = 0 … S
  below = _taps_below(v, jnp.maximum(hi - lo, 1), out_size)  # c at y − 1, y, y + 1 by shifting
  # Gather whole rows of k values (faster than k separate element gathers).
  g0 = jnp.take(prefix0.T, below, axis=0)  # [S + 2, k]
  g1 = jnp.take(prefix1.T, below, axis=0)
  return ((g0[2:] - g0[1:-1]) + (g1[1:-1] - g1[:-2])).T


def _bits(coef: jax.Array, threshold: jax.Array) -> jax.Array:
  return (coef > threshold).reshape(coef.shape[:-2] + (-1,))


# Window sides (besides the padded side itself) the per-region loop may contract a crop over.
WINDOWS = (32, 64, 128, 256, 384, 512)


def window_sizes(size: int) -> tuple[int, ...]:
  """The static window sides usable on an axis of `size` pixels, ascending, ending at `size`."""
  return tuple(sorted({w for w in WINDOWS if w < size} | {size}))


def _crop_coef(gray: jax.Array, a_y: jax.Array, a_x: jax.Array, box: jax.Array) -> jax.Array:
  """The 8×8 low DCT block of one crop, contracting only over a window that holds the crop.

  The window is the smallest of `window_sizes` per axis that fits the crop, placed at the crop's
  corner (clamped into the image); `lax.switch` runs only that branch, so a 40-px crop costs
  8·64·64 multiply-adds instead of 8·S². The projections are zero outside the crop, so their
  window slices are exact. A branch is a handful of ops: inside a loop each op has a fixed cost
  of microseconds on CPU. Outside a loop (vmapped) a switch would run every branch: this is for
  the per-region loop of `opencv_phash(impl="loop")` only.

  Args:
    gray: float32[S_y, S_x]; a_y: float32[8, S_y], a_x: float32[8, S_x] the crop's projections;
    box: int[4] inside the image.
  Returns:
    float32[8, 8].
  """
  s_y, s_x = gray.shape
  sizes_y, sizes_x = window_sizes(s_y), window_sizes(s_x)
  h, w = box[3] - box[1], box[2] - box[0]
  index = (jnp.sum(jnp.asarray(sizes_y[:-1]) < h) * len(sizes_x)
           + jnp.sum(jnp.asarray(sizes_x[:-1]) < w))

  def branch(l_y: int, l_x: int):
    def coef(gray, a_y, a_x, box):
      y0 = jnp.clip(box[1], 0, s_y - l_y)
      x0 = jnp.clip(box[0], 0, s_x - l_x)
      window = jax.lax.dynamic_slice(gray, (y0, x0), (l_y, l_x))
      rows = jnp.matmul(jax.lax.dynamic_slice_in_dim(a_y, y0, l_y, axis=1), window,
                        precision=_HIGHEST)  # [8, l_x]
      return jnp.matmul(rows, jax.lax.dynamic_slice_in_dim(a_x, x0, l_x, axis=1).T,
                        precision=_HIGHEST)
    return coef

  branches = [branch(l_y, l_x) for l_y in sizes_y for l_x in sizes_x]
  return jax.lax.switch(index, branches, gray, a_y, a_x, box)


def _coef_dense(images: jax.Array, boxes: jax.Array, basis: jax.Array) -> jax.Array:
  """All crops at once: 8·S² multiply-adds per crop in two batched matmuls. [B, N, 8, 8]."""
  gray = gray_opencv(images)  # [B, S_y, S_x]
  s_y, s_x = gray.shape[1], gray.shape[2]
  proj = jax.vmap(jax.vmap(bilinear_dct_projection, in_axes=(0, 0, None, None)),
                  in_axes=(0, 0, None, None))
  a_y = proj(boxes[..., 1], boxes[..., 3], s_y, basis)  # [B, N, 8, S_y]
  a_x = proj(boxes[..., 0], boxes[..., 2], s_x, basis)  # [B, N, 8, S_x]
  rows = jnp.einsum("bnuy,byx->bnux", a_y, gray, precision=_HIGHEST)
  return jnp.einsum("bnux,bnvx->bnuv", rows, a_x, precision=_HIGHEST)


def _coef_loop(images: jax.Array, boxes: jax.Array, basis: jax.Array) -> jax.Array:
  """One region at a time: gray of its image, then each crop over its own window. [B, N, 8, 8].

  Per-region intermediates stay cache-sized and are reused across iterations, and windowed
  crops skip most of the 8·S² work of the dense form (about 0.4 of it on photographs with
  boxes of all sizes).
  """
  proj = jax.vmap(bilinear_dct_projection, in_axes=(0, 0, None, None))

  def region(args):
    image, crops = args
    gray = gray_opencv(image)
    a_y = proj(crops[:, 1], crops[:, 3], gray.shape[0], basis)  # [N, 8, S_y]
    a_x = proj(crops[:, 0], crops[:, 2], gray.shape[1], basis)  # [N, 8, S_x]
    return jax.lax.map(lambda c: _crop_coef(gray, *c), (a_y, a_x, crops))
  return jax.lax.map(region, (images, boxes))


def resolve_impl(impl: str, images: jax.Array) -> str:
  """"auto" → "loop" on CPU with an unsharded batch (the fast path there), else "dense"."""
  if impl == "auto":
    return "loop" if crop_resize.use_loop(images) else "dense"
  if impl not in ("loop", "dense"):
    raise ValueError(f"unknown hash implementation {impl!r}; expected 'auto', 'loop' or 'dense'")
  return impl


def opencv_phash(images: jax.Array, boxes: jax.Array, *, impl: str = "auto") -> jax.Array:
  """The original's hash of every crop.

  Args:
    images: uint8[B, S, S, 3] zero-padded images.
    boxes: int[B, N, 4] integer crop boxes inside the true images.
    impl: "dense" (batched matmuls over the whole padded image: accelerators, sharded batches),
      "loop" (regions in a loop, crops over windows: CPU), or "auto". Same bits either way up
      to float32 summation order.
  Returns:
    bool[B, N, 64] hash bits in row-major order of the 8×8 block.
  """
  basis = jnp.asarray(dct_basis(CV_RESIZE), jnp.float32)
  if resolve_impl(impl, images) == "loop":
    coef = _coef_loop(images, boxes.astype(jnp.int32), basis)
  else:
    coef = _coef_dense(images, boxes, basis)
  return _bits(coef, jnp.mean(coef, axis=(-2, -1), keepdims=True))


def imagehash_phash(images: jax.Array, boxes: jax.Array, *, method: str = "auto") -> jax.Array:
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
