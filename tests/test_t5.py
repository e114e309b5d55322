"""T5 v1.1 / FlanT5 vs transformers' T5ForConditionalGeneration (PyTorch), toy size, float32.

Weights go HF state dict -> convert/t5.py -> our module, so the converter is checked too.
Tolerances: encoder states and logits 1e-5 relative to the reference's max magnitude; loss and
its gradient w.r.t. inputs_embeds 1e-4.
"""

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax import functional
from dynrefer_jax.convert.common import ConversionError, expected_shapes
from dynrefer_jax.convert.t5 import convert_t5
from dynrefer_jax.models.t5 import T5, relative_position_bucket

TOY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
           num_decoder_layers=3, relative_attention_num_buckets=8,
           relative_attention_max_distance=16)


def hf_t5(tie: bool = False, seed: int = 0) -> transformers.T5ForConditionalGeneration:
  """Toy HF T5 with LAVIS's exact-gelu override and non-degenerate random weights."""
  cfg = transformers.T5Config(**TOY, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                              tie_word_embeddings=tie, decoder_start_token_id=0,
                              pad_token_id=0, eos_token_id=1)
  cfg.dense_act_fn = "gelu"  # what LAVIS does to FlanT5
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  assert model.config.scale_decoder_outputs == tie
  if not tie:
    # transformers v5 always ties lm_head to shared; FlanT5 (and the original's transformers
    # 4.x) has a separate lm_head, which is what we reproduce.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 2 and "relative_attention_bias" not in name and "shared" not in name:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
  assert model.config.dense_act_fn == "gelu"
  return model


def ours_from(hf: transformers.T5ForConditionalGeneration, **kw):
  c = hf.config
  model = T5(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
             num_heads=c.num_heads, num_encoder_layers=c.num_layers,
             num_decoder_layers=c.num_decoder_layers,
             relative_attention_num_buckets=c.relative_attention_num_buckets,
             relative_attention_max_distance=c.relative_attention_max_distance,
             tie_word_embeddings=c.scale_decoder_outputs, rngs=nnx.Rngs(0), **kw)
  graphdef, params, _ = functional.split(model)
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  flat = convert_t5(state, expected_shapes(params))
  params = functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  return graphdef, params


def _inputs(seed=0, b=3, l=7, t=6):
  rs = np.random.RandomState(seed)
  x = rs.randn(b, l, TOY["d_model"]).astype(np.float32)
  mask = np.ones((b, l), bool)
  mask[1, 4:] = False
  mask[2, 6:] = False
  labels = rs.randint(2, TOY["vocab_size"], (b, t))
  label_mask = np.ones((b, t), bool)
  label_mask[0, 4:] = False
  return x, mask, labels, label_mask


def _jit(graphdef, fn):
  """fn(model, *args) compiled once (eager JAX would compile every op separately)."""
  return jax.jit(lambda params, *args: fn(functional.merge(graphdef, params), *args))


def _close(ours, ref, rel):
  ours, ref = np.asarray(ours), np.asarray(ref)
  np.testing.assert_allclose(ours, ref, rtol=rel, atol=rel * np.abs(ref).max())


@pytest.mark.parametrize("tie", [False, True])
def test_encoder_states_and_logits_match_hf(tie):
  hf = hf_t5(tie=tie)
  graphdef, params = ours_from(hf)
  x, mask, labels, label_mask = _inputs()
  enc, (loss, logits) = _jit(graphdef, lambda m, *a: (m.encode(*a[:2]), m(*a)))(
      params, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(labels), jnp.asarray(label_mask))
  t_mask = torch.tensor(mask.astype(np.int64))
  with torch.no_grad():
    ref_enc = hf.encoder(inputs_embeds=torch.tensor(x), attention_mask=t_mask).last_hidden_state
    ref = hf(inputs_embeds=torch.tensor(x), attention_mask=t_mask,
             labels=torch.tensor(np.where(label_mask, labels, -100)))
  # Padded encoder positions are never attended to; compare the valid ones.
  _close(np.asarray(enc)[mask], ref_enc.numpy()[mask], 1e-5)
  _close(logits, ref.logits.numpy(), 1e-5)
  np.testing.assert_allclose(float(loss), ref.loss.item(), rtol=1e-5)


