"""RefCOCOg in MDETR's COCO-style JSON (`finetune_refcocog_{train,val}.json`, DATA_FORMATS §3):
one image entry per referring sentence (the sentence is the image entry's `caption`), exactly one
annotation per image entry, boxes xywh in COCO 2014 pixels."""

from __future__ import annotations

import os
from typing import Any

from dynrefer_jax.data.builders import common
from dynrefer_jax.data.builders.common import xywh_to_xyxy


def read_refcocog(annotations: str, image_dir: str) -> tuple[list[dict[str, Any]], dict]:
  data, regions = common.coco_regions(annotations)
  records = []
  for a, im in regions:
    caption = (im.get("caption") or a.get("caption") or "").strip()
    records.append({
        "image_file": os.path.join(image_dir, im["file_name"]), "image_id": a["image_id"],
        "region_id": a["id"], "box": xywh_to_xyxy(a.get("bbox")), "caption": caption,
        "category": None, "att_vec": None})
  return records, {"max_caption_tokens": None}
