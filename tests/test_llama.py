"""Llama (Vicuna variant) vs transformers' LlamaForCausalLM, toy size with GQA, float32.

Logits within 1e-5 relative to the reference's max magnitude; the caption loss and its gradient
w.r.t. the prefix embeddings within 1e-4; greedy and beam generate token-identical to HF
generate(inputs_embeds=prefix) with scores within 1e-4.
"""

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax import functional
from dynrefer_jax.convert.common import expected_shapes
from dynrefer_jax.convert.llama import convert_llama
from dynrefer_jax.decode.beam_search import generate
from dynrefer_jax.models.llama import Llama

V, D, EOS = 48, 32, 2


@pytest.fixture(scope="module")
def toy():
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=40,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
                                 max_position_embeddings=64, tie_word_embeddings=False,
                                 bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "embed" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    hf.lm_head.weight.mul_(3.0)
    hf.lm_head.weight[EOS] *= 1.5
  assert hf.lm_head.weight is not hf.model.embed_tokens.weight
  model = Llama(vocab_size=V, hidden_size=D, intermediate_size=40, num_layers=2, num_heads=4,
                num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, rngs=nnx.Rngs(0))
  graphdef, params, _ = functional.split(model)
  flat = convert_llama({k: v.detach().numpy() for k, v in hf.state_dict().items()},
                       expected_shapes(params))
  params = functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  return hf, graphdef, params


def _close(ours, ref, rel):
  ours, ref = np.asarray(ours), np.asarray(ref)
  np.testing.assert_allclose(ours, ref, rtol=rel, atol=rel * np.abs(ref).max())


def test_logits_match_hf_with_padding(toy):
  hf, graphdef, params = toy
  model = functional.merge(graphdef, params)
  rs = np.random.RandomState(0)
  x = rs.randn(3, 9, D).astype(np.float32)
  mask = np.ones((3, 9), bool)
  mask[1, 6:] = False          # right padding
  mask[2, 3:5] = False         # padding in the middle (control words before a caption)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask.astype(np.int64)),
             position_ids=torch.tensor(pos)).logits.numpy()
  ours = np.asarray(model.forward(jnp.asarray(x), jnp.asarray(mask)))
  _close(ours[mask], ref[mask], 1e-5)


def test_caption_loss_and_grad_match_torch(toy):
  hf, graphdef, params = toy
  rs = np.random.RandomState(1)
  b, p, t = 3, 5, 4
  prefix = rs.randn(b, p, D).astype(np.float32)
  pmask = np.ones((b, p), bool)
  pmask[0, 3:] = False
  labels = rs.randint(3, V, (b, t))
  lmask = np.ones((b, t), bool)
  lmask[2, 2:] = False

  def loss_fn(emb):
    return functional.merge(graphdef, params)(emb, jnp.asarray(pmask), jnp.asarray(labels),
                                              jnp.asarray(lmask))[0]

  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(prefix))
  # Reference: InstructBLIP-style packing (valid prefix tokens, then the caption, then pads),
  # loss only on caption tokens (others -100), HF's shifted causal-LM loss.
  tp = torch.tensor(prefix, requires_grad=True)
  emb = hf.model.embed_tokens(torch.tensor(labels))
  rows, targets, masks = [], [], []
  width = p + t
  for i in range(b):
    valid = torch.tensor(np.flatnonzero(pmask[i]))
    cap = torch.tensor(np.flatnonzero(lmask[i]))
    seq = torch.cat([tp[i, valid], emb[i, cap]], 0)
    tgt = [-100] * len(valid) + list(labels[i, cap.numpy()])
    n = seq.shape[0]
    rows.append(torch.cat([seq, torch.zeros(width - n, D)], 0))
    targets.append(tgt + [-100] * (width - n))
    masks.append([1] * n + [0] * (width - n))
  ref = hf(inputs_embeds=torch.stack(rows), attention_mask=torch.tensor(masks),
           labels=torch.tensor(targets)).loss
  ref.backward()
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-4)
  _close(grad, tp.grad.numpy(), 1e-4)


GEN_N, GEN_P, GEN_T = 24, 5, 8
_GEN_COMPILED = {}


