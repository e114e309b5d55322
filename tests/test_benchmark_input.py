"""tools/benchmark_input.py at toy scale: both formats hold the same regions, and a measured
training process gets batches from the TFDS one."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from dynrefer_jax.data import builders, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "benchmark_input", os.path.join(ROOT, "tools", "benchmark_input.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_both_formats_hold_the_same_regions_and_the_new_one_trains(tmp_path):
  jpegs = []
  for i, (w, h) in enumerate(((64, 48), (40, 56))):
    path = str(tmp_path / f"{i}.jpg")
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path)
    jpegs.append(path)
  work = str(tmp_path / "work")
  results = bench.main(["--work", work, "--images", "6", "--regions", "40", "--jpegs", *jpegs,
                        "--batch", "8", "--steps", "2", "--paths", "after"])
  after = results["after"]
  assert after["regions"] == 40 and after["regions_per_s"] > 0
  assert 0 < after["peak_rss_gib"] < 16 and after["start_to_first_batch_s"] > 0

  with open(os.path.join(work, "json_records", "vg", "train.json")) as f:
    data = json.load(f)  # the record file of the JSON path, as sources.JsonSource read it
  assert len(data["images"]) == 6 and len(data["annotations"]) == 40
  src = sources.RegionSource(builders.load("vg", os.path.join(work, "tfds")), "train")
  r = src.read(np.arange(src.num_examples))
  assert r.region_id.tolist() == [a["id"] for a in data["annotations"]]
  assert r.image_id.tolist() == [a["image_id"] for a in data["annotations"]]
  np.testing.assert_allclose(
      r.box, [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in data["annotations"])],
      rtol=1e-5)
  assert r.caption == [a["caption"] for a in data["annotations"]]
  assert [t.tolist() for t in r.tag_ids] == [a["tag_ids"] for a in data["annotations"]]
  assert len(src.tag_vocab) == bench.NUM_TAGS and src.tag_vocab == data["vocab"]["tags"]
  files = {im["id"]: im["file_name"] for im in data["images"]}
  for i in range(len(r)):
    with open(files[r.image_id[i]], "rb") as f:
      assert r.image[i] == f.read()
