"""Decoder-only LM in the Llama family (HF LlamaForCausalLM / Qwen2ForCausalLM semantics):
RMSNorm, RoPE (optionally Llama-3 scaled), SwiGLU, grouped-query attention, optional attention
biases (Qwen2: q, k, v; Llama's `attention_bias`: q, k, v and o), untied or tied lm_head.
Vicuna-v1.5 (the original's DynRefer-Vicuna, SPEC §7c) is one.

DynRefer use (`models/dynrefer.py`, lm.kind "llama"): the prefix is [llm_proj(Z) ; control-word
embeddings] (`inputs_embeds`, with a mask whose padding may sit anywhere), the caption follows,
the loss counts caption tokens only. Position ids are `cumsum(mask) - 1`: with rotary (relative)
positions and padded keys masked out this equals the original's packing of the valid tokens
(InstructBLIP's `concat_text_input_output`: valid prefix, caption, then the padding) without
moving data, so static shapes stay static; at generation it equals HF's positions for a
left-padded prompt.

Parameter layout: q kernel `float[d, H * D]`, k/v kernels `float[d, Hkv * D]`, o `float[H * D, d]`,
MLP gate/up `float[d, F]`, down `float[F, d]`, `embed_tokens` `float[V, d]`, lm_head `float[d, V]`.

Decoding protocol (see decode/beam_search.py; decoder-only: pass decoder_start_token_id=None):
    logits, cache = llama.decode_start(prefix_embeds, prefix_mask, max_new_tokens)
    logits, cache = llama.decode_step(token, cache, index)
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrefer_jax import losses, sharding
from dynrefer_jax.models import layers


class RMSNorm(nnx.Module):
  """LlamaRMSNorm: weight * (x / sqrt(mean(x^2) + eps)) with float32 statistics, the normalised
  value cast back to the input dtype before the weight (as HF)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.scale = layers.param(rngs, layers.ones, (dim,), ("embed",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: Mapping | None = None) -> np.ndarray:
  """float32[D/2] rotary inverse frequencies, HF's default rope or its "llama3" scaling
  (`_compute_llama3_parameters`: long wavelengths divided by `factor`, a smooth ramp between
  `low_freq_factor` and `high_freq_factor`). Static: computed once at trace time."""
  inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                      / np.float32(head_dim)))).astype(np.float32)
  kind = (dict(scaling or {}).get("rope_type") or dict(scaling or {}).get("type") or "default")
  if kind == "default":
    return inv
  if kind != "llama3":
    raise ValueError(f"rope scaling {kind!r} is not supported (default or llama3)")
  s = dict(scaling)
  factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
  old = float(s["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout. x: float[B, L, H, D]; positions: int[B, L];
  inv_freq: float[D/2] (`inverse_frequencies`)."""
  inv_freq = jnp.asarray(np.asarray(inv_freq, np.float32))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rotated * sin


def _gqa(q, k, v, mask):
  """q: float[B, Lq, H, D]; k, v: float[B, Lk, Hkv, D]; mask: bool[B, Lq, Lk].
  Scaled softmax attention (float32 softmax), each kv head shared by H / Hkv query heads.
  -> float[B, Lq, H, D]."""
  b, lq, h, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, lq, hkv, h // hkv, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k).astype(jnp.float32) * d ** -0.5
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, -1).astype(v.dtype)
  return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, lq, h, d)


def _positions_and_mask(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bool[B, L] -> (positions int[B, L] = cumsum(mask) - 1, causal key mask bool[B, L, L])."""
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  idx = jnp.arange(mask.shape[1])
  return positions, (idx[None, :] <= idx[:, None])[None] & mask[:, None, :]


class Block(nnx.Module):
  """Pre-norm decoder layer: GQA self-attention + SwiGLU MLP."""

  def __init__(self, cfg: dict, *, rngs: nnx.Rngs):
    d, h, hkv, hd, f = (cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"],
                        cfg["head_dim"], cfg["intermediate_size"])
    kw = dict(rngs=rngs, dtype=cfg["dtype"], param_dtype=cfg["param_dtype"],
              kernel_init=layers.normal(cfg["init_std"]), bias_init=layers.zeros)
    # The projections that write into the residual stream (o, down) may start smaller.
    out_kw = dict(kw, kernel_init=layers.normal(cfg["init_std"] * cfg["residual_init_scale"]))
    qkv_bias = bool(cfg["attention_bias"])
    self.input_norm = RMSNorm(d, eps=cfg["eps"], rngs=rngs, param_dtype=cfg["param_dtype"])
    self.q = layers.Dense(d, h * hd, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.k = layers.Dense(d, hkv * hd, axes=("embed", "kv"), use_bias=qkv_bias, **kw)
    self.v = layers.Dense(d, hkv * hd, axes=("embed", "kv"), use_bias=qkv_bias, **kw)
    self.o = layers.Dense(h * hd, d, axes=("heads", "embed"), use_bias=bool(cfg["o_bias"]),
                          **out_kw)
    self.post_norm = RMSNorm(d, eps=cfg["eps"], rngs=rngs, param_dtype=cfg["param_dtype"])
    self.gate = layers.Dense(d, f, axes=("embed", "mlp"), use_bias=False, **kw)
    self.up = layers.Dense(d, f, axes=("embed", "mlp"), use_bias=False, **kw)
    self.down = layers.Dense(f, d, axes=("mlp", "embed"), use_bias=False, **out_kw)
    self.h, self.hkv, self.hd = h, hkv, hd
    self.inv_freq = cfg["inv_freq"]  # tuple of floats: static, and equal across blocks

  def qkv(self, x, positions):
    """x: float[B, L, d] (normed) -> rotated q [B, L, H, D], k [B, L, Hkv, D], v."""
    b, l, _ = x.shape
    q = rope(self.q(x).reshape(b, l, self.h, self.hd), positions, self.inv_freq)
    k = rope(self.k(x).reshape(b, l, self.hkv, self.hd), positions, self.inv_freq)
    return q, k, self.v(x).reshape(b, l, self.hkv, self.hd)

  def finish(self, x, attn):
    """Residual adds around attention output attn float[B, L, H, D] and the MLP."""
    x = x + self.o(attn.reshape(*attn.shape[:2], self.h * self.hd))
    h = self.post_norm(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))

  def __call__(self, x: jax.Array, positions: jax.Array, attn_mask: jax.Array) -> jax.Array:
    """x: float[B, L, d]; positions: int[B, L]; attn_mask: bool[B, L, L] -> float[B, L, d]."""
    q, k, v = self.qkv(self.input_norm(x), positions)
    return self.finish(x, _gqa(q, k, v, attn_mask))


class Llama(nnx.Module):
  """Defaults: Vicuna-7B v1.5 (LLaMA-2 7B). `init_std` is HF's initializer_range (0.02), used
  only when training from scratch (the synthetic world sets width**-0.5);
  `residual_init_scale` multiplies it for the o and down projections (GPT-2's 1/sqrt(2 layers)
  keeps the residual stream's scale with depth)."""

  def __init__(self, *, vocab_size: int = 32000, hidden_size: int = 4096,
               intermediate_size: int = 11008, num_layers: int = 32, num_heads: int = 32,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0,
               rope_scaling: Mapping | None = None, attention_bias: bool = False,
               o_bias: bool = False, tie_word_embeddings: bool = False, init_std: float = 0.02,
               residual_init_scale: float = 1.0,
               scan_layers: bool = False, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    head_dim = head_dim or hidden_size // num_heads
    cfg = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
               num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads, head_dim=head_dim,
               eps=rms_norm_eps,
               inv_freq=tuple(inverse_frequencies(head_dim, rope_theta, rope_scaling).tolist()),
               attention_bias=attention_bias, o_bias=o_bias, init_std=init_std,
               residual_init_scale=residual_init_scale, dtype=dtype,
               param_dtype=param_dtype)
    if num_heads % cfg["num_kv_heads"]:
      raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                       f"{cfg['num_kv_heads']}")
    self.embed_tokens = layers.param(rngs, layers.normal(init_std), (vocab_size, hidden_size),
                                     ("vocab", "embed"), param_dtype)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(num_layers)])
    self.norm = RMSNorm(hidden_size, eps=rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.lm_head = None if tie_word_embeddings else layers.Dense(
        hidden_size, vocab_size, rngs=rngs, axes=("embed", "vocab"), use_bias=False,
        kernel_init=layers.normal(init_std), dtype=dtype, param_dtype=param_dtype)
    self.hidden_size, self.vocab_size = hidden_size, vocab_size
    self.num_kv_heads, self.head_dim = cfg["num_kv_heads"], head_dim
    self.scan_layers = scan_layers
    self.dtype = dtype

  def embed(self, ids: jax.Array) -> jax.Array:
    """int[B, L] -> float[B, L, d]."""
    table = self.embed_tokens[...]
    return table[ids].astype(self.dtype or table.dtype)

  def logits(self, h: jax.Array) -> jax.Array:
    """Last hidden states float[..., d] (before the final norm) -> float32 logits [..., V]."""
    h = self.norm(h)
    if self.lm_head is None:
      return jnp.einsum("...d,vd->...v", h, self.embed_tokens[...].astype(h.dtype)
                        ).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def hidden(self, inputs_embeds: jax.Array, mask: jax.Array) -> jax.Array:
    """Causal decoder over embeddings, before the final norm. float[B, L, d], bool[B, L] ->
    float[B, L, d]. Positions = cumsum(mask) - 1; a query attends to valid keys at or before
    it. The blocks run through layers.call_blocks (lax.scan with scan_layers, remat policy,
    the block-output sharding constraint)."""
    positions, attn_mask = _positions_and_mask(mask.astype(bool))
    x = inputs_embeds.astype(self.dtype or inputs_embeds.dtype)
    return layers.call_blocks(self.layers, x, positions, attn_mask, scan=self.scan_layers)

  def forward(self, inputs_embeds: jax.Array, mask: jax.Array) -> jax.Array:
    """float[B, L, d], bool[B, L] -> float32 logits [B, L, V] at every position."""
    return self.logits(self.hidden(inputs_embeds, mask))

  def __call__(self, prefix_embeds: jax.Array, prefix_mask: jax.Array, labels: jax.Array,
               label_mask: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced caption loss after a prefix (the Vicuna variant).

    prefix_embeds: float[B, P, d]; prefix_mask: bool[B, P]; labels: int[B, T] (caption + eos);
    label_mask: bool[B, T], valid as a prefix of each row. Sequence = [prefix ; embed(labels)];
    label t is predicted from the previous valid token (the last valid prefix token for t = 0).
    Returns (token-mean cross-entropy over label_mask, logits float32[B, T, V] aligned with
    labels); the LM head runs on those T positions only.
    Llama has no dropout; train/rngs are accepted for the common signature.
    """
    del train, rngs
    label_mask = label_mask.astype(bool)
    p = prefix_embeds.shape[1]
    labels = jnp.where(label_mask, labels, 0)
    x = jnp.concatenate([prefix_embeds, self.embed(labels).astype(prefix_embeds.dtype)], 1)
    mask = jnp.concatenate([prefix_mask.astype(bool), label_mask], 1)
    h = self.hidden(x, mask)
    # The state predicting labels[:, t] sits at the last valid position before p + t: p - 1 + t
    # for t > 0 (labels are valid as a prefix of the row), the last valid prefix one for t = 0.
    last_prefix = jnp.max(jnp.where(prefix_mask, jnp.arange(p), -1), axis=1)  # [B]
    src = jnp.concatenate([last_prefix[:, None],
                           p - 1 + jnp.arange(1, labels.shape[1])[None].repeat(
                               labels.shape[0], 0)], 1)
    # The gathered states pinned to the activations' layout: left to sharding propagation, on
    # data 2 x fsdp 2 x tensor 2 with gradient also flowing into the Q-Former, the backward of
    # this gather gave every LLM parameter below lm_head a wrong gradient (equal loss; grad norm
    # 74.67 vs 75.15). tests/test_llm_scale.py.
    h = sharding.constrain(jnp.take_along_axis(h, src[..., None], 1), ("batch", None, "embed"))
    logits = self.logits(h)
    return losses.token_cross_entropy(logits, labels, label_mask), logits

  # ----------------------------------------------------------------------------- decoding
  def decode_start(self, prefix_embeds: jax.Array, prefix_mask: jax.Array,
                   max_new_tokens: int) -> tuple[jax.Array, dict]:
    """Prefill. float[N, P, d], bool[N, P] -> (logits float32[N, V] for generated token 0,
    cache with P + max_new_tokens slots: state k/v float[N, layers, P + T, Hkv, D]).
    The layers stay unrolled here (the cache is written per layer)."""
    mask = prefix_mask.astype(bool)
    positions, attn_mask = _positions_and_mask(mask)
    x = prefix_embeds.astype(self.dtype or prefix_embeds.dtype)
    ks, vs = [], []
    for block in self.layers:
      q, k, v = block.qkv(block.input_norm(x), positions)
      ks.append(k)
      vs.append(v)
      x = block.finish(x, _gqa(q, k, v, attn_mask))
    last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), 0), axis=1)
    logits = self.logits(jnp.take_along_axis(x, last[:, None, None], 1))[:, 0]
    pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))
    k_all = jnp.pad(jnp.stack(ks, 1), pad)
    v_all = jnp.pad(jnp.stack(vs, 1), pad)
    cache = {"state": {"k": k_all, "v": v_all},
             "static": {"prefix_mask": mask, "next_position": jnp.sum(mask, -1)}}
    return logits, cache

  def decode_step(self, token: jax.Array, cache: dict, index: jax.Array
                  ) -> tuple[jax.Array, dict]:
    """token: int[N], the index-th generated token -> (logits float32[N, V], cache)."""
    k_all, v_all = cache["state"]["k"], cache["state"]["v"]
    prefix_mask = cache["static"]["prefix_mask"]
    n_prefix, total = prefix_mask.shape[1], k_all.shape[2]
    slot = n_prefix + index
    slots = jnp.arange(total)
    # Valid keys: the prefix's own mask, then generated slots up to and including this one.
    key_mask = jnp.concatenate(
        [prefix_mask, jnp.zeros((prefix_mask.shape[0], total - n_prefix), bool)], 1)
    key_mask = key_mask | ((slots >= n_prefix) & (slots <= slot))[None]
    positions = (cache["static"]["next_position"] + index)[:, None]
    x = self.embed(token[:, None])
    for i, block in enumerate(self.layers):
      q, k, v = block.qkv(block.input_norm(x), positions)
      k_all = jax.lax.dynamic_update_slice(k_all, k[:, None].astype(k_all.dtype),
                                           (0, i, slot, 0, 0))
      v_all = jax.lax.dynamic_update_slice(v_all, v[:, None].astype(v_all.dtype),
                                           (0, i, slot, 0, 0))
      x = block.finish(x, _gqa(q, k_all[:, i], v_all[:, i], key_mask[:, None, :]))
    return self.logits(x)[:, 0], {"state": {"k": k_all, "v": v_all}, "static": cache["static"]}
