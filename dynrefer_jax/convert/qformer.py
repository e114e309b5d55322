"""Q-Former weights (plus `query_tokens` and `ln_vision`) from LAVIS or Hugging Face layouts.

Sources (CHECKPOINTS.md §1.3, §2.2, §5):
- LAVIS BLIP-2 / DynRefer state dicts: `Qformer.bert.*`, top-level `query_tokens`,
  `ln_vision.{weight,bias}`.
- HF `Blip2ForConditionalGeneration`: `qformer.*` (`attention.attention` instead of
  `attention.self`, `qformer.layernorm` for the embeddings LayerNorm), `query_tokens`,
  `vision_model.post_layernorm.*` for ln_vision. A bare `Blip2QFormerModel` state dict (no
  `qformer.` prefix) is accepted too.

Targets (what `expected` is keyed by, and what is returned):
- Q-Former parameters relative to the `models.qformer.QFormer` module (`layernorm/scale`,
  `layers/3/crossattention/key/kernel`, ...); the caller prefixes `Qformer/`.
- `query_tokens`: float[Q, D], the leading singleton of the original's [1, Q, D] dropped (the
  composition `models.dynrefer` stores `query_tokens` as [Q, D]). Converted only when
  `expected` asks for it.
- `ln_vision/scale`, `ln_vision/bias`: float[C]. Converted when `expected` asks for them and the
  source has them; if the source lacks them (unverified for the BLIP-2 file) they are dropped
  from `expected` — LAVIS would then keep LayerNorm's ones/zeros — and absent from the result.

Keys of other components in the same file (`t5_proj.*`, `visual_encoder.*`, `t5_model.*`, ...)
are ignored here; other converters own them. Inside the Q-Former every source key must be mapped:
text-side leftovers (word/position embeddings, `position_ids`, the text FFN
`intermediate`/`output`, `cls`) are dropped on purpose, anything else unknown is an error.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from dynrefer_jax.convert.common import Rule, convert

_LAYER = r"encoder\.layer\.(\d+)"


def _qformer_rules(prefix: str, attn_inner: str, embed_ln: str) -> list[Rule]:
  """Rules for one layout. prefix: regex before `encoder.`; attn_inner: 'self' (LAVIS) or
  'attention' (HF); embed_ln: the embeddings LayerNorm module path."""
  layer = prefix + _LAYER
  att = r"(attention|crossattention)"
  return [
      Rule(embed_ln + r"\.weight", "layernorm/scale"),
      Rule(embed_ln + r"\.bias", "layernorm/bias"),
      Rule(rf"{layer}\.{att}\.{attn_inner}\.(query|key|value)\.weight", "layers/{0}/{1}/{2}/kernel",
           "linear"),
      Rule(rf"{layer}\.{att}\.{attn_inner}\.(query|key|value)\.bias", "layers/{0}/{1}/{2}/bias"),
      Rule(rf"{layer}\.{att}\.output\.dense\.weight", "layers/{0}/{1}/dense/kernel", "linear"),
      Rule(rf"{layer}\.{att}\.output\.dense\.bias", "layers/{0}/{1}/dense/bias"),
      Rule(rf"{layer}\.{att}\.output\.LayerNorm\.weight", "layers/{0}/{1}/layernorm/scale"),
      Rule(rf"{layer}\.{att}\.output\.LayerNorm\.bias", "layers/{0}/{1}/layernorm/bias"),
      Rule(rf"{layer}\.(intermediate_query|output_query)\.dense\.weight", "layers/{0}/{1}/kernel",
           "linear"),
      Rule(rf"{layer}\.(intermediate_query|output_query)\.dense\.bias", "layers/{0}/{1}/bias"),
      Rule(rf"{layer}\.output_query\.LayerNorm\.weight", "layers/{0}/output_query_layernorm/scale"),
      Rule(rf"{layer}\.output_query\.LayerNorm\.bias", "layers/{0}/output_query_layernorm/bias"),
      # The text side DynRefer deletes (SPEC §6): present in some files, never used.
      Rule(rf"{layer}\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)", None),
      Rule(prefix + r"embeddings\.(word_embeddings|position_embeddings)\.weight", None),
      Rule(prefix + r"embeddings\.position_ids", None),
  ]


LAVIS_RULES = _qformer_rules(r"Qformer\.bert\.", "self", r"Qformer\.bert\.embeddings\.LayerNorm") + [
    Rule(r"Qformer\.cls\..*", None),
    Rule(r"query_tokens", "query_tokens", "squeeze0"),
    Rule(r"ln_vision\.weight", "ln_vision/scale"),
    Rule(r"ln_vision\.bias", "ln_vision/bias"),
]

HF_RULES = _qformer_rules(r"(?:qformer\.)?", "attention", r"(?:qformer\.)?layernorm") + [
    Rule(r"query_tokens", "query_tokens", "squeeze0"),
    Rule(r"vision_model\.post_layernorm\.weight", "ln_vision/scale"),
    Rule(r"vision_model\.post_layernorm\.bias", "ln_vision/bias"),
]

def _run(sd: Mapping[str, np.ndarray], rules: list[Rule], owned, ln_keys: tuple[str, str],
         expected: Mapping[str, tuple[int, ...]] | None, source_name: str) -> dict[str, np.ndarray]:
  selected = {k: v for k, v in sd.items() if owned(k)}
  if expected is not None:
    expected = dict(expected)
    if not any(k in sd for k in ln_keys):
      for k in ("ln_vision/scale", "ln_vision/bias"):
        expected.pop(k, None)
    # query_tokens / ln_vision are converted only when the caller asks for them.
    wanted = {"query_tokens": "query_tokens" in expected,
              ln_keys[0]: "ln_vision/scale" in expected, ln_keys[1]: "ln_vision/bias" in expected}
    selected = {k: v for k, v in selected.items() if wanted.get(k, True)}
  return convert(selected, rules, expected, source_name=source_name)


def convert_qformer_lavis(sd: Mapping[str, np.ndarray],
                          expected: Mapping[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
  """LAVIS / DynRefer state dict → {target path: array}; see the module docstring for targets.

  Raises common.ConversionError naming every unmapped, unused, missing or mis-shaped key.
  """
  owned = lambda k: k.startswith(("Qformer.", "ln_vision.")) or k == "query_tokens"
  return _run(sd, LAVIS_RULES, owned, ("ln_vision.weight", "ln_vision.bias"), expected,
              "LAVIS Q-Former")


def convert_qformer_hf(sd: Mapping[str, np.ndarray],
                       expected: Mapping[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
  """HF Blip2 (`qformer.*`, `query_tokens`, `vision_model.post_layernorm.*`) or a bare
  `Blip2QFormerModel` state dict → {target path: array}."""
  if any(k.startswith("qformer.") for k in sd):
    owned = lambda k: (k.startswith(("qformer.", "vision_model.post_layernorm."))
                       or k == "query_tokens")
  else:  # a bare Blip2QFormerModel: every key is the Q-Former's
    owned = lambda k: True
  return _run(sd, HF_RULES, owned,
              ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"),
              expected, "HF Blip2 Q-Former")
