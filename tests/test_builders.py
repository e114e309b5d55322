"""Real-format builders on tiny fixtures, and the bad-record matrix (builders/common.py)."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from dynrefer_jax.data import sources, tags
from dynrefer_jax.data.builders import coco, common, ovad, refcocog, vg


def _rgb(w, h, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))


def write_vg_fixture(root):
  """VG V1.2 + DenseCap splits with the edge cases of DATA_FORMATS §8."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  _rgb(64, 48).save(os.path.join(root, "images", "1.jpg"), quality=95)
  Image.new("L", (40, 30), 128).save(os.path.join(root, "images", "2.jpg"))
  _rgb(20, 20).save(os.path.join(root, "images", "3.jpg"))
  image_data = [{"image_id": i, "url": f"https://x/VG_100K/{i}.jpg", "width": w, "height": h,
                 "coco_id": None if i == 1 else 5, "flickr_id": None}
                for i, w, h in ((1, 64, 48), (2, 40, 30), (3, 20, 20))]

  def reg(rid, phrase, x, y, w, h):
    return {"region_id": rid, "image_id": 0, "phrase": phrase, "x": x, "y": y, "width": w,
            "height": h}
  long_phrase = " ".join(["word"] * 16)
  regions = [
      {"id": 1, "regions": [
          reg(101, "A red kite.", 2, 3, 10, 10),          # kept
          reg(102, "man", 5, -4, 10, 10),                  # negative y: clipped
          reg(103, "dog", 60, 10, 10, 5),                  # past the right edge: clipped
          reg(104, "cloud", 5, -30, 10, 20),               # entirely above: skipped
          reg(105, "pole", 20, 20, 0, 5),                  # zero width: widened to 1 px
          reg(106, long_phrase, 1, 1, 5, 5),               # 16 tokens: dropped
          reg(107, "...", 1, 1, 5, 5),                     # empty after punctuation removal
          reg(108, "Café ½ cake", 30, 30, 10, 10),         # non-ASCII: replaced
          reg(109, "tree", 30, 30, -5, 10)]},              # negative width: skipped
      {"id": 2, "regions": [reg(201, "a dog", 1, 1, 9, 9)]},  # grayscale image
      {"id": 3, "regions": [reg(301, "sky", 0, 0, 5, 5)]}]
  splits = {"test": [], "train": [1, 2, 99], "val": [3]}  # 99 is not in the region file
  for name, obj in (("image_data.json", image_data), ("region_descriptions.json", regions),
                    ("densecap_splits.json", splits)):
    with open(os.path.join(root, name), "w") as f:
      json.dump(obj, f)


