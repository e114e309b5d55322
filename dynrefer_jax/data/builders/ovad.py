"""OVAD `ovad2000.json` (DATA_FORMATS §5): box-given attribute detection on COCO val2017 images.
Boxes xywh floats; `att_vec` with 1 / 0 / -1 per attribute (117 in the real file; the length is
read from `attributes`, so fixtures may be smaller)."""

from __future__ import annotations

from typing import Any

from dynrefer_jax.data.builders import common


def read_ovad(annotations: str, image_dir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  records, categories, data = common.coco_category_records(annotations, image_dir,
                                                           attributes=True)
  attributes = sorted(data["attributes"], key=lambda a: a["id"])
  return records, {"categories": categories,
                   "attributes": [a["name"] for a in attributes],
                   "num_attributes": len(attributes), "max_caption_tokens": None}
