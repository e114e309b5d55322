"""Region sources: one split of a TFDS region dataset (data/builders/), addressed by region.

A split is stored one example per image (builders/base.py), and DynRefer trains with `obj_lvl`:
every (image, region) pair is one example, so training and evaluation address REGIONS. A
`RegionSource` holds only the split's region index, `offsets` int64[E + 1] (the first region of
each of its E images, from the per-image counts in the dataset's metadata: 0.6 MB for VG's
77 k training images), and reads the images a batch needs by index through `tfds.data_source`
(ArrayRecord random access). Host memory is thus independent of the split's size, and the
pipeline (pipeline.py) makes the order a pure function of (seed, step) over region indices.

Rows come back in the model's vocabularies: category and attribute labels are matched by name
(case-insensitive; a category the model does not know becomes -1, an attribute the split does
not label is -1, ignore); tag ids are kept when the split was tagged with exactly the model's
tag list, otherwise each caption is parsed again against it (data/tags.py), or left untagged
without a parser. Captions and references get LAVIS's `pre_caption`.

Every source knows its total example count and its per-process count (the data contract of
STYLE.md #7).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Iterator, Sequence

import numpy as np

from dynrefer_jax.data.captions import pre_caption


@dataclasses.dataclass
class Regions:
  """B regions as read (row order of the request). A attributes of the model.

  image:       object[B]      the encoded image bytes (JPEG or PNG) of each region's image.
  image_id:    int64[B]
  region_id:   int64[B]       unique within the split (predictions join back on it).
  box:         float32[B, 4]  x1, y1, x2, y2 in pixels of the stored image.
  caption:     list[str]      the training caption (pre_caption'd).
  references:  list[list[str]]  reference captions for evaluators (pre_caption'd).
  tag_ids:     list[int32[T_i]]  indices into the model's tag list.
  category:    int32[B]       index into the model's categories, -1 none.
  attributes:  int32[B, A]    1 positive, 0 negative, -1 ignore.
  """
  image: np.ndarray
  image_id: np.ndarray
  region_id: np.ndarray
  box: np.ndarray
  caption: list[str]
  references: list[list[str]]
  tag_ids: list[np.ndarray]
  category: np.ndarray
  attributes: np.ndarray

  def __len__(self) -> int:
    return len(self.image_id)


class RegionSource:
  """Regions of `split` of a prepared dataset (`builders.load(...)`), seen through the model's
  vocabularies (module docstring; None: the split's own)."""

  def __init__(self, builder, split: str, *, tag_vocab: Sequence[str] | None = None,
               categories: Sequence[str] | None = None,
               attribute_names: Sequence[str] | None = None, tag_parser=None):
    self.builder, self.split = builder, split
    meta = builder.info.metadata["splits"][split]
    counts = np.asarray(meta["num_regions"], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    own = meta["vocab"]
    self.split_vocab = {k: list(own.get(k, [])) for k in ("tags", "categories", "attributes")}
    self.report = meta.get("report", {})
    # The longest side of the split's images: it sets the windows' layout (views/windows.py),
    # which must be static for a run.
    self.max_image_side = int(meta["max_image_side"])
    self.tag_vocab = list(own["tags"] if tag_vocab is None else tag_vocab)
    self.categories = list(own["categories"] if categories is None else categories)
    self.attribute_names = list(own["attributes"] if attribute_names is None
                                else attribute_names)
    cat_index = {c.lower(): i for i, c in enumerate(self.categories)}
    # Category of the split -> the model's; the trailing -1 is what "no category" (-1) indexes.
    self._cat_map = np.asarray([cat_index.get(c.lower(), -1) for c in own["categories"]] + [-1],
                               np.int32)
    own_attr = {a.lower(): j for j, a in enumerate(own["attributes"])}
    self._attr_cols = [own_attr.get(a.lower(), -1) for a in self.attribute_names]
    self._keep_tags = list(own["tags"]) == self.tag_vocab
    self._tag_parser = tag_parser
    self._records = None
    self._lock = threading.Lock()  # training prefetch and evaluation may read at once

  @property
  def records(self):
    """The split's examples by index, decoded by TFDS (opened on first use: file handles only).
    `read` parses the serialized examples itself (`_StoredImage`); this is the reference."""
    if self._records is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      self._records = self.builder.as_data_source(
          self.split, decoders={"image": tfds.decode.SkipDecoding()})
    return self._records

  @property
  def num_images(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_examples(self) -> int:
    return int(self.offsets[-1])

  def process_range(self, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous [start, end) shard of rows that `process_index` evaluates."""
    n = self.num_examples
    return n * process_index // process_count, n * (process_index + 1) // process_count

  def num_examples_for(self, process_index: int, process_count: int) -> int:
    start, end = self.process_range(process_index, process_count)
    return end - start

  def read(self, rows) -> Regions:
    """The regions at `rows` (int[B], each in [0, num_examples)), in that order. Reads each
    image example once however many of its regions the batch holds."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_examples):
      raise IndexError(f"rows outside [0, {self.num_examples}) of split {self.split!r}")
    example = np.searchsorted(self.offsets, rows, side="right") - 1
    slot = rows - self.offsets[example]
    wanted, where = np.unique(example, return_inverse=True)
    raw = self.records.data_source  # the serialized examples (ArrayRecord)
    with self._lock:  # one example at a time: __getitems__ starts a thread pool per call,
      records = [_StoredImage(raw[int(e)]) for e in wanted]  # which crashes inside tf.data
    b = len(rows)
    out = Regions(
        image=np.empty((b,), object), image_id=np.zeros((b,), np.int64),
        region_id=np.zeros((b,), np.int64), box=np.zeros((b, 4), np.float32), caption=[],
        references=[], tag_ids=[], category=np.zeros((b,), np.int32),
        attributes=np.full((b, len(self.attribute_names)), -1, np.int32))
    for i in range(b):
      rec, k = records[where[i]], int(slot[i])
      out.image[i] = rec.image
      out.image_id[i] = rec.image_id
      out.region_id[i] = rec.region_id[k]
      out.box[i] = rec.box[4 * k:4 * k + 4]
      caption = pre_caption(_text(rec.caption[k]))
      out.caption.append(caption)
      out.references.append([pre_caption(_text(r)) for r in rec.ragged("references", k)])
      out.category[i] = self._cat_map[int(rec.category[k])]
      att = rec.ragged("attributes", k)
      if len(att):
        for j, col in enumerate(self._attr_cols):
          if col >= 0:
            out.attributes[i, j] = att[col]
      out.tag_ids.append(self._tags(rec.ragged("tag_ids", k), caption))
    return out

  def _tags(self, stored, caption: str) -> np.ndarray:
    if self._keep_tags:
      return np.asarray(stored, np.int32)
    if self._tag_parser is not None:
      set1, set2 = self._tag_parser.tag_ids(caption)
      return np.asarray(sorted(set(set1) | set(set2)), np.int32)
    return np.zeros((0,), np.int32)

  def iter_all(self, batch: int = 512) -> Iterator[Regions]:
    """Every region in order, `batch` at a time (small splits: baselines, tag lists)."""
    for start in range(0, self.num_examples, batch):
      yield self.read(np.arange(start, min(start + batch, self.num_examples)))


class _StoredImage:
  """One stored image example (builders/base.FEATURES) parsed from its serialized
  tf.train.Example, read lazily by region: TFDS's own decoding (`records[i]`) converts every
  region's every feature to numpy, about 0.65 ms for a VG image of ~50 regions, ten times the
  ArrayRecord read, for the one region a training batch wants. The keys are TFDS's
  serialization of FEATURES: scalars and fixed-shape tensors of the Sequence flattened over the
  regions under `regions/<name>`, variable-length ones as `regions/<name>/ragged_flat_values`
  with `regions/<name>/ragged_row_lengths_0`. tests/test_builders.py checks this against
  TFDS's decoding on every builder's fixture."""

  def __init__(self, serialized: bytes):
    from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel
    f = example_pb2.Example.FromString(serialized).features.feature
    self._f = f
    self.image = f["image"].bytes_list.value[0]
    self.image_id = f["image_id"].int64_list.value[0]
    self.region_id = f["regions/id"].int64_list.value
    self.box = np.asarray(f["regions/box"].float_list.value, np.float32)
    self.caption = f["regions/caption"].bytes_list.value
    self.category = f["regions/category"].int64_list.value
    self._starts = {}

  def ragged(self, name: str, k: int):
    """Region k's values of the variable-length feature `name` (references, tag_ids,
    attributes)."""
    starts = self._starts.get(name)
    if starts is None:
      lengths = self._f[f"regions/{name}/ragged_row_lengths_0"].int64_list.value
      starts = self._starts[name] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    flat = self._f[f"regions/{name}/ragged_flat_values"]
    kind = flat.WhichOneof("kind")  # None: no region of the image has a value
    values = getattr(flat, kind).value if kind else []
    return values[int(starts[k]):int(starts[k + 1])]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def summary(source: RegionSource) -> dict:
  """Captions, categories and attribute labels of every region of a (small) split: what the
  evaluators' train-split baselines read."""
  captions, category, attributes = [], [], []
  for r in source.iter_all():
    captions.extend(r.caption)
    category.append(r.category)
    attributes.append(r.attributes)
  a = len(source.attribute_names)
  return {"captions": captions,
          "category": np.concatenate(category) if category else np.zeros((0,), np.int32),
          "attributes": (np.concatenate(attributes) if attributes
                         else np.zeros((0, a), np.int32))}
