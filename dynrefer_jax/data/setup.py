"""What the trainer, evaluator and predictor need from the data side, built from a config.

    data = setup.prepare(config, workdir)   # generates / loads the dataset, the tokenizer
    setup.resolve_vocab(config, data)       # fills vocabulary sizes left as AUTO (-1)
    it = data.train_iterator(start_step=0)  # per-process numpy batches (docs/ARCHITECTURE.md)
    ev = data.eval_iterator("vg_dense")     # a name of config.eval.splits

Two kinds of data (`config.data.name`):

* "synthetic": the generated region world (data/synthetic.py), its own word-level tokenizer.
* anything else: real datasets prepared by tools/prepare_data.py under `config.data.dir`
  (`<dir>/<dataset>/<split>.json` region records; images where the records point). Read by
  `_prepare_real`; the config fields are listed in `REAL_DATA_FIELDS`.

Bad or missing user paths raise `DataError`: one line naming the config flag to set.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import numpy as np

from dynrefer_jax.data import pipeline, sources, synthetic
from dynrefer_jax.data import tokenizer as tokenizer_lib
from dynrefer_jax.train import TrainingError  # train imports this module lazily: no cycle
from dynrefer_jax.config_lib import ConfigError


class DataError(TrainingError, ConfigError):
  """A missing or unusable data path or vocabulary file; the message is one line naming the
  config flag to set. The trainer's command line prints it as `error: ...` (exit 1)."""


@dataclasses.dataclass
class Data:
  root: str
  meta: dict
  tokenizer: Any
  text_token_ids: dict          # {"tags": int[K, L], "attributes": int[T, L], "classes": int[C, L]}
  template_to_attribute: np.ndarray  # int[T]: which attribute each prompt template scores
  num_train_examples: int
  train_iterator: Callable[..., Iterator[dict]]
  eval_iterator: Callable[[str], Any]
  text_vocab_size: int | None = None  # the text tower's tokenizer when not the LM's (CLIP BPE)

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  @property
  def tag_names(self) -> list[str]:
    return list(self.meta["tags"])

  @property
  def attribute_names(self) -> list[str]:
    return [a["name"] for a in self.meta["attributes"]]

  @property
  def category_names(self) -> list[str]:
    return list(self.meta["categories"])

  def example_batch(self) -> dict:
    """One training batch (for shapes); does not advance any iterator the trainer uses."""
    return next(self.train_iterator(start_step=0))


def _tokenize(tok, texts: list[str], length: int) -> np.ndarray:
  enc = tok(texts, max_length=length, truncation=True, padding="max_length")
  ids = np.asarray(enc["input_ids"], np.int32)
  # Truncation must keep </s>: the text tower pools there.
  ids[:, -1] = np.where(ids[:, -1] != tok.pad_token_id, tok.eos_token_id, ids[:, -1])
  return ids


def prepare(config, workdir: str) -> Data:
  if config.data.name != "synthetic":
    return _prepare_real(config, workdir)
  return _prepare_synthetic(config, workdir)


def _prepare_synthetic(config, workdir: str) -> Data:
  d = config.data
  root = d.dir or os.path.join(workdir, "data")
  meta = synthetic.ensure(root, seed=d.seed, num_images=dict(d.num_images),
                          image_size=d.image_size)
  tok_dir = os.path.join(root, "tokenizer")
  train_json = synthetic.load_split(root, "train")
  prompts = meta["attribute_prompts"]
  templates, template_to_attr = [], []
  for i, a in enumerate(meta["attributes"]):
    for p in prompts[a["name"]]:
      templates.append(p)
      template_to_attr.append(i)
  classes = [f"the {c}" for c in meta["categories"]]
  if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    tok = tokenizer_lib.load_tokenizer(tok_dir)
  else:
    texts = ([a["caption"] for a in train_json["annotations"]] + list(meta["tags"])
             + templates + classes)
    tok = tokenizer_lib.build_tokenizer(texts, tok_dir)
  text_len = d.text_len
  token_ids = {"tags": _tokenize(tok, list(meta["tags"]), text_len),
               "attributes": _tokenize(tok, templates, text_len),
               "classes": _tokenize(tok, classes, text_len)}

  import jax  # pylint: disable=import-outside-toplevel
  pidx, pcount = jax.process_index(), jax.process_count()
  kw = dict(window_size=d.window_size, tokenizer=tok, caption_len=d.caption_len,
            control_len=d.control_len, text_len=text_len)
  train_source = sources.SyntheticSource(root, "train")

  def train_iterator(start_step: int = 0):
    return pipeline.make_train_iterator(train_source, global_batch_size=config.train.batch_size,
                                        seed=config.seed, process_index=pidx,
                                        process_count=pcount, start_step=start_step,
                                        control_phrases=d.get("control_phrases", True), **kw)

  def eval_iterator(split: str, batch_size: int | None = None):
    bs = batch_size or config.get("eval", {}).get("batch_size", config.train.batch_size)
    return pipeline.make_eval_iterator(sources.SyntheticSource(root, split),
                                       global_batch_size=bs, process_index=pidx,
                                       process_count=pcount, **kw)

  return Data(root=root, meta=meta, tokenizer=tok, text_token_ids=token_ids,
              template_to_attribute=np.asarray(template_to_attr, np.int32),
              num_train_examples=len(train_json["annotations"]),
              train_iterator=train_iterator, eval_iterator=eval_iterator)


