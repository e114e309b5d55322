"""TextTransformer vs transformers' PyTorch CLIPTextModelWithProjection (toy sizes, exact GELU).

Weights: HF state_dict → our HF converter; and HF state_dict → EVA-CLIP key layout (written
here from CHECKPOINTS.md §4) → our EVA converter. Error: rel = max|ours - ref| / max|ref|,
float32, matmul precision "highest"; bound 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from dynrefer_jax import functional
from dynrefer_jax.convert.common import expected_shapes
from dynrefer_jax.convert.text_tower import convert_eva_clip_text, convert_hf_clip_text
from dynrefer_jax.models.text_tower import TextTransformer

from torch_references import EvaText

TOL = 1e-5
VOCAB, CTX, W, HEADS, MLP, DEPTH, OUT = 64, 12, 32, 4, 48, 2, 24
EOT = 63  # the largest id, as CLIP's 49407


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_model(eos_token_id: int) -> CLIPTextModelWithProjection:
  """eos_token_id=2 selects HF's legacy argmax-of-ids pooling; any other id selects the first
  position holding that id."""
  cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=W, intermediate_size=MLP,
                       num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                       max_position_embeddings=CTX, projection_dim=OUT, hidden_act="gelu",
                       layer_norm_eps=1e-5, eos_token_id=eos_token_id, bos_token_id=1,
                       pad_token_id=0)
  model = CLIPTextModelWithProjection(cfg).eval()
  gen = torch.Generator().manual_seed(eos_token_id)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5)
              + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
  return model


def tokens(length: int, pad_with: int, eot: int = EOT) -> np.ndarray:
  """Rows of SOT, words, EOT, then padding (`pad_with`), with different lengths."""
  rng = np.random.default_rng(length)
  rows = []
  for n_words in (1, 4, length - 2):
    words = [w for w in rng.integers(3, VOCAB, 4 * n_words) if w not in (eot, EOT)][:n_words]
    row = [1] + words + [eot]
    rows.append(row + [pad_with] * (length - len(row)))
  return np.asarray(rows, np.int32)


def state(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours(convert_fn, sd, eot_token_id, ids):
  model = TextTransformer(vocab_size=VOCAB, context_length=CTX, width=W, depth=DEPTH,
                          num_heads=HEADS, mlp_dim=MLP, output_dim=OUT,
                          eot_token_id=eot_token_id, rngs=nnx.Rngs(0))
  graphdef, params, _ = functional.split(model)
  flat = convert_fn(sd, expected_shapes(params))
  params = functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  return np.asarray(functional.merge(graphdef, params)(jnp.asarray(ids)))


def to_eva_layout(sd: dict) -> dict:
  """HF CLIP text names → eva_clip_psz14.pt names (CHECKPOINTS.md §4), plus a vision key and
  the scalar the real file carries."""
  out = {"text.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
         "text.positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
         "text.ln_final.weight": sd["text_model.final_layer_norm.weight"],
         "text.ln_final.bias": sd["text_model.final_layer_norm.bias"],
         "text.text_projection": sd["text_projection.weight"].T.copy(),
         "text.logit_scale": np.array(4.6, np.float32),
         "visual.cls_token": np.zeros((1, 1, 8), np.float32)}
  for i in range(DEPTH):
    hf, ev = f"text_model.encoder.layers.{i}.", f"text.transformer.resblocks.{i}."
    for part in ("weight", "bias"):
      out[ev + f"attn.in_proj_{part}"] = np.concatenate(
          [sd[hf + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
      out[ev + f"attn.out_proj.{part}"] = sd[hf + f"self_attn.out_proj.{part}"]
      out[ev + f"ln_1.{part}"] = sd[hf + f"layer_norm1.{part}"]
      out[ev + f"ln_2.{part}"] = sd[hf + f"layer_norm2.{part}"]
      out[ev + f"mlp.c_fc.{part}"] = sd[hf + f"mlp.fc1.{part}"]
      out[ev + f"mlp.c_proj.{part}"] = sd[hf + f"mlp.fc2.{part}"]
  return out


@pytest.mark.parametrize("length", [CTX, 7])
def test_argmax_pooling_matches_hf(length):
  """eot_token_id=None (OpenCLIP/EVA argmax) ↔ HF legacy eos_token_id=2; padding 0."""
  model = hf_model(eos_token_id=2)
  ids = tokens(length, pad_with=0)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long()).text_embeds.numpy()
  assert rel_err(ours(convert_hf_clip_text, state(model), None, ids), ref) < TOL
  assert rel_err(ours(convert_eva_clip_text, to_eva_layout(state(model)), None, ids), ref) < TOL


def test_first_eot_pooling_matches_hf():
  """eot_token_id ↔ HF's first-position-of-eos rule. The EOT id (40) is not the largest id and
  also pads, so argmax pooling would pick another position."""
  eot = 40
  model = hf_model(eos_token_id=eot)
  ids = tokens(CTX, pad_with=eot, eot=eot)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long()).text_embeds.numpy()
  assert rel_err(ours(convert_hf_clip_text, state(model), eot, ids), ref) < TOL
  # Guard that the two rules really differ on this input.
  assert rel_err(ours(convert_hf_clip_text, state(model), None, ids), ref) > 1e-3


def test_sharded_jit_matches_unsharded(devices8):
  model = TextTransformer(vocab_size=VOCAB, context_length=CTX, width=W, depth=DEPTH,
                          num_heads=HEADS, mlp_dim=MLP, output_dim=OUT, rngs=nnx.Rngs(1))
  graphdef, params, axes = functional.split(model)
  ids = jnp.asarray(np.concatenate([tokens(CTX, 0)] * 3)[:8])
  ref = np.asarray(model(ids))
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices8)

  def spec(leaf, names):
    dims = [("fsdp" if n == "embed" and d % 8 == 0 else None) for n, d in zip(names, leaf.shape)]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*dims))

  sharded = jax.device_put(params, jax.tree.map(spec, params, axes))
  assert "fsdp" in sharded["token_embedding"].sharding.spec
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, t: functional.merge(graphdef, p)(t))(sharded, ids)
  assert rel_err(out, ref) < 1e-6


def test_full_size_eva_clip_text_shapes():
  """Default config = EVA-CLIP-g text (CHECKPOINTS.md §4): 123,846,913 parameters there, one of
  them the unused logit_scale."""
  _, params, _ = functional.abstract_split(lambda: TextTransformer(rngs=nnx.Rngs(0)))
  assert functional.count(params) == 123_846_913 - 1
  out = nnx.eval_shape(lambda: TextTransformer(rngs=nnx.Rngs(0))(jnp.zeros((3, 77), jnp.int32)))
  assert out.shape == (3, 1024)


def test_eva_clip_text_matches_torch_reference():
  """The EVA-CLIP module's own state_dict names (prefixed `text.`) through convert_eva_clip_text."""
  torch.manual_seed(7)
  ref_model = EvaText(vocab=VOCAB, context=CTX, width=W, heads=HEADS, mlp=MLP, depth=DEPTH,
                      out=OUT).eval()
  with torch.no_grad():
    ref_model.positional_embedding.copy_(torch.randn(CTX, W) * 0.3)
    ref_model.text_projection.copy_(torch.randn(W, OUT) * W ** -0.5)
    for name, p in ref_model.named_parameters():
      if p.ndim == 1:  # non-trivial LayerNorm and bias values
        p.copy_(torch.randn(p.shape) * 0.5 + (1.0 if name.endswith("ln_1.weight") else 0.0))
  sd = {"text." + k: v.detach().numpy().copy() for k, v in ref_model.state_dict().items()}
  ids = tokens(CTX, pad_with=0)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(ids).long()).numpy()
  assert rel_err(ours(convert_eva_clip_text, sd, None, ids), ref) < TOL
