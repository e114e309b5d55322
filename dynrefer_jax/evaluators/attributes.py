"""OVAD box-given attribute detection: templates (SPEC §7b) and per-attribute mAP (SPEC §11).

The metric is the OVAD benchmark's (DynRefer's `ovad/ovad_evaluator.py`): per attribute,
average precision over the boxes labelled 0 or 1 (label -1 is ignored), NaN when no box is
labelled positive; "ap/all" is the NaN-mean over attributes, and "ap/head", "ap/medium",
"ap/tail" the NaN-means over the attributes of each frequency group; all x100.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynrefer_jax.evaluators import common

# The maturity attributes get extra synonyms in the original (`build_att_embeds`).
_EXTRA_SYNONYMS = {"young/baby": "/kid/kids/child/toddler/boy/girl",
                   "adult/old/aged": "/teen/elder"}


def ovad_templates(attributes: Sequence[Mapping[str, Any]]) -> tuple[list[str], np.ndarray]:
  """The text prompts of the region-text head for OVAD's attributes (SPEC §7b).

  The original fills the "the" prompt family with an empty noun and strips the result, which
  leaves the double space of "the  has ..." / "the  is ...": the text tower saw exactly these
  strings, so they are kept.

  Args:
    attributes: OVAD `attributes` records, in order; reads "name" ("type:syn1/syn2/...") and
      "is_has_att" ("is" or "has").

  Returns:
    (templates, template_to_attribute): T strings and int[T], the attribute index of each
    template. The 117 OVAD attributes give T = 474.
  """
  templates, owner = [], []
  for index, att in enumerate(attributes):
    att_type, synonyms = att["name"].split(":")
    synonyms += _EXTRA_SYNONYMS.get(synonyms, "")
    # Only " tone" is dropped from the type ("skin tone" -> "skin"), as in the original.
    dobj = att_type.replace(" tone", "")
    kind = att["is_has_att"]
    for syn in synonyms.split("/"):
      if kind == "has":
        pair = (f"the {syn} {dobj}", f"the  has {syn} {dobj}")
      elif kind == "is":
        pair = (f"the {syn}", f"the  is {syn}")
      else:
        raise ValueError(f"attribute {att['name']!r}: is_has_att must be 'is' or 'has', "
                         f"got {kind!r}")
      templates.extend(pair)
      owner.extend([index, index])
  return templates, np.asarray(owner, np.int32)


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
  """AP as `sklearn.metrics.average_precision_score` (binary): sum_k (R_k - R_{k-1}) P_k.

  Thresholds are the distinct scores in descending order, so tied scores enter together.

  Args:
    y_true: {0, 1}[N].
    y_score: float[N].

  Returns:
    AP in [0, 1]; NaN when there is no positive.
  """
  y_true = np.asarray(y_true).reshape(-1) == 1
  y_score = np.asarray(y_score, np.float64).reshape(-1)
  if not y_true.any():
    return float("nan")
  order = np.argsort(-y_score, kind="mergesort")
  y_score, y_true = y_score[order], y_true[order]
  # Last index of each run of equal scores.
  ends = np.r_[np.nonzero(np.diff(y_score))[0], y_true.size - 1]
  tps = np.cumsum(y_true)[ends]
  precision = tps / (ends + 1)
  recall = tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def attribute_ap(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Per-attribute AP over the instances labelled 0/1.

  Args:
    labels: int[N, A] in {1, 0, -1}; -1 = not labelled (ignored).
    scores: float[N, A]; clipped to [0, 1] as the OVAD evaluator does.

  Returns:
    float[A]; NaN for attributes without a positive label.
  """
  labels = np.asarray(labels)
  scores = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
  aps = np.full(labels.shape[1], np.nan)
  for a in range(labels.shape[1]):
    labelled = (labels[:, a] == 0) | (labels[:, a] == 1)
    aps[a] = average_precision(labels[labelled, a], scores[labelled, a])
  return aps


def _nanmean(x: np.ndarray) -> float:
  return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def attribute_metrics(labels: np.ndarray, scores: np.ndarray,
                      freq_groups: Sequence[str] | None = None) -> dict[str, float]:
  """OVAD mAP ("ap/all") and, given each attribute's frequency group, "ap/<group>"; x100.

  Args:
    labels: int[N, A] in {1, 0, -1}.
    scores: float[N, A].
    freq_groups: A group names (OVAD `freq_set`: "head", "medium", "tail").

  Returns:
    {"ap/all": ..., "ap/head": ..., ...}; NaN for a group whose attributes all lack positives.
  """
  aps = attribute_ap(labels, scores)
  out = {"ap/all": 100 * _nanmean(aps)}
  if freq_groups is not None:
    freq_groups = np.asarray(freq_groups)
    if freq_groups.shape != aps.shape:
      raise ValueError(f"{freq_groups.shape[0]} frequency groups for {aps.size} attributes")
    for group in dict.fromkeys(freq_groups):  # first-seen order
      out[f"ap/{group}"] = 100 * _nanmean(aps[freq_groups == group])
  return out


@common.register("attributes")
class AttributesEvaluator(common.Evaluator):
  """Box-given OVAD attribute mAP.

  Reads batch "attributes" int[B, A] and preds "attribute_scores" float[B, A]. Config:
  `freq_groups` (A strings) or `attributes` (the OVAD records, whose "freq_set" is used) for the
  head/medium/tail breakdown.
  """

  def rows(self, batch, preds, keep):
    return list(zip(common.take(batch["attributes"], keep),
                    common.take(preds["attribute_scores"], keep)))

  def metrics(self, rows):
    labels = np.stack([np.asarray(l) for l, _ in rows])
    scores = np.stack([np.asarray(s, np.float64) for _, s in rows])
    groups = self.cfg.get("freq_groups")
    if groups is None and self.cfg.get("attributes") is not None:
      groups = [a["freq_set"] for a in self.cfg["attributes"]]
    return attribute_metrics(labels, scores, groups)
