"""The TFDS builders' shared part: features, metadata, record order, manual files.

Every dataset is a `tfds.core.GeneratorBasedBuilder` (`RegionBuilder` here) written as ArrayRecord,
one example per image:

  image        the encoded image at its own resolution: the bytes of its file (JPEG, PNG), or
               the repaired image as PNG (common.check_image: EXIF-rotated, not 8-bit RGB)
  image_id     int64
  file_name    text, the file the image was read from
  height, width  int32, the stored image's size (boxes are in its pixels)
  regions      a sequence, one entry per kept region:
    id           int64, unique within the split
    box          float32[4]: x1, y1, x2, y2 in pixels of the stored image
    caption      text, as cleaned (LAVIS pre_caption is applied when read)
    references   sequence of text: the reference captions evaluators score against
    tag_ids      sequence of int32: indices into the split's tag vocabulary
    category     int32: index into the split's categories, -1 when the dataset has none
    attributes   sequence of int8: 1 / 0 / -1 per attribute of the split (empty when none)

`builder.info.metadata` (metadata.json beside the records) holds, per split,
`splits/<split>/num_regions` (the region count of every example, in example order: the index
that addresses regions, data/sources.py), `vocab` {tags, categories, attributes}, `report`
(what cleaning repaired or skipped, common.Report) and `max_image_side` (the longest side of its
images, which sets the windows' layout, views/windows.py). Examples are stored in the order they were
generated (`disable_shuffling`), so region r of a split is the r-th region of the annotation
files' order after cleaning, as the record files of earlier versions listed them.
"""

from __future__ import annotations

import abc
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from dynrefer_jax.data.builders import common

HOMEPAGE = "https://github.com/callsys/DynRefer"

FEATURES = tfds.features.FeaturesDict({
    "image": tfds.features.Image(shape=(None, None, 3)),
    "image_id": np.int64,
    "file_name": tfds.features.Text(),
    "height": np.int32,
    "width": np.int32,
    "regions": tfds.features.Sequence({
        "id": np.int64,
        "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "caption": tfds.features.Text(),
        "references": tfds.features.Sequence(tfds.features.Text()),
        "tag_ids": tfds.features.Sequence(np.int32),
        "category": np.int32,
        "attributes": tfds.features.Sequence(np.int8),
    }),
})


class ManualFilesMissing(ValueError):
  """Files of the manual download are missing; the message is one line naming them."""


def _manual_file(manual_dir, name: str) -> str | None:
  path = os.path.join(os.fspath(manual_dir), name)
  return path if os.path.exists(path) else None


