"""Data sources: where the region examples come from, as one in-memory table per split.

A source turns a dataset on disk into a `RegionTable`: one row per region (DynRefer trains with
`obj_lvl`: every (image, region) pair is one example), holding the image file path, the box in
xyxy pixels of the file as stored, the caption and its reference list, tag indices, category and
attributes. The pipeline (pipeline.py) addresses rows by index, which is what makes the order a
pure function of (seed, step) and therefore resumable and shardable.

Every source knows its total example count and its per-process count (the data contract of
STYLE.md #7).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from dynrefer_jax.data.captions import pre_caption as preprocess_caption  # LAVIS blip_caption


@dataclasses.dataclass
class RegionTable:
  """All regions of a split. N rows; K tags; A attributes.

  image_path:   str[N]      absolute path of the image file.
  image_id:     int64[N]
  region_id:    int64[N]    unique within the split (predictions join back on it).
  box:          float32[N, 4]  x1, y1, x2, y2 in pixels of the stored image.
  caption:      str[N]      the training caption (preprocessed).
  references:   list[list[str]]  reference captions for evaluators.
  tag_ids:      list of int arrays, the union of tag_set1 and tag_set2 (indices into tag_vocab).
  category:     int32[N]    index into `categories`, -1 when the dataset has none (VG).
  attributes:   int32[N, A] 1 positive, 0 negative, -1 ignore (all -1 when the dataset has none).
  max_image_side: the longest side of the split's images in pixels (0: not recorded; the
                source then reads the image headers). It sets the windows' layout
                (views/windows.py), which must be static for a run.
  """
  image_path: np.ndarray
  image_id: np.ndarray
  region_id: np.ndarray
  box: np.ndarray
  caption: np.ndarray
  references: list[list[str]]
  tag_ids: list[np.ndarray]
  category: np.ndarray
  attributes: np.ndarray
  tag_vocab: list[str]
  categories: list[str]
  attribute_names: list[str]
  max_image_side: int = 0

  def __len__(self) -> int:
    return len(self.image_id)


class Source:
  """Base class: subclasses implement `_build_table()`."""

  def __init__(self):
    self._table: RegionTable | None = None

  @property
  def table(self) -> RegionTable:
    if self._table is None:
      self._table = self._build_table()
    return self._table

  def _build_table(self) -> RegionTable:
    raise NotImplementedError

  @property
  def num_examples(self) -> int:
    return len(self.table)

  @property
  def max_image_side(self) -> int:
    """The longest side of the split's images: recorded in the table, else from the image
    files' headers (PIL reads the size without decoding)."""
    if self.table.max_image_side:
      return int(self.table.max_image_side)
    from PIL import Image  # pylint: disable=import-outside-toplevel
    side = 1
    for path in dict.fromkeys(self.table.image_path.tolist()):
      with Image.open(path) as img:
        side = max(side, *img.size)
    return side

  def process_range(self, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous [start, end) shard of rows that `process_index` evaluates."""
    n = self.num_examples
    return n * process_index // process_count, n * (process_index + 1) // process_count

  def num_examples_for(self, process_index: int, process_count: int) -> int:
    start, end = self.process_range(process_index, process_count)
    return end - start


def table_from_coco_style(data: dict[str, Any], image_root: str, *, tag_vocab: Sequence[str],
                          categories: Sequence[str], attribute_names: Sequence[str]
                          ) -> RegionTable:
  """Builds a table from our COCO-style record format (synthetic.py and the builders write it):

  images[{id, file_name}], annotations[{id, image_id, bbox [x, y, w, h], caption,
  references?, tags? (strings) | tag_ids? (ints), category? (str), attributes? {name: v} |
  att_vec? [A]}].
  """
  files = {im["id"]: os.path.join(image_root, im["file_name"]) for im in data["images"]}
  sizes = [max(im.get("width", 0), im.get("height", 0)) for im in data["images"]]
  # Recorded only when every image has its size (else the source reads the headers).
  max_side = max(sizes) if sizes and min(sizes) > 0 else 0
  tag_index = {t: i for i, t in enumerate(tag_vocab)}
  cat_index = {c: i for i, c in enumerate(categories)}
  anns = data["annotations"]
  n, num_attrs = len(anns), len(attribute_names)
  box = np.zeros((n, 4), np.float32)
  attributes = np.full((n, num_attrs), -1, np.int32)
  category = np.full((n,), -1, np.int32)
  captions, refs, tag_ids = [], [], []
  for i, a in enumerate(anns):
    x, y, w, h = a["bbox"]
    box[i] = (x, y, x + w, y + h)
    caption = preprocess_caption(a["caption"])
    captions.append(caption)
    refs.append([preprocess_caption(r) for r in a.get("references", [a["caption"]])])
    if "tag_ids" in a:
      tag_ids.append(np.asarray(a["tag_ids"], np.int32))
    else:
      tag_ids.append(np.asarray([tag_index[t] for t in a.get("tags", []) if t in tag_index],
                                np.int32))
    if a.get("category") is not None:
      category[i] = cat_index[a["category"]]
    if isinstance(a.get("attributes"), dict):
      for j, name in enumerate(attribute_names):
        attributes[i, j] = a["attributes"].get(name, -1)
    elif a.get("att_vec") is not None:
      attributes[i] = np.asarray(a["att_vec"], np.int32)
  return RegionTable(
      image_path=np.asarray([files[a["image_id"]] for a in anns], dtype=object),
      image_id=np.asarray([a["image_id"] for a in anns], np.int64),
      region_id=np.asarray([a["id"] for a in anns], np.int64),
      box=box, caption=np.asarray(captions, dtype=object), references=refs, tag_ids=tag_ids,
      category=category, attributes=attributes, tag_vocab=list(tag_vocab),
      categories=list(categories), attribute_names=list(attribute_names),
      max_image_side=max_side)


class SyntheticSource(Source):
  """A split of the synthetic world written by `synthetic.generate` / `synthetic.ensure`."""

  def __init__(self, directory: str, split: str):
    super().__init__()
    self.directory, self.split = directory, split
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)

  def _build_table(self) -> RegionTable:
    with open(os.path.join(self.directory, f"{self.split}.json")) as f:
      data = json.load(f)
    return table_from_coco_style(
        data, os.path.join(self.directory, "images"), tag_vocab=self.meta["tags"],
        categories=self.meta["categories"],
        attribute_names=[a["name"] for a in self.meta["attributes"]])


class JsonSource(Source):
  """Records written by `tools/prepare_data.py` (or any file in our COCO-style record format):
  `<dir>/<split>.json` with a top-level `vocab` {tags, categories, attributes} and
  `dataset.image_root` (relative to the file's directory or absolute)."""

  def __init__(self, directory: str, split: str):
    super().__init__()
    self.directory, self.split = directory, split

  def _build_table(self) -> RegionTable:
    with open(os.path.join(self.directory, f"{self.split}.json")) as f:
      data = json.load(f)
    root = os.path.join(self.directory, data.get("dataset", {}).get("image_root", ""))
    vocab = data.get("vocab", {})
    return table_from_coco_style(data, root, tag_vocab=vocab.get("tags", []),
                                 categories=vocab.get("categories", []),
                                 attribute_names=vocab.get("attributes", []))


def remap_table(table: RegionTable, *, tag_vocab: Sequence[str], categories: Sequence[str],
                attribute_names: Sequence[str], tag_parser=None) -> RegionTable:
  """The same regions indexed by the model's vocabularies (the tables it was built with).

  Category and attribute labels are matched by name (case-insensitive); a category the model
  does not know becomes -1, an attribute the split does not label is -1 (ignore) in every row.
  Tag ids are kept when the split was tagged with exactly `tag_vocab`; otherwise each caption is
  parsed again against `tag_vocab` with `tag_parser` (data/tags.py), or left untagged without one.
  """
  cat_index = {c.lower(): i for i, c in enumerate(categories)}
  cat_map = np.asarray([cat_index.get(c.lower(), -1) for c in table.categories] + [-1], np.int32)
  category = cat_map[table.category]  # -1 (no category) indexes the trailing -1
  own = {a.lower(): j for j, a in enumerate(table.attribute_names)}
  attributes = np.full((len(table), len(attribute_names)), -1, np.int32)
  for j, name in enumerate(attribute_names):
    if name.lower() in own:
      attributes[:, j] = table.attributes[:, own[name.lower()]]
  if list(table.tag_vocab) == list(tag_vocab):
    tag_ids = table.tag_ids
  elif tag_parser is not None:
    tag_ids = []
    for caption in table.caption:
      set1, set2 = tag_parser.tag_ids(str(caption))
      tag_ids.append(np.asarray(sorted(set(set1) | set(set2)), np.int32))
  else:
    tag_ids = [np.zeros((0,), np.int32) for _ in range(len(table))]
  return dataclasses.replace(table, tag_ids=tag_ids, category=category, attributes=attributes,
                             tag_vocab=list(tag_vocab), categories=list(categories),
                             attribute_names=list(attribute_names))


class PreparedSource(Source):
  """One prepared split (`JsonSource` records) seen through the model's vocabularies
  (`remap_table`). `path` is the record file `<dir>/<split>.json`."""

  def __init__(self, path: str, *, tag_vocab: Sequence[str], categories: Sequence[str],
               attribute_names: Sequence[str], tag_parser=None):
    super().__init__()
    self.path = path
    self._vocab = dict(tag_vocab=list(tag_vocab), categories=list(categories),
                       attribute_names=list(attribute_names), tag_parser=tag_parser)

  def _build_table(self) -> RegionTable:
    directory, name = os.path.split(self.path)
    table = JsonSource(directory, os.path.splitext(name)[0]).table
    return remap_table(table, **self._vocab)


class TableSource(Source):
  """A source over a table already in memory."""

  def __init__(self, table: RegionTable):
    super().__init__()
    self._table = table
