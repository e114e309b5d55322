r"""Prepares a real dataset split from its public annotation files on local disk.

Writes, under --out:
  <split>.json                      cleaned region records (read by sources.JsonSource)
  images/<split>/<image_id>.png     repaired images only (mode, EXIF; lossless, at their own
                                    resolution); others are used in place
  <split>-NNNNN-of-MMMMM.tfrecord   self-contained shards: one tf.train.Example per image with its
                                    encoded bytes and all its regions (see `_example`)
  <split>_report.json               what was repaired or skipped, and why (builders/common.py)
Every file is written to a temporary name and renamed, so a killed run leaves no partial shard
or record file. A bad record is repaired or skipped and counted; the run never stops on one.

Examples:
  python tools/prepare_data.py --dataset vg --split train --out data/vg \
    --region_descriptions VG/region_descriptions.json --image_data VG/image_data.json \
    --densecap_splits densecap_splits.json --image_dir VG/images --tag_list ram_tag_list.txt
  python tools/prepare_data.py --dataset coco --split val --out data/coco \
    --annotations annotations/instances_val2017.json --image_dir val2017
  python tools/prepare_data.py --dataset ovad --split test --out data/ovad \
    --annotations ovad2000.json --image_dir val2017
  python tools/prepare_data.py --dataset refcocog --split train --out data/refcocog \
    --annotations finetune_refcocog_train.json --image_dir train2014 --tag_list ram_tag_list.txt
  (--dataset captions: GLaMM's VG test_caption.json / RefCOCOg val captions files.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dynrefer_jax.data import tags as tags_lib  # noqa: E402
from dynrefer_jax.data.builders import coco, common, ovad, refcocog, vg  # noqa: E402

DATASETS = ("vg", "captions", "refcocog", "coco", "ovad")


def read(dataset: str, split: str, args) -> tuple[list, dict]:
  if dataset == "vg":
    return vg.read_vg(args.region_descriptions, args.image_data, args.densecap_splits,
                      args.image_dir, split)
  if dataset == "captions":
    return vg.read_coco_captions(args.annotations, args.image_dir)
  if dataset == "refcocog":
    return refcocog.read_refcocog(args.annotations, args.image_dir)
  if dataset == "coco":
    return coco.read_coco_instances(args.annotations, args.image_dir)
  if dataset == "ovad":
    return ovad.read_ovad(args.annotations, args.image_dir)
  raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")


def _atomic_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def _example(image: dict, regions: list[dict]):
  """One tf.train.Example per image. Features: image/encoded (bytes of the file), image/id,
  image/height, image/width, region/id [R], region/box [R*4] (xyxy), region/caption [R],
  region/category [R] (index, -1 none), region/attributes [R*A], region/tag_ids (flat) and
  region/num_tags [R]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def ints(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))

  def floats(v):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(v)))

  def byts(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(v)))

  with open(image["file_name"], "rb") as f:
    encoded = f.read()
  boxes = [c for r in regions for c in (r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                        r["bbox"][1] + r["bbox"][3])]
  feats = {
      "image/encoded": byts([encoded]), "image/id": ints([image["id"]]),
      "image/height": ints([image["height"]]), "image/width": ints([image["width"]]),
      "region/id": ints(r["id"] for r in regions), "region/box": floats(boxes),
      "region/caption": byts(r["caption"].encode() for r in regions),
      "region/category": ints(r.get("category_index", -1) for r in regions),
      "region/attributes": ints(v for r in regions for v in (r.get("att_vec") or [])),
      "region/tag_ids": ints(t for r in regions for t in r.get("tag_ids", [])),
      "region/num_tags": ints(len(r.get("tag_ids", [])) for r in regions),
  }
  return tf.train.Example(features=tf.train.Features(feature=feats))


def write_shards(data: dict, out_dir: str, split: str, images_per_shard: int) -> list[str]:
  """Writes the TFRecord shards atomically (temporary name, then rename) and removes shards of
  an earlier run of the same split."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cat_index = {c: i for i, c in enumerate(data["vocab"]["categories"])}
  regions = {}
  for a in data["annotations"]:
    a = dict(a, category_index=cat_index.get(a.get("category"), -1))
    regions.setdefault(a["image_id"], []).append(a)
  images = data["images"]
  n = max(1, -(-len(images) // images_per_shard))
  for old in glob.glob(os.path.join(out_dir, f"{split}-*-of-*.tfrecord")):
    os.remove(old)
  paths = []
  for s in range(n):
    path = os.path.join(out_dir, f"{split}-{s:05d}-of-{n:05d}.tfrecord")
    tmp = path + ".tmp"
    try:
      with tf.io.TFRecordWriter(tmp) as w:
        for im in images[s * images_per_shard:(s + 1) * images_per_shard]:
          w.write(_example(im, regions[im["id"]]).SerializeToString())
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    paths.append(path)
  return paths


def prepare(dataset: str, split: str, out_dir: str, args, *, images_per_shard: int = 1000,
            write_tfrecords: bool = True) -> dict:
  """Reads, cleans and writes one split; returns the report (also written as JSON)."""
  os.makedirs(out_dir, exist_ok=True)
  records, info = read(dataset, split, args)
  parser = None
  if getattr(args, "tag_list", None):
    parser = tags_lib.TagParser(tags_lib.load_vocabulary(args.tag_list))
  data, report = common.clean_split(
      records, out_dir=out_dir, split=split,
      categories=info.get("categories"), attribute_names=info.get("attributes"),
      max_caption_tokens=info.get("max_caption_tokens"), tag_parser=parser)
  if info.get("mismatched"):
    report.skip("vg_id_mismatch", "image_data / region_descriptions ids differ",
                info["mismatched"])
  _atomic_json(os.path.join(out_dir, f"{split}.json"), data)
  out = report.to_json()
  out.update({"dataset": dataset, "split": split})
  if write_tfrecords:
    out["shards"] = [os.path.basename(p) for p in
                     write_shards(data, out_dir, split, images_per_shard)]
  _atomic_json(os.path.join(out_dir, f"{split}_report.json"), out)
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", required=True, choices=DATASETS)
  p.add_argument("--split", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--image_dir", required=True)
  p.add_argument("--annotations", help="COCO-style JSON (captions, refcocog, coco, ovad)")
  p.add_argument("--region_descriptions")
  p.add_argument("--image_data")
  p.add_argument("--densecap_splits")
  p.add_argument("--tag_list", help="tag vocabulary file, e.g. RAM ram_tag_list.txt")
  p.add_argument("--images_per_shard", type=int, default=1000)
  p.add_argument("--no_tfrecords", action="store_true")
  args = p.parse_args(argv)
  report = prepare(args.dataset, args.split, args.out, args,
                   images_per_shard=args.images_per_shard,
                   write_tfrecords=not args.no_tfrecords)
  print(json.dumps({k: report[k] for k in ("regions_in", "regions_out", "images_out",
                                           "repaired", "skipped")}, indent=1))
  return report


if __name__ == "__main__":
  main()
