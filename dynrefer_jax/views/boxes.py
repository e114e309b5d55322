"""Nested view boxes (SPEC §2): box(t) = b + t·(I − b), from the tight box (t=0) to the image.

Everything follows the original processor's arithmetic so that the integer crop boxes agree
exactly:
  * the referent box is first forced to at least 1 px per side (the annotation reader's rule);
  * box(t) is computed in float32 (the original: a float32 numpy array times a Python float),
    product rounded before the addition (no fused multiply-add);
  * each view box is clipped to [0, W]×[0, H] and truncated to an integer;
  * the referent box inside a view is the clipped, truncated referent, shifted by the crop
    origin and scaled by (out/w_crop, out/h_crop) in float32, then truncated again (the
    original's torchvision `Resize` scales an int64 `BoundingBoxes` and casts back to int64).

Shapes: B regions, V views. Boxes are (x1, y1, x2, y2) in pixels; `image_hw` is (height, width).
The functions run on the device (jnp, inside jit) and, with `xp=np`, on the host with the same
float32 operations (the host builds each region's windows and hash samples around the crops the
device will cut: `views.windows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The original's candidate context views t_k = k/10, k = 1..10 (the reference view t=0 is fixed).
CANDIDATE_TS = tuple((k + 1) / 10 for k in range(10))


def force_min_size(box: jax.Array, image_hw: jax.Array, *, xp=jnp) -> jax.Array:
  """Forces a referent box to at least 1 px wide and high, as the original annotation reader.

  Its rule, per axis: if x1 >= x2 − 1 then x1 := x2 − 1 when x2 > 0, else x2 := x1 + 1 when
  x1 < W (a box that touches neither side is left alone). Idempotent on already valid boxes.

  Args:
    box: float[B, 4] (x1, y1, x2, y2).
    image_hw: int[B, 2] (height, width).
  Returns:
    float32[B, 4].
  """
  box = xp.asarray(box).astype(xp.float32)
  size = xp.asarray(image_hw)[:, ::-1].astype(xp.float32)  # (W, H)
  lo, hi = box[:, :2], box[:, 2:]
  thin = lo >= hi - 1
  move_lo = thin & (hi > 0)
  move_hi = thin & ~move_lo & (size - lo > 0)
  lo, hi = xp.where(move_lo, hi - 1, lo), xp.where(move_hi, lo + 1, hi)
  return xp.concatenate([lo, hi], axis=-1)


def interpolate_boxes(box: jax.Array, image_hw: jax.Array, ts: jax.Array, *, xp=jnp
                      ) -> jax.Array:
  """box(t) = b + (I − b)·t in float32, before clipping (the hash crops of the original).

  Args:
    box: float[B, 4]; image_hw: int[B, 2]; ts: float[B, V].
  Returns:
    float32[B, V, 4].
  """
  b = force_min_size(box, image_hw, xp=xp)
  image_hw = xp.asarray(image_hw)
  h, w = image_hw[:, 0].astype(xp.float32), image_hw[:, 1].astype(xp.float32)
  zero = xp.zeros_like(h)
  full = xp.stack([zero, zero, w, h], axis=-1)
  step = (full - b)[:, None, :] * xp.asarray(ts).astype(xp.float32)[:, :, None]
  # numpy rounds the product before adding; XLA's backend would contract the two into one
  # FMA (a single rounding), which moves truncated coordinates by a pixel in ~1% of boxes.
  # A select between them (a no-op here: it only maps NaN to 0, and NaN boxes are rejected)
  # breaks the multiply-add pattern, so the product is rounded to float32 as in numpy.
  step = xp.where(step == step, step, xp.float32(0.0))
  return b[:, None, :] + step


def clip_truncate(box: jax.Array, image_hw: jax.Array, *, xp=jnp) -> jax.Array:
  """Clips float boxes [..., 4] to [0, W]×[0, H] and truncates to int32 (as `.to(int64)`).

  Args:
    box: float[B, ..., 4]; image_hw: int[B, 2].
  Returns:
    int32[B, ..., 4].
  """
  extra = (1,) * (box.ndim - 2)
  image_hw = xp.asarray(image_hw)
  h = image_hw[:, 0].astype(xp.float32).reshape((-1,) + extra)
  w = image_hw[:, 1].astype(xp.float32).reshape((-1,) + extra)
  x1 = xp.clip(box[..., 0], 0, w)
  y1 = xp.clip(box[..., 1], 0, h)
  x2 = xp.clip(box[..., 2], 0, w)
  y2 = xp.clip(box[..., 3], 0, h)
  # Values are >= 0 after clipping, so truncation toward zero equals floor.
  return xp.stack([x1, y1, x2, y2], axis=-1).astype(xp.int32)


def view_boxes(box: jax.Array, image_hw: jax.Array, ts: jax.Array, *, xp=jnp) -> jax.Array:
  """Integer crop boxes of the views box(t) (SPEC §2).

  Args:
    box: float[B, 4] referent boxes (x1, y1, x2, y2) in image pixels.
    image_hw: int[B, 2] true (height, width) of each region's image.
    ts: float[B, V] the view parameters t in [0, 1].
  Returns:
    int32[B, V, 4] crop boxes, clipped to the image and truncated.
  """
  return clip_truncate(interpolate_boxes(box, image_hw, ts, xp=xp), image_hw, xp=xp)


def boxes_in_views(box: jax.Array, view_boxes: jax.Array, out_size: int,
                   image_hw: jax.Array | None = None) -> jax.Array:
  """The referent box in each view's resized coordinates (SPEC §2, "Box inside each view").

  The original truncates after scaling (its int64 box goes through torchvision's Resize and
  back to int64), so the result holds integers; a degenerate crop is guarded against division
  by zero (such boxes are rejected by `validate_boxes` before the step).

  Args:
    box: float[B, 4] referent boxes in image pixels.
    view_boxes: int[B, V, 4] from `view_boxes`.
    out_size: side of the resized views (224).
    image_hw: int[B, 2] (height, width). With it, the referent goes through the same 1-px rule
      and clipping as the views (the original's referent is its clipped t=0 view box); without
      it, the referent is only truncated, which is the same for boxes inside the image.
  Returns:
    float32[B, V, 4] in [0, out_size] pixels of each view.
  """
  if image_hw is None:
    ref = jnp.trunc(box.astype(jnp.float32)).astype(jnp.int32)
  else:
    ref = clip_truncate(force_min_size(box, image_hw), image_hw)  # int32[B, 4]
  origin = jnp.concatenate([view_boxes[..., :2], view_boxes[..., :2]], axis=-1)
  rel = ref[:, None, :] - origin  # int32[B, V, 4]
  wh = jnp.maximum(view_boxes[..., 2:] - view_boxes[..., :2], 1).astype(jnp.float32)
  ratio = jnp.float32(out_size) / wh  # (out/w_crop, out/h_crop), float32 as torch.tensor(...)
  ratio = jnp.concatenate([ratio, ratio], axis=-1)
  return jnp.trunc(rel.astype(jnp.float32) * ratio)


def validate_boxes(box: np.ndarray, image_hw: np.ndarray, region_ids=None) -> None:
  """Host-side check before a step: rejects boxes the original could not process.

  Raises ValueError naming the first offending region index for: non-finite coordinates, a box
  with x2 < x1 or y2 < y1 after clipping to the image, or a box that is empty after clipping
  (it lies outside the image, so no pixel of it can be cropped; the original crashes on it).

  Args:
    box: float[B, 4] (x1, y1, x2, y2); image_hw: int[B, 2] (height, width).
    region_ids: optional [B] names for the messages (default: the row index).
  """
  name = lambda i: f"region {region_ids[i] if region_ids is not None else i}"
  box = np.asarray(box, np.float32)
  image_hw = np.asarray(image_hw)
  if box.ndim != 2 or box.shape[-1] != 4 or image_hw.shape != (box.shape[0], 2):
    raise ValueError(f"expected box [B, 4] and image_hw [B, 2], got {box.shape}, {image_hw.shape}")
  bad = ~np.isfinite(box).all(-1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{name(i)}: box {box[i].tolist()} has non-finite coordinates")
  h = image_hw[:, 0].astype(np.float32)
  w = image_hw[:, 1].astype(np.float32)
  x1, x2 = np.clip(box[:, 0], 0, w), np.clip(box[:, 2], 0, w)
  y1, y2 = np.clip(box[:, 1], 0, h), np.clip(box[:, 3], 0, h)
  bad = (x2 < x1) | (y2 < y1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{name(i)}: box {box[i].tolist()} has x2 < x1 or y2 < y1 after clipping "
                     f"to the {int(w[i])}x{int(h[i])} image")
  # Apply the 1-px rule in numpy and look for crops left empty by clipping.
  forced = force_min_size(box, image_hw, xp=np)
  upper = np.stack([w, h, w, h], -1)
  x1, y1, x2, y2 = np.clip(forced, 0, upper).astype(np.int64).T
  bad = (x2 <= x1) | (y2 <= y1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{name(i)}: box {box[i].tolist()} is empty after clipping to the "
                     f"{int(w[i])}x{int(h[i])} image")
