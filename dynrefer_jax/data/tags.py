"""Rule-based tag parser: caption -> (tag_set1, tag_set2), SPEC §7a, without spaCy or NLTK.

The original derived tag sets from SceneGraphParser (spaCy) scene graphs; its parser file is
empty and spaCy models cannot be downloaded here, so this is a small deterministic stand-in for
the short region phrases of VG / RefCOCOg / the synthetic world:

1. Lower-case, drop punctuation and possessive "'s", split into words.
2. Cut the phrase at relation words (prepositions, relation verbs, multi-word relations such as
   "left of", "in front of", "sitting on"; longest match first). Each piece is an entity (noun
   phrase); "and" and "," separate entities inside a piece.
   Consecutive relation words form one relation ("flying in"); a copula before a relation is
   dropped ("is on" -> "on").
3. Entities before the first relation are subjects; entities after a relation are relation
   objects. A piece after a copula ("is", "are") without a determiner is an adjective complement:
   its words become modifiers of the previous entity.
4. Per entity (determiners removed): the head is the last word (English noun phrases are
   head-final); add the head, every suffix of the lemma span ("white shirt" -> "shirt", "white
   shirt"), every suffix of the surface span (for plural entries such as "French fries") and
   every modifier word.
5. tag_set1 = subject entity strings; tag_set2 = relation strings + relation-object strings.
6. Keep only strings in the vocabulary (case-insensitive), de-duplicated, in first-seen order.

Known limits (against spaCy): no POS tagging, so a noun phrase ending in a participle or an
adjective ("the sky blue") takes that word as head; a second clause's subject after a relation
("a man riding a horse and a dog running") is counted as a relation object.
"""

from __future__ import annotations

import re
from typing import Sequence

DETERMINERS = frozenset(
    "a an the this that these those some any each every another his her its their my our your"
    .split())
COPULAS = frozenset("is are was were be being been".split())
CONJUNCTIONS = frozenset("and ,".split())
# Multi-word relations first (matched longest first), then single words.
MULTI_RELATIONS = (
    "in front of", "on top of", "to the left of", "to the right of", "on the left of",
    "on the right of", "left of", "right of", "next to", "close to", "in the middle of",
    "on the side of", "part of", "made of", "full of", "covered in", "covered with",
    "sitting on", "sitting in", "standing on", "standing in", "lying on", "laying on",
    "hanging on", "hanging from", "parked on", "looking at", "walking on", "attached to",
    "leaning on", "leaning against", "filled with", "on side of",
)
RELATION_WORDS = frozenset("""
on in of with near above below under behind beside by at over inside from into onto against
along between beneath underneath across around through atop without for beyond outside
holding wearing riding has have having carrying eating sitting standing walking playing
hanging lying laying parked covered filled watching looking throwing catching pulling
pushing using crossing flying swinging reading talking touching drinking
""".split())
# Relations written with extra words in some captions, normalised to their short form.
_RELATION_ALIASES = {"to the left of": "left of", "to the right of": "right of",
                     "on the left of": "left of", "on the right of": "right of"}

_IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child",
              "feet": "foot", "teeth": "tooth", "mice": "mouse", "geese": "goose",
              "knives": "knife", "leaves": "leaf", "shelves": "shelf", "wolves": "wolf",
              "halves": "half", "loaves": "loaf", "calves": "calf", "scarves": "scarf",
              "oxen": "ox", "dice": "die", "glasses": "glasses", "pants": "pants",
              "jeans": "jeans", "shorts": "shorts", "scissors": "scissors", "skis": "ski",
              "bus": "bus", "buses": "bus", "grass": "grass", "glass": "glass", "dress": "dress",
              "species": "species", "series": "series", "news": "news", "clothes": "clothes"}


def lemmatize(word: str) -> str:
  """Singular of an English noun by suffix rules (enough for tag matching)."""
  if word in _IRREGULAR:
    return _IRREGULAR[word]
  if len(word) <= 3 or word.endswith(("ss", "us", "is", "ous")):
    return word
  if word.endswith("ies") and len(word) > 4:
    return word[:-3] + "y"
  if word.endswith(("ches", "shes", "xes", "zes", "sses", "oes")):
    return word[:-2]
  if word.endswith("s"):
    return word[:-1]
  return word


def _words(caption: str) -> list[str]:
  text = caption.lower().replace("'s ", " ").replace("’s ", " ")
  return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|,", text)


