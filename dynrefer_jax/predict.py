r"""Predict captions, tags, attributes and categories for boxes in your own image.

  python -m dynrefer_jax.predict --config configs/synthetic.py:smoke --checkpoint WORKDIR \
      --image photo.jpg --box 10,20,200,180 [--box ...] [--views auto|caption|0,0.3,0.6] [--out DIR]

  python -m dynrefer_jax.predict --config ... --checkpoint WORKDIR --regions regions.json

Prints the JSON (one object per box, schema in README.md "Predict") and writes DIR/<image>.json
and DIR/<image>.png (the image with its numbered boxes and captions; below it, each region's
views side by side). `--regions` takes many images, a JSON list of {"image": path, "boxes":
[[x1, y1, x2, y2], ...]}: the same two files per image (names made unique: a, a-2) and
DIR/predictions.jsonl, one image's JSON per line. Bad input (a missing file, not an image, a
degenerate / non-finite box or one outside the image, bad --views, a malformed regions file) is
one line on stderr and exit code 2, checked for every image before the model is loaded.

Library use (the model is loaded and compiled once, then reused):

    runner = Runner.load("configs/synthetic.py:smoke", "workdirs/smoke")
    image = load_image("photo.jpg")                      # uint8[H, W, 3]; PredictError if bad
    regions = runner.predict(image, [(10, 20, 200, 180)], views="auto")
    annotate(image, regions).save("out.png")

`checkpoint_dir` is a training workdir (its `checkpoints/` are restored; the synthetic world's
vocabulary comes from its `data/`) or a directory written by tools/convert_checkpoint.py (full
parameters, `vocab.json`, `tokenizer/`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

TOP_ATTRIBUTES = 5


class PredictError(ValueError):
  """Bad user input; the message is one line naming the problem."""


# ---------------------------------------------------------------------------------- inputs

def load_image(path: str) -> np.ndarray:
  """uint8[H, W, 3] RGB, upright (EXIF orientation applied) and converted as the training data
  were (data/images.py). Raises PredictError for a missing file or one that is not an image."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import images  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise PredictError(f"image not found: {path}")
  if not os.path.isfile(path):
    raise PredictError(f"not a file: {path}")
  try:
    with Image.open(path) as im:
      images.check_size(im, path)
      im.load()
      arr = np.asarray(images.upright_rgb8(im), np.uint8)
  except UnidentifiedImageError:
    raise PredictError(f"not an image (unrecognised format): {path}") from None
  except images.ImageTooLarge as e:
    raise PredictError(str(e)) from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    first = (str(e).splitlines() or ["unreadable"])[0]
    raise PredictError(f"cannot read image {path}: {first}") from None
  except MemoryError:
    raise PredictError(f"not enough memory to decode {path}") from None
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise PredictError(f"empty image: {path}")
  return arr


def parse_box(text: str) -> tuple[float, float, float, float]:
  """'x1,y1,x2,y2' → 4 floats (validity is checked by validate_boxes)."""
  parts = text.split(",")
  if len(parts) != 4:
    raise PredictError(f"--box expects x1,y1,x2,y2 (4 numbers), got {text!r}")
  try:
    return tuple(float(p) for p in parts)  # type: ignore[return-value]
  except ValueError:
    raise PredictError(f"--box expects x1,y1,x2,y2 (4 numbers), got {text!r}") from None


def _fmt(box) -> str:
  return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def validate_boxes(boxes: Sequence[Sequence[float]], image_hw: tuple[int, int]) -> np.ndarray:
  """float32[N, 4] x1,y1,x2,y2 in pixels. PredictError naming the first bad box (1-based):
  none given, not 4 numbers, non-finite, degenerate (x2 <= x1 or y2 <= y1), outside the image."""
  h, w = int(image_hw[0]), int(image_hw[1])
  if len(boxes) == 0:
    raise PredictError("no boxes given: pass at least one --box x1,y1,x2,y2")
  out = []
  for i, box in enumerate(boxes, 1):
    try:
      b = np.asarray(box, np.float64).reshape(-1)
    except (TypeError, ValueError):
      raise PredictError(f"box {i} {box!r}: expected 4 numbers x1,y1,x2,y2") from None
    if b.size != 4:
      raise PredictError(f"box {i} {box!r}: expected 4 numbers x1,y1,x2,y2, got {b.size}")
    if not np.all(np.isfinite(b)):
      raise PredictError(f"box {i} {_fmt(b)}: coordinates must be finite numbers")
    x1, y1, x2, y2 = b
    if x2 <= x1 or y2 <= y1:
      raise PredictError(f"box {i} {_fmt(b)} is degenerate: need x2 > x1 and y2 > y1")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
      raise PredictError(f"box {i} {_fmt(b)} lies outside the {w}x{h} image "
                         f"(x in [0, {w}], y in [0, {h}])")
    out.append(b)
  return np.asarray(out, np.float32)