def spaced_key(index: int, count: int) -> int:
  """Example key of the `index`-th of at most `count` examples.

  With `disable_shuffling`, TFDS writes examples in key order; its shuffler files a key into
  one of 1,000 temporary buckets by its position in [0, 2^128) and sorts each bucket in memory.
  Consecutive small keys would all land in the first bucket (the whole split in memory at
  once); keys spread over the range keep the order and the buckets small."""
  return index * ((1 << 128) // (count + 1))


class RegionBuilder(tfds.core.GeneratorBasedBuilder):
  """A region dataset (module docstring). Subclasses list their splits in `_split_generators`
  and hand `_generate_examples` the raw records of one (common.py's format)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First TFDS release: one example per image, the cleaned regions of "
               "tools/prepare_data.py's record files of earlier versions; ArrayRecord; per-split "
               "region counts, vocabularies and cleaning report in the metadata.",
  }
  MANUAL_FILES: tuple[str, ...] = ()  # required files of the manual dir
  IMAGE_DIRS: tuple[str, ...] = ()    # image folders of the manual dir (at least one present)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=(self.__doc__ or "").strip(), features=FEATURES,
        homepage=HOMEPAGE, metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  @abc.abstractmethod
  def _split_generators(self, dl_manager):
    ...

  @classmethod
  def manual_paths(cls, manual_dir) -> tuple[dict[str, str], list[str]]:
    """({name: path} of MANUAL_FILES, the IMAGE_DIRS present) in `manual_dir`; raises
    ManualFilesMissing naming everything missing."""
    files = {n: _manual_file(manual_dir, n) for n in cls.MANUAL_FILES}
    dirs = [p for p in (_manual_file(manual_dir, d) for d in cls.IMAGE_DIRS)
            if p and os.path.isdir(p)]
    missing = [n for n, p in files.items() if p is None]
    if cls.IMAGE_DIRS and not dirs:
      missing.append(" or ".join(d + "/" for d in cls.IMAGE_DIRS))
    if missing:
      raise ManualFilesMissing(f"the manual dir {manual_dir} lacks {', '.join(missing)} "
                               f"(what {cls.name} needs: its MANUAL_DOWNLOAD_INSTRUCTIONS)")
    return files, dirs

  def _tag_parser(self, manual_dir):
    """A tag parser over the manual dir's ram_tag_list.txt (DynRefer's model_configs.zip), or
    None: then every region is stored untagged and tagged when read (data/sources.py)."""
    from dynrefer_jax.data import tags  # pylint: disable=import-outside-toplevel
    path = _manual_file(manual_dir, "ram_tag_list.txt")
    return tags.TagParser(tags.load_vocabulary(path)) if path else None

  def _generate_examples(self, split: str, records: list[dict[str, Any]], info: dict[str, Any],
                         tag_parser=None, root: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """Cleans `records` (common.clean_images) and yields one example per kept image; at the end
    stores the split's region counts, vocabulary and report in the metadata. File names are
    stored relative to `root` (the manual dir)."""
    report = common.Report()
    categories = list(info.get("categories") or [])
    attributes = list(info.get("attributes") or [])
    cat_index = {c: i for i, c in enumerate(categories)}
    upper = len({(r["image_id"], r["image_file"]) for r in records})
    counts, max_side = [], 0
    images = common.clean_images(
        records, report, categories=info.get("categories"), attribute_names=info.get("attributes"),
        max_caption_tokens=info.get("max_caption_tokens"), tag_parser=tag_parser)
    for i, im in enumerate(images):
      counts.append(len(im.regions))
      max_side = max(max_side, im.width, im.height)
      name = os.path.relpath(im.file_name, os.path.abspath(root)) if root else im.file_name
      yield spaced_key(i, upper), image_example(
          im.encoded, im.image_id, name, im.width, im.height, im.regions, cat_index)
    if info.get("mismatched"):
      report.skip("vg_id_mismatch", "image_data / region_descriptions ids differ",
                  info["mismatched"])
    self.record_split(split, counts, report.to_json(), {
        "tags": list(tag_parser.vocabulary) if tag_parser else [], "categories": categories,
        "attributes": attributes}, max_side)

  def record_split(self, split: str, counts: list[int], report: dict, vocab: dict,
                   max_image_side: int) -> None:
    """Stores a split's region index, report, vocabulary and longest image side (which sets the
    windows' layout, views/windows.py) in the dataset's metadata."""
    self.info.metadata.setdefault("splits", {})[split] = {
        "num_regions": counts, "vocab": vocab, "report": report,
        "max_image_side": int(max_image_side)}


def image_example(encoded: bytes, image_id: int, file_name: str, width: int, height: int,
                  regions: list[dict[str, Any]], cat_index: dict[str, int]) -> dict[str, Any]:
  """One example (FEATURES) from an image and its regions in the cleaned-record format."""
  return {
      "image": encoded, "image_id": int(image_id), "file_name": file_name,
      "height": int(height), "width": int(width),
      "regions": {
          "id": [int(r["id"]) for r in regions],
          "box": np.asarray([r["box"] for r in regions], np.float32).reshape(-1, 4),
          "caption": [r["caption"] for r in regions],
          "references": [list(r.get("references") or [r["caption"]]) for r in regions],
          "tag_ids": [np.asarray(r.get("tag_ids") or [], np.int32) for r in regions],
          "category": [cat_index.get(r.get("category"), -1) for r in regions],
          "attributes": [np.asarray(r.get("att_vec") or [], np.int8) for r in regions],
      }}
