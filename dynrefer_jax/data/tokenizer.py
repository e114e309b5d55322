"""A tiny word-level tokenizer with T5 conventions, for models trained from scratch.

The synthetic world's language has a few dozen words; a word-level vocabulary keeps the LM
small and the captions short in tokens. Conventions follow T5 so that the model code does not
care which tokenizer it gets: pad "<pad>" = 0, eos "</s>" = 1, unk "<unk>" = 2, `</s>` appended
to every encoded text. "," and "|" are tokens of their own (control words "w1,w2|", SPEC §7c).

Saved as `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`, so that
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2
CONTROL_TOKENS = (",", "|")


def _pre_tokenizer():
  # Split on whitespace, then isolate every punctuation character: "red star,blue|" ->
  # red / star / , / blue / |.
  return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                  pre_tokenizers.Punctuation("isolated")])


def words(text: str) -> list[str]:
  """The word-level pieces of `text` (lower-cased), as the tokenizer splits it."""
  return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text.lower())]


def build_tokenizer(texts: Iterable[str], out_dir: str, *, max_length: int = 512):
  """Trains the vocabulary on `texts` and saves it to `out_dir`; returns the HF tokenizer.

  Ids: the 3 special tokens, then "," and "|", then words by decreasing frequency (ties sorted
  alphabetically, so the vocabulary is deterministic).
  """
  counts: dict[str, int] = {}
  for text in texts:
    for w in words(text):
      counts[w] = counts.get(w, 0) + 1
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CONTROL_TOKENS)}
  for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    vocab.setdefault(w, len(vocab))

  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = _pre_tokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces

  os.makedirs(out_dir, exist_ok=True)
  _atomic_write(os.path.join(out_dir, "tokenizer.json"), tok.to_str())
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            "pad_token": PAD, "eos_token": EOS, "unk_token": UNK,
            "padding_side": "right", "clean_up_tokenization_spaces": False}
  _atomic_write(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=1))
  _atomic_write(os.path.join(out_dir, "special_tokens_map.json"),
                json.dumps({"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}))
  return load_tokenizer(out_dir)


def load_tokenizer(path: str):
  """Loads a tokenizer directory (ours, or any HF one such as a local flan-t5 copy) offline."""
  from transformers import AutoTokenizer  # lazy: importing transformers is slow
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