# Task priors (SPEC §8, "paper-level claims", the paper's Figure 4): attributes are best seen
# with little context (t ≈ 0.1), captions with t ≈ 0.4–0.5, and t > 0.5 hurts every task. The
# original code has no such path, so these presets are ours: t=0 first, as in every view set the
# model was trained on, then the first num_views - 1 of the rest. `config.eval.task_ts`
# ({task: [t, ...]}) replaces them.
TASK_TS = {
    "caption": (0.0, 0.4, 0.5),
    "attributes": (0.0, 0.1, 0.2),
    "category": (0.0, 0.1, 0.5),
}


def task_priors(config) -> dict[str, tuple[float, ...]]:
  """{task: its num_views values of t}: config.eval.task_ts, else TASK_TS. PredictError naming
  the task when a config's prior has too few t or one outside [0, 1]."""
  num_views = int(config.model.num_views)
  custom = config.get("eval", {}).get("task_ts", None)
  out = {}
  for task, ts in (dict(custom) if custom else TASK_TS).items():
    try:
      out[task] = parse_views([float(t) for t in ts][:num_views], num_views)
    except (PredictError, TypeError, ValueError) as e:
      raise PredictError(f"config.eval.task_ts.{task}: {str(e).replace('--views: ', '')}"
                         ) from None
  return out


def parse_views(spec: str | Sequence[float] | None, num_views: int,
                tasks: dict[str, tuple[float, ...]] | None = None) -> str | tuple[float, ...]:
  """'auto' (pHash selection, SPEC §8), a task prior's name (a key of `tasks`, task_priors) or
  num_views values t in [0, 1] ('0,0.3,0.6')."""
  if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
    return "auto"
  if isinstance(spec, str) and tasks and spec.strip() in tasks:
    return tasks[spec.strip()]
  if isinstance(spec, str) and spec.strip().replace("_", "").isalpha():
    names = ", ".join(tasks or ())
    raise PredictError(f"--views: {spec!r} is not a task prior"
                       + (f" (one of {names})" if names else "")
                       + f", 'auto' or {num_views} comma-separated t values in [0, 1]")
  if isinstance(spec, str):
    try:
      ts = tuple(float(v) for v in spec.split(","))
    except ValueError:
      raise PredictError(f"--views expects 'auto' or {num_views} comma-separated t values in "
                         f"[0, 1], got {spec!r}") from None
  else:
    ts = tuple(float(v) for v in spec)
  if len(ts) != num_views:
    raise PredictError(f"--views: this model uses {num_views} views, got {len(ts)} t values "
                       f"({','.join(f'{t:g}' for t in ts)})")
  if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in ts):
    raise PredictError(f"--views: every t must be a number in [0, 1], got "
                       f"{','.join(f'{t:g}' for t in ts)}")
  return ts


def batch_layout(config, image_sizes: Iterable[Sequence[int]]):
  """The windows' layout (views/windows.py) of a batch of images of these (h, w):
  windows.fixed_layout of the longest side, so that images of any size share three compiled
  shapes (one window of config.data.window_size, the training data's; one of 1024; levels)."""
  from dynrefer_jax.views import windows  # pylint: disable=import-outside-toplevel
  longest = max(max(int(v) for v in hw) for hw in image_sizes)
  return windows.fixed_layout(longest, int(config.data.window_size))


