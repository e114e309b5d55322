"""tf.data input pipeline: per-process local batches in the batch format of docs/ARCHITECTURE.md.

Order and resumption. Rows are addressed by index (sources.RegionTable). Training step k of an
uninterrupted run consumes the global positions [k*G, (k+1)*G) of epoch e = k // steps_per_epoch,
mapped to rows by a stateless per-epoch permutation (`tf.random.experimental.index_shuffle` with
seed (seed, e)); process p takes the slice [p*L, (p+1)*L) of each global batch (L = G / P). So
the whole stream is a pure function of (seed, step): two runs give the same order, a pipeline
built with `start_step=k` yields exactly batches k, k+1, ... (the iterator position saved with a
checkpoint is just the step), and in every step the processes read disjoint rows that together
form the global batch. The remainder of each epoch (N mod G rows, different rows each epoch) is
dropped. Control words (SPEC §7c) are drawn on the host by numpy generators seeded by (seed,
epoch, row), so they are reproducible and resumable too, and tokenised as whole strings.

Images are decoded at full resolution (PIL, data/images.py) and each row carries its region's
windows (views/windows.py): the whole image zero-padded to [S, S] when it fits in
`window_size`, else a full-resolution window around the box and coarser levels, with the hash
pixels in evaluation batches; boxes stay in image pixels. Views are cut on the device.

TensorFlow is kept off the accelerators (it would otherwise grab GPU memory).
"""

from __future__ import annotations

import functools
import threading
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


# ----------------------------------------------------------------------------- tokenisation


def _trim(ids: np.ndarray) -> np.ndarray:
  """Drops the all-padding columns on the right (at least one column stays): the per-source
  table is held in memory, and `_load_row` pads each row back to the full length."""
  used = int(np.max(np.nonzero(ids.any(axis=0))[0], initial=0)) + 1 if ids.size else 1
  return ids[:, :used]


def _ragged(rows: list, tf):
  """int32 ragged [N, None] from a list of int arrays (from row splits: fast for millions)."""
  lengths = np.asarray([len(r) for r in rows], np.int64)
  flat = (np.concatenate([np.asarray(r, np.int32).reshape(-1) for r in rows])
          if lengths.sum() else np.zeros((0,), np.int32))
  splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return tf.RaggedTensor.from_row_splits(tf.constant(flat, tf.int32), tf.constant(splits))


class _Tables:
  """Per-source constants, tokenised once on the host and captured by the tf.data graph."""

  def __init__(self, table: sources_lib.RegionTable, tokenizer, caption_len, control_len,
               text_len, text_tokenizer=None, control_phrases=True):
    tf = _tensorflow()
    self.table = table
    self.n = len(table)
    self.num_tags = len(table.tag_vocab)
    self.image_path = tf.constant(table.image_path.astype(str))
    self.image_id = tf.constant(table.image_id)
    self.region_id = tf.constant(table.region_id)
    self.box = tf.constant(table.box)
    self.caption_len, self.text_len = caption_len, text_len
    encode = lambda texts, length: captions_lib.tokenize(tokenizer, texts, length)[0]
    self.caption_ids = tf.constant(_trim(encode(table.caption, caption_len)))
    if text_tokenizer is None:  # one tokenizer for the LM and the text tower (synthetic world)
      text_ids = encode(table.caption, text_len)
    else:  # the text tower's own (CLIP BPE: SOT ... EOT, zero-padded)
      text_ids = np.asarray(text_tokenizer(list(table.caption), text_len), np.int32)
      text_ids = text_ids.reshape(len(table.caption), text_len)
    self.text_ids = tf.constant(_trim(text_ids))
    self.category = tf.constant(table.category)
    self.attributes = tf.constant(table.attributes)
    self.tag_ids = _ragged(table.tag_ids, tf) if self.n else None
    self.tokenizer = tokenizer
    self.control_len = control_len
    self.control_phrases = control_phrases
    # Evaluation control words: "|" tokenised as the string it is (the model substitutes its
    # predicted tags).
    self.empty_control = encode([control_words.END], control_len)[0]
    # A fast tokenizer's truncation / padding state is shared: one caller at a time (the
    # pipeline's map runs in several threads). Control strings repeat ("|" alone half the
    # time), so their ids are cached.
    self._lock = threading.Lock()
    self._encode_control = functools.lru_cache(maxsize=1 << 16)(
        lambda text: encode([text], control_len)[0])

  def control(self, row, seed):
    """Training control words of table row `row` (SPEC §7c): the string drawn from the row's
    candidates with the generator of `seed` (int[3]: seed, epoch, row), and its ids: the
    tokenizer's ids of that whole string (int32[control_len], `</s>` appended, 0-padded)."""
    row = int(row)
    tags = [self.table.tag_vocab[k] for k in self.table.tag_ids[row]]
    phrases = (control_words.caption_phrases(str(self.table.caption[row]))
               if self.control_phrases else [])
    text = control_words.training_control_words(
        control_words.candidate_words(tags, phrases),
        np.random.default_rng([int(s) for s in seed]),
        full_drop_ratio=FULL_DROP_PROB, keep_ratio=KEEP_PROB)
    with self._lock:
      ids = self._encode_control(text)
    return ids, np.bytes_(text.encode("utf-8"))


