"""OVAD attribute mAP (vs hand values and sklearn) and the attribute templates of SPEC §7b."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dynrefer_jax.evaluators import attributes
from dynrefer_jax.models import heads

# The reference implementation (test-only dependency: requirements-test.txt).
from sklearn import metrics as sklearn_metrics  # pylint: disable=g-import-not-at-top


def test_average_precision_by_hand():
  # Ranked 1 0 1 0: precision 1 at recall 1/2, 2/3 at recall 1.
  assert attributes.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(
      0.5 * 1 + 0.5 * 2 / 3)
  # Tied scores enter together: one threshold, precision 1/2, recall 1.
  assert attributes.average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
  # Ranked 0 1 [1 0 tied]: P(1/2 recall) = 1/2, P(all) = 2/4.
  assert attributes.average_precision([0, 1, 1, 0], [0.9, 0.8, 0.3, 0.3]) == pytest.approx(
      0.5 * 0.5 + 0.5 * 0.5)
  assert np.isnan(attributes.average_precision([0, 0, 0], [0.1, 0.2, 0.3]))


def test_average_precision_matches_sklearn_with_ties():
  rng = np.random.default_rng(0)
  for n in (5, 17, 200):
    y = rng.integers(0, 2, n)
    y[0] = 1
    s = np.round(rng.random(n), 1)  # rounding makes many ties
    assert attributes.average_precision(y, s) == pytest.approx(
        sklearn_metrics.average_precision_score(y, s), abs=1e-12)


def test_attribute_ap_ignores_unlabelled_and_gives_nan_without_positive():
  labels = np.array([[1, 0, -1],
                     [-1, 0, 1],
                     [0, -1, 0],
                     [1, 0, -1],
                     [0, 0, 0]])
  scores = np.array([[0.9, 0.8, 0.1],
                     [0.95, 0.2, 0.4],
                     [0.7, 0.9, 0.6],
                     [0.3, 0.1, 0.99],
                     [0.6, 0.5, 0.2]])
  aps = attributes.attribute_ap(labels, scores)
  # Attribute 0, labelled rows 0,2,3,4: ranked .9(1) .7(0) .6(0) .3(1) -> 1/2*1 + 1/2*2/4.
  assert aps[0] == pytest.approx(0.5 + 0.25)
  # Attribute 1 has no positive: NaN (the 0.95-scored -1 of attribute 0 was not counted).
  assert np.isnan(aps[1])
  # Attribute 2, labelled rows 1,2,4: ranked .6(0) .4(1) .2(0) -> 1 * 1/2.
  assert aps[2] == pytest.approx(0.5)
  for a in (0, 2):
    keep = labels[:, a] >= 0
    assert aps[a] == pytest.approx(
        sklearn_metrics.average_precision_score(labels[keep, a], scores[keep, a]))

  out = attributes.attribute_metrics(labels, scores, ["head", "tail", "tail"])
  assert out["ap/all"] == pytest.approx(100 * (0.75 + 0.5) / 2)
  assert out["ap/head"] == pytest.approx(75.0)
  assert out["ap/tail"] == pytest.approx(50.0)
  only_nan = attributes.attribute_metrics(labels, scores, ["head", "medium", "tail"])
  assert np.isnan(only_nan["ap/medium"])


def test_templates_toy_vocabulary_counted_by_hand():
  vocab = [
      {"name": "color:black", "is_has_att": "is"},                    # 1 syn  -> 2
      {"name": "skin tone:light/dark", "is_has_att": "has"},          # 2 syns -> 4
      {"name": "hair length:long", "is_has_att": "has"},              # 1 syn  -> 2
      {"name": "maturity:young/baby", "is_has_att": "is"},            # 2+6    -> 16
      {"name": "maturity:adult/old/aged", "is_has_att": "is"},        # 3+2    -> 10
  ]
  templates, owner = attributes.ovad_templates(vocab)
  assert len(templates) == 2 + 4 + 2 + 16 + 10
  assert owner.tolist() == [0] * 2 + [1] * 4 + [2] * 2 + [3] * 16 + [4] * 10
  assert templates[:8] == ["the black", "the  is black",
                           "the light skin", "the  has light skin",
                           "the dark skin", "the  has dark skin",
                           "the long hair length", "the  has long hair length"]
  young = templates[8:24]
  assert young[::2] == ["the young", "the baby", "the kid", "the kids", "the child",
                        "the toddler", "the boy", "the girl"]
  assert templates[24:][::2] == ["the adult", "the old", "the aged", "the teen", "the elder"]
  assert templates[-1] == "the  is elder"


def test_attribute_scores_max_over_templates():
  owner = np.array([0, 0, 1, 1, 1, 2, 2])
  scores = np.array([[0.1, 0.7, 0.2, 0.9, 0.3, 0.5, 0.4],
                     [0.8, 0.6, 0.1, 0.1, 0.2, 0.0, 0.3]])
  # The function DynRefer.predict_heads scores attributes with (jitted there, static owner).
  out = jax.jit(lambda x: heads.max_over_templates(x, owner))(jnp.asarray(scores, jnp.float32))
  np.testing.assert_allclose(out, [[0.7, 0.9, 0.5], [0.8, 0.2, 0.3]], rtol=1e-7)
  # An attribute no template scores gets -inf.
  gap = heads.max_over_templates(jnp.asarray(scores[:, :2], jnp.float32), np.array([0, 2]))
  np.testing.assert_allclose(np.asarray(gap), [[0.1, -np.inf, 0.7], [0.8, -np.inf, 0.6]],
                             rtol=1e-7)


def test_evaluator_drops_padding_and_uses_freq_set():
  vocab = [{"name": "color:black", "is_has_att": "is", "freq_set": "head"},
           {"name": "color:white", "is_has_att": "is", "freq_set": "tail"}]
  labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
  scores = np.array([[0.9, 0.2], [0.4, 0.6], [0.3, 0.1], [0.5, 0.7]])
  batches = [
      {"mask": np.array([True, True, False]), "attributes": np.r_[labels[:2], [[1, 1]]],
       "image_id": np.arange(3), "region_id": np.arange(3), "_scores": np.r_[scores[:2], [[0, 0]]]},
      {"mask": np.array([True, True]), "attributes": labels[2:], "image_id": np.arange(2),
       "region_id": np.arange(2), "_scores": scores[2:]},
  ]
  ev = attributes.AttributesEvaluator(lambda p, b: {"attribute_scores": b["_scores"]},
                                      lambda: iter(batches), attributes=vocab)
  out = dict(ev.run(None))
  # black: ranked .9(1) .5(0) .4(0) .3(1) -> 1/2 + 1/2 * 2/4 = 0.75.
  # white: ranked .7(0) .6(1) .2(0) .1(1) -> 1/2 * 1/2 + 1/2 * 2/4 = 0.5.
  # (With the padding row [1, 1] at score 0 counted, both would change.)
  assert out == pytest.approx({"ap/all": 62.5, "ap/head": 75.0, "ap/tail": 50.0})