def _segment(words: list[str]) -> list[tuple[str, list[str]]]:
  """Splits words into ("", subject piece) then (relation, piece) pairs; "=" marks a copula."""
  multi = sorted((m.split() for m in MULTI_RELATIONS), key=len, reverse=True)
  pieces: list[tuple[str, list[str]]] = [("", [])]

  def add_relation(rel):
    prev_rel, prev_words = pieces[-1]
    if prev_rel == "=" and not prev_words:      # "is on" -> "on"
      pieces[-1] = (rel, [])
    elif prev_rel and not prev_words:           # "flying in" -> one relation
      pieces[-1] = (f"{prev_rel} {rel}", [])
    else:
      pieces.append((rel, []))

  i = 0
  while i < len(words):
    match = next((m for m in multi if words[i:i + len(m)] == m), None)
    if match is not None:
      rel = " ".join(match)
      add_relation(_RELATION_ALIASES.get(rel, rel))
      i += len(match)
    elif words[i] in RELATION_WORDS:
      add_relation(words[i])
      i += 1
    elif words[i] in COPULAS:
      pieces.append(("=", []))
      i += 1
    else:
      pieces[-1][1].append(words[i])
      i += 1
  return pieces


def _entities(piece: list[str]) -> list[list[str]]:
  """Noun phrases of a piece, split at "and" / ","."""
  out, cur = [], []
  for w in piece + ["and"]:
    if w in CONJUNCTIONS:
      if cur:
        out.append(cur)
      cur = []
    else:
      cur.append(w)
  return out


def _entity_strings(words: list[str]) -> list[str]:
  """Head, suffixes of the lemma span, and modifiers of one noun phrase."""
  words = [w for w in words if w not in DETERMINERS]
  if not words:
    return []
  head = words[-1]
  lemma_span = words[:-1] + [lemmatize(head)]
  out = [head]
  out += [" ".join(lemma_span[i:]) for i in range(len(lemma_span) - 1, -1, -1)]
  # Surface-form suffixes too: vocabulary entries that are plural ("French fries").
  out += [" ".join(words[i:]) for i in range(len(words) - 2, -1, -1)]
  out += words[:-1]
  return out


def parse(caption: str) -> tuple[list[str], list[str]]:
  """Unfiltered (tag_set1, tag_set2) strings of `caption` (see the module docstring)."""
  set1: list[str] = []
  set2: list[str] = []
  last_entity_target = set1
  for relation, piece in _segment(_words(caption)):
    if relation == "=":
      # "the car is red": modifiers of the previous entity, unless a new noun phrase follows.
      if piece and piece[0] not in DETERMINERS:
        last_entity_target.extend(w for w in piece if w not in CONJUNCTIONS)
        continue
      target = last_entity_target
    elif relation:
      set2.append(relation)
      target = set2
    else:
      target = set1
    for entity in _entities(piece):
      target.extend(_entity_strings(entity))
    last_entity_target = target
  return set1, set2


class TagParser:
  """Parses captions into tag sets restricted to a vocabulary.

  vocabulary: the tag strings in index order (e.g. `load_vocabulary(ram_tag_list.txt)` or the
  synthetic world's `meta["tags"]`). Matching ignores case; results use the vocabulary's own
  spelling.
  """

  def __init__(self, vocabulary: Sequence[str]):
    self.vocabulary = list(vocabulary)
    self.index = {}
    for i, tag in enumerate(self.vocabulary):
      self.index.setdefault(tag.lower(), i)

  def _keep(self, strings: list[str]) -> list[str]:
    seen, out = set(), []
    for s in strings:
      i = self.index.get(s)
      if i is not None and i not in seen:
        seen.add(i)
        out.append(self.vocabulary[i])
    return out

  def tag_sets(self, caption: str) -> tuple[list[str], list[str]]:
    """(tag_set1, tag_set2) as vocabulary strings."""
    set1, set2 = parse(caption)
    return self._keep(set1), self._keep(set2)

  def tag_ids(self, caption: str) -> tuple[list[int], list[int]]:
    """(tag_set1, tag_set2) as 0-based vocabulary indices."""
    set1, set2 = self.tag_sets(caption)
    return ([self.index[t.lower()] for t in set1], [self.index[t.lower()] for t in set2])


def load_vocabulary(path: str) -> list[str]:
  """A tag list file, one tag per line (index = 0-based line number). Lines are stripped and keep
  their case; a missing trailing newline does not lose the last tag and a present one does not
  add an empty tag (the RAM list has none, DATA_FORMATS §6.1)."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line.strip() for line in lines]
