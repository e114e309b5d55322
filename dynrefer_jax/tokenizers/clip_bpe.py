"""CLIP's byte-level BPE tokenizer (OpenAI `SimpleTokenizer`, as EVA-CLIP/OpenCLIP use it).

Vocabulary (49408 ids), built from the merges file `bpe_simple_vocab_16e6.txt.gz`:
256 byte symbols, the same 256 with the end-of-word marker `</w>`, the first 48894 merges
joined, then `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407.

Text cleaning as CLIP: `ftfy.fix_text` (if ftfy is installed), HTML-unescape twice, collapse
whitespace, strip, lower-case. Without ftfy the text is NFC-normalised instead (what ftfy's
fix_text does to well-formed text); mojibake repair is then skipped.

The merges file ships inside the `open_clip_torch` package (a data file, found without importing
open_clip) or is given explicitly.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import regex

SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # 48894: CLIP uses the file's first 48894 merges.
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenizer: specials, English contractions, letter runs, single digits, other runs.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
    r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)

try:
  import ftfy  # pylint: disable=import-error
except ImportError:  # optional: see the module docstring.
  ftfy = None


def default_bpe_path() -> str:
  """The merges file shipped in the open_clip_torch package, located without importing it."""
  spec = importlib.util.find_spec("open_clip")
  for location in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(location, BPE_FILE)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"{BPE_FILE} not found: install it with `pip install --no-deps open_clip_torch==3.3.0` "
      "or pass bpe_path=")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte → printable-character map (printable bytes map to themselves).

  Insertion order matters: it is the id order of the first 256 vocabulary entries (the
  printable bytes first, then the others mapped to chr(256), chr(257), ...)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars = {b: chr(b) for b in keep}
  others = [b for b in range(256) if b not in chars]
  chars.update({b: chr(256 + n) for n, b in enumerate(others)})
  return chars


def read_merges(bpe_path: str) -> list[tuple[str, str]]:
  """The first NUM_MERGES merges of the gzipped file (its first line is a header)."""
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  return [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  """Token strings in id order."""
  symbols = list(bytes_to_unicode().values())
  return (symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
          + [SOT_TOKEN, EOT_TOKEN])


def clean(text: str) -> str:
  text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


class ClipTokenizer:
  """`ClipTokenizer(bpe_path=None)(texts, context_length=77) -> int32[N, context_length]`."""

  def __init__(self, bpe_path: str | os.PathLike | None = None):
    merges = read_merges(os.fspath(bpe_path) if bpe_path is not None else default_bpe_path())
    self.vocab = build_vocab(merges)
    self.encoder = {tok: i for i, tok in enumerate(self.vocab)}
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.sot_token_id = self.encoder[SOT_TOKEN]  # 49406
    self.eot_token_id = self.encoder[EOT_TOKEN]  # 49407
    self.vocab_size = len(self.vocab)  # 49408
    self._cache = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}

  def _bpe(self, token: str) -> list[str]:
    """Greedy lowest-rank merging of one pre-token (byte-mapped), the last symbol marked `</w>`."""
    if token in self._cache:
      return self._cache[token]
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = set(zip(word[:-1], word[1:]))
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[token] = word
    return word

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without SOT/EOT."""
    ids = []
    for piece in _PATTERN.findall(clean(text)):
      mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self._bpe(mapped))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Ids → text, up to the first EOT (SOT dropped); the `</w>` markers become spaces."""
    byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    tokens = []
    for i in ids:
      if i == self.eot_token_id:
        break
      if i != self.sot_token_id:
        tokens.append(self.vocab[i])
    text = "".join(tokens)
    data = bytearray(byte_decoder[c] for c in text)  # '<', '/', 'w', '>' decode to themselves.
    return " ".join(data.decode("utf-8", errors="replace").replace("</w>", " ").split())

  def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """texts → int32[N, context_length]: SOT, ids, EOT, zero padding. Too-long texts are cut to
    context_length and their last id set to EOT (OpenCLIP's truncation)."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = self.eot_token_id
      out[row, :len(ids)] = ids
    return out
