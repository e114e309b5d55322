"""What the trainer, evaluator and predictor need from the data side, built from a config.

    data = setup.prepare(config, workdir)   # generates / loads the dataset, the tokenizer
    setup.resolve_vocab(config, data)       # fills vocabulary sizes left as AUTO (-1)
    it = data.train_iterator(start_step=0)  # per-process numpy batches (docs/ARCHITECTURE.md)
    ev = data.eval_iterator("vg_dense")     # a name of config.eval.splits

Two kinds of data (`config.data.name`):

* "synthetic": the generated region world (data/synthetic.py) built by its TFDS builder under
  `config.data.dir` (default <workdir>/data), with its own word-level tokenizer.
* anything else: real datasets built by tools/prepare_data.py (TFDS builders, data/builders/)
  into the TFDS data dir `config.data.dir`; splits are named 'dataset/split' ('vg/train').
  Read by `_prepare_real`; the config fields are listed in `REAL_DATA_FIELDS`.

Both read through sources.RegionSource (ArrayRecord by region index): a process holds the
splits' region indices, never their regions.

Bad or missing user paths raise `DataError`: one line naming the config flag to set.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import numpy as np

from dynrefer_jax.data import pipeline, sources
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
  # split name -> {"captions": [N], "category": int[N], "attributes": int[N, A]} of every region
  # (sources.summary: small splits only; the synthetic world's baselines)
  summarize: Callable[[str], dict] | None = None

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


def lm_kind(config) -> str:
  """config.model.lm.kind: "t5" (default) or "llama" (how the LM's text is tokenised)."""
  return config.model.lm.get("kind", "t5")


def prepare(config, workdir: str) -> Data:
  if config.data.name != "synthetic":
    return _prepare_real(config, workdir)
  return _prepare_synthetic(config, workdir)


def _build(dataset: str, data_dir: str, **kw):
  """builders.build, with TFDS's progress bars off (one line per split instead)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import builders  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  return builders.build(dataset, data_dir, **kw)


def _prepare_synthetic(config, workdir: str) -> Data:
  from dynrefer_jax.data.builders import synthetic as world  # pylint: disable=import-outside-toplevel
  d = config.data
  root = d.dir or os.path.join(workdir, "data")
  try:
    world_config = world.world_config(d.seed, dict(d.num_images), d.image_size)
  except ValueError as e:
    raise DataError(f"config.data.num_images: {_one_line(e)}") from None
  builder = _build("synthetic", root, config=world_config)
  meta = builder.info.metadata["meta"]
  train_source = sources.RegionSource(builder, "train")
  tok_dir = os.path.join(root, "tokenizer", world_config.name)
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
    texts = (sources.summary(train_source)["captions"] + list(meta["tags"]) + templates
             + classes)
    tok = tokenizer_lib.build_tokenizer(texts, tok_dir)
  text_len = d.text_len
  token_ids = {"tags": _tokenize(tok, list(meta["tags"]), text_len),
               "attributes": _tokenize(tok, templates, text_len),
               "classes": _tokenize(tok, classes, text_len)}

  import jax  # pylint: disable=import-outside-toplevel
  pidx, pcount = jax.process_index(), jax.process_count()
  kw = dict(window_size=d.window_size, tokenizer=tok, caption_len=d.caption_len,
            control_len=d.control_len, text_len=text_len, lm_kind=lm_kind(config))
  split_sources = {"train": train_source}

  def source(split: str) -> sources.RegionSource:
    if split not in split_sources:
      if split not in builder.info.splits:
        raise DataError(f"unknown evaluation split {split!r}; the synthetic world has "
                        f"{', '.join(builder.info.splits)} (config.data.num_images)")
      split_sources[split] = sources.RegionSource(builder, split)
    return split_sources[split]

  def train_iterator(start_step: int = 0):
    return pipeline.make_train_iterator(train_source, global_batch_size=config.train.batch_size,
                                        seed=config.seed, process_index=pidx,
                                        process_count=pcount, start_step=start_step,
                                        control_phrases=d.get("control_phrases", True), **kw)

  def eval_iterator(split: str, batch_size: int | None = None):
    bs = batch_size or config.get("eval", {}).get("batch_size", config.train.batch_size)
    return pipeline.make_eval_iterator(source(split), global_batch_size=bs,
                                       process_index=pidx, process_count=pcount, **kw)

  return Data(root=root, meta=meta, tokenizer=tok, text_token_ids=token_ids,
              template_to_attribute=np.asarray(template_to_attr, np.int32),
              num_train_examples=train_source.num_examples,
              train_iterator=train_iterator, eval_iterator=eval_iterator,
              summarize=lambda split: sources.summary(source(split)))


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
    "dir": "the TFDS data dir tools/prepare_data.py built the datasets into (--data_dir)",
    "train": "training split as 'dataset/split' ('vg/train'); '' = none (evaluation only)",
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
    "lm_special_tokens": "{name: token} added to the LM tokenizer (the Vicuna variant: LAVIS's "
                         "'[PAD]' pad and '</s>' bos / eos / unk)",
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


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
  """'dataset/split' -> (dataset, split); the dataset must be one of builders.BUILDERS."""
  from dynrefer_jax.data import builders  # pylint: disable=import-outside-toplevel
  dataset, _, split = spec.strip("/").partition("/")
  known = sorted(k for k in builders.BUILDERS if k != "synthetic")
  if not split or "/" in split or dataset not in known:
    raise DataError(f"{flag}={spec}: expected 'dataset/split' with dataset one of "
                    f"{', '.join(known)} (e.g. vg/train)")
  return dataset, split


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


def _vocabulary(d, workdir: str, model_init: str, train_vocab: dict | None, train_captions,
                eval_vocabs) -> dict:
  """The model's label vocabularies: tags, attributes (+ templates), categories (+ prompts).

  train_vocab: the training split's own {tags, categories, attributes} (None: no training
  split); train_captions(): its captions; eval_vocabs(): {split name: its own vocabularies}."""
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
  elif train_vocab is not None and train_vocab.get("tags"):
    v["tags"] = list(train_vocab["tags"])
  elif train_vocab is not None:
    v["tags"] = _caption_tags(train_captions(), d.max_tags)
  if not v.get("tags"):
    raise DataError("no tag vocabulary: set --config.data.tag_list=ram_tag_list.txt (or "
                    "--config.model_init to a converted checkpoint with vocab.json)")

  cache = {}

  def file_vocabs() -> dict:
    """The label lists the splits were built with (read only when needed)."""
    if not cache:
      cache["train"] = train_vocab or {}
      cache.update(eval_vocabs())
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


def _prepare_real(config, workdir: str) -> Data:
  """Datasets built by tools/prepare_data.py (module docstring; REAL_DATA_FIELDS)."""
  from dynrefer_jax.data import builders  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import tags as tags_lib  # pylint: disable=import-outside-toplevel
  d = config.data
  root = d.dir
  if not root and d.get("fixture"):
    from dynrefer_jax.data import fixture  # pylint: disable=import-outside-toplevel
    root = os.path.join(workdir, "data")
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()
    raw = fixture.ensure(root)
    d = d.copy_and_resolve_references()
    # The fixture's own RAM-style tag list, OVAD file and class list, as a user would pass them.
    d.tag_list = d.tag_list or raw["tag_list"]
    d.ovad_annotations = d.ovad_annotations or raw["ovad"]
    d.class_names = d.class_names or raw["classes"]
  if not root:
    raise DataError("config.data.dir is empty: set --config.data.dir=DIR, the TFDS data dir "
                    "tools/prepare_data.py built the datasets into (--data_dir DIR)")
  if not os.path.isdir(root):
    raise DataError(f"--config.data.dir: no such directory: {root}")
  splits = dict(d.splits)
  wanted = list(config.get("eval", {}).get("splits", []))
  unknown = [s for s in wanted if s not in splits and s != "train"]
  if unknown:
    raise DataError(f"config.eval.splits names {unknown[0]!r}, which config.data.splits does "
                    f"not define (known: {', '.join(sorted(splits)) or 'none'})")
  specs = {name: _split_spec(spec, f"config.data.splits.{name}") for name, spec in splits.items()}
  train_spec = _split_spec(d.train, "config.data.train") if d.train else None
  loaded = {}

  def builder_of(dataset: str):
    if dataset not in loaded:
      loaded[dataset] = builders.load(dataset, root)
    return loaded[dataset]

  def prepared(spec) -> bool:
    b = builder_of(spec[0])
    return b.is_prepared() and spec[1] in b.info.splits
  need = ([("config.data.train", d.train, train_spec)] if train_spec else []) + [
      (f"config.data.splits.{s}", splits[s], specs[s]) for s in wanted if s in specs]
  missing = [(flag, spec, ds) for flag, spec, ds in need if not prepared(ds)]
  if missing:
    datasets = list(dict.fromkeys(ds[0] for _, _, ds in missing))
    raise DataError(
        f"{len(missing)} split(s) not built in {root}: "
        f"{'; '.join(f'{flag}={spec}' for flag, spec, _ in missing)} (build them with "
        f"tools/prepare_data.py --dataset {'|'.join(datasets)} --manual_dir RAW "
        f"--data_dir {root})")

  def own_vocab(spec) -> dict:
    return builder_of(spec[0]).info.metadata["splits"][spec[1]]["vocab"]

  # Vocabulary and tokenizer of the converted checkpoint the weights rest on: model_init (or
  # what the workdir was trained from), followed down a chain of training workdirs.
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  model_init = ckpt_lib.converted_root(config.get("model_init", "") or ""
                                       or ckpt_lib.recorded_init(workdir))
  own_train = sources.RegionSource(builder_of(train_spec[0]), train_spec[1]) \
      if train_spec else None
  vocab = _vocabulary(
      d, workdir, model_init, own_vocab(train_spec) if train_spec else None,
      lambda: sources.summary(own_train)["captions"],
      lambda: {s: own_vocab(specs[s]) for s in wanted if s in specs})
  parser = tags_lib.TagParser(vocab["tags"])

  def source(spec) -> sources.RegionSource:
    return sources.RegionSource(builder_of(spec[0]), spec[1], tag_vocab=vocab["tags"],
                                categories=vocab["categories"],
                                attribute_names=vocab["attributes"], tag_parser=parser)
  train_source = None
  if train_spec:
    train_source = source(train_spec)
    if not train_source.num_examples:
      raise DataError(f"config.data.train: {d.train} holds no regions")

  def fixture_texts():
    caps = sources.summary(train_source)["captions"] if train_source is not None else []
    return caps + vocab["tags"] + vocab["class_prompts"] + vocab["attribute_templates"]

  tok = _load_tokenizer(d, workdir, model_init, root, fixture_texts)
  # The LLM's special-token overrides (the Vicuna variant's LAVIS ones), as the converter
  # applies them; a no-op on a converted tokenizer, which has them already.
  from dynrefer_jax.data import captions  # pylint: disable=import-outside-toplevel
  captions.apply_special_tokens(tok, d.get("lm_special_tokens", None))
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
            control_len=d.control_len, text_len=text_len, text_tokenizer=text_tok,
            lm_kind=lm_kind(config))
  eval_sources: dict[str, sources.RegionSource] = {}

  def train_iterator(start_step: int = 0):
    if train_source is None:
      raise DataError("no training split: set --config.data.train=DATASET/SPLIT (e.g. vg/train)")
    return pipeline.make_train_iterator(
        train_source, global_batch_size=config.train.batch_size, seed=config.seed,
        process_index=pidx, process_count=pcount, start_step=start_step,
        control_phrases=d.get("control_phrases", True), **kw)

  def split_source(split: str) -> sources.RegionSource:
    if split == "train" and train_source is not None:
      return train_source
    if split not in eval_sources:
      if split not in specs:
        raise DataError(f"unknown evaluation split {split!r}; config.data.splits defines "
                        f"{', '.join(sorted(specs)) or 'none'}")
      if not prepared(specs[split]):
        raise DataError(f"config.data.splits.{split}={splits[split]} is not built in {root} "
                        f"(tools/prepare_data.py --dataset {specs[split][0]})")
      eval_sources[split] = source(specs[split])
    return eval_sources[split]

  def eval_iterator(split: str, batch_size: int | None = None):
    bs = batch_size or config.get("eval", {}).get("batch_size", config.train.batch_size)
    return pipeline.make_eval_iterator(split_source(split), global_batch_size=bs,
                                       process_index=pidx, process_count=pcount, **kw)

  meta = {"tags": vocab["tags"], "categories": vocab["categories"],
          "attributes": [{"name": n, "freq_set": f}
                         for n, f in zip(vocab["attributes"], vocab["attribute_freq"])],
          "attribute_templates": vocab["attribute_templates"],
          "class_prompts": vocab["class_prompts"], "vocab_source": vocab["source"],
          "splits": {"train": d.train, **splits}, "data_dir": root}
  return Data(root=root, meta=meta, tokenizer=tok, text_token_ids=token_ids,
              template_to_attribute=np.asarray(vocab["template_to_attribute"], np.int32),
              num_train_examples=train_source.num_examples if train_source is not None else 0,
              train_iterator=train_iterator, eval_iterator=eval_iterator,
              text_vocab_size=text_vocab_size,
              summarize=lambda split: sources.summary(split_source(split)))
