"""The tf.data pipeline over TFDS region sources: batch format, order, resumption, process
sharding, eval padding. The synthetic world is built by its TFDS builder; the same world written
by `synthetic.generate` (its JSON and PNG files) is the reference."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sentencepiece as spm
from transformers import AutoTokenizer

from dynrefer_jax.data import builders, control_words, pipeline, sources, synthetic
from dynrefer_jax.data import tokenizer as tok_lib
from dynrefer_jax.data.builders import synthetic as world_builder

S = 96          # window_size (the world's images are 80 px high, 60-80 px wide)
G = 32          # global batch


COUNTS = {"train": 14, "val": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The reference files of the world (synthetic.generate)."""
  root = str(tmp_path_factory.mktemp("pipe") / "world")
  synthetic.generate(root, seed=0, num_images=COUNTS, image_size=80)
  return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The same world built by its TFDS builder (ArrayRecord), as training reads it."""
  return builders.build("synthetic", str(tmp_path_factory.mktemp("pipe_data")),
                        config=world_builder.world_config(0, COUNTS, 80))


@pytest.fixture(scope="module")
def tok(world, tmp_path_factory):
  meta = synthetic.load_meta(world)
  texts = [a["caption"] for a in synthetic.load_split(world, "train")["annotations"]]
  texts += [a["caption"] for a in synthetic.load_split(world, "val")["annotations"]]
  return tok_lib.build_tokenizer(texts + meta["tags"], str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def train(built):
  return sources.RegionSource(built, "train")


@pytest.fixture(scope="module")
def annotations(world):
  data = synthetic.load_split(world, "train")
  data.update({"root": world, "by_id": {a["id"]: a for a in data["annotations"]},
               "image": {im["id"]: im for im in data["images"]}})
  return data


def _take(it, n):
  return list(itertools.islice(it, n))


def _train(train, tok, **kw):
  args = dict(global_batch_size=G, seed=7, tokenizer=tok, window_size=S, with_ids=True)
  args.update(kw)
  return pipeline.make_train_iterator(train, **args)


def test_batch_format(train, tok):
  batch = next(_train(train, tok, with_ids=False))
  k = len(synthetic.tag_vocabulary())
  want = {"image": (np.uint8, (G, 1, S, S, 3)), "image_hw": (np.int32, (G, 2)),
          "window": (np.float32, (G, 1, 6)),
          "box": (np.float32, (G, 4)), "caption_ids": (np.int32, (G, 32)),
          "caption_mask": (np.int32, (G, 32)), "control_ids": (np.int32, (G, 32)),
          "control_mask": (np.int32, (G, 32)), "text_ids": (np.int32, (G, 32)),
          "tags": (np.float32, (G, k)), "category": (np.int32, (G,)),
          "attributes": (np.int32, (G, 15)), "mask": (np.bool_, (G,))}
  assert set(batch) == set(want)
  for key, (dtype, shape) in want.items():
    assert batch[key].dtype == dtype and batch[key].shape == shape, key
  assert batch["mask"].all()


def test_rows_match_annotations(world, train, tok, annotations):
  batch = next(_train(train, tok))
  vocab = synthetic.tag_vocabulary()
  for i in range(G):
    a = annotations["by_id"][int(batch["region_id"][i])]
    im = annotations["image"][a["image_id"]]
    assert batch["image_id"][i] == a["image_id"]
    # Images smaller than S: one window, the stored pixels unchanged, zero padding elsewhere.
    h, w = im["height"], im["width"]
    assert tuple(batch["image_hw"][i]) == (h, w)
    np.testing.assert_array_equal(batch["window"][i], [[0, 0, 1, 1, w, h]])
    png = np.asarray(Image.open(os.path.join(world, "images", im["file_name"])))
    np.testing.assert_array_equal(batch["image"][i, 0, :h, :w], png)
    assert not batch["image"][i, 0, h:].any() and not batch["image"][i, 0, :, w:].any()
    x, y, bw, bh = a["bbox"]
    np.testing.assert_allclose(batch["box"][i], [x, y, x + bw, y + bh])
    assert tok.decode(batch["caption_ids"][i], skip_special_tokens=True) == a["caption"]
    n = len(a["caption"].split())
    assert batch["caption_ids"][i, n] == 1 and batch["caption_mask"][i].sum() == n + 1
    np.testing.assert_array_equal(batch["text_ids"][i], batch["caption_ids"][i])
    assert {vocab[j] for j in np.flatnonzero(batch["tags"][i])} == set(a["tags"])
    assert batch["category"][i] == synthetic.CATEGORIES.index(a["category"])
    names = synthetic.attribute_names()
    assert [a["attributes"][n_] for n_ in names] == batch["attributes"][i].tolist()


def test_training_caches_images_only_when_the_split_fits(train, tok, annotations,
                                                        monkeypatch):
  """The training image cache is on only when every image of the split fits its budget (bound:
  side**2 * 3 bytes * 4/3 for the levels); uncached batches are the same pixels."""
  class Split:  # what train_cache_bytes reads of a source
    def __init__(self, num_images, max_image_side):
      self.num_images, self.max_image_side = num_images, max_image_side
  budget = pipeline.TRAIN_IMAGE_CACHE_BYTES
  assert pipeline.train_cache_bytes(Split(600, 96)) == budget   # the synthetic world: 22 MB
  assert pipeline.train_cache_bytes(Split(77398, 1280)) == 0    # Visual Genome
  assert pipeline.train_cache_bytes(Split(budget // (4 * 500**2), 500)) == budget
  assert pipeline.train_cache_bytes(Split(budget // (4 * 500**2) + 1, 500)) == 0
  assert train.num_images == COUNTS["train"]
  made = []
  real_prepare = pipeline.windows.prepare
  monkeypatch.setattr(pipeline.windows, "prepare",
                      lambda *a: made.append(1) or real_prepare(*a))
  _take(_train(train, tok), 2)
  assert 0 < len(made) <= COUNTS["train"]  # cached: each image prepared once
  made.clear()
  monkeypatch.setattr(pipeline, "TRAIN_IMAGE_CACHE_BYTES", 0)  # the world no longer fits
  batch = next(_train(train, tok))
  assert len(made) >= G > COUNTS["train"]  # every row prepared its own image (prefetch: more)
  for i in range(G):
    im = annotations["image"][int(batch["image_id"][i])]
    png = np.asarray(Image.open(os.path.join(annotations["root"], "images", im["file_name"])))
    np.testing.assert_array_equal(batch["image"][i, 0, :im["height"], :im["width"]], png)


def _words(text: bytes) -> list[str]:
  body = text.decode()
  assert body.endswith("|") and body.count("|") == 1
  return body[:-1].split(",") if body != "|" else []


def _candidates(a) -> set[str]:
  """The original's candidates of annotation `a`: tag_set1 ∪ tag_set2 ∪ the caption's phrases."""
  return set(a["tags"]) | set(control_words.caption_phrases(a["caption"]))


def test_control_words(train, tok, annotations):
  only_bar = total = phrase_only = 0
  for batch in _take(_train(train, tok), 8):
    for i in range(G):
      a = annotations["by_id"][int(batch["region_id"][i])]
      words = _words(batch["control_text"][i])
      assert len(set(words)) == len(words) and set(words) <= _candidates(a)
      tags = set(a["tags"])
      phrase_only += bool(set(words) - tags)
      only_bar += not words
      total += 1
  # P("|" alone) = 0.5 + 0.5 * 0.5^#candidates ~ 0.5 for ~5-10 candidates.
  assert 0.38 < only_bar / total < 0.66
  assert phrase_only > 0  # phrases that are not tags do get drawn


def test_control_words_keep_rate_and_shuffle(train, tok, annotations):
  """Each candidate survives with p = 0.5 (no full drop) * 0.5 (kept) = 0.25 (bound: > 4
  sigma of the per-row-correlated draw), and the kept words are shuffled: rows with several
  words show both the candidates' sorted order and other orders."""
  kept = candidates = in_order = out_of_order = 0
  for batch in _take(_train(train, tok), 8):
    for i in range(G):
      a = annotations["by_id"][int(batch["region_id"][i])]
      words = _words(batch["control_text"][i])
      kept += len(words)
      candidates += len(_candidates(a))
      if len(words) >= 2:
        in_order += words == sorted(words)
        out_of_order += words != sorted(words)
  assert abs(kept / candidates - 0.25) < 0.08, kept / candidates
  assert in_order > 0 and out_of_order > 0, (in_order, out_of_order)


