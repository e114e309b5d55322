"""tf.data input pipeline: per-process local batches in the batch format of docs/ARCHITECTURE.md.

Reading. A source (sources.RegionSource) is one split of a TFDS region dataset addressed by
region index; the host holds only its index. For each batch a host step (`_HostReader`) reads
the batch's rows from the ArrayRecord files, tokenises their captions and draws their control
words; tf.data then decodes, resizes and pads each row's image in parallel (`_load_row`).
Nothing per split is held in memory or captured in the graph, so host memory and start-up time
do not grow with the dataset.

Order and resumption. Training step k of an uninterrupted run consumes the global positions
[k*G, (k+1)*G) of epoch e = k // steps_per_epoch, mapped to rows (regions) by a stateless
per-epoch permutation (`tf.random.experimental.index_shuffle` with seed (seed, e)); process p
takes the slice [p*L, (p+1)*L) of each global batch (L = G / P). So the whole stream is a pure
function of (seed, step): two runs give the same order, a pipeline built with `start_step=k`
yields exactly batches k, k+1, ... (the iterator position saved with a checkpoint is just the
step), and in every step the processes read disjoint rows that together form the global batch.
The remainder of each epoch (N mod G rows, different rows each epoch) is dropped. Control words
(SPEC §7c) are drawn on the host by numpy generators seeded by (seed, epoch, row), so they are
reproducible and resumable too, and tokenised as whole strings. Evaluation reads each process's
contiguous shard of rows in order.

Images are decoded at full resolution (PIL, data/images.py) and each row carries its region's
windows (views/windows.py): the whole image zero-padded to [S, S] when it fits in
`window_size`, else a full-resolution window around the box and coarser levels, with the hash
pixels in evaluation batches; boxes stay in image pixels. Views are cut on the device.

TensorFlow is kept off the accelerators (it would otherwise grab GPU memory).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import threading
import weakref
from typing import Any, Callable, Iterator

import numpy as np

from dynrefer_jax.data import captions as captions_lib
from dynrefer_jax.data import control_words
from dynrefer_jax.data import images as images_lib
from dynrefer_jax.data import sources as sources_lib
from dynrefer_jax.views import windows

_tf = None


def _tensorflow():
  """Imports TensorFlow once, hiding every accelerator from it."""
  global _tf
  if _tf is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
    try:
      tf.config.set_visible_devices([], "TPU")
    except (ValueError, RuntimeError):
      pass
    _tf = tf
  return _tf


FULL_DROP_PROB = 0.5  # SPEC §7c `full_drop_ratio`: the control string is just "|".
KEEP_PROB = 0.5       # each candidate word kept independently (1 - the original's drop_ratio).

# A fast tokenizer's truncation / padding state is shared: one caller at a time (a training and
# an evaluation pipeline may read at once).
_TOKENIZER_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- host side


class _Tables:
  """Per-vocabulary constants of a pipeline."""

  def __init__(self, tag_vocab, tokenizer, caption_len, control_len, text_len, lm_kind="t5"):
    self.num_tags = len(tag_vocab)
    self.caption_len, self.control_len, self.text_len = caption_len, control_len, text_len
    self.lm_kind = lm_kind   # config.model.lm.kind: how the LM's text is tokenised
    # Evaluation control words: "|" tokenised as the string it is (the model substitutes its
    # predicted tags).
    with _TOKENIZER_LOCK:
      self.empty_control = _zero_padded(*captions_lib.encode_controls(
          tokenizer, [control_words.END], control_len, lm_kind))


def _zero_padded(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 with 0 at padding, mask int32) from a tokenisation: the masks travel with the
  ids, as a pad id may be a real token of another tokenizer (Qwen2's id 0 is "!")."""
  return np.where(mask, ids, 0).astype(np.int32), mask.astype(np.int32)


