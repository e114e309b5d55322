"""Batched crop + resize with PIL's resampling filters, inside jit (SPEC §1 preprocessing, §2).

The original crops each view with numpy and resizes it with PIL (`Image.resize(.., BICUBIC)`
through torchvision's Resize on a PIL image). PIL resamples separably: a horizontal pass, then
a vertical pass, each output pixel a normalised weighted sum of the input pixels under the
filter scaled by max(in/out, 1) (that scaling is the antialiasing when shrinking), with 8-bit
rounding after each pass.

Here each pass is a resampling matrix built from the integer crop box, with zero weight outside
the crop, stored banded: for output pixel j, `start[j]` (an index into the padded image) and
`weights[j, k]`, k < K, where K is the widest filter window any crop of the padded image can
need (static). Four ways to apply it, all giving the same numbers (up to float32 summation
order at a rounding boundary):
  "loop":    one view at a time (CPU). `lax.switch` picks PIL's pass order and a slab of the
             image across the first pass that holds the crop (64…512 px or S), and each pass
             runs 16 outputs at a time on a window sliced out of the slab (a real slice in a
             loop, not a gather) times that block's piece of the dense weight matrix.
  "blocked": the same blocks for all views at once (vmapped): O(out·(16·S/out + K)·S) per
             view, matmuls only; matmul-friendly on accelerators, but the vmapped windows are
             gathers, slow on CPU.
  "banded":  K row gathers and multiply-adds, O(out·K·S); XLA's CPU gather makes it slow there.
  "dense":   the matrix densified to [out, S] and applied with einsum, O(out·S²).

"auto" (the default) takes "loop" on CPU with an unsharded batch, "blocked" otherwise.

Pass order: PIL 13 runs the vertical pass first for crops that are much taller than wide
(`vertical_first`); in the batched forms the image is square, so the first pass always runs
along axis 0 of one of two layouts of it and costs the same either way.

Faithfulness to PIL: weights are computed as PIL's `precompute_coeffs` does (float32 here,
double there) and then quantised to PIL's 22-bit fixed point; the result of each pass is
rounded half-up and clipped to [0, 255] as PIL's `clip8`. Left differences are float32
accumulation (≈1e-4 of a level), which flips a rounding only when PIL's exact sum lies within
that of a half level.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point weights for 8-bit images
_HIGHEST = jax.lax.Precision.HIGHEST  # TF32/bf16 matmuls would move pixels by whole levels


def bicubic(x: jax.Array) -> jax.Array:
  """PIL's bicubic kernel (a = −0.5), support 2."""
  a = -0.5
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def lanczos(x: jax.Array) -> jax.Array:
  """PIL's Lanczos kernel (sinc(x)·sinc(x/3)), support 3."""
  def sinc(v):
    safe = jnp.where(v == 0, 1.0, v)
    return jnp.where(v == 0, 1.0, jnp.sin(jnp.pi * safe) / (jnp.pi * safe))
  return jnp.where((x > -3.0) & (x < 3.0), sinc(x) * sinc(x / 3.0), 0.0)


FILTERS: dict[str, tuple[Callable[[jax.Array], jax.Array], float]] = {
    "bicubic": (bicubic, 2.0),
    "lanczos": (lanczos, 3.0),
}


def max_taps(size: int, out_size: int, support: float) -> int:
  """The widest PIL filter window for any crop of a `size`-pixel axis resized to `out_size`."""
  return 2 * math.ceil(support * max(size / out_size, 1.0)) + 1


