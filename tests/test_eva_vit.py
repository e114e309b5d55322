"""VisionTransformer vs transformers' PyTorch Blip2VisionModel / CLIPVisionModel (toy sizes).

Weights flow torch state_dict → our converters → our params. Error metric everywhere:
rel = max|ours - ref| / max|ref| (float32, matmul precision "highest"); bound 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig,
                          CLIPVisionModel)

from dynrefer_jax import functional
from dynrefer_jax.convert.common import expected_shapes
from dynrefer_jax.convert.eva_vit import convert_hf_blip2_vision, convert_hf_clip_vision
from dynrefer_jax.models.eva_vit import VisionTransformer, interpolate_pos_embed

TOL = 1e-5
W, HEADS, MLP, DEPTH, PATCH, SIZE = 32, 4, 56, 2, 7, 28


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(model: torch.nn.Module, seed: int) -> None:
  """HF inits biases and LayerNorms to 0/1: draw everything at random so each one matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5)
              + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
      if name.endswith("qkv.bias"):  # BLIP-2's fused bias is concat(q, 0, v).
        p[W:2 * W] = 0


def torch_state(model: torch.nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def build(convert_fn, state, **cfg):
  model = VisionTransformer(image_size=SIZE, patch_size=PATCH, width=W, depth=DEPTH,
                            num_heads=HEADS, mlp_dim=MLP, rngs=nnx.Rngs(0), **cfg)
  graphdef, params, _ = functional.split(model)
  flat = convert_fn(state, expected_shapes(params))
  return graphdef, functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def run(graphdef, params, images_nhwc):
  return np.asarray(functional.merge(graphdef, params)(jnp.asarray(images_nhwc)))


@pytest.fixture(scope="module")
def blip2():
  torch.manual_seed(0)
  cfg = Blip2VisionConfig(hidden_size=W, intermediate_size=MLP, num_hidden_layers=DEPTH,
                          num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
                          qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-6)
  model = Blip2VisionModel(cfg).eval()
  randomize(model, 1)
  return model


def _images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def test_eva_config_matches_blip2_vision(blip2):
  """post_norm=False ↔ HF hidden_states[-1] (last block, before post_layernorm = ln_vision);
  post_norm=True ↔ HF last_hidden_state (post_layernorm on every token)."""
  x = _images(2, SIZE)
  with torch.no_grad():
    out = blip2(torch.from_numpy(x), output_hidden_states=True)
  state = torch_state(blip2)
  graphdef, params = build(convert_hf_blip2_vision, state)
  ours = run(graphdef, params, x.transpose(0, 2, 3, 1))
  assert ours.shape == (2, 1 + (SIZE // PATCH) ** 2, W)
  # hidden_states[-1] must not be the post-normed tensor, or the first check would be vacuous.
  assert rel_err(out.hidden_states[-1], out.last_hidden_state) > 0.1
  assert rel_err(ours, out.hidden_states[-1]) < TOL
  # Embeddings (patches + CLS + positions) alone: the first submodule.
  emb = np.asarray(functional.merge(graphdef, params).embed(jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert rel_err(emb, out.hidden_states[0]) < TOL
  graphdef, params = build(convert_hf_blip2_vision, state, post_norm=True)
  assert rel_err(run(graphdef, params, x.transpose(0, 2, 3, 1)), out.last_hidden_state) < TOL


def test_other_input_size_interpolates_pos_embed(blip2):
  """A 42×42 input (6×6 grid from a 4×4 table) vs HF with interpolate_pos_encoding=True."""
  x = _images(1, 42, seed=1)
  with torch.no_grad():
    ref = blip2(torch.from_numpy(x), interpolate_pos_encoding=True,
                output_hidden_states=True).hidden_states[-1]
  graphdef, params = build(convert_hf_blip2_vision, torch_state(blip2))
  ours = run(graphdef, params, x.transpose(0, 2, 3, 1))
  assert ours.shape == (1, 37, W)
  assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("old, new", [(4, 6), (16, 23), (6, 3)])
def test_interpolate_pos_embed_matches_torch_bicubic(old, new):
  pe = np.random.default_rng(old).normal(size=(1 + old * old, 5)).astype(np.float32)
  grid = torch.from_numpy(pe[1:]).reshape(1, old, old, 5).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
                                        align_corners=False)
  ref = np.concatenate([pe[:1], ref.permute(0, 2, 3, 1).reshape(new * new, 5).numpy()])
  assert rel_err(interpolate_pos_embed(pe, new), ref) < 1e-6
  assert rel_err(jax.jit(interpolate_pos_embed, static_argnums=1)(jnp.asarray(pe), new),
                 ref) < 1e-6


def test_clip_config_matches_clip_vision():
  """OpenAI CLIP by config: ln_pre, q/k/v biases, quick_gelu, no patch bias, eps 1e-5.
  post_norm=False ↔ HF last_hidden_state; post_norm=True at CLS ↔ HF pooler_output."""
  torch.manual_seed(0)
  cfg = CLIPVisionConfig(hidden_size=W, intermediate_size=MLP, num_hidden_layers=DEPTH,
                         num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5)
  model = CLIPVisionModel(cfg).eval()
  randomize(model, 2)
  x = _images(2, SIZE, seed=2)
  with torch.no_grad():
    out = model(torch.from_numpy(x))
  clip_cfg = dict(qkv_bias="qkv", act="quick_gelu", ln_eps=1e-5, pre_norm=True,
                  patch_bias=False)
  graphdef, params = build(convert_hf_clip_vision, torch_state(model), **clip_cfg)
  assert rel_err(run(graphdef, params, x.transpose(0, 2, 3, 1)), out.last_hidden_state) < TOL
  graphdef, params = build(convert_hf_clip_vision, torch_state(model), post_norm=True,
                           **clip_cfg)
  assert rel_err(run(graphdef, params, x.transpose(0, 2, 3, 1))[:, 0], out.pooler_output) < TOL


def test_sharded_jit_matches_unsharded(devices8):
  """Params sharded embed→fsdp on an 8-device mesh; the jitted output equals the plain one."""
  model = VisionTransformer(image_size=SIZE, patch_size=PATCH, width=W, depth=DEPTH,
                            num_heads=HEADS, mlp_dim=MLP, rngs=nnx.Rngs(3))
  graphdef, params, axes = functional.split(model)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, SIZE, SIZE, 3)), jnp.float32)
  ref = np.asarray(model(x))
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices8)

  def spec(leaf, names):
    dims = [("fsdp" if n == "embed" and d % 8 == 0 else None) for n, d in zip(names, leaf.shape)]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*dims))

  shardings = jax.tree.map(spec, params, axes, is_leaf=lambda t: isinstance(t, tuple))
  sharded = jax.device_put(params, shardings)
  assert any(len(s.spec) and "fsdp" in s.spec for s in jax.tree.leaves(
      jax.tree.map(lambda a: a.sharding, sharded)))
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, im: functional.merge(graphdef, p)(im))(sharded, x)
  assert rel_err(out, ref) < 1e-6


