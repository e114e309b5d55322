"""OVAD `ovad2000.json` (DATA_FORMATS §5): box-given attribute detection on COCO val2017 images.
Boxes xywh floats; `att_vec` with 1 / 0 / -1 per attribute (117 in the real file; the length is
read from `attributes`, so fixtures may be smaller)."""

from __future__ import annotations

import os
from typing import Any

from dynrefer_jax.data.builders import common


def read_ovad(annotations: str, image_dir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  data, regions = common.coco_regions(annotations)
  cats = sorted(data["categories"], key=lambda c: c["id"])
  names = {c["id"]: c["name"] for c in cats}
  attributes = sorted(data["attributes"], key=lambda a: a["id"])
  records = []
  for a, im in regions:
    name = names.get(a.get("category_id"))
    records.append({
        "image_file": os.path.join(image_dir, im["file_name"]), "image_id": a["image_id"],
        "region_id": a["id"], "box": common.xywh_to_xyxy(a.get("bbox")),
        "caption": name or "", "category": name if name is not None else
        f"<unknown id {a.get('category_id')}>", "att_vec": a.get("att_vec")})
  return records, {"categories": [c["name"] for c in cats],
                   "attributes": [a["name"] for a in attributes],
                   "num_attributes": len(attributes), "max_caption_tokens": None}