def _control_ids(t: _Tables, row, seed):
  """(int32[control_len] ids, string) of the training control words; see `_Tables.control`."""
  tf = _tensorflow()
  ids, text = tf.numpy_function(t.control, [row, seed], [tf.int32, tf.string], stateful=False)
  return tf.ensure_shape(ids, [t.control_len]), tf.ensure_shape(text, [])


def _pad_to(ids, length: int):
  tf = _tensorflow()
  return tf.ensure_shape(tf.pad(ids, [[0, length - tf.shape(ids)[0]]]), [length])


def _region_input(lay: windows.Layout, data: bytes, box: np.ndarray):
  """Host side of `_image_keys`: decode (data/images.py rules), levels, the region's windows."""
  image = images_lib.decode(data)
  row = windows.region_input(windows.pyramid(image, lay.side, lay.levels), box, lay)
  return tuple(row[k] for k in _image_key_names(lay))


def _image_key_names(lay: windows.Layout) -> tuple[str, ...]:
  return ("image", "image_hw", "window") + (("hash_pixels",) if lay.hash else ())


def _image_keys(path, box, lay: windows.Layout) -> dict:
  """The image keys of one row (ARCHITECTURE.md batch format): decoded and cut on the host by
  `windows.region_input` (PIL releases the GIL while decoding and resizing, so the parallel
  map runs rows concurrently)."""
  tf = _tensorflow()
  names = _image_key_names(lay)
  types = {"image": tf.uint8, "image_hw": tf.int32, "window": tf.float32,
           "hash_pixels": tf.uint8}
  shapes = {"image": [lay.levels, lay.side, lay.side, 3], "image_hw": [2],
            "window": [lay.levels, windows.GEOMETRY],
            "hash_pixels": [windows.HASH_CROPS, windows.HASH_SIDE, windows.HASH_SIDE]}
  out = tf.numpy_function(functools.partial(_region_input, lay), [tf.io.read_file(path), box],
                          [types[k] for k in names], stateful=False)
  return {k: tf.ensure_shape(v, shapes[k]) for k, v in zip(names, out)}


def _load_row(t: _Tables, row, lay: windows.Layout, control_seed=None):
  """One example dict (ARCHITECTURE.md batch format, unbatched) for table row `row`."""
  tf = _tensorflow()
  tags = tf.gather(t.tag_ids, row) if t.tag_ids is not None else tf.zeros([0], tf.int32)
  multi_hot = tf.minimum(tf.reduce_sum(tf.one_hot(tags, t.num_tags), axis=0), 1.0)
  if control_seed is None:
    control, control_text = tf.constant(t.empty_control, tf.int32), None
  else:
    control, control_text = _control_ids(t, row, control_seed)
  caption_ids = _pad_to(t.caption_ids[row], t.caption_len)
  ex = {
      **_image_keys(t.image_path[row], t.box[row], lay),
      "box": t.box[row],
      "caption_ids": caption_ids,
      "caption_mask": tf.cast(caption_ids != 0, tf.int32),
      "control_ids": control,
      "control_mask": tf.cast(control != 0, tf.int32),
      "text_ids": _pad_to(t.text_ids[row], t.text_len),
      "tags": tf.ensure_shape(multi_hot, [t.num_tags]),
      "category": t.category[row],
      "attributes": t.attributes[row],
  }
  if control_text is not None:
    ex["control_text"] = control_text
  return ex


