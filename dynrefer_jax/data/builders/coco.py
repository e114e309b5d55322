"""COCO 2017 instances (`instances_val2017.json`, DATA_FORMATS §4) for zero-shot recognition:
reader and TFDS builder.

Every annotation is kept, crowd ones included (as ControlCap's converter); the caption is the
category name and the category index is the position in `categories` sorted by id (the order of
the class list `coco.json`). The box is COCO's `bbox` (xywh): the polygon/RLE extent that the
original loader reads differs from it by at most the RLE's 1-px inclusive-end convention.
"""

from __future__ import annotations

from typing import Any, Sequence

from dynrefer_jax.data.builders import base, common


def read_coco_instances(annotations: str, image_dir: str | Sequence[str]
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  records, categories, _ = common.coco_category_records(annotations, image_dir)
  return records, {"categories": categories, "max_caption_tokens": None}


class DynreferCoco(base.RegionBuilder):
  """COCO 2017 val instances: every box with its category (zero-shot recognition)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in the manual dir:
    instances_val2017.json   COCO 2017 annotations (annotations_trainval2017.zip)
    val2017/                 COCO 2017 validation images
  """

  MANUAL_FILES = ("instances_val2017.json",)
  IMAGE_DIRS = ("val2017",)

  def _split_generators(self, dl_manager):
    d = dl_manager.manual_dir
    files, images = self.manual_paths(d)
    records, info = read_coco_instances(files["instances_val2017.json"], images)
    return {"val": self._generate_examples("val", records, info, root=d)}
