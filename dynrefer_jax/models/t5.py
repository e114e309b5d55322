"""T5 v1.1 / FlanT5 encoder-decoder (SPEC §7c), with a KV-cached single-step decoder.

What makes it T5 and not a generic transformer:
- attention logits are NOT scaled by 1/sqrt(d_kv) (the scale is folded into the init);
- a learned relative-position bias (bucketed, bidirectional in the encoder, causal in the
  decoder) is computed by the first layer of each stack and added in every layer;
- RMS norm without mean subtraction and without bias, variance in float32;
- gated FFN act(x W0) * (x W1) W_o; LAVIS overrides FlanT5's "gelu_new" with EXACT gelu;
- an untied lm_head; the d_model**-0.5 output rescale applies only when embeddings are tied.

Parameter layout: Linear kernels [in, out]; q/k/v kernels `float[d, H * d_kv]`, o kernel
`float[H * d_kv, d]`; `shared` is the token embedding `float[V, d]`.

Decoding protocol used by `dynrefer_jax.decode.beam_search.generate`:
    logits, cache = t5.decode_start(encoder_states, encoder_mask, max_new_tokens)
    logits, cache = t5.decode_step(token, cache, index)   # index = 0-based generated position
`decode_start` feeds `decoder_start_token_id` at decoder position 0; `decode_step` feeds the
index-th generated token at decoder position index + 1. The cache is
`{"state": {...self-attention K/V...}, "static": {...cross-attention K/V, mask...}}`; only
"state" is reordered when beams are reshuffled. Every cache leaf has the batch (rows) on axis 0:
self K/V `float[N, layers, max_new_tokens, H, D]`, cross K/V `float[N, layers, S, H, D]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax import losses
from dynrefer_jax.models import layers


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's log-spaced buckets. relative_position = key_pos - query_pos, int[...] -> int[...]."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  # Float32 log then truncation toward zero, as torch's `.to(torch.long)`; the max(.,1) only
  # keeps log finite on the (discarded) small branch.
  rel = jnp.maximum(relative_position, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(rel / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


class RMSNorm(nnx.Module):
  """T5LayerNorm: y = scale * x / sqrt(mean(x^2) + eps); float32 statistics, no mean, no bias."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.scale = layers.param(rngs, layers.ones, (dim,), ("embed",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
    y = x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
    return (self.scale[...].astype(jnp.float32) * y).astype(x.dtype)


