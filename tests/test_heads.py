"""The tag / region-text cross-attention decoders against a PyTorch reference of the original
(BERT cross-attention layers with self-attention removed, SPEC §7a-b)."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from dynrefer_jax import functional
from dynrefer_jax.models import heads, layers


def _torch_layer(x, mem, p, num_heads):
  def lin(v, d):
    return v @ torch.tensor(np.asarray(d["kernel"])) + torch.tensor(np.asarray(d["bias"]))

  def ln(v, d):
    return torch.nn.functional.layer_norm(v, v.shape[-1:], torch.tensor(np.asarray(d["scale"])),
                                          torch.tensor(np.asarray(d["bias"])), eps=1e-12)
  b, k, dim = x.shape
  hd = dim // num_heads
  q = lin(x, p["query"]).view(b, k, num_heads, hd).transpose(1, 2)
  kk = lin(mem, p["key"]).view(b, -1, num_heads, hd).transpose(1, 2)
  v = lin(mem, p["value"]).view(b, -1, num_heads, hd).transpose(1, 2)
  a = torch.softmax(q @ kk.transpose(-1, -2) / hd ** 0.5, -1) @ v
  a = a.transpose(1, 2).reshape(b, k, dim)
  x = ln(x + lin(a, p["attn_out"]), p["attn_ln"])
  f = lin(torch.nn.functional.gelu(lin(x, p["intermediate"])), p["output"])
  return ln(x + f, p["output_ln"])


def test_pair_scores_match_torch_reference():
  rngs = nnx.Rngs(0)
  dec = heads.CrossAttentionDecoder(hidden=16, num_layers=2, num_heads=4, mlp_dim=32, rngs=rngs)
  fc = layers.Dense(16, 1, rngs=rngs, axes=("embed", None))
  rng = np.random.default_rng(0)
  memory = rng.normal(size=(3, 5, 16)).astype(np.float32)
  text = rng.normal(size=(7, 16)).astype(np.float32)
  got = heads.pair_scores(dec, fc, jnp.asarray(memory), jnp.asarray(text), normalize=True)

  _, p, _ = functional.split(dec)
  _, pf, _ = functional.split(fc)
  x = torch.tensor(text)[None].expand(3, 7, 16)
  mem = torch.tensor(memory)
  for i in range(2):
    x = _torch_layer(x, mem, p["layers"][i], 4)
  x = torch.nn.functional.normalize(x, dim=-1)
  ref = (x @ torch.tensor(np.asarray(pf["kernel"])) + torch.tensor(np.asarray(pf["bias"])))[..., 0]
  assert got.shape == (3, 7)
  np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_init_std_sets_the_kernel_scale():
  # BERT's 0.02 by default (the original); a toy trained from scratch passes width**-0.5.
  from flax import nnx
  from dynrefer_jax.models import heads, qformer
  for std in (0.02, 0.5):
    dec = heads.CrossAttentionDecoder(hidden=64, num_layers=1, num_heads=2, mlp_dim=128,
                                      init_std=std, rngs=nnx.Rngs(0))
    k = np.asarray(dec.layers[0].value.kernel[...])
    assert abs(k.std() - std) < 0.1 * std, (k.std(), std)
    qf = qformer.QFormer(num_layers=1, hidden=64, num_heads=2, mlp_dim=128, encoder_width=16,
                         init_std=std, rngs=nnx.Rngs(0))
    k = np.asarray(qf.layers[0].crossattention.value.kernel[...])
    assert abs(k.std() - std) < 0.1 * std, (k.std(), std)


def test_training_dropout_sits_where_berts_does(monkeypatch):
  """In training, the layer drops attention probabilities (BERT's attention_probs_dropout_prob,
  0.1 in the original's tag_bert_config) and the attention and FFN outputs (hidden dropout):
  with the same masks, the decoder equals the PyTorch BERT layer masked at those three places."""
  b, k, m, dim, nh, rate = 2, 3, 5, 8, 2, 0.25
  rng = np.random.default_rng(1)
  masks = {(b, nh, k, m): [rng.random((b, nh, k, m)) > rate],
           (b, k, dim): [rng.random((b, k, dim)) > rate, rng.random((b, k, dim)) > rate]}
  calls = []

  def fake_dropout(x, r, rngs, deterministic):
    assert r == rate and rngs is not None and not deterministic
    mask = masks[tuple(x.shape)][sum(c == tuple(x.shape) for c in calls)]
    calls.append(tuple(x.shape))
    return jnp.where(mask, x / (1 - r), 0).astype(x.dtype)

  monkeypatch.setattr(heads.layers, "dropout", fake_dropout)
  layer = heads.CrossAttentionLayer(dim, nh, 16, dropout=rate, rngs=nnx.Rngs(0), init_std=0.3)
  x = rng.normal(size=(b, k, dim)).astype(np.float32)
  mem = rng.normal(size=(b, m, dim)).astype(np.float32)
  got = layer(jnp.asarray(x), jnp.asarray(mem), train=True, rngs=nnx.Rngs(dropout=0))
  assert calls == [(b, nh, k, m), (b, k, dim), (b, k, dim)]

  _, p, _ = functional.split(layer)
  t = lambda a: torch.tensor(np.asarray(a))
  lin = lambda v, d: v @ t(d["kernel"]) + t(d["bias"])
  ln = lambda v, d: torch.nn.functional.layer_norm(v, (dim,), t(d["scale"]), t(d["bias"]),
                                                   eps=1e-12)
  drop = lambda v, mask: v * torch.tensor(mask) / (1 - rate)
  hd = dim // nh
  xt, mt = torch.tensor(x), torch.tensor(mem)
  q = lin(xt, p["query"]).view(b, k, nh, hd).transpose(1, 2)
  kk = lin(mt, p["key"]).view(b, m, nh, hd).transpose(1, 2)
  v = lin(mt, p["value"]).view(b, m, nh, hd).transpose(1, 2)
  probs = drop(torch.softmax(q @ kk.transpose(-1, -2) / hd ** 0.5, -1), masks[(b, nh, k, m)][0])
  a = (probs @ v).transpose(1, 2).reshape(b, k, dim)
  h = ln(xt + drop(lin(a, p["attn_out"]), masks[(b, k, dim)][0]), p["attn_ln"])
  f = drop(lin(torch.nn.functional.gelu(lin(h, p["intermediate"])), p["output"]),
           masks[(b, k, dim)][1])
  ref = ln(h + f, p["output_ln"])
  np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-5, atol=1e-5)
