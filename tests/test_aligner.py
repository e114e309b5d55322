"""Aligners and fusion MLP vs PyTorch references written from SPEC §4/§5.

The deformable reference is DCNv3's formulation named in SPEC §4 ("grid_sample(bilinear,
zeros, align_corners=False)" on the normalised grid), one group and one kernel point at a time,
with a grouped torch Conv2d for `offset_mask_dw` — nothing shared with our separable-matmul
sampler. Offsets and modulations are made non-zero and large enough (several pixels) to leave
the map. Tolerances (float32, highest matmul precision): forward 1e-5 relative to the output
scale, parameter gradients 1e-4 relative, sharded vs unsharded 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from dynrefer_jax import functional
from dynrefer_jax.models.aligner import DeformableAligner, OffsetAligner, build_aligner
from dynrefer_jax.models.fusion import FusionMLP

import torch_references

M, H, W, C, G = 3, 5, 6, 32, 4


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(M, H, W, C)).astype(np.float32)
  ref = rng.normal(size=(M, H, W, C)).astype(np.float32)
  return x, ref


def _torch_params(seed=1):
  """Random DCNv4 weights in PyTorch layout (names of CHECKPOINTS.md §1.2)."""
  rng = np.random.default_rng(seed)
  n = lambda *s, std=0.2: torch.tensor(rng.normal(size=s, scale=std), dtype=torch.float32)
  return {
      "value_proj.weight": n(C, C), "value_proj.bias": n(C),
      "offset_mask_dw.weight": n(C, 2, 3, 3, std=0.5), "offset_mask_dw.bias": n(C),
      # Large enough that Δ reaches several pixels (samples leave the 5×6 map).
      "offset_mask.weight": n(112, C, std=0.6), "offset_mask.bias": n(112, std=0.5),
      "output_proj.weight": n(C, C), "output_proj.bias": n(C),
  }


def _to_ours(tp):
  """PyTorch layout → our param tree (independent of the converter under test elsewhere)."""
  t = {k: v.detach().numpy() for k, v in tp.items()}
  lin = lambda name: {"kernel": jnp.asarray(t[f"{name}.weight"].T),
                      "bias": jnp.asarray(t[f"{name}.bias"])}
  return {"value_proj": lin("value_proj"), "offset_mask": lin("offset_mask"),
          "output_proj": lin("output_proj"),
          "offset_mask_dw": {"kernel": jnp.asarray(t["offset_mask_dw.weight"].transpose(2, 3, 1, 0)),
                             "bias": jnp.asarray(t["offset_mask_dw.bias"])}}


def torch_dcn(tp, x, ref):
  """SPEC §4 steps 1-5. x, ref: torch [M, H, W, C] → ([M, H, W, C], offsets/modulations)."""
  return torch_references.deformable_align(tp, x, ref, G)


def _build_dcn(tp):
  model = DeformableAligner(C, groups=G, rngs=nnx.Rngs(0))
  graphdef, params, axes = functional.split(model)
  ours = _to_ours(tp)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ours)
  return graphdef, ours, axes


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def test_deformable_forward_matches_torch():
  tp = _torch_params()
  x, ref = _inputs()
  graphdef, params, _ = _build_dcn(tp)
  ours = functional.merge(graphdef, params)(jnp.asarray(x), jnp.asarray(ref))
  want, om = torch_dcn(tp, torch.from_numpy(x), torch.from_numpy(ref))
  # The test is only meaningful if samples really leave the map and modulations are non-zero.
  assert om[..., :108].abs().max() > 2.0
  assert _rel(ours, want.detach().numpy()) < 1e-5


def test_deformable_param_and_input_gradients_match_torch():
  tp = _torch_params()
  x, ref = _inputs()
  cot = np.random.default_rng(5).normal(size=(M, H, W, C)).astype(np.float32)
  graphdef, params, _ = _build_dcn(tp)

  def loss(p, xx, rr):
    return jnp.sum(functional.merge(graphdef, p)(xx, rr) * cot)

  gp, gx, gr = jax.grad(loss, argnums=(0, 1, 2))(params, jnp.asarray(x), jnp.asarray(ref))
  tp = {k: v.clone().requires_grad_() for k, v in tp.items()}
  tx, tr = torch.from_numpy(x).requires_grad_(), torch.from_numpy(ref).requires_grad_()
  (torch_dcn(tp, tx, tr)[0] * torch.from_numpy(cot)).sum().backward()
  want = _to_ours({k: v.grad for k, v in tp.items()})
  for path, g in functional.flatten(gp).items():
    assert _rel(g, functional.flatten(want)[path]) < 1e-4, path
  assert _rel(gx, tx.grad.numpy()) < 1e-4
  assert _rel(gr, tr.grad.numpy()) < 1e-4


def test_deformable_init_and_channel_pairing():
  model = DeformableAligner(C, groups=G, rngs=nnx.Rngs(0))
  x, ref = _inputs()
  # Zero-initialised offset_mask: Δ = 0 and m = 0, so the aligned features are exactly 0.
  assert np.all(np.asarray(model(jnp.asarray(x), jnp.asarray(ref))) == 0)
  assert model.offset_mask.kernel[...].shape == (C, 112)
  # Quirk of groups = C over concat[x, ref]: outputs < C/2 see only x, the rest only ref.
  cat = lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)], -1)
  f1 = model.offset_mask_dw(cat(x, ref))
  f2 = model.offset_mask_dw(cat(x, ref + 1.0))
  f3 = model.offset_mask_dw(cat(x + 1.0, ref))
  np.testing.assert_array_equal(f1[..., :C // 2], f2[..., :C // 2])
  np.testing.assert_array_equal(f1[..., C // 2:], f3[..., C // 2:])
  assert not np.allclose(f1[..., C // 2:], f2[..., C // 2:])


def torch_offset_aligner(w, b, x, ref):
  cat = torch.cat([x, ref], -1).permute(0, 3, 1, 2)
  off = F.conv2d(cat, w, b, padding=1)                                     # [M, 2, H, W]
  h, wd = x.shape[1:3]
  hh, ww = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(wd, dtype=x.dtype),
                          indexing="ij")
  out = torch_references.grid_sample_pixels(x.permute(0, 3, 1, 2), hh + off[:, 1], ww + off[:, 0])
  return out.permute(0, 2, 3, 1)


def test_offset_aligner_matches_torch_and_starts_at_identity():
  x, ref = _inputs()
  model = build_aligner("offset", channels=C, rngs=nnx.Rngs(0))
  assert isinstance(model, OffsetAligner)
  np.testing.assert_allclose(model(jnp.asarray(x), jnp.asarray(ref)), x, atol=1e-6)
  rng = np.random.default_rng(7)
  tw = torch.tensor(rng.normal(size=(2, 2 * C, 3, 3), scale=0.15), dtype=torch.float32,
                    requires_grad=True)
  tb = torch.tensor(rng.normal(size=(2,)), dtype=torch.float32, requires_grad=True)
  graphdef, params, _ = functional.split(model)
  params = {"offset_conv": {"kernel": jnp.asarray(tw.detach().numpy().transpose(2, 3, 1, 0)),
                            "bias": jnp.asarray(tb.detach().numpy())}}
  cot = rng.normal(size=(M, H, W, C)).astype(np.float32)
  loss = lambda p: jnp.sum(functional.merge(graphdef, p)(jnp.asarray(x), jnp.asarray(ref)) * cot)
  ours = functional.merge(graphdef, params)(jnp.asarray(x), jnp.asarray(ref))
  want = torch_offset_aligner(tw, tb, torch.from_numpy(x), torch.from_numpy(ref))
  assert _rel(ours, want.detach().numpy()) < 1e-5
  (want * torch.from_numpy(cot)).sum().backward()
  g = jax.grad(loss)(params)["offset_conv"]
  assert _rel(g["kernel"], tw.grad.numpy().transpose(2, 3, 1, 0)) < 1e-4
  assert _rel(g["bias"], tb.grad.numpy()) < 1e-4


def test_build_aligner_rejects_unknown():
  assert isinstance(build_aligner("dcnv4", channels=C, groups=G, rngs=nnx.Rngs(0)),
                    DeformableAligner)
  with pytest.raises(ValueError, match="unknown aligner"):
    build_aligner("dcnv3", channels=C, rngs=nnx.Rngs(0))


def test_fusion_mlp_matches_torch_with_gradients():
  v, b, l = 3, 2, 7
  model = FusionMLP(C, v, rngs=nnx.Rngs(0))
  graphdef, params, _ = functional.split(model)
  # Default init is PyTorch's Linear init: U(±1/√fan_in) for kernel and bias.
  for name, fan_in in (("linear0", v * C), ("linear2", C)):
    for leaf in params[name].values():
      assert np.abs(np.asarray(leaf)).max() <= fan_in ** -0.5
    assert np.asarray(params[name]["kernel"]).std() > 0.5 * fan_in ** -0.5 / np.sqrt(3)
  tm = torch.nn.Sequential(torch.nn.Linear(v * C, C), torch.nn.ReLU(), torch.nn.Linear(C, C))
  params = {"linear0": {"kernel": jnp.asarray(tm[0].weight.detach().numpy().T),
                        "bias": jnp.asarray(tm[0].bias.detach().numpy())},
            "linear2": {"kernel": jnp.asarray(tm[2].weight.detach().numpy().T),
                        "bias": jnp.asarray(tm[2].bias.detach().numpy())}}
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, l, v * C)).astype(np.float32)
  cot = rng.normal(size=(b, l, C)).astype(np.float32)
  out = tm(torch.from_numpy(x))
  (out * torch.from_numpy(cot)).sum().backward()
  loss = lambda p: jnp.sum(functional.merge(graphdef, p)(jnp.asarray(x)) * cot)
  assert _rel(functional.merge(graphdef, params)(jnp.asarray(x)), out.detach().numpy()) < 1e-5
  g = jax.grad(loss)(params)
  assert _rel(g["linear0"]["kernel"], tm[0].weight.grad.numpy().T) < 1e-4
  assert _rel(g["linear0"]["bias"], tm[0].bias.grad.numpy()) < 1e-4
  assert _rel(g["linear2"]["kernel"], tm[2].weight.grad.numpy().T) < 1e-4
  assert _rel(g["linear2"]["bias"], tm[2].bias.grad.numpy()) < 1e-4


def _shard_params(params, axes, mesh):
  """Tiny stand-in for sharding rules: logical 'embed' → mesh axis 'x' where divisible."""
  def put(leaf, names):
    spec = [None] * leaf.ndim
    for d, name in enumerate(names):
      if name == "embed" and leaf.shape[d] % mesh.shape["x"] == 0:
        spec[d] = "x"
        break
    return jax.device_put(leaf, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  return jax.tree.map(put, params, axes, is_leaf=lambda t: isinstance(t, tuple))


@pytest.mark.parametrize("kind", ["dcnv4", "offset", "fusion"])
def test_sharded_jit_equals_unsharded(kind, devices8):
  if kind == "fusion":
    model = FusionMLP(C, 2, rngs=nnx.Rngs(0))
  else:
    model = build_aligner(kind, channels=C, rngs=nnx.Rngs(0))
  graphdef, params, axes = functional.split(model)
  # Random values everywhere so zero-initialised parameters do not hide layout errors, at
  # fan-in scale: sharding a contraction changes float32 summation order (~1e-7 relative), and
  # huge offsets would amplify that through the bilinear weights.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  scale = lambda l: float(np.prod(l.shape[:-1])) ** -0.5 if l.ndim > 1 else 0.1
  params = jax.tree.unflatten(tree, [scale(l) * jax.random.normal(k, l.shape) for k, l in
                                     zip(keys, leaves)])
  x, ref = (jnp.asarray(a) for a in _inputs())
  if kind == "fusion":
    fn = jax.jit(lambda p, a, b: functional.merge(graphdef, p)(jnp.concatenate([a, b], -1)))
  else:
    fn = jax.jit(lambda p, a, b: functional.merge(graphdef, p)(a, b))
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices8)
  sharded_params = _shard_params(params, axes, mesh)
  assert any(len(l.sharding.device_set) == 8 and not l.sharding.is_fully_replicated
             for l in jax.tree.leaves(sharded_params))
  assert _rel(fn(sharded_params, x, ref), fn(params, x, ref)) < 1e-6