def test_loss_and_grad_wrt_inputs_embeds_match_torch():
  hf = hf_t5()
  graphdef, params = ours_from(hf)
  x, mask, labels, label_mask = _inputs(seed=3)

  @jax.jit
  def loss_fn(p, emb):
    return functional.merge(graphdef, p)(emb, jnp.asarray(mask), jnp.asarray(labels),
                                         jnp.asarray(label_mask))[0]

  loss, grad = jax.value_and_grad(loss_fn, argnums=1)(params, jnp.asarray(x))
  tx = torch.tensor(x, requires_grad=True)
  ref = hf(inputs_embeds=tx, attention_mask=torch.tensor(mask.astype(np.int64)),
           labels=torch.tensor(np.where(label_mask, labels, -100))).loss
  ref.backward()
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-4)
  _close(grad, tx.grad.numpy(), 1e-4)


def test_decode_step_cache_matches_teacher_forcing():
  """The KV-cached single step reproduces HF teacher-forced logits position by position."""
  hf = hf_t5(seed=5)
  graphdef, params = ours_from(hf)
  x, mask, labels, _ = _inputs(seed=4)
  dec_in = np.concatenate([np.zeros((3, 1), np.int64), labels[:, :-1]], 1)
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask.astype(np.int64)),
             decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
  start = _jit(graphdef, lambda m, x, mask: m.decode_start(m.encode(x, mask), mask,
                                                          labels.shape[1]))
  step = _jit(graphdef, lambda m, *a: m.decode_step(*a))
  logits, cache = start(params, jnp.asarray(x), jnp.asarray(mask))
  steps = [logits]
  for i in range(labels.shape[1] - 1):
    logits, cache = step(params, jnp.asarray(labels[:, i], jnp.int32), cache, jnp.int32(i))
    steps.append(logits)
  _close(jnp.stack(steps, 1), ref, 1e-5)


def test_relative_position_bucket_matches_hf():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-300, 300)
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 16)):
      ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                  num_buckets=nb, max_distance=md).numpy()
      ours = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                      num_buckets=nb, max_distance=md)
      np.testing.assert_array_equal(np.asarray(ours), ref)


def test_dropout_only_in_train_mode():
  hf = hf_t5()
  graphdef, params = ours_from(hf, dropout_rate=0.1)
  x, mask, labels, label_mask = [jnp.asarray(a) for a in _inputs()]

  @jax.jit
  def run(params, key):
    m = functional.merge(graphdef, params)
    return (m(x, mask, labels, label_mask, train=False, rngs=nnx.Rngs(dropout=key))[0],
            m(x, mask, labels, label_mask, train=True, rngs=nnx.Rngs(dropout=key))[0])

  eval_loss, a = run(params, jax.random.key(1))
  _, b = run(params, jax.random.key(2))
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.tensor(np.asarray(x)),
             attention_mask=torch.tensor(np.asarray(mask).astype(np.int64)),
             labels=torch.tensor(np.where(label_mask, labels, -100).astype(np.int64))).loss.item()
  np.testing.assert_allclose(float(eval_loss), ref, rtol=1e-5)
  assert float(a) != float(b) and float(a) != float(eval_loss)


def test_bf16_params_run_close_to_float32():
  hf = hf_t5()
  graphdef, params = ours_from(hf)
  x, mask, labels, label_mask = [jnp.asarray(a) for a in _inputs()]
  fwd = _jit(graphdef, lambda m, *a: m(*a))
  loss32, _ = fwd(params, x, mask, labels, label_mask)
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  loss16, logits16 = fwd(params16, x.astype(jnp.bfloat16), mask, labels, label_mask)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=5e-2)  # bf16: ~3 digits


def test_converter_reports_missing_and_unmapped():
  hf = hf_t5()
  graphdef, params = ours_from(hf)
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  del state["lm_head.weight"]
  state["decoder.block.0.layer.9.foo.weight"] = np.zeros(1)
  with pytest.raises(ConversionError, match="lm_head/kernel") as err:
    convert_t5(state, expected_shapes(params))
  assert "decoder.block.0.layer.9.foo.weight" in str(err.value)


def test_every_parameter_has_logical_axes():
  model = T5(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=1,
             num_decoder_layers=1, rngs=nnx.Rngs(0))
  _, params, axes = functional.split(model)
  flat_p, flat_a = functional.flatten(params), functional.flatten(axes)
  assert set(flat_p) == set(flat_a)
  for path, value in flat_p.items():
    assert len(flat_a[path]) == value.ndim and any(flat_a[path]), path
  assert flat_a["shared"] == ("vocab", "embed")
  assert flat_a["lm_head/kernel"] == ("embed", "vocab")
