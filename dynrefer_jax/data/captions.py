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


def tokenize(tokenizer, texts: Sequence[str], max_len: int = MAX_TOKENS
             ) -> tuple[np.ndarray, np.ndarray]:
  """texts -> (ids int32[B, max_len], mask bool[B, max_len]), padded to max_len.

  As the original's `t5_tokenizer(text, padding="longest", truncation=True, max_length=32)`:
  the tokenizer appends `</s>` and truncation keeps it; padding to the fixed max_len instead of
  the longest row only adds masked positions (static shapes), which change no valid output.
  """
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len)
  ids = np.asarray(enc["input_ids"], np.int32)
  mask = np.asarray(enc["attention_mask"], bool)
  pad = tokenizer.pad_token_id
  return np.where(mask, ids, pad).astype(np.int32), mask
