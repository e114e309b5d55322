"""Shared record cleaning for the real-dataset builders: images, boxes, captions, labels.

A builder reads one public annotation format into *raw records* (one per region):

  {"image_file": str, "image_id": int, "region_id": int, "box": [x1, y1, x2, y2] (as given,
   possibly bad), "caption": str, "references": [str] (optional), "category": str | None,
   "att_vec": [A] | None}

`clean_images` validates every image once and every record, repairing or skipping it by the rules
below, and counts each decision in a `Report`. It never raises on a bad record. The TFDS builders
(base.RegionBuilder) write what it yields, one example per image, and keep the report.

Rules (the kind names are the keys of the report):

Images (decoded with PIL; `ImageFile.LOAD_TRUNCATED_IMAGES` stays False so truncation is caught)
  image_missing        file absent                                  -> skip its regions
  image_corrupt        cannot be decoded, or truncated              -> skip its regions
  image_too_large      more than images.MAX_PIXELS (12000 x 12000)  -> skip its regions
  image_mode_<MODE>    not 8-bit RGB (L, LA, P, RGBA, CMYK, I;16...) -> repair: converted to RGB
                       (16-bit scaled to 8 bit; alpha composited on black as the zero padding)
  image_exif_rotated   EXIF orientation != 1                        -> repair: pixels transposed
                       to the display orientation; boxes are taken to be in display coordinates
                       (what annotators saw)
  Images keep their resolution, whatever their size (the model cuts its views from windows of the
  full-resolution image, views/windows.py). A repaired image is stored re-encoded losslessly as
  PNG; a clean one as the bytes of its file.
Boxes (xyxy)
  box_nan              a non-finite coordinate                      -> skip
  box_negative_size    x2 < x1 or y2 < y1                           -> skip
  box_outside_image    no overlap with the image                    -> skip
  box_clipped          crosses the border                           -> repair: clipped to the image
  box_widened          width or height < 1 px (zero area)           -> repair: widened to 1 px as
                       the original loader does (left/top edge moves out, else the right/bottom
                       edge), except that the switch is at x2/y2 >= 1 rather than > 0 so the box
                       stays inside the image
Captions
  caption_empty        empty or punctuation-only after cleaning     -> skip
  caption_too_long     more tokens than the dataset's limit (VG 15) -> skip
Labels
  unknown_category     category not in the class list               -> skip
  bad_attributes       attribute vector of the wrong length         -> skip
  attribute_value_ignored  a value outside {1, 0, -1}               -> repair: set to -1 (ignore)
Ids
  duplicate_region_id  a region id seen before in the split         -> skip
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from dynrefer_jax.data import images

ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclasses.dataclass
class Report:
  """Counts of repairs and skips, with a few example records per kind."""
  repaired: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  regions_in: int = 0
  regions_out: int = 0
  images_out: int = 0

  def _note(self, kind: str, what: str) -> None:
    ex = self.examples.setdefault(kind, [])
    if len(ex) < 5:
      ex.append(what)

  def repair(self, kind: str, what: str, n: int = 1) -> None:
    self.repaired[kind] += n
    self._note(kind, what)

  def skip(self, kind: str, what: str, n: int = 1) -> None:
    self.skipped[kind] += n
    self._note(kind, what)

  def to_json(self) -> dict[str, Any]:
    return {"regions_in": self.regions_in, "regions_out": self.regions_out,
            "images_out": self.images_out, "repaired": dict(sorted(self.repaired.items())),
            "skipped": dict(sorted(self.skipped.items())), "examples": self.examples}


# ----------------------------------------------------------------------------- captions

# DenseCap's replacement table (jcjohnson/densecap preprocess.py, DATA_FORMATS §2.4).
_DENSECAP_REPLACE = {"½": "half", "—": "-", "™": "", "¢": "cent", "ç": "c", "û": "u", "é": "e",
                     "°": " degree", "è": "e", "…": ""}
_PUNCT = re.compile(r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]")


def densecap_tokens(phrase: str) -> list[str]:
  """VG phrase tokens as DenseCap/ControlCap: replacements, lower-case, ASCII punctuation
  deleted ("t-shirt" -> "tshirt"), split on whitespace."""
  for a, b in _DENSECAP_REPLACE.items():
    phrase = phrase.replace(a, b)
  return _PUNCT.sub("", phrase.lower()).split()


def is_empty_caption(text: str) -> bool:
  return not re.search(r"[0-9A-Za-z\u00C0-\uFFFF]", text or "")


# ----------------------------------------------------------------------------- boxes


def clean_box(box: Sequence[float], width: int, height: int, report: Report, what: str):
  """Returns the repaired xyxy box as a list of floats, or None when skipped."""
  if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
    report.skip("box_nan", what)
    return None
  x1, y1, x2, y2 = (float(v) for v in box)
  if x2 < x1 or y2 < y1:
    report.skip("box_negative_size", what)
    return None
  # Overlap with the image per axis; a zero-size box touching the image still counts as in.
  ix = min(x2, width) - max(x1, 0.0)
  iy = min(y2, height) - max(y1, 0.0)
  if ix < 0 or iy < 0 or (x2 > x1 and ix == 0) or (y2 > y1 and iy == 0):
    report.skip("box_outside_image", what)
    return None
  cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
  cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
  if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
    report.repair("box_clipped", what)
  if cx2 - cx1 < 1 or cy2 - cy1 < 1:
    if cx2 - cx1 < 1:
      cx1, cx2 = (cx2 - 1, cx2) if cx2 >= 1 else (cx1, cx1 + 1)
    if cy2 - cy1 < 1:
      cy1, cy2 = (cy2 - 1, cy2) if cy2 >= 1 else (cy1, cy1 + 1)
    report.repair("box_widened", what)
  return [cx1, cy1, cx2, cy2]


def coco_regions(path: str) -> tuple[dict, Iterator[tuple[dict, dict]]]:
  """Loads a COCO-style JSON; returns (data, (annotation, image) pairs). Annotations whose
  image is not listed are skipped (nothing to crop them from)."""
  with open(path) as f:
    data = json.load(f)
  images = {im["id"]: im for im in data["images"]}
  pairs = ((a, images[a["image_id"]]) for a in data["annotations"] if a["image_id"] in images)
  return data, pairs


def coco_category_records(path: str, image_dir: str | Sequence[str], *, attributes: bool = False
                          ) -> tuple[list[dict[str, Any]], list[str], dict]:
  """One record per annotation of a COCO-style JSON (COCO instances, OVAD): the box from `bbox`
  (xywh), the category name as caption and category (an unknown id becomes a category name that
  fails validation), `att_vec` when `attributes`. Returns (records, category names sorted by
  id, the loaded JSON)."""
  data, regions = coco_regions(path)
  cats = sorted(data["categories"], key=lambda c: c["id"])
  names = {c["id"]: c["name"] for c in cats}
  records = []
  for a, im in regions:
    name = names.get(a.get("category_id"))
    records.append({
        "image_file": find_image(image_dir, im["file_name"]), "image_id": a["image_id"],
        "region_id": a["id"], "box": xywh_to_xyxy(a.get("bbox")),
        "caption": name or "", "category": name if name is not None else
        f"<unknown id {a.get('category_id')}>",
        "att_vec": a.get("att_vec") if attributes else None})
  return records, [c["name"] for c in cats], data


def find_image(image_dirs: str | Sequence[str], file_name: str) -> str:
  """The path of `file_name` in the first of `image_dirs` that holds it (VG's images come in two
  folders); the first folder's path when none does (cleaning then reports it missing)."""
  dirs = [image_dirs] if isinstance(image_dirs, str) else list(image_dirs)
  for d in dirs:
    path = os.path.join(d, file_name)
    if os.path.exists(path):
      return path
  return os.path.join(dirs[0], file_name)


