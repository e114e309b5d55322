"""Which views each region gets (SPEC §2 training sampling, §8 inference selection), and the views.

A view is a value t in [0, 1] (box(t) = b + t·(I − b)); `ts` is float32[B, V] with the fixed
reference view t = 0 first. The model concatenates views along channels, so the order of ts is
part of the contract.

Methods of `select_ts` (chosen by config):
  "phash"     the original's image prior (SPEC §8): score_k = Hamming(h0, h_k) / t_k over the 10
              candidates, top-(V−1) by repeated argmax (ties to the smaller t).
  "imagehash" the same with `imagehash.phash` as the hash.
  "fixed"     a task prior or an explicit list: `fixed_ts` (length V) for every region.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynrefer_jax.views import boxes as boxes_lib
from dynrefer_jax.views import crop_resize, phash, windows

METHODS = ("phash", "imagehash", "fixed")


def sample_train_ts(rng: jax.Array, batch: int, num_views: int = 3) -> jax.Array:
  """Training views: t = 0, then num_views − 1 distinct candidates in drawn order.

  The original draws `random.sample(range(10), n − 1)` per region: uniform without replacement,
  order random. A uniformly random permutation's first n − 1 entries have that distribution.

  Returns:
    float32[batch, num_views].
  """
  k = num_views - 1
  if not 0 <= k <= len(boxes_lib.CANDIDATE_TS):
    raise ValueError(
        f"num_views must be in [1, {len(boxes_lib.CANDIDATE_TS) + 1}], got {num_views}")
  keys = jax.random.split(rng, batch)
  num = len(boxes_lib.CANDIDATE_TS)
  order = jax.vmap(lambda key: jax.random.permutation(key, num))(keys)[:, :k]
  return jnp.concatenate([jnp.zeros((batch, 1), jnp.float32), _candidate_t(order)], axis=1)


def _candidate_t(index: jax.Array) -> jax.Array:
  """CANDIDATE_TS[index] as float32, by one-hot (sharding-friendly; see greedy_select)."""
  cands = jnp.asarray(boxes_lib.CANDIDATE_TS, jnp.float32)
  return jnp.sum(jax.nn.one_hot(index, cands.shape[0], dtype=jnp.float32) * cands, axis=-1)


def _score_ranks() -> np.ndarray:
  """int32[65, 10]: rank of the original's float64 score d / t_k among all possible scores.

  Ranking the exact float64 values the original compares makes ties (e.g. 1/0.1 vs 2/0.2)
  resolve exactly as its argmax does, with int32 arithmetic on the device. Rank 0 is score 0,
  the value the original writes over a chosen candidate.
  """
  scores = np.arange(65, dtype=np.float64)[:, None] / np.asarray(boxes_lib.CANDIDATE_TS)[None, :]
  values = np.unique(scores)
  return np.searchsorted(values, scores).astype(np.int32)


_RANKS = _score_ranks()


def greedy_select(ref_bits: jax.Array, cand_bits: jax.Array, num_select: int) -> jax.Array:
  """The original's greedy pick: indices of the top-`num_select` candidates.

  Args:
    ref_bits: bool[B, 64] hash of the t = 0 view.
    cand_bits: bool[B, 10, 64] hashes of the candidates t = 0.1 … 1.0.
    num_select: V − 1.
  Returns:
    int32[B, num_select] candidate indices in selection order. As in the original, a chosen
    score is set to 0 and the next argmax may pick an index again when all remaining scores
    are 0 (only when every candidate hashes like the reference).
  """
  dist = jnp.sum(ref_bits[:, None, :] != cand_bits, axis=-1)  # [B, 10] Hamming distances
  # A one-hot lookup instead of a gather: with the batch sharded (explicit mesh axes), indexing
  # a replicated table by sharded indices is ambiguous to the partitioner.
  ranks = jnp.sum(jax.nn.one_hot(dist, 65, dtype=jnp.int32) * jnp.asarray(_RANKS.T)[None],
                  axis=-1)
  picks = []
  for _ in range(num_select):
    best = jnp.argmax(ranks, axis=1)  # first maximum: ties go to the smaller t
    picks.append(best)
    ranks = jnp.where(jnp.arange(ranks.shape[1])[None, :] == best[:, None], 0, ranks)
  return jnp.stack(picks, axis=1).astype(jnp.int32) if picks else jnp.zeros(
      (dist.shape[0], 0), jnp.int32)


def candidate_boxes(image_hw: jax.Array, box: jax.Array) -> jax.Array:
  """int32[B, 11, 4]: the integer boxes of t = 0 and the 10 candidates, as the hash crops them.

  The original truncates the unclipped float box for its hash; for referents inside the image
  that equals the clipped box used here (a referent partly outside would crash the original).
  """
  b = box.shape[0]
  ts = jnp.broadcast_to(jnp.asarray((0.0,) + boxes_lib.CANDIDATE_TS, jnp.float32), (b, 11))
  return boxes_lib.view_boxes(box, image_hw, ts)


def select_ts(method: str, images: jax.Array, image_hw: jax.Array, box: jax.Array,
              num_views: int = 3, fixed_ts: Sequence[float] | None = None, *,
              impl: str = "auto", window: jax.Array | None = None,
              hash_pixels: jax.Array | None = None) -> jax.Array:
  """Inference views of every region.

  Args:
    method: "phash", "imagehash" or "fixed" (see the module docstring).
    images: uint8[B, S, S, 3] zero-padded images, or uint8[B, L, S, S, 3] windows
      (`views.windows`).
    image_hw: int[B, 2] true (height, width).
    box: float[B, 4] referent boxes.
    num_views: V (1 gives the single view t = 0 for the hash methods).
    fixed_ts: for "fixed": the V values of t, in view order (e.g. (0.0, 0.4, 0.5), or (1.0,)
      for a single whole-image view).
    impl: how the hashes are computed: "loop" (per region, windowed; CPU), "dense" (batched;
      accelerators, sharded batches) or "auto" (see phash.resolve_impl). Same bits.
    window: float32[B, L, 6] the windows' geometry; None: window 0 is the whole image.
    hash_pixels: uint8[B, 11, 448, 448] (`windows.hash_samples`): the "phash" hashes come from
      them (exact at any image size); None: from window 0, which then holds the whole image at
      full resolution.
  Returns:
    float32[B, V].
  """
  batch = box.shape[0]
  if method == "fixed":
    if fixed_ts is None or len(fixed_ts) != num_views:
      raise ValueError(f"method 'fixed' needs fixed_ts with {num_views} values, got {fixed_ts}")
    return jnp.broadcast_to(jnp.asarray(fixed_ts, jnp.float32), (batch, num_views))
  if method not in METHODS:
    raise ValueError(f"unknown view selection method {method!r}; expected one of {METHODS}")
  zeros = jnp.zeros_like(box[:, :1], jnp.float32)  # carries the batch sharding of `box`
  if num_views == 1:
    return zeros
  crops = candidate_boxes(image_hw, box)
  if method == "phash" and hash_pixels is not None:
    bits = phash.opencv_phash_sampled(hash_pixels, crops)  # [B, 11, 64]
  elif method == "phash":
    bits = phash.opencv_phash(images if images.ndim == 4 else images[:, 0], crops, impl=impl)
  else:
    resize = "auto" if impl == "auto" else ("loop" if impl == "loop" else "blocked")
    levels = None
    if window is not None:
      levels, crops = windows.locate(window, crops)
    bits = phash.imagehash_phash(images, crops, method=resize, levels=levels)
  picks = greedy_select(bits[:, 0], bits[:, 1:], num_views - 1)
  return jnp.concatenate([zeros, _candidate_t(picks)], axis=1)


def build_views(images: jax.Array, image_hw: jax.Array, box: jax.Array, ts: jax.Array,
                out_size: int, *, method: str = "auto", window: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """The views the vision tower sees, and the referent box in each.

  Args:
    images: uint8[B, S, S, 3] zero-padded images, or uint8[B, L, S, S, 3] windows
      (`views.windows`); image_hw: int[B, 2]; box: float[B, 4]; ts: float[B, V].
    out_size: the vision tower's input side (224).
    method: crop_resize's "auto", "loop", "blocked", "banded" or "dense" (same numbers).
    window: float32[B, L, 6] the windows' geometry; None: window 0 is the whole image.
  Returns:
    pixels: float32[B, V, out, out, 3], CLIP-normalised.
    boxes_in_view: float32[B, V, 4] in each view's pixels.
  """
  crops = boxes_lib.view_boxes(box, image_hw, ts)
  levels, local = None, crops
  if window is not None:
    levels, local = windows.locate(window, crops)
  pixels = crop_resize.crop_resize(images, image_hw, local, out_size, method=method,
                                   levels=levels)
  return crop_resize.normalize(pixels), boxes_lib.boxes_in_views(box, crops, out_size, image_hw)
