"""The windows a region's views are cut from, at any image size: built on the host, read on the
device.

The original crops every view from the full-resolution image and resizes the crop to 224 with
PIL's bicubic filter, which is antialiased: its support grows with the crop, so a view of a
12000-px crop reads every pixel of the crop. The device gets, per region, a few windows of a
fixed side S instead of the image:

  level 0   the image itself (full resolution), the S×S window around the region's box (the
            whole image when it fits);
  level l   the image halved l times (PIL Lanczos, each level from the one before), the S×S
            window around the region's widest view that spans at most S − MARGIN of its pixels;
            the last level holds the whole image.

A view (any t) is cut from the finest window that contains its crop (`locate`), in that
window's pixels: exactly PIL's crop + resize when that is level 0 (every view of an image that
fits in S, and every view whose crop fits in the level-0 window), and from a level l ≥ 1
otherwise: PIL's bicubic weights over the crop's (fractional) extent in the level's pixels.
That second case is an approximation, and necessarily so: no bounded representation gives PIL's
result exactly while leaving the resize to the device. PIL rounds the first pass to 8 bits, so
an exact device result needs that pass's [crop height, 224] output for every candidate view, and
the second pass's input cannot be reduced further without doing that pass (its 224 rows of
weights are linearly independent). Measured against PIL on the full-resolution image
(tests/test_full_resolution.py, BENCHMARKS.md): at S = 1024 a level-l view has a crop of at
least (S − MARGIN)/2 level pixels, over twice the output, so the prefilter (Lanczos, sharper
than the bicubic it feeds) barely shows: mean |difference| 0.1–0.4 of a level on photographs
and on uniform noise, against the issue's bound of one level.

The pHash (SPEC §8) is exact at every size: OpenCV's bilinear resize to 224 reads only two rows
and two columns per output pixel, so a crop's hash depends on at most 448 × 448 of its pixels.
Batches whose images do not all fit in one window, or whose window is wider than
HASH_WINDOW_MAX, carry those pixels (`hash_pixels`: gray levels, `hash_samples`) for the t = 0
box and the ten candidates; otherwise the hash reads window 0, the whole image (the per-crop
loop of `phash` compiles a branch per crop size class, too many for wide windows).

Per region, host → device bytes and device memory are L·S²·3 (+ 11·448² with `hash_pixels`),
whatever the image size: L = 1 for an image that fits in one window (S up to
max(window_size, CONTEXT_SIDE)), and at most MAX_LEVELS = 5, which covers images up to 16 S px
on the longer side at the full factor-2 spacing (larger ones get a last level shrunk to fit).

Batch keys (docs/ARCHITECTURE.md): `image` uint8[B, L, S, S, 3], `window` float32[B, L, 6] =
(x0, y0, sx, sy, w, h): the window's first pixel in its level's pixels, the full-resolution
pixels per level pixel, and the valid width and height (w = h = 0: no window); `hash_pixels`
uint8[B, 11, 448, 448] where present.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynrefer_jax.views import boxes as boxes_lib

CONTEXT_SIDE = 1024  # window side once an image has coarser levels (see the accuracy above)
MAX_LEVELS = 5
MARGIN = 4           # level pixels of slack around the widest view a window is placed for
HASH_CROPS = 1 + len(boxes_lib.CANDIDATE_TS)  # t = 0 and the candidates (select.candidate_boxes)
HASH_SIDE = 448      # 2 × OpenCV's 224-px resize: the most rows or columns a hash crop reads
GEOMETRY = 6         # (x0, y0, sx, sy, w, h)
HASH_WINDOW_MAX = 256  # wider single windows hash from hash_pixels too (see above)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shapes of a batch's windows: side S, L levels, and whether it carries hash pixels."""
  side: int
  levels: int
  hash: bool


