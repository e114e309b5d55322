"""COCO 2017 instances (`instances_val2017.json`, DATA_FORMATS §4) for zero-shot recognition.

Every annotation is kept, crowd ones included (as ControlCap's converter); the caption is the
category name and the category index is the position in `categories` sorted by id (the order of
the class list `coco.json`). The box is COCO's `bbox` (xywh): the polygon/RLE extent that the
original loader reads differs from it by at most the RLE's 1-px inclusive-end convention.
"""

from __future__ import annotations

import os
from typing import Any

from dynrefer_jax.data.builders import common


def read_coco_instances(annotations: str, image_dir: str
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  data, regions = common.coco_regions(annotations)
  cats = sorted(data["categories"], key=lambda c: c["id"])
  names = {c["id"]: c["name"] for c in cats}
  records = []
  for a, im in regions:
    name = names.get(a.get("category_id"))
    records.append({
        "image_file": os.path.join(image_dir, im["file_name"]), "image_id": a["image_id"],
        "region_id": a["id"], "box": common.xywh_to_xyxy(a.get("bbox")),
        "caption": name or "", "category": name if name is not None else
        f"<unknown id {a.get('category_id')}>", "att_vec": None})
  return records, {"categories": [c["name"] for c in cats], "max_caption_tokens": None}
