"""A tiny real-format dataset: raw annotation files in the public layouts, and their TFDS build.

Smoke runs of the full-size configs (`configs/dynrefer_*.py:smoke`) and the tests train and
evaluate on it with no user files: `write_raw(root)` writes small images and annotation files in
the layouts the builders read from their manual dir (VG V1.2 + DenseCap splits, GLaMM-style
caption files, MDETR RefCOCOg, COCO instances, OVAD), plus a RAM-style tag list and a class
list; `ensure(root)` builds every dataset from them with the TFDS builders (data/builders/).
"""

from __future__ import annotations

import json
import os

import numpy as np

TAGS = ["man", "white shirt", "shirt", "dog", "brown dog", "kite", "red kite", "sky", "grass",
        "tree", "car", "red car", "woman", "green coat", "coat", "person", "plate", "on", "in"]
# (COCO id, name); the class list of the fixture's COCO and OVAD files.
CLASSES = [(1, "person"), (3, "car"), (18, "dog")]
OVAD_ATTRIBUTES = [
    {"id": 0, "name": "color:black", "type": "color", "parent_type": "color",
     "is_has_att": "is", "freq_set": "head"},
    {"id": 1, "name": "hair length:long", "type": "hair length", "parent_type": "length",
     "is_has_att": "has", "freq_set": "medium"},
    {"id": 2, "name": "texture:soft/fluffy", "type": "texture", "parent_type": "texture",
     "is_has_att": "is", "freq_set": "tail"}]
_PHRASES = ["a man wearing a white shirt", "a brown dog on the grass", "a red kite in the sky",
            "a red car", "a tall tree", "a woman in a green coat", "the blue sky",
            "a dog in the grass"]
# VG images: id -> (width, height); densecap split of each.
_VG_IMAGES = {1: (64, 48), 2: (56, 48), 3: (48, 40), 4: (64, 40), 5: (60, 48), 6: (48, 48)}
_VG_SPLITS = {"train": [1, 2, 3, 4], "val": [5], "test": [5, 6]}


def _image(path: str, w: int, h: int, seed: int) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path, quality=95)


