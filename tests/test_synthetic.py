"""The synthetic region world: determinism, counts, held-out compositions, boxes, captions."""

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from dynrefer_jax.data import synthetic

COUNTS = {"train": 24, "val": 4, "test": 4, "heldout": 8}
SIZE = 96


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("syn") / "world")
  synthetic.generate(root, seed=3, num_images=COUNTS, image_size=SIZE)
  return root


def _load(root, split):
  with open(os.path.join(root, f"{split}.json")) as f:
    return json.load(f)


def test_vocabulary_sizes():
  meta = synthetic.build_meta(0, COUNTS, SIZE)
  assert len(meta["categories"]) >= 8
  groups = collections.Counter(a["group"] for a in meta["attributes"])
  assert groups == {"color": 8, "pattern": 4, "size": 3}
  assert len(meta["heldout_pairs"]) == 8
  assert set(meta["attribute_prompts"]["color:red"]) == {"the red", "the  is red"}


def test_counts_and_files(world):
  for split, count in COUNTS.items():
    data = _load(world, split)
    assert len(data["images"]) == count
    for im in data["images"]:
      with Image.open(os.path.join(world, "images", im["file_name"])) as img:
        assert img.size == (im["width"], im["height"]) and img.mode == "RGB"
  per_image = collections.Counter(a["image_id"] for a in _load(world, "train")["annotations"])
  assert len(per_image) == COUNTS["train"]
  assert 3 <= min(per_image.values()) and max(per_image.values()) <= 10
  ids = [a["id"] for s in COUNTS for a in _load(world, s)["annotations"]]
  assert len(ids) == len(set(ids))


def test_deterministic_from_seed(world, tmp_path):
  again = str(tmp_path / "again")
  synthetic.generate(again, seed=3, num_images=COUNTS, image_size=SIZE)
  other = str(tmp_path / "other")
  synthetic.generate(other, seed=4, num_images=COUNTS, image_size=SIZE)
  for split in COUNTS:
    assert _load(again, split) == _load(world, split)
    assert _load(other, split) != _load(world, split)
  name = _load(world, "train")["images"][5]["file_name"]
  a = np.asarray(Image.open(os.path.join(world, "images", name)))
  b = np.asarray(Image.open(os.path.join(again, "images", name)))
  np.testing.assert_array_equal(a, b)


def test_heldout_compositions(world):
  held = {tuple(p) for p in synthetic.build_meta(3, COUNTS, SIZE)["heldout_pairs"]}
  for split in ("train", "val", "test"):
    for a in _load(world, split)["annotations"]:
      assert (a["category"], a["colour"]) not in held
      # The neighbour named in a relation caption is no held-out pair either.
      assert not any(f" {c} {k}" in a["caption"] for k, c in held)
  heldout = _load(world, "heldout")["annotations"]
  assert heldout and all((a["category"], a["colour"]) in held for a in heldout)


def test_boxes_valid_and_small_objects_exist(world):
  small = 0
  for split in COUNTS:
    data = _load(world, split)
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for a in data["annotations"]:
      x, y, w, h = a["bbox"]
      iw, ih = sizes[a["image_id"]]
      assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= iw and y + h <= ih
      if a["size"] == "small":
        assert max(w, h) <= 0.12 * SIZE
        small += 1
  assert small >= 10


def test_object_is_drawn_inside_its_box(world):
  # An unoccluded plain large object: its box centre has (about) its colour.
  data = _load(world, "train")
  boxes = collections.defaultdict(list)
  for a in data["annotations"]:
    boxes[a["image_id"]].append(a)
  checked = 0
  for a in data["annotations"]:
    if a["pattern"] != "plain" or a["category"] in ("ring", "star", "heart", "triangle"):
      continue
    x, y, w, h = a["bbox"]
    cx, cy = int(x + w / 2), int(y + h / 2)
    others = [o for o in boxes[a["image_id"]] if o is not a and
              o["bbox"][0] <= cx < o["bbox"][0] + o["bbox"][2] and
              o["bbox"][1] <= cy < o["bbox"][1] + o["bbox"][3]]
    if others:
      continue
    im = data["images"][a["image_id"] - 1]
    pix = np.asarray(Image.open(os.path.join(world, "images", im["file_name"])))[cy, cx]
    want = np.array(synthetic.COLOURS[a["colour"]], np.float32)
    # Lighting varies by at most +-30% around the mean, plus noise.
    assert np.all(np.abs(pix - want) <= 0.35 * want + 12), (a, pix)
    checked += 1
  assert checked >= 5