class _HostReader:
  """The host part of a batch: `source.read(rows)`, the captions tokenised and the control
  words drawn (training) or "|" (evaluation). Returns the arrays of `FIELDS` in order (tag ids
  padded with -1 and references with b"" to the batch's longest list)."""

  FIELDS = ("image", "box", "caption_ids", "caption_mask", "text_ids", "tags", "num_tags",
            "category", "attributes", "image_id", "region_id", "references", "num_refs",
            "control_ids", "control_mask", "control_text")

  def __init__(self, source, tokenizer, t: _Tables, text_tokenizer=None, seed: int = 0,
               control_phrases: bool = True):
    self.source, self.tokenizer, self.text_tokenizer, self.t = source, tokenizer, text_tokenizer, t
    self.seed, self.control_phrases = int(seed), control_phrases

  def __call__(self, rows: np.ndarray, epoch: np.ndarray) -> list[np.ndarray]:
    """rows int64[B]; epoch: int64 scalar, the training epoch, or -1 for evaluation."""
    t, r = self.t, self.source.read(rows)
    b = len(r)
    controls = ([self._control_words(r, i, int(epoch), int(rows[i])) for i in range(b)]
                if epoch >= 0 else None)
    with _TOKENIZER_LOCK:
      caption_ids, caption_mask = _zero_padded(*captions_lib.encode_captions(
          self.tokenizer, r.caption, t.caption_len, t.lm_kind))
      if self.text_tokenizer is None:  # one tokenizer for the LM and the text tower (synthetic)
        text_ids = captions_lib.tokenize(self.tokenizer, r.caption, t.text_len)[0]
      if controls is not None:
        control_ids, control_mask = _zero_padded(*captions_lib.encode_controls(
            self.tokenizer, controls, t.control_len, t.lm_kind))
    if self.text_tokenizer is not None:  # the text tower's own (CLIP BPE: SOT ... EOT, 0-padded)
      text_ids = np.asarray(self.text_tokenizer(list(r.caption), t.text_len), np.int32)
      text_ids = text_ids.reshape(b, t.text_len)
    if controls is None:
      controls = [control_words.END] * b
      control_ids, control_mask = (np.tile(a, (b, 1)) for a in t.empty_control)
    # One spare column: unbatching a zero-size tensor crashes tf.data (TF 2.21), as it would
    # when the split has no attributes; `drop_spare` removes it from each row.
    attributes = np.concatenate([r.attributes, np.full((b, 1), -1, np.int32)], axis=1)
    return [r.image.astype(object), r.box, caption_ids, caption_mask, text_ids,
            *_padded(r.tag_ids, -1, np.int32), r.category, attributes, r.image_id,
            r.region_id, *_padded([[x.encode() for x in refs] for refs in r.references],
                                  b"", object),
            control_ids, control_mask, np.asarray([c.encode() for c in controls], object)]

  def _control_words(self, r: sources_lib.Regions, i: int, epoch: int, row: int) -> str:
    """Training control words of region i (SPEC §7c): the string drawn from its candidates
    (tag sets and, with control_phrases, the caption's phrases) with the generator of (seed,
    epoch, row)."""
    tags = [self.source.tag_vocab[k] for k in r.tag_ids[i]]
    phrases = control_words.caption_phrases(r.caption[i]) if self.control_phrases else []
    return control_words.training_control_words(
        control_words.candidate_words(tags, phrases),
        np.random.default_rng([self.seed, epoch, row]),
        full_drop_ratio=FULL_DROP_PROB, keep_ratio=KEEP_PROB)

  def batch(self, rows, epoch, local: int) -> dict:
    """The host batch of `rows` (int64[local]) as tensors with static batch shapes."""
    tf = _tensorflow()
    values = tf.numpy_function(self, [rows, epoch], self.dtypes(), stateful=True)
    t, a = self.t, len(self.source.attribute_names)
    shapes = {"image": [local], "box": [local, 4], "caption_ids": [local, t.caption_len],
              "caption_mask": [local, t.caption_len],
              "text_ids": [local, t.text_len], "tags": [local, None], "num_tags": [local],
              "category": [local], "attributes": [local, a + 1], "image_id": [local],
              "region_id": [local], "references": [local, None], "num_refs": [local],
              "control_ids": [local, t.control_len], "control_mask": [local, t.control_len],
              "control_text": [local]}
    return {k: tf.ensure_shape(v, shapes[k]) for k, v in zip(self.FIELDS, values)}

  @staticmethod
  def dtypes():
    tf = _tensorflow()
    return [tf.string, tf.float32, tf.int32, tf.int32, tf.int32, tf.int32, tf.int32, tf.int32,
            tf.int32, tf.int64, tf.int64, tf.string, tf.int32, tf.int32, tf.int32, tf.string]

  @staticmethod
  def drop_spare(ex: dict) -> dict:
    """One row of a host batch with the attributes' spare column removed."""
    return dict(ex, attributes=ex["attributes"][:-1])


