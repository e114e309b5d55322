"""Real-format readers and TFDS builders on tiny fixtures, and the bad-record matrix
(builders/common.py). The fixture writers lay files out as the builders' manual dir."""

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from dynrefer_jax.data import builders, sources, tags
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
  """instances_val2017.json and val2017/ whose images cover the image bad-record matrix."""
  img = os.path.join(root, "val2017")
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
  # Larger than the 1024 px prepare_data used to shrink images to (and than a 1024 window).
  _rgb(1280, 1040).save(os.path.join(img, "000000000014.jpg"))
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
  with open(os.path.join(root, "instances_val2017.json"), "w") as f:
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
  report = common.Report()
  images = list(common.clean_images(records, report,
                                    max_caption_tokens=info["max_caption_tokens"]))
  got = {a["id"]: (a["caption"], [round(v, 3) for v in a["box"]])
         for im in images for a in im.regions}
  assert got == {  # xyxy
      1: ("a red kite", [2, 3, 12, 13]),
      2: ("man", [5, 0, 15, 6]),
      3: ("dog", [60, 10, 64, 15]),
      5: ("pole", [19, 20, 20, 25]),
      8: ("cafe half cake", [30, 30, 40, 40]),
      10: ("a dog", [1, 1, 10, 10]),
  }
  assert report.skipped == {"box_outside_image": 1, "caption_too_long": 1, "caption_empty": 1,
                            "box_negative_size": 1}
  assert report.repaired == {"box_clipped": 2, "box_widened": 1, "image_mode_L": 1}
  assert (report.regions_in, report.regions_out, report.images_out) == (10, 6, 2)
  gray = next(im for im in images if im.image_id == 2)  # repaired: stored as an RGB PNG
  assert Image.open(io.BytesIO(gray.encoded)).mode == "RGB" and gray.encoded[:4] == b"\x89PNG"
  plain = next(im for im in images if im.image_id == 1)
  with open(os.path.join(vg_dir, "images", "1.jpg"), "rb") as f:
    assert plain.encoded == f.read()  # a clean image is stored as its file's bytes
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
  records, info = coco.read_coco_instances(os.path.join(root, "instances_val2017.json"),
                                           os.path.join(root, "val2017"))
  assert info["categories"] == ["person", "car", "toothbrush"]  # ascending category id
  report = common.Report()
  images = list(common.clean_images(records, report, categories=info["categories"]))
  assert report.skipped == {"image_corrupt": 2, "image_missing": 1,
                            "regions_of_skipped_images": 3, "unknown_category": 1, "box_nan": 1}
  assert report.repaired == {"image_mode_RGBA": 1, "image_mode_CMYK": 1, "image_mode_I;16": 1,
                             "image_exif_rotated": 1}
  assert report.regions_out == 5 and report.images_out == 5  # image 18 has no annotation
  anns = {a["id"]: a for im in images for a in im.regions}
  assert {i: a["category"] for i, a in anns.items()} == {
      1: "person", 2: "car", 3: "toothbrush", 4: "person", 5: "person"}
  # A large clean image is stored at its own resolution (its file's bytes), its boxes unchanged.
  np.testing.assert_allclose(anns[5]["box"], [30, 20, 180, 120])
  files = {im.image_id: im for im in images}
  decoded = {i: Image.open(io.BytesIO(im.encoded)) for i, im in files.items()}
  for i in (10, 11, 12, 13, 14):
    assert decoded[i].mode == "RGB" and decoded[i].size == (files[i].width, files[i].height)
  assert (files[13].width, files[13].height) == (40, 60)  # EXIF-rotated
  assert (files[14].width, files[14].height) == (1280, 1040)
  with open(os.path.join(root, "val2017", "000000000014.jpg"), "rb") as f:
    assert files[14].encoded == f.read()  # not re-encoded, not resized
  # A repaired image is re-encoded losslessly: its pixels are PIL's repair of the file's.
  with Image.open(os.path.join(root, "val2017", "000000000013.jpg")) as f:
    np.testing.assert_array_equal(np.asarray(decoded[13]), np.asarray(ImageOps.exif_transpose(f)))
  rgba = np.asarray(decoded[10])
  assert rgba[0, 0].tolist() == [0, 0, 0] and rgba[0, 20].tolist() == [200, 0, 0]
  assert np.asarray(decoded[12]).min() == 255  # 16-bit white -> 255