def view_boxes_in_image(box: np.ndarray, image_hw: tuple[int, int], ts: Sequence[float]
                        ) -> list[list[int]]:
  """Integer crop boxes box(t) = b + t·(I − b), clipped and truncated (SPEC §2), image pixels."""
  h, w = image_hw
  full = np.asarray([0, 0, w, h], np.float64)
  out = []
  for t in ts:
    v = np.asarray(box, np.float64) + float(t) * (full - box)
    v = np.clip(v, 0, [w, h, w, h]).astype(np.int64)
    v[2:] = np.maximum(v[2:], v[:2] + 1)
    out.append([int(x) for x in v])
  return out


# ----------------------------------------------------------------------------- vocabulary

@dataclasses.dataclass
class Vocab:
  """What the predictor needs besides the parameters (duck-types data.setup.Data for
  inference.Predictor)."""
  tokenizer: Any
  tag_names: list[str]
  attribute_names: list[str]
  category_names: list[str]
  template_to_attribute: np.ndarray
  text_token_ids: dict            # {"tags", "attributes", "classes"}: int[N, L]; and
                                  # "template_to_attribute": int[T]

  @classmethod
  def from_data(cls, data) -> "Vocab":
    ids = {k: np.asarray(v, np.int32) for k, v in data.text_token_ids.items()}
    ids["template_to_attribute"] = np.asarray(data.template_to_attribute, np.int32)
    return cls(data.tokenizer, list(data.tag_names), list(data.attribute_names),
               list(data.category_names), np.asarray(data.template_to_attribute), ids)

  @classmethod
  def from_converted(cls, root: str) -> "Vocab":
    """vocab.json + tokenizer/ of a tools/convert_checkpoint.py directory. Token ids are
    zeros of the right shape: the tables themselves are restored from the checkpoint."""
    from dynrefer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    with open(os.path.join(root, "vocab.json"), encoding="utf-8") as f:
      v = json.load(f)
    n = v["text_len"]
    ids = {"tags": np.zeros((len(v["tags"]), n), np.int32),
           "attributes": np.zeros((len(v["attribute_templates"]), n), np.int32),
           "classes": np.zeros((len(v["categories"]), n), np.int32),
           "template_to_attribute": np.asarray(v["template_to_attribute"], np.int32)}
    return cls(tokenizer_lib.load_tokenizer(os.path.join(root, "tokenizer")), v["tags"],
               v["attributes"], v["categories"], np.asarray(v["template_to_attribute"], np.int32),
               ids)


# ------------------------------------------------------------------------------- loading

def checkpoint_root(path: str) -> tuple[str, str]:
  """(root, orbax directory) for a workdir, its checkpoints/ or a converted directory."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return path, os.path.join(path, "checkpoints")
  if os.path.isdir(path) and os.path.basename(path) == "checkpoints":
    return os.path.dirname(path), path
  raise PredictError(f"no checkpoint in {path}: expected a training workdir or a "
                     "tools/convert_checkpoint.py output (a directory holding checkpoints/)")


def is_converted(root: str) -> bool:
  return os.path.isfile(os.path.join(root, "vocab.json"))


def pretrained_init(root: str) -> bool:
  """Whether a converted directory is tools/convert_checkpoint.py's output without --dynrefer."""
  from dynrefer_jax.convert.dynrefer import PRETRAINED_INIT  # pylint: disable=import-outside-toplevel
  path = os.path.join(root, "conversion.json")
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("kind") == PRETRAINED_INIT


def _abstract_model(config, vocab: Vocab):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import functional, sharding  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.models import dynrefer as dynrefer_lib  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  rules = [tuple(r) for r in config.sharding.rules]
  build = lambda: dynrefer_lib.DynRefer(config.model, vocab.text_token_ids,
                                        rngs=nnx.Rngs(config.seed))
  graphdef, abstract, axes = functional.abstract_split(build)
  shardings = sharding.tree_shardings(abstract, axes, mesh, rules)
  return graphdef, abstract, shardings