def _padded(rows: list, fill, dtype) -> tuple[np.ndarray, np.ndarray]:
  """(values [B, max(len)] padded with `fill`, lengths int32[B]) of a list of sequences."""
  lengths = np.asarray([len(x) for x in rows], np.int32)
  out = np.full((len(rows), int(lengths.max(initial=0))), fill, dtype)
  for i, x in enumerate(rows):
    out[i, :len(x)] = x
  return out, lengths


# ----------------------------------------------------------------------------- per row


TRAIN_IMAGE_CACHE_BYTES = 128 << 20


def train_cache_bytes(source: sources_lib.RegionSource) -> int:
  """The training image cache's budget for `source`: TRAIN_IMAGE_CACHE_BYTES when all the
  split's prepared images fit in it (an upper bound: each image at most max_image_side square,
  3 bytes a pixel, levels adding at most a third), else 0, no cache. Training draws regions at
  random over the whole split, so a cache that holds a small part of it almost never hits, and
  keeping it costs: at 2,000 images of about 600 px (tools/benchmark_input.py, 2-core CPU) a
  128 MiB cache made the input pipeline about 10% slower than none. The synthetic world (600
  images of 96 px, 22 MB) is cached; Visual Genome (77k images) is not."""
  bound = source.num_images * 4 * source.max_image_side ** 2
  return TRAIN_IMAGE_CACHE_BYTES if bound <= TRAIN_IMAGE_CACHE_BYTES else 0


class _ImageCache:
  """The prepared images (views/windows.prepare: levels, gray) read last, by image id, up to
  `max_bytes` (the newest always kept). Evaluation reads an image's regions one after another,
  and decoding a large image and its levels costs far more than cutting one region's windows
  (about 1 s for 12 MP); parallel readers of one image wait for the first."""

  def __init__(self, max_bytes: int = 1 << 30):
    self.max_bytes = max_bytes
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key, make: Callable[[], windows.Prepared]) -> windows.Prepared:
    with self._lock:
      fut = self._items.get(key)
      created = fut is None
      if created:
        fut = self._items[key] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
      else:
        self._items.move_to_end(key)
    if not created:
      return fut.result()
    try:
      value = make()
    except BaseException as e:
      with self._lock:
        self._items.pop(key, None)
      fut.set_exception(e)
      raise
    fut.set_result(value)
    with self._lock:
      sizes = [f.result().nbytes if f.done() and not f.exception() else 0
               for f in self._items.values()]
      while len(self._items) > 1 and sum(sizes) > self.max_bytes:
        self._items.popitem(last=False)
        sizes.pop(0)
    return value


def _region_input(lay: windows.Layout, cache: _ImageCache | None, key, data: bytes,
                  box: np.ndarray):
  """Host side of `_image_keys`: decode (data/images.py rules) and prepare the image (cached
  by its id; key < 0, no cache: not cached), then the region's windows."""
  make = lambda: windows.prepare(images_lib.decode(data), lay)
  image = make() if key < 0 else cache.get(int(key), make)
  row = windows.region_input(image, box, lay)
  return tuple(row[k] for k in _image_key_names(lay))


def _image_key_names(lay: windows.Layout) -> tuple[str, ...]:
  return ("image", "image_hw", "window") + (("hash_pixels",) if lay.hash else ())


