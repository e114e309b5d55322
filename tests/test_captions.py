"""LAVIS blip_caption preprocessing (hand-written expectations) and target tokenisation with a
SentencePiece model trained on the fly (checked against sentencepiece itself)."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from dynrefer_jax.data import captions

CORPUS = ["a man in a white shirt", "the pitcher throws a white baseball",
          "two dogs play on green grass", "a red car parked near the street",
          "woman holding an umbrella in the rain", "man,white shirt|", "dog,grass|", "|"]


@pytest.mark.parametrize("raw, expected", [
    ("A Man in a White Shirt.", "a man in a white shirt"),
    ('He said: "Hi!" (twice) *wow* #1; ~end~', "he said hi twice wow 1 end"),
    ("  lots   of\n\nspace  ", "lots of space"),
    ("tab\tstays", "tab\tstays"),            # a single whitespace char is not collapsed
    ("trailing newline\n", "trailing newline"),
    ("commas, dashes - and 'quotes' stay", "commas, dashes - and 'quotes' stay"),
    ("...", ""),
])
def test_pre_caption(raw, expected):
  assert captions.pre_caption(raw) == expected
  assert captions.preprocess_caption(raw) == expected


def test_pre_caption_truncates_to_50_words():
  raw = " ".join(f"w{i}" for i in range(60))
  assert captions.pre_caption(raw) == " ".join(f"w{i}" for i in range(50))
  assert captions.pre_caption("a b c", max_words=2) == "a b"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 20), model_prefix=str(d / "spiece"), vocab_size=60,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
      eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
  (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                       "extra_ids": 0}))
  return d


def test_tokenize_appends_eos_truncates_and_pads(tokenizer_dir):
  tok = captions.load_tokenizer(tokenizer_dir)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "spiece.model"))
  texts = ["man,white shirt|", "|", " ".join(CORPUS)]
  ids, mask = captions.tokenize(tok, texts, max_len=12)
  assert ids.shape == (3, 12) and ids.dtype == np.int32 and mask.dtype == bool
  for row, m, text in zip(ids, mask, texts):
    ref = sp.encode(text)[:11] + [1]  # </s> survives truncation
    n = len(ref)
    assert list(row[:n]) == ref and m[:n].all() and not m[n:].any() and (row[n:] == 0).all()
  assert mask[2].all()  # the long one is truncated to exactly max_len