def layout_for(source: sources_lib.Source, window_size: int, *, hash: bool) -> windows.Layout:
  """The windows' layout for a source's images (views/windows.layout); `hash` False drops the
  hash pixels (training never hashes)."""
  lay = windows.layout(source.max_image_side, window_size)
  return windows.Layout(lay.side, lay.levels, lay.hash and hash)


def _options(ds):
  tf = _tensorflow()
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  return ds.with_options(opts)


def make_train_iterator(source: sources_lib.Source, *, global_batch_size: int, seed: int,
                        tokenizer, window_size: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0, caption_len: int = 32,
                        control_len: int = 32, text_len: int = 32, prefetch: int = 2,
                        with_ids: bool = False, text_tokenizer=None,
                        control_phrases: bool = True) -> Iterator[dict[str, np.ndarray]]:
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
  """
  tf = _tensorflow()
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} not divisible by {process_count}")
  n = source.num_examples
  steps_per_epoch = n // global_batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{n} examples cannot fill one global batch of {global_batch_size}")
  local = global_batch_size // process_count
  t = _Tables(source.table, tokenizer, caption_len, control_len, text_len, text_tokenizer,
              control_phrases)
  lay = layout_for(source, window_size, hash=False)

  def example(counter):
    step, r = counter // local, counter % local
    epoch, j = step // steps_per_epoch, step % steps_per_epoch
    position = j * global_batch_size + process_index * local + r
    epoch_seed = tf.stack([tf.cast(seed, tf.int64), epoch])
    row = tf.random.experimental.index_shuffle(position, epoch_seed, n - 1)
    control_seed = tf.stack([tf.cast(seed, tf.int64), epoch, row])
    ex = _load_row(t, row, lay, control_seed)
    ex["mask"] = tf.constant(True)  # training batches are never padded
    control_text = ex.pop("control_text")
    if with_ids:
      ex["image_id"], ex["region_id"] = t.image_id[row], t.region_id[row]
      ex["control_text"] = control_text
    return ex

  ds = tf.data.Dataset.range(start_step * local, np.iinfo(np.int64).max)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = _options(ds.batch(local, drop_remainder=True).prefetch(prefetch))
  return ds.as_numpy_iterator()


class EvalIterable:
  """Re-iterable evaluation batches for this process: its contiguous shard of rows in order,
  the last batch padded with `mask=False` rows, and as many steps on every process (the count of
  the largest shard), so all hosts run the same number of steps.

  Besides the ARCHITECTURE.md keys, each batch holds `image_id` int64[B], `region_id` int64[B]
  and `captions`: a list of B reference lists (empty for padding rows).
  """

  def __init__(self, source, *, global_batch_size, tokenizer, window_size, process_index=0,
               process_count=1, caption_len=32, control_len=32, text_len=32, prefetch=2,
               text_tokenizer=None):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} not divisible by {process_count}")
    self.source = source
    self.local = global_batch_size // process_count
    self.start, self.end = source.process_range(process_index, process_count)
    largest = -(-source.num_examples // process_count)
    self.num_steps = -(-largest // self.local)
    self.layout = layout_for(source, window_size, hash=True)
    self.prefetch = prefetch
    self._t = _Tables(source.table, tokenizer, caption_len, control_len, text_len,
                      text_tokenizer)

  def __len__(self) -> int:
    return self.num_steps

  def __iter__(self) -> Iterator[dict[str, Any]]:
    tf = _tensorflow()
    t, start, count = self._t, self.start, self.end - self.start

    def example(c):
      valid = c < count
      row = tf.where(valid, start + c, min(start, max(t.n - 1, 0)))
      ex = _load_row(t, row, self.layout)
      ex["mask"] = valid
      ex["row"] = row
      ex["image_id"] = t.image_id[row]
      ex["region_id"] = t.region_id[row]
      return ex

    ds = tf.data.Dataset.range(self.num_steps * self.local)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _options(ds.batch(self.local, drop_remainder=True).prefetch(self.prefetch))
    refs = self.source.table.references
    for batch in ds.as_numpy_iterator():
      rows = batch.pop("row")
      batch["captions"] = [list(refs[r]) if m else [] for r, m in zip(rows, batch["mask"])]
      yield batch


def make_eval_iterator(source: sources_lib.Source, **kw) -> EvalIterable:
  """See `EvalIterable`; iterate it once per evaluation."""
  return EvalIterable(source, **kw)

