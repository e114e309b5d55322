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
  "loop":  one region at a time, one crop at a time (CPU): the region's gray image as uint8,
           then per crop the rows folded about the crop's centre (A_y's rows are symmetric or
           antisymmetric there: 4 MACs per crop pixel instead of 8) over the smallest slab and
           column window that hold the crop, the branch picked by `lax.switch` so only that one
           runs; A_y and A_x are rows of tables indexed by the crop size (see `_coef_loop`).
"auto" takes "loop" on CPU with an unsharded batch, "dense" otherwise.

`imagehash_phash` reproduces `imagehash.phash(crop)` (hash_size 8, highfreq_factor 4): PIL "L"
conversion, PIL LANCZOS resize to 32×32 (antialiased, 8-bit rounding; `crop_resize` does it),
scipy's DCT-II along both axes, top-left 8×8, bit = coefficient > median.

Shapes: B regions, N crops per region, S the padded image side.
"""

from __future__ import annotations

import functools

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


# The per-region CPU path ("loop"). Crops are hashed one at a time from a uint8 gray buffer:
#   y: the projection rows of a crop are symmetric (u even) or antisymmetric (u odd) about the
#      crop's centre, so the rows are folded first: s[i] = G[lo+i] + G[hi-1-i] meets the 4 even
#      rows, d[i] = G[lo+i] - G[hi-1-i] the 4 odd ones, i < ceil(n/2): half the multiply-adds of
#      A_y·G. Both slabs [lo, lo+L) and [hi-L, hi) start inside the crop (L >= ceil(n/2) is the
#      smallest of `window_sizes` that fits), so the table is indexed from the crop's edge and
#      needs no shift; pairs past the middle meet zero weights.
#   x: the crop's columns [lo, lo+W) (W the smallest of `window_sizes` >= n) times the projection of
#      an n-pixel crop from column 0, one [8, W]·[W, 8] product.
# Both projections come from tables indexed by the crop size (the projection of [lo, hi) is that
# of [0, hi - lo) shifted by lo), built once per padded size with `bilinear_dct_projection`.
SMALLEST_WINDOW = 16


def window_sizes(limit: int) -> tuple[int, ...]:
  """Window sides 16, 24, 32, 48, 64, 96, … below `limit`, then `limit` (ascending).

  Each is at most 1.5× the one before, so the smallest window >= m is below 2m once m > 16:
  a folded slab of L >= ceil(n/2) rows then lies inside the n-row crop (L <= n); below that the
  16-row slab may stick out of the crop by up to 15 rows, into the buffer's zero margin.
  """
  sizes, k = [], SMALLEST_WINDOW
  while k < limit:
    sizes += [k, k * 3 // 2]
    k *= 2
  return tuple(sorted({w for w in sizes if w < limit} | {limit}))


@functools.lru_cache(maxsize=8)
def projection_tables(size: int, out_size: int = CV_RESIZE) -> tuple[np.ndarray, np.ndarray]:
  """The projections of every crop size n = 0 … size, from pixel 0 (computed once per size).

  Returns:
    full: float32[size + 1, 8, size], row n = bilinear_dct_projection(0, n) (zero from n on).
    folded: float32[size + 1, 2, 4, ceil(size/2)]: [n, 0] the even rows (u = 0, 2, 4, 6) and
      [n, 1] the odd rows of full[n] for columns i < ceil(n/2), zero beyond; for odd n the middle
      column is halved (the fold adds the middle row to itself).
  """
  basis = dct_basis(out_size).astype(np.float32)
  proj = jax.vmap(lambda hi, basis: bilinear_dct_projection(jnp.int32(0), hi, size, basis),
                  in_axes=(0, None))
  sizes = np.arange(size + 1, dtype=np.int32)
  # Run eagerly even when called while tracing an outer jit: a compiled executable called on
  # concrete arrays executes (a jitted function would be staged into the outer trace).
  full = np.array(jax.jit(proj).lower(sizes, basis).compile()(sizes, basis))
  half = (size + 1) // 2
  n = sizes[:, None]
  i = np.arange(half)[None, :]
  weight = np.where(i < (n + 1) // 2, 1.0, 0.0) * np.where((n % 2 == 1) & (i == (n - 1) // 2),
                                                           0.5, 1.0)
  part = full[:, :, :half] * weight[:, None, :].astype(np.float32)
  folded = np.stack([part[:, 0::2], part[:, 1::2]], axis=1)
  return full, np.ascontiguousarray(folded)


# Rows of the loop's [8, 8] blocks are (u = 0, 2, 4, 6, 1, 3, 5, 7); this puts them in order.
_FOLD_ROW_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])
_GRAY_ROWS = 64  # the gray image is converted in blocks of rows, only as far as the crops reach


def _gray_u8(image: jax.Array) -> jax.Array:
  """gray_opencv as uint8 (exact: the values are integers 0..255). uint8[H, W, 3] → uint8[H, W]."""
  r, g, b = _channels(image)
  return ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15).astype(jnp.uint8)


# XLA:CPU's matmul library (jaxlib 0.10) splits a product of ~2.6e5 multiply-adds or more across
# its intra-op threads (2.56e5 ran on one thread, 2.61e5 on two); with the second core busy, as on
# the shared 2-core benchmark machine, a split product ran ~2x slower. The crops are small and
# independent, so each [4, L]·[L, W] product stays below that: a wide window is contracted in
# column chunks (BENCHMARKS.md, issue 11).
_MAX_PRODUCT = 250_000


def _fold_branch(l_y: int, w_x: int, folded_y: jax.Array, full_x: jax.Array):
  """The 8×8 block (rows u = 0, 2, 4, 6, 1, 3, 5, 7) of one crop, with static slab height l_y
  and window width w_x (see above); `folded_y` and `full_x` are the `projection_tables`."""
  chunks = -(-4 * l_y * w_x // _MAX_PRODUCT)
  width = -(-w_x // chunks)

  def coef(buf, top, left, n_y, n_x):
    even_y, odd_y = (jax.lax.dynamic_slice(folded_y, (n_y, k, 0, 0), (1, 1, 4, l_y))[0, 0]
                     for k in (0, 1))  # [4, l_y] each
    t_x = jax.lax.dynamic_slice(full_x, (n_x, 0, 0), (1, 8, w_x))[0]  # [8, w_x]
    parts = []
    for start in range(0, w_x, width):
      def slab(row, start=start):
        size = (l_y, min(width, w_x - start))
        return jax.lax.dynamic_slice(buf, (row, left + start), size).astype(jnp.float32)
      upper = slab(top)  # rows lo … lo + l_y - 1
      lower = jax.lax.rev(slab(top + n_y - l_y), (0,))  # rows hi - 1, hi - 2, …
      even = jnp.matmul(even_y, upper + lower, precision=_HIGHEST)  # [4, width]
      odd = jnp.matmul(odd_y, upper - lower, precision=_HIGHEST)
      parts.append(jnp.concatenate([even, odd]))
    return jnp.matmul(jnp.concatenate(parts, axis=1), t_x.T, precision=_HIGHEST)
  return coef


def _coef_loop(images: jax.Array, boxes: jax.Array) -> jax.Array:
  """One region at a time, one crop at a time (CPU). [B, N, 8, 8].

  Per region the gray image is converted (uint8, the rows any crop reaches) into a buffer that
  the regions share: zero margins of `window_sizes`[0] rows above and below and zero columns to
  the right hold the parts of a window that stick out of a crop (they meet zero weights; rows
  below the crops keep an earlier region's gray, which also only meets zero weights). Per crop
  `lax.switch` runs only the branch of its (slab height, window width): fold passes and
  [4, L]·[L, W] products, then [8, W]·[W, 8]. Results match the dense form up to float32
  summation order.
  """
  b, s_y, s_x, _ = images.shape
  full_x, _ = projection_tables(s_x)
  _, folded_y = projection_tables(s_y)
  full_x, folded_y = jnp.asarray(full_x), jnp.asarray(folded_y)
  heights, widths = window_sizes((s_y + 1) // 2), window_sizes(s_x)
  margin = heights[0]
  # A window starts at the crop's left edge x1 <= s_x - n + 1 (an empty box at the right edge
  # is a 1-px crop there) and is the smallest width >= n.
  buf_w = max(s_x + 1 - n + widths[int(np.searchsorted(widths, n))] for n in range(1, s_x + 1))
  branches = [_fold_branch(l_y, w_x, folded_y, full_x) for l_y in heights for w_x in widths]

  # Every crop's branch and arguments, for the whole batch at once: [B, N, 5].
  n_y = jnp.maximum(boxes[..., 3] - boxes[..., 1], 1)
  n_x = jnp.maximum(boxes[..., 2] - boxes[..., 0], 1)
  index = (jnp.sum(jnp.asarray(heights[:-1]) < ((n_y + 1) // 2)[..., None], axis=-1) * len(widths)
           + jnp.sum(jnp.asarray(widths[:-1]) < n_x[..., None], axis=-1))
  args = jnp.stack([index, boxes[..., 1] + margin, boxes[..., 0], n_y, n_x], axis=-1)
  reach = jnp.minimum(jnp.max(boxes[..., 1] + n_y, axis=1), s_y)  # rows the crops need: [B]
  block = min(_GRAY_ROWS, s_y)

  def region(buf, xs):
    i, crops, rows = xs

    def gray_rows(k, buf):
      row = jnp.minimum(k * block, s_y - block)
      part = jax.lax.dynamic_slice(images, (i, row, 0, 0), (1, block, s_x, 3))[0]
      return jax.lax.dynamic_update_slice(buf, _gray_u8(part), (row + margin, 0))
    buf = jax.lax.fori_loop(0, (rows + block - 1) // block, gray_rows, buf)
    return buf, jax.lax.map(lambda a: jax.lax.switch(a[0], branches, buf, *a[1:]), crops)

  buf = jnp.zeros((s_y + 2 * margin, buf_w), jnp.uint8)
  _, coef = jax.lax.scan(region, buf, (jnp.arange(b), args.astype(jnp.int32), reach))
  return coef[..., _FOLD_ROW_ORDER, :]


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
  if resolve_impl(impl, images) == "loop":
    coef = _coef_loop(images, boxes.astype(jnp.int32))
  else:
    coef = _coef_dense(images, boxes, jnp.asarray(dct_basis(CV_RESIZE), jnp.float32))
  return _bits(coef, jnp.mean(coef, axis=(-2, -1), keepdims=True))


def opencv_phash_sampled(samples: jax.Array, boxes: jax.Array) -> jax.Array:
  """`opencv_phash` from the pixels each crop's resize reads (`windows.hash_samples`).

  OpenCV's bilinear resize to 224 reads two rows and two columns per output pixel, so a crop of
  any size is hashed exactly from at most 448 × 448 of its gray pixels: a crop of n <= 448
  pixels on an axis is given whole (its projection is `bilinear_dct_projection` of [0, n)); a
  longer one as the taps src_d, src_d + 1 of each output d at positions 2d, 2d + 1, weighted
  1 − frac_d and frac_d (`bilinear_taps`: never clamped there).

  Args:
    samples: uint8[B, N, G, G] gray samples (G = 448), rows then columns.
    boxes: int[B, N, 4] the crops they were taken from (only their sizes matter here).
  Returns:
    bool[B, N, 64], as `opencv_phash` of the crops of the full image.
  """
  g = samples.shape[-1]
  basis = jnp.asarray(dct_basis(CV_RESIZE), jnp.float32)  # [8, 224]

  def projection(n):
    small = bilinear_dct_projection(jnp.int32(0), n, g, basis)  # [8, g]
    _, frac = bilinear_taps(jnp.int32(0), n, CV_RESIZE)
    taps = jnp.stack([basis * (1.0 - frac), basis * frac], axis=-1).reshape(HASH_SIZE, -1)
    taps = jnp.pad(taps, ((0, 0), (0, g - taps.shape[1])))
    return jnp.where(n <= g, small, taps)

  proj = jax.vmap(jax.vmap(projection))
  n_y = jnp.maximum(boxes[..., 3] - boxes[..., 1], 1).astype(jnp.int32)
  n_x = jnp.maximum(boxes[..., 2] - boxes[..., 0], 1).astype(jnp.int32)
  a_y, a_x = proj(n_y), proj(n_x)  # [B, N, 8, G]
  rows = jnp.einsum("bnuy,bnyx->bnux", a_y, samples.astype(jnp.float32), precision=_HIGHEST)
  coef = jnp.einsum("bnux,bnvx->bnuv", rows, a_x, precision=_HIGHEST)
  return _bits(coef, jnp.mean(coef, axis=(-2, -1), keepdims=True))


def imagehash_phash(images: jax.Array, boxes: jax.Array, *, method: str = "auto",
                    levels: jax.Array | None = None) -> jax.Array:
  """`imagehash.phash(Image.fromarray(crop))` of every crop.

  Args:
    images: uint8[B, S, S, 3], or uint8[B, L, S, S, 3] windows (`views.windows`: crops beyond
      window 0 are then resized from a coarser level, approximately).
    boxes: int[B, N, 4], or float ones in the pixels of window `levels` int[B, N].
  Returns:
    bool[B, N, 64].
  """
  gray = gray_pil(images)[..., None]
  small = crop_resize.resize_levels(gray, boxes, IMAGEHASH_RESIZE, kernel="lanczos",
                                    method=method, levels=levels)[..., 0]  # [B, N, 32, 32]
  basis = jnp.asarray(dct_basis(IMAGEHASH_RESIZE, orthonormal=False), jnp.float32)
  coef = jnp.einsum("uy,bnyx,vx->bnuv", basis, small, basis, precision=_HIGHEST)
  flat = coef.reshape(coef.shape[:2] + (-1,))
  return _bits(coef, jnp.median(flat, axis=-1)[..., None, None])