def test_full_size_eva_vit_g_shapes():
  """Default config = LAVIS eva_vit_g (CHECKPOINTS.md §2.1): 985,894,528 parameters there, of
  which LAVIS stores no k bias either; abstract shapes only (nothing allocated)."""
  _, params, axes = functional.abstract_split(lambda: VisionTransformer(rngs=nnx.Rngs(0)))
  flat = functional.flatten(params)
  assert functional.count(params) == 985_894_528
  assert sum(k.endswith("norm1/scale") for k in flat) == 39
  assert flat["blocks/0/attn/qkv_kernel"].shape == (1408, 3, 16, 88)
  assert flat["blocks/0/mlp/fc1/kernel"].shape == (1408, 6144)
  assert flat["pos_embed"].shape == (257, 1408)
  assert functional.flatten(axes)["blocks/0/attn/qkv_kernel"] == ("embed", None, "heads", "kv")
  out = nnx.eval_shape(lambda: VisionTransformer(rngs=nnx.Rngs(0))(
      jnp.zeros((2, 224, 224, 3), jnp.float32)))
  assert out.shape == (2, 257, 1408)


def test_bf16_compute_close_to_float32():
  """dtype=bfloat16 (the frozen tower's runtime precision; the original runs it in fp16):
  bf16 activations out, within bf16 rounding of the float32 result (rel ≤ 5e-2)."""
  kw = dict(image_size=SIZE, patch_size=PATCH, width=W, depth=DEPTH, num_heads=HEADS,
            mlp_dim=MLP)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  ref = VisionTransformer(rngs=nnx.Rngs(5), **kw)(x)
  out = VisionTransformer(dtype=jnp.bfloat16, rngs=nnx.Rngs(5), **kw)(x)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out.astype(jnp.float32), ref) < 5e-2


def test_sincos2d_position_init_by_hand():
  # grid 2, width 8: ω = (1, 1/100); patch (row y=1, col x=0) is row 2 of the table.
  from dynrefer_jax.models import eva_vit
  table = np.asarray(eva_vit.posemb_sincos_2d(2, 8))
  w = np.array([1.0, 0.01])
  np.testing.assert_allclose(table[2], np.concatenate([np.sin(0 * w), np.cos(0 * w),
                                                       np.sin(1 * w), np.cos(1 * w)]), atol=1e-6)
  vit = eva_vit.VisionTransformer(image_size=8, patch_size=4, width=8, depth=1, num_heads=2,
                                  mlp_dim=16, pos_init="sincos2d", rngs=nnx.Rngs(0))
  pos = np.asarray(vit.pos_embed[...])
  np.testing.assert_array_equal(pos[0], 0.0)           # the CLS row
  np.testing.assert_allclose(pos[1:], table, atol=1e-6)
