"""DenseCap mAP: merging, matching and the 30 APs of a 3-image case worked out by hand."""

import numpy as np
import pytest

from dynrefer_jax.evaluators import common
from dynrefer_jax.evaluators import dense_caption

IOUS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEORS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


def _hand_ap(flags, npos):
  """AP by the definition: mean over t = k/100, k < 100, of max precision at recall >= t.

  Plain Python with exact fractions; the fixtures use npos = 7 or 3, so no recall value
  k/npos lies on a threshold and float rounding cannot move a point.
  """
  tp = fp = 0
  points = []
  for f in flags:
    tp += f
    fp += 1 - f
    points.append((tp / npos, tp / (tp + fp)))
  total = 0.0
  for k in range(100):
    t = k / 100
    total += max([p for r, p in points if r >= t], default=0.0)
  return total / 100


def test_merge_boxes_greedy_by_neighbour_count():
  # A~B and B~C overlap >= 0.7, A and C do not: B has the most neighbours and takes all three.
  a = [0, 0, 10, 10]
  b = [0, 0, 10, 12]   # IoU(A,B) = 100/120 = 0.833
  c = [0, 0, 10, 14.5]  # IoU(B,C) = 120/145 = 0.828, IoU(A,C) = 100/145 = 0.690
  d = [50, 50, 60, 60]
  groups = dense_caption.merge_boxes(np.array([a, b, c, d], float))
  assert [sorted(g.tolist()) for g in groups] == [[0, 1, 2], [3]]


def test_match_image_mean_box_pooled_references_and_first_come():
  gt = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30]], float)
  refs = [["a red car"], ["red car parked"], ["a tall tree"]]
  boxes = np.array([[0, 0, 10, 11], [0, 0, 10, 10], [40, 40, 50, 50]], float)
  records, npos = dense_caption.match_image(np.array([0.8, 0.9, 0.1]), boxes, gt, refs)
  assert npos == 2
  # Highest score first: prediction 1 takes the merged box [0, 0, 10, 10.5].
  assert [r["index"] for r in records] == [1, 0, 2]
  assert records[0]["ok"] and records[0]["iou"] == pytest.approx(100 / 105)
  assert records[0]["references"] == ["a red car", "red car parked"]
  assert not records[1]["ok"] and records[1]["iou"] == pytest.approx(105 / 110)
  assert not records[2]["ok"] and records[2]["iou"] == 0 and records[2]["references"] == []


# Three images; predicted boxes differ from the ground truth so that IoUs spread over the
# thresholds. Merged ground truth: A has {a1, a2} (IoU 0.909) and a3; B has b1; C has c1..c4.
# npos = 2 + 1 + 4 = 7.
IMAGES = [
    {"gt_boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30]], float),
     "gt_captions": [["ref a1"], ["ref a2"], ["ref a3"]],
     "boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 35]], float),
     "scores": np.array([0.9, 0.8, 0.6]),
     "captions": ["cA1", "cA2", "cA3"]},
    {"gt_boxes": np.array([[0, 0, 20, 20]], float),
     "gt_captions": [["ref b1"]],
     "boxes": np.array([[0, 0, 20, 10], [50, 50, 60, 60]], float),
     "scores": np.array([0.7, 0.5]),
     "captions": ["cB1", "cB2"]},
    {"gt_boxes": np.array([[0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210],
                           [300, 300, 310, 310]], float),
     "gt_captions": [["ref c1"], ["ref c2"], ["ref c3"], ["ref c4"]],
     "boxes": np.array([[0, 0, 10, 10], [100, 100, 110, 130]], float),
     "scores": np.array([0.4, 0.2]),
     "captions": ["cC1", "cC2"]},
]
FAKE_METEOR = {"cA1": 0.30, "cB1": 0.07, "cA3": 0.12, "cC1": 0.22, "cC2": 0.03}
# By hand, in global score order: (IoU with the best merged box, took it first, METEOR).
#   cA1 0.9: [0,0,10,10] vs mean box [0,0,10,10.5]         -> 100/105, yes, 0.30
#   cA2 0.8: same merged box, already taken                 -> 105/110, no
#   cB1 0.7: [0,0,20,10] vs [0,0,20,20]                     -> 200/400, yes, 0.07
#   cA3 0.6: [20,20,30,35] vs [20,20,30,30]                 -> 100/150, yes, 0.12
#   cB2 0.5: no overlap                                     -> 0, no
#   cC1 0.4: identical                                      -> 1, yes, 0.22
#   cC2 0.2: [100,100,110,130] vs [100,100,110,110]         -> 100/300, yes, 0.03
HAND = [(100 / 105, True, 0.30), (105 / 110, False, None), (0.5, True, 0.07),
        (100 / 150, True, 0.12), (0.0, False, None), (1.0, True, 0.22), (100 / 300, True, 0.03)]
NPOS = 7


def _fake_meteor(calls):
  def fn(pairs):
    calls.append(pairs)
    return [FAKE_METEOR[c] for c, _ in pairs]
  return fn


