"""Control words (the ControlCap mechanism, SPEC §7c) as strings: candidates, the training draw,
and the inference string. Tokenised whole by the LM tokenizer (data/captions.tokenize), in
training (data/pipeline.py) and inference (inference.py) alike.

A control string is comma-joined words followed by "|" ("man,white shirt|", or just "|").
Training candidates are the region's tag sets (tag_set1 ∪ tag_set2) and the caption's
noun/adjective-led phrases, found as the original finds them with TextBlob POS tags.

POS tagger: the original calls `TextBlob(caption).tags`, TextBlob's default NLTK averaged-
perceptron tagger, whose data (and the punkt sentence splitter's) NLTK downloads at run time;
no package on the registry ships it. TextBlob's PatternTagger tags with the Penn Treebank tag
set from a lexicon that ships inside the textblob wheel, so it runs with nothing downloaded; the
phrase rule on top of the tags is the original's (docs/SPEC_NOTES.md, "Control-word phrases").
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import numpy as np

SEPARATOR = ","
END = "|"


@functools.lru_cache(maxsize=None)
def _tagger():
  from textblob.taggers import PatternTagger  # pylint: disable=import-outside-toplevel
  tagger = PatternTagger()
  tagger.tag("a warm up")  # loads the lexicon now, not in several pipeline threads at once
  return tagger


def pos_tags(caption: str) -> list[tuple[str, str]]:
  """(word, Penn Treebank tag) of `caption`, punctuation dropped (TextBlob's `.tags`)."""
  from textblob import Sentence  # pylint: disable=import-outside-toplevel
  return [(str(w), str(t)) for w, t in Sentence(caption, pos_tagger=_tagger()).tags]


def caption_phrases(caption: str) -> list[str]:
  """The caption's candidate phrases by the original's rule (`parse_sentence`): every NN*/JJ*
  word starts a phrase at its FIRST occurrence in the caption, extended while the following
  words are among the caption's nouns ("a white baseball cap" → "white baseball cap",
  "baseball cap", "cap"). A caption without such a word gives [""], as the original's does
  (the empty candidate then joins control strings as an empty word: ",man|")."""
  return list(_caption_phrases(caption))


@functools.lru_cache(maxsize=1 << 18)
def _caption_phrases(caption: str) -> tuple[str, ...]:
  # Cached: the training pipeline asks for every row's phrases each epoch, and tagging is the
  # costly part of drawing control words (~0.1 ms a caption).
  tags = pos_tags(caption)
  tokens = [w for w, _ in tags]
  nouns = {w for w, t in tags if "NN" in t}
  infowords = [w for w, t in tags if "NN" in t or "JJ" in t]
  if not infowords:
    return ("",)
  out = []
  for word in infowords:
    start = tokens.index(word)
    end = start + 1
    while end < len(tokens) and tokens[end] in nouns:
      end += 1
    out.append(" ".join(tokens[start:end]))
  return tuple(out)


def candidate_words(*word_sets: Iterable[str]) -> list[str]:
  """Union of candidate words (tag sets, phrases), deduplicated and SORTED.

  The original deduplicates through a Python set (hash order, different in every process);
  sorting first makes the random draw depend only on the RNG."""
  return sorted({w for ws in word_sets for w in ws})


def training_control_words(words: Sequence[str], rng: np.random.Generator, *,
                           full_drop_ratio: float = 0.5, keep_ratio: float = 0.5) -> str:
  """The original's training-time draw.

  With probability `full_drop_ratio` the string is empty ("|"); otherwise each word is kept
  independently with probability `keep_ratio`, the kept words are shuffled, joined by "," and
  "|" is appended. Draw order: one uniform for the full drop, then one per word, then a shuffle.
  """
  if rng.random() < full_drop_ratio:
    return END
  kept = [w for w, u in zip(words, rng.random(len(words))) if u < keep_ratio]
  rng.shuffle(kept)
  return SEPARATOR.join(kept) + END


def inference_control_words(tags: Iterable[str]) -> str:
  """Predicted tags -> control string: deduplicated and SORTED (the original's set order is
  hash-randomised, hence non-deterministic), joined by ",", plus "|"."""
  return SEPARATOR.join(sorted(set(tags))) + END
