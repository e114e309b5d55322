"""Visual Genome V1.2 region descriptions with the DenseCap splits, and GLaMM's VG
region-captioning test file (DATA_FORMATS §2)."""

from __future__ import annotations

import json
import os
from typing import Any

from dynrefer_jax.data.builders import common

MAX_TOKENS = 15  # DenseCap / ControlCap: longer phrases are dropped in every split


def read_vg(region_descriptions: str, image_data: str, densecap_splits: str, image_dir: str,
            split: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Regions of the VG images listed in `densecap_splits[split]`.

  The two VG lists are aligned by position (as the original converter does); an image whose ids
  disagree is skipped and counted by the caller as `vg_id_mismatch` (info["mismatched"]).
  Captions are DenseCap-tokenised and joined by spaces; regions are numbered from 1 in order
  (converted VG files do the same), images are "<image_id>.jpg" in a flat folder.
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
    for reg in entry.get("regions", []):
      tokens = common.densecap_tokens(reg.get("phrase") or "")
      x, y = reg.get("x"), reg.get("y")
      w, h = reg.get("width"), reg.get("height")
      records.append({
          "image_file": os.path.join(image_dir, f"{image_id}.jpg"), "image_id": image_id,
          "region_id": next_id, "box": common.xywh_to_xyxy([x, y, w, h]),
          "caption": " ".join(tokens), "category": None, "att_vec": None})
      next_id += 1
  return records, {"max_caption_tokens": MAX_TOKENS, "mismatched": mismatched}


def read_coco_captions(annotations: str, image_dir: str
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """COCO-caption-style region files with xywh boxes and one region per image: GLaMM's VG
  `test_caption.json` and RefCOCOg `finetune_refcocog_val_captions.json`. The caption is taken
  from the annotation, else from its image entry (ControlCap reads the image's)."""
  data, regions = common.coco_regions(annotations)
  records = []
  for a, im in regions:
    caption = a.get("caption") or im.get("caption") or ""
    records.append({
        "image_file": os.path.join(image_dir, im["file_name"]), "image_id": a["image_id"],
        "region_id": a["id"], "box": common.xywh_to_xyxy(a.get("bbox")),
        "caption": caption.strip(), "category": None, "att_vec": None})
  return records, {"max_caption_tokens": None}