def _generate_ours(toy, x, mask, num_beams, **settings):
  """One compile per num_beams; repetition/length penalties and min_length are traced."""
  _, graphdef, params = toy
  key = (id(toy[0]), num_beams)
  if key not in _GEN_COMPILED:
    @jax.jit
    def run(p, x, mask, min_length, repetition_penalty, length_penalty):
      return generate(functional.merge(graphdef, p), x, mask, num_beams=num_beams,
                      max_new_tokens=GEN_T, min_length=min_length,
                      repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                      eos_token_id=EOS, pad_token_id=0, decoder_start_token_id=None)
    _GEN_COMPILED[key] = run
  ids, scores = _GEN_COMPILED[key](
      params, jnp.asarray(x), jnp.asarray(mask), jnp.int32(settings.get("min_length", 0)),
      jnp.float32(settings.get("repetition_penalty", 1.0)),
      jnp.float32(settings.get("length_penalty", 1.0)))
  return np.asarray(ids), np.asarray(scores)


GEN_CASES = [dict(num_beams=nb, repetition_penalty=rp, length_penalty=lp)
             for nb in (1, 2, 5) for rp in (1.0, 1.5) for lp in (0.0, 1.0)]
GEN_CASES += [dict(num_beams=3, length_penalty=1.0, min_length=3)]


@pytest.mark.parametrize("settings", GEN_CASES, ids=str)
def test_generate_matches_hf(toy, settings):
  """24 random prefixes; ids token-identical to HF generate(inputs_embeds=prefix); beam sequence
  scores within 1e-4; greedy scores (HF has none) vs HF's processed per-step scores."""
  hf = toy[0]
  x = np.random.RandomState(2).randn(GEN_N, GEN_P, D).astype(np.float32)
  mask = np.ones((GEN_N, GEN_P), bool)
  ids, scores = _generate_ours(toy, x, mask, **settings)
  with torch.no_grad():
    out = hf.generate(inputs_embeds=torch.tensor(x),
                      attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=GEN_T,
                      do_sample=False, return_dict_in_generate=True, output_scores=True,
                      **settings)
  ref = np.zeros((GEN_N, GEN_T), np.int64)
  for i, row in enumerate(out.sequences.numpy()):
    end = list(row).index(EOS) + 1 if EOS in row else len(row)
    ref[i, :end] = row[:end]
  np.testing.assert_array_equal(ids, ref)
  ended = (ref == EOS).any(1)
  assert ended.any(), "no sequence ended with EOS: the EOS path went unchecked"
  if settings["num_beams"] > 1:
    np.testing.assert_allclose(scores, out.sequences_scores.numpy(), atol=1e-4, rtol=0)
    return
  assert not ended.all(), "greedy: every sequence ended early; the max-length path unchecked"
  logp = torch.stack(out.scores, 1).log_softmax(-1).numpy()
  lengths = np.where(ended, (ref == EOS).argmax(1) + 1, GEN_T)
  tok = np.take_along_axis(logp, ref[:, :logp.shape[1], None], -1)[..., 0]
  want = np.array([tok[n, :lengths[n]].sum() / lengths[n] ** settings["length_penalty"]
                   for n in range(GEN_N)])
  np.testing.assert_allclose(scores, want, atol=1e-4, rtol=0)


def test_every_parameter_has_logical_axes():
  model = Llama(vocab_size=V, hidden_size=D, intermediate_size=40, num_layers=1, num_heads=4,
                num_kv_heads=2, rngs=nnx.Rngs(0))
  _, params, axes = functional.split(model)
  flat_p, flat_a = functional.flatten(params), functional.flatten(axes)
  for path, value in flat_p.items():
    assert len(flat_a[path]) == value.ndim and any(flat_a[path]), path


# ---- Llama-family variants: Qwen2 biases + tied embeddings, Llama-3 rope scaling, scan ------

def _randomized(hf, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "embed" in name or name.endswith("bias"):
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
  return hf


def _ours_from_hf(hf, **kw):
  """Our Llama sized by convert.llama.lm_config from the HF config as save_pretrained writes
  it, weights through convert_llama."""
  import tempfile
  from dynrefer_jax.convert import llama as llama_conv
  with tempfile.TemporaryDirectory() as d:
    hf.config.save_pretrained(d)
    lm = llama_conv.lm_config(llama_conv.read_hf_config(d))
  assert lm.pop("kind") == "llama"
  model = Llama(**lm, **kw, rngs=nnx.Rngs(0))
  graphdef, params, _ = functional.split(model)
  flat = convert_llama({k: v.detach().numpy() for k, v in hf.state_dict().items()},
                       expected_shapes(params))
  return graphdef, functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()}), lm


