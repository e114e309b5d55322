"""Converters for the Q-Former (LAVIS and HF layouts, with query_tokens / ln_vision) and cvem_*.

Toy checkpoints use exactly the key names of CHECKPOINTS.md §1.2, §1.3, §2.2 and §5; the LAVIS
dict is derived from a transformers Blip2QFormerModel by the §5 rename table written out here,
so a LAVIS-converted Q-Former must reproduce HF's forward (1e-5 relative, float32). Conv and
Linear layouts are checked by running PyTorch's own layers (1e-5).
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from dynrefer_jax import functional
from dynrefer_jax.convert.aligner import convert_cvem
from dynrefer_jax.convert.common import ConversionError, expected_shapes
from dynrefer_jax.convert.qformer import convert_qformer_hf, convert_qformer_lavis
from dynrefer_jax.models.aligner import DeformableAligner
from dynrefer_jax.models.fusion import FusionMLP
from dynrefer_jax.models.qformer import QFormer

D, HEADS, MLP, ENC, Q = 16, 2, 24, 8, 3


def _hf_model(layers=2):
  torch.manual_seed(0)
  cfg = Blip2QFormerConfig(hidden_size=D, num_hidden_layers=layers, num_attention_heads=HEADS,
                           intermediate_size=MLP, encoder_hidden_size=ENC,
                           cross_attention_frequency=2)
  model = Blip2QFormerModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.3)
  return model


def _ours(layers=2):
  return QFormer(num_layers=layers, hidden=D, num_heads=HEADS, mlp_dim=MLP, encoder_width=ENC,
                 rngs=nnx.Rngs(0))


def _hf_to_lavis(key):
  """CHECKPOINTS.md §5, read right to left, for a bare Blip2QFormerModel key."""
  if key.startswith("layernorm."):
    return "Qformer.bert.embeddings.LayerNorm." + key.split(".", 1)[1]
  return "Qformer.bert." + key.replace("attention.attention.", "attention.self.")


def _lavis_checkpoint(hf, layers=2):
  """A BLIP-2 stage-2 style `model` dict: Q-Former, buffers, text-side leftovers, extras."""
  sd = {_hf_to_lavis(k): v.detach().numpy() for k, v in hf.state_dict().items()}
  rng = np.random.default_rng(0)
  sd["Qformer.bert.embeddings.position_ids"] = np.arange(512)[None]
  sd["Qformer.bert.embeddings.word_embeddings.weight"] = np.zeros((30, D), np.float32)
  sd["Qformer.bert.embeddings.position_embeddings.weight"] = np.zeros((512, D), np.float32)
  for i in range(layers):
    p = f"Qformer.bert.encoder.layer.{i}."
    sd[p + "intermediate.dense.weight"] = np.zeros((MLP, D), np.float32)
    sd[p + "output.dense.bias"] = np.zeros((D,), np.float32)
    sd[p + "output.LayerNorm.weight"] = np.zeros((D,), np.float32)
  sd["Qformer.cls.predictions.bias"] = np.zeros((30,), np.float32)
  sd["query_tokens"] = rng.normal(size=(1, Q, D)).astype(np.float32)
  sd["ln_vision.weight"] = rng.normal(size=(ENC,)).astype(np.float32)
  sd["ln_vision.bias"] = rng.normal(size=(ENC,)).astype(np.float32)
  sd["t5_proj.weight"] = np.zeros((4, D), np.float32)  # another converter's key: ignored
  return sd


def _expected(model, extras=True):
  exp = expected_shapes(functional.split(model)[1])
  if extras:
    exp.update({"query_tokens": (Q, D), "ln_vision/scale": (ENC,), "ln_vision/bias": (ENC,)})
  return exp


def _run_qformer(model, flat, queries, enc):
  graphdef = functional.split(model)[0]
  params = functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  return np.asarray(functional.merge(graphdef, params)(jnp.asarray(queries), jnp.asarray(enc)))


def test_lavis_layout_reproduces_hf_forward():
  hf = _hf_model()
  sd = _lavis_checkpoint(hf)
  model = _ours()
  out = convert_qformer_lavis(sd, _expected(model))
  np.testing.assert_array_equal(out["query_tokens"], sd["query_tokens"][0])  # [1,Q,D] → [Q,D]
  np.testing.assert_array_equal(out["ln_vision/scale"], sd["ln_vision.weight"])
  np.testing.assert_array_equal(out["ln_vision/bias"], sd["ln_vision.bias"])
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(2, Q, D)).astype(np.float32)
  enc = rng.normal(size=(2, 5, ENC)).astype(np.float32)
  with torch.no_grad():
    want = hf(query_embeds=torch.from_numpy(queries),
              encoder_hidden_states=torch.from_numpy(enc)).last_hidden_state.numpy()
  qformer = {k: v for k, v in out.items() if not k.startswith(("query_tokens", "ln_vision"))}
  got = _run_qformer(model, qformer, queries, enc)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_hf_prefixed_and_bare_layouts_agree_with_lavis():
  hf = _hf_model()
  model = _ours()
  bare = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  lavis = convert_qformer_lavis(_lavis_checkpoint(hf), _expected(model, extras=False))
  from_bare = convert_qformer_hf(bare, _expected(model, extras=False))
  full = {"qformer." + k: v for k, v in bare.items()}
  full["query_tokens"] = np.ones((1, Q, D), np.float32)
  full["vision_model.post_layernorm.weight"] = np.full((ENC,), 2.0, np.float32)
  full["vision_model.post_layernorm.bias"] = np.full((ENC,), 3.0, np.float32)
  full["language_projection.weight"] = np.zeros((4, D), np.float32)  # ignored
  full["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((4, ENC), np.float32)
  from_full = convert_qformer_hf(full, _expected(model))
  assert set(lavis) == set(from_bare) == set(from_full) - {"query_tokens", "ln_vision/scale",
                                                         "ln_vision/bias"}
  for k in lavis:
    np.testing.assert_array_equal(lavis[k], from_bare[k])
    np.testing.assert_array_equal(lavis[k], from_full[k])
  assert from_full["ln_vision/scale"][0] == 2.0 and from_full["ln_vision/bias"][0] == 3.0


def _lavis_key_table(layers):
  """Every key of CHECKPOINTS.md §1.3 (12 layers: 255 keys), with toy shapes."""
  keys = {"Qformer.bert.embeddings.LayerNorm.weight": (D,),
          "Qformer.bert.embeddings.LayerNorm.bias": (D,),
          "Qformer.bert.embeddings.position_ids": (1, 512)}
  for i in range(layers):
    p = f"Qformer.bert.encoder.layer.{i}."
    blocks = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
    for blk in blocks:
      kv_in = ENC if blk == "crossattention" else D
      for name, w in (("query", (D, D)), ("key", (D, kv_in)), ("value", (D, kv_in))):
        keys[f"{p}{blk}.self.{name}.weight"] = w
        keys[f"{p}{blk}.self.{name}.bias"] = (D,)
      keys[f"{p}{blk}.output.dense.weight"] = (D, D)
      keys[f"{p}{blk}.output.dense.bias"] = (D,)
      keys[f"{p}{blk}.output.LayerNorm.weight"] = (D,)
      keys[f"{p}{blk}.output.LayerNorm.bias"] = (D,)
    keys[p + "intermediate_query.dense.weight"] = (MLP, D)
    keys[p + "intermediate_query.dense.bias"] = (MLP,)
    keys[p + "output_query.dense.weight"] = (D, MLP)
    keys[p + "output_query.dense.bias"] = (D,)
    keys[p + "output_query.LayerNorm.weight"] = (D,)
    keys[p + "output_query.LayerNorm.bias"] = (D,)
  return {k: np.zeros(s, np.float32) for k, s in keys.items()}


def test_every_key_consumed_once_at_twelve_layers():
  sd = _lavis_key_table(12)
  assert len(sd) == 255  # CHECKPOINTS.md §1.3 key count
  model = _ours(12)
  expected = _expected(model, extras=False)
  out = convert_qformer_lavis(sd, expected)
  assert set(out) == set(expected) and len(out) == 254
  for k, v in out.items():
    assert v.shape == expected[k], k


def test_errors_name_missing_extra_and_misshaped_keys():
  model = _ours()
  expected = _expected(model, extras=False)
  sd = _lavis_key_table(2)
  del sd["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
  sd["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros((D,), np.float32)
  sd["Qformer.bert.encoder.layer.1.crossattention.self.key.weight"] = np.zeros((D, ENC),
                                                                               np.float32)
  sd["Qformer.bert.encoder.layer.0.crossattention.self.value.weight"] = np.zeros((D, D),
                                                                                np.float32)
  with pytest.raises(ConversionError) as err:
    convert_qformer_lavis(sd, expected)
  msg = str(err.value)
  assert re.search(r"missing target keys:.*layers/1/output_query/bias", msg)
  assert re.search(r"unmapped source keys:.*layer\.0\.attention\.self\.rotary\.weight", msg)
  assert re.search(r"unused source keys:.*layer\.1\.crossattention\.self\.key\.weight", msg)
  assert re.search(r"mis-shaped keys:.*layer\.0\.crossattention\.self\.value\.weight.*"
                   rf"got \({D}, {D}\), expected \({ENC}, {D}\)", msg)


def test_query_tokens_required_when_asked_and_ln_vision_optional():
  model = _ours()
  sd = _lavis_key_table(2)
  with pytest.raises(ConversionError, match="missing target keys: query_tokens"):
    convert_qformer_lavis(sd, _expected(model))
  sd["query_tokens"] = np.zeros((1, Q, D), np.float32)
  out = convert_qformer_lavis(sd, _expected(model))  # no ln_vision in the file: accepted
  assert "query_tokens" in out and not any(k.startswith("ln_vision") for k in out)


def _torch_cvem(c, views=3):
  torch.manual_seed(0)
  mods = {
      "cvem_align.offset_mask_dw": torch.nn.Conv2d(2 * c, c, 3, padding=1, groups=c),
      "cvem_align.offset_mask": torch.nn.Linear(c, 112),
      "cvem_align.value_proj": torch.nn.Linear(c, c),
      "cvem_align.output_proj": torch.nn.Linear(c, c),
      "cvem_mlp": torch.nn.Sequential(torch.nn.Linear(views * c, c), torch.nn.ReLU(),
                                      torch.nn.Linear(c, c)),
  }
  sd = {f"{prefix}.{k}": v.detach().numpy() for prefix, m in mods.items()
        for k, v in m.state_dict().items()}
  sd["cem_memory"] = np.zeros((4,), np.float32)  # another converter's key: ignored
  return mods, sd


def _cvem_expected(c, views=3):
  exp = {}
  for prefix, model in (("cvem_align", DeformableAligner(c, rngs=nnx.Rngs(0))),
                        ("cvem_mlp", FusionMLP(c, views, rngs=nnx.Rngs(0)))):
    exp.update({f"{prefix}/{k}": s for k, s in expected_shapes(functional.split(model)[1]).items()})
  return exp


def test_cvem_layouts_against_torch_layers():
  c = 16
  mods, sd = _torch_cvem(c)
  out = convert_cvem(sd, _cvem_expected(c))
  assert len(out) == 12  # CHECKPOINTS.md §1.2: 8 cvem_align + 4 cvem_mlp keys
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 5, 2 * c)).astype(np.float32)
  aligner = DeformableAligner(c, rngs=nnx.Rngs(0))
  aligner.offset_mask_dw.kernel[...] = jnp.asarray(out["cvem_align/offset_mask_dw/kernel"])
  aligner.offset_mask_dw.bias[...] = jnp.asarray(out["cvem_align/offset_mask_dw/bias"])
  with torch.no_grad():
    want = mods["cvem_align.offset_mask_dw"](torch.from_numpy(x).permute(0, 3, 1, 2))
  got = np.asarray(aligner.offset_mask_dw(jnp.asarray(x)))
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  for name in ("offset_mask", "value_proj", "output_proj"):
    np.testing.assert_array_equal(out[f"cvem_align/{name}/kernel"],
                                  sd[f"cvem_align.{name}.weight"].T)
  fusion = FusionMLP(c, 3, rngs=nnx.Rngs(0))
  graphdef = functional.split(fusion)[0]
  params = functional.unflatten({k.split("/", 1)[1]: jnp.asarray(v) for k, v in out.items()
                                 if k.startswith("cvem_mlp/")})
  y = rng.normal(size=(2, 7, 3 * c)).astype(np.float32)
  with torch.no_grad():
    want = mods["cvem_mlp"](torch.from_numpy(y)).numpy()
  np.testing.assert_allclose(np.asarray(functional.merge(graphdef, params)(jnp.asarray(y))), want,
                             atol=1e-5)


def test_cvem_errors_and_full_size_counts():
  c = 16
  _, sd = _torch_cvem(c)
  del sd["cvem_mlp.2.bias"]
  sd["cvem_mlp.1.weight"] = np.zeros((c, c), np.float32)
  sd["cvem_align.value_proj.weight"] = np.zeros((c, c + 1), np.float32)
  with pytest.raises(ConversionError) as err:
    convert_cvem(sd, _cvem_expected(c))
  msg = str(err.value)
  assert "cvem_mlp/linear2/bias" in msg and "cvem_mlp.1.weight" in msg
  assert re.search(r"mis-shaped keys: cvem_align\.value_proj\.weight", msg)
  # CHECKPOINTS.md §1.7 totals at full size (abstract: nothing allocated).
  _, align, _ = functional.abstract_split(lambda: DeformableAligner(1408, rngs=nnx.Rngs(0)))
  _, mlp, _ = functional.abstract_split(lambda: FusionMLP(1408, 3, rngs=nnx.Rngs(0)))
  assert functional.count(align) == 4_152_304
  assert functional.count(mlp) == 7_932_672
  assert expected_shapes(align)["offset_mask_dw/kernel"] == (3, 3, 2, 1408)
