"""The matrix-work count of one training region (../shared/design/PERFORMANCE.md).

`flops_per_region(config.model, num_tags)` is the count of `bench/torch_anchor.py`'s
`flops_per_region()` (2 FLOPs per multiply-add; ViT forward only, FlanT5 forward + input-gradient
backward, the trainable parts forward + backward = 3× forward), written in terms of the model
config so that it also sizes the toy models. At full size it is ≈ 1.99 TFLOP per region; TFLOP/s
figures of the trainer and the benchmarks use it so that they compare with the anchor's.

The anchor's fixed sequence lengths are kept: 8 control tokens after the queries (40 encoder
tokens at full size), 20 target tokens, 64 texts per region–text batch, 77 text-tower tokens.

A decoder-only LLM (config.model.lm.kind "llama") is counted the same way, as part "llm": its
layers over the whole sequence (queries + control + targets), the LM head on the targets only
(as models/llama.py runs it), forward + input-gradient backward. Like the T5 term, attention
scores (QKᵀ, PV) are left out: at these lengths they are under 2% of a layer's matmuls.
"""

from __future__ import annotations


def flops_per_region(m, num_tags: int, *, n_control: int = 8, n_target: int = 20,
                     batch_texts: int = 64) -> dict[str, float]:
  """{part: FLOPs per region} plus 'total'. m: config.model; num_tags: K of the tag table."""
  views = m.num_views
  c = m.vit.width
  tok = 1 + (m.vit.image_size // m.vit.patch_size) ** 2
  depth = m.vit.depth
  vit = views * 2 * (tok * depth * (4 * c * c + 2 * c * m.vit.mlp_dim) + depth * 2 * tok * tok * c)

  n_ctx = m.num_query_tokens + n_control
  if m.lm.get("kind", "t5") == "llama":
    lm_part = {"llm": 2 * ((n_ctx + n_target) * llm_per_token(m.lm)
                           + n_target * 2 * m.lm.hidden_size * m.lm.vocab_size)}
  else:
    lm_part = {"t5": 2 * (t5_encoder(m.lm, n_ctx) + n_target * t5_decoder_per_token(m.lm))}

  q = m.qformer
  dq, nq = q.hidden, m.num_query_tokens
  n_cross = -(-q.num_layers // q.cross_attention_freq)
  qformer = 3 * 2 * (nq * q.num_layers * (4 * dq * dq + 2 * dq * q.mlp_dim)
                     + n_cross * (nq * 2 * dq * dq + tok * 2 * c * dq))
  fusion = 3 * 2 * tok * (views * c * c + c * c)
  roi = m.roi.output_size ** 2
  align = 3 * 2 * (views - 1) * roi * (2 * c * c + c * 112 + 9 * 2 * c)
  h = m.head
  heads = 3 * 2 * (num_tags + 2 * batch_texts) * h.num_layers * (2 * h.hidden * h.hidden
                                                                  + 2 * h.hidden * h.mlp_dim)
  t = m.text
  text = 2 * t.context_length * t.depth * (4 * t.width * t.width + 2 * t.width * t.mlp_dim)
  parts = dict(vit=vit, **lm_part, qformer=qformer, fusion=fusion, align=align, heads=heads,
               text=text)
  parts = {k: float(v) for k, v in parts.items()}
  parts["total"] = sum(parts.values())
  return parts


def t5_encoder(lm, n_tokens: int) -> float:
  """Forward FLOPs of T5's encoder over n_tokens (q, k, v, o and the gated FFN)."""
  d, inner, ff = lm.d_model, lm.num_heads * lm.d_kv, lm.d_ff
  return 2 * n_tokens * lm.num_encoder_layers * (4 * d * inner + 3 * d * ff)


def t5_decoder_per_token(lm) -> float:
  """Forward FLOPs of one T5 decoder token: self + cross attention, FFN, the LM head."""
  d, inner, ff = lm.d_model, lm.num_heads * lm.d_kv, lm.d_ff
  return 2 * lm.num_decoder_layers * (8 * d * inner + 3 * d * ff) + 2 * d * lm.vocab_size


def llm_per_token(lm) -> float:
  """Forward FLOPs of one token through a decoder-only LLM's layers (q and o over all heads,
  k and v over the key/value heads, SwiGLU's gate, up and down), without the LM head."""
  d = lm.hidden_size
  head_dim = lm.get("head_dim") or d // lm.num_heads
  inner, kv = lm.num_heads * head_dim, (lm.get("num_kv_heads") or lm.num_heads) * head_dim
  return 2 * lm.num_layers * (2 * d * inner + 2 * d * kv + 3 * d * lm.intermediate_size)