def xywh_to_xyxy(b: Sequence[Any]) -> list[float]:
  try:
    x, y, w, h = (float(v) for v in b)
  except (TypeError, ValueError):
    return [float("nan")] * 4
  return [x, y, x + w, y + h]


# ----------------------------------------------------------------------------- images


def check_image(path: str, report: Report):
  """Validates (and if needed repairs) one image.

  Returns (encoded bytes, (width, height) after repair, scale applied to boxes: (1, 1), as
  nothing is resized) or None when the image is skipped. A clean image keeps the bytes of its
  file; a repaired one is re-encoded as PNG (lossless: its pixels are exactly the repaired ones).
  """
  if not os.path.exists(path):
    report.skip("image_missing", path)
    return None
  try:
    with Image.open(path) as img:
      images.check_size(img, path)
      img.load()
      repaired = []
      orientation = images.orientation(img)
      if orientation != 1:
        img = ImageOps.exif_transpose(img)
        repaired.append("image_exif_rotated")
      if images.needs_rgb8(img):
        repaired.append(f"image_mode_{img.mode}")
        img = images.to_rgb8(img)
      if not repaired:
        with open(path, "rb") as f:
          return f.read(), img.size, (1.0, 1.0)
      buf = io.BytesIO()
      img.save(buf, format="PNG")
      for kind in repaired:
        report.repair(kind, path)
      with Image.open(path) as orig:
        ow, oh = ImageOps.exif_transpose(orig).size if orientation != 1 else orig.size
      return buf.getvalue(), img.size, (img.size[0] / ow, img.size[1] / oh)
  except images.ImageTooLarge as e:
    report.skip("image_too_large", str(e))
    return None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    report.skip("image_corrupt", f"{path}: {e}")
    return None


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class CleanImage:
  """One image that passed `clean_images`, with its kept regions (annotations below)."""
  image_id: int
  file_name: str         # the file it was read from
  encoded: bytes         # the file's bytes, or the repaired image as PNG
  width: int
  height: int
  regions: list[dict[str, Any]]


