"""Control words: the training draw's distribution and reproducibility, sorted inference strings,
and the encoder-input assembly against a hand-written numpy reference."""

import collections
import itertools

import numpy as np
import pytest

import jax.numpy as jnp

from dynrefer_jax.models import control_words as cw

WORDS = ["man", "white shirt", "baseball"]


def test_training_draw_format_and_distribution():
  counts = collections.Counter()
  kept = collections.Counter()
  n = 6000
  for i in range(n):
    s = cw.training_control_words(WORDS, cw.example_rng(0, 1, i))
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


def test_training_draw_is_reproducible_per_step_and_example():
  a = [cw.training_control_words(WORDS * 3, cw.example_rng(7, 3, i)) for i in range(50)]
  b = [cw.training_control_words(WORDS * 3, cw.example_rng(7, 3, i)) for i in range(50)]
  c = [cw.training_control_words(WORDS * 3, cw.example_rng(7, 4, i)) for i in range(50)]
  assert a == b and a != c


def test_ratios_are_respected():
  rng = np.random.default_rng(0)
  assert cw.training_control_words(WORDS, rng, full_drop_ratio=1.0) == "|"
  s = cw.training_control_words(WORDS, rng, full_drop_ratio=0.0, keep_ratio=1.0)
  assert sorted(s[:-1].split(",")) == sorted(WORDS)


def test_candidate_words_dedup_sorted():
  assert cw.candidate_words(["man", "shirt"], ["white shirt", "man", " "]) == [
      "man", "shirt", "white shirt"]


def test_inference_control_words_sorted_and_deduplicated():
  assert cw.inference_control_words(["shirt", "man", "shirt", "bat"]) == "bat,man,shirt|"
  assert cw.inference_control_words([]) == "|"
  scores = np.array([[0.9, 0.2, 0.7], [0.1, 0.5, 0.5], [0.0, 0.0, 0.0]])
  names = ["zebra", "apple", "man"]
  assert cw.control_words_from_scores(scores, names, 0.5) == ["man,zebra|", "|", "|"]


def test_build_encoder_inputs_against_numpy():
  rs = np.random.RandomState(0)
  proj = rs.randn(2, 3, 4).astype(np.float32)
  ctrl = rs.randn(2, 5, 4).astype(np.float32)
  cmask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  mem = rs.randn(4).astype(np.float32)
  x, mask = cw.build_encoder_inputs(jnp.asarray(proj), jnp.asarray(ctrl), jnp.asarray(cmask),
                                    jnp.asarray(mem))
  expected_x = np.zeros((2, 8, 4), np.float32)
  expected_mask = np.zeros((2, 8), bool)
  for b in range(2):
    for q in range(3):
      expected_x[b, q] = proj[b, q]
      expected_mask[b, q] = True
    for t in range(5):
      expected_x[b, 3 + t] = ctrl[b, t] + mem
      expected_mask[b, 3 + t] = cmask[b, t]
  np.testing.assert_allclose(np.asarray(x), expected_x, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(mask), expected_mask)
  assert mask.dtype == jnp.bool_
