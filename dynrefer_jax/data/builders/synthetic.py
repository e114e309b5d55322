"""The synthetic region world (data/synthetic.py) as a TFDS dataset: `bash run.sh`'s data.

No manual download: the builder renders the world from its config (seed, image counts per split,
image side) into a temporary folder with `synthetic.generate`, reads it back and deletes it. The
images are the generated PNG files' bytes (lossless: the pixels are the rendered ones); regions
keep the world's order, ids, captions, tags, categories and attributes, with the world's own
vocabularies in every split's metadata and its `meta.json` under `metadata["meta"]`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

import tensorflow_datasets as tfds

from dynrefer_jax.data import synthetic
from dynrefer_jax.data.builders import base


@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
  """One synthetic world: `world_config(...)` names it after its parameters."""
  seed: int = 0
  num_images: tuple[tuple[str, int], ...] = tuple(synthetic.DEFAULT_NUM_IMAGES.items())
  image_size: int = 128


def world_config(seed: int, num_images: dict[str, int], image_size: int) -> WorldConfig:
  """The world's splits are generated in `num_images`' order (region ids count on across them,
  as `synthetic.generate` numbers them)."""
  counts = tuple((s, int(n)) for s, n in num_images.items())
  unknown = set(num_images) - set(synthetic.SPLITS)
  if unknown:
    raise ValueError(f"unknown synthetic split(s) {sorted(unknown)}; known: {synthetic.SPLITS}")
  name = f"seed{seed}_px{image_size}_" + "_".join(f"{s}{n}" for s, n in counts)
  return WorldConfig(name=name, seed=int(seed), num_images=counts, image_size=int(image_size),
                     description=f"seed {seed}, {image_size}-px images, {dict(counts)} images")


class DynreferSynthetic(base.RegionBuilder):
  """The synthetic region world: seeded scenes of patterned shapes with captions, tags,
  categories and attributes (data/synthetic.py)."""

  VERSION = tfds.core.Version(f"{synthetic.VERSION}.0.0")
  RELEASE_NOTES = {"1.0.0": "First TFDS release of synthetic world version 1."}
  BUILDER_CONFIGS = [world_config(0, synthetic.DEFAULT_NUM_IMAGES, 128)]

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    tmp = tempfile.mkdtemp(prefix="synthetic-world-")
    try:
      meta = synthetic.generate(os.path.join(tmp, "world"), seed=c.seed,
                                num_images=dict(c.num_images), image_size=c.image_size)
      splits = {s: _read_split(os.path.join(tmp, "world"), s) for s, _ in c.num_images}
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    self.info.metadata["meta"] = meta
    return {s: self._world_examples(s, data, meta) for s, data in splits.items()}

  def _world_examples(self, split: str, data: dict[str, Any], meta: dict[str, Any]):
    tag_index = {t: i for i, t in enumerate(meta["tags"])}
    cat_index = {c: i for i, c in enumerate(meta["categories"])}
    attributes = [a["name"] for a in meta["attributes"]]
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
      x, y, w, h = a["bbox"]
      by_image.setdefault(a["image_id"], []).append({
          "id": a["id"], "box": [x, y, x + w, y + h], "caption": a["caption"],
          "references": [a["caption"]], "tag_ids": [tag_index[t] for t in a["tags"]],
          "category": a["category"], "att_vec": [a["attributes"][n] for n in attributes]})
    images = [im for im in data["images"] if im["id"] in by_image]
    counts = []
    for i, im in enumerate(images):
      regions = by_image[im["id"]]
      counts.append(len(regions))
      yield base.spaced_key(i, len(images)), base.image_example(
          im["encoded"], im["id"], im["file_name"], im["width"], im["height"], regions,
          cat_index)
    n = sum(counts)
    self.record_split(split, counts, {"regions_in": n, "regions_out": n,
                                      "images_out": len(images), "repaired": {}, "skipped": {}},
                      {"tags": list(meta["tags"]), "categories": list(meta["categories"]),
                       "attributes": attributes},
                      max((max(im["width"], im["height"]) for im in images), default=0))


def _read_split(world: str, split: str) -> dict[str, Any]:
  """The split's records with every image's PNG bytes (`encoded`)."""
  data = synthetic.load_split(world, split)
  for im in data["images"]:
    with open(os.path.join(world, "images", im["file_name"]), "rb") as f:
      im["encoded"] = f.read()
  return data