def _dump(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def write_raw(root: str) -> dict[str, str]:
  """Writes the raw annotation files and images under `root` in the layout of the builders'
  manual dir (one folder for every dataset, as TFDS's <data_dir>/downloads/manual); returns
  their paths by name."""
  os.makedirs(root, exist_ok=True)
  p = {k: os.path.join(root, v) for k, v in dict(
      vg_images="VG_100K", vg_images2="VG_100K_2",
      region_descriptions="region_descriptions.json", image_data="image_data.json",
      densecap_splits="densecap_splits.json", train2014="train2014", val2017="val2017",
      vg_reg="test_caption.json", refcocog_train="finetune_refcocog_train.json",
      refcocog_val="finetune_refcocog_val_captions.json", coco="instances_val2017.json",
      ovad="ovad2000.json", tag_list="ram_tag_list.txt", classes="coco_classes.json").items()}
  image_data, regions, rid = [], [], 1
  for image_id, (w, h) in _VG_IMAGES.items():
    # Visual Genome ships its images in two folders; the builder looks in both.
    folder = p["vg_images"] if image_id <= 4 else p["vg_images2"]
    _image(os.path.join(folder, f"{image_id}.jpg"), w, h, image_id)
    image_data.append({"image_id": image_id, "width": w, "height": h, "coco_id": None,
                       "flickr_id": None, "url": ""})
    regs = []
    for k in range(4):
      phrase = _PHRASES[(image_id + k) % len(_PHRASES)]
      x, y = 2 + 6 * k, 3 + 4 * k
      regs.append({"region_id": rid, "image_id": image_id, "phrase": phrase.capitalize() + ".",
                   "x": x, "y": y, "width": 20 + 2 * k, "height": 16 + k})
      rid += 1
    regions.append({"id": image_id, "regions": regs})
  _dump(p["image_data"], image_data)
  _dump(p["region_descriptions"], regions)
  _dump(p["densecap_splits"], _VG_SPLITS)
  # GLaMM-style VG caption file: one region per image id, on VG images.
  vg_reg = [(1, 64, 48), (5, 60, 48), (6, 48, 48)]
  _dump(p["vg_reg"], {
      "images": [{"id": 900 + i, "file_name": f"{vid}.jpg", "width": w, "height": h}
                 for i, (vid, w, h) in enumerate(vg_reg)],
      "annotations": [{"id": 900 + i, "image_id": 900 + i, "bbox": [4.0, 5.0, 20.0, 18.0],
                       "caption": _PHRASES[i]} for i in range(len(vg_reg))]})

  coco_images, coco2014 = [], []
  for i, (w, h) in enumerate(((64, 48), (56, 40), (48, 48))):
    name = f"{100 + i:012d}.jpg"
    _image(os.path.join(p["val2017"], name), w, h, 100 + i)
    _image(os.path.join(p["train2014"], f"COCO_train2014_{name}"), w, h, 100 + i)
    coco_images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
    coco2014.append({"id": 100 + i, "file_name": f"COCO_train2014_{name}", "width": w,
                     "height": h})
  _dump(p["refcocog_val"], {
      "images": [dict(im, id=700 + i) for i, im in enumerate(coco2014[:2])],
      "annotations": [{"id": 700 + i, "image_id": 700 + i, "bbox": [6.0, 4.0, 22.0, 20.0],
                       "caption": _PHRASES[5 - i]} for i in range(2)]})
  # MDETR RefCOCOg: one image entry per sentence, the sentence on the image entry.
  mdetr_images, mdetr_anns = [], []
  for j in range(10):
    im = coco2014[j % len(coco2014)]
    mdetr_images.append(dict(im, id=500 + j, original_id=im["id"],
                             caption=_PHRASES[j % len(_PHRASES)], dataset_name="refcocog"))
    mdetr_anns.append({"id": 600 + j, "image_id": 500 + j, "bbox": [2.0 + j, 3.0, 18.0, 16.0],
                       "area": 288.0, "iscrowd": 0, "category_id": 1})
  _dump(p["refcocog_train"], {"images": mdetr_images, "annotations": mdetr_anns,
                              "categories": [{"id": 1, "name": "person"}]})
  cats = [{"id": cid, "name": name, "supercategory": ""} for cid, name in CLASSES]
  anns = [{"id": 10 + k, "image_id": 100 + k % 3, "category_id": CLASSES[k % 3][0],
           "bbox": [3.0 + 2 * k, 4.0, 16.0, 14.0], "area": 224.0, "iscrowd": 0,
           "segmentation": [[0, 0, 1, 0, 1, 1]]} for k in range(6)]
  _dump(p["coco"], {"images": coco_images, "annotations": anns, "categories": cats})
  att_vecs = ([1, 0, -1], [0, 1, 1], [1, -1, 0], [0, 0, 1])
  _dump(p["ovad"], {
      "info": {}, "licenses": [], "images": coco_images, "attributes": OVAD_ATTRIBUTES,
      "categories": [dict(c, isthing=1, ov_set="base") for c in cats],
      "annotations": [dict(a, att_vec=list(att_vecs[k % 4])) for k, a in enumerate(anns[:4])]})
  with open(p["tag_list"], "w", encoding="utf-8") as f:
    f.write("\n".join(TAGS))  # no trailing newline, as the RAM list
  _dump(p["classes"], [name for _, name in CLASSES])
  return p


DATASETS = ("vg", "vg_reg", "refcocog", "coco", "ovad")  # every builder with manual files


def ensure(root: str) -> dict[str, str]:
  """Writes (once) the raw files under root/raw and builds every dataset from them into the
  TFDS data dir `root` (what `tools/prepare_data.py --manual_dir root/raw --data_dir root`
  does); returns the raw paths. The raw folder holds the fixture's RAM-style tag list, so every
  split carries tag ids parsed against it."""
  from dynrefer_jax.data import builders  # pylint: disable=import-outside-toplevel
  raw = os.path.join(root, "raw")
  done = os.path.join(root, "fixture_done")
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      return json.load(f)
  p = write_raw(raw)
  for dataset in DATASETS:
    builders.build(dataset, root, raw)
  _dump(done, p)
  return p
