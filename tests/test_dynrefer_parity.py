"""DynRefer's composed paths vs PyTorch references, end to end, at toy size (float32, "highest").

Vision side (SPEC §1-§6): `DynRefer.encode_views` — EVA ViT → ln_vision (eps 1e-5) → RoI-Align →
DCNv4 aligner of views 1, 2 onto view 0 → [CLS_v; 16 RoI tokens] per view → views concatenated on
channels (t=0 first) → fusion MLP → Q-Former with the frozen query tokens — against
transformers' Blip2VisionModel + F.layer_norm + the RoI-Align / DCNv4 references of
test_roi_align / test_aligner (written from the SPEC, torch autograd) + nn.Sequential MLP +
Blip2QFormerModel. All our weights come from the PyTorch modules through our converters
(HF Blip2 vision, HF Q-Former incl. `query_tokens` [1, Q, D] → [Q, D] and
`vision_model.post_layernorm` → ln_vision, `cvem_*`). Bounds: Z within 1e-4 relative (end to
end); gradients of the trainable parts (cvem_align, cvem_mlp, Qformer) within 1e-4 relative.

Language side (SPEC §7c): `DynRefer.lm_inputs` + the T5 loss — t5_proj(Z), control-word
embeddings + cem_memory, T5 teacher-forced cross-entropy — against t5_proj as F.linear, HF's
shared embedding + cem_memory, T5ForConditionalGeneration(inputs_embeds, labels) with weights
from our HF T5 converter and `t5_proj.*` / `cem_memory` from the original names. Bounds: loss
1e-5, gradients w.r.t. the projected queries, Z, t5_proj and cem_memory 1e-4 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from configs import common as configs_common
from dynrefer_jax import functional
from dynrefer_jax.convert.aligner import convert_cvem
from dynrefer_jax.convert.common import convert, expected_shapes
from dynrefer_jax.convert.eva_vit import convert_hf_blip2_vision
from dynrefer_jax.convert.qformer import convert_qformer_hf
from dynrefer_jax.convert.t5 import convert_t5, dynrefer_rules
from dynrefer_jax.models.dynrefer import DynRefer

import test_aligner  # the SPEC §4 DCNv4 reference (grid_sample per group and kernel point)
from test_roi_align import torch_roi_align  # the SPEC §3 torchvision RoIAlign reference

VOCAB, B, V = 40, 3, 3
E2E_TOL, GRAD_TOL = 1e-4, 1e-4

# Referent boxes per (region, view) in each view's 32-px space (patch 8 → 4×4 map): the whole
# view, boxes smaller than one cell, touching the bottom/right border, partly outside.
BOXES = np.array([
    [[0, 0, 32, 32], [4.0, 4.0, 20.0, 20.0], [-6.0, -3.0, 12.0, 40.0]],
    [[0, 0, 32, 32], [10.2, 11.0, 12.5, 13.1], [24.0, 24.0, 32.0, 32.0]],
    [[3.3, 5.7, 29.1, 17.2], [28.0, 0.0, 41.0, 8.0], [2.0, 2.0, 2.5, 2.5]],
], np.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def _randomize(module, gen, std=0.3):
  with torch.no_grad():
    for name, p in module.named_parameters():
      is_scale = name.endswith(("LayerNorm.weight", "layernorm.weight", "layer_norm.weight",
                                "layer_norm1.weight", "layer_norm2.weight"))
      p.copy_(torch.randn(p.shape, generator=gen) * (std if p.ndim > 1 else 0.2) + float(is_scale))


@pytest.fixture(scope="module")
def setup():
  cfg = configs_common.toy_model(VOCAB)
  cfg.train_vision_encoder = False
  cfg.recompute_text_tables = False
  return build(cfg)


def build(cfg):
  """Random PyTorch modules for the vision and language paths (HF Blip2 vision, Q-Former, T5;
  the DCNv4 reference; the fusion MLP; t5_proj / cem_memory under the original's names) and
  our params for `cfg` with those parts converted from them (the rest zero). Returns (cfg,
  graphdef, params, torch modules by name); tests/test_objective.py builds on it."""
  vit, q, lm = cfg.vit, cfg.qformer, cfg.lm
  c, d = vit.width, q.hidden
  assert c == test_aligner.C and cfg.aligner.groups == test_aligner.G
  rng = np.random.default_rng(0)
  ids = {k: rng.integers(2, VOCAB, (n, cfg.text.context_length)).astype(np.int32)
         for k, n in (("tags", 5), ("attributes", 4), ("classes", 3))}
  # Abstract init (nothing computed eagerly): every parameter these paths read is overwritten
  # below from the PyTorch side; the rest (text tower, heads, tables) stays zero, unused here.
  graphdef, params, _ = functional.abstract_split(lambda: DynRefer(cfg, ids, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
  exp = expected_shapes(params)
  sub = lambda prefix: {k[len(prefix):]: v for k, v in exp.items() if k.startswith(prefix)}

  gen = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  hf_vit = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
      hidden_size=c, intermediate_size=vit.mlp_dim, num_hidden_layers=vit.depth,
      num_attention_heads=vit.num_heads, image_size=vit.image_size, patch_size=vit.patch_size,
      qkv_bias=True, hidden_act="gelu", layer_norm_eps=vit.ln_eps)).eval()
  _randomize(hf_vit, gen)
  with torch.no_grad():  # EVA has no k bias: BLIP-2's fused bias is concat(q, 0, v).
    for layer in hf_vit.encoder.layers:
      layer.self_attn.qkv.bias[c:2 * c] = 0
  hf_q = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(
      hidden_size=d, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
      intermediate_size=q.mlp_dim, encoder_hidden_size=c,
      cross_attention_frequency=q.cross_attention_freq, hidden_act="gelu",
      layer_norm_eps=1e-12)).eval()
  _randomize(hf_q, gen, std=0.2)
  query_tokens = torch.randn(1, cfg.num_query_tokens, d, generator=gen)
  dcn = test_aligner._torch_params(seed=3)  # pylint: disable=protected-access
  mlp = torch.nn.Sequential(torch.nn.Linear(V * c, c), torch.nn.ReLU(), torch.nn.Linear(c, c))

  t5_cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=lm.d_model, d_kv=lm.d_kv, d_ff=lm.d_ff, num_heads=lm.num_heads,
      num_layers=lm.num_encoder_layers, num_decoder_layers=lm.num_decoder_layers,
      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  t5_cfg.dense_act_fn = "gelu"  # LAVIS's override
  hf_t5 = transformers.T5ForConditionalGeneration(t5_cfg).eval()
  hf_t5.lm_head.weight = torch.nn.Parameter(hf_t5.lm_head.weight.detach().clone())  # FlanT5
  with torch.no_grad():
    for name, p in hf_t5.named_parameters():
      scale = 0.2 if "layer_norm" in name else (0.5 if p.ndim < 2 else p.shape[1] ** -0.5)
      p.copy_(torch.randn(p.shape, generator=gen) * scale + float("layer_norm" in name))
  original = {"t5_proj.weight": torch.randn(lm.d_model, d, generator=gen) * d ** -0.5,
              "t5_proj.bias": torch.randn(lm.d_model, generator=gen) * 0.3,
              "cem_memory": torch.randn(lm.d_model, generator=gen) * 0.5}

  np_sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
  flat = {}
  flat.update({"visual_encoder/" + k: v
               for k, v in convert_hf_blip2_vision(np_sd(hf_vit), sub("visual_encoder/")).items()})
  q_sd = {"qformer." + k: v for k, v in np_sd(hf_q).items()}
  q_sd["query_tokens"] = query_tokens.numpy()
  q_sd["vision_model.post_layernorm.weight"] = np_sd(hf_vit)["post_layernorm.weight"]
  q_sd["vision_model.post_layernorm.bias"] = np_sd(hf_vit)["post_layernorm.bias"]
  q_exp = dict(sub("Qformer/"), query_tokens=exp["query_tokens"],
               **{"ln_vision/" + k: v for k, v in sub("ln_vision/").items()})
  for k, v in convert_qformer_hf(q_sd, q_exp).items():
    flat[k if k in ("query_tokens",) or k.startswith("ln_vision/") else "Qformer/" + k] = v
  cvem_sd = {"cvem_align." + k: v.numpy() for k, v in dcn.items()}
  cvem_sd.update({"cvem_mlp." + k: v for k, v in np_sd(mlp).items()})
  flat.update(convert_cvem(cvem_sd, {k: v for k, v in exp.items() if k.startswith("cvem_")}))
  flat.update({"t5_model/" + k: v
               for k, v in convert_t5(np_sd(hf_t5), sub("t5_model/")).items()})
  flat.update(convert({k: v.numpy() for k, v in original.items()}, dynrefer_rules(),
                      {k: exp[k] for k in ("t5_proj/kernel", "t5_proj/bias", "cem_memory")}))
  current = functional.flatten(params)
  for k, v in flat.items():
    assert current[k].shape == v.shape, k
    current[k] = jnp.asarray(v)
  params = functional.unflatten(current)
  torch_side = dict(vit=hf_vit, qformer=hf_q, query_tokens=query_tokens, dcn=dcn, mlp=mlp,
                    t5=hf_t5, original=original)
  return cfg, graphdef, params, torch_side


def _torch_encode(ts, cfg, pixels, boxes):
  """The SPEC §1-§6 chain in PyTorch; pixels [B, V, S, S, 3], boxes [B, V, 4] → Z [B, Q, D]."""
  c, s, p = cfg.vit.width, cfg.vit.image_size, cfg.vit.patch_size
  g, out = s // p, cfg.roi.output_size
  x = torch.from_numpy(pixels.reshape(B * V, s, s, 3)).permute(0, 3, 1, 2)
  hidden = ts["vit"](x, output_hidden_states=True).hidden_states[-1]   # last block, no norm
  post = ts["vit"].post_layernorm
  feats = F.layer_norm(hidden, (c,), post.weight, post.bias, eps=cfg.ln_vision_eps)
  cls = feats[:, :1]
  fmap = feats[:, 1:].reshape(B * V, g, g, c).permute(0, 3, 1, 2)
  roi = torch_roi_align(fmap, boxes.reshape(B * V, 4), out, 1.0 / p, cfg.roi.sampling_ratio,
                        False).permute(0, 2, 3, 1).reshape(B, V, out, out, c)
  ref = roi[:, :1].expand(B, V - 1, out, out, c).reshape(B * (V - 1), out, out, c)
  ctx = roi[:, 1:].reshape(B * (V - 1), out, out, c)
  aligned = test_aligner.torch_dcn(ts["dcn"], ctx, ref)[0].reshape(B, V - 1, out, out, c)
  spatial = torch.cat([roi[:, :1], aligned], 1).reshape(B, V, out * out, c)
  tokens = torch.cat([cls.reshape(B, V, 1, c), spatial], 2)            # [B, V, 1 + out², C]
  enc = ts["mlp"](tokens.permute(0, 2, 1, 3).reshape(B, 1 + out * out, V * c))
  queries = ts["query_tokens"].expand(B, -1, -1)
  return ts["qformer"](query_embeds=queries, encoder_hidden_states=enc).last_hidden_state


def _inputs(cfg):
  rng = np.random.default_rng(1)
  s = cfg.vit.image_size
  pixels = rng.normal(size=(B, V, s, s, 3)).astype(np.float32)
  return pixels, BOXES


def test_encode_views_end_to_end_matches_torch(setup):
  cfg, graphdef, params, ts = setup
  pixels, boxes = _inputs(cfg)
  got = jax.jit(lambda p, x, b: functional.merge(graphdef, p).encode_views(x, b))(
      params, jnp.asarray(pixels), jnp.asarray(boxes))
  with torch.no_grad():
    want = _torch_encode(ts, cfg, pixels, boxes).numpy()
  assert got.shape == (B, cfg.num_query_tokens, cfg.qformer.hidden)
  assert _rel(got, want) < E2E_TOL
  # Not vacuous: the aligned context views and the CLS tokens both change Z.
  with torch.no_grad():
    saved = {k: v.clone() for k, v in ts["dcn"].items()}
    ts["dcn"]["output_proj.bias"] += 1.0
    moved = _torch_encode(ts, cfg, pixels, boxes).numpy()
    ts["dcn"].update(saved)
  assert _rel(moved, want) > 1e-2


def test_trainable_gradients_through_the_chain_match_torch(setup):
  cfg, graphdef, params, ts = setup
  pixels, boxes = _inputs(cfg)
  cot = np.random.default_rng(2).normal(
      size=(B, cfg.num_query_tokens, cfg.qformer.hidden)).astype(np.float32)

  flat = functional.flatten(params)
  trainable = {k: v for k, v in flat.items() if k.startswith(("cvem_", "Qformer/"))}

  def loss(train):
    model = functional.merge(graphdef, functional.unflatten({**flat, **train}))
    return jnp.sum(model.encode_views(jnp.asarray(pixels), jnp.asarray(boxes)) * cot)

  grads = jax.jit(jax.grad(loss))(trainable)
  dcn = {k: v.clone().requires_grad_() for k, v in ts["dcn"].items()}
  torch_side = dict(ts, dcn=dcn)
  for m in (ts["mlp"], ts["qformer"]):
    m.zero_grad()
  (_torch_encode(torch_side, cfg, pixels, boxes) * torch.from_numpy(cot)).sum().backward()

  exp = {k: tuple(v.shape) for k, v in grads.items()}
  want = convert_cvem({**{"cvem_align." + k: v.grad.numpy() for k, v in dcn.items()},
                       **{"cvem_mlp." + k: p.grad.numpy()
                          for k, p in ts["mlp"].named_parameters()}},
                      {k: v for k, v in exp.items() if k.startswith("cvem_")})
  q_exp = {k[len("Qformer/"):]: v for k, v in exp.items() if k.startswith("Qformer/")}
  want.update({"Qformer/" + k: v for k, v in convert_qformer_hf(
      {k: p.grad.numpy() for k, p in ts["qformer"].named_parameters()}, q_exp).items()})
  assert set(want) == set(grads)
  scale = max(np.abs(v).max() for v in want.values())
  for path, ref in want.items():
    if path.endswith("key/bias"):
      # Mathematically zero (softmax is shift invariant per query): rounding noise only.
      assert np.abs(grads[path]).max() < 1e-5 * scale and np.abs(ref).max() < 1e-5 * scale
      continue
    assert np.abs(ref).max() > 0, path
    assert _rel(grads[path], ref) < GRAD_TOL, path


def _lm_batch():
  rng = np.random.default_rng(3)
  control = rng.integers(2, VOCAB, (B, 6)).astype(np.int32)
  control_mask = np.ones((B, 6), bool)
  control_mask[0, 2:] = False
  control_mask[2, 4:] = False
  control[~control_mask] = 0
  caption = rng.integers(2, VOCAB, (B, 5)).astype(np.int32)
  caption_mask = np.ones((B, 5), bool)
  caption_mask[1, 3:] = False
  caption[~caption_mask] = 0
  return control, control_mask, caption, caption_mask


def test_lm_loss_and_gradients_wrt_projected_queries_match_torch(setup):
  cfg, graphdef, params, ts = setup
  control, control_mask, caption, caption_mask = _lm_batch()
  z = np.random.default_rng(4).normal(
      size=(B, cfg.num_query_tokens, cfg.qformer.hidden)).astype(np.float32)
  nq = cfg.num_query_tokens

  flat = functional.flatten(params)
  lm_keys = ("t5_proj/kernel", "t5_proj/bias", "cem_memory")

  def lm_loss(train, zz):
    model = functional.merge(graphdef, functional.unflatten({**flat, **train}))
    enc_in, enc_mask = model.lm_inputs(zz, jnp.asarray(control), jnp.asarray(control_mask))
    t5_loss = lambda x: model.t5_model(x, enc_mask, jnp.asarray(caption),
                                       jnp.asarray(caption_mask))[0]
    loss, g_in = jax.value_and_grad(t5_loss)(enc_in)
    return loss, g_in[:, :nq]                      # d loss / d projected queries

  (loss, g_proj), (g_params, g_z) = jax.jit(
      lambda p, zz: (lm_loss(p, zz), jax.grad(lambda a, b: lm_loss(a, b)[0], (0, 1))(p, zz)))(
          {k: flat[k] for k in lm_keys}, jnp.asarray(z))

  orig = {k: v.clone().requires_grad_() for k, v in ts["original"].items()}
  tz = torch.from_numpy(z).requires_grad_()
  proj = F.linear(tz, orig["t5_proj.weight"], orig["t5_proj.bias"])
  proj.retain_grad()
  ctrl = ts["t5"].shared(torch.from_numpy(control).long()) + orig["cem_memory"]
  mask = torch.cat([torch.ones(B, nq, dtype=torch.long),
                    torch.from_numpy(control_mask.astype(np.int64))], 1)
  labels = torch.from_numpy(np.where(caption_mask, caption, -100).astype(np.int64))
  ts["t5"].zero_grad()
  ref = ts["t5"](inputs_embeds=torch.cat([proj, ctrl], 1), attention_mask=mask,
                 labels=labels).loss
  ref.backward()
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
  assert _rel(g_proj, proj.grad.numpy()) < GRAD_TOL
  assert _rel(g_z, tz.grad.numpy()) < GRAD_TOL
  assert _rel(g_params["t5_proj/kernel"], orig["t5_proj.weight"].grad.numpy().T) < GRAD_TOL
  assert _rel(g_params["t5_proj/bias"], orig["t5_proj.bias"].grad.numpy()) < GRAD_TOL
  assert _rel(g_params["cem_memory"], orig["cem_memory"].grad.numpy()) < GRAD_TOL
