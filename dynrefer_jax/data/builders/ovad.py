"""OVAD `ovad2000.json` (DATA_FORMATS §5): box-given attribute detection on COCO val2017 images,
reader and TFDS builder. Boxes xywh floats; `att_vec` with 1 / 0 / -1 per attribute (117 in the
real file; the length is read from `attributes`, so fixtures may be smaller)."""

from __future__ import annotations

from typing import Any, Sequence

from dynrefer_jax.data.builders import base, common


def read_ovad(annotations: str, image_dir: str | Sequence[str]
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  records, categories, data = common.coco_category_records(annotations, image_dir,
                                                           attributes=True)
  attributes = sorted(data["attributes"], key=lambda a: a["id"])
  return records, {"categories": categories,
                   "attributes": [a["name"] for a in attributes],
                   "num_attributes": len(attributes), "max_caption_tokens": None}


class DynreferOvad(base.RegionBuilder):
  """OVAD: 2,000 COCO val2017 images, every box labelled with 117 attributes (1 / 0 / -1)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in the manual dir:
    ovad2000.json   OVAD's annotations (OVAD-Benchmark ovad2000.json)
    val2017/        COCO 2017 validation images
  """

  MANUAL_FILES = ("ovad2000.json",)
  IMAGE_DIRS = ("val2017",)

  def _split_generators(self, dl_manager):
    d = dl_manager.manual_dir
    files, images = self.manual_paths(d)
    records, info = read_ovad(files["ovad2000.json"], images)
    return {"test": self._generate_examples("test", records, info, root=d)}
