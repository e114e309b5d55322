"""Region recognition: top-1 accuracy and COCOeval box mAP on ground-truth boxes, known answers."""

import json

import numpy as np
import pytest

from dynrefer_jax.evaluators import recognition

# Non-contiguous COCO ids, as COCO's own: class index 0 -> id 1, class index 1 -> id 3.
CATEGORY_IDS = [1, 3]
# Two images, four regions (x1y1x2y2), none overlapping within an image.
IMAGE_IDS = [10, 10, 11, 11]
ANN_IDS = [1, 2, 3, 4]
BOXES = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 20, 20], [30, 30, 50, 50]], float)
CATEGORY = np.array([0, 1, 0, 1])
# Raw scores (no sigmoid): region 3 is a class-0 region predicted as class 1, at the lowest
# max score of all.
SCORES = np.array([[2.0, -1.0], [-0.3, 0.8], [-0.5, 0.2], [0.1, 0.7]])


def _gt(iscrowd=(0, 0, 0, 0)):
  return recognition.coco_gt_from_boxes(IMAGE_IDS, ANN_IDS, BOXES, CATEGORY, CATEGORY_IDS,
                                        iscrowd=iscrowd)


def test_top1_accuracy():
  assert recognition.top1_accuracy(SCORES, CATEGORY) == pytest.approx(75.0)
  assert recognition.top1_accuracy(np.eye(3), [0, 1, 1]) == pytest.approx(200 / 3)


def test_gt_dict_is_xywh_with_coco_ids():
  gt = _gt()
  assert gt["annotations"][1]["bbox"] == [20.0, 20.0, 20.0, 20.0]
  assert gt["annotations"][1]["category_id"] == 3
  assert gt["annotations"][1]["area"] == 400.0
  assert [im["id"] for im in gt["images"]] == [10, 11]


def test_coco_map_perfect_predictions():
  perfect = np.where(np.eye(2)[CATEGORY] > 0, 1.0, -1.0)
  out = recognition.coco_box_map(_gt(), ANN_IDS, perfect, CATEGORY_IDS)
  assert out["mAP"] == pytest.approx(100.0)
  assert out["AP50"] == pytest.approx(100.0)
  assert out["AP75"] == pytest.approx(100.0)


def test_coco_map_one_wrong_class():
  out = recognition.coco_box_map(_gt(), ANN_IDS, SCORES, CATEGORY_IDS)
  # Class id 1: 1 of 2 boxes found at precision 1 -> recall thresholds 0..0.50 (51 of 101).
  # Class id 3: TP 0.8, TP 0.7, then the wrong box at 0.2 (no overlap) -> recall 1 at
  # precision 1 -> AP 1. Same at every IoU threshold (boxes are exact).
  expected = 100 * (51 / 101 + 1) / 2
  assert out["mAP"] == pytest.approx(expected, abs=1e-6)
  assert out["AP50"] == pytest.approx(expected, abs=1e-6)


def test_evaluator_end_to_end_with_padding_and_crowd_gt(tmp_path):
  batches = [
      {"mask": np.array([True, True, False]), "image_id": np.array([10, 10, 0]),
       "region_id": np.array([1, 2, 0]), "box": np.r_[BOXES[:2], [[0, 0, 1, 1]]],
       "category": np.array([0, 1, 1]), "_scores": np.r_[SCORES[:2], [[0.0, 9.0]]]},
      {"mask": np.array([True, True]), "image_id": np.array([11, 11]),
       "region_id": np.array([3, 4]), "box": BOXES[2:], "category": CATEGORY[2:],
       "_scores": SCORES[2:]},
  ]
  predict_fn = lambda params, batch: {"class_scores": batch["_scores"]}

  out = dict(recognition.RecognitionEvaluator(predict_fn, batches,
                                              category_ids=CATEGORY_IDS).run(None))
  assert out["accuracy"] == pytest.approx(75.0)
  assert out["mAP"] == pytest.approx(100 * (51 / 101 + 1) / 2, abs=1e-6)

  # With an instances file where the missed region is a crowd annotation, COCOeval ignores it:
  # class id 1 then has one box, found -> AP 1. Accuracy still counts it (crowd included).
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(_gt(iscrowd=(0, 0, 1, 0))))
  # Category ids default to the file's category order ([1, 3]).
  out = dict(recognition.RecognitionEvaluator(predict_fn, batches, coco_gt=str(path)).run(None))
  assert out["accuracy"] == pytest.approx(75.0)
  assert out["mAP"] == pytest.approx(100.0, abs=1e-6)
