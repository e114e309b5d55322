"""View boxes vs a direct per-region reference written from SPEC §2 (numpy float32 + Python).

The reference transcribes the original's arithmetic one region at a time: the 1-px rule of the
annotation reader, box(t) = b + (I − b)·t on a float32 array with a Python float t, clipping to
[0, W]×[0, H], int64 truncation; the referent in each view shifted by the crop origin, times
float32(out / w_crop) as torch does, truncated back to int64. Tolerance: exact (integers).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynrefer_jax.views import boxes as vb

OUT = 224


def _force_ref(b, w, h):
  x1, y1, x2, y2 = [float(v) for v in b]
  if x1 >= x2 - 1 and x2 - 0 > 0:
    x1 = x2 - 1
  elif x1 >= x2 - 1 and w - x1 > 0:
    x2 = x1 + 1
  if y1 >= y2 - 1 and y2 - 0 > 0:
    y1 = y2 - 1
  elif y1 >= y2 - 1 and h - y1 > 0:
    y2 = y1 + 1
  return np.array([x1, y1, x2, y2], np.float32)


def _view_ref(b, w, h, t):
  full = np.array([0, 0, w, h], np.float32)
  box = _force_ref(b, w, h)
  v = box + (full - box) * float(t)  # float32 array times a Python float stays float32
  v = np.array([min(max(v[0], 0), w), min(max(v[1], 0), h),
                min(max(v[2], 0), w), min(max(v[3], 0), h)], np.float32)
  return v.astype(np.int64)


def _in_view_ref(b, w, h, view):
  ref = _view_ref(b, w, h, 0.0)
  rel = ref - np.array([view[0], view[1], view[0], view[1]], np.int64)
  wr, hr = max(view[2] - view[0], 1), max(view[3] - view[1], 1)
  ratio = np.array([OUT / wr, OUT / hr, OUT / wr, OUT / hr], np.float32)
  return (rel.astype(np.float32) * ratio).astype(np.int64)


def _random_boxes(rng, n):
  h = rng.integers(1, 1200, n)
  w = rng.integers(1, 1200, n)
  kind = rng.integers(0, 6, n)
  x1 = rng.uniform(-0.2, 1.2, n) * w
  y1 = rng.uniform(-0.2, 1.2, n) * h
  x2 = x1 + rng.uniform(0, 1, n) * w
  y2 = y1 + rng.uniform(0, 1, n) * h
  boxes = np.stack([x1, y1, x2, y2], -1)
  # Degenerate: zero or sub-pixel size, inverted, exactly on the borders, integer coordinates.
  boxes[kind == 1, 2] = boxes[kind == 1, 0] + rng.uniform(0, 1, (kind == 1).sum())
  boxes[kind == 1, 3] = boxes[kind == 1, 1]
  boxes[kind == 2] = np.stack([np.zeros(n), np.zeros(n), w, h], -1)[kind == 2]
  boxes[kind == 3] = np.round(boxes[kind == 3])
  boxes[kind == 4, 0] = boxes[kind == 4, 2] + 3  # inverted
  boxes[kind == 5] = np.stack([w - 1, h - 0.5, w, h], -1)[kind == 5]
  return boxes.astype(np.float32), np.stack([h, w], -1).astype(np.int32)


def test_view_boxes_match_reference_10000():
  rng = np.random.default_rng(0)
  n, v = 10_000, 3
  boxes, hw = _random_boxes(rng, n)
  cands = np.asarray((0.0,) + vb.CANDIDATE_TS, np.float32)
  ts = cands[rng.integers(0, 11, (n, v))]
  ts[:, 0] = 0
  ts[: n // 10, 1] = rng.uniform(0, 1, n // 10)  # arbitrary t as well
  fn = jax.jit(lambda b, s, t: (vb.view_boxes(b, s, t),
                                vb.boxes_in_views(b, vb.view_boxes(b, s, t), OUT, s)))
  got, in_view = map(np.asarray, fn(boxes, hw, ts))
  assert got.dtype == np.int32 and got.shape == (n, v, 4)
  mismatches = []
  for i in range(n):
    h, w = int(hw[i, 0]), int(hw[i, 1])
    for j in range(v):
      ref = _view_ref(boxes[i], w, h, np.float32(ts[i, j]))
      if not np.array_equal(got[i, j], ref):
        mismatches.append((i, j, boxes[i], ts[i, j], got[i, j], ref))
        continue
      ref_in = _in_view_ref(boxes[i], w, h, ref)
      if not np.array_equal(in_view[i, j], ref_in):
        mismatches.append((i, j, "in view", got[i, j], in_view[i, j], ref_in))
  assert not mismatches, (len(mismatches), mismatches[:5])


def test_candidates_and_reference_view():
  assert vb.CANDIDATE_TS == tuple(k / 10 for k in range(1, 11))
  box = np.array([[10.2, 20.7, 110.9, 60.1]], np.float32)
  hw = np.array([[480, 640]], np.int32)
  views = np.asarray(vb.view_boxes(box, hw, np.array([[0.0, 0.5, 1.0]], np.float32)))
  # Hand-computed: t=0 truncates, t=1 is the image, t=0.5 the midpoint (truncated).
  np.testing.assert_array_equal(views[0], [[10, 20, 110, 60], [5, 10, 375, 270], [0, 0, 640, 480]])
  in_view = np.asarray(vb.boxes_in_views(box, views, OUT, hw))
  np.testing.assert_array_equal(np.asarray(vb.boxes_in_views(box, views, OUT)), in_view)
  np.testing.assert_array_equal(in_view[0, 0], [0, 0, 224, 224])
  # View 2 (whole image): x1 = trunc(10 · 224/640) = 3, y2 = trunc(60 · 224/480) = 28.
  np.testing.assert_array_equal(in_view[0, 2], [3, 9, 38, 28])


def test_one_pixel_rule():
  hw = np.array([[100, 100]] * 3, np.int32)
  box = np.array([[5.5, 7, 5.5, 7.2], [0, 0, 0, 0], [20, 30, 20.5, 50]], np.float32)
  got = np.asarray(vb.view_boxes(box, hw, np.zeros((3, 1), np.float32)))[:, 0]
  # x1 := x2 − 1 when x2 > 0; otherwise x2 := x1 + 1.
  np.testing.assert_array_equal(got, [[4, 6, 5, 7], [0, 0, 1, 1], [19, 30, 20, 50]])


@pytest.mark.parametrize("bad,index,word", [
    ((np.nan, 0, 5, 5), 1, "non-finite"),
    ((0, 0, np.inf, 5), 1, "non-finite"),
    ((50, 10, 20, 40), 1, "x2 < x1"),
    ((150, 10, 160, 40), 1, "empty"),
])
def test_validate_boxes_names_region(bad, index, word):
  boxes = np.array([[1, 1, 10, 10], bad, [2, 2, 3, 3]], np.float32)
  hw = np.array([[100, 100]] * 3, np.int32)
  with pytest.raises(ValueError, match=f"region {index}.*{word}"):
    vb.validate_boxes(boxes, hw)


def test_validate_boxes_accepts_valid_and_degenerate():
  boxes = np.array([[1, 1, 10, 10], [5, 5, 5, 5], [0, 0, 100, 100], [-10, -5, 30, 200]],
                   np.float32)
  vb.validate_boxes(boxes, np.array([[100, 100]] * 4, np.int32))


def test_predictor_rejects_bad_boxes_before_the_step_naming_the_region():
  # Inference validates the real rows (mask True) and names them by region_id; padding rows
  # (zero boxes on zero-size images) are not checked.
  from dynrefer_jax.inference import Predictor
  batch = {"box": np.array([[1, 1, 5, 5], [np.nan, 0, 3, 3], [0, 0, 0, 0]], np.float32),
           "image_hw": np.array([[10, 10], [10, 10], [0, 0]], np.int32),
           "mask": np.array([True, True, False]), "region_id": np.array([70, 71, -1]),
           "image": np.zeros((3, 10, 10, 3), np.uint8)}
  with pytest.raises(ValueError, match=r"^region 71: box \[nan, 0.0, 3.0, 3.0\] has non-finite"):
    Predictor.__call__(object.__new__(Predictor), None, batch)