def test_ovad_attributes(tmp_path):
  root = str(tmp_path / "raw")
  os.makedirs(os.path.join(root, "val2017"))
  _rgb(64, 48).save(os.path.join(root, "val2017", "000000000042.jpg"))
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
  with open(os.path.join(root, "ovad2000.json"), "w") as f:
    json.dump(ovad_json, f)
  records, info = ovad.read_ovad(os.path.join(root, "ovad2000.json"),
                                 os.path.join(root, "val2017"))
  assert info["attributes"] == ["color:black", "hair length:long", "texture:soft/fluffy"]
  # Through the TFDS builder, read back by region.
  builder = builders.build("ovad", str(tmp_path / "data"), root)
  report = builder.info.metadata["splits"]["test"]["report"]
  assert report["skipped"] == {"bad_attributes": 1}
  assert report["repaired"] == {"box_widened": 1, "attribute_value_ignored": 1}
  r = sources.RegionSource(builder, "test").read([0, 1])
  assert r.region_id.tolist() == [0, 1]
  assert r.attributes.tolist() == [[1, -1, 0], [1, -1, 0]]  # the 2 repaired to -1 (ignore)
  # Sub-pixel height 0.86 widened to 1 px upwards (y2 > 0 moves the top edge).
  np.testing.assert_allclose(r.box[0], [10.5, 19.86, 40.5, 20.86], rtol=1e-6)
  assert r.category.tolist() == [0, 0] and r.caption == ["dog", "dog"]
  # Through another model's attribute list: matched by name, unknown ones -1 (ignore).
  r = sources.RegionSource(builder, "test", attribute_names=["texture:soft/fluffy", "size:big",
                                                             "Color:Black"]).read([0])
  assert r.attributes.tolist() == [[0, -1, 1]]


def test_refcocog_and_caption_files(tmp_path):
  root = str(tmp_path / "raw")
  os.makedirs(os.path.join(root, "train2014"))
  _rgb(64, 48).save(os.path.join(root, "train2014", "COCO_train2014_000000581857.jpg"))
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
  glamm = {"images": [{"id": 2400001, "file_name": "COCO_train2014_000000581857.jpg",
                       "height": 48, "width": 64}],
           "annotations": [{"id": 2400001, "image_id": 2400001, "bbox": [30.0, 41.0, 12.0, 4.0],
                            "caption": "white plate with food on it"}]}
  for name, obj in (("finetune_refcocog_train.json", mdetr),
                    ("finetune_refcocog_val_captions.json", glamm)):
    with open(os.path.join(root, name), "w") as f:
      json.dump(obj, f)
  with open(os.path.join(root, "ram_tag_list.txt"), "w") as f:
    f.write("woman\ncoat\ngreen coat\ngreen\nlady")
  records, _ = vg.read_coco_captions(os.path.join(root, "finetune_refcocog_val_captions.json"),
                                     os.path.join(root, "train2014"))
  assert records[0]["region_id"] == records[0]["image_id"] == 2400001
  assert records[0]["box"] == [30.0, 41.0, 42.0, 45.0]
  assert records[0]["caption"] == "white plate with food on it"

  builder = builders.build("refcocog", str(tmp_path / "data"), root)
  meta = builder.info.metadata["splits"]
  assert meta["train"]["report"]["regions_out"] == 2
  assert not meta["train"]["report"]["skipped"] and not meta["train"]["report"]["repaired"]
  assert meta["train"]["vocab"]["tags"] == ["woman", "coat", "green coat", "green", "lady"]
  train = sources.RegionSource(builder, "train")
  r = train.read([0, 1])
  # Tag sets parsed from the captions against ram_tag_list.txt (data/tags.py, by hand).
  assert [t.tolist() for t in r.tag_ids] == [[0, 1, 2, 3], [3, 4]]
  assert r.caption == ["the woman in a green coat", "a lady wearing green"]  # pre_caption
  np.testing.assert_allclose(r.box[0], [3.5, 6.25, 23.5, 36.75])
  assert r.image_id.tolist() == [90001, 90002]
  with open(os.path.join(root, "train2014", "COCO_train2014_000000581857.jpg"), "rb") as f:
    assert r.image[0] == f.read()
  # A model with another tag list: each caption parsed again against it.
  other = sources.RegionSource(builder, "train", tag_vocab=["lady", "coat"],
                               tag_parser=tags.TagParser(["lady", "coat"]))
  assert [t.tolist() for t in other.read([0, 1]).tag_ids] == [[1], [0]]
  val = sources.RegionSource(builder, "val").read([0])
  assert val.caption == ["white plate with food on it"] and val.region_id.tolist() == [2400001]
  assert val.references == [["white plate with food on it"]]


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