def _image_keys(data, box, lay: windows.Layout, image_id=None,
                cache: _ImageCache | None = None) -> dict:
  """The image keys of one row (ARCHITECTURE.md batch format) from the image's encoded bytes:
  decoded and cut on the host by `windows.region_input` (PIL releases the GIL while decoding
  and resizing, so the parallel map runs rows concurrently). With `image_id` and a `cache`,
  the decoded, prepared image is reused by the next rows of the same image."""
  tf = _tensorflow()
  names = _image_key_names(lay)
  types = {"image": tf.uint8, "image_hw": tf.int32, "window": tf.float32,
           "hash_pixels": tf.uint8}
  shapes = {"image": [lay.levels, lay.side, lay.side, 3], "image_hw": [2],
            "window": [lay.levels, windows.GEOMETRY],
            "hash_pixels": [windows.HASH_CROPS, windows.HASH_SIDE, windows.HASH_SIDE]}
  cached = image_id is not None and cache is not None
  key = tf.cast(image_id, tf.int64) if cached else tf.constant(-1, tf.int64)
  fn = functools.partial(_region_input, lay, cache if cached else None)
  out = tf.numpy_function(fn, [key, data, box], [types[k] for k in names], stateful=False)
  return {k: tf.ensure_shape(v, shapes[k]) for k, v in zip(names, out)}


def _load_row(t: _Tables, ex, lay: windows.Layout, cache: _ImageCache | None = None):
  """One example dict (ARCHITECTURE.md batch format, unbatched) from one row of a host batch
  (`_HostReader.FIELDS`)."""
  tf = _tensorflow()
  tags = ex["tags"][:ex["num_tags"]]
  multi_hot = tf.minimum(tf.reduce_sum(tf.one_hot(tags, t.num_tags), axis=0), 1.0)
  return {
      **_image_keys(ex["image"], ex["box"], lay, ex["image_id"], cache),
      "box": ex["box"],
      "caption_ids": ex["caption_ids"],
      "caption_mask": ex["caption_mask"],
      "control_ids": ex["control_ids"],
      "control_mask": ex["control_mask"],
      "text_ids": ex["text_ids"],
      "tags": tf.ensure_shape(multi_hot, [t.num_tags]),
      "category": ex["category"],
      "attributes": ex["attributes"],
  }


def layout_for(source: sources_lib.RegionSource, window_size: int, *,
               hash: bool) -> windows.Layout:
  """The windows' layout for a source's images (views/windows.layout); `hash` False drops the
  hash pixels (training never hashes)."""
  lay = windows.layout(source.max_image_side, window_size)
  return windows.Layout(lay.side, lay.levels, lay.hash and hash)


class _Batches:
  """A pipeline's numpy batches. Closed at interpreter exit: a live tf.data iterator whose
  threads run the Python host step would otherwise hang the exit (its threads wait for the
  interpreter that is finalising)."""

  def __init__(self, ds):
    self._it = ds.as_numpy_iterator()
    with _LIVE_LOCK:
      if not _LIVE:
        atexit.register(_close_all)  # registered after TensorFlow's own: runs before them
      _LIVE.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      raise StopIteration
    return next(self._it)

  def close(self) -> None:
    """Deletes the tf.data iterator (its threads stop)."""
    self._it = None


_LIVE: weakref.WeakSet = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _close_all() -> None:
  for batches in list(_LIVE):
    batches.close()


def _options(ds):
  tf = _tensorflow()
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  return ds.with_options(opts)