def _restore(ckdir: str, abstract: dict, item: str):
  from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  ck = ckpt_lib.Checkpointer(ckdir, async_save=False)
  try:
    step = ck.latest_step()
  finally:
    ck.close()
  if step is None:
    raise PredictError(f"no checkpoint steps in {ckdir}")
  return ckpt_lib.restore_item(ckdir, item, abstract, step), step


def load_params(config, checkpoint_dir: str, vocab: Vocab):
  """(graphdef, params, step): restored straight onto the config's shardings.

  A converted directory holds {"params": every variable, tables included}. A training workdir
  holds {"trainable": ...}; the rest comes from `config.model_init`, else from the model_init
  the workdir was trained from (a converted directory or another workdir, see
  checkpoint.load_params), when the config freezes real weights; the text tables are
  recomputed from the restored text tower.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import checkpoint as ckpt_lib, functional  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  root, ckdir = checkpoint_root(checkpoint_dir)
  graphdef, abstract, shardings = _abstract_model(config, vocab)
  target = ckpt_lib.abstract_with_shardings(abstract, shardings)
  if is_converted(root):
    if pretrained_init(root):
      raise PredictError(f"{checkpoint_dir} is a pretrained init without DynRefer's heads: "
                         f"train from it (--config.model_init={checkpoint_dir}) and predict "
                         "with the training workdir")
    params, step = _restore(ckdir, target, "params")
    return graphdef, params, step
  patterns, excludes = train_lib.trainable_patterns(config)
  ab_tr, ab_fr = functional.partition(target, patterns, excludes)
  trainable, step = _restore(ckdir, ab_tr, "trainable")
  table_re = excludes[0]
  import re  # pylint: disable=import-outside-toplevel
  frozen_flat = functional.flatten(ab_fr)
  weights = {k: v for k, v in frozen_flat.items() if not re.search(table_re, k)}
  frozen = {}
  if weights:
    init = config.get("model_init") or ckpt_lib.recorded_init(root)
    if not init:
      raise PredictError(f"{checkpoint_dir} holds only the trainable parameters and neither the "
                         "config nor the workdir names a model_init for the frozen ones")
    try:
      restored = ckpt_lib.load_params(init, functional.unflatten(weights), seed=config.seed)
    except (FileNotFoundError, ValueError) as e:
      raise PredictError(str(e)) from None
    frozen = functional.flatten(restored)
    absent = sorted(set(weights) - set(frozen))
    if absent:
      raise PredictError(f"model_init {init} does not hold {len(absent)} frozen weight(s) of "
                         f"this model: {', '.join(absent[:8])}")
  ids = {"tag_token_ids": "tags", "att_token_ids": "attributes", "ov_token_ids": "classes",
         "att_template_owner": "template_to_attribute"}
  for k, v in frozen_flat.items():
    if k in frozen:
      continue
    name = k.rsplit("/", 1)[-1]
    value = (vocab.text_token_ids[ids[name]] if name in ids else np.zeros(v.shape, v.dtype))
    frozen[k] = jax.device_put(jnp.asarray(value, v.dtype), v.sharding)
  params = functional.combine(trainable, functional.unflatten(frozen))

  def refresh(p):
    model = functional.merge(graphdef, p)
    model.refresh_tables()
    return functional.split(model)[1]

  params = jax.jit(refresh, out_shardings=shardings)(params)
  return graphdef, params, step


def hold_stacked(config, params: dict) -> tuple[dict, tuple]:
  """(params, groups): with config.model.scan_layers, each uniform stack of per-layer weights
  (the ViT's, T5's, the text tower's blocks) held as one array with a leading layer axis
  (functional.stack_layers, as the trainer holds its frozen ones), on the same shardings with the
  layer axis unsharded. A jitted forward slices it per layer and XLA folds the scan's stack of
  the slices away; per-layer arrays would be stacked into a copy in every call (several GB at
  full size). Without scan_layers, or with no stack: (params, ())."""
  import jax  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel
  if not config.model.get("scan_layers", False):
    return params, ()
  # No donation: a per-layer array cannot alias its stack, so XLA could not reuse it anyway.
  params, _, groups = functional.stack_held(params, jax.tree.map(lambda x: x.sharding, params))
  return params, groups


# --------------------------------------------------------------------------------- runner

class Runner:
  """A loaded model that predicts for (image, boxes) pairs; compiled once per view setting."""

  def __init__(self, config, graphdef, params, vocab: Vocab, *, batch_size: int = 8,
               step: int | None = None, groups=()):
    """params: every variable, the layer stacks of `groups` held stacked (hold_stacked)."""
    self.config, self.graphdef, self.params, self.vocab = config, graphdef, params, vocab
    self.groups = tuple(groups)
    self.batch_size = batch_size
    self.step = step
    self._predictors: dict = {}

  @classmethod
  def load(cls, config_spec_or_config, checkpoint_dir: str, *, batch_size: int = 8,
           overrides: Sequence[str] = ()) -> "Runner":
    """config: a 'configs/x.py[:arg]' string or a ConfigDict; checkpoint_dir: see module doc."""
    from dynrefer_jax import config_lib  # pylint: disable=import-outside-toplevel
    config = (config_lib.load(config_spec_or_config, overrides)
              if isinstance(config_spec_or_config, str) else config_spec_or_config)
    root, _ = checkpoint_root(checkpoint_dir)
    if is_converted(root):
      vocab = Vocab.from_converted(root)
    else:
      from dynrefer_jax.data import setup as data_setup  # pylint: disable=import-outside-toplevel
      data = data_setup.prepare(config, root)
      data_setup.resolve_vocab(config, data)
      vocab = Vocab.from_data(data)
    graphdef, params, step = load_params(config, checkpoint_dir, vocab)
    params, groups = hold_stacked(config, params)
    return cls(config, graphdef, params, vocab, batch_size=batch_size, step=step, groups=groups)

  @property
  def num_views(self) -> int:
    return int(self.config.model.num_views)

  @property
  def task_ts(self) -> dict[str, tuple[float, ...]]:
    """The task priors `predict(views=name)` accepts (task_priors)."""
    return task_priors(self.config)

  def predictor(self, views: str | tuple[float, ...] = "auto"):
    from dynrefer_jax.inference import Predictor  # pylint: disable=import-outside-toplevel
    if views not in self._predictors:
      fixed = None if views == "auto" else tuple(views)
      self._predictors[views] = Predictor(self.graphdef, self.config, self.vocab,
                                          fixed_ts=fixed, groups=self.groups)
    return self._predictors[views]

  def predict(self, image: np.ndarray, boxes: Sequence[Sequence[float]],
              views: str | Sequence[float] = "auto") -> list[dict]:
    """image uint8[H, W, 3]; boxes [(x1, y1, x2, y2)] in its pixels; views "auto", a task
    prior's name (task_ts) or num_views values of t → one dict per box (README.md "Predict"
    gives the schema). Raises PredictError for bad input."""
    return next(self.predict_many([(image, boxes)], views))

  def predict_many(self, items: Iterable[tuple[np.ndarray, Sequence[Sequence[float]]]],
                   views: str | Sequence[float] = "auto") -> Iterator[list[dict]]:
    """Yields `predict(image, boxes, views)` for each (image, boxes) of `items`, in order.

    The regions of consecutive images share batches (each row carries its own image), so
    images with a box or two still fill the batch_size rows of a call. `items` is read lazily:
    at most batch_size + 1 images are held at a time. PredictError for a bad image or box,
    raised when that item is reached (earlier items have been yielded)."""
    views = parse_views(views if isinstance(views, str) else list(views), self.num_views,
                        self.task_ts)
    from dynrefer_jax.views import windows  # pylint: disable=import-outside-toplevel
    predictor = self.predictor(views)
    bs = self.batch_size
    pending = []   # rows waiting for a call: (item, box index)
    done = {}      # item → its region dicts (None until predicted)
    shapes = {}    # item → (image (h, w), boxes)
    held = {}      # item → (image, {layout: its levels}) while it has rows to predict
    next_out = 0

    def row_input(k, i, lay):
      image, levels = held[k]
      if lay not in levels:
        levels[lay] = windows.prepare(image, lay)
      return windows.region_input(levels[lay], shapes[k][1][i], lay)

    def run(rows):
      # Each row carries its region's windows at full resolution (views/windows.py); the
      # images are never shrunk, so a box valid in the image is valid here.
      lay = batch_layout(self.config, [shapes[k][0] for k, _ in rows])
      inputs = [row_input(k, i, lay) for k, i in rows]
      fill = inputs + [inputs[0]] * (bs - len(inputs))  # one compiled shape per layout
      batch = {key: np.stack([r[key] for r in fill]) for key in inputs[0]}
      batch["box"] = np.stack([shapes[k][1][i] for k, i in rows] + [shapes[rows[0][0]][1][
          rows[0][1]]] * (bs - len(rows)))
      preds = predictor(self.params, batch)
      for j, (k, i, *_) in enumerate(rows):
        image_hw, boxes = shapes[k]
        done[k][i] = self._region(i, boxes[i], image_hw, preds, j, predictor.tag_threshold)

    for k, (image, boxes) in enumerate(items):
      image = np.asarray(image)
      if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PredictError(f"image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
      boxes = validate_boxes(boxes, image.shape[:2])
      shapes[k], done[k], held[k] = (image.shape[:2], boxes), [None] * len(boxes), (image, {})
      pending += [(k, i) for i in range(len(boxes))]
      while len(pending) >= bs:
        run(pending[:bs])
        pending = pending[bs:]
      while next_out in done and all(r is not None for r in done[next_out]):
        shapes.pop(next_out)
        held.pop(next_out)
        yield done.pop(next_out)
        next_out += 1
    if pending:
      run(pending)
    while next_out in done:
      held.pop(next_out, None)
      yield done.pop(next_out)
      next_out += 1

  def _region(self, index, box, image_hw, preds, i, tag_threshold) -> dict:
    v = self.vocab
    tag_scores = np.asarray(preds["tag_scores"][i], np.float64)
    order = np.argsort(-tag_scores, kind="stable")
    tags = [{"name": v.tag_names[k], "score": float(tag_scores[k])}
            for k in order if tag_scores[k] > tag_threshold]
    attr = np.asarray(preds["attribute_scores"][i], np.float64)
    top = np.argsort(-attr, kind="stable")[:TOP_ATTRIBUTES]
    cls_scores = np.asarray(preds["class_scores"][i], np.float64)
    c = int(np.argmax(cls_scores))
    ts = [round(float(t), 6) for t in np.asarray(preds["ts"][i])]
    return {"index": index, "box": [float(x) for x in box],
            "caption": preds["caption"][i], "caption_score": float(preds["caption_score"][i]),
            "tags": tags,
            "attributes": [{"name": v.attribute_names[k], "score": float(attr[k])} for k in top],
            "category": {"name": v.category_names[c], "score": float(cls_scores[c])},
            "views": ts, "view_boxes": view_boxes_in_image(np.asarray(box), image_hw, ts)}


# ------------------------------------------------------------------------------ many images

def read_regions_file(path: str) -> list[tuple[str, np.ndarray]]:
  """`--regions FILE`: a JSON list of {"image": path, "boxes": [[x1, y1, x2, y2], ...]} (image
  paths relative to the file's folder unless absolute; the same image may appear once).

  Every image is decoded and every box checked here, before any model work; PredictError names
  the entry (1-based) and the image. Returns [(image path, float32[N, 4] boxes)]; the images
  are decoded again when predicted, so they are not all held in memory."""
  try:
    with open(path, encoding="utf-8") as f:
      entries = json.load(f)
  except FileNotFoundError:
    raise PredictError(f"regions file not found: {path}") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PredictError(f"regions file {path} is not readable JSON: "
                       f"{str(e).splitlines()[0]}") from None
  shape = 'a JSON list of {"image": path, "boxes": [[x1, y1, x2, y2], ...]}'
  if not isinstance(entries, list) or not entries:
    raise PredictError(f"regions file {path}: expected {shape} (non-empty)")
  base = os.path.dirname(os.path.abspath(path))
  out, seen = [], {}
  for k, entry in enumerate(entries, 1):
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
        or not isinstance(entry.get("boxes"), list):
      raise PredictError(f"regions file {path}, entry {k}: expected {shape}")
    image_path = os.path.normpath(os.path.join(base, entry["image"]))
    if image_path in seen:
      raise PredictError(f"regions file {path}, entry {k}: {entry['image']} is also entry "
                         f"{seen[image_path]} (give each image once, with all its boxes)")
    seen[image_path] = k
    try:
      image = load_image(image_path)
      boxes = validate_boxes(entry["boxes"], image.shape[:2])
    except PredictError as e:
      raise PredictError(f"regions file {path}, entry {k} ({entry['image']}): {e}") from None
    out.append((image_path, boxes))
  return out


def output_stems(paths: Sequence[str]) -> list[str]:
  """Output file stems: each image's file name without extension, made unique with -2, -3, ...
  in input order when names repeat (photos/a.jpg and other/a.png → a, a-2)."""
  stems, used = [], set()
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0] or "image"
    name, n = stem, 1
    while name in used:
      n += 1
      name = f"{stem}-{n}"
    used.add(name)
    stems.append(name)
  return stems


# ------------------------------------------------------------------------------ rendering

_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def annotate(image: np.ndarray, regions: Sequence[dict], *, thumb: int = 160,
             max_side: int = 2048):
  """PIL.Image: the image with numbered boxes and captions, then one row per region with its
  views (crops box(t) of the full-resolution image, resized to `thumb` px) side by side. An
  image longer than `max_side` is drawn shrunk to it (its boxes with it)."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  font = ImageFont.load_default()
  full = Image.fromarray(np.asarray(image, np.uint8))
  scale = min(1.0, max_side / max(full.size))
  src = full if scale == 1.0 else full.resize(
      (max(1, round(full.size[0] * scale)), max(1, round(full.size[1] * scale))), Image.BICUBIC,
      reducing_gap=3.0)
  w, h = src.size
  n_views = max((len(r["views"]) for r in regions), default=1)
  width = max(w, n_views * (thumb + 8) + 8, 320)
  line = 14
  caption_block = line * (len(regions) + 1)
  row_h = thumb + 2 * line + 8
  canvas = Image.new("RGB", (width, h + caption_block + row_h * len(regions)), (255, 255, 255))
  canvas.paste(src, (0, 0))
  draw = ImageDraw.Draw(canvas)
  for r in regions:
    color = _COLORS[r["index"] % len(_COLORS)]
    x1, y1, x2, y2 = (v * scale for v in r["box"])
    draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=2)
    draw.text((x1 + 3, y1 + 2), str(r["index"] + 1), fill=color, font=font)
  y = h + 4
  for r in regions:
    color = _COLORS[r["index"] % len(_COLORS)]
    draw.text((4, y), f"{r['index'] + 1}: {r['caption']} ({r['caption_score']:.2f}) "
              f"[{r['category']['name']}]", fill=color, font=font)
    y += line
  y = h + caption_block
  for r in regions:
    color = _COLORS[r["index"] % len(_COLORS)]
    draw.text((4, y), f"{r['index'] + 1}: views", fill=color, font=font)
    for j, (t, vb) in enumerate(zip(r["views"], r["view_boxes"])):
      crop = full.crop(tuple(vb)).resize((thumb, thumb), Image.BICUBIC, reducing_gap=3.0)
      x = 8 + j * (thumb + 8)
      canvas.paste(crop, (x, y + line))
      draw.rectangle([x, y + line, x + thumb - 1, y + line + thumb - 1], outline=color)
      draw.text((x, y + line + thumb + 1), f"t={t:.1f}", fill=(0, 0, 0), font=font)
    y += row_h
  return canvas