def _filter_geometry(lo, hi, out_size: int, kernel: str):
  """PIL's per-output filter window for the crop [lo, hi) of one axis.

  lo and hi are pixel coordinates (integers for a crop of the image itself; fractions for a
  crop of a coarser level, see `views.windows`). Pixel p covers [p, p + 1). Coordinates are
  local to `base` = floor(lo): the crop starts at delta = lo − base, and PIL's centres
  (j + ½)·scale move by delta. With integer lo, hi this is PIL's `precompute_coeffs` on the
  cropped image, operation for operation; with fractions a pixel that the crop only partly
  covers is taken whole.

  Returns:
    (base int32, centre float32[out], xmin, xmax float32[out] (window [xmin, xmax) of pixels
    base + x), 1/filterscale, kernel fn).
  """
  fn, support = FILTERS[kernel]
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  base = jnp.floor(lo)
  size = jnp.maximum(hi - lo, 1.0)
  pixels = jnp.maximum(jnp.ceil(hi) - base, 1.0)  # = size for integer crops
  scale = size / out_size
  filterscale = jnp.maximum(scale, 1.0)
  support = support * filterscale
  center = (lo - base) + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  # PIL: xmin = (int)(center - support + 0.5) clamped at 0; xmax likewise clamped at the size.
  xmin = jnp.maximum(jnp.trunc(center - support + 0.5), 0.0)
  xmax = jnp.minimum(jnp.trunc(center + support + 0.5), pixels)
  return base.astype(jnp.int32), center, xmin, xmax, 1.0 / filterscale, fn


def _quantise(w: jax.Array) -> jax.Array:
  """PIL's normalize_coeffs_8bpc: round half away from zero to 2^-22."""
  one = float(1 << _PIL_PRECISION_BITS)
  return jnp.trunc(w * one + jnp.where(w < 0, -0.5, 0.5)) / one