def _attend(q, k, v, *, bias, mask, dropout_rate, train, rngs):
  """q: float[B, Lq, H, D]; k, v: float[B, Lk, H, D]; bias: float[1|B, H, Lq, Lk] or None;
  mask: bool broadcastable to [B, H, Lq, Lk]. No logit scaling (T5). Returns float[B, Lq, H, D]."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = layers.dropout(probs, dropout_rate, rngs, not train).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
  """T5Attention: q, k, v, o without bias."""

  def __init__(self, d_model: int, num_heads: int, d_kv: int, *, rngs: nnx.Rngs, dtype,
               param_dtype):
    inner = num_heads * d_kv
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype,
              kernel_init=layers.normal(d_model ** -0.5))
    self.q = layers.Dense(d_model, inner, axes=("embed", "heads"), **kw)
    self.k = layers.Dense(d_model, inner, axes=("embed", "heads"), **kw)
    self.v = layers.Dense(d_model, inner, axes=("embed", "heads"), **kw)
    self.o = layers.Dense(inner, d_model, axes=("heads", "embed"), **kw)
    self.num_heads, self.d_kv = num_heads, d_kv

  def heads(self, dense: layers.Dense, x: jax.Array) -> jax.Array:
    """float[B, L, d] -> float[B, L, H, D]."""
    return dense(x).reshape(*x.shape[:-1], self.num_heads, self.d_kv)

  def out(self, x: jax.Array) -> jax.Array:
    """float[B, L, H, D] -> float[B, L, d]."""
    return self.o(x.reshape(*x.shape[:-2], self.num_heads * self.d_kv))


class FeedForward(nnx.Module):
  """T5DenseGatedActDense: wo(dropout(act(wi_0 x) * wi_1 x))."""

  def __init__(self, d_model: int, d_ff: int, act: str, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.wi_0 = layers.Dense(d_model, d_ff, axes=("embed", "mlp"),
                             kernel_init=layers.normal(d_model ** -0.5), **kw)
    self.wi_1 = layers.Dense(d_model, d_ff, axes=("embed", "mlp"),
                             kernel_init=layers.normal(d_model ** -0.5), **kw)
    self.wo = layers.Dense(d_ff, d_model, axes=("mlp", "embed"),
                           kernel_init=layers.normal(d_ff ** -0.5), **kw)
    self.act = layers.ACTIVATIONS[act]

  def __call__(self, x, *, dropout_rate, train, rngs):
    h = self.act(self.wi_0(x)) * self.wi_1(x)
    return self.wo(layers.dropout(h, dropout_rate, rngs, not train))


class Block(nnx.Module):
  """Pre-norm residual block: self-attention [, cross-attention], FFN."""

  def __init__(self, cfg: dict, *, cross: bool, rngs: nnx.Rngs):
    d, eps = cfg["d_model"], cfg["layer_norm_eps"]
    pd, dt = cfg["param_dtype"], cfg["dtype"]
    self.self_norm = RMSNorm(d, eps=eps, rngs=rngs, param_dtype=pd)
    self.self_attn = Attention(d, cfg["num_heads"], cfg["d_kv"], rngs=rngs, dtype=dt,
                               param_dtype=pd)
    if cross:
      self.cross_norm = RMSNorm(d, eps=eps, rngs=rngs, param_dtype=pd)
      self.cross_attn = Attention(d, cfg["num_heads"], cfg["d_kv"], rngs=rngs, dtype=dt,
                                  param_dtype=pd)
    else:
      self.cross_norm = self.cross_attn = None
    self.ffn_norm = RMSNorm(d, eps=eps, rngs=rngs, param_dtype=pd)
    self.ffn = FeedForward(d, cfg["d_ff"], cfg["dense_act"], rngs=rngs, dtype=dt, param_dtype=pd)
    self.rate = cfg["dropout_rate"]

  def __call__(self, x, *, self_bias, self_mask, enc=None, enc_mask=None, train=False,
               rngs=None):
    """x: float[B, L, d]; self_bias: float[1, H, L, L]; self_mask: bool[B|1, 1, L, L];
    enc: float[B, S, d]; enc_mask: bool[B, S]."""
    drop = lambda y: layers.dropout(y, self.rate, rngs, not train)
    a = self.self_attn
    h = self.self_norm(x)
    o = _attend(a.heads(a.q, h), a.heads(a.k, h), a.heads(a.v, h), bias=self_bias,
                mask=self_mask, dropout_rate=self.rate, train=train, rngs=rngs)
    x = x + drop(a.out(o))
    if self.cross_attn is not None:
      c = self.cross_attn
      h = self.cross_norm(x)
      o = _attend(c.heads(c.q, h), c.heads(c.k, enc), c.heads(c.v, enc), bias=None,
                  mask=enc_mask[:, None, None, :], dropout_rate=self.rate, train=train,
                  rngs=rngs)
      x = x + drop(c.out(o))
    return x + drop(self.ffn(self.ffn_norm(x), dropout_rate=self.rate, train=train, rngs=rngs))


class Stack(nnx.Module):
  """T5Stack: blocks + final RMS norm; the relative bias table lives on the stack."""

  def __init__(self, cfg: dict, num_layers: int, *, decoder: bool, rngs: nnx.Rngs):
    self.relative_attention_bias = layers.param(
        rngs, layers.normal(1.0), (cfg["relative_attention_num_buckets"], cfg["num_heads"]),
        (None, "heads"), cfg["param_dtype"])
    self.layers = nnx.List([Block(cfg, cross=decoder, rngs=rngs) for _ in range(num_layers)])
    self.final_norm = RMSNorm(cfg["d_model"], eps=cfg["layer_norm_eps"], rngs=rngs,
                              param_dtype=cfg["param_dtype"])
    self.decoder = decoder
    self.num_buckets = cfg["relative_attention_num_buckets"]
    self.max_distance = cfg["relative_attention_max_distance"]

  def position_bias(self, query_pos: jax.Array, key_pos: jax.Array) -> jax.Array:
    """int[Lq], int[Lk] -> float[1, H, Lq, Lk]."""
    bucket = relative_position_bucket(key_pos[None, :] - query_pos[:, None],
                                      bidirectional=not self.decoder,
                                      num_buckets=self.num_buckets, max_distance=self.max_distance)
    values = self.relative_attention_bias[...][bucket]  # [Lq, Lk, H]
    return jnp.transpose(values, (2, 0, 1))[None]


class T5(nnx.Module):
  """T5 v1.1 / FlanT5 (defaults: flan-t5-xl with the LAVIS exact-gelu override).

  tie_word_embeddings=False is FlanT5 as the original loads it (transformers 4.x: separate
  lm_head, no output rescale). transformers v5 always ties lm_head to `shared` and keeps the
  rescale flag as `config.scale_decoder_outputs`; `tie_word_embeddings=True` reproduces that
  (original T5) variant. Dropout (`dropout_rate`) sits where HF's does: on the encoder input,
  attention probabilities, each sub-layer output, inside the FFN and after each final norm;
  it is active only with train=True and rngs given (DynRefer keeps frozen T5 in train mode).
  """

  def __init__(self, *, vocab_size: int = 32128, d_model: int = 2048, d_kv: int = 64,
               d_ff: int = 5120, num_heads: int = 32, num_encoder_layers: int = 24,
               num_decoder_layers: int = 24, relative_attention_num_buckets: int = 32,
               relative_attention_max_distance: int = 128, dropout_rate: float = 0.1,
               dense_act: str = "gelu", layer_norm_eps: float = 1e-6,
               tie_word_embeddings: bool = False, decoder_start_token_id: int = 0,
               scan_layers: bool = False, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    cfg = dict(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=num_heads,
               relative_attention_num_buckets=relative_attention_num_buckets,
               relative_attention_max_distance=relative_attention_max_distance,
               dropout_rate=dropout_rate, dense_act=dense_act, layer_norm_eps=layer_norm_eps,
               dtype=dtype, param_dtype=param_dtype)
    self.shared = layers.param(rngs, layers.normal(1.0), (vocab_size, d_model),
                               ("vocab", "embed"), param_dtype)
    self.encoder = Stack(cfg, num_encoder_layers, decoder=False, rngs=rngs)
    self.decoder = Stack(cfg, num_decoder_layers, decoder=True, rngs=rngs)
    self.lm_head = None if tie_word_embeddings else layers.Dense(
        d_model, vocab_size, rngs=rngs, axes=("embed", "vocab"), use_bias=False,
        kernel_init=layers.normal(d_model ** -0.5), dtype=dtype, param_dtype=param_dtype)
    self.d_model, self.num_heads, self.d_kv = d_model, num_heads, d_kv
    self.vocab_size = vocab_size
    self.dropout_rate = dropout_rate
    self.tie_word_embeddings = tie_word_embeddings
    self.decoder_start_token_id = decoder_start_token_id
    self.dtype = dtype
    # encode/decode run each stack under lax.scan (layers.call_blocks): every block of a stack
    # has the same structure, as the relative bias table sits on the Stack, not on layer 0.
    # The KV-cached decoder (_step) stays unrolled: its cache is indexed per layer in place.
    self.scan_layers = scan_layers

  # ----------------------------------------------------------------------------- pieces
  def embed(self, ids: jax.Array) -> jax.Array:
    """int[B, L] -> float[B, L, d] (the shared input embedding; `embed_tokens` in HF)."""
    table = self.shared[...]
    return table[ids].astype(self.dtype or table.dtype)

  def logits(self, h: jax.Array) -> jax.Array:
    """Decoder output float[..., d] -> float32 logits [..., V]."""
    if self.tie_word_embeddings:
      h = h * self.d_model ** -0.5
      return jnp.einsum("...d,vd->...v", h, self.shared[...].astype(h.dtype)).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def encode(self, inputs_embeds: jax.Array, mask: jax.Array, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """inputs_embeds: float[B, L, d]; mask: bool[B, L] -> float[B, L, d] (after final norm)."""
    drop = lambda y: layers.dropout(y, self.dropout_rate, rngs, not train)
    x = drop(inputs_embeds.astype(self.dtype or inputs_embeds.dtype))
    pos = jnp.arange(x.shape[1])
    bias = self.encoder.position_bias(pos, pos)
    attn_mask = mask.astype(bool)[:, None, None, :]
    x = layers.call_blocks(self.encoder.layers, x, self_bias=bias, self_mask=attn_mask,
                           train=train, rngs=rngs, scan=self.scan_layers)
    return drop(self.encoder.final_norm(x))

  def decode(self, decoder_input_ids: jax.Array, encoder_states: jax.Array,
             encoder_mask: jax.Array, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """Teacher forcing. int[B, T], float[B, S, d], bool[B, S] -> float32 logits [B, T, V]."""
    drop = lambda y: layers.dropout(y, self.dropout_rate, rngs, not train)
    x = drop(self.embed(decoder_input_ids))
    pos = jnp.arange(x.shape[1])
    bias = self.decoder.position_bias(pos, pos)
    causal = (pos[None, :] <= pos[:, None])[None, None]
    x = layers.call_blocks(self.decoder.layers, x, self_bias=bias, self_mask=causal,
                           enc=encoder_states, enc_mask=encoder_mask.astype(bool), train=train,
                           rngs=rngs, scan=self.scan_layers)
    return self.logits(drop(self.decoder.final_norm(x)))

  def __call__(self, inputs_embeds: jax.Array, mask: jax.Array, labels: jax.Array,
               label_mask: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced LM loss.

    inputs_embeds: float[B, L, d]; mask: bool[B, L]; labels: int[B, T]; label_mask: bool[B, T].
    Decoder inputs = labels shifted right behind decoder_start_token_id, masked label positions
    replaced by pad 0 (HF turns pad into -100, then `_shift_right` turns -100 back into pad).
    Returns (loss: token-mean cross-entropy over label_mask, logits float32[B, T, V]).
    """
    label_mask = label_mask.astype(bool)
    labels = jnp.where(label_mask, labels, 0)
    start = jnp.full_like(labels[:, :1], self.decoder_start_token_id)
    decoder_input_ids = jnp.concatenate([start, labels[:, :-1]], axis=1)
    enc = self.encode(inputs_embeds, mask, train=train, rngs=rngs)
    logits = self.decode(decoder_input_ids, enc, mask, train=train, rngs=rngs)
    return losses.token_cross_entropy(logits, labels, label_mask), logits

  # ----------------------------------------------------------------------------- decoding
  def decode_start(self, encoder_states: jax.Array, encoder_mask: jax.Array,
                   max_new_tokens: int) -> tuple[jax.Array, dict]:
    """Builds the cache and feeds decoder_start_token_id at position 0.

    encoder_states: float[N, S, d]; encoder_mask: bool[N, S].
    Returns (logits float32[N, V] for generated token 0, cache). The self-attention cache has
    room for max_new_tokens positions (the start token plus max_new_tokens - 1 generated ones).
    """
    n = encoder_states.shape[0]
    dt = self.dtype or encoder_states.dtype
    shape = (n, len(self.decoder.layers), max_new_tokens, self.num_heads, self.d_kv)
    cross_k = jnp.stack([b.cross_attn.heads(b.cross_attn.k, encoder_states)
                         for b in self.decoder.layers], axis=1)
    cross_v = jnp.stack([b.cross_attn.heads(b.cross_attn.v, encoder_states)
                         for b in self.decoder.layers], axis=1)
    cache = {"state": {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)},
             "static": {"k": cross_k, "v": cross_v, "mask": encoder_mask.astype(bool)}}
    start = jnp.full((n,), self.decoder_start_token_id, jnp.int32)
    return self._step(start, cache, jnp.int32(0))

  def decode_step(self, token: jax.Array, cache: dict, index: jax.Array
                  ) -> tuple[jax.Array, dict]:
    """token: int[N], the index-th generated token (placed at decoder position index + 1).
    Returns (logits float32[N, V] for generated token index + 1, updated cache)."""
    return self._step(token, cache, index + 1)

  def _step(self, token, cache, pos):
    """One decoder position `pos` (traced int) for int[N] tokens, with KV cache."""
    x = self.embed(token[:, None])  # [N, 1, d]
    length = cache["state"]["k"].shape[2]  # [N, layers, Lmax, H, D]
    keys = jnp.arange(length)
    bias = self.decoder.position_bias(pos[None], keys)  # [1, H, 1, Lmax]
    self_mask = (keys <= pos)[None, None, None, :]
    enc_mask = cache["static"]["mask"][:, None, None, :]
    k_all, v_all = cache["state"]["k"], cache["state"]["v"]
    for i, b in enumerate(self.decoder.layers):
      a = b.self_attn
      h = b.self_norm(x)
      # Write this position's K/V into the preallocated cache in place (no per-step restack).
      k_all = jax.lax.dynamic_update_slice(
          k_all, a.heads(a.k, h)[:, None].astype(k_all.dtype), (0, i, pos, 0, 0))
      v_all = jax.lax.dynamic_update_slice(
          v_all, a.heads(a.v, h)[:, None].astype(v_all.dtype), (0, i, pos, 0, 0))
      o = _attend(a.heads(a.q, h), k_all[:, i], v_all[:, i], bias=bias, mask=self_mask,
                  dropout_rate=0.0, train=False, rngs=None)
      x = x + a.out(o)
      c = b.cross_attn
      h = b.cross_norm(x)
      o = _attend(c.heads(c.q, h), cache["static"]["k"][:, i], cache["static"]["v"][:, i],
                  bias=None, mask=enc_mask, dropout_rate=0.0, train=False, rngs=None)
      x = x + c.out(o)
      x = x + b.ffn(b.ffn_norm(x), dropout_rate=0.0, train=False, rngs=None)
    logits = self.logits(self.decoder.final_norm(x))[:, 0]
    cache = {"state": {"k": k_all, "v": v_all}, "static": cache["static"]}
    return logits, cache
