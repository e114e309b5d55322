"""COCO 2017 instances (`instances_val2017.json`, DATA_FORMATS §4) for zero-shot recognition.

Every annotation is kept, crowd ones included (as ControlCap's converter); the caption is the
category name and the category index is the position in `categories` sorted by id (the order of
the class list `coco.json`). The box is COCO's `bbox` (xywh): the polygon/RLE extent that the
original loader reads differs from it by at most the RLE's 1-px inclusive-end convention.
"""

from __future__ import annotations

from typing import Any

from dynrefer_jax.data.builders import common


def read_coco_instances(annotations: str, image_dir: str
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  records, categories, _ = common.coco_category_records(annotations, image_dir)
  return records, {"categories": categories, "max_caption_tokens": None}