def clean_images(records: Iterable[dict[str, Any]], report: Report, *,
                 categories: Sequence[str] | None = None,
                 attribute_names: Sequence[str] | None = None,
                 max_caption_tokens: int | None = None, tag_parser=None
                 ) -> Iterator[CleanImage]:
  """Cleans raw records, image by image in order of first appearance (the builders write one
  example per yielded image). Counts every decision in `report`; never raises on a bad record.

  Each region: {id, image_id, box [x1, y1, x2, y2] (pixels of the repaired image), caption,
  references, category (name or None), att_vec ([A] of 1/0/-1, or None), tag_ids (with a
  tag_parser: the sorted union of the caption's two tag sets)}.
  """
  num_attributes = None if attribute_names is None else len(attribute_names)
  by_image = collections.defaultdict(list)
  for r in records:
    report.regions_in += 1
    by_image[(r["image_id"], r["image_file"])].append(r)
  cat_set = set(categories or ())
  seen_ids = set()
  for (image_id, image_file), regs in by_image.items():
    checked = check_image(image_file, report)
    if checked is None:
      report.skipped["regions_of_skipped_images"] += len(regs)
      continue
    encoded, (w, h), (sx, sy) = checked
    kept = []
    for r in regs:
      what = f"image {image_id} region {r['region_id']}"
      try:
        ann = _clean_region(r, w, h, sx, sy, report, what, cat_set, num_attributes,
                            max_caption_tokens, tag_parser, seen_ids)
      except Exception as e:  # never stop half-way on one bad record
        report.skip(f"error_{type(e).__name__}", f"{what}: {e}")
        ann = None
      if ann is not None:
        kept.append(ann)
    if kept:
      report.regions_out += len(kept)
      report.images_out += 1
      yield CleanImage(image_id, os.path.abspath(image_file), encoded, w, h, kept)


def _clean_region(r, w, h, sx, sy, report, what, cat_set, num_attributes, max_caption_tokens,
                  tag_parser, seen_ids):
  if r["region_id"] in seen_ids:
    report.skip("duplicate_region_id", what)
    return None
  category = r.get("category")
  if cat_set and category not in cat_set:
    report.skip("unknown_category", what)
    return None
  caption = r.get("caption") or ""
  if is_empty_caption(caption):
    report.skip("caption_empty", what)
    return None
  if max_caption_tokens is not None and len(caption.split()) > max_caption_tokens:
    report.skip("caption_too_long", what)
    return None
  att = r.get("att_vec")
  if num_attributes is not None:
    if att is None or len(att) != num_attributes:
      report.skip("bad_attributes", what)
      return None
    fixed = [v if v in (1, 0, -1) else -1 for v in att]
    if fixed != list(att):
      report.repair("attribute_value_ignored", what)
    att = fixed
  box = [v * s if isinstance(v, (int, float)) else v
         for v, s in zip(r["box"], (sx, sy, sx, sy))]
  box = clean_box(box, w, h, report, what)
  if box is None:
    return None
  seen_ids.add(r["region_id"])
  ann = {"id": r["region_id"], "image_id": r["image_id"], "box": box, "caption": caption,
         "references": r.get("references") or [caption], "category": category,
         "att_vec": att}
  if tag_parser is not None:
    set1, set2 = tag_parser.tag_ids(caption)
    ann["tag_ids"] = sorted(set(set1) | set(set2))
  return ann
