"""Dense captioning mAP, the DenseCap protocol (SPEC §11) as DynRefer's `eval_densecap.py`.

That file follows densecap-pytorch, itself a port of jcjohnson/densecap's `eval_utils.lua`:

1. Per image, ground-truth boxes with IoU >= 0.7 are merged greedily (the box with the most
   such neighbours, itself included, takes all of them; repeat). A merged box is the group's
   mean box and its references are all of the group's captions.
2. Predictions are sorted by score. Each takes its max-IoU merged box; it can count as a true
   positive only if that IoU is > 0 and no higher-scored prediction took the box first.
3. METEOR (1.5, `-norm`) of each such prediction against its merged references. All pairs go
   through one Java process.
4. Over all images, predictions sorted by score: for IoU threshold u in {0.3..0.7} and METEOR
   threshold m in {0, 0.05, ..., 0.25}, a prediction is a true positive iff IoU >= u, it took
   the box first and METEOR > m. AP is the mean over recall thresholds t = 0, 0.01, ..., 0.99
   of the max precision at recall >= t (0 where recall never reaches t); recall divides by the
   number of merged ground-truth boxes.
5. mAP = the mean of the 30 APs; detection mAP uses METEOR threshold -1 (any caption).

IoU is continuous (torchvision's `box_iou`, no +1 pixel as in the Lua original). Scores are
exp(beam score) in the ground-truth-box setting. Every value is reported x100.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dynrefer_jax.evaluators import common

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7


def merge_boxes(boxes: np.ndarray, thr: float = MERGE_IOU) -> list[np.ndarray]:
  """Greedy grouping of ground-truth boxes that overlap by IoU >= thr.

  Args:
    boxes: float[M, 4] x1y1x2y2.
    thr: IoU threshold (> 0).

  Returns:
    Groups of indices into `boxes` (int[n_g] each), in the order they were formed; every
    box with positive area is in exactly one group.
  """
  iou = common.box_iou(boxes, boxes)
  groups = []
  while True:
    good = iou >= thr
    counts = good.sum(axis=0)
    top = int(np.argmax(counts))  # first index on ties, as torch's max
    if counts[top] == 0:
      return groups
    members = np.nonzero(good[top])[0]
    groups.append(members)
    # Taken boxes leave the pool: zero their rows and columns.
    iou[members, :] = 0
    iou[:, members] = 0


def match_image(scores: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray,
                gt_captions: Sequence[Sequence[str]]) -> tuple[list[dict[str, Any]], int]:
  """Matches one image's predictions to its merged ground truth (steps 1-2).

  Args:
    scores: float[N] confidences.
    boxes: float[N, 4] predicted boxes, x1y1x2y2.
    gt_boxes: float[M, 4] ground-truth boxes, x1y1x2y2.
    gt_captions: M lists of reference captions, one list per ground-truth box.

  Returns:
    (records, npos). One record per prediction, in descending score order, with "index"
    (into the inputs), "score", "iou" (with the best merged box), "ok" (the prediction took
    that box first) and "references" (the merged box's captions; [] when the IoU is 0).
    npos is the number of merged ground-truth boxes.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
  groups = merge_boxes(gt_boxes)
  merged = (np.stack([gt_boxes[g].mean(axis=0) for g in groups]) if groups
            else np.zeros((0, 4)))
  merged_refs = [[r for i in g for r in gt_captions[i]] for g in groups]
  iou = common.box_iou(boxes, merged)  # [N, M']
  used = np.zeros(len(groups), bool)
  records = []
  for d in np.argsort(-scores, kind="stable"):
    best = int(np.argmax(iou[d])) if len(groups) else -1
    best_iou = float(iou[d, best]) if best >= 0 else 0.0
    ok = best_iou > 0 and not used[best]
    if ok:
      used[best] = True
    records.append({"index": int(d), "score": float(scores[d]), "iou": best_iou, "ok": ok,
                    "references": merged_refs[best] if best_iou > 0 else []})
  return records, len(groups)


def interpolated_ap(is_tp: np.ndarray, npos: int) -> float:
  """Max-interpolated AP over recall thresholds 0, 0.01, ..., 0.99 (100 points).

  float32 arithmetic mirrors the torch original, so recall values that sit exactly on a
  threshold fall on the same side.

  Args:
    is_tp: bool[N], true-positive flags of the predictions in descending score order.
    npos: number of ground-truth boxes.

  Returns:
    AP in [0, 1].
  """
  is_tp = np.asarray(is_tp, bool)
  if is_tp.size == 0 or npos == 0:
    return 0.0
  tp = np.cumsum(is_tp, dtype=np.float32)
  fp = np.cumsum(~is_tp, dtype=np.float32)
  recall = tp / np.float32(npos)
  precision = tp / (tp + fp)
  thresholds = (np.arange(100, dtype=np.float64) * 0.01).astype(np.float32)
  reached = recall[None, :] >= thresholds[:, None]  # [100, N]
  best = np.where(reached, precision[None, :], 0).max(axis=1)
  return float(np.mean(best.astype(np.float64)))


def dense_caption_metrics(
    images: Sequence[dict[str, Any]],
    meteor_fn: Callable[[list[tuple[str, list[str]]]], list[float]] = common.meteor_scores,
) -> dict[str, float]:
  """DenseCap mAP over a set of images.

  Args:
    images: one dict per image with "scores" float[N], "boxes" float[N, 4], "captions"
      list[str] (N predictions), "gt_boxes" float[M, 4] and "gt_captions" (M lists of
      references).
    meteor_fn: scores (candidate, references) pairs; all pairs of the set in one call.

  Returns:
    "mAP" and "det_mAP", plus "ap/iou{u}_meteor{m}" (30) and "det_ap/iou{u}" (5); all x100.
  """
  all_records, npos = [], 0
  for img in images:
    records, n = match_image(img["scores"], img["boxes"], img["gt_boxes"], img["gt_captions"])
    for r in records:
      r["candidate"] = img["captions"][r["index"]]
    all_records.extend(records)
    npos += n

  # Only predictions that took a box can be true positives; the others need no METEOR.
  scored = [i for i, r in enumerate(all_records) if r["ok"]]
  meteors = np.full(len(all_records), -np.inf)
  meteors[scored] = meteor_fn([(all_records[i]["candidate"], list(all_records[i]["references"]))
                               for i in scored])

  order = np.argsort(-np.array([r["score"] for r in all_records]), kind="stable")
  ious = np.array([r["iou"] for r in all_records])[order]
  ok = np.array([r["ok"] for r in all_records], bool)[order]
  meteors = meteors[order]

  out = {}
  aps, det_aps = [], []
  for u in IOU_THRESHOLDS:
    matched = ok & (ious >= u)
    det_ap = interpolated_ap(matched, npos)
    det_aps.append(det_ap)
    out[f"det_ap/iou{u}"] = 100 * det_ap
    for m in METEOR_THRESHOLDS:
      ap = interpolated_ap(matched & (meteors > m), npos)
      aps.append(ap)
      out[f"ap/iou{u}_meteor{m}"] = 100 * ap
  out["mAP"] = 100 * float(np.mean(aps))
  out["det_mAP"] = 100 * float(np.mean(det_aps))
  return out


@common.register("dense_caption")
class DenseCaptionEvaluator(common.Evaluator):
  """DenseCap mAP with one prediction per ground-truth region row.

  Reads batch "image_id", "box" (the ground-truth box), "captions" (its references) and preds
  "caption", "caption_score". The predicted box is preds["box"] when given (predicted-box
  evaluation), else the ground-truth box (the ground-truth-box setting of the 47.6 run).
  """

  def rows(self, batch, preds, keep):
    pred_box = preds.get("box", batch["box"])
    return list(zip(common.take(batch["image_id"], keep),
                    common.take(batch["box"], keep),
                    common.take(batch["captions"], keep),
                    common.take(pred_box, keep),
                    common.take(preds["caption_score"], keep),
                    common.take(preds["caption"], keep)))

  def metrics(self, rows):
    by_image: dict[int, dict[str, list]] = {}
    for image_id, gt_box, refs, box, score, caption in rows:
      img = by_image.setdefault(int(image_id), {k: [] for k in (
          "gt_boxes", "gt_captions", "boxes", "scores", "captions")})
      img["gt_boxes"].append(np.asarray(gt_box, np.float64))
      img["gt_captions"].append([refs] if isinstance(refs, str) else [str(r) for r in refs])
      img["boxes"].append(np.asarray(box, np.float64))
      img["scores"].append(float(score))
      img["captions"].append(str(caption))
    images = [{k: (np.stack(v) if k in ("gt_boxes", "boxes") else v) for k, v in img.items()}
              for img in by_image.values()]
    return dense_caption_metrics(images, meteor_fn=self.cfg.get("meteor_fn",
                                                                 common.meteor_scores))