def test_thirty_aps_by_hand():
  calls = []
  out = dense_caption.dense_caption_metrics(IMAGES, meteor_fn=_fake_meteor(calls))

  # METEOR is asked once, only for the predictions that took a box, with pooled references.
  assert len(calls) == 1
  assert sorted(calls[0]) == sorted([("cA1", ["ref a1", "ref a2"]), ("cA3", ["ref a3"]),
                                     ("cB1", ["ref b1"]), ("cC1", ["ref c1"]),
                                     ("cC2", ["ref c2"])])

  aps = []
  for u in IOUS:
    for m in METEORS:
      flags = [int(ok and iou >= u and met > m) for iou, ok, met in HAND]
      ap = _hand_ap(flags, NPOS)
      aps.append(ap)
      assert out[f"ap/iou{u}_meteor{m}"] == pytest.approx(100 * ap, abs=1e-4), (u, m)
    det = _hand_ap([int(ok and iou >= u) for iou, ok, _ in HAND], NPOS)
    assert out[f"det_ap/iou{u}"] == pytest.approx(100 * det, abs=1e-4), u
  assert out["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-4)
  assert len([k for k in out if k.startswith("ap/")]) == 30

  # A few fully by hand (points per recall level k/7 for t = 0..0.99: 15, 14, 14, 15, 14, 14, 14).
  # det @0.3: flags 1011011, precisions 1,.5,.667,.75,.6,.667,.714.
  assert out["det_ap/iou0.3"] == pytest.approx(100 * (15 + 28 * 0.75 + 29 * 5 / 7) / 100,
                                               abs=1e-4)
  # IoU 0.7, METEOR > 0.25: only cA1 -> 15 points at precision 1.
  assert out["ap/iou0.7_meteor0.25"] == pytest.approx(15.0, abs=1e-4)
  # IoU 0.7, METEOR > 0.2: cA1 (rank 1) and cC1 (rank 6, precision 2/6).
  assert out["ap/iou0.7_meteor0.2"] == pytest.approx(15 + 14 / 3, abs=1e-4)
  # IoU 0.3, METEOR > 0: every taken box: same as detection at 0.3.
  assert out["ap/iou0.3_meteor0.0"] == pytest.approx(out["det_ap/iou0.3"], abs=1e-6)


def test_ap_zero_without_ground_truth_or_predictions():
  assert dense_caption.interpolated_ap(np.array([], bool), 5) == 0.0
  assert dense_caption.interpolated_ap(np.array([False, False]), 0) == 0.0


def test_evaluator_gt_boxes_real_meteor_one_java_process(monkeypatch):
  from pycocoevalcap.meteor.meteor import Meteor

  started = []
  original_init = Meteor.__init__

  def counting_init(self, *a, **k):
    started.append(1)
    original_init(self, *a, **k)

  monkeypatch.setattr(Meteor, "__init__", counting_init)
  common.close_shared_meteor()  # start from no METEOR process, whatever ran before

  # Ground-truth-box setting: each row is a GT region and its prediction on that box.
  batches = [
      {"mask": np.array([True, True, True]),
       "image_id": np.array([1, 1, 2]), "region_id": np.array([11, 12, 21]),
       "box": np.array([[0, 0, 10, 10], [0, 0, 10, 11], [5, 5, 25, 25]], np.float32),
       "captions": [["a red car"], ["the red auto"], ["green grass field"]]},
      {"mask": np.array([True, False]),
       "image_id": np.array([3, 0]), "region_id": np.array([31, 0]),
       "box": np.array([[0, 0, 30, 30], [0, 0, 1, 1]], np.float32),
       "captions": [["a small dog"], ["padding"]]},
  ]
  predictions = {11: ("a red car", 0.9), 12: ("the red auto", 0.5), 21: ("purple sky", 0.8),
                 31: ("a small dog", 0.6), 0: ("padding", 1.0)}

  def predict_fn(params, batch):
    del params
    out = [predictions[int(r)] for r in batch["region_id"]]
    return {"caption": [c for c, _ in out], "caption_score": np.array([s for _, s in out])}

  seen = []

  def recording_meteor(pairs):
    scores = common.meteor_scores(pairs)
    seen.extend(zip(pairs, scores))
    return scores

  ev = dense_caption.DenseCaptionEvaluator(predict_fn, batches, meteor_fn=recording_meteor)
  out = dict(ev.run(params=None))
  assert len(started) == 1  # one Java process for all pairs
  # A second evaluation in this process reuses it (each start loads a 2 GB paraphrase table).
  assert dict(dense_caption.DenseCaptionEvaluator(predict_fn, batches).run(params=None)) == out
  assert len(started) == 1
  # METEOR 1.5 of a caption identical to a reference is 1, of one sharing no word is 0.
  assert sorted(seen) == [(("a red car", ["a red car", "the red auto"]), 1.0),
                          (("a small dog", ["a small dog"]), 1.0),
                          (("purple sky", ["green grass field"]), 0.0)]
  # Order: r11 (takes merged box, METEOR 1), r21 (box ok, METEOR 0), r31 (METEOR 1),
  # r12 (merged box already taken). npos = 3. Captioning flags 1010 for every threshold pair:
  # recall 1/3 (34 points) at precision 1, 2/3 (33 points) at 2/3 -> (34 + 22) / 100.
  assert out["mAP"] == pytest.approx(56.0, abs=1e-4)
  for u in IOUS:
    for m in METEORS:
      assert out[f"ap/iou{u}_meteor{m}"] == pytest.approx(56.0, abs=1e-4)
  # Detection flags 1110: recall 1 at precision 1.
  assert out["det_mAP"] == pytest.approx(100.0, abs=1e-4)