def resample_weights(lo: jax.Array, hi: jax.Array, out_size: int, taps: int,
                     kernel: str = "bicubic") -> tuple[jax.Array, jax.Array]:
  """PIL's resampling weights for the crop [lo, hi) of one axis, banded.

  Args:
    lo, hi: scalars, the crop on this axis (hi − lo >= 1 pixels; see `_filter_geometry` for
      fractions).
    out_size: output length.
    taps: K, static window length (>= PIL's ksize for this crop; see `max_taps`).
    kernel: "bicubic" or "lanczos".
  Returns:
    start: int32[out] first input index (in the uncropped axis) of each window.
    weights: float32[out, K] normalised weights, quantised to PIL's 22-bit fixed point; zero
      beyond the window.
  """
  base, center, xmin, xmax, inv_fs, fn = _filter_geometry(lo, hi, out_size, kernel)
  x = xmin[:, None] + jnp.arange(taps, dtype=jnp.float32)[None, :]
  inside = x < xmax[:, None]
  w = jnp.where(inside, fn((x - center[:, None] + 0.5) * inv_fs), 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  w = jnp.where(total != 0, w / jnp.where(total != 0, total, 1.0), w)
  start = base + xmin.astype(jnp.int32)
  return start, _quantise(w)


def dense_weights(lo: jax.Array, hi: jax.Array, out_size: int, size: int, taps: int,
                  kernel: str = "bicubic") -> tuple[jax.Array, jax.Array]:
  """The same weights as `resample_weights`, as the dense matrix float32[out, size].

  Computed element by element from the same formula (no gather), so every entry is the banded
  one; only the normalising totals come from the banded [out, K] form.

  Returns:
    start: int32[out] first input index of each output's window (as `resample_weights`).
    weights: float32[out, size], zero outside each window.
  """
  base, center, xmin, xmax, inv_fs, fn = _filter_geometry(lo, hi, out_size, kernel)
  x = xmin[:, None] + jnp.arange(taps, dtype=jnp.float32)[None, :]
  total = jnp.sum(jnp.where(x < xmax[:, None], fn((x - center[:, None] + 0.5) * inv_fs), 0.0),
                  axis=1, keepdims=True)
  local = (jnp.arange(size, dtype=jnp.int32)[None, :] - base).astype(jnp.float32)
  inside = (local >= xmin[:, None]) & (local < xmax[:, None])
  w = jnp.where(inside, fn((local - center[:, None] + 0.5) * inv_fs), 0.0)
  w = jnp.where(total != 0, w / jnp.where(total != 0, total, 1.0), w)
  return base + xmin.astype(jnp.int32), _quantise(w)


def dense_matrix(start: jax.Array, weights: jax.Array, size: int) -> jax.Array:
  """Banded weights → the dense resampling matrix float32[out, size]."""
  taps = weights.shape[-1]
  offset = jnp.arange(size)[None, :] - start[:, None]
  valid = (offset >= 0) & (offset < taps)
  picked = jnp.take_along_axis(weights, jnp.clip(offset, 0, taps - 1), axis=1)
  return jnp.where(valid, picked, 0.0)


def _round_clip8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _banded_pass(x: jax.Array, start: jax.Array, weights: jax.Array, lo=0,
                 hi=None) -> jax.Array:
  """y[j] = Σ_k weights[j, k] · x[lo + start[j] + k] along axis 0: float[N, ...] → [out, ...].

  Rows outside [lo, hi] only ever carry zero weight; indices are clamped there.
  """
  hi = x.shape[0] - 1 if hi is None else hi
  extra = (1,) * (x.ndim - 1)
  acc = jnp.zeros((start.shape[0],) + x.shape[1:], jnp.float32)
  for k in range(weights.shape[1]):
    rows = jnp.take(x, jnp.clip(lo + start + k, lo, hi), axis=0).astype(jnp.float32)
    acc = acc + weights[:, k].reshape((-1,) + extra) * rows
  return acc


def _blocked_pass(x: jax.Array, start: jax.Array, weights: jax.Array, scale_max: float,
                  lo=0, hi=None, block: int = 16) -> jax.Array:
  """Same as `_banded_pass`, as small dense matmuls: float[N, ...] → float[out, ...].

  Outputs are taken `block` at a time; a block's taps lie in one window of L consecutive rows
  (L bounded statically from the largest scale), which is sliced out (a contiguous copy, no
  element gather) and multiplied by the block's [block, L] piece of the resampling matrix.
  Cost O(out·L·M) with L ≈ block·scale + K, instead of O(out·N·M) for the dense matrix.
  """
  n = x.shape[0]
  hi = n - 1 if hi is None else hi
  out, taps = weights.shape
  if out % block:
    block = math.gcd(out, block)
  window = min(math.ceil((block - 1) * scale_max) + taps + 2, n)
  flat = x.reshape(n, -1)

  def one_block(b):
    first = b * block
    # start is non-decreasing, so the block's first output has the window's first tap.
    w0 = jnp.clip(lo + start[first], lo, jnp.maximum(hi + 1 - window, lo))
    w0 = jnp.minimum(w0, n - window)  # what dynamic_slice would clamp to anyway
    rows = jax.lax.dynamic_slice_in_dim(flat, w0, window, axis=0)  # [L, M]
    rows = rows.astype(jnp.float32)
    s = jax.lax.dynamic_slice_in_dim(start, first, block)
    w = jax.lax.dynamic_slice_in_dim(weights, first, block)
    offset = w0 + jnp.arange(window)[None, :] - (lo + s[:, None])  # tap index of each row
    valid = (offset >= 0) & (offset < taps)
    mat = jnp.where(valid, jnp.take_along_axis(w, jnp.clip(offset, 0, taps - 1), axis=1), 0.0)
    return jnp.matmul(mat, rows, precision=_HIGHEST)  # [block, M]

  blocks = jax.vmap(one_block)(jnp.arange(out // block))  # [out // block, block, M]
  # Merge, then split, in two reshapes: with explicitly sharded batch axes (vmap) JAX infers
  # the sharding of either kind alone but not of a reshape that does both.
  return blocks.reshape((out, flat.shape[1])).reshape((out,) + x.shape[1:])


def vertical_first(box: jax.Array, out_size: int) -> jax.Array:
  """Whether PIL (13.x, the version the tests run against) resamples vertically first.

  Found by experiment against `Image.resize` (bicubic to 224 and Lanczos to 32, boundaries
  checked to the pixel): the vertical pass goes first iff it shrinks (h > out) and
  h − out > 2·(w − out). Older Pillow always went horizontal first; the two orders differ only
  by the 8-bit rounding of the intermediate image (≤ 3 levels, ~0.2 levels on average).
  """
  w = box[2] - box[0]
  h = box[3] - box[1]
  return (h > out_size) & (h - out_size > 2 * (w - out_size))


def _resize_one(both: jax.Array, box: jax.Array, out_size: int, taps: int, kernel: str,
                method: str) -> jax.Array:
  """One crop of a square image given in both layouts: float[2S, S, C] → float[out, out, C].

  `both` stacks the image indexed [x, y, c] (rows 0..S−1) over it indexed [y, x, c] (rows
  S..2S−1). PIL's first pass always runs along axis 0 of one of the two halves, picked by an
  index offset, so neither order costs a second full-size pass nor a copy of the image.
  """
  size = both.shape[1]
  start_x, wx = resample_weights(box[0], box[2], out_size, taps, kernel)
  start_y, wy = resample_weights(box[1], box[3], out_size, taps, kernel)
  v_first = vertical_first(box, out_size)
  start_a, wa = jnp.where(v_first, start_y, start_x), jnp.where(v_first, wy, wx)
  start_b, wb = jnp.where(v_first, start_x, start_y), jnp.where(v_first, wx, wy)
  half = jnp.where(v_first, size, 0)
  # Largest input/output ratio of a crop (the whole padded side): bounds the block windows.
  scale_max = max(size / out_size, 1.0)
  if method == "blocked":
    first = _round_clip8(_blocked_pass(both, start_a, wa, scale_max, lo=half,
                                       hi=half + size - 1))
    out = _round_clip8(_blocked_pass(jnp.swapaxes(first, 0, 1), start_b, wb, scale_max))
  elif method == "banded":
    first = _round_clip8(_banded_pass(both, start_a, wa, lo=half, hi=half + size - 1))
    out = _round_clip8(_banded_pass(jnp.swapaxes(first, 0, 1), start_b, wb))
  elif method == "dense":
    ma = dense_matrix(start_a + half, wa, 2 * size)  # zero over the other half
    mb = dense_matrix(start_b, wb, size)
    first = _round_clip8(jnp.einsum("ja,abc->jbc", ma, both.astype(jnp.float32),
                                    precision=_HIGHEST))
    out = _round_clip8(jnp.einsum("ib,jbc->ijc", mb, first, precision=_HIGHEST))
  else:
    raise ValueError(f"unknown method {method!r}")
  # Horizontal first leaves [out_y, out_x, C]; vertical first leaves it transposed.
  return jnp.where(v_first, jnp.swapaxes(out, 0, 1), out)


def _pass_blocks(x: jax.Array, start: jax.Array, weights: jax.Array, lo: jax.Array,
                 hi: jax.Array, axis: int, window: int, block: int) -> jax.Array:
  """One PIL pass along `axis` of x, `block` outputs at a time, with real (unbatched) slices.

  For each block of outputs, the `window` input positions from the block's first tap on are
  sliced out (clamped into [lo, hi], the crop) and contracted with that block's [block, window]
  piece of the dense weight matrix. Used inside the per-view loop of `impl="loop"`, where a
  dynamic slice is a copy of the window rather than a gather.

  Args:
    x: float/uint8 array; start, weights: from `dense_weights` over axis `axis` (size N).
  Returns:
    float32 x with axis `axis` resampled to `out`.
  """
  out, n = weights.shape
  if out % block:
    block = math.gcd(out, block)
  shape = list(x.shape)
  shape[axis] = out

  def one_block(b, acc):
    first = b * block
    # Windows move right with the output index, so the block's taps start at its first output's.
    w0 = jnp.clip(start[first], lo, jnp.maximum(hi - window, lo))
    w0 = jnp.minimum(w0, n - window)
    win = jax.lax.dynamic_slice_in_dim(x, w0, window, axis=axis).astype(jnp.float32)
    mat = jax.lax.dynamic_slice(weights, (first, w0), (block, window))
    piece = jnp.tensordot(mat, jnp.moveaxis(win, axis, 0), axes=(1, 0), precision=_HIGHEST)
    return jax.lax.dynamic_update_slice_in_dim(acc, jnp.moveaxis(piece, 0, axis), first, axis)

  # A loop rather than unrolled blocks: the same speed, a fraction of the compile time.
  return jax.lax.fori_loop(0, out // block, one_block, jnp.zeros(shape, jnp.float32))


# Slab sides (besides the padded side) the per-view loop may restrict the first pass to.
SLABS = (64, 128, 256, 384, 512)


def _slab_sizes(size: int) -> tuple[int, ...]:
  return tuple(sorted({w for w in SLABS if w < size} | {size}))


def _resize_view_loop(stack: jax.Array, level: jax.Array, box: jax.Array, out_size: int,
                      kernel: str, block: int) -> jax.Array:
  """One crop of one window of [L, S_y, S_x, C] → float32[out, out, C] 8-bit levels, PIL's order.

  `lax.switch` runs one branch: PIL's pass order for this crop (see `vertical_first`; no second
  layout of the image is needed) and a slab of window `level` across the first pass, the
  smallest of `_slab_sizes` that holds the crop's extent on that axis (PIL's first pass, too,
  only covers the crop's rows or columns). The dense weights are zero outside the crop, so
  slicing them to the slab is exact. `box` is in the window's pixels (fractions allowed).
  """
  s_y, s_x = stack.shape[1], stack.shape[2]
  taps_y = max_taps(s_y, out_size, FILTERS[kernel][1])
  taps_x = max_taps(s_x, out_size, FILTERS[kernel][1])
  st_y, w_y = dense_weights(box[1], box[3], out_size, s_y, taps_y, kernel)  # [out, S_y]
  st_x, w_x = dense_weights(box[0], box[2], out_size, s_x, taps_x, kernel)  # [out, S_x]
  # The pixels the crop touches, [floor(lo), ceil(hi)) per axis (the crop itself when integer).
  lo = jnp.floor(box[:2]).astype(jnp.int32)
  hi = jnp.ceil(box[2:]).astype(jnp.int32)
  # Input positions a block of outputs can touch: its span at the largest scale plus a window.
  win_y = min(math.ceil((block - 1) * max(s_y / out_size, 1.0)) + taps_y + 2, s_y)
  win_x = min(math.ceil((block - 1) * max(s_x / out_size, 1.0)) + taps_x + 2, s_x)
  axes = {0: (st_y, w_y, lo[1], hi[1], win_y), 1: (st_x, w_x, lo[0], hi[0], win_x)}

  def branch(first_axis: int, slab: int):
    other = 1 - first_axis

    def run(stack):
      st_o, w_o, lo_o, hi_o, win_o = axes[other]
      o0 = jnp.clip(lo_o, 0, stack.shape[1 + other] - slab)
      start = [level, jnp.int32(0), jnp.int32(0), jnp.int32(0)]
      start[1 + other] = o0
      size = list(stack.shape[1:])
      size[other] = slab
      part = jax.lax.dynamic_slice(stack, start, [1] + size)[0]
      st_f, w_f, lo_f, hi_f, win_f = axes[first_axis]
      mid = _round_clip8(_pass_blocks(part, st_f, w_f, lo_f, hi_f, first_axis, win_f, block))
      w_o = jax.lax.dynamic_slice_in_dim(w_o, o0, slab, axis=1)
      return _round_clip8(_pass_blocks(mid, st_o - o0, w_o, lo_o - o0, hi_o - o0, other,
                                       min(win_o, slab), block))
    return run

  sizes = {0: _slab_sizes(s_x), 1: _slab_sizes(s_y)}  # slab sides across each first axis
  branches = [branch(a, l) for a in (1, 0) for l in sizes[a]]  # horizontal first, then vertical
  v_first = vertical_first(box, out_size)
  extent = jnp.where(v_first, hi[0] - lo[0], hi[1] - lo[1])
  bucket = jnp.where(v_first, jnp.sum(jnp.asarray(sizes[0][:-1]) < extent),
                     jnp.sum(jnp.asarray(sizes[1][:-1]) < extent))
  index = jnp.where(v_first, len(sizes[1]) + bucket, bucket)
  return jax.lax.switch(index, branches, stack)


def _resize_loop(images: jax.Array, levels: jax.Array, view_boxes: jax.Array, out_size: int,
                 kernel: str, block: int = 16) -> jax.Array:
  """`resize_levels` one region and one view at a time (CPU): [B, V, out, out, C]."""
  def region(args):
    stack, level, boxes = args
    return jax.lax.map(
        lambda a: _resize_view_loop(stack, a[0], a[1], out_size, kernel, block), (level, boxes))
  return jax.lax.map(region, (images, levels.astype(jnp.int32), view_boxes.astype(jnp.float32)))


def use_loop(images: jax.Array) -> bool:
  """Whether "auto" picks the per-region loops: on CPU, unless the batch axis is explicitly
  sharded (a loop over a sharded axis would gather it; there the batched forms shard as is)."""
  spec = jax.typeof(images).sharding.spec
  sharded = bool(spec) and spec[0] is not None
  return jax.default_backend() == "cpu" and not sharded


def resize_levels(images: jax.Array, view_boxes: jax.Array, out_size: int, *,
                  kernel: str = "bicubic", method: str = "auto",
                  levels: jax.Array | None = None) -> jax.Array:
  """Crops and resizes every view box of every image; returns 8-bit levels as float32.

  Args:
    images: uint8/float[B, S_y, S_x, C] zero-padded images (values 0..255), or [B, L, S_y, S_x,
      C]: L windows per region (`views.windows`); non-square ones are padded to square.
    view_boxes: int[B, V, 4] integer crop boxes (x1, y1, x2, y2) inside each true image, or
      float ones in the pixels of the window `levels` names (fractions on coarser levels).
    out_size: output side.
    kernel: "bicubic" (views) or "lanczos" (imagehash).
    method: "loop" (one view at a time, real slices; CPU), "blocked", "banded", "dense"
      (batched; accelerators and sharded batches), or "auto" (loop on CPU with an unsharded
      batch, else blocked). See the module docstring; all give the same numbers.
    levels: int[B, V], the window of each view (None: window 0).
  Returns:
    float32[B, V, out, out, C] with integer values in [0, 255], as PIL's 8-bit result.
  """
  if images.ndim == 4:
    images = images[:, None]
  if levels is None:
    levels = jnp.zeros(view_boxes.shape[:2], jnp.int32)
  if method == "auto":
    method = "loop" if use_loop(images) else "blocked"
  if method == "loop":
    return _resize_loop(images, levels, view_boxes, out_size, kernel)
  size = max(images.shape[2], images.shape[3])
  # Kept in the input dtype (uint8 for images): the two layouts below double the image memory,
  # and windows are converted to float32 only once sliced.
  images = jnp.pad(images, ((0, 0), (0, 0), (0, size - images.shape[2]),
                            (0, size - images.shape[3]), (0, 0)))
  taps = max_taps(size, out_size, FILTERS[kernel][1])
  one = lambda img, box: _resize_one(img, box, out_size, taps, kernel, method)
  boxes = view_boxes.astype(jnp.float32)
  if images.shape[1] == 1:  # one window per region, shared by its views
    images = images[:, 0]
    both = jnp.concatenate([jnp.swapaxes(images, 1, 2), images], axis=1)  # [B, 2S, S, C]
    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(both, boxes)
  # Each view's own window: [B, V, S, S, C].
  picked = jnp.take_along_axis(images, levels[:, :, None, None, None].astype(jnp.int32), axis=1)
  both = jnp.concatenate([jnp.swapaxes(picked, 2, 3), picked], axis=2)  # [B, V, 2S, S, C]
  return jax.vmap(jax.vmap(one))(both, boxes)


def normalize(x: jax.Array, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
  """(x − mean) / std over the last (channel) axis; x in [0, 1]."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std


def crop_resize(images: jax.Array, image_hw: jax.Array, view_boxes: jax.Array, out_size: int,
                *, method: str = "auto", levels: jax.Array | None = None) -> jax.Array:
  """Bicubic crop-and-resize of each view, as PIL's `crop.resize((out, out), BICUBIC)` / 255.

  Args:
    images: uint8[B, S, S, 3] images zero-padded bottom/right, or uint8[B, L, S, S, 3] windows
      (`views.windows`).
    image_hw: int[B, 2] true (height, width); the view boxes must already lie inside it
      (`boxes.view_boxes` clips them), so it only documents the contract here.
    view_boxes: int[B, V, 4] integer crop boxes, or float ones in window `levels` pixels.
    out_size: output side (224).
    method: "auto", "loop", "blocked", "banded" or "dense" (same result; see resize_levels).
    levels: int[B, V] the window of each view (None: window 0).
  Returns:
    float32[B, V, out, out, 3] in [0, 1].
  """
  del image_hw  # the boxes are clipped to the true image by construction
  return resize_levels(images, view_boxes, out_size, kernel="bicubic", method=method,
                       levels=levels) / 255.0