# ------------------------------------------------------------------------------------ CLI

def _atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import config_lib  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  # "--box -1,0,5,5" would read as an unknown option: bind the value to its flag first.
  joined, it = [], iter(argv)
  for a in it:
    joined.append(f"{a}={next(it, '')}" if a in ("--box", "--views") else a)
  argv = joined

  class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too otherwise)
      raise PredictError(message)

  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    p = _Parser(prog="python -m dynrefer_jax.predict")
    p.add_argument("--checkpoint", required=True,
                   help="a training workdir or a tools/convert_checkpoint.py output")
    p.add_argument("--image", help="one image (with --box)")
    p.add_argument("--box", action="append", default=[], help="x1,y1,x2,y2 in pixels")
    p.add_argument("--regions", help='many images: a JSON list of {"image": path, "boxes": '
                   '[[x1, y1, x2, y2], ...]} (instead of --image/--box)')
    p.add_argument("--views", default="auto", help="'auto' (pHash), a task prior (caption, "
                   "attributes, category: config.eval.task_ts) or t values, e.g. 0,0.3,0.6")
    p.add_argument("--out", default="predictions", help="output directory")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(rest)
    if spec is None:
      raise PredictError("--config=configs/<name>.py[:arg] is required")
    if bool(args.regions) == bool(args.image):
      raise PredictError("give --image (with --box) or --regions FILE, not both" if args.image
                         else "--image (with --box) or --regions FILE is required")
    if args.regions and args.box:
      raise PredictError("--box goes with --image; with --regions the boxes are in the file")
    config = config_lib.load(spec, overrides)
    # (path, boxes, the decoded image when already held: --image, else None: decoded again)
    if args.regions:
      jobs = [(path, boxes, None) for path, boxes in read_regions_file(args.regions)]
    else:
      image = load_image(args.image)
      jobs = [(args.image, validate_boxes([parse_box(b) for b in args.box], image.shape[:2]),
               image)]
    views = parse_views(args.views, int(config.model.num_views), task_priors(config))
    checkpoint_root(args.checkpoint)
    if args.batch_size < 1:
      raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
  except (PredictError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from dynrefer_jax.data import setup as data_setup  # pylint: disable=import-outside-toplevel
  try:
    runner = Runner.load(config, args.checkpoint, batch_size=args.batch_size)
  except (data_setup.DataError, PredictError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)  # a missing data file or checkpoint piece: one line
    return 2
  os.makedirs(args.out, exist_ok=True)
  loaded = {}

  def items():  # images decoded as the batches need them; kept until written
    for k, (path, boxes, image) in enumerate(jobs):
      loaded[k] = load_image(path) if image is None else image
      yield loaded[k], boxes.tolist()

  docs, stems = [], output_stems([j[0] for j in jobs])
  try:
    for k, regions in enumerate(runner.predict_many(items(), views)):
      docs.append(_write_image_outputs(args.out, stems[k], jobs[k][0], loaded.pop(k), regions,
                                       runner.step, quiet=bool(args.regions)))
  except PredictError as e:  # an image that changed on disk after it was checked
    print(f"error: {e}", file=sys.stderr)
    return 1
  except MemoryError:
    print(f"error: out of host memory predicting {jobs[len(docs)][0]}", file=sys.stderr)
    return 1
  if args.regions:
    _atomic_write_bytes(os.path.join(args.out, "predictions.jsonl"),
                        "".join(json.dumps(d) + "\n" for d in docs).encode())
    n, r = len(docs), sum(len(d["regions"]) for d in docs)
    print(f"{n} image{'s' * (n != 1)}, {r} region{'s' * (r != 1)}: "
          f"{os.path.join(args.out, 'predictions.jsonl')}")
  return 0


def _write_image_outputs(out: str, stem: str, path: str, image: np.ndarray, regions: list,
                         step, *, quiet: bool) -> dict:
  """OUT/<stem>.json and OUT/<stem>.png (atomic); prints the JSON, or one line when quiet."""
  import io  # pylint: disable=import-outside-toplevel
  doc = {"image": os.path.abspath(path), "image_size": [image.shape[1], image.shape[0]],
         "checkpoint_step": step, "regions": regions}
  text = json.dumps(doc, indent=1)
  _atomic_write_bytes(os.path.join(out, stem + ".json"), text.encode())
  buf = io.BytesIO()
  annotate(image, regions).save(buf, format="PNG")
  _atomic_write_bytes(os.path.join(out, stem + ".png"), buf.getvalue())
  if quiet:
    print(f"{path}: {len(regions)} region{'s' * (len(regions) != 1)} → "
          f"{os.path.join(out, stem)}.json and .png", flush=True)
  else:
    print(text)
  return doc


if __name__ == "__main__":
  sys.exit(main())
