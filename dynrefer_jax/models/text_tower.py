"""The frozen text tower: EVA-CLIP / OpenCLIP `TextTransformer` (SPEC §7b, CHECKPOINTS §4).

tokens → token + position embedding → pre-LN causal transformer → ln_final → the hidden state
at the end-of-text token → `@ text_projection`. The output is *not* L2-normalised
(DynRefer's region–text head consumes the raw 1024-d embedding).

EVA-CLIP-g's text side: vocab 49408, context 77, width 768, 12 layers, 12 heads, MLP 3072,
exact GELU, LayerNorm eps 1e-5, qkv biases (nn.MultiheadAttention), projection 768→1024 without
bias. OpenAI CLIP (HF `CLIPTextModelWithProjection`) is the same with act="quick_gelu".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dynrefer_jax.models import layers
from dynrefer_jax.models.eva_vit import Block


class TextTransformer(nnx.Module):
  """Parameters: `token_embedding[V, C]`, `positional_embedding[context_length, C]`,
  `blocks/{i}/...` (as the vision tower's blocks, with `qkv_bias[3, H, D]`), `ln_final`,
  `text_projection[C, output_dim]` (used as x @ P)."""

  def __init__(self, *, vocab_size: int = 49408, context_length: int = 77, width: int = 768,
               depth: int = 12, num_heads: int = 12, mlp_dim: int = 3072,
               output_dim: int = 1024, act: str = "gelu", ln_eps: float = 1e-5,
               eot_token_id: int | None = None, scan_layers: bool = False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.context_length, self.eot_token_id, self.dtype = context_length, eot_token_id, dtype
    self.scan_layers = scan_layers  # blocks under lax.scan (layers.call_blocks)
    # OpenCLIP's init stds (token 0.02, positions 0.01, projection width**-0.5).
    self.token_embedding = layers.param(rngs, layers.normal(0.02), (vocab_size, width),
                                        ("vocab", "embed"), param_dtype)
    self.positional_embedding = layers.param(rngs, layers.normal(0.01), (context_length, width),
                                             (None, "embed"), param_dtype)
    self.blocks = nnx.List([
        Block(width, num_heads, mlp_dim, qkv_bias="qkv", act=act, ln_eps=ln_eps, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs) for _ in range(depth)])
    self.ln_final = layers.LayerNorm(width, eps=ln_eps, param_dtype=param_dtype, rngs=rngs)
    self.text_projection = layers.param(rngs, layers.normal(width ** -0.5), (width, output_dim),
                                        ("embed", None), param_dtype)

  def __call__(self, tokens: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """tokens: int[N, L], L <= context_length → float[N, output_dim].

    Pooling position: with `eot_token_id=None`, argmax of the token ids (OpenCLIP / EVA-CLIP:
    EOT 49407 is the largest id); otherwise the first position equal to `eot_token_id` (HF CLIP
    with a correct `eos_token_id`; a row without it pools position 0, as HF's argmax would).
    The tower is frozen and has no dropout: `train`/`rngs` are unused.
    """
    del train, rngs
    n, length = tokens.shape
    if length > self.context_length:
      raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
    dtype = self.dtype or jnp.float32
    x = jnp.take(self.token_embedding[...], tokens, axis=0).astype(dtype)
    x = x + self.positional_embedding[...][:length].astype(dtype)
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    x = layers.call_blocks(self.blocks, x, causal, scan=self.scan_layers)
    x = self.ln_final(x)
    if self.eot_token_id is None:
      eot = jnp.argmax(tokens, axis=-1)
    else:
      eot = jnp.argmax(tokens == self.eot_token_id, axis=-1)
    pooled = x[jnp.arange(n), eot]
    return jnp.dot(pooled, self.text_projection[...].astype(dtype))
