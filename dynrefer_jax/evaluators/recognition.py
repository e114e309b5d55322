"""Zero-shot region recognition on ground-truth boxes (COCO val2017), SPEC §11.

(a) top-1 accuracy: argmax of the class scores against the region's category, over every
    ground-truth annotation (crowd ones included);
(b) COCO box mAP with pycocotools' COCOeval, each ground-truth box being one detection with
    category = argmax and score = the max raw (un-normalised) class score.
Both are reported x100.
"""

from collections.abc import Mapping, Sequence
import contextlib
import copy
import io
import json
from typing import Any

import numpy as np

from dynrefer_jax.evaluators import common


def top1_accuracy(class_scores: np.ndarray, category: np.ndarray) -> float:
  """Percentage of rows whose argmax class is `category`.

  Args:
    class_scores: float[N, C].
    category: int[N] class index in [0, C).
  """
  class_scores = np.asarray(class_scores)
  category = np.asarray(category).reshape(-1)
  if category.size == 0:
    raise ValueError("no regions to evaluate")
  return 100.0 * float(np.mean(np.argmax(class_scores, axis=-1) == category))


def coco_gt_from_boxes(image_ids: Sequence[int], ann_ids: Sequence[int], boxes: np.ndarray,
                       category: Sequence[int], category_ids: Sequence[int],
                       iscrowd: Sequence[int] | None = None) -> dict[str, Any]:
  """A minimal COCO ground-truth dict from per-region rows.

  Areas are box areas: use the real instances file (`coco_box_map`'s `gt`) where the
  small/medium/large breakdown or crowd handling must match COCO's mask areas.

  Args:
    image_ids: int[N]; ann_ids: int[N] (unique); boxes: float[N, 4] x1y1x2y2;
    category: int[N] class index; category_ids: C COCO ids, by class index;
    iscrowd: int[N] or None (all 0).
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  iscrowd = np.zeros(len(boxes), int) if iscrowd is None else np.asarray(iscrowd)
  anns = []
  for i, (x1, y1, x2, y2) in enumerate(boxes):
    w, h = x2 - x1, y2 - y1
    anns.append({"id": int(ann_ids[i]), "image_id": int(image_ids[i]),
                 "category_id": int(category_ids[int(category[i])]),
                 "bbox": [float(x1), float(y1), float(w), float(h)], "area": float(w * h),
                 "iscrowd": int(iscrowd[i])})
  return {"images": [{"id": int(i)} for i in dict.fromkeys(int(i) for i in image_ids)],
          "annotations": anns,
          "categories": [{"id": int(c), "name": str(c)} for c in category_ids]}


def coco_box_map(gt: Mapping[str, Any], ann_ids: Sequence[int], class_scores: np.ndarray,
                 category_ids: Sequence[int]) -> dict[str, float]:
  """COCOeval bbox metrics with ground-truth boxes as detections.

  Args:
    gt: a COCO instances dict ("images", "annotations", "categories").
    ann_ids: int[N], the ground-truth annotation each row of `class_scores` was computed on.
    class_scores: float[N, C] raw scores.
    category_ids: C COCO category ids, by class index (the class-list order).

  Returns:
    {"mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"} x100 (-100 where COCOeval
    has nothing to average, as its own -1).
  """
  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  # pylint: enable=g-import-not-at-top
  class_scores = np.asarray(class_scores, np.float64)
  gt = copy.deepcopy(dict(gt))
  gt.setdefault("info", {})
  by_id = {a["id"]: a for a in gt["annotations"]}
  dets = []
  for ann_id, s in zip(ann_ids, class_scores):
    ann = by_id[int(ann_id)]
    k = int(np.argmax(s))
    dets.append({"image_id": ann["image_id"], "bbox": list(map(float, ann["bbox"])),
                 "category_id": int(category_ids[k]), "score": float(s[k])})
  quiet = io.StringIO()
  with contextlib.redirect_stdout(quiet):  # pycocotools prints progress and the table
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(dets) if dets else COCO()
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  names = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
  return {n: 100.0 * float(v) for n, v in zip(names, ev.stats[:6])}


@common.register("recognition")
class RecognitionEvaluator(common.Evaluator):
  """Top-1 accuracy and COCO box mAP of the class scores on ground-truth boxes.

  Reads batch "image_id", "region_id" (the annotation id), "box", "category" and preds
  "class_scores". Config:
    category_ids: COCO ids by class index (default: the order of coco_gt's "categories", as
      the original; 1..C without coco_gt).
    coco_gt: optional instances file path or dict; detections take their boxes from it by
      annotation id (COCO's mask areas and crowd flags then apply). Without it the ground truth
      is built from the batches (box areas, no crowd).
  """

  def rows(self, batch, preds, keep):
    return list(zip(common.take(batch["image_id"], keep), common.take(batch["region_id"], keep),
                    common.take(batch["box"], keep), common.take(batch["category"], keep),
                    common.take(preds["class_scores"], keep)))

  def metrics(self, rows):
    image_ids, ann_ids, boxes, category, scores = (list(c) for c in zip(*rows))
    scores = np.stack([np.asarray(s, np.float64) for s in scores])
    gt = self.cfg.get("coco_gt")
    if isinstance(gt, str):
      with open(gt) as f:
        gt = json.load(f)
    category_ids = self.cfg.get("category_ids")
    if category_ids is None:
      # The original maps class index i to the i-th category of the instances file.
      category_ids = ([c["id"] for c in gt["categories"]] if gt is not None
                      else list(range(1, scores.shape[1] + 1)))
    if len(category_ids) != scores.shape[1]:
      raise ValueError(f"{len(category_ids)} category ids for {scores.shape[1]} class scores")
    if gt is None:
      gt = coco_gt_from_boxes(image_ids, ann_ids, np.stack(boxes), category, category_ids)
    out = {"accuracy": top1_accuracy(scores, np.asarray(category))}
    out.update(coco_box_map(gt, ann_ids, scores, category_ids))
    return out
