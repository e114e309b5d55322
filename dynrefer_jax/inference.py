"""Inference: view selection → heads → control words from predicted tags → beam-search caption.

Two jitted stages with a short host step between them, as the original: the predicted tags
(σ > tag_threshold) become the control string "w1,w2|" — sorted here, so outputs are
deterministic (the original's set order is not; SPEC §7c).

The protocol (tag threshold and beam-search settings) is config.model's, replaced per evaluation
split by config.eval.protocol[split] (the original's per-split eval configs: `protocol`).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np

from dynrefer_jax import functional
from dynrefer_jax.data import captions as captions_lib
from dynrefer_jax.data import control_words
from dynrefer_jax.views import boxes as view_boxes
from dynrefer_jax.views import select as views


GENERATE_KEYS = ("num_beams", "max_new_tokens", "min_length", "length_penalty",
                 "repetition_penalty")
PROTOCOL_KEYS = ("tag_threshold",) + GENERATE_KEYS


def protocol(config, split: str | None = None) -> dict:
  """The inference protocol: {"tag_threshold", "num_beams", "max_new_tokens", "min_length",
  "length_penalty", "repetition_penalty"} from config.model (tag_threshold, generate), with
  config.eval.protocol[split] replacing any of them for that split. ValueError names an unknown
  key."""
  m = config.model
  out = {"tag_threshold": float(m.tag_threshold), **dict(m.generate)}
  per_split = config.get("eval", {}).get("protocol", None) or {}
  if split is not None and split in per_split:
    over = dict(per_split[split] or {})
    unknown = sorted(set(over) - set(PROTOCOL_KEYS))
    if unknown:
      raise ValueError(f"config.eval.protocol.{split} has unknown key(s) {', '.join(unknown)} "
                       f"(known: {', '.join(PROTOCOL_KEYS)})")
    out.update(over)
  return out


class Predictor:
  """predict(params, batch) → {"caption", "caption_score", "tag_scores", "attribute_scores",
  "class_scores", "ts", "tags"} as numpy / lists, one row per batch row."""

  def __init__(self, graphdef, config, data, *, view_selection: str | None = None,
               fixed_ts=None, groups=()):
    """groups: the layer stacks `params` holds stacked (functional.stack_layers; Runner.load and
    the trainer's state hold them so): sliced per layer inside jit, with no copy of the weights
    per call; () for per-layer params. The protocol is `protocol(config)`; `with_protocol`
    gives a split's."""
    self.config = config
    self.data = data
    m = config.model
    self.tag_names = np.asarray(data.tag_names)
    method = view_selection or config.get("eval", {}).get("view_selection", "phash")
    fixed = tuple(fixed_ts or m.get("fixed_ts", ()) or ())
    if fixed:
      method = "fixed"
    num_views = m.num_views
    t2a = np.asarray(data.template_to_attribute)
    tok = data.tokenizer
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id  # Llama 3: no pad
    special = dict(eos_token_id=tok.eos_token_id, pad_token_id=pad, decoder_start_token_id=pad)

    def select(batch):
      if method == "fixed":
        return jnp.broadcast_to(jnp.asarray(fixed, jnp.float32), (batch["box"].shape[0], len(fixed)))
      return views.select_ts(method, batch["image"], batch["image_hw"], batch["box"],
                             num_views=num_views, window=batch.get("window"),
                             hash_pixels=batch.get("hash_pixels"))

    def heads(params, batch):
      ts = select(batch)
      out = functional.merge(graphdef, params, groups).predict_heads(batch, ts, t2a)
      out["ts"] = ts
      return out

    def make_caption(gen):
      def caption(params, z, control_ids, control_mask):
        model = functional.merge(graphdef, params, groups)
        return model.caption(z, control_ids, control_mask, **gen, **special)
      return jax.jit(caption)

    self._heads = jax.jit(heads)
    self._make_caption = make_caption
    self._captions = {}  # beam-search settings → compiled function, shared by with_protocol
    self._set_protocol(protocol(config))

  def _set_protocol(self, p: dict) -> None:
    self.protocol = dict(p)
    self.tag_threshold = float(p["tag_threshold"])
    gen = tuple(sorted((k, p[k]) for k in GENERATE_KEYS if k in p))
    if gen not in self._captions:
      self._captions[gen] = self._make_caption(dict(gen))
    self._caption = self._captions[gen]

  def with_protocol(self, p: dict) -> "Predictor":
    """This predictor under protocol `p` (`protocol(config, split)`): the heads' compiled
    function is shared, the captioning one per distinct beam-search setting."""
    if p == self.protocol:
      return self
    other = copy.copy(self)
    other._set_protocol(p)  # pylint: disable=protected-access
    return other

  def control_strings(self, tag_scores: np.ndarray) -> list[str]:
    """The control string of each row: its tags with σ > tag_threshold (strictly, as the
    original's `> tag_thr`), sorted."""
    return [control_words.inference_control_words(self.tag_names[row > self.tag_threshold])
            for row in tag_scores]

  def __call__(self, params, batch: dict) -> dict:
    keys = [k for k in ("image", "image_hw", "box", "window", "hash_pixels") if k in batch]
    # Reject NaN / inverted / outside boxes before the step, naming the region (padding rows,
    # mask False, are skipped).
    rows = np.flatnonzero(np.asarray(batch.get("mask", np.ones(len(batch["box"]), bool))))
    ids = np.asarray(batch["region_id"])[rows] if "region_id" in batch else rows
    view_boxes.validate_boxes(np.asarray(batch["box"])[rows], np.asarray(batch["image_hw"])[rows],
                              ids)
    heads = self._heads(params, {k: batch[k] for k in keys})
    tag_scores = np.asarray(heads["tag_scores"])
    controls = self.control_strings(tag_scores)
    control_ids, control_mask = captions_lib.encode_controls(
        self.data.tokenizer, controls, self.config.data.control_len,
        self.config.model.lm.get("kind", "t5"))
    ids, scores = self._caption(params, heads["z"], jnp.asarray(control_ids),
                                jnp.asarray(control_mask))
    captions = self.data.tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True)
    return {"caption": [c.strip() for c in captions],
            "caption_score": np.exp(np.asarray(scores, np.float64)),
            "tag_scores": tag_scores,
            "tags": [c[:-1].split(",") if c != "|" else [] for c in controls],
            "attribute_scores": np.asarray(heads["attribute_scores"]),
            "class_scores": np.asarray(heads["class_scores"]),
            "ts": np.asarray(heads["ts"])}
