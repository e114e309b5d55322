"""Every vision/text component jitted on the 8-device CPU mesh with its parameters placed by the
config's logical→mesh rules (configs/common.sharding_config: embed→fsdp, mlp/heads/vocab→tensor,
batch→(data, fsdp)) on a (data 2, fsdp 2, tensor 2) mesh, inputs batch-sharded: the output
equals the unsharded single-device call within 1e-6 relative (float32, "highest").

Parameters are random everywhere (zero-initialised ones too, so no layout error hides behind a
zero) at fan-in scale: sharding a contraction only reorders float32 sums (~1e-7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common as configs_common
from dynrefer_jax import functional, sharding
from dynrefer_jax.models import aligner, eva_vit, fusion, qformer, roi_align, text_tower

TOL = 1e-6
N = 8  # batch: divisible by data × fsdp


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _randomize(params, seed):
  flat = functional.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  def draw(key, path, leaf):
    noise = jax.random.normal(key, leaf.shape)
    if leaf.ndim > 1:
      return noise * float(np.prod(leaf.shape[:-1])) ** -0.5
    return 1.0 + 0.2 * noise if path.endswith("scale") else 0.1 * noise
  return functional.unflatten({p: draw(k, p, l) for k, (p, l) in zip(keys, flat.items())})


def _vit():
  m = eva_vit.VisionTransformer(image_size=28, patch_size=7, width=32, depth=1, num_heads=4,
                                mlp_dim=64, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(N, 28, 28, 3)).astype(np.float32)
  return m, lambda mod, a: mod(a[0]), [x]


def _qformer():
  m = qformer.QFormer(num_layers=2, hidden=32, num_heads=4, mlp_dim=64, encoder_width=48,
                      rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  q = rng.normal(size=(N, 6, 32)).astype(np.float32)
  enc = rng.normal(size=(N, 10, 48)).astype(np.float32)
  return m, lambda mod, a: mod(a[0], a[1]), [q, enc]


def _text():
  m = text_tower.TextTransformer(vocab_size=64, context_length=12, width=32, depth=2,
                                 num_heads=4, mlp_dim=64, output_dim=24, rngs=nnx.Rngs(0))
  ids = np.random.default_rng(2).integers(1, 63, (N, 12)).astype(np.int32)
  ids[:, 5] = 63  # EOT (argmax pooling)
  ids[:, 6:] = 0
  return m, lambda mod, a: mod(a[0]), [ids]


def _aligner(kind):
  def build():
    kw = dict(groups=4) if kind == "dcnv4" else {}
    m = aligner.build_aligner(kind, channels=32, rngs=nnx.Rngs(0), **kw)
    rng = np.random.default_rng(3)
    x, ref = (rng.normal(size=(N, 4, 4, 32)).astype(np.float32) for _ in range(2))
    return m, lambda mod, a: mod(a[0], a[1]), [x, ref]
  return build


def _fusion():
  m = fusion.FusionMLP(32, 3, rngs=nnx.Rngs(0))
  x = np.random.default_rng(4).normal(size=(N, 17, 96)).astype(np.float32)
  return m, lambda mod, a: mod(a[0]), [x]


BUILDERS = {"eva_vit": _vit, "qformer": _qformer, "text_tower": _text,
            "aligner_dcnv4": _aligner("dcnv4"), "aligner_offset": _aligner("offset"),
            "fusion": _fusion}


@pytest.fixture(scope="module")
def mesh_and_rules(devices8):
  rules = [tuple(r) for r in configs_common.sharding_config().rules]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=devices8)
  return mesh, rules


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sharded_by_rules_equals_unsharded(name, mesh_and_rules):
  mesh, rules = mesh_and_rules
  model, call, inputs = BUILDERS[name]()
  graphdef, params, axes = functional.split(model)
  params = _randomize(params, seed=len(name))
  if name == "aligner_offset":
    # Offsets up to ~0.8 px (not ~2.5): the sampled output's float32 noise grows with the
    # offsets' absolute rounding (the sharded 576-term conv differs by ~3e-7 relative).
    params = jax.tree.map(lambda l: 0.3 * l, params)
  fn = jax.jit(lambda p, a: call(functional.merge(graphdef, p), a))
  want = fn(params, [jnp.asarray(a) for a in inputs])

  placed = jax.device_put(params, sharding.tree_shardings(params, axes, mesh, rules))
  used = {ax for leaf in jax.tree.leaves(placed) for part in leaf.sharding.spec if part
          for ax in ((part,) if isinstance(part, str) else part)}
  assert "fsdp" in used or "tensor" in used, f"{name}: no parameter was sharded"
  if name not in ("aligner_offset",):  # its only kernel [3, 3, 2C, 2] has one 'embed' axis
    assert {"fsdp", "tensor"} <= used, (name, used)
  batch = [jax.device_put(jnp.asarray(a), sharding.batch_sharding(mesh, a.ndim, rules))
           for a in inputs]
  with jax.set_mesh(mesh):
    got = fn(placed, batch)
  assert got.shape == want.shape
  assert _rel(got, want) < TOL, name


def test_roi_align_batch_sharded_equals_unsharded(mesh_and_rules):
  mesh, rules = mesh_and_rules
  rng = np.random.default_rng(5)
  feats = jnp.asarray(rng.normal(size=(N, 4, 4, 32)).astype(np.float32))
  boxes = jnp.asarray(np.concatenate([rng.uniform(-4, 20, (N, 2)), rng.uniform(20, 36, (N, 2))],
                                     1).astype(np.float32))
  fn = jax.jit(lambda f, b: roi_align.roi_align(f, b, output_size=4, spatial_scale=1 / 8))
  want = fn(feats, boxes)
  with jax.set_mesh(mesh):
    got = fn(jax.device_put(feats, sharding.batch_sharding(mesh, 4, rules)),
             jax.device_put(boxes, sharding.batch_sharding(mesh, 2, rules)))
  assert _rel(got, want) < TOL