def test_control_phrases_off_leaves_the_tag_sets(train, tok, annotations):
  for batch in _take(_train(train, tok, control_phrases=False), 4):
    for i in range(G):
      a = annotations["by_id"][int(batch["region_id"][i])]
      assert set(_words(batch["control_text"][i])) <= set(a["tags"])


@pytest.fixture(scope="module")
def spm_dir(world, tmp_path_factory):
  """A T5-style SentencePiece tokenizer trained on the world's captions and tags: spiece.model
  + tokenizer_config.json naming T5Tokenizer, as a flan-t5 folder holds them."""
  d = tmp_path_factory.mktemp("spm")
  meta = synthetic.load_meta(world)
  texts = [a["caption"] for a in synthetic.load_split(world, "train")["annotations"]]
  texts += meta["tags"] + ["man,white shirt|", "|", "a,b|"]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts * 5), model_prefix=str(d / "spiece"), vocab_size=120,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
      eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
  (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                       "extra_ids": 0}))
  return d


def _sp_ids(sp, text, length):
  """SentencePiece's own ids of `text` as T5 feeds them: at most length-1 pieces, then
  `</s>` (1), zero-padded."""
  ids = sp.encode(text)[:length - 1] + [1]
  return ids + [0] * (length - len(ids))


def test_training_control_ids_are_the_ids_of_the_whole_control_string(train, spm_dir):
  """With a SentencePiece tokenizer loaded as T5 loads it, every example's control ids are the
  tokenizer's ids of its control string tokenised whole (as the original and our inference
  do), which differ from the tags tokenised one by one and joined with "," / "|" ids."""
  tok = AutoTokenizer.from_pretrained(str(spm_dir), local_files_only=True)
  assert type(tok).__name__.startswith("T5Tokenizer")
  sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))
  batch = next(_train(train, tok))
  length = batch["control_ids"].shape[1]
  piecewise_differs = 0
  for i in range(G):
    text = batch["control_text"][i].decode()
    want = _sp_ids(sp, text, length)
    assert batch["control_ids"][i].tolist() == want, text
    assert batch["control_ids"][i].tolist() == tok(
        text, max_length=length, truncation=True, padding="max_length")["input_ids"]
    np.testing.assert_array_equal(batch["control_mask"][i], np.asarray(want) != 0)
    # The old way: each word alone, joined by the standalone ids of "," and "|".
    comma, bar = sp.encode(",")[-1], sp.encode("|")[-1]
    old = []
    for j, w in enumerate(_words(batch["control_text"][i])):
      old += ([comma] if j else []) + sp.encode(w)
    old = (old + [bar])[:length - 1] + [1]
    piecewise_differs += old != [x for x in want if x]
  assert piecewise_differs > 0


