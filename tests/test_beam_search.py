"""generate() vs transformers' generate on the same toy T5: ids token for token, scores 1e-4.

24 random encoder inputs (with padding) per setting, one batched jitted call on our side. The
toy lm_head is scaled up and the EOS row boosted so that some sequences end early and others run
to max_new_tokens (asserted, so the comparison covers both finalisation paths).
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
from dynrefer_jax.convert.t5 import convert_t5
from dynrefer_jax.decode.beam_search import generate
from dynrefer_jax.models.t5 import T5

V, D, N, L, T = 48, 32, 24, 6, 10
EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def toy():
  cfg = transformers.T5Config(vocab_size=V, d_model=D, d_kv=8, d_ff=48, num_heads=4,
                              num_layers=2, num_decoder_layers=2,
                              relative_attention_num_buckets=8,
                              relative_attention_max_distance=16,
                              feed_forward_proj="gated-gelu", dropout_rate=0.0,
                              tie_word_embeddings=False, decoder_start_token_id=0,
                              pad_token_id=PAD, eos_token_id=EOS)
  cfg.dense_act_fn = "gelu"
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(cfg).eval()
  hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())  # untie (FlanT5)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "lm_head" in name:
        p.copy_(3.0 * torch.randn(p.shape, generator=gen) / D ** 0.5)
        p[EOS] *= 1.6  # EOS wins sometimes
      elif p.ndim == 2 and "relative_attention_bias" not in name and "shared" not in name:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
      else:
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  model = T5(vocab_size=V, d_model=D, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
             num_decoder_layers=2, relative_attention_num_buckets=8,
             relative_attention_max_distance=16, rngs=nnx.Rngs(0))
  graphdef, params, _ = functional.split(model)
  flat = convert_t5({k: v.detach().numpy() for k, v in hf.state_dict().items()},
                    expected_shapes(params))
  params = functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  rs = np.random.RandomState(0)
  x = rs.randn(N, L, D).astype(np.float32)
  mask = np.ones((N, L), bool)
  mask[::3, 4:] = False
  return hf, graphdef, params, x, mask


_COMPILED = {}


def _ours(toy, num_beams, early_stopping=False, min_length=1, repetition_penalty=1.0,
          length_penalty=1.0):
  """One compiled function per (num_beams, early_stopping); the numeric settings are traced."""
  _, graphdef, params, x, mask = toy
  key = (id(toy[0]), num_beams, early_stopping)
  if key not in _COMPILED:
    @jax.jit
    def run(p, x, mask, min_length, repetition_penalty, length_penalty):
      model = functional.merge(graphdef, p)
      return generate(model, model.encode(x, mask), mask, num_beams=num_beams,
                      early_stopping=early_stopping, max_new_tokens=T, min_length=min_length,
                      repetition_penalty=repetition_penalty, length_penalty=length_penalty)
    _COMPILED[key] = run
  ids, scores = _COMPILED[key](params, jnp.asarray(x), jnp.asarray(mask), jnp.int32(min_length),
                               jnp.float32(repetition_penalty), jnp.float32(length_penalty))
  return np.asarray(ids), np.asarray(scores)


def _hf(toy, **settings):
  hf, _, _, x, mask = toy
  with torch.no_grad():
    out = hf.generate(inputs_embeds=torch.tensor(x),
                      attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=T,
                      do_sample=False, return_dict_in_generate=True, output_scores=True,
                      **settings)
  seqs = out.sequences[:, 1:].numpy()  # drop the decoder start token
  ids = np.full((N, T), PAD, np.int64)
  for n, row in enumerate(seqs):
    end = list(row).index(EOS) + 1 if EOS in row else len(row)
    ids[n, :end] = row[:end]  # HF pads beams with EOS after the end, greedy with pad: normalise
  return ids, out


BEAM_CASES = [dict(num_beams=nb, repetition_penalty=rp, length_penalty=lp)
              for nb in (2, 5) for rp in (1.0, 1.5) for lp in (0.0, 1.0)]
BEAM_CASES += [dict(num_beams=2, repetition_penalty=1.5, length_penalty=1.0, min_length=6),
               dict(num_beams=5, repetition_penalty=1.2, length_penalty=0.5, min_length=3)]
# Non-default early_stopping modes each need their own compile: opt-in.
BEAM_CASES += [pytest.param(dict(num_beams=3, length_penalty=2.0, early_stopping=True),
                            marks=pytest.mark.slow),
               pytest.param(dict(num_beams=3, length_penalty=1.0, early_stopping="never"),
                            marks=pytest.mark.slow)]


@pytest.mark.parametrize("settings", BEAM_CASES, ids=str)
def test_beam_search_matches_hf(toy, settings):
  ours, scores = _ours(toy, **settings)
  ref, out = _hf(toy, **settings)
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_allclose(scores, out.sequences_scores.numpy(), atol=1e-4, rtol=0)
  assert (ours == EOS).any(), "no hypothesis ended with EOS: the EOS path went unchecked"


@pytest.mark.parametrize("settings", [dict(), dict(repetition_penalty=1.5, min_length=4)],
                         ids=str)
def test_greedy_matches_hf(toy, settings):
  ours, scores = _ours(toy, num_beams=1, length_penalty=1.0, **settings)
  ref, out = _hf(toy, num_beams=1, **settings)
  np.testing.assert_array_equal(ours, ref)
  ended = (ref == EOS).any(1)
  assert 0 < ended.sum() < N, "toy model must produce both early EOS and full-length outputs"
  # Reference score from HF's processed per-step scores: mean log-softmax over the tokens.
  logp = torch.stack(out.scores, 1).log_softmax(-1).numpy()  # [N, steps, V]
  steps = logp.shape[1]
  lengths = np.where(ended, (ref == EOS).argmax(1) + 1, T)
  tok_logp = np.take_along_axis(logp, ref[:, :steps, None], -1)[..., 0]
  ref_scores = np.array([tok_logp[n, :lengths[n]].sum() / lengths[n] for n in range(N)])
  np.testing.assert_allclose(scores, ref_scores, atol=1e-4, rtol=0)


def test_min_length_blocks_eos(toy):
  ours, _ = _ours(toy, num_beams=2, min_length=8)
  first_eos = np.where((ours == EOS).any(1), (ours == EOS).argmax(1), T)
  assert (first_eos >= 7).all()  # min_length counts the start token: >= 7 generated before EOS