def _forward_vs_hf(hf, graphdef, params):
  rs = np.random.RandomState(3)
  x = rs.randn(2, 7, D).astype(np.float32)
  mask = np.ones((2, 7), bool)
  mask[1, 2:4] = False
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask.astype(np.int64)),
             position_ids=torch.tensor(pos)).logits.numpy()
  ours = np.asarray(jax.jit(lambda p: functional.merge(graphdef, p).forward(
      jnp.asarray(x), jnp.asarray(mask)))(params))
  _close(ours[mask], ref[mask], 1e-5)


def test_qwen2_biases_and_tied_embeddings_match_hf():
  """Qwen2: q/k/v biases (no o bias), tied lm_head; sized from its config.json."""
  cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=40,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True, max_position_embeddings=64)
  torch.manual_seed(0)
  hf = _randomized(transformers.Qwen2ForCausalLM(cfg).eval(), 4)
  assert hf.lm_head.weight is hf.model.embed_tokens.weight
  graphdef, params, lm = _ours_from_hf(hf)
  assert lm["attention_bias"] and not lm["o_bias"] and lm["tie_word_embeddings"]
  assert "bias" in params["layers"][0]["q"] and "bias" not in params["layers"][0]["o"]
  assert "lm_head" not in params
  _forward_vs_hf(hf, graphdef, params)


def test_llama3_rope_scaling_and_attention_bias_match_hf():
  """Llama 3.1-style "llama3" rope scaling; Llama's attention_bias (q, k, v and o)."""
  cfg = transformers.LlamaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=40, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, attention_bias=True, rope_theta=50.0,
      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=4),
      max_position_embeddings=64)
  torch.manual_seed(0)
  hf = _randomized(transformers.LlamaForCausalLM(cfg).eval(), 5)
  graphdef, params, lm = _ours_from_hf(hf)
  assert lm["rope_scaling"]["rope_type"] == "llama3" and lm["o_bias"]
  # The scaling changes the frequencies at this theta / context (else the test checks nothing).
  from dynrefer_jax.models import llama as llama_lib
  assert not np.allclose(llama_lib.inverse_frequencies(8, 50.0, lm["rope_scaling"]),
                         llama_lib.inverse_frequencies(8, 50.0))
  _forward_vs_hf(hf, graphdef, params)


def test_unsupported_configs_are_one_line():
  from dynrefer_jax.convert import llama as llama_conv
  base = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2)
  with pytest.raises(ValueError, match="rope scaling 'yarn'"):
    llama_conv.lm_config(dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
  with pytest.raises(ValueError, match="mlp_bias"):
    llama_conv.lm_config(dict(base, mlp_bias=True))
  with pytest.raises(ValueError, match="not a Llama-format"):
    llama_conv.lm_config(dict(base, model_type="gpt2"))


def test_scanned_layers_and_remat_equal_unrolled(toy):
  """scan_layers (lax.scan over the blocks) and remat: the same loss and prefix gradient."""
  from dynrefer_jax.models import layers as layers_lib
  _, graphdef, params = toy
  scanned = Llama(vocab_size=V, hidden_size=D, intermediate_size=40, num_layers=2, num_heads=4,
                  num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, scan_layers=True,
                  rngs=nnx.Rngs(0))
  graphdef_scan = nnx.graphdef(scanned)
  rs = np.random.RandomState(4)
  prefix = jnp.asarray(rs.randn(2, 4, D).astype(np.float32))
  pmask = jnp.asarray(np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool))
  labels = jnp.asarray(rs.randint(3, V, (2, 3)))
  lmask = jnp.asarray(np.array([[1, 1, 1], [1, 1, 0]], bool))

  def grad(gd, remat):
    def loss(emb):
      with layers_lib.remat_policy(remat):
        return functional.merge(gd, params)(emb, pmask, labels, lmask)[0]
    return jax.jit(jax.value_and_grad(loss))(prefix)

  ref_loss, ref_grad = grad(graphdef, "none")
  for remat in ("none", "full"):
    loss, g = grad(graphdef_scan, remat)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    _close(g, ref_grad, 1e-5)