def test_evaluation_control_ids_are_the_ids_of_the_bar(built, spm_dir):
  tok = AutoTokenizer.from_pretrained(str(spm_dir), local_files_only=True)
  sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))
  val = sources.RegionSource(built, "val")
  batch = next(iter(pipeline.make_eval_iterator(val, global_batch_size=8, tokenizer=tok,
                                                window_size=S)))
  want = _sp_ids(sp, "|", batch["control_ids"].shape[1])
  for row in batch["control_ids"]:
    assert row.tolist() == want


def test_same_order_twice_and_seed_matters(train, tok):
  a = _take(_train(train, tok), 3)
  b = _take(_train(train, tok), 3)
  c = _take(_train(train, tok, seed=8), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any((x["region_id"] != z["region_id"]).any() for x, z in zip(a, c))


def test_resume_yields_exactly_the_remaining_batches(train, tok):
  spe = train.num_examples // G
  n = spe + 3  # crosses an epoch boundary
  full = _take(_train(train, tok), n)
  k = spe - 1
  resumed = _take(_train(train, tok, start_step=k), n - k)
  for x, y in zip(full[k:], resumed):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_epochs_are_permutations_and_processes_disjoint(train, tok, annotations):
  spe = train.num_examples // G
  one = _take(_train(train, tok), 2 * spe)
  p0 = _take(_train(train, tok, process_index=0, process_count=2), 2 * spe)
  p1 = _take(_train(train, tok, process_index=1, process_count=2), 2 * spe)
  all_ids = set(annotations["by_id"])
  epochs = []
  for e in range(2):
    ids0 = np.concatenate([b["region_id"] for b in p0[e * spe:(e + 1) * spe]])
    ids1 = np.concatenate([b["region_id"] for b in p1[e * spe:(e + 1) * spe]])
    assert len(ids0) == len(ids1) == spe * G // 2
    both = np.concatenate([ids0, ids1])
    assert len(set(both)) == len(both) == spe * G  # disjoint, no repeats within an epoch
    assert set(both) <= all_ids
    assert len(all_ids) - len(set(both)) == train.num_examples % G  # only the remainder left
    epochs.append(both)
  assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1])) or \
      train.num_examples % G == 0
  # The two processes' local batches are the two halves of the single-process global batch.
  for x, y0, y1 in zip(one, p0, p1):
    for key in x:
      np.testing.assert_array_equal(x[key], np.concatenate([y0[key], y1[key]]))