def _expected_regions(raw, dataset, split):
  """The regions of a fixture split straight from its raw annotation files, by the rules the
  record files of earlier versions followed (none of the fixture's records needs a repair):
  grouped by image in order of first appearance, xywh -> xyxy, VG phrases DenseCap-tokenised,
  captions LAVIS-preprocessed, tags parsed against the fixture's tag list."""
  from dynrefer_jax.data import captions, fixture  # pylint: disable=import-outside-toplevel
  parser = tags.TagParser(fixture.TAGS)
  load = lambda key: json.load(open(raw[key]))
  rows = []  # (image_id, region_id, xywh, caption, category name, att_vec)
  if dataset == "vg":
    wanted = set(load("densecap_splits")[split])
    rid = 1
    for entry in load("region_descriptions"):
      if entry["id"] not in wanted:
        continue
      for reg in entry["regions"]:
        rows.append((entry["id"], rid, [reg["x"], reg["y"], reg["width"], reg["height"]],
                     " ".join(common.densecap_tokens(reg["phrase"])), None, None))
        rid += 1
  else:
    key = {("vg_reg", "test"): "vg_reg", ("refcocog", "train"): "refcocog_train",
           ("refcocog", "val"): "refcocog_val", ("coco", "val"): "coco",
           ("ovad", "test"): "ovad"}[(dataset, split)]
    data = load(key)
    images = {im["id"]: im for im in data["images"]}
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    for a in data["annotations"]:
      im = images[a["image_id"]]
      category = names[a["category_id"]] if dataset in ("coco", "ovad") else None
      caption = (category if category else a.get("caption") or im.get("caption"))
      rows.append((a["image_id"], a["id"], a["bbox"], caption, category, a.get("att_vec")))
  order = list(dict.fromkeys(r[0] for r in rows))
  rows.sort(key=lambda r: order.index(r[0]))
  categories = [c["name"] for c in sorted(load("coco")["categories"], key=lambda c: c["id"])]
  return [{"image_id": im, "region_id": rid, "box": [x, y, x + w, y + h],
           "caption": captions.pre_caption(cap),
           "tags": (sorted(set(sum(parser.tag_ids(cap), [])))
                    if dataset in ("vg", "vg_reg", "refcocog") else []),
           "category": categories.index(cat) if cat else -1, "attributes": att}
          for im, rid, (x, y, w, h), cap, cat, att in rows]


def test_fixture_datasets_read_back_region_by_region(tmp_path):
  """Every dataset of data/fixture.py, built by its TFDS builder and read by region index,
  holds exactly the regions of its raw files, each with its image's bytes."""
  from dynrefer_jax.data import fixture  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "data")
  raw = fixture.ensure(root)
  want_splits = {"vg": ["train", "val", "test"], "vg_reg": ["test"],
                 "refcocog": ["train", "val"], "coco": ["val"], "ovad": ["test"]}
  for dataset, splits in want_splits.items():
    builder = builders.load(dataset, root)
    assert builder.is_prepared() and sorted(builder.info.splits) == sorted(splits)
    for split in splits:
      src = sources.RegionSource(builder, split)
      want = _expected_regions(raw, dataset, split)
      assert src.num_examples == len(want), (dataset, split)
      r = src.read(np.arange(src.num_examples))
      what = f"{dataset}/{split}"
      assert r.image_id.tolist() == [w["image_id"] for w in want], what
      assert r.region_id.tolist() == [w["region_id"] for w in want], what
      np.testing.assert_allclose(r.box, [w["box"] for w in want], rtol=1e-6, err_msg=what)
      assert r.caption == [w["caption"] for w in want], what
      assert r.references == [[w["caption"]] for w in want], what
      assert [t.tolist() for t in r.tag_ids] == [w["tags"] for w in want], what
      assert r.category.tolist() == [w["category"] for w in want], what
      if dataset == "ovad":
        assert r.attributes.tolist() == [w["attributes"] for w in want]
      else:
        assert r.attributes.shape == (len(want), 0)
      report = builder.info.metadata["splits"][split]["report"]
      assert report["regions_in"] == report["regions_out"] == len(want)
      assert not report["skipped"] and not report["repaired"]
      # The stored image is the file's own bytes.
      name = builder.as_data_source(split)[0]["file_name"]
      with open(os.path.join(raw["region_descriptions"].rsplit(os.sep, 1)[0],
                             name.decode()), "rb") as f:
        assert r.image[0] == f.read()