def resolve_vocab(config, data: Data) -> None:
  """Fills vocabulary sizes left as AUTO (-1) from the data: the LM's from its tokenizer, the
  text tower's from its own (CLIP BPE: 49408) or the LM's when they share one."""
  with config.unlocked():
    if config.model.text.vocab_size == -1:
      config.model.text.vocab_size = data.text_vocab_size or data.vocab_size
    if config.model.lm.vocab_size == -1:
      config.model.lm.vocab_size = data.vocab_size
  text_len = config.data.get("text_len", 0)
  if text_len > config.model.text.context_length:
    raise DataError(f"config.data.text_len={text_len} exceeds the text tower's context "
                    f"(config.model.text.context_length={config.model.text.context_length})")


# ----------------------------------------------------------------------------- real datasets

# config.data fields of a real (prepared) dataset; configs/common.real_data() gives defaults.
REAL_DATA_FIELDS = {
    "dir": "root of the tools/prepare_data.py outputs: <dir>/<dataset>/<split>.json",
    "train": "training split, relative to dir without .json ('vg/train'); '' = none (eval only)",
    "splits": "{name: 'dataset/split'}: the evaluation splits config.eval.splits names",
    "tokenizer_dir": "Hugging Face T5 tokenizer folder (flan-t5-xl); default: the tokenizer/ of "
                     "the converted checkpoint (--checkpoint or config.model_init)",
    "text_tokenizer": "'clip' (the text tower's CLIP BPE, SPEC §7b) or 'lm' (the T5 tokenizer)",
    "bpe_path": "CLIP bpe_simple_vocab_16e6.txt.gz; default: the one in open_clip",
    "tag_list": "RAM tag list (one tag per line); default: vocab.json of the converted "
                "checkpoint, else the training split's tag list, else built from its captions",
    "max_tags": "size of a tag vocabulary built from the captions",
    "ovad_annotations": "ovad2000.json (attribute records -> templates); default: vocab.json",
    "class_names": "coco.json or a text file of class names; default: vocab.json, else the "
                   "categories of the splits",
    "fixture": "write a tiny real-format dataset under <workdir>/data when dir is empty (smoke)",
}


def _one_line(msg: str) -> str:
  return " ".join(str(msg).split())


def _load_json(path: str, flag: str) -> Any:
  import json  # pylint: disable=import-outside-toplevel
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(f"{flag}: file not found: {path}") from None
  except (OSError, ValueError) as e:
    raise DataError(f"{flag}: cannot read {path}: {_one_line(e)}") from None


def _split_path(root: str, spec: str) -> str:
  path = spec if os.path.isabs(spec) else os.path.join(root, spec)
  return path if path.endswith(".json") else path + ".json"


def _converted_vocab(workdir: str, model_init: str) -> tuple[dict | None, str]:
  """vocab.json (and its folder) of a tools/convert_checkpoint.py output: the evaluated checkpoint
  (workdir) first, then config.model_init."""
  for root in (workdir, model_init):
    if root and os.path.isfile(os.path.join(root, "vocab.json")):
      return _load_json(os.path.join(root, "vocab.json"), "vocab.json"), root
  return None, ""


