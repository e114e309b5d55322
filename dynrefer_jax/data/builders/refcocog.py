"""RefCOCOg: MDETR's `finetune_refcocog_train.json` (training, DATA_FORMATS §3) and GLaMM's
`finetune_refcocog_val_captions.json` (region-captioning evaluation): reader and TFDS builder.
MDETR's file has one image entry per referring sentence (the sentence is the image entry's
`caption`) and exactly one annotation per image entry, boxes xywh in COCO 2014 pixels."""

from __future__ import annotations

from typing import Any, Sequence

from dynrefer_jax.data.builders import base, common, vg
from dynrefer_jax.data.builders.common import xywh_to_xyxy


def read_refcocog(annotations: str, image_dir: str | Sequence[str]
                  ) -> tuple[list[dict[str, Any]], dict]:
  data, regions = common.coco_regions(annotations)
  records = []
  for a, im in regions:
    caption = (im.get("caption") or a.get("caption") or "").strip()
    records.append({
        "image_file": common.find_image(image_dir, im["file_name"]), "image_id": a["image_id"],
        "region_id": a["id"], "box": xywh_to_xyxy(a.get("bbox")), "caption": caption,
        "category": None, "att_vec": None})
  return records, {"max_caption_tokens": None}


class DynreferRefcocog(base.RegionBuilder):
  """RefCOCOg (umd split) referring expressions as region captions: MDETR's training file and
  GLaMM's validation captions, on COCO train2014 images."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in the manual dir:
    finetune_refcocog_train.json         MDETR's annotations (mdetr_annotations.tar.gz)
    finetune_refcocog_val_captions.json  GLaMM's RefCOCOg captions (groundingLMM docs/datasets.md)
    train2014/                           COCO 2014 training images
    ram_tag_list.txt                     optional: DynRefer's tag list (model_configs.zip)
  """

  MANUAL_FILES = ("finetune_refcocog_train.json", "finetune_refcocog_val_captions.json")
  IMAGE_DIRS = ("train2014",)

  def _split_generators(self, dl_manager):
    d = dl_manager.manual_dir
    files, images = self.manual_paths(d)
    parser = self._tag_parser(d)
    train, train_info = read_refcocog(files["finetune_refcocog_train.json"], images)
    val, val_info = vg.read_coco_captions(files["finetune_refcocog_val_captions.json"], images)
    return {"train": self._generate_examples("train", train, train_info, parser, d),
            "val": self._generate_examples("val", val, val_info, parser, d)}
