"""Vision/text tower converters: LAVIS eva_vit_g.pth, HF BLIP-2 vision, HF CLIP vision/text,
EVA-CLIP text. Toy state dicts come from transformers' PyTorch models; the LAVIS and EVA-CLIP
layouts are written here from CHECKPOINTS.md §2.1/§4/§5. Checks: every source key consumed
exactly once, every problem named, and the LAVIS path gives HF's numbers (rel ≤ 1e-5).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (Blip2VisionConfig, Blip2VisionModel, CLIPTextConfig,
                          CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel)

from dynrefer_jax import functional
from dynrefer_jax.convert.common import ConversionError, expected_shapes
from dynrefer_jax.convert.eva_vit import (convert_hf_blip2_vision, convert_hf_clip_vision,
                                          convert_lavis_eva_vit)
from dynrefer_jax.convert.text_tower import convert_eva_clip_text, convert_hf_clip_text
from dynrefer_jax.models.eva_vit import VisionTransformer
from dynrefer_jax.models.text_tower import TextTransformer

from torch_references import lavis_vit_block

W, HEADS, MLP, PATCH, SIZE, DEPTH = 16, 2, 24, 7, 28, 1


def _sd(model):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
      if name.endswith("qkv.bias"):
        p[W:2 * W] = 0
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _vit(**cfg):
  return VisionTransformer(image_size=cfg.pop("image_size", SIZE), patch_size=PATCH, width=W,
                           depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, rngs=nnx.Rngs(0), **cfg)


def _expected(model):
  return expected_shapes(functional.split(model)[1])


@pytest.fixture(scope="module")
def blip2():
  torch.manual_seed(0)
  return Blip2VisionModel(Blip2VisionConfig(
      hidden_size=W, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      image_size=SIZE, patch_size=PATCH, qkv_bias=True)).eval()


def hf_blip2_to_lavis(sd):
  """CHECKPOINTS.md §5, HF → LAVIS; plus the extras a raw EVA-CLIP-g file may hold
  (a block beyond the depth, the final norm and head), which LAVIS ignores."""
  out = {"cls_token": sd["embeddings.class_embedding"],
         "pos_embed": sd["embeddings.position_embedding"],
         "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"]}
  for i in range(DEPTH):
    out.update(lavis_vit_block(sd, i, W))
  extra = {k.replace(f"blocks.{DEPTH - 1}.", f"blocks.{DEPTH}."): v
           for k, v in out.items() if k.startswith(f"blocks.{DEPTH - 1}.")}
  extra.update({"norm.weight": np.ones(W, np.float32), "norm.bias": np.zeros(W, np.float32),
                "head.weight": np.zeros((8, W), np.float32), "head.bias": np.zeros(8, np.float32)})
  return out, extra


def test_lavis_equals_hf_blip2_and_runs_like_hf(blip2):
  sd = _sd(blip2)
  lavis, extra = hf_blip2_to_lavis(sd)
  expected = _expected(_vit())
  from_hf = convert_hf_blip2_vision(sd, expected)
  from_lavis = convert_lavis_eva_vit({**lavis, **extra}, expected)
  assert set(from_hf) == set(from_lavis) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(from_lavis[k], from_hf[k], err_msg=k)
  prefixed = convert_lavis_eva_vit({"visual_encoder." + k: v for k, v in lavis.items()},
                                   expected, prefix="visual_encoder.")
  assert all(np.array_equal(prefixed[k], from_hf[k]) for k in expected)
  x = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
  with torch.no_grad():
    ref = blip2(torch.from_numpy(x), output_hidden_states=True).hidden_states[-1].numpy()
  graphdef, _, _ = functional.split(_vit())
  params = functional.unflatten({k: jnp.asarray(v) for k, v in from_lavis.items()})
  ours = np.asarray(functional.merge(graphdef, params)(jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_lavis_pos_embed_resized_bicubic(blip2):
  """A 4×4-grid pos_embed into a 6×6-grid tower (42 px): torch bicubic, CLS row untouched."""
  lavis, _ = hf_blip2_to_lavis(_sd(blip2))
  out = convert_lavis_eva_vit(lavis, _expected(_vit(image_size=42)))
  pe = torch.from_numpy(lavis["pos_embed"][0])
  grid = pe[1:].reshape(1, 4, 4, W).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
  ref = np.concatenate([pe[:1].numpy(), ref.permute(0, 2, 3, 1).reshape(36, W).numpy()])
  np.testing.assert_allclose(out["pos_embed"], ref, rtol=0, atol=1e-6)


def test_hf_blip2_rejects_nonzero_k_bias_and_accepts_old_q_v_layout(blip2):
  sd = _sd(blip2)
  expected = _expected(_vit())
  bad = dict(sd)
  bad["encoder.layers.0.self_attn.qkv.bias"] = np.ones(3 * W, np.float32)
  with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.self_attn\.qkv\.bias"):
    convert_hf_blip2_vision(bad, expected)
  old = dict(sd)
  b = old.pop("encoder.layers.0.self_attn.qkv.bias")
  old["encoder.layers.0.self_attn.q_bias"], old["encoder.layers.0.self_attn.v_bias"] = \
      b[:W], b[2 * W:]
  new = convert_hf_blip2_vision(sd, expected)
  assert all(np.array_equal(v, new[k]) for k, v in convert_hf_blip2_vision(old, expected).items())
  # Prefixed keys as in Blip2ForConditionalGeneration.
  assert set(convert_hf_blip2_vision({"vision_model." + k: v for k, v in sd.items()},
                                     expected)) == set(expected)


def _clip_text():
  torch.manual_seed(0)
  return CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=40, hidden_size=W, intermediate_size=MLP, num_hidden_layers=DEPTH,
      num_attention_heads=HEADS, max_position_embeddings=10, projection_dim=12,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def _eva_text(sd):
  """HF CLIP text → eva_clip_psz14.pt names (CHECKPOINTS.md §4)."""
  out = {"text.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
         "text.positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
         "text.ln_final.weight": sd["text_model.final_layer_norm.weight"],
         "text.ln_final.bias": sd["text_model.final_layer_norm.bias"],
         "text.text_projection": sd["text_projection.weight"].T.copy()}
  for i in range(DEPTH):
    hf, ev = f"text_model.encoder.layers.{i}.", f"text.transformer.resblocks.{i}."
    for part in ("weight", "bias"):
      out[ev + f"attn.in_proj_{part}"] = np.concatenate(
          [sd[hf + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
      for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                   ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        out[ev + f"{b}.{part}"] = sd[hf + f"{a}.{part}"]
  return out


def _text_expected():
  return _expected(TextTransformer(vocab_size=40, context_length=10, width=W, depth=DEPTH,
                                   num_heads=HEADS, mlp_dim=MLP, output_dim=12,
                                   rngs=nnx.Rngs(0)))


def _cases():
  """(name, converter, source state, expected shapes) for every converter."""
  clip_vision = CLIPVisionModel(CLIPVisionConfig(
      hidden_size=W, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      image_size=SIZE, patch_size=PATCH)).eval()
  blip2 = Blip2VisionModel(Blip2VisionConfig(
      hidden_size=W, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      image_size=SIZE, patch_size=PATCH, qkv_bias=True)).eval()
  blip2_sd = _sd(blip2)
  text_sd = _sd(_clip_text())
  clip_cfg = dict(qkv_bias="qkv", act="quick_gelu", pre_norm=True, post_norm=True,
                  patch_bias=False)
  return [
      ("lavis", convert_lavis_eva_vit, hf_blip2_to_lavis(blip2_sd)[0], _expected(_vit())),
      ("hf_blip2", convert_hf_blip2_vision, blip2_sd, _expected(_vit(post_norm=True))),
      ("hf_clip_vision", convert_hf_clip_vision, _sd(clip_vision), _expected(_vit(**clip_cfg))),
      ("hf_clip_text", convert_hf_clip_text, text_sd, _text_expected()),
      ("eva_text", convert_eva_clip_text, _eva_text(text_sd), _text_expected()),
  ]


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name, fn, state, expected", CASES, ids=IDS)
def test_every_source_key_consumed_exactly_once(name, fn, state, expected):
  """Full conversion fills every target; dropping any one source key leaves a target missing,
  so each key feeds its own target (no key ignored, none shared)."""
  assert set(fn(state, expected)) == set(expected), name
  targets = set()
  for key in state:
    partial = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ConversionError, match="missing target keys") as err:
      fn(partial, expected)
    missing = str(err.value).split("missing target keys: ")[1].split(", ")
    assert len(missing) == 1 or key.endswith("qkv.bias"), (key, missing)
    targets.update(missing)
  assert targets == set(expected)


@pytest.mark.parametrize("name, fn, state, expected", CASES, ids=IDS)
def test_extra_and_misshaped_keys_are_named(name, fn, state, expected):
  extra = dict(state, **{"bogus.weight": np.ones(3, np.float32)})
  with pytest.raises(ConversionError, match=r"unmapped source keys: bogus\.weight"):
    fn(extra, expected)
  key = sorted(k for k in state if k.endswith("fc2.bias") or k.endswith("c_proj.bias"))[0]
  bad = dict(state, **{key: np.ones(W + 1, np.float32)})
  with pytest.raises(ConversionError, match=rf"{key.replace('.', '[.]')} -> \S+: got \(17,\)"):
    fn(bad, expected)


def test_missing_key_is_named():
  name, fn, state, expected = CASES[0]
  partial = {k: v for k, v in state.items() if k != "blocks.0.attn.v_bias"}
  with pytest.raises(ConversionError, match="missing target keys: blocks/0/attn/v_bias"):
    fn(partial, expected)
