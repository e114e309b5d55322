"""Text-tower converters: EVA-CLIP `eva_clip_psz14.pt` (`text.*`, CHECKPOINTS §4) and HF CLIP text.

`convert_*(state_dict, expected)` → {path inside `TextTransformer`: array}; the caller adds the
prefix (DynRefer: `text_encoder/`). Problems raise `common.ConversionError` naming every key.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from dynrefer_jax.convert.common import Rule, convert
from dynrefer_jax.convert.eva_vit import (block_rules, fuse_separate_qkv, heads_from_expected,
                                         strip_prefix)

Shapes = Mapping[str, tuple[int, ...]]

_EVA_BLOCK = dict(norm1=r"ln_1", norm2=r"ln_2", qkv=r"attn\.in_proj_", q_bias="", v_bias="",
                  out=r"attn\.out_proj", fc1=r"mlp\.c_fc", fc2=r"mlp\.c_proj")


def eva_clip_text_rules(expected: Shapes) -> list[Rule]:
  h, d = heads_from_expected(expected)
  return [
      Rule(r"text\.token_embedding\.weight", "token_embedding"),
      Rule(r"text\.positional_embedding", "positional_embedding"),
      *block_rules(r"text\.transformer\.resblocks\.(\d+)\.", "blocks/{0}/", _EVA_BLOCK, h, d,
                   fused_bias=True),
      Rule(r"text\.ln_final\.weight", "ln_final/scale"),
      Rule(r"text\.ln_final\.bias", "ln_final/bias"),
      # A raw parameter used as x @ P: already [in, out].
      Rule(r"text\.text_projection", "text_projection"),
      # Unused by DynRefer: the CLIP temperature and a possibly stored causal-mask buffer.
      Rule(r"(text\.)?logit_scale", None),
      Rule(r"text\.attn_mask", None),
      # The vision half of the EVA-CLIP file (DynRefer's vision tower comes from eva_vit_g.pth).
      Rule(r"visual\..*", None),
  ]


def convert_eva_clip_text(state_dict: Mapping[str, np.ndarray],
                          expected: Shapes) -> dict[str, np.ndarray]:
  """eva_clip_psz14.pt, whole (its `visual.*` keys are dropped) or only its `text.*` keys."""
  return convert(state_dict, eva_clip_text_rules(expected), expected,
                 source_name="EVA-CLIP text")


_HF_CLIP_BLOCK = dict(norm1=r"layer_norm1", norm2=r"layer_norm2", qkv=r"self_attn\.qkv_proj\.",
                      q_bias="", v_bias="", out=r"self_attn\.out_proj", fc1=r"mlp\.fc1",
                      fc2=r"mlp\.fc2")


def hf_clip_text_rules(expected: Shapes) -> list[Rule]:
  h, d = heads_from_expected(expected)
  return [
      Rule(r"text_model\.embeddings\.token_embedding\.weight", "token_embedding"),
      Rule(r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
      Rule(r"text_model\.embeddings\.position_ids", None),
      *block_rules(r"text_model\.encoder\.layers\.(\d+)\.", "blocks/{0}/", _HF_CLIP_BLOCK, h, d,
                   fused_bias=True),
      Rule(r"text_model\.final_layer_norm\.weight", "ln_final/scale"),
      Rule(r"text_model\.final_layer_norm\.bias", "ln_final/bias"),
      Rule(r"text_projection\.weight", "text_projection", "linear"),
  ]


def convert_hf_clip_text(state_dict: Mapping[str, np.ndarray], expected: Shapes, *,
                         prefix: str = "") -> dict[str, np.ndarray]:
  """HF `CLIPTextModelWithProjection` (keys `text_model.*`, `text_projection.weight`)."""
  state = fuse_separate_qkv(strip_prefix(state_dict, prefix))
  return convert(state, hf_clip_text_rules(expected), expected, source_name="HF CLIP text")