def test_synthetic_world_is_built_once_per_config(tmp_path):
  """The world's builder reuses a built world, builds another config (seed, counts, size) beside
  it, and leaves no temporary folder behind."""
  from dynrefer_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data.builders import synthetic as world  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "data")
  small = {"train": 2, "val": 1}
  a = builders.build("synthetic", root, config=world.world_config(1, small, 64))
  stamp = os.stat(a.data_path / "dataset_info.json").st_mtime_ns
  a = builders.build("synthetic", root, config=world.world_config(1, small, 64))
  assert os.stat(a.data_path / "dataset_info.json").st_mtime_ns == stamp
  b = builders.build("synthetic", root, config=world.world_config(2, small, 64))
  assert b.data_path != a.data_path and b.info.metadata["meta"]["seed"] == 2
  assert a.info.metadata["meta"] == synthetic.build_meta(1, small, 64)
  assert sorted(a.info.splits) == ["train", "val"]
  assert not [n for n in os.listdir(root) if "incomplete" in n or n.startswith(".synthetic")]
  assert not [n for n in os.listdir(os.path.join(root, "dynrefer_synthetic"))
              if "incomplete" in n]


def test_region_reads_equal_tfds_decoding(tmp_path):
  """RegionSource.read parses the serialized examples itself (sources._StoredImage); every
  region of every fixture split and of a synthetic world (attributes, several tags) reads as
  TFDS's own decoding of the example (`as_data_source`) gives it, in shuffled row order."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import captions, fixture  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data.builders import synthetic as world  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "data")
  fixture.ensure(root)
  splits = [(builders.load(d, root), s) for d, ss in (
      ("vg", ["train", "val", "test"]), ("vg_reg", ["test"]), ("refcocog", ["train", "val"]),
      ("coco", ["val"]), ("ovad", ["test"])) for s in ss]
  syn = builders.build("synthetic", root, config=world.world_config(3, {"train": 3}, 64))
  splits.append((syn, "train"))
  checked = {"attributes": 0, "untagged": 0, "tags": 0}
  for builder, split in splits:
    src = sources.RegionSource(builder, split)
    decoded = builder.as_data_source(  # TFDS's decoding (image bytes kept): the reference
        split, decoders={"image": tfds.decode.SkipDecoding()})
    rows = np.random.default_rng(0).permutation(src.num_examples)
    got = src.read(rows)
    for i, row in enumerate(rows):
      e = int(np.searchsorted(src.offsets, row, side="right") - 1)
      ex, k = decoded[e], int(row - src.offsets[e])
      reg = {name: value[k] for name, value in ex["regions"].items()}
      what = f"{builder.name}/{split} row {row}"
      assert got.image_id[i] == ex["image_id"] and got.region_id[i] == reg["id"], what
      np.testing.assert_array_equal(got.box[i], reg["box"], err_msg=what)
      assert got.caption[i] == captions.pre_caption(reg["caption"].decode()), what
      assert got.references[i] == [captions.pre_caption(r.decode())
                                   for r in reg["references"]], what
      assert got.tag_ids[i].tolist() == reg["tag_ids"].tolist(), what
      assert got.category[i] == src._cat_map[reg["category"]], what  # pylint: disable=protected-access
      if len(reg["attributes"]):
        np.testing.assert_array_equal(got.attributes[i], reg["attributes"], err_msg=what)
        checked["attributes"] += 1
      assert got.image[i] == ex["image"], what
      checked["untagged"] += len(reg["tag_ids"]) == 0
      checked["tags"] += len(reg["tag_ids"]) > 1
  # The ragged features' edge cases occurred: empty and several values in one region.
  assert all(checked.values()), checked
