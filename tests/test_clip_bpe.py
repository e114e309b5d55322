"""ClipTokenizer vs transformers' CLIPTokenizer built offline from the same merges file.

The HF tokenizer's vocab.json / merges.txt are derived here with CLIP's construction (byte
symbols, their `</w>` variants, the first 48894 merges joined, the two specials); ids must be
identical. HF pads with EOT and we pad with 0, so rows are compared up to HF's length and our
tail must be zeros.
"""

import gzip
import json

import numpy as np
import pytest
from transformers import CLIPTokenizer

from dynrefer_jax.tokenizers import ClipTokenizer
from dynrefer_jax.tokenizers.clip_bpe import default_bpe_path

TEXTS = [
    "a photo of a cat.",
    "A man riding a WAVE on top of a surfboard",
    "the white baseball pitcher's glove",
    "two dogs  playing\tin the\nsnow",
    "   leading and trailing spaces   ",
    "it's, they're, we've, I'm, you'll, he'd",
    "Numbers: 12345 and 3.14159 and 1,000,000",
    "email me at someone@example.com!!!",
    "hyphen-ated words and under_scores",
    "(parenthesised) [bracketed] {braced}",
    "question? exclamation! semicolon; colon:",
    "café naïve résumé coöperate",
    "Zürich straße über",
    "日本語のテキスト",
    "中文文本测试",
    "emoji 🐱🐶 and 👍🏽",
    "русский текст",
    "ελληνικά γράμματα",
    "a" * 50,
    "supercalifragilisticexpialidocious",
    "the quick brown fox jumps over the lazy dog",
    "red shirt, blue jeans, black shoes|",
    "man,white shirt|",
    "...",
    "",
    "x",
    "$100 #hashtag %percent ^caret & ampersand *star",
    "O'Neil's Irish pub",
    "tab\tseparated\tvalues",
    "mixed CASE Words AND acronyms like NASA",
    "a clock tower with a clock on each side",
    "the 2nd of 3 giraffes",
    "quotes \"double\" and 'single'",
    "slashes / and \\ backslashes",
    " ".join(["word"] * 100),  # longer than 77 tokens: truncation
]


def _bytes_to_unicode():
  """GPT-2's table, written independently of the module under test."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
    merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
  vocab = list(_bytes_to_unicode().values())
  vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  d = tmp_path_factory.mktemp("clip_tok")
  (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  return CLIPTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def ours():
  return ClipTokenizer()


def test_known_ids(ours):
  """Hand-known CLIP ids for "a photo of a cat." (OpenAI CLIP README example family)."""
  np.testing.assert_array_equal(ours("a photo of a cat.", context_length=10)[0],
                                [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, 0])
  assert ours.vocab_size == 49408 and ours.sot_token_id == 49406 and ours.eot_token_id == 49407


def test_ids_match_hf(ours, hf_tokenizer):
  assert len(TEXTS) >= 30
  ids = ours(TEXTS)
  assert ids.shape == (len(TEXTS), 77) and ids.dtype == np.int32
  for text, row in zip(TEXTS, ids):
    ref = hf_tokenizer(text, truncation=True, max_length=77)["input_ids"]
    np.testing.assert_array_equal(row[:len(ref)], ref, err_msg=repr(text))
    assert not row[len(ref):].any(), repr(text)


def test_html_unescape_as_clip(ours):
  """CLIP (not HF's tokenizer) HTML-unescapes twice before splitting."""
  np.testing.assert_array_equal(ours("fish &amp;amp; chips"), ours("fish & chips"))


def test_truncation_keeps_eot(ours):
  row = ours(" ".join(["word"] * 100), context_length=77)[0]
  assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] != 0).all()
  assert (row[1:-1] != 49407).all()


def test_decode_round_trip(ours):
  text = ours.decode(ours("Two dogs, playing in the snow!")[0])
  assert text == "two dogs , playing in the snow !"