def _caption_tags(captions, max_tags: int) -> list[str]:
  """A tag vocabulary from the captions: the most frequent tag-set strings (data/tags.parse)."""
  import collections  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import tags as tags_lib  # pylint: disable=import-outside-toplevel
  counts = collections.Counter()
  for c in captions:
    set1, set2 = tags_lib.parse(str(c))
    counts.update(dict.fromkeys(set1 + set2, 1))
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return [t for t, _ in ranked[:max_tags]]


def _vocabulary(d, workdir: str, model_init: str, train_data: dict | None,
                eval_files: dict[str, str]) -> dict:
  """The model's label vocabularies: tags, attributes (+ templates), categories (+ prompts)."""
  from dynrefer_jax.data import tags as tags_lib  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.evaluators import attributes as attr_lib  # pylint: disable=import-outside-toplevel
  converted, converted_root = _converted_vocab(workdir, model_init)
  v = {}
  if d.tag_list:
    if not os.path.isfile(d.tag_list):
      raise DataError(f"--config.data.tag_list: file not found: {d.tag_list}")
    v["tags"] = tags_lib.load_vocabulary(d.tag_list)
  elif converted is not None:
    v["tags"] = list(converted["tags"])
  elif train_data is not None and train_data.get("vocab", {}).get("tags"):
    v["tags"] = list(train_data["vocab"]["tags"])
  elif train_data is not None:
    v["tags"] = _caption_tags((a["caption"] for a in train_data["annotations"]), d.max_tags)
  if not v.get("tags"):
    raise DataError("no tag vocabulary: set --config.data.tag_list=ram_tag_list.txt (or "
                    "--config.model_init to a converted checkpoint with vocab.json)")

  cache = {}

  def file_vocabs() -> dict:
    """The label lists the split files were prepared with (read only when needed)."""
    if not cache:
      cache["train"] = train_data.get("vocab", {}) if train_data is not None else {}
      for name, path in eval_files.items():
        cache[name] = _load_json(path, f"config.data.splits.{name}").get("vocab", {})
    return cache

  if d.ovad_annotations:
    obj = _load_json(d.ovad_annotations, "--config.data.ovad_annotations")
    records = obj.get("attributes") if isinstance(obj, dict) else obj
    if not isinstance(records, list):
      raise DataError(f"--config.data.ovad_annotations: {d.ovad_annotations} holds no "
                      "'attributes' list (expected OVAD's ovad2000.json)")
    try:
      templates, owner = attr_lib.ovad_templates(records)
    except (KeyError, ValueError) as e:
      raise DataError(f"--config.data.ovad_annotations: bad attribute record in "
                      f"{d.ovad_annotations}: {_one_line(e)}") from None
    v["attributes"] = [a["name"] for a in records]
    v["attribute_freq"] = [a.get("freq_set", "") for a in records]
    v["attribute_templates"], v["template_to_attribute"] = templates, owner
  elif converted is not None:
    v["attributes"] = list(converted["attributes"])
    v["attribute_freq"] = list(converted.get("attribute_freq", [""] * len(v["attributes"])))
    v["attribute_templates"] = list(converted["attribute_templates"])
    v["template_to_attribute"] = np.asarray(converted["template_to_attribute"], np.int32)
  else:
    labelled = [n for n, fv in file_vocabs().items() if fv.get("attributes")]
    if labelled:
      raise DataError(f"split {labelled[0]!r} has attribute labels; their prompt templates "
                      "need OVAD's attribute records: set "
                      "--config.data.ovad_annotations=ovad2000.json")
    v["attributes"], v["attribute_freq"] = [], []
    v["attribute_templates"], v["template_to_attribute"] = [], np.zeros((0,), np.int32)

  if d.class_names:
    from dynrefer_jax.convert import dynrefer as conv  # pylint: disable=import-outside-toplevel
    try:
      v["categories"] = conv.read_names(d.class_names, "categories")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"--config.data.class_names: {_one_line(e)}") from None
  elif converted is not None:
    v["categories"] = list(converted["categories"])
  else:
    v["categories"] = list(dict.fromkeys(c for fv in file_vocabs().values()
                                         for c in fv.get("categories", [])))
  v["class_prompts"] = [f"the {c.lower()}" for c in v["categories"]]
  v["source"] = converted_root
  return v


