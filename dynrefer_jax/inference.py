"""Inference: view selection → heads → control words from predicted tags → beam-search caption.

Two jitted stages with a short host step between them, as the original: the predicted tags
(σ > tag_threshold) become the control string "w1,w2|" — sorted here, so outputs are
deterministic (the original's set order is not; SPEC §7c).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynrefer_jax import functional
from dynrefer_jax.data import captions as captions_lib
from dynrefer_jax.data import control_words
from dynrefer_jax.views import boxes as view_boxes
from dynrefer_jax.views import select as views


class Predictor:
  """predict(params, batch) → {"caption", "caption_score", "tag_scores", "attribute_scores",
  "class_scores", "ts", "tags"} as numpy / lists, one row per batch row."""

  def __init__(self, graphdef, config, data, *, view_selection: str | None = None,
               fixed_ts=None, groups=()):
    """groups: the layer stacks `params` holds stacked (functional.stack_layers; Runner.load and
    the trainer's state hold them so): sliced per layer inside jit, with no copy of the weights
    per call; () for per-layer params."""
    self.config = config
    self.data = data
    m = config.model
    self.tag_names = np.asarray(data.tag_names)
    self.tag_threshold = float(m.tag_threshold)
    method = view_selection or config.get("eval", {}).get("view_selection", "phash")
    fixed = tuple(fixed_ts or m.get("fixed_ts", ()) or ())
    if fixed:
      method = "fixed"
    num_views = m.num_views
    t2a = np.asarray(data.template_to_attribute)
    gen = dict(m.generate)
    tok = data.tokenizer
    gen.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               decoder_start_token_id=tok.pad_token_id)

    def select(batch):
      if method == "fixed":
        return jnp.broadcast_to(jnp.asarray(fixed, jnp.float32), (batch["box"].shape[0], len(fixed)))
      return views.select_ts(method, batch["image"], batch["image_hw"], batch["box"],
                             num_views=num_views)

    def heads(params, batch):
      ts = select(batch)
      out = functional.merge(graphdef, params, groups).predict_heads(batch, ts, t2a)
      out["ts"] = ts
      return out

    def caption(params, z, control_ids, control_mask):
      model = functional.merge(graphdef, params, groups)
      return model.caption(z, control_ids, control_mask, **gen)

    self._heads = jax.jit(heads)
    self._caption = jax.jit(caption)

  def control_strings(self, tag_scores: np.ndarray) -> list[str]:
    """The control string of each row: its tags with σ > tag_threshold (strictly, as the
    original's `> tag_thr`), sorted."""
    return [control_words.inference_control_words(self.tag_names[row > self.tag_threshold])
            for row in tag_scores]

  def __call__(self, params, batch: dict) -> dict:
    keys = ("image", "image_hw", "box")
    # Reject NaN / inverted / outside boxes before the step, naming the region (padding rows,
    # mask False, are skipped).
    rows = np.flatnonzero(np.asarray(batch.get("mask", np.ones(len(batch["box"]), bool))))
    ids = np.asarray(batch["region_id"])[rows] if "region_id" in batch else rows
    view_boxes.validate_boxes(np.asarray(batch["box"])[rows], np.asarray(batch["image_hw"])[rows],
                              ids)
    heads = self._heads(params, {k: batch[k] for k in keys})
    tag_scores = np.asarray(heads["tag_scores"])
    controls = self.control_strings(tag_scores)
    control_ids, control_mask = captions_lib.tokenize(self.data.tokenizer, controls,
                                                      self.config.data.control_len)
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
