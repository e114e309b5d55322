"""Control words as strings (data/control_words.py): the caption's candidate phrases by the
original's rule on Penn Treebank POS tags (hand-annotated here), the training draw's distribution
and reproducibility, and the sorted inference string. Their tokenisation is tested with a
SentencePiece model in test_pipeline.py."""

import collections
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from dynrefer_jax.data import control_words as cw

WORDS = ["man", "white shirt", "baseball"]

# caption → (hand-annotated Penn Treebank tags, phrases by the original's rule: each NN*/JJ*
# word from its first occurrence, extended while the next words are nouns of the caption).
CASES = {
    "a man wearing a white baseball cap": (
        "DT NN VBG DT JJ NN NN", ["man", "white baseball cap", "baseball cap", "cap"]),
    # "red" twice: both start at its first occurrence (the original's tokens.index(word)).
    "red car behind a red truck": ("JJ NN IN DT JJ NN", ["red car", "car", "red car", "truck"]),
    # punctuation is dropped before the rule, as TextBlob's .tags drops it
    "man, white shirt": ("NN JJ NN", ["man", "white shirt", "shirt"]),
    "two zebras grazing in tall grass": ("CD NNS VBG IN JJ NN", ["zebras", "tall grass", "grass"]),
    # no noun or adjective: the original's words = [""]
    "it is on there": ("PRP VBZ IN EX", [""]),
}


@pytest.mark.parametrize("caption", sorted(CASES))
def test_caption_phrases_by_the_original_rule(caption):
  tags, phrases = CASES[caption]
  assert [t for _, t in cw.pos_tags(caption)] == tags.split()
  assert cw.caption_phrases(caption) == phrases


def test_phrases_need_nothing_downloaded(tmp_path):
  """The tagger's data ships in the wheel: a fresh process with NLTK's data paths pointing at an
  empty folder and no network tags a caption."""
  env = dict(os.environ, NLTK_DATA=str(tmp_path), HOME=str(tmp_path))
  code = ("from dynrefer_jax.data import control_words as cw; "
          "print(cw.caption_phrases('a man wearing a white baseball cap'))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == str(CASES["a man wearing a white baseball cap"][1])


def test_training_draw_format_and_distribution():
  counts = collections.Counter()
  kept = collections.Counter()
  n = 6000
  for i in range(n):
    s = cw.training_control_words(WORDS, np.random.default_rng([0, 1, i]))
    assert s.endswith("|") and s.count("|") == 1
    body = s[:-1]
    words = body.split(",") if body else []
    assert len(set(words)) == len(words) and set(words) <= set(WORDS)
    counts[tuple(words)] += 1
    kept.update(words)
  # P(empty) = 0.5 (full drop) + 0.5 * 0.5**3 (every word dropped); 4-sigma bounds.
  p_empty = 0.5 + 0.5 * 0.5 ** 3
  sigma = (p_empty * (1 - p_empty) / n) ** 0.5
  assert abs(counts[()] / n - p_empty) < 4 * sigma
  # Each word survives with probability 0.5 * 0.5 = 0.25.
  for w in WORDS:
    assert abs(kept[w] / n - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
  # Shuffled: every order of all three words shows up (each has p = 0.5 * 0.125 / 6 ~ 1%).
  for perm in itertools.permutations(WORDS):
    assert counts[perm] > 0


def test_training_draw_is_reproducible_per_seed():
  a = [cw.training_control_words(WORDS * 3, np.random.default_rng([7, 3, i])) for i in range(50)]
  b = [cw.training_control_words(WORDS * 3, np.random.default_rng([7, 3, i])) for i in range(50)]
  c = [cw.training_control_words(WORDS * 3, np.random.default_rng([7, 4, i])) for i in range(50)]
  assert a == b and a != c


def test_ratios_are_respected():
  rng = np.random.default_rng(0)
  assert cw.training_control_words(WORDS, rng, full_drop_ratio=1.0) == "|"
  s = cw.training_control_words(WORDS, rng, full_drop_ratio=0.0, keep_ratio=1.0)
  assert sorted(s[:-1].split(",")) == sorted(WORDS)
  # The empty candidate joins as an empty word, as in the original.
  s = cw.training_control_words(["", "man"], rng, full_drop_ratio=0.0, keep_ratio=1.0)
  assert s in (",man|", "man,|")


def test_candidate_words_dedup_sorted():
  assert cw.candidate_words(["man", "shirt"], ["white shirt", "man"]) == [
      "man", "shirt", "white shirt"]


def test_inference_control_words_sorted_and_deduplicated():
  assert cw.inference_control_words(["shirt", "man", "shirt", "bat"]) == "bat,man,shirt|"
  assert cw.inference_control_words([]) == "|"
