"""Caption text for the LLM: LAVIS `blip_caption` preprocessing and fixed-length tokenisation.

Tokenizers come from a local directory (`load_tokenizer(dir)` = transformers
`AutoTokenizer.from_pretrained(dir)`); nothing downloads.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

MAX_WORDS = 50
MAX_TOKENS = 32
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
  """LAVIS BlipCaptionProcessor.pre_caption, step for step.

  Lower-case; each of . ! " ( ) * # : ; ~ becomes a space; runs of >= 2 whitespace characters
  become one space (a lone tab or newline stays, as in the original); trailing newlines, then
  surrounding spaces, stripped; at most `max_words` space-separated words.
  """
  caption = _PUNCT.sub(" ", caption.lower())
  caption = _SPACES.sub(" ", caption)
  caption = caption.rstrip("\n").strip(" ")
  words = caption.split(" ")
  if len(words) > max_words:
    caption = " ".join(words[:max_words])
  return caption


preprocess_caption = pre_caption  # alias (data/sources.py re-exports it under this name)


def load_tokenizer(directory: str | os.PathLike):
  """A tokenizer saved in `directory` (T5's spiece.model or a tokenizer.json); offline only."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], max_len: int = MAX_TOKENS, *,
             truncation_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
  """texts -> (ids int32[B, max_len], mask bool[B, max_len]), padded to max_len on the right.

  As the original's `t5_tokenizer(text, padding="longest", truncation=True, max_length=32)`:
  the tokenizer adds its special tokens (T5: `</s>` appended; Llama: `<s>` prepended) and
  truncation keeps them; padding to the fixed max_len instead of the longest row only adds
  masked positions (static shapes), which change no valid output. Padding positions hold
  the tokenizer's pad id (the eos id when it has none); the mask says which are valid.
  """
  side = tokenizer.truncation_side
  tokenizer.truncation_side = truncation_side
  try:
    enc = tokenizer(list(texts), truncation=True, max_length=max_len)
  finally:
    tokenizer.truncation_side = side
  return _pad(enc["input_ids"], max_len, _pad_id(tokenizer))


def apply_special_tokens(tokenizer, special_tokens) -> None:
  """Adds {name: token} (config.data.lm_special_tokens) to an LLM tokenizer in place, as
  Blip2VicunaInstruct does for Vicuna ("[PAD]" pad; "</s>" bos, eos, unk). LAVIS's slow
  LlamaTokenizer then prepends the new bos_token_id; a fast tokenizer's template would keep
  the old `<s>` until its post-processor is rebuilt."""
  special_tokens = dict(special_tokens or {})
  for name, token in special_tokens.items():
    tokenizer.add_special_tokens({name: token})
  if special_tokens and hasattr(tokenizer, "update_post_processor"):
    tokenizer.update_post_processor()


def _pad_id(tokenizer) -> int:
  pad = tokenizer.pad_token_id
  return int(tokenizer.eos_token_id if pad is None else pad)


def _pad(rows, max_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((len(rows), max_len), pad, np.int32)
  mask = np.zeros((len(rows), max_len), bool)
  for i, row in enumerate(rows):
    row = list(row)[:max_len]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, mask


# What the language model reads, by config.model.lm.kind (SPEC §7c):
# - "t5" (dynrefer_t5.py): the control string and the caption each tokenised with `</s>`.
# - "llama" (dynrefer_vicuna.py, after InstructBLIP-Vicuna): the control string is the LLM's
#   text input, tokenised with the tokenizer's own special tokens (Vicuna: `<s>`, which LAVIS
#   renames `</s>`) and truncated on the left (`truncation_side = 'left'`, max_txt_len); the
#   caption is the output, tokenised as `caption + eos_token` without the leading BOS
#   (`concat_text_input_output` drops `output_ids[i][0]`), truncated on the right.
LM_KINDS = ("t5", "llama")


def encode_controls(tokenizer, texts: Sequence[str], max_len: int, lm_kind: str = "t5"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Control strings ("w1,w2|") -> (ids int32[B, max_len], mask bool[B, max_len])."""
  _check_kind(lm_kind)
  return tokenize(tokenizer, texts, max_len,
                  truncation_side="left" if lm_kind == "llama" else "right")


def encode_captions(tokenizer, texts: Sequence[str], max_len: int, lm_kind: str = "t5"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Caption targets -> (ids int32[B, max_len], mask bool[B, max_len]), the eos included."""
  _check_kind(lm_kind)
  if lm_kind == "t5":
    return tokenize(tokenizer, texts, max_len)
  # tokenizer(t + eos)[1:] when a BOS is prepended, i.e. the caption's own pieces, then eos;
  # truncating the pieces keeps the eos, as T5's truncation keeps `</s>`.
  enc = tokenizer(list(texts), add_special_tokens=False, truncation=True,
                  max_length=max_len - 1)
  eos = tokenizer.eos_token_id
  return _pad([list(r) + [eos] for r in enc["input_ids"]], max_len, _pad_id(tokenizer))


def _check_kind(lm_kind: str) -> None:
  if lm_kind not in LM_KINDS:
    raise ValueError(f"config.model.lm.kind {lm_kind!r}: one of {', '.join(LM_KINDS)}")
