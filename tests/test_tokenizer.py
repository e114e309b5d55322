"""The word-level tokenizer: T5 conventions, control-word symbols, offline AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from dynrefer_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  tok_lib.build_tokenizer(["the red star", "a red ring", "the Blue star left of the ring"], d)
  return d


def test_special_ids_and_vocab_order(tok_dir):
  tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert tok.convert_tokens_to_ids([",", "|"]) == [3, 4]
  # By decreasing frequency: the x3, then red/ring/star x2 (alphabetical), then the rest.
  assert tok.convert_tokens_to_ids(["the", "red", "ring", "star", "a"]) == [5, 6, 7, 8, 9]


def test_encode_appends_eos_lowercases_and_splits_control_words(tok_dir):
  tok = tok_lib.load_tokenizer(tok_dir)
  ids = tok("Red star,blue ring|")["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == ["red", "star", ",", "blue", "ring", "|", "</s>"]
  assert tok("zebra star")["input_ids"] == [2, 8, 1]
  batch = tok(["the red star", "a"], padding="max_length", max_length=5)
  assert batch["input_ids"] == [[5, 6, 8, 1, 0], [9, 1, 0, 0, 0]]
  assert batch["attention_mask"] == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]


def test_decode_roundtrip(tok_dir):
  tok = tok_lib.load_tokenizer(tok_dir)
  text = "the blue star left of the ring"
  assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