def test_images_larger_than_the_window_keep_full_resolution(world, built, tok, annotations,
                                                            monkeypatch):
  """Window 0 is the stored image at full resolution around the box, window 1 the image at half
  size (PIL Lanczos), and evaluation rows carry each hash crop's gray pixels (OpenCV's gray)."""
  import cv2  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.views import windows  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(windows, "CONTEXT_SIDE", 48)  # 48-px windows: two levels for 80 px
  val = sources.RegionSource(built, "val")
  batch = next(iter(pipeline.make_eval_iterator(val, global_batch_size=4, tokenizer=tok,
                                                window_size=40)))
  assert batch["image"].shape == (4, 2, 48, 48, 3) and batch["window"].shape == (4, 2, 6)
  assert batch["hash_pixels"].shape == (4, 11, 448, 448)
  data = synthetic.load_split(world, "val")
  by_id = {a["id"]: a for a in data["annotations"]}
  files = {im["id"]: im["file_name"] for im in data["images"]}
  for i in range(4):
    a = by_id[int(batch["region_id"][i])]
    png = np.asarray(Image.open(os.path.join(world, "images", files[a["image_id"]])))
    h, w = png.shape[:2]
    x, y, bw, bh = a["bbox"]
    np.testing.assert_allclose(batch["box"][i], [x, y, x + bw, y + bh])  # image pixels
    assert tuple(batch["image_hw"][i]) == (h, w)
    x0, y0, sx, sy, vw, vh = batch["window"][i, 0].astype(int)
    assert (sx, sy, vw, vh) == (1, 1, min(48, w), 48)
    assert x0 <= x and x + bw <= x0 + vw and y0 <= y and y + bh <= y0 + vh  # holds the box
    np.testing.assert_array_equal(batch["image"][i, 0, :vh, :vw], png[y0:y0 + vh, x0:x0 + vw])
    half = (round(w / 2), round(h / 2))
    ref = np.asarray(Image.fromarray(png).resize(half, Image.LANCZOS))
    np.testing.assert_allclose(batch["window"][i, 1], [0, 0, w / half[0], h / half[1], *half],
                               rtol=1e-6)
    np.testing.assert_array_equal(batch["image"][i, 1, :half[1], :half[0]], ref)
    # The t = 0 hash crop (the box, integer-truncated): its gray pixels, whole (n <= 448).
    x1, y1, x2, y2 = (int(v) for v in batch["box"][i])
    gray = cv2.cvtColor(png, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(batch["hash_pixels"][i, 0, :y2 - y1, :x2 - x1],
                                  gray[y1:y2, x1:x2])


def test_eval_padding_and_sharding(world, built, tok):
  val = sources.RegionSource(built, "val")
  n = val.num_examples
  local = 8
  runs = []
  for p in range(2):
    ev = pipeline.make_eval_iterator(val, global_batch_size=2 * local, tokenizer=tok,
                                     window_size=S, process_index=p, process_count=2)
    batches = list(ev)
    assert len(batches) == len(ev) == -(-(-(-n // 2)) // local)
    assert len(list(ev)) == len(batches)  # re-iterable
    runs.append(batches)
  seen = []
  refs = {a["id"]: a["caption"] for a in synthetic.load_split(world, "val")["annotations"]}
  for batches in runs:
    for b in batches:
      assert b["image"].shape == (local, 1, S, S, 3) and b["mask"].dtype == np.bool_
      assert "hash_pixels" not in b  # the images fit in one window: hashes read it
      for rid, m, caps in zip(b["region_id"], b["mask"], b["captions"]):
        if m:
          seen.append(int(rid))
          assert caps == [refs[int(rid)]]
        else:
          assert caps == []
      toks = tok.convert_ids_to_tokens(b["control_ids"][0][b["control_mask"][0] > 0])
      assert toks == ["|", "</s>"]
  assert sorted(seen) == sorted(refs)  # every region exactly once over the two hosts
  pad = sum(int((~b["mask"]).sum()) for r in runs for b in r)
  assert pad == 2 * len(runs[0]) * local - n


_PROCESS = """
import json, sys, itertools
from dynrefer_jax.data import builders, pipeline, sources, tokenizer
from dynrefer_jax.data.builders import synthetic
data_dir, tok_dir, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
builder = builders.load("synthetic", data_dir, config=synthetic.world_config(0, %r, 80))
it = pipeline.make_train_iterator(
    sources.RegionSource(builder, "train"), global_batch_size=%d, seed=7,
    tokenizer=tokenizer.load_tokenizer(tok_dir), window_size=%d, with_ids=True,
    process_index=index, process_count=2)
print(json.dumps([b["region_id"].tolist() for b in itertools.islice(it, %d)]))
"""


@pytest.mark.slow
def test_two_processes_read_disjoint_halves_of_every_global_batch(built, train, tok, tmp_path):
  """Two OS processes, each opening the dataset on its own (process 0 and 1 of 2), read
  disjoint rows whose union is exactly the single-process global batch, step after step; and
  exit with their endless iterators still alive (pipeline._Batches closes them at exit).
  (Slow: two more TensorFlow start-ups; test_epochs_are_permutations_and_processes_disjoint
  checks the same slicing in one process.)"""
  steps = train.num_examples // G + 2  # into the second epoch
  tok.save_pretrained(str(tmp_path / "tok"))
  script = _PROCESS % (COUNTS, G, S, steps)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen(
      [sys.executable, "-c", script, str(built.data_path.parents[2]), str(tmp_path / "tok"),
       str(p)], cwd=root, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=root))
      for p in range(2)]
  halves = []
  for proc in procs:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    halves.append(json.loads(out.strip().splitlines()[-1]))
  one = _take(_train(train, tok), steps)
  for step, batch in enumerate(one):
    h0, h1 = halves[0][step], halves[1][step]
    assert not set(h0) & set(h1)
    assert h0 + h1 == batch["region_id"].tolist()