def make_train_iterator(source: sources_lib.RegionSource, *, global_batch_size: int, seed: int,
                        tokenizer, window_size: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0, caption_len: int = 32,
                        control_len: int = 32, text_len: int = 32, prefetch: int = 2,
                        with_ids: bool = False, text_tokenizer=None,
                        control_phrases: bool = True,
                        lm_kind: str = "t5") -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's training batches (dict of numpy arrays, B = global /
  process_count rows), starting at global step `start_step`. See the module docstring.

  window_size: config.data.window_size, the side of the windows views are cut from
    (views/windows.py; the layout follows the source's largest image).
  with_ids: also yield `image_id`, `region_id` (int64[B]) and `control_text` (bytes[B]: the
    control string whose tokens are `control_ids`), for tests and debugging.
  control_phrases: the caption's noun/adjective-led phrases are control-word candidates besides
    its tags (the original; config.data.control_phrases).
  text_tokenizer: `f(texts, length) -> int[N, length]` for `text_ids` (the text tower's CLIP
    BPE, tokenizers/clip_bpe.ClipTokenizer); None: `tokenizer` as for the captions.
  lm_kind: config.model.lm.kind, how control words and captions are tokenised for the LM
    (`captions.encode_controls` / `encode_captions`).
  """
  tf = _tensorflow()
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} not divisible by {process_count}")
  n = source.num_examples
  steps_per_epoch = n // global_batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{n} examples cannot fill one global batch of {global_batch_size}")
  local = global_batch_size // process_count
  t = _Tables(source.tag_vocab, tokenizer, caption_len, control_len, text_len, lm_kind)
  reader = _HostReader(source, tokenizer, t, text_tokenizer, seed, control_phrases)
  lay = layout_for(source, window_size, hash=False)
  budget = train_cache_bytes(source)
  cache = _ImageCache(budget) if budget else None

  def host(step):
    """The rows (regions) this process reads in global step `step`, read on the host."""
    epoch, j = step // steps_per_epoch, step % steps_per_epoch
    positions = j * global_batch_size + process_index * local + tf.range(local, dtype=tf.int64)
    epoch_seed = tf.stack([tf.cast(seed, tf.int64), epoch])
    rows = tf.random.experimental.index_shuffle(positions, epoch_seed, n - 1)
    return reader.batch(rows, epoch, local)

  def example(ex):
    out = _load_row(t, reader.drop_spare(ex), lay, cache)
    out["mask"] = tf.constant(True)  # training batches are never padded
    if with_ids:
      for key in ("image_id", "region_id", "control_text"):
        out[key] = ex[key]
    return out

  # The host step reads one batch ahead of the parallel per-row map.
  ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).map(host).prefetch(1)
  ds = ds.unbatch().map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = _options(ds.batch(local, drop_remainder=True).prefetch(prefetch))
  return _Batches(ds)


class EvalIterable:
  """Re-iterable evaluation batches for this process: its contiguous shard of rows in order,
  the last batch padded with `mask=False` rows, and as many steps on every process (the count of
  the largest shard), so all hosts run the same number of steps.

  Besides the ARCHITECTURE.md keys, each batch holds `image_id` int64[B], `region_id` int64[B]
  and `captions`: a list of B reference lists (empty for padding rows).
  """

  def __init__(self, source, *, global_batch_size, tokenizer, window_size, process_index=0,
               process_count=1, caption_len=32, control_len=32, text_len=32, prefetch=2,
               text_tokenizer=None, lm_kind="t5"):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} not divisible by {process_count}")
    self.source = source
    self.local = global_batch_size // process_count
    self.start, self.end = source.process_range(process_index, process_count)
    largest = -(-source.num_examples // process_count)
    self.num_steps = -(-largest // self.local)
    self.layout = layout_for(source, window_size, hash=True)
    self.prefetch = prefetch
    self._t = _Tables(source.tag_vocab, tokenizer, caption_len, control_len, text_len, lm_kind)
    self._reader = _HostReader(source, tokenizer, self._t, text_tokenizer)

  def __len__(self) -> int:
    return self.num_steps

  def __iter__(self) -> Iterator[dict[str, Any]]:
    tf = _tensorflow()
    t, local, reader = self._t, self.local, self._reader
    start, count, n = self.start, self.end - self.start, self.source.num_examples
    pad_row = min(start, max(n - 1, 0))
    cache = _ImageCache()

    def host(step):
      c = step * local + tf.range(local, dtype=tf.int64)
      valid = c < count
      ex = reader.batch(tf.where(valid, start + c, pad_row), tf.constant(-1, tf.int64), local)
      ex["mask"] = valid
      return ex

    def example(ex):
      out = _load_row(t, reader.drop_spare(ex), self.layout, cache)
      for key in ("mask", "image_id", "region_id", "references", "num_refs"):
        out[key] = ex[key]
      return out

    ds = tf.data.Dataset.range(self.num_steps).map(host).prefetch(1).unbatch()
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Each host batch is `local` rows, so every output batch is one host batch (references are
    # padded to that batch's longest list).
    ds = _options(ds.batch(local, drop_remainder=True).prefetch(self.prefetch))
    for batch in _Batches(ds):
      refs, num = batch.pop("references"), batch.pop("num_refs")
      batch["captions"] = [[r.decode("utf-8") for r in refs[i, :num[i]]] if batch["mask"][i]
                           else [] for i in range(local)]
      yield batch


def make_eval_iterator(source: sources_lib.RegionSource, **kw) -> EvalIterable:
  """See `EvalIterable`; iterate it once per evaluation."""
  return EvalIterable(source, **kw)
