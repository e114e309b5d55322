"""The synthetic region world: photo-like scenes of patterned shapes, deterministic from a seed.

It is the dataset that runs anywhere (CI, a laptop, the default main job) and that a small model
trained from scratch on a CPU can learn in minutes, so the language is small and regular:

- 8 categories x 8 colours x 3 sizes x 4 surface patterns; 3-10 objects per image drawn in
  order, so later objects partially occlude earlier ones; textured backgrounds with a lighting
  gradient.
- The caption is a deterministic function of the scene (so the task is learnable, and CIDEr can
  be high), with three templates:
    * an object whose category is unique in the image:        "a small striped red star"
    * a large, patterned, unique object:                        "a large red star with stripes"
    * an object with a same-category distractor in the image:   "the small striped red star left
      of the blue ring" (relation to its nearest neighbour; the context views are needed).
  Plain objects carry no pattern word. At most 10 words; about 35 words in all.
- Per object: tags (strings, split as SPEC §7a into `tag_set1` for the subject and `tag_set2` for
  the relation and its object; the tag vocabulary holds nouns and attribute-noun phrases),
  attributes (name -> 1 positive / 0 negative / -1 ignore, OVAD-like, groups colour/pattern/size),
  and a category.
- Splits `train`, `val`, `test` never contain the held-out (category, colour) pairs;
  `heldout` annotates only objects with such a pair (compositional generalisation).

On disk (`generate`; the TFDS builder data/builders/synthetic.py renders the world with it and
stores it as the dataset `dynrefer_synthetic`):
  out_dir/meta.json                 vocabularies, held-out pairs, generation parameters, version
  out_dir/images/<split>/<id>.png
  out_dir/<split>.json              COCO-style: images[{id, file_name, height, width}],
                                    annotations[{id, image_id, bbox [x, y, w, h], caption, tags,
                                    tag_set1, tag_set2, attributes {name: 1/0/-1}, category,
                                    category_id}]
Boxes are tight around the drawn mask, in pixels: x, y of the top-left pixel, w, h in pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image

VERSION = 1

CATEGORIES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215),
    "yellow": (240, 215, 35), "purple": (135, 45, 175), "orange": (245, 135, 25),
    "white": (245, 245, 245), "black": (22, 22, 22),
}
SIZES = ("small", "medium", "large")
PATTERNS = ("plain", "striped", "dotted", "checkered")
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "val", "test", "heldout")
DEFAULT_NUM_IMAGES = {"train": 600, "val": 50, "test": 50, "heldout": 50}

# Object side as a fraction of the image side, per size class. Small objects are ~10-14 px at
# 128 px: their pattern (period ~1/4 of the object) is legible only in the tight t=0 view.
_SIZE_RANGE = {"small": (0.08, 0.11), "medium": (0.17, 0.22), "large": (0.30, 0.37)}
# Colours whose pattern is drawn lighter (mixed with white); the others get a darker pattern.
_DARK_COLOURS = ("red", "green", "blue", "purple", "black")


def heldout_pairs() -> list[tuple[str, str]]:
  """(category, colour) pairs never seen in train/val/test: one colour per category and vice versa."""
  colours = list(COLOURS)
  return [(c, colours[(3 * i + 1) % len(colours)]) for i, c in enumerate(CATEGORIES)]


def attribute_names() -> list[str]:
  """OVAD-style "<group>:<value>" names, in index order."""
  return ([f"color:{c}" for c in COLOURS] + [f"pattern:{p}" for p in PATTERNS]
          + [f"size:{s}" for s in SIZES])


def tag_vocabulary() -> list[str]:
  """Tags: nouns, attribute words, colour-noun phrases, pattern nouns and relation words."""
  return (list(CATEGORIES) + list(COLOURS) + list(SIZES) + list(PATTERN_NOUNS)
          + list(PATTERN_NOUNS.values()) + [f"{c} {k}" for c in COLOURS for k in CATEGORIES]
          + list(RELATIONS))


def _attribute_prompts() -> dict[str, list[str]]:
  """Prompt texts per attribute, following the OVAD "is"-type templates of SPEC §7b."""
  return {name: [f"the {name.split(':')[1]}", f"the  is {name.split(':')[1]}"]
          for name in attribute_names()}


def build_meta(seed: int, num_images: dict[str, int], image_size: int) -> dict[str, Any]:
  return {
      "version": VERSION,
      "seed": seed,
      "num_images": dict(num_images),
      "image_size": image_size,
      "categories": list(CATEGORIES),
      "attributes": [{"id": i, "name": n, "group": n.split(":")[0], "is_has_att": "is"}
                     for i, n in enumerate(attribute_names())],
      "attribute_prompts": _attribute_prompts(),
      "tags": tag_vocabulary(),
      "relations": list(RELATIONS),
      "heldout_pairs": [list(p) for p in heldout_pairs()],
  }


# ----------------------------------------------------------------------------- drawing


def _shape_mask(category: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """bool mask of `category` on local coordinates u (right), v (down), both in [-1, 1]."""
  r = np.hypot(u, v)
  if category == "circle":
    return r <= 0.95
  if category == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85
  if category == "triangle":  # apex up
    return (v <= 0.85) & (np.abs(u) <= (v + 0.95) / 1.8 * 0.95)
  if category == "star":
    theta = np.arctan2(v, u) + np.pi / 2
    return r <= 0.42 + 0.55 * ((np.cos(5 * theta) + 1) / 2) ** 2
  if category == "ring":
    return (r <= 0.95) & (r >= 0.55)
  if category == "cross":
    return (((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95))
            | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95)))
  if category == "diamond":
    return np.abs(u) + np.abs(v) <= 0.98
  if category == "heart":
    x, y = u * 1.25, -v * 1.25 + 0.25
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
  raise ValueError(category)


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """bool mask of the secondary colour of `pattern` (about 4 periods across the object)."""
  if pattern == "plain":
    return np.zeros(u.shape, bool)
  if pattern == "striped":
    return np.mod((u + v) * 2.2, 1.0) < 0.5
  if pattern == "dotted":
    fu, fv = np.mod(u * 2.5, 1.0) - 0.5, np.mod(v * 2.5, 1.0) - 0.5
    return fu * fu + fv * fv < 0.09
  if pattern == "checkered":
    return (np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 0
  raise ValueError(pattern)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """float32[h, w, 3] in [0, 255]: a muted base colour, low-frequency texture, fine grain and a
  linear lighting gradient."""
  base = rng.uniform(95, 165) + rng.uniform(-25, 25, size=3)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  texture = np.zeros((h, w), np.float32)
  for _ in range(4):
    fx, fy = rng.uniform(-0.25, 0.25, size=2)
    texture += rng.uniform(4, 10) * np.sin(fx * xx + fy * yy + rng.uniform(0, 2 * np.pi))
  grain = rng.normal(0, 4, size=(h, w)).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
  light = 1.0 + rng.uniform(0.1, 0.3) * (ramp - ramp.mean())
  img = (base[None, None, :] + (texture + grain)[..., None]) * light[..., None]
  return img.astype(np.float32), light.astype(np.float32)


def _draw_object(img: np.ndarray, light: np.ndarray, obj: dict[str, Any]) -> tuple[int, ...]:
  """Paints `obj` onto img (in place) and returns its tight box (x, y, w, h) in pixels."""
  x0, y0, side = obj["x0"], obj["y0"], obj["side"]
  # Pixel centres of the side x side square mapped to [-1, 1].
  coords = (np.arange(side, dtype=np.float32) + 0.5) / side * 2 - 1
  v, u = np.meshgrid(coords, coords, indexing="ij")
  shape = _shape_mask(obj["category"], u, v)
  pattern = _pattern_mask(obj["pattern"], u, v) & shape
  colour = np.array(COLOURS[obj["colour"]], np.float32)
  mix_to = 255.0 if obj["colour"] in _DARK_COLOURS else 0.0
  second = colour + 0.62 * (mix_to - colour)
  patch = np.where(pattern[..., None], second, colour)
  patch = patch * light[y0:y0 + side, x0:x0 + side, None]
  region = img[y0:y0 + side, x0:x0 + side]
  region[shape] = patch[shape]
  rows, cols = np.nonzero(shape)
  return (x0 + int(cols.min()), y0 + int(rows.min()),
          int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1))


def _iou(a, b) -> float:
  ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[2], b[0] + b[2], b[1] + b[2]
  iw = max(0, min(ax2, bx2) - max(a[0], b[0]))
  ih = max(0, min(ay2, by2) - max(a[1], b[1]))
  inter = iw * ih
  return inter / (a[2] * a[2] + b[2] * b[2] - inter), inter / (b[2] * b[2])


# ----------------------------------------------------------------------------- scenes


def _sample_objects(rng, h, w, image_size, split) -> list[dict[str, Any]]:
  """Chooses 3-10 objects and places them with limited overlap (partial occlusion only)."""
  held = set(heldout_pairs())
  allowed = [(k, c) for k in CATEGORIES for c in COLOURS if (k, c) not in held]
  held_list = sorted(held)
  n = int(rng.integers(3, 11))
  objects = []
  for i in range(n):
    if split == "heldout" and (i == 0 or rng.random() < 0.25):
      category, colour = held_list[rng.integers(len(held_list))]
    else:
      category, colour = allowed[rng.integers(len(allowed))]
      if objects and rng.random() < 0.35:  # a same-category distractor
        category = objects[rng.integers(len(objects))]["category"]
        if (category, colour) in held and split != "heldout":
          colour = next(c for c in COLOURS if (category, c) not in held)
    size = SIZES[rng.integers(3)]
    lo, hi = _SIZE_RANGE[size]
    side = max(6, int(round(rng.uniform(lo, hi) * image_size)))
    for _ in range(30):  # rejection sampling of the position
      x0 = int(rng.integers(0, w - side + 1))
      y0 = int(rng.integers(0, h - side + 1))
      square = (x0, y0, side)
      ok = True
      for o in objects:
        iou, covered = _iou(square, (o["x0"], o["y0"], o["side"]))
        if iou > 0.15 or covered > 0.3:
          ok = False
          break
      if ok:
        break
    else:
      continue  # no room: drop this object (and any forced held-out retry happens next loop)
    objects.append({"category": category, "colour": colour, "size": size,
                    "pattern": PATTERNS[rng.integers(len(PATTERNS))],
                    "x0": x0, "y0": y0, "side": side})
  return objects


def _relation(obj, other) -> str:
  """Where `obj` is with respect to `other`, along the dominant axis of their centres."""
  dx = (other["x0"] + other["side"] / 2) - (obj["x0"] + obj["side"] / 2)
  dy = (other["y0"] + other["side"] / 2) - (obj["y0"] + obj["side"] / 2)
  if abs(dx) >= abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"


def describe(obj, objects) -> tuple[str, list[str], list[str]]:
  """The caption and the SPEC §7a tag sets (strings) of `obj` within its scene.

  The tags are what the rule parser of SPEC §7a gives on the caption, restricted to
  `tag_vocabulary()`: the subject's head noun, its colour-noun suffix span and its modifiers go
  to tag_set1; the relation word, the relation object's noun, colour-noun span and colour (or the
  pattern noun after "with") go to tag_set2.
  """
  k, c, s, p = obj["category"], obj["colour"], obj["size"], obj["pattern"]
  pattern_word = [] if p == "plain" else [p]
  set1 = [k, f"{c} {k}", s, c]
  others = [o for o in objects if o is not obj]
  distractor = any(o["category"] == k for o in others)
  if distractor:
    centre = np.array([obj["x0"] + obj["side"] / 2, obj["y0"] + obj["side"] / 2])
    near = min(others, key=lambda o: float(np.sum(
        (np.array([o["x0"] + o["side"] / 2, o["y0"] + o["side"] / 2]) - centre) ** 2)))
    rel = _relation(obj, near)
    caption = " ".join(["the", s, *pattern_word, c, k, rel, "the", near["colour"],
                        near["category"]])
    set2 = [rel, near["category"], f"{near['colour']} {near['category']}", near["colour"]]
    return caption, set1 + pattern_word, set2
  if s == "large" and p != "plain":
    return f"a large {c} {k} with {PATTERN_NOUNS[p]}", set1, [PATTERN_NOUNS[p]]
  return " ".join(["a", s, *pattern_word, c, k]), set1 + pattern_word, []


def _attributes(obj, rng) -> dict[str, int]:
  """1 for the object's colour/pattern/size, 0 for the others; ~10% of negatives ignored (-1)."""
  own = {f"color:{obj['colour']}", f"pattern:{obj['pattern']}", f"size:{obj['size']}"}
  out = {}
  for name in attribute_names():
    out[name] = 1 if name in own else (-1 if rng.random() < 0.1 else 0)
  return out