def level_sizes(hw: Sequence[int], side: int, levels: int) -> list[tuple[int, int]]:
  """(height, width) of the level images of an H×W image, up to the first that fits in side
  (at most `levels`): level 0 is the image, level l the image halved l times (rounded); the
  last allowed level is shrunk further when it still does not fit."""
  h, w = int(hw[0]), int(hw[1])
  sizes = [(h, w)]
  while max(sizes[-1]) > side and len(sizes) < levels:
    f = 2 ** len(sizes)
    sizes.append((max(1, int(h / f + 0.5)), max(1, int(w / f + 0.5))))
  if max(sizes[-1]) > side:
    s = side / max(h, w)
    sizes[-1] = (min(side, max(1, int(h * s + 0.5))), min(side, max(1, int(w * s + 0.5))))
  return sizes


def layout(max_side: int, window_size: int) -> Layout:
  """The layout for images up to `max_side` px. They fit in one window when max_side <=
  max(window_size, CONTEXT_SIDE): a window of max_side rounded up to 32 (a dataset of small
  images pays no more), the whole image, exact, no hash pixels. Otherwise windows of that side,
  as many levels as the largest image needs, and hash pixels."""
  side = max(int(window_size), CONTEXT_SIDE)
  if max_side <= side:
    fit = min(side, -(-int(max_side) // 32) * 32)
    return Layout(fit, 1, fit > HASH_WINDOW_MAX)
  return Layout(side, len(level_sizes((max_side, max_side), side, MAX_LEVELS)), True)


def fixed_layout(max_side: int, window_size: int) -> Layout:
  """`layout` in a few fixed shapes, one compile each (predict, the demo): images up to
  window_size in one window_size window (the training data's shape), up to CONTEXT_SIDE in one
  window of the next power of two, any larger one in MAX_LEVELS windows with hash pixels."""
  side = max(int(window_size), CONTEXT_SIDE)
  if max_side <= window_size:
    return Layout(int(window_size), 1, int(window_size) > HASH_WINDOW_MAX)
  if max_side <= side:
    fit = min(side, 1 << (int(max_side) - 1).bit_length())
    return Layout(fit, 1, fit > HASH_WINDOW_MAX)
  return Layout(side, MAX_LEVELS, True)


# ------------------------------------------------------------------------------------ host

@dataclasses.dataclass
class Prepared:
  """An image ready to give windows: its `pyramid` levels, and its OpenCV gray (for the hash
  pixels, when the layout has them), computed once per image and shared by its regions."""
  levels: list
  gray: np.ndarray | None = None

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.levels) + (0 if self.gray is None else self.gray.nbytes)


def prepare(image: np.ndarray, lay: Layout) -> Prepared:
  """uint8[H, W, 3] → its levels for `lay` (and gray when lay.hash)."""
  return Prepared(pyramid(image, lay.side, lay.levels), gray_opencv(image) if lay.hash else None)


def pyramid(image: np.ndarray, side: int, levels: int) -> list[np.ndarray]:
  """The level images of uint8[H, W, 3] (`level_sizes`), each from the one before with PIL's
  Lanczos filter (antialiased). Level 0 is `image` itself (not copied)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = [image]
  for h, w in level_sizes(image.shape[:2], side, levels)[1:]:
    prev = Image.fromarray(out[-1])
    out.append(np.asarray(prev.resize((w, h), Image.LANCZOS), np.uint8))
  return out


def _fit_t(lo: float, hi: float, size: int, room: float) -> float:
  """The largest t with (hi − lo) + t·(size − (hi − lo)) <= room (−inf: not even t = 0)."""
  width = hi - lo
  grow = size - width
  if grow <= 0:
    return 1.0 if width <= room else -math.inf
  return (room - width) / grow


def _origin(lo: float, hi: float, size: int, side: int) -> int:
  """A window of `side` pixels centred on [lo, hi), inside [0, size)."""
  if size <= side:
    return 0
  return int(min(max(math.floor((lo + hi) / 2 - side / 2 + 0.5), 0), size - side))


def region_windows(levels: Sequence[np.ndarray], box: Sequence[float], lay: Layout
                   ) -> tuple[np.ndarray, np.ndarray]:
  """One region's windows: (uint8[L, S, S, 3], float32[L, 6] geometry; see the module).

  Args:
    levels: the image's `pyramid` (fewer than lay.levels when a level already fits: the
      remaining windows are empty, w = h = 0).
    box: x1, y1, x2, y2 in full-resolution pixels.
  """
  side = lay.side
  h, w = levels[0].shape[:2]
  b = boxes_lib.force_min_size(np.asarray([box], np.float32), np.asarray([[h, w]]),
                               xp=np)[0].astype(np.float64)
  image = np.zeros((lay.levels, side, side, 3), np.uint8)
  geometry = np.zeros((lay.levels, GEOMETRY), np.float32)
  for l, level in enumerate(levels[:lay.levels]):
    lh, lw = level.shape[:2]
    sx, sy = w / lw, h / lh
    # The widest view that spans at most side − MARGIN level pixels: views are nested, so its
    # window holds every narrower one (any t, not only the candidates).
    t = min(_fit_t(b[0], b[2], w, sx * (side - MARGIN)), _fit_t(b[1], b[3], h, sy * (side - MARGIN)))
    t = min(max(t, 0.0), 1.0)
    x1, y1 = b[0] * (1 - t), b[1] * (1 - t)
    x2, y2 = b[2] + t * (w - b[2]), b[3] + t * (h - b[3])
    ox, oy = _origin(x1 / sx, x2 / sx, lw, side), _origin(y1 / sy, y2 / sy, lh, side)
    vw, vh = min(side, lw - ox), min(side, lh - oy)
    image[l, :vh, :vw] = level[oy:oy + vh, ox:ox + vw]
    geometry[l] = (ox, oy, sx, sy, vw, vh)
  return image, geometry


def _sample_index(lo: int, hi: int) -> np.ndarray:
  """int[HASH_SIDE]: the rows (or columns) OpenCV's bilinear resize of [lo, hi) to 224 reads.

  A crop of n <= 448 pixels: all of them, in order (then the last repeated, never weighted). A
  longer one: the two taps of each output d, src_d and src_d + 1, at positions 2d and 2d + 1,
  with src_d = floor((d + ½)·n/224 − ½) = ((2d + 1)·n − 224) // 448 exactly (OpenCV's float
  computation agrees: that value is never within 1/448 of an integer unless it is one).
  """
  n, out = hi - lo, HASH_SIDE // 2
  if n <= HASH_SIDE:
    return lo + np.minimum(np.arange(HASH_SIDE), max(n - 1, 0))
  d = np.arange(out)
  src = ((2 * d + 1) * n - out) // (2 * out)
  return lo + np.stack([src, src + 1], axis=-1).reshape(-1)


def gray_opencv(rgb: np.ndarray) -> np.ndarray:
  """cv2.cvtColor(RGB2GRAY) of uint8[..., 3] (15-bit fixed point), as phash.gray_opencv."""
  c = rgb.astype(np.int32)
  return ((c[..., 0] * 9798 + c[..., 1] * 19235 + c[..., 2] * 3735 + (1 << 14)) >> 15
          ).astype(np.uint8)


def hash_samples(gray: np.ndarray, box: Sequence[float]) -> np.ndarray:
  """uint8[11, 448, 448]: the pixels of gray uint8[H, W] (`gray_opencv` of the image) that each
  hash crop (t = 0 and the ten candidates) reads."""
  h, w = gray.shape[:2]
  ts = np.asarray([(0.0,) + boxes_lib.CANDIDATE_TS], np.float32)
  crops = boxes_lib.view_boxes(np.asarray([box], np.float32), np.asarray([[h, w]]), ts,
                               xp=np)[0]
  out = np.empty((HASH_CROPS, HASH_SIDE, HASH_SIDE), np.uint8)
  for k, (x1, y1, x2, y2) in enumerate(crops.tolist()):
    rows, cols = _sample_index(y1, max(y2, y1 + 1)), _sample_index(x1, max(x2, x1 + 1))
    out[k] = np.take(np.take(gray, np.minimum(rows, h - 1), axis=0), np.minimum(cols, w - 1),
                     axis=1)  # two takes: ~3x faster than one np.ix_ gather
  return out


def region_input(image: Prepared, box: Sequence[float], lay: Layout) -> dict:
  """One batch row's image keys: image, image_hw, window (and hash_pixels when lay.hash), from
  the image `prepare`d for `lay` (or for a layout with the same side and hash, at least as many
  levels)."""
  windows_, geometry = region_windows(image.levels, box, lay)
  out = {"image": windows_, "image_hw": np.asarray(image.levels[0].shape[:2], np.int32),
         "window": geometry}
  if lay.hash:
    gray = image.gray if image.gray is not None else gray_opencv(image.levels[0])
    out["hash_pixels"] = hash_samples(gray, box)
  return out


def overview(image: np.ndarray, geometry: np.ndarray, image_hw: Sequence[int]
             ) -> tuple[np.ndarray, float, float]:
  """A batch row's whole image from its finest window that holds all of it (for display).

  Args:
    image: uint8[L, S, S, 3], geometry: float[L, 6] (one row's `image` and `window`);
    image_hw: the full-resolution (height, width).
  Returns:
    (uint8[h, w, 3], sx, sy): the image and the full-resolution pixels per pixel of it.
  """
  h, w = image_hw
  for l, (x0, y0, sx, sy, vw, vh) in enumerate(np.asarray(geometry, np.float64)):
    if vw > 0 and x0 == 0 and y0 == 0 and abs(vw * sx - w) < sx and abs(vh * sy - h) < sy:
      return np.asarray(image[l, :int(vh), :int(vw)]), float(sx), float(sy)
  raise ValueError("no window holds the whole image")


# ---------------------------------------------------------------------------------- device

def whole_image(image_hw: jax.Array, levels: int = 1) -> jax.Array:
  """float32[B, levels, 6]: the geometry of batches whose window 0 is the whole image at full
  resolution, at the origin (zero-padded images, the layout before windows); no other window."""
  hw = jnp.asarray(image_hw).astype(jnp.float32)
  zero, one = jnp.zeros_like(hw[:, 0]), jnp.ones_like(hw[:, 0])
  first = jnp.stack([zero, zero, one, one, hw[:, 1], hw[:, 0]], axis=-1)[:, None]
  return jnp.concatenate([first, jnp.zeros((hw.shape[0], levels - 1, GEOMETRY), jnp.float32)], 1)


def locate(window: jax.Array, crops: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Which window each crop is cut from, and the crop in that window's pixels.

  The finest window (lowest level) that contains the crop; none does only through float
  rounding at the image's edge, and then the coarsest one (it holds the whole image).

  Args:
    window: float32[B, L, 6] geometry (x0, y0, sx, sy, w, h).
    crops: int[B, N, 4] crop boxes in full-resolution pixels.
  Returns:
    level int32[B, N]; box float32[B, N, 4] in that window's pixels, within [0, w]×[0, h]
    (integers for level 0, where sx = sy = 1).
  """
  g = window[:, None, :, :]                                    # [B, 1, L, 6]
  c = crops.astype(jnp.float32)[:, :, None, :]                 # [B, N, 1, 4]
  x0, y0, sx, sy, w, h = (g[..., k] for k in range(GEOMETRY))
  local = jnp.stack([c[..., 0] / sx - x0, c[..., 1] / sy - y0,
                     c[..., 2] / sx - x0, c[..., 3] / sy - y0], axis=-1)  # [B, N, L, 4]
  tol = 1e-3
  inside = ((local[..., 0] >= -tol) & (local[..., 1] >= -tol) & (local[..., 2] <= w + tol)
            & (local[..., 3] <= h + tol) & (w > 0) & (h > 0))
  valid = (window[..., 4] > 0) & (window[..., 5] > 0)          # [B, L]
  coarsest = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.int32) - 1  # [B, 1]
  level = jnp.where(jnp.any(inside, -1), jnp.argmax(inside, -1).astype(jnp.int32), coarsest)
  onehot = jax.nn.one_hot(level, window.shape[1], dtype=jnp.float32)[..., None]  # [B, N, L, 1]
  # A one-hot sum picks the level exactly (one term is nonzero) and shards with the batch.
  box = jnp.sum(jnp.where(onehot > 0, local, 0.0), axis=2)
  size = jnp.sum(jnp.where(onehot > 0, g[..., 4:6] + jnp.zeros_like(local[..., :2]), 0.0),
                 axis=2)                                        # [B, N, 2] (w, h)
  upper = jnp.concatenate([size, size], axis=-1)
  return level, jnp.clip(box, 0.0, upper)
