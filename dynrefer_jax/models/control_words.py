"""Control words (the ControlCap mechanism, SPEC §7c): strings, and the LLM encoder input.

A control string is comma-joined words followed by "|" ("man,white shirt|", or just "|"). It is
tokenised by the T5 tokenizer (host side, `data/captions.tokenize`), embedded with T5's input
embedding, shifted by the learned vector `cem_memory`, and appended after the projected queries.

Randomness is host-side (tokenisation happens on the host): pass a `numpy.random.Generator`;
`example_rng(seed, step, index)` derives one per example so that a step is reproducible.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SEPARATOR = ","
END = "|"


def example_rng(seed: int, step: int, index: int) -> np.random.Generator:
  """The per-example generator of a training step (independent streams, reproducible)."""
  return np.random.default_rng([seed, step, index])


def candidate_words(*word_sets: Iterable[str]) -> list[str]:
  """Union of candidate words (tag sets, noun phrases), deduplicated and SORTED.

  The original deduplicates through a Python set (hash order); sorting first makes the random
  draw below depend only on the RNG."""
  return sorted({w.strip() for ws in word_sets for w in ws if w and w.strip()})


def training_control_words(words: Sequence[str], rng: np.random.Generator, *,
                           full_drop_ratio: float = 0.5, keep_ratio: float = 0.5) -> str:
  """The original's training-time draw.

  With probability `full_drop_ratio` the string is empty ("|"); otherwise each word is kept
  independently with probability `keep_ratio`, the kept words are shuffled, joined by "," and
  "|" is appended. Draw order: one uniform for the full drop, then one per word, then a shuffle.
  """
  if rng.random() < full_drop_ratio:
    return END
  kept = [w for w in words if rng.random() < keep_ratio]
  rng.shuffle(kept)
  return SEPARATOR.join(kept) + END


def inference_control_words(tags: Iterable[str]) -> str:
  """Predicted tags -> control string: deduplicated and SORTED (the original's set order is
  hash-randomised, hence non-deterministic), joined by ",", plus "|"."""
  return SEPARATOR.join(sorted(set(tags))) + END


def control_words_from_scores(scores: np.ndarray, tag_names: Sequence[str],
                              threshold: float) -> list[str]:
  """scores: float[B, K] tag probabilities (after sigmoid) -> B control strings of the tags with
  score > threshold (strictly greater, as the original's `> tag_thr`)."""
  scores = np.asarray(scores)
  return [inference_control_words(tag_names[k] for k in np.flatnonzero(row > threshold))
          for row in scores]


def build_encoder_inputs(projected: jax.Array, control_embeds: jax.Array,
                         control_mask: jax.Array, cem_memory: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """The LLM encoder input: [projected queries ; control embeddings + cem_memory].

  projected: float[B, Q, d] (t5_proj of the Q-Former output); control_embeds: float[B, Lc, d]
  (T5 input embeddings of the control tokens); control_mask: bool[B, Lc]; cem_memory: float[d]
  (added to every control token, padded ones included: they are masked anyway).
  Returns (float[B, Q + Lc, d], bool[B, Q + Lc]) with mask [ones ; control_mask].
  """
  dtype = jnp.promote_types(projected.dtype, control_embeds.dtype)
  control = control_embeds.astype(dtype) + cem_memory.astype(dtype)
  x = jnp.concatenate([projected.astype(dtype), control], axis=1)
  ones = jnp.ones(projected.shape[:2], bool)
  return x, jnp.concatenate([ones, control_mask.astype(bool)], axis=1)
