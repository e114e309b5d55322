"""Region-caption metrics vs pycocoevalcap's scorers called directly; registry and gather."""

import numpy as np
import pytest

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from dynrefer_jax import evaluators
from dynrefer_jax.evaluators import common
from dynrefer_jax.evaluators import region_caption

GTS = {1: ["A man riding a brown horse.", "a person on a horse"],
       2: ["The red double-decker bus, parked!"],
       3: ["two dogs playing in the snow", "Dogs in snow."]}
RES = {1: "A man on a brown horse", 2: "a red bus parked on the street", 3: "a cat, sleeping"}
LONG = {1: "a man in a blue shirt is riding a brown horse on the beach",
        2: "two small dogs are playing with a red ball in the snow"}


@pytest.fixture(scope="module")
def meteor():
  # One METEOR JVM for the whole file: each start loads a 2 GB paraphrase table.
  scorer = Meteor()
  yield scorer
  common._close_meteor(scorer)  # pylint: disable=protected-access


def _reference(gts, res, meteor):
  """COCOEvalCap's steps, straight from pycocoevalcap (no SPICE)."""
  tok = PTBTokenizer()
  g = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
  r = tok.tokenize({k: [{"caption": v}] for k, v in res.items()})
  m, _ = meteor.compute_score(g, r)
  return {"BLEU-4": 100 * Bleu(4).compute_score(g, r)[0][3], "METEOR": 100 * m,
          "ROUGE-L": 100 * Rouge().compute_score(g, r)[0],
          "CIDEr": 100 * Cider().compute_score(g, r)[0]}


def test_matches_pycocoevalcap_and_identical_long_captions_score_perfect(meteor):
  out = region_caption.caption_metrics(GTS, RES, meteor=meteor)
  ref = _reference(GTS, RES, meteor)
  assert out == pytest.approx(ref, abs=1e-9)
  assert 0 < out["METEOR"] < 100 and out["CIDEr"] > 0

  same = region_caption.caption_metrics({k: [v] for k, v in LONG.items()}, LONG, meteor=meteor)
  assert same["BLEU-4"] == pytest.approx(100.0, abs=1e-4)
  assert same["METEOR"] == pytest.approx(100.0, abs=1e-6)
  assert same["ROUGE-L"] == pytest.approx(100.0, abs=1e-6)
  # CIDEr-D: each candidate equals its only reference, so every n-gram cosine is 1 and the
  # length penalty is 1: 10 per image (n-grams the two images share get IDF 0 in both vectors).
  assert same["CIDEr"] == pytest.approx(1000.0, abs=1e-6)


def test_id_mismatch_is_an_error():
  with pytest.raises(ValueError, match="ids differ"):
    region_caption.caption_metrics({1: ["a"], 2: ["b"]}, {1: "a"})


def test_evaluator_keys_by_image_id_and_drops_padding(monkeypatch):
  seen = {}

  def fake_metrics(gts, res):
    seen.update(gts=gts, res=res)
    return {"METEOR": 1.0}

  monkeypatch.setattr(region_caption, "caption_metrics", fake_metrics)
  batches = [{"mask": np.array([True, False]), "image_id": np.array([7, 0]),
              "region_id": np.array([70, 0]), "captions": [["ref seven"], ["pad"]]},
             {"mask": np.array([True]), "image_id": np.array([8]), "region_id": np.array([80]),
              "captions": [["ref eight", "another"]]}]
  predict_fn = lambda params, b: {"caption": [f"pred {i}" for i in b["image_id"]]}
  out = list(evaluators.get("region_caption")(predict_fn, batches).run(None))
  assert out == [("METEOR", 1.0)]
  assert seen == {"gts": {7: ["ref seven"], 8: ["ref eight", "another"]},
                  "res": {7: "pred 7", 8: "pred 8"}}

  twice = [{"mask": np.array([True, True]), "image_id": np.array([7, 7]),
            "region_id": np.array([1, 2]), "captions": [["a"], ["b"]]}]
  with pytest.raises(ValueError, match="more than one region"):
    list(region_caption.RegionCaptionEvaluator(predict_fn, twice).run(None))


def test_registry():
  assert {"region_caption", "dense_caption", "attributes", "recognition"} <= set(
      common.registered_names())
  with pytest.raises(ValueError, match="already registered"):
    common.register("dense_caption")(type("Dup", (common.Evaluator,), {}))
  with pytest.raises(KeyError, match="valid names: .*dense_caption"):
    common.get("densecap")


def test_gather_objects_pads_and_unpickles():
  # A stand-in for process_allgather with two processes holding the same buffer.
  fake_allgather = lambda x: np.stack([x, x])
  obj = [(1, "a caption", np.arange(3.0))]
  got = common.gather_objects(obj, allgather=fake_allgather)
  assert len(got) == 2
  for part in got:
    assert part[0][:2] == (1, "a caption")
    np.testing.assert_array_equal(part[0][2], np.arange(3.0))
  assert common.gather_objects(obj) == [obj]  # single process: unchanged
