"""What the trainer, evaluator and predictor need from the data side, built from a config.

    data = setup.prepare(config, workdir)   # generates / loads the dataset, the tokenizer
    setup.resolve_vocab(config, data)       # fills vocabulary sizes left as AUTO (-1)
    it = data.train_iterator(start_step=0)  # per-process numpy batches (docs/ARCHITECTURE.md)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import numpy as np

from dynrefer_jax.data import pipeline, sources, synthetic
from dynrefer_jax.data import tokenizer as tokenizer_lib


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
  d = config.data
  if d.name != "synthetic":
    raise ValueError(f"unknown dataset {d.name!r}; the built-in one is 'synthetic' "
                     "(real datasets: tools/prepare_data.py)")
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
  kw = dict(max_image_size=d.max_image_size, tokenizer=tok, caption_len=d.caption_len,
            control_len=d.control_len, text_len=text_len)
  train_source = sources.SyntheticSource(root, "train")

  def train_iterator(start_step: int = 0):
    return pipeline.make_train_iterator(train_source, global_batch_size=config.train.batch_size,
                                        seed=config.seed, process_index=pidx,
                                        process_count=pcount, start_step=start_step, **kw)

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
  """Fills vocabulary sizes and the text tower's context left as AUTO (-1) from the data."""
  with config.unlocked():
    if config.model.text.vocab_size == -1:
      config.model.text.vocab_size = data.vocab_size
    if config.model.lm.vocab_size == -1:
      config.model.lm.vocab_size = data.vocab_size
