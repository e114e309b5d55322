"""Hugging Face T5 (T5ForConditionalGeneration safetensors) -> models/t5.T5 parameters.

    flat = convert_t5(load_state_dict("flan-t5-xl/"), expected_shapes(params))

`rules(src, dst)` prefixes source keys with `src` and targets with `dst`, so the same table maps
the T5 inside the original DynRefer checkpoint (`t5_model.` -> `t5_model/`). The tied copies
`encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` are dropped on purpose (they are
`shared.weight`). `dynrefer_rules()` maps the original's `t5_proj` and `cem_memory`.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from dynrefer_jax.convert.common import Rule, convert

_ATTN = {"SelfAttention": "self_attn", "EncDecAttention": "cross_attn"}


def rules(src: str = "", dst: str = "", *, tied: bool = False) -> list[Rule]:
  """tied: the target has no lm_head (tie_word_embeddings); `lm_head.weight`, which
  transformers v5 always saves as an alias of `shared.weight`, is then dropped."""
  s, d = re.escape(src), dst
  blk = rf"{s}(encoder|decoder)\.block\.(\d+)\.layer"
  out = [
      Rule(rf"{s}shared\.weight", f"{d}shared"),
      Rule(rf"{s}(?:encoder|decoder)\.embed_tokens\.weight", None),
      # Stale key old checkpoints carry and transformers ignores on load.
      Rule(rf"{s}decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias"
           r"\.weight", None),
      Rule(rf"{s}lm_head\.weight", None if tied else f"{d}lm_head/kernel", "linear"),
      Rule(rf"{s}(encoder|decoder)\.final_layer_norm\.weight", d + "{0}/final_norm/scale"),
      Rule(rf"{s}(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias"
           r"\.weight", d + "{0}/relative_attention_bias"),
  ]
  for name, ours in _ATTN.items():
    out.append(Rule(rf"{blk}\.\d+\.{name}\.([qkvo])\.weight",
                    d + "{0}/layers/{1}/" + ours + "/{2}/kernel", "linear"))
  out += [
      Rule(rf"{blk}\.\d+\.DenseReluDense\.(wi_0|wi_1|wo)\.weight",
           d + "{0}/layers/{1}/ffn/{2}/kernel", "linear"),
      # Norm position: encoder [self, ffn]; decoder [self, cross, ffn].
      Rule(rf"{s}(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.weight",
           d + "{0}/layers/{1}/self_norm/scale"),
      Rule(rf"{s}(decoder)\.block\.(\d+)\.layer\.1\.layer_norm\.weight",
           d + "{0}/layers/{1}/cross_norm/scale"),
      Rule(rf"{s}(encoder)\.block\.(\d+)\.layer\.1\.layer_norm\.weight",
           d + "{0}/layers/{1}/ffn_norm/scale"),
      Rule(rf"{s}(decoder)\.block\.(\d+)\.layer\.2\.layer_norm\.weight",
           d + "{0}/layers/{1}/ffn_norm/scale"),
  ]
  return out


def dynrefer_rules(dst: str = "") -> list[Rule]:
  """The original checkpoint's trainable language-side pieces (SPEC §7c)."""
  return [Rule(r"t5_proj\.weight", f"{dst}t5_proj/kernel", "linear"),
          Rule(r"t5_proj\.bias", f"{dst}t5_proj/bias"),
          Rule(r"cem_memory", f"{dst}cem_memory", lambda w: np.asarray(w).reshape(-1))]


def convert_t5(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]] | None,
               *, source_name: str = "T5 checkpoint") -> dict[str, np.ndarray]:
  """HF T5 state dict -> {our '/'-joined path: array}; fails listing every problem.

  Whether the target is tied is read from `expected` (no `lm_head/kernel`); without `expected`
  the lm_head is converted."""
  tied = expected is not None and "lm_head/kernel" not in expected
  return convert(state, rules(tied=tied), expected, source_name=source_name)