def test_captions_small_language_and_relations(world):
  data = _load(world, "train")
  cats = collections.defaultdict(list)
  for a in data["annotations"]:
    cats[a["image_id"]].append(a["category"])
  words = set()
  for a in data["annotations"]:
    toks = a["caption"].split()
    words.update(toks)
    assert len(toks) <= 12
    assert a["colour"] in toks and a["category"] in toks
    has_distractor = cats[a["image_id"]].count(a["category"]) > 1
    has_relation = any(r in a["caption"] for r in synthetic.RELATIONS)
    assert has_relation == has_distractor, a
    assert toks[0] == ("the" if has_distractor else "a")
  assert len(words) <= 60


def test_attributes_one_positive_per_group(world):
  for a in _load(world, "val")["annotations"]:
    pos = sorted(n for n, v in a["attributes"].items() if v == 1)
    assert pos == sorted([f"color:{a['colour']}", f"pattern:{a['pattern']}",
                          f"size:{a['size']}"])
    assert set(a["attributes"].values()) <= {1, 0, -1}


def test_describe_hand_written_scene():
  star = {"category": "star", "colour": "red", "size": "small", "pattern": "striped",
          "x0": 10, "y0": 50, "side": 10}
  ring = {"category": "ring", "colour": "blue", "size": "medium", "pattern": "plain",
          "x0": 40, "y0": 48, "side": 20}
  star2 = {"category": "star", "colour": "green", "size": "large", "pattern": "dotted",
           "x0": 60, "y0": 0, "side": 30}
  cap, s1, s2 = synthetic.describe(star, [star, ring, star2])
  assert cap == "the small striped red star left of the blue ring"
  assert set(s1) == {"star", "red star", "small", "red", "striped"}
  assert set(s2) == {"left of", "ring", "blue ring", "blue"}
  cap, s1, s2 = synthetic.describe(ring, [star, ring])
  assert cap == "a medium blue ring" and set(s1) == {"ring", "blue ring", "medium", "blue"}
  assert s2 == []
  cap, s1, s2 = synthetic.describe(star2, [ring, star2])
  assert cap == "a large green star with dots" and s2 == ["dots"]
  cap, _, _ = synthetic.describe(star2, [star, ring, star2])
  assert cap == "the large dotted green star above the blue ring"


def test_photo_like_scenes_partial_occlusion_and_distractors(world):
  """Boxes of different objects overlap somewhere (later objects partially occlude earlier ones;
  the sampler caps the overlap of their squares); same-category distractors occur; the background outside every box is textured, not
  flat (texture + grain + lighting gradient)."""
  data = _load(world, "train")
  by_image = collections.defaultdict(list)
  for a in data["annotations"]:
    by_image[a["image_id"]].append(a)
  overlapping = distractors = 0
  for anns in by_image.values():
    cats = collections.Counter(a["category"] for a in anns)
    distractors += sum(n > 1 for n in cats.values())
    for i, a in enumerate(anns):
      ax, ay, aw, ah = a["bbox"]
      for b in anns[i + 1:]:
        bx, by, bw, bh = b["bbox"]
        iw = min(ax + aw, bx + bw) - max(ax, bx)
        ih = min(ay + ah, by + bh) - max(ay, by)
        if iw > 0 and ih > 0:
          overlapping += 1
  assert overlapping >= 3 and distractors >= 3, (overlapping, distractors)
  im = data["images"][0]
  pix = np.asarray(Image.open(os.path.join(world, "images", im["file_name"])), np.float32)
  free = np.ones(pix.shape[:2], bool)
  for a in by_image[im["id"]]:
    x, y, w, h = (int(v) for v in a["bbox"])
    free[max(y - 1, 0):y + h + 1, max(x - 1, 0):x + w + 1] = False
  assert free.sum() > 500
  assert pix[free].mean(-1).std() > 4.0
