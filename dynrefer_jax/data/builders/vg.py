"""Visual Genome V1.2 region descriptions with the DenseCap splits, and GLaMM's VG
region-captioning test file (DATA_FORMATS §2): readers and their TFDS builders."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from dynrefer_jax.data.builders import base, common

MAX_TOKENS = 15  # DenseCap / ControlCap: longer phrases are dropped in every split
VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "images")  # images.zip, images2.zip; or one flat folder


def read_vg(region_descriptions: str, image_data: str, densecap_splits: str,
            image_dir: str | Sequence[str], split: str) -> tuple[list[dict[str, Any]], dict]:
  """Regions of the VG images listed in `densecap_splits[split]`.

  The two VG lists are aligned by position (as the original converter does); an image whose ids
  disagree is skipped and counted as `vg_id_mismatch` (info["mismatched"]). Captions are
  DenseCap-tokenised and joined by spaces; regions are numbered from 1 in order (converted VG
  files do the same); an image is "<image_id>.jpg" in the first of `image_dir` that holds it.
  """
  with open(densecap_splits) as f:
    wanted = set(json.load(f)[split])
  with open(image_data) as f:
    images = json.load(f)
  with open(region_descriptions) as f:
    regions = json.load(f)
  records, mismatched, next_id = [], 0, 1
  for im, entry in zip(images, regions):
    image_id = im.get("image_id", im.get("id"))  # V1.2 uses image_id, V1.0 id
    if entry.get("id", entry.get("image_id")) != image_id:
      mismatched += 1
      continue
    if image_id not in wanted:
      continue
    image_file = common.find_image(image_dir, f"{image_id}.jpg")
    for reg in entry.get("regions", []):
      tokens = common.densecap_tokens(reg.get("phrase") or "")
      x, y = reg.get("x"), reg.get("y")
      w, h = reg.get("width"), reg.get("height")
      records.append({
          "image_file": image_file, "image_id": image_id,
          "region_id": next_id, "box": common.xywh_to_xyxy([x, y, w, h]),
          "caption": " ".join(tokens), "category": None, "att_vec": None})
      next_id += 1
  return records, {"max_caption_tokens": MAX_TOKENS, "mismatched": mismatched}


def read_coco_captions(annotations: str, image_dir: str | Sequence[str]
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """COCO-caption-style region files with xywh boxes and one region per image: GLaMM's VG
  `test_caption.json` and RefCOCOg `finetune_refcocog_val_captions.json`. The caption is taken
  from the annotation, else from its image entry (ControlCap reads the image's)."""
  data, regions = common.coco_regions(annotations)
  records = []
  for a, im in regions:
    caption = a.get("caption") or im.get("caption") or ""
    records.append({
        "image_file": common.find_image(image_dir, im["file_name"]), "image_id": a["image_id"],
        "region_id": a["id"], "box": common.xywh_to_xyxy(a.get("bbox")),
        "caption": caption.strip(), "category": None, "att_vec": None})
  return records, {"max_caption_tokens": None}


class DynreferVg(base.RegionBuilder):
  """Visual Genome V1.2 region descriptions on DenseCap's train / val / test image split (dense
  captioning; DynRefer's training set): DenseCap-tokenised phrases of at most 15 tokens."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in the manual dir (tools/prepare_data.py --manual_dir, tfds build --manual_dir):
    region_descriptions.json   Visual Genome V1.2 (region_descriptions.json.zip)
    image_data.json            Visual Genome V1.2 (image_data.json.zip)
    densecap_splits.json       DenseCap's image split (jcjohnson/densecap info/densecap_splits.json)
    VG_100K/, VG_100K_2/       Visual Genome images (images.zip, images2.zip) as <image_id>.jpg
                               (or all of them in one folder images/)
    ram_tag_list.txt           optional: DynRefer's tag list (model_configs.zip); regions then
                               carry the tag ids parsed from their captions
  """

  MANUAL_FILES = ("region_descriptions.json", "image_data.json", "densecap_splits.json")
  IMAGE_DIRS = VG_IMAGE_DIRS

  def _split_generators(self, dl_manager):
    d = dl_manager.manual_dir
    files, dirs = self.manual_paths(d)
    parser = self._tag_parser(d)
    out = {}
    for split in ("train", "val", "test"):
      records, info = read_vg(*files.values(), dirs, split)
      if records:
        out[split] = self._generate_examples(split, records, info, parser, d)
    return out


class DynreferVgReg(base.RegionBuilder):
  """GLaMM's Visual Genome region-captioning test set (one region per entry) on VG images."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in the manual dir:
    test_caption.json          GLaMM's VG region-captioning file (GranD-f / GLaMM data release)
    VG_100K/, VG_100K_2/       Visual Genome images (or images/), as for dynrefer_vg
    ram_tag_list.txt           optional, as for dynrefer_vg
  """

  MANUAL_FILES = ("test_caption.json",)
  IMAGE_DIRS = VG_IMAGE_DIRS

  def _split_generators(self, dl_manager):
    d = dl_manager.manual_dir
    files, dirs = self.manual_paths(d)
    records, info = read_coco_captions(files["test_caption.json"], dirs)
    return {"test": self._generate_examples("test", records, info, self._tag_parser(d), d)}