def _load_tokenizer(d, workdir: str, model_init: str, root: str, texts_for_fixture):
  """The LM tokenizer: config.data.tokenizer_dir, else the converted checkpoint's tokenizer/,
  else (fixture data only) a word-level one built from the fixture's captions."""
  if d.tokenizer_dir:
    if not os.path.isdir(d.tokenizer_dir):
      raise DataError(f"--config.data.tokenizer_dir: no such directory: {d.tokenizer_dir}")
    try:
      return tokenizer_lib.load_tokenizer(d.tokenizer_dir)
    except (OSError, ValueError, TypeError) as e:
      raise DataError(f"--config.data.tokenizer_dir: cannot load a tokenizer from "
                      f"{d.tokenizer_dir}: {_one_line(e)}") from None
  for base in (workdir, model_init):
    if base and os.path.isdir(os.path.join(base, "tokenizer")) and os.path.isfile(
        os.path.join(base, "vocab.json")):
      return tokenizer_lib.load_tokenizer(os.path.join(base, "tokenizer"))
  if d.get("fixture"):
    tok_dir = os.path.join(root, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
      return tokenizer_lib.load_tokenizer(tok_dir)
    return tokenizer_lib.build_tokenizer(texts_for_fixture(), tok_dir)
  raise DataError("no T5 tokenizer: set --config.data.tokenizer_dir=DIR (a Hugging Face "
                  "flan-t5-xl folder with spiece.model / tokenizer.json)")


def _check_images(table: sources.RegionTable, path: str) -> None:
  paths = sorted(set(table.image_path.tolist()))
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(f"{len(missing)} of {len(paths)} images of {path} are missing (e.g. "
                    f"{missing[0]}); tools/prepare_data.py records absolute image paths: re-run "
                    "it with --image_dir where the images are now")


def _table(data: dict, path: str, vocab: dict, parser) -> sources.RegionTable:
  fv = data.get("vocab", {})
  image_root = os.path.join(os.path.dirname(path), data.get("dataset", {}).get("image_root", ""))
  try:
    table = sources.table_from_coco_style(
        data, image_root, tag_vocab=fv.get("tags", []), categories=fv.get("categories", []),
        attribute_names=fv.get("attributes", []))
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{path} is not a tools/prepare_data.py record file: "
                    f"{_one_line(repr(e))}") from None
  _check_images(table, path)
  return sources.remap_table(table, tag_vocab=vocab["tags"], categories=vocab["categories"],
                             attribute_names=vocab["attributes"], tag_parser=parser)


