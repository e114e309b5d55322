"""roi_align vs a PyTorch loop reference of torchvision's RoIAlign written from SPEC §3.

The reference follows torchvision's CPU kernel branch by branch (RoI start/size, the ≥ 1 size
rule, (iy + 0.5)/s sample placement, the y < −1 / y > H zero rule, clamping, the
y_low ≥ H − 1 collapse), with scalar loops and autograd; it shares no code with ours.
Tolerances: float32, 1e-5 absolute on O(1) features (reference in float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dynrefer_jax.models.roi_align import roi_align


def _bilinear(fmap, y, x, h, w):
  """torchvision bilinear_interpolate for one sample; fmap: torch [C, H, W]."""
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
          + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def torch_roi_align(features, boxes, out, scale, ratio, aligned):
  """features: torch [N, C, H, W]; boxes [N, 4] (numpy); returns torch [N, C, out, out]."""
  n, c, h, w = features.shape
  offset = 0.5 if aligned else 0.0
  result = []
  for k in range(n):
    x1, y1, x2, y2 = (float(v) for v in boxes[k])
    sw, sh = x1 * scale - offset, y1 * scale - offset
    rw, rh = x2 * scale - offset - sw, y2 * scale - offset - sh
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / out, rw / out
    rows = []
    for ph in range(out):
      cols = []
      for pw in range(out):
        acc = torch.zeros(c, dtype=features.dtype)
        for iy in range(ratio):
          y = sh + ph * bh + (iy + 0.5) * bh / ratio
          for ix in range(ratio):
            x = sw + pw * bw + (ix + 0.5) * bw / ratio
            acc = acc + _bilinear(features[k], y, x, h, w)
        cols.append(acc / max(ratio * ratio, 1))
      rows.append(torch.stack(cols, -1))
    result.append(torch.stack(rows, -2))
  return torch.stack(result)


# Boxes in input pixels on a 6×7 map with scale 1/4 (input space 24×28): the whole map, a box
# touching the bottom/right border, boxes smaller than one cell, partly and fully outside, one
# inverted/degenerate box and one with fractional corners.
BOXES = np.array([
    [0.0, 0.0, 28.0, 24.0],
    [20.0, 16.0, 28.0, 24.0],
    [5.3, 7.1, 6.0, 7.9],
    [-10.0, -6.0, 9.0, 11.0],
    [22.0, 19.0, 40.0, 33.0],
    [30.0, 30.0, 45.0, 40.0],
    [9.0, 9.0, 9.0, 9.0],
    [1.7, 3.2, 17.9, 21.4],
], np.float32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("out,ratio", [(4, 2), (3, 1), (5, 3)])
def test_matches_torchvision_semantics(aligned, out, ratio):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(8, 6, 7, 3)).astype(np.float32)
  ours = roi_align(jnp.asarray(feats), jnp.asarray(BOXES), output_size=out, spatial_scale=0.25,
                   sampling_ratio=ratio, aligned=aligned)
  ref = torch_roi_align(torch.from_numpy(feats).double().permute(0, 3, 1, 2), BOXES, out, 0.25,
                        ratio, aligned).permute(0, 2, 3, 1).numpy()
  assert ours.shape == (8, out, out, 3)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_dynrefer_setting_and_hand_values():
  """16×16 map, 224-px boxes, scale 1/14, ratio 2 (SPEC §3), plus hand-checked values."""
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(3, 16, 16, 2)).astype(np.float32)
  boxes = np.array([[0, 0, 224, 224], [13.0, 40.0, 180.5, 97.0], [100, 100, 101, 101]],
                   np.float32)
  ours = roi_align(jnp.asarray(feats), jnp.asarray(boxes))
  ref = torch_roi_align(torch.from_numpy(feats).double().permute(0, 3, 1, 2), boxes, 16,
                        1 / 14, 2, False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)
  # Hand value: a linear ramp f(y, x) = y is reproduced exactly inside the map. Full box,
  # bin p covers [p, p+1), samples at p + 0.25 and p + 0.75 → mean p + 0.5, except the last
  # bin: both 15.25 and 15.75 lie past the last pixel centre (y_low = 15 ≥ H − 1), so both
  # collapse onto row 15 → 15.
  ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[None, :, None, None], (1, 16, 16, 1))
  got = np.asarray(roi_align(jnp.asarray(ramp), jnp.asarray(boxes[:1])))[0, :, 0, 0]
  want = np.arange(16) + 0.5
  want[-1] = 15.0
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_gradient_matches_torch_autograd():
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(8, 6, 7, 3)).astype(np.float32)
  cot = rng.normal(size=(8, 4, 4, 3)).astype(np.float32)
  g = jax.grad(lambda f: jnp.sum(roi_align(f, jnp.asarray(BOXES), output_size=4,
                                           spatial_scale=0.25) * cot))(jnp.asarray(feats))
  tf = torch.from_numpy(feats).double().permute(0, 3, 1, 2).requires_grad_()
  out = torch_roi_align(tf, BOXES, 4, 0.25, 2, False).permute(0, 2, 3, 1)
  (out * torch.from_numpy(cot).double()).sum().backward()
  ref = tf.grad.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(g), ref, atol=1e-5, rtol=1e-4)


def test_sharded_jit_equals_unsharded(devices8):
  """RoIs sharded 8 ways over a mesh: same result as the single-device call (1e-6)."""
  rng = np.random.default_rng(3)
  feats = jnp.asarray(rng.normal(size=(8, 6, 7, 16)).astype(np.float32))
  boxes = jnp.asarray(BOXES)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices8)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  fn = jax.jit(lambda f, b: roi_align(f, b, output_size=4, spatial_scale=0.25))
  sharded = fn(jax.device_put(feats, spec), jax.device_put(boxes, spec))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(fn(feats, boxes)), atol=1e-6)


def test_bfloat16_features_pool_in_float32():
  """bf16 in → bf16 out, equal to the float32 result rounded once (weights are not rounded)."""
  rng = np.random.default_rng(4)
  feats = jnp.asarray(rng.normal(size=(8, 6, 7, 3)).astype(np.float32)).astype(jnp.bfloat16)
  got = roi_align(feats, jnp.asarray(BOXES), output_size=4, spatial_scale=0.25)
  want = roi_align(feats.astype(jnp.float32), jnp.asarray(BOXES), output_size=4,
                   spatial_scale=0.25)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


def test_rejects_adaptive_sampling():
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4)), sampling_ratio=0)