def write_coco_fixture(root):
  """instances_val2017-style file whose images cover the image bad-record matrix."""
  img = os.path.join(root, "images")
  os.makedirs(img, exist_ok=True)
  rgba = np.zeros((40, 50, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, 255
  rgba[:, :10, 3] = 0  # a transparent strip -> black
  Image.fromarray(rgba, "RGBA").save(os.path.join(img, "000000000010.png"))
  Image.new("CMYK", (50, 40), (0, 255, 255, 0)).save(os.path.join(img, "000000000011.jpg"))
  Image.fromarray(np.full((40, 50), 65535, np.uint16)).save(os.path.join(img, "000000000012.png"))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise for display
  _rgb(60, 40).save(os.path.join(img, "000000000013.jpg"), exif=exif)
  _rgb(300, 200).save(os.path.join(img, "000000000014.jpg"))
  _rgb(64, 64).save(os.path.join(img, "full.jpg"))
  with open(os.path.join(img, "full.jpg"), "rb") as f:
    data = f.read()
  with open(os.path.join(img, "000000000015.jpg"), "wb") as f:
    f.write(data[:len(data) // 2])  # truncated
  with open(os.path.join(img, "000000000016.jpg"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n garbage bytes")
  _rgb(30, 30).save(os.path.join(img, "000000000018.jpg"))
  images = [{"id": i, "file_name": f"{i:012d}." + ("png" if i in (10, 12) else "jpg"),
             "width": 50, "height": 40} for i in range(10, 19)]

  def ann(aid, image_id, cat, bbox, **kw):
    return dict({"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox,
                 "area": 1.0, "iscrowd": 0,
                 "segmentation": [[0, 0, 1, 0, 1, 1], [2, 2, 3, 2, 3, 3]]}, **kw)
  anns = [
      ann(1, 10, 1, [5, 5, 10, 10]),
      ann(2, 11, 3, [0, 0, 20, 20], iscrowd=1,
          segmentation={"counts": [0, 10, 90], "size": [40, 50]}),
      ann(3, 12, 90, [1, 1, 5, 5]),
      ann(4, 13, 1, [0, 0, 30, 50]),
      ann(5, 14, 1, [30, 20, 150, 100]),
      ann(6, 15, 1, [1, 1, 5, 5]),
      ann(7, 16, 1, [1, 1, 5, 5]),
      ann(8, 17, 1, [1, 1, 5, 5]),
      ann(9, 10, 2, [1, 1, 5, 5]),               # category id 2 is not in the file
      ann(10, 10, 1, [float("nan"), 1, 5, 5]),
  ]
  cats = [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
          {"id": 1, "name": "person", "supercategory": "person"},
          {"id": 3, "name": "car", "supercategory": "vehicle"}]
  with open(os.path.join(root, "instances.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)


@pytest.fixture()
def vg_dir(tmp_path):
  write_vg_fixture(str(tmp_path))
  return str(tmp_path)


def test_vg_split_and_region_rules(vg_dir, tmp_path):
  records, info = vg.read_vg(*(os.path.join(vg_dir, n) for n in (
      "region_descriptions.json", "image_data.json", "densecap_splits.json", "images")),
                             "train")
  assert info["mismatched"] == 0 and len(records) == 10
  assert [r["region_id"] for r in records] == list(range(1, 11))  # numbered per split
  assert {r["image_id"] for r in records} == {1, 2}
  out = str(tmp_path / "out")
  data, report = common.clean_split(records, out_dir=out, split="train",
                                    max_caption_tokens=info["max_caption_tokens"])
  got = {a["id"]: (a["caption"], [round(v, 3) for v in a["bbox"]])
         for a in data["annotations"]}
  assert got == {
      1: ("a red kite", [2, 3, 10, 10]),
      2: ("man", [5, 0, 10, 6]),
      3: ("dog", [60, 10, 4, 5]),
      5: ("pole", [19, 20, 1, 5]),
      8: ("cafe half cake", [30, 30, 10, 10]),
      10: ("a dog", [1, 1, 9, 9]),
  }
  assert report.skipped == {"box_outside_image": 1, "caption_too_long": 1, "caption_empty": 1,
                            "box_negative_size": 1}
  assert report.repaired == {"box_clipped": 2, "box_widened": 1, "image_mode_L": 1}
  assert (report.regions_in, report.regions_out, report.images_out) == (10, 6, 2)
  gray = next(im for im in data["images"] if im["id"] == 2)
  assert gray["file_name"].startswith(out) and Image.open(gray["file_name"]).mode == "RGB"
  plain = next(im for im in data["images"] if im["id"] == 1)
  assert plain["file_name"] == os.path.join(vg_dir, "images", "1.jpg")  # used in place
  val, _ = vg.read_vg(*(os.path.join(vg_dir, n) for n in (
      "region_descriptions.json", "image_data.json", "densecap_splits.json", "images")), "val")
  assert [(r["image_id"], r["caption"]) for r in val] == [(3, "sky")]


def test_vg_misaligned_lists_are_counted(vg_dir):
  path = os.path.join(vg_dir, "region_descriptions.json")
  with open(path) as f:
    regions = json.load(f)
  regions[1]["id"] = 77
  with open(path, "w") as f:
    json.dump(regions, f)
  records, info = vg.read_vg(path, os.path.join(vg_dir, "image_data.json"),
                             os.path.join(vg_dir, "densecap_splits.json"), vg_dir, "train")
  assert info["mismatched"] == 1 and {r["image_id"] for r in records} == {1}


def test_coco_image_matrix(tmp_path):
  root = str(tmp_path)
  write_coco_fixture(root)
  records, info = coco.read_coco_instances(os.path.join(root, "instances.json"),
                                           os.path.join(root, "images"))
  assert info["categories"] == ["person", "car", "toothbrush"]  # ascending category id
  out = str(tmp_path / "out")
  data, report = common.clean_split(records, out_dir=out, split="val",
                                    categories=info["categories"])
  assert report.skipped == {"image_corrupt": 2, "image_missing": 1,
                            "regions_of_skipped_images": 3, "unknown_category": 1, "box_nan": 1}
  assert report.repaired == {"image_mode_RGBA": 1, "image_mode_CMYK": 1, "image_mode_I;16": 1,
                             "image_exif_rotated": 1}
  assert report.regions_out == 5 and report.images_out == 5  # image 18 has no annotation
  anns = {a["id"]: a for a in data["annotations"]}
  assert {i: a["category"] for i, a in anns.items()} == {
      1: "person", 2: "car", 3: "toothbrush", 4: "person", 5: "person"}
  # A large clean image is used in place at its own resolution, its boxes unchanged.
  np.testing.assert_allclose(anns[5]["bbox"], [30, 20, 150, 100])
  files = {im["id"]: im for im in data["images"]}
  for i in (10, 11, 12, 13, 14):
    with Image.open(files[i]["file_name"]) as im:
      assert im.mode == "RGB" and im.size == (files[i]["width"], files[i]["height"])
  assert (files[13]["width"], files[13]["height"]) == (40, 60)  # EXIF-rotated
  assert (files[14]["width"], files[14]["height"]) == (300, 200)
  rgba = np.asarray(Image.open(files[10]["file_name"]))
  assert rgba[0, 0].tolist() == [0, 0, 0] and rgba[0, 20].tolist() == [200, 0, 0]
  assert np.asarray(Image.open(files[12]["file_name"])).min() == 255  # 16-bit white -> 255
  # Our record format reads back through JsonSource.
  with open(os.path.join(out, "val.json"), "w") as f:
    json.dump(data, f)
  table = sources.JsonSource(out, "val").table
  assert table.category.tolist() == [0, 1, 2, 0, 0]
  assert table.caption.tolist() == ["person", "car", "toothbrush", "person", "person"]


def test_ovad_attributes(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "images"))
  _rgb(64, 48).save(os.path.join(root, "images", "000000000042.jpg"))
  attrs = [{"id": 0, "name": "color:black", "type": "color", "parent_type": "color",
            "is_has_att": "is", "freq_set": "head"},
           {"id": 1, "name": "hair length:long", "type": "hair length", "parent_type": "length",
            "is_has_att": "has", "freq_set": "medium"},
           {"id": 2, "name": "texture:soft/fluffy", "type": "texture",
            "parent_type": "texture", "is_has_att": "is", "freq_set": "tail"}]
  anns = [{"id": 0, "image_id": 42, "category_id": 18, "bbox": [10.5, 20.0, 30.0, 0.86],
           "area": 1.0, "iscrowd": 0, "att_vec": [1, -1, 0]},
          {"id": 1, "image_id": 42, "category_id": 18, "bbox": [1, 1, 5, 5], "area": 1.0,
           "iscrowd": 0, "att_vec": [1, 2, 0]},
          {"id": 2, "image_id": 42, "category_id": 18, "bbox": [1, 1, 5, 5], "area": 1.0,
           "iscrowd": 0, "att_vec": [1, 0]}]
  ovad_json = {"info": {}, "licenses": [], "categories": [
      {"supercategory": "animal", "isthing": 1, "id": 18, "name": "dog", "ov_set": "novel"}],
      "attributes": attrs, "images": [{"id": 42, "file_name": "000000000042.jpg",
                                      "height": 48, "width": 64}], "annotations": anns}
  with open(os.path.join(root, "ovad.json"), "w") as f:
    json.dump(ovad_json, f)
  records, info = ovad.read_ovad(os.path.join(root, "ovad.json"), os.path.join(root, "images"))
  assert info["attributes"] == ["color:black", "hair length:long", "texture:soft/fluffy"]
  data, report = common.clean_split(records, out_dir=root, split="test",
                                    categories=info["categories"],
                                    attribute_names=info["attributes"])
  assert report.skipped == {"bad_attributes": 1}
  assert report.repaired == {"box_widened": 1, "attribute_value_ignored": 1}
  anns = {a["id"]: a for a in data["annotations"]}
  assert anns[0]["att_vec"] == [1, -1, 0] and anns[1]["att_vec"] == [1, -1, 0]
  # Sub-pixel height 0.86 widened to 1 px upwards (y2 > 0 moves the top edge).
  np.testing.assert_allclose(anns[0]["bbox"], [10.5, 19.86, 30.0, 1.0], rtol=1e-6)
  with open(os.path.join(root, "test.json"), "w") as f:
    json.dump(data, f)
  table = sources.JsonSource(root, "test").table
  assert table.attributes.tolist() == [[1, -1, 0], [1, -1, 0]]
  assert table.attribute_names == info["attributes"] and table.category.tolist() == [0, 0]


def test_refcocog_and_caption_files(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "images"))
  _rgb(64, 48).save(os.path.join(root, "images", "COCO_train2014_000000581857.jpg"))
  mdetr = {"images": [
      {"id": 90001, "original_id": 581857, "file_name": "COCO_train2014_000000581857.jpg",
       "height": 48, "width": 64, "caption": "The woman in a green coat.",
       "dataset_name": "refcocog", "tokens_negative": [[0, 9]]},
      {"id": 90002, "original_id": 581857, "file_name": "COCO_train2014_000000581857.jpg",
       "height": 48, "width": 64, "caption": "a lady wearing green", "dataset_name": "refcocog",
       "tokens_negative": []}],
      "annotations": [
          {"id": 120001, "image_id": 90001, "original_id": 7, "bbox": [3.5, 6.25, 20.0, 30.5],
           "area": 610.0, "iscrowd": 0, "category_id": 1, "tokens_positive": [[4, 9]]},
          {"id": 120002, "image_id": 90002, "original_id": 7, "bbox": [3.5, 6.25, 20.0, 30.5],
           "area": 610.0, "iscrowd": 0, "category_id": 1, "tokens_positive": [[2, 6]]}],
      "categories": [{"supercategory": "person", "id": 1, "name": "person"}]}
  with open(os.path.join(root, "mdetr.json"), "w") as f:
    json.dump(mdetr, f)
  records, _ = refcocog.read_refcocog(os.path.join(root, "mdetr.json"),
                                      os.path.join(root, "images"))
  parser = tags.TagParser(["woman", "coat", "green coat", "green", "lady"])
  data, report = common.clean_split(records, out_dir=root, split="train",
                                    tag_parser=parser)
  assert report.regions_out == 2 and not report.skipped and not report.repaired
  assert [a["tag_ids"] for a in data["annotations"]] == [[0, 1, 2, 3], [3, 4]]
  with open(os.path.join(root, "train.json"), "w") as f:
    json.dump(data, f)
  table = sources.JsonSource(root, "train").table
  assert table.caption.tolist() == ["the woman in a green coat", "a lady wearing green"]
  np.testing.assert_allclose(table.box[0], [3.5, 6.25, 23.5, 36.75])
  assert table.image_id.tolist() == [90001, 90002]

  glamm = {"images": [{"id": 2400001, "file_name": "COCO_train2014_000000581857.jpg",
                       "height": 48, "width": 64}],
           "annotations": [{"id": 2400001, "image_id": 2400001, "bbox": [30.0, 41.0, 12.0, 4.0],
                            "caption": "white plate with food on it"}]}
  with open(os.path.join(root, "glamm.json"), "w") as f:
    json.dump(glamm, f)
  records, _ = vg.read_coco_captions(os.path.join(root, "glamm.json"),
                                     os.path.join(root, "images"))
  assert records[0]["region_id"] == records[0]["image_id"] == 2400001
  assert records[0]["box"] == [30.0, 41.0, 42.0, 45.0]
  assert records[0]["caption"] == "white plate with food on it"


def test_clean_box_rules():
  report = common.Report()
  cases = {
      (0.0, 0.0, 10.0, 10.0): [0, 0, 10, 10],
      (-5.0, 2.0, 10.0, 12.0): [0, 2, 10, 12],
      (3.0, 3.0, 3.0, 3.0): [2, 2, 3, 3],            # zero area: left/top edges move out
      (0.0, 0.0, 0.0, 0.5): [0, 0, 1, 1],            # at the origin: right/bottom edges move
      (20.0, 0.0, 30.0, 5.0): None,                  # right of a 20-px image
      (5.0, 5.0, 4.0, 9.0): None,                    # negative width
      (math.inf, 0.0, 1.0, 1.0): None,
  }
  for box, want in cases.items():
    got = common.clean_box(box, 20, 20, report, str(box))
    assert (got if got is None else [round(v, 6) for v in got]) == want, box
  assert report.skipped == {"box_outside_image": 1, "box_negative_size": 1, "box_nan": 1}
  assert report.repaired == {"box_clipped": 1, "box_widened": 2}
