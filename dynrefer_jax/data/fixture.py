"""A tiny real-format dataset: raw annotation files in the public layouts, and their prepared form.

Smoke runs of the full-size configs (`configs/dynrefer_*.py:smoke`) and the tests train and
evaluate on it with no user files: `write_raw(root)` writes small images and annotation files in
the layouts `tools/prepare_data.py` reads (VG V1.2 + DenseCap splits, GLaMM-style caption files,
MDETR RefCOCOg, COCO instances, OVAD), plus a RAM-style tag list and a class list;
`ensure(root)` cleans them with the same builders into `root/<dataset>/<split>.json` (what
`prepare_data.py --out root/<dataset>` writes, without the TFRecord shards the pipeline does
not read).
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
  """Writes the raw annotation files and images under `root`; returns their paths by name."""
  os.makedirs(root, exist_ok=True)
  p = {k: os.path.join(root, v) for k, v in dict(
      vg_images="vg_images", region_descriptions="region_descriptions.json",
      image_data="image_data.json", densecap_splits="densecap_splits.json",
      coco_images="coco_images", vg_reg="vg_test_caption.json",
      refcocog_train="finetune_refcocog_train.json",
      refcocog_val="finetune_refcocog_val_captions.json", coco="instances_val2017.json",
      ovad="ovad2000.json", tag_list="ram_tag_list.txt", classes="coco_classes.json").items()}
  image_data, regions, rid = [], [], 1
  for image_id, (w, h) in _VG_IMAGES.items():
    _image(os.path.join(p["vg_images"], f"{image_id}.jpg"), w, h, image_id)
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

  coco_images = []
  for i, (w, h) in enumerate(((64, 48), (56, 40), (48, 48))):
    name = f"{100 + i:012d}.jpg"
    _image(os.path.join(p["coco_images"], name), w, h, 100 + i)
    coco_images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
  # GLaMM-style caption files: one region per image id.
  _dump(p["vg_reg"], {
      "images": [dict(im, id=900 + i) for i, im in enumerate(coco_images)],
      "annotations": [{"id": 900 + i, "image_id": 900 + i, "bbox": [4.0, 5.0, 20.0, 18.0],
                       "caption": _PHRASES[i]} for i in range(len(coco_images))]})
  _dump(p["refcocog_val"], {
      "images": [dict(im, id=700 + i) for i, im in enumerate(coco_images[:2])],
      "annotations": [{"id": 700 + i, "image_id": 700 + i, "bbox": [6.0, 4.0, 22.0, 20.0],
                       "caption": _PHRASES[5 - i]} for i in range(2)]})
  # MDETR RefCOCOg: one image entry per sentence, the sentence on the image entry.
  mdetr_images, mdetr_anns = [], []
  for j in range(10):
    im = coco_images[j % len(coco_images)]
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


# dataset dir -> [(split, builder name, raw file keys)]
PREPARED = {"vg": [("train", "vg"), ("test", "vg")], "vg_reg": [("test", "captions")],
            "refcocog": [("train", "refcocog"), ("val", "captions")],
            "coco": [("val", "coco")], "ovad": [("test", "ovad")]}


def _read(dataset: str, builder: str, split: str, p: dict[str, str]):
  from dynrefer_jax.data.builders import coco, ovad, refcocog, vg  # pylint: disable=import-outside-toplevel
  if builder == "vg":
    return vg.read_vg(p["region_descriptions"], p["image_data"], p["densecap_splits"],
                      p["vg_images"], split)
  if builder == "captions":
    return vg.read_coco_captions(p["vg_reg" if dataset == "vg_reg" else "refcocog_val"],
                                 p["coco_images"])
  if builder == "refcocog":
    return refcocog.read_refcocog(p["refcocog_train"], p["coco_images"])
  if builder == "coco":
    return coco.read_coco_instances(p["coco"], p["coco_images"])
  return ovad.read_ovad(p["ovad"], p["coco_images"])


def ensure(root: str) -> dict[str, str]:
  """Writes (once) the raw files under root/raw and the prepared splits under root/<dataset>/;
  returns the raw paths. Training splits carry tag sets parsed against the fixture's tag list,
  as `prepare_data.py --tag_list` writes them."""
  from dynrefer_jax.data import tags as tags_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data.builders import common  # pylint: disable=import-outside-toplevel
  raw = os.path.join(root, "raw")
  done = os.path.join(root, "fixture_done")
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      return json.load(f)
  p = write_raw(raw)
  parser = tags_lib.TagParser(tags_lib.load_vocabulary(p["tag_list"]))
  for dataset, splits in PREPARED.items():
    out = os.path.join(root, dataset)
    os.makedirs(out, exist_ok=True)
    for split, builder in splits:
      records, info = _read(dataset, builder, split, p)
      data, _ = common.clean_split(
          records, out_dir=out, split=split,
          categories=info.get("categories"), attribute_names=info.get("attributes"),
          max_caption_tokens=info.get("max_caption_tokens"),
          tag_parser=parser if split == "train" else None)
      _dump(os.path.join(out, f"{split}.json"), data)
  _dump(done, p)
  return p