def render_image(seed: int, split: str, index: int, image_size: int):
  """Renders one scene. Returns (uint8[h, w, 3], objects, per-object boxes, rng)."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  h = image_size
  w = int(rng.integers(int(0.75 * image_size), image_size + 1))  # varied aspect ratios
  img, light = _background(rng, h, w)
  objects = _sample_objects(rng, h, w, image_size, split)
  boxes = [_draw_object(img, light, o) for o in objects]
  img = np.clip(img + rng.normal(0, 2.0, size=img.shape), 0, 255).astype(np.uint8)
  return img, objects, boxes, rng


def _generate_split(root: str, split: str, count: int, seed: int, image_size: int,
                    first_ann_id: int) -> dict[str, Any]:
  held = set(heldout_pairs())
  images, annotations = [], []
  os.makedirs(os.path.join(root, "images", split), exist_ok=True)
  ann_id = first_ann_id
  for i in range(count):
    img, objects, boxes, rng = render_image(seed, split, i, image_size)
    image_id = i + 1
    file_name = f"{split}/{image_id:06d}.png"
    Image.fromarray(img).save(os.path.join(root, "images", file_name), compress_level=1)
    images.append({"id": image_id, "file_name": file_name, "height": img.shape[0],
                   "width": img.shape[1]})
    for obj, box in zip(objects, boxes):
      if split == "heldout" and (obj["category"], obj["colour"]) not in held:
        continue
      caption, set1, set2 = describe(obj, objects)
      tags = list(dict.fromkeys(set1 + set2))
      annotations.append({
          "id": ann_id, "image_id": image_id, "bbox": list(box), "caption": caption,
          "tags": tags, "tag_set1": set1, "tag_set2": set2,
          "attributes": _attributes(obj, rng), "category": obj["category"],
          "category_id": CATEGORIES.index(obj["category"]),
          "colour": obj["colour"], "size": obj["size"], "pattern": obj["pattern"],
      })
      ann_id += 1
  return {"images": images, "annotations": annotations}


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def generate(out_dir: str, *, seed: int = 0, num_images: dict[str, int] | None = None,
             image_size: int = 128) -> dict[str, Any]:
  """Writes the world to `out_dir` atomically and returns its meta.

  Everything is written to a sibling temporary directory that is renamed into place at the end,
  so a killed run never leaves a half-written world behind. An existing `out_dir` is replaced.
  """
  num_images = dict(DEFAULT_NUM_IMAGES if num_images is None else num_images)
  for split in num_images:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  try:
    meta = build_meta(seed, num_images, image_size)
    ann_id = 1
    for split, count in num_images.items():
      data = _generate_split(tmp, split, count, seed, image_size, ann_id)
      ann_id += len(data["annotations"])
      data["dataset"] = {"description": f"synthetic-v{VERSION}", "image_root": "images"}
      _write_json(os.path.join(tmp, f"{split}.json"), data)
    _write_json(os.path.join(tmp, "meta.json"), meta)  # written last: marks completeness
    if os.path.exists(out_dir):
      stale = out_dir + f".stale-{os.getpid()}"
      os.replace(out_dir, stale)
      shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


def load_split(out_dir: str, split: str) -> dict[str, Any]:
  with open(os.path.join(out_dir, f"{split}.json")) as f:
    return json.load(f)


def load_meta(out_dir: str) -> dict[str, Any]:
  with open(os.path.join(out_dir, "meta.json")) as f:
    return json.load(f)