def _prepare_real(config, workdir: str) -> Data:
  """A dataset prepared by tools/prepare_data.py (module docstring; REAL_DATA_FIELDS)."""
  from dynrefer_jax.data import tags as tags_lib  # pylint: disable=import-outside-toplevel
  d = config.data
  root = d.dir
  if not root and d.get("fixture"):
    from dynrefer_jax.data import fixture  # pylint: disable=import-outside-toplevel
    root = os.path.join(workdir, "data")
    raw = fixture.ensure(root)
    d = d.copy_and_resolve_references()
    # The fixture's own RAM-style tag list, OVAD file and class list, as a user would pass them.
    d.tag_list = d.tag_list or raw["tag_list"]
    d.ovad_annotations = d.ovad_annotations or raw["ovad"]
    d.class_names = d.class_names or raw["classes"]
  if not root:
    raise DataError("config.data.dir is empty: set --config.data.dir=DIR, the folder holding "
                    "the tools/prepare_data.py outputs (DIR/vg/train.json, ...)")
  if not os.path.isdir(root):
    raise DataError(f"--config.data.dir: no such directory: {root}")
  splits = dict(d.splits)
  eval_files = {name: _split_path(root, spec) for name, spec in splits.items()}
  train_file = _split_path(root, d.train) if d.train else ""
  wanted = list(config.get("eval", {}).get("splits", []))
  unknown = [s for s in wanted if s not in splits and s != "train"]
  if unknown:
    raise DataError(f"config.eval.splits names {unknown[0]!r}, which config.data.splits does "
                    f"not define (known: {', '.join(sorted(splits)) or 'none'})")
  missing = [f"config.data.{'train' if n == 'train' else 'splits.' + n}={f}"
             for n, f in ([("train", train_file)] if train_file else [])
             + [(s, eval_files[s]) for s in wanted if s in eval_files]
             if not os.path.isfile(f)]
  if missing:
    raise DataError(f"{len(missing)} prepared split file(s) missing: {'; '.join(missing)} "
                    "(write them with tools/prepare_data.py --out DIR/<dataset> --split <split>)")

  # Vocabulary and tokenizer of the converted checkpoint the weights rest on: model_init (or
  # what the workdir was trained from), followed down a chain of training workdirs.
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  model_init = ckpt_lib.converted_root(config.get("model_init", "") or ""
                                       or ckpt_lib.recorded_init(workdir))
  train_data = _load_json(train_file, "config.data.train") if train_file else None
  vocab = _vocabulary(d, workdir, model_init, train_data, {s: eval_files[s] for s in wanted
                                                          if s in eval_files})
  parser = tags_lib.TagParser(vocab["tags"])
  train_table = None
  if train_data is not None:
    train_table = _table(train_data, train_file, vocab, parser)
    del train_data
    if not len(train_table):
      raise DataError(f"config.data.train: {train_file} holds no regions")

  def fixture_texts():
    caps = list(train_table.caption) if train_table is not None else []
    return caps + vocab["tags"] + vocab["class_prompts"] + vocab["attribute_templates"]

  tok = _load_tokenizer(d, workdir, model_init, root, fixture_texts)
  text_len = d.text_len
  if d.text_tokenizer == "clip":
    from dynrefer_jax.tokenizers import clip_bpe  # pylint: disable=import-outside-toplevel
    try:
      text_tok = clip_bpe.ClipTokenizer(d.bpe_path or None)
    except (FileNotFoundError, OSError) as e:
      raise DataError(f"--config.data.bpe_path: {_one_line(e)}") from None
    text_vocab_size = text_tok.vocab_size
  elif d.text_tokenizer == "lm":
    text_tok, text_vocab_size = None, None
  else:
    raise DataError(f"config.data.text_tokenizer={d.text_tokenizer!r}: 'clip' or 'lm'")

  def encode(texts):
    if not texts:
      return np.zeros((0, text_len), np.int32)
    return text_tok(list(texts), text_len) if text_tok else _tokenize(tok, list(texts), text_len)

  token_ids = {"tags": encode(vocab["tags"]), "attributes": encode(vocab["attribute_templates"]),
               "classes": encode(vocab["class_prompts"])}

  import jax  # pylint: disable=import-outside-toplevel
  pidx, pcount = jax.process_index(), jax.process_count()
  kw = dict(window_size=d.window_size, tokenizer=tok, caption_len=d.caption_len,
            control_len=d.control_len, text_len=text_len, text_tokenizer=text_tok)
  eval_tables: dict[str, sources.RegionTable] = {}

  def train_iterator(start_step: int = 0):
    if train_table is None:
      raise DataError("no training split: set --config.data.train=DATASET/SPLIT (e.g. vg/train)")
    return pipeline.make_train_iterator(
        sources.TableSource(train_table), global_batch_size=config.train.batch_size,
        seed=config.seed, process_index=pidx, process_count=pcount, start_step=start_step,
        control_phrases=d.get("control_phrases", True), **kw)

  def eval_iterator(split: str, batch_size: int | None = None):
    if split == "train" and train_table is not None:
      table = train_table
    elif split in eval_tables:
      table = eval_tables[split]
    else:
      if split not in eval_files:
        raise DataError(f"unknown evaluation split {split!r}; config.data.splits defines "
                        f"{', '.join(sorted(eval_files)) or 'none'}")
      path = eval_files[split]
      table = eval_tables[split] = _table(_load_json(path, f"config.data.splits.{split}"),
                                          path, vocab, parser)
    bs = batch_size or config.get("eval", {}).get("batch_size", config.train.batch_size)
    return pipeline.make_eval_iterator(sources.TableSource(table), global_batch_size=bs,
                                       process_index=pidx, process_count=pcount, **kw)

  meta = {"tags": vocab["tags"], "categories": vocab["categories"],
          "attributes": [{"name": n, "freq_set": f}
                         for n, f in zip(vocab["attributes"], vocab["attribute_freq"])],
          "attribute_templates": vocab["attribute_templates"],
          "class_prompts": vocab["class_prompts"], "vocab_source": vocab["source"],
          "splits": {"train": train_file, **eval_files}}
  return Data(root=root, meta=meta, tokenizer=tok, text_token_ids=token_ids,
              template_to_attribute=np.asarray(vocab["template_to_attribute"], np.int32),
              num_train_examples=len(train_table) if train_table is not None else 0,
              train_iterator=train_iterator, eval_iterator=eval_iterator,
              text_vocab_size=text_vocab_size)
