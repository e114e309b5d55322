"""Hugging Face LlamaForCausalLM (LLaMA / Vicuna safetensors) -> models/llama.Llama parameters.

    flat = convert_llama(load_state_dict("vicuna-7b-v1.5/"), expected_shapes(params))

`rules(src, dst)` prefixes sources/targets (the original's Vicuna variant stores the LLM under
`llm_model.`); `dynrefer_rules()` maps its trainable `llm_proj`.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from dynrefer_jax.convert.common import Rule, convert


def rules(src: str = "", dst: str = "", *, tied: bool = False) -> list[Rule]:
  s, d = re.escape(src), dst
  layer = rf"{s}model\.layers\.(\d+)"
  return [
      Rule(rf"{s}model\.embed_tokens\.weight", f"{d}embed_tokens"),
      Rule(rf"{s}model\.norm\.weight", f"{d}norm/scale"),
      Rule(rf"{s}lm_head\.weight", None if tied else f"{d}lm_head/kernel", "linear"),
      Rule(rf"{layer}\.self_attn\.([qkvo])_proj\.weight", d + "layers/{0}/{1}/kernel", "linear"),
      Rule(rf"{layer}\.mlp\.(gate|up|down)_proj\.weight", d + "layers/{0}/{1}/kernel", "linear"),
      Rule(rf"{layer}\.input_layernorm\.weight", d + "layers/{0}/input_norm/scale"),
      Rule(rf"{layer}\.post_attention_layernorm\.weight", d + "layers/{0}/post_norm/scale"),
      # Rotary frequencies are recomputed from rope_theta; old checkpoints carry them.
      Rule(rf"{s}model\.(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", None),
  ]


def dynrefer_rules(dst: str = "") -> list[Rule]:
  """The Vicuna variant's projection from the Q-Former width to the LLM width."""
  return [Rule(r"llm_proj\.weight", f"{dst}llm_proj/kernel", "linear"),
          Rule(r"llm_proj\.bias", f"{dst}llm_proj/bias")]


def convert_llama(state: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple[int, ...]] | None,
                  *, source_name: str = "Llama checkpoint") -> dict[str, np.ndarray]:
  """HF Llama state dict -> {our '/'-joined path: array}; tied when `expected` has no lm_head."""
  tied = expected is not None and "lm_head/kernel" not in expected
  return convert(state, rules(tied=tied), expected, source_name=source_name)
