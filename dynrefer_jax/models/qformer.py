"""BLIP-2 Q-Former, query-only path (SPEC §6; weights CHECKPOINTS.md §1.3).

DynRefer deletes the Q-Former's text side, so with queries only the model is

    h = dropout(LayerNorm(queries))
    for layer i:  h = SelfAttn(h);  if i % cross_attention_freq == 0: h = CrossAttn(h, encoder)
                  h = LN(h + dropout(output_query(gelu(intermediate_query(h)))))

with post-LN BERT blocks (each attention: LN(h + dropout(dense(attn(h))))) and attention-prob
dropout. The 32 learned query tokens are not part of this module (the composition owns
`query_tokens`, frozen in the original).

Parameter tree (LAVIS name → ours, relative to the module):
  bert.embeddings.LayerNorm                 → layernorm
  bert.encoder.layer.{i}.attention.self.{query,key,value}
                                            → layers/{i}/attention/{query,key,value}
  ....attention.output.dense / .LayerNorm   → layers/{i}/attention/{dense,layernorm}
  ....crossattention.*  (even layers)       → layers/{i}/crossattention/...
  ....intermediate_query.dense              → layers/{i}/intermediate_query
  ....output_query.dense / .LayerNorm       → layers/{i}/output_query / output_query_layernorm
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax.models import layers


class BertAttention(nnx.Module):
  """Post-LN BERT attention block: LN(h + dropout(dense(MHA(h, kv)))).

  query: Dense(hidden → hidden); key/value: Dense(kv_width → hidden); dense: Dense(hidden →
  hidden); layernorm over hidden. Scores scaled by head_dim^-0.5, softmax in float32.
  """

  def __init__(self, hidden: int, kv_width: int, num_heads: int, *, dropout: float,
               ln_eps: float, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
               init_std: float = 0.02):
    if hidden % num_heads:
      raise ValueError(f"hidden {hidden} not divisible by {num_heads} heads")
    init = dict(kernel_init=layers.normal(init_std), bias_init=layers.zeros, rngs=rngs,
                dtype=dtype, param_dtype=param_dtype)
    self.query = layers.Dense(hidden, hidden, axes=("embed", "heads"), **init)
    self.key = layers.Dense(kv_width, hidden, axes=("embed", "heads"), **init)
    self.value = layers.Dense(kv_width, hidden, axes=("embed", "heads"), **init)
    self.dense = layers.Dense(hidden, hidden, axes=("heads", "embed"), **init)
    self.layernorm = layers.LayerNorm(hidden, eps=ln_eps, rngs=rngs, param_dtype=param_dtype)
    self.num_heads = num_heads
    self.dropout = dropout

  def __call__(self, h: jax.Array, kv: jax.Array, mask: jax.Array | None, *, train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    """h: float[B, Q, D]; kv: float[B, L, kv_width]; mask: bool[B, 1, 1, L] or None."""
    b, q_len, d = h.shape
    heads, head_dim = self.num_heads, d // self.num_heads
    q = self.query(h).reshape(b, q_len, heads, head_dim)
    k = self.key(kv).reshape(b, kv.shape[1], heads, head_dim)
    v = self.value(kv).reshape(b, kv.shape[1], heads, head_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # BERT drops attention probabilities (attention_probs_dropout_prob), not only outputs.
    probs = layers.dropout(probs, self.dropout, rngs, not train).astype(v.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, q_len, d)
    out = layers.dropout(self.dense(ctx), self.dropout, rngs, not train)
    return self.layernorm(out + h)


class QFormerLayer(nnx.Module):
  """Self-attention, optional cross-attention to the encoder, query FFN (exact GELU)."""

  def __init__(self, *, hidden: int, num_heads: int, mlp_dim: int, encoder_width: int,
               has_cross_attention: bool, dropout: float, ln_eps: float, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32, init_std: float = 0.02):
    kw = dict(dropout=dropout, ln_eps=ln_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
              init_std=init_std)
    self.attention = BertAttention(hidden, hidden, num_heads, **kw)
    self.crossattention = (BertAttention(hidden, encoder_width, num_heads, **kw)
                           if has_cross_attention else None)
    init = dict(kernel_init=layers.normal(init_std), bias_init=layers.zeros, rngs=rngs,
                dtype=dtype, param_dtype=param_dtype)
    self.intermediate_query = layers.Dense(hidden, mlp_dim, axes=("embed", "mlp"), **init)
    self.output_query = layers.Dense(mlp_dim, hidden, axes=("mlp", "embed"), **init)
    self.output_query_layernorm = layers.LayerNorm(hidden, eps=ln_eps, rngs=rngs,
                                                   param_dtype=param_dtype)
    self.dropout = dropout

  def __call__(self, h: jax.Array, encoder: jax.Array, encoder_mask: jax.Array | None, *,
               train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    h = self.attention(h, h, None, train=train, rngs=rngs)
    if self.crossattention is not None:
      h = self.crossattention(h, encoder, encoder_mask, train=train, rngs=rngs)
    y = self.output_query(layers.gelu_exact(self.intermediate_query(h)))
    y = layers.dropout(y, self.dropout, rngs, not train)
    return self.output_query_layernorm(y + h)


class QFormer(nnx.Module):
  """The BLIP-2 Q-Former on learned queries only (no text input, no pooler).

  Init: BERT normal(init_std = 0.02) kernels, zero biases, LayerNorms ones/zeros (in DynRefer
  everything is then overwritten from the BLIP-2 stage-2 checkpoint; a toy model trained from
  scratch wants init_std ≈ hidden**-0.5, or its residual branches start ~100× too small).
  """

  def __init__(self, *, num_layers: int = 12, hidden: int = 768, num_heads: int = 12,
               mlp_dim: int = 3072, encoder_width: int = 1408, cross_attention_freq: int = 2,
               dropout: float = 0.1, ln_eps: float = 1e-12, dtype=None,
               param_dtype=jnp.float32, init_std: float = 0.02, scan_layers: bool = False,
               rngs: nnx.Rngs):
    self.layernorm = layers.LayerNorm(hidden, eps=ln_eps, rngs=rngs, param_dtype=param_dtype)
    self.layers = nnx.List([
        QFormerLayer(hidden=hidden, num_heads=num_heads, mlp_dim=mlp_dim,
                     encoder_width=encoder_width,
                     has_cross_attention=i % cross_attention_freq == 0, dropout=dropout,
                     ln_eps=ln_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                     init_std=init_std)
        for i in range(num_layers)])
    self.dropout = dropout
    # Under lax.scan the layers go cross_attention_freq at a time (the structure's period).
    self.scan_layers = scan_layers

  def __call__(self, queries: jax.Array, encoder: jax.Array,
               encoder_mask: jax.Array | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """queries: float[B, Q, D]; encoder: float[B, L, C] (fused view tokens);
    encoder_mask: bool[B, L] (True = attend) or None for all-ones (DynRefer's case). Masked keys
    get the float32 minimum (HF); LAVIS adds −10000, which differs only for a fully masked row.
    Returns float[B, Q, D] (the last hidden state)."""
    mask = None if encoder_mask is None else encoder_mask[:, None, None, :]
    h = layers.dropout(self.layernorm(queries), self.dropout, rngs, not train)
    return layers.call_blocks(self.layers, h, encoder, mask, train=train, rngs=rngs,
                              scan=self.scan_layers)
