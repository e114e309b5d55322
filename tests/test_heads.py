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
