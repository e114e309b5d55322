"""The whole DynRefer model from the released files (SPEC §13, CHECKPOINTS.md §1-§6).

    states = load_sources(Sources(dynrefer=..., eva_vit=..., blip2=..., t5=..., eva_clip=...))
    flat = convert_full(states, expected_shapes_without_tables)

Two kinds of output:
- the released model (`dynrefer` given): every variable, what predict / evaluate load;
- the pretrained initialisation the original trains from (`dynrefer=None`): the frozen towers,
  BLIP-2's query tokens, Q-Former and t5_proj, and no `cvem_*`, `cem_memory`, `tag_*`, `attr_*`,
  which have no pretrained source and start from the model's own initialisation in the trainer
  (`config.model_init`; the checkpoint's metadata lists them under `left_to_model_init`).

Which file fills which part (CHECKPOINTS.md §6; later rows override earlier ones):

| our path | source |
|---|---|
| `visual_encoder/*` | `eva_vit_g.pth` (blocks beyond the depth, final norm and head dropped) |
| `ln_vision/*`, `query_tokens` | `blip2_pretrained_flant5xl.pth` (`model` entry) |
| `Qformer/*`, `t5_proj/*` | the DynRefer `.pth` (they override BLIP-2's; BLIP-2's copies are read only without a DynRefer file) |
| `cvem_*`, `cem_memory`, `tag_*`, `attr_*` | the DynRefer `.pth` |
| `t5_model/*` | a Hugging Face flan-t5-xl directory (`*.safetensors` or `pytorch_model*.bin`) |
| `llm_model/*` (lm.kind "llama") | a Hugging Face Llama-format directory (`--llm`: Vicuna-v1.5, Llama 3, Qwen2; safetensors shards or `pytorch_model*.bin`), the embedding resized to the tokenizer's added tokens |
| `text_encoder/*` | `eva_clip_psz14.pt` (`text.*`; its `visual.*` half is dropped) |
| tables `clip_embeds`, `att_embeds`, `ov_embeds` | recomputed with the converted text tower (`compute_tables`) |

The DynRefer file must hold every trainable parameter the model has (the original's name rule:
`cvem`, `cem`, `tag`, `attr`, `Qformer`, `t5_proj`; the Vicuna variant's `llm_proj` in place of
`t5_proj`, and its unused `cem_memory` dropped); its optimizer / scaler / config entries are
never read. For the Vicuna variant the BLIP-2 file is LAVIS's Vicuna one (`query_tokens`,
`ln_vision`, `Qformer.bert.*` with its text embeddings, `llm_proj`). Files are read with `torch.load(weights_only=True)` or safetensors only. Every
problem of every file is collected and raised as one `ConversionError`: missing files, then for
each source its unmapped, unused, missing and mis-shaped keys.

`ln_vision` is believed to be in the BLIP-2 file but this is unverified (CHECKPOINTS.md §2.2):
when absent, LayerNorm's ones/zeros are used (what LAVIS would keep) and `notes` says so.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Mapping

import numpy as np

from dynrefer_jax.convert import aligner as aligner_conv
from dynrefer_jax.convert import eva_vit as vit_conv
from dynrefer_jax.convert import llama as llama_conv
from dynrefer_jax.convert import qformer as qformer_conv
from dynrefer_jax.convert import t5 as t5_conv
from dynrefer_jax.convert import text_tower as text_conv
from dynrefer_jax.convert.common import ConversionError, Rule, convert, load_state_dict

Shapes = Mapping[str, tuple[int, ...]]

TABLES = ("clip_embeds", "att_embeds", "ov_embeds", "tag_token_ids", "att_token_ids",
          "ov_token_ids", "att_template_owner")
# The original's trainable-name rule (SPEC §9): what the DynRefer file holds.
DYNREFER_OWNED = re.compile(r"^(cvem|cem|tag|attr|Qformer|t5_proj|llm_proj)")
# The trainable modules no pretrained file holds (DynRefer's own): without a DynRefer file they
# are left to the model's initialisation.
DYNREFER_ONLY = re.compile(r"^(cvem|cem|tag|attr)")
PRETRAINED_INIT = "pretrained init"  # conversion.json "kind" of a file without DynRefer's heads
# Frozen modules a bare full state dict could also carry; their own files supply them.
_FROZEN_PREFIXES = ("visual_encoder.", "ln_vision.", "query_tokens", "t5_model.",
                    "llm_model.", "text_encoder.", "clip_embeds", "att_embeds", "ov_embeds")


def head_rules(name: str) -> list[Rule]:
  """`{name}.encoder.layer.{i}.*` (BERT cross-attention-only layers, CHECKPOINTS §1.4) →
  `models.heads.CrossAttentionLayer` names."""
  layer = rf"{name}\.encoder\.layer\.(\d+)\."
  out = f"{name}/layers/{{0}}/"
  rules = []
  for torch_name, ours in ((r"crossattention\.self\.(query|key|value)", "{1}"),
                           (r"crossattention\.output\.dense", "attn_out"),
                           (r"intermediate\.dense", "intermediate"),
                           (r"output\.dense", "output")):
    rules.append(Rule(layer + torch_name + r"\.weight", out + ours + "/kernel", "linear"))
    rules.append(Rule(layer + torch_name + r"\.bias", out + ours + "/bias"))
  for torch_name, ours in ((r"crossattention\.output\.LayerNorm", "attn_ln"),
                           (r"output\.LayerNorm", "output_ln")):
    rules.append(Rule(layer + torch_name + r"\.weight", out + ours + "/scale"))
    rules.append(Rule(layer + torch_name + r"\.bias", out + ours + "/bias"))
  return rules


HEAD_RULES = [
    *head_rules("tag_head"), *head_rules("attr_head"),
    Rule(r"(tag|attr)_(vision_proj|text_proj|fc)\.weight", "{0}_{1}/kernel", "linear"),
    Rule(r"(tag|attr)_(vision_proj|text_proj|fc)\.bias", "{0}_{1}/bias"),
    Rule(r"attr_(t|b)", "attr_{0}", "scalar"),
]


def _llama(expected: Shapes) -> bool:
  """Whether the target model's LM is the Vicuna variant's decoder (lm.kind "llama")."""
  return any(k.startswith("llm_model/") for k in expected)


def lm_rules(expected: Shapes) -> list[Rule]:
  """The language side's trainable pieces: t5_proj + cem_memory, or llm_proj."""
  return llama_conv.dynrefer_rules() if _llama(expected) else t5_conv.dynrefer_rules()


def _sub(expected: Shapes, prefix: str, strip: bool = True) -> dict[str, tuple[int, ...]]:
  return {(k[len(prefix):] if strip else k): v for k, v in expected.items()
          if k.startswith(prefix)}


def _prefixed(flat: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {prefix + k: v for k, v in flat.items()}


class _Problems:
  """Collects ConversionErrors of several converters into one."""

  def __init__(self):
    self.items: list[str] = []

  def run(self, fn, *args, **kw) -> dict:
    try:
      return fn(*args, **kw)
    except ConversionError as e:
      self.items.append(str(e))
      return {}

  def raise_if_any(self) -> None:
    if self.items:
      raise ConversionError("; ".join(self.items))


def convert_dynrefer_file(sd: Mapping[str, np.ndarray], expected: Shapes) -> dict[str, np.ndarray]:
  """The released DynRefer `model` dict → {our path: array} for every trainable module.

  expected: the model's full {path: shape} (tables excluded); the paths of the original's
  trainable modules are filled, and all must be present in `sd`.
  """
  problems = _Problems()
  unknown = sorted(k for k in sd if not DYNREFER_OWNED.match(k)
                   and not k.startswith(_FROZEN_PREFIXES))
  if unknown:
    problems.items.append(f"cannot convert DynRefer checkpoint: {len(unknown)} unmapped source "
                          "keys: " + ", ".join(unknown))
  out = {}
  out.update(problems.run(aligner_conv.convert_cvem, sd, _sub(expected, "cvem_", strip=False)))
  qf = problems.run(qformer_conv.convert_qformer_lavis,
                    {k: v for k, v in sd.items() if k.startswith("Qformer.")},
                    _sub(expected, "Qformer/"))
  out.update(_prefixed(qf, "Qformer/"))
  head_keys = {k: v for k, v in sd.items()
               if DYNREFER_OWNED.match(k) and not k.startswith(("cvem_", "Qformer."))}
  head_expected = {k: v for k, v in expected.items()
                   if DYNREFER_OWNED.match(k) and not k.startswith(("cvem_", "Qformer/"))}
  out.update(problems.run(convert, head_keys, HEAD_RULES + lm_rules(expected), head_expected,
                          source_name="DynRefer checkpoint (heads, t5_proj / llm_proj, "
                          "cem_memory)"))
  problems.raise_if_any()
  return out


def convert_blip2_trainable(sd: Mapping[str, np.ndarray], expected: Shapes
                            ) -> dict[str, np.ndarray]:
  """BLIP-2's stage-2 Q-Former and t5_proj (CHECKPOINTS §2.2, §6: what DynRefer's training
  starts from; for the Vicuna variant LAVIS's Vicuna checkpoint and its llm_proj) → {our path:
  array}; every `Qformer/*` and `t5_proj/*` (`llm_proj/*`) path must be filled."""
  problems = _Problems()
  qf = problems.run(qformer_conv.convert_qformer_lavis,
                    {k: v for k, v in sd.items() if k.startswith("Qformer.")},
                    _sub(expected, "Qformer/"))
  out = _prefixed(qf, "Qformer/")
  name = "llm_proj" if _llama(expected) else "t5_proj"
  proj = [r for r in lm_rules(expected) if r.target and r.target.startswith(name)]
  keys = {k: v for k, v in sd.items() if k.startswith(name + ".")}
  if name == "llm_proj" and not _fits_llm_proj(keys, expected):
    keys = {}  # another LLM's BLIP-2 file: llm_proj starts from the trainer's init
  else:
    out.update(problems.run(convert, keys, proj, _sub(expected, name + "/", strip=False),
                            source_name=f"BLIP-2 checkpoint ({name})"))
  problems.raise_if_any()
  return out


def _fits_llm_proj(keys: Mapping[str, np.ndarray], expected: Shapes) -> bool:
  """Whether a BLIP-2 file's llm_proj ([out, in] weight) has the target LLM's width."""
  w = keys.get("llm_proj.weight")
  return w is not None and tuple(w.shape[::-1]) == tuple(expected.get("llm_proj/kernel", ()))


def left_to_model_init(expected: Shapes, blip2: Mapping[str, np.ndarray] | None = None
                       ) -> set[str]:
  """Top-level modules of `expected` that no pretrained file fills (DYNREFER_ONLY), and
  llm_proj when the BLIP-2 file `blip2` has none of the LLM's width."""
  left = {k.split("/")[0] for k in expected if DYNREFER_ONLY.match(k)}
  if blip2 is not None and _llama(expected) and not _fits_llm_proj(blip2, expected):
    left.add("llm_proj")
  return left


@dataclasses.dataclass(frozen=True)
class Sources:
  """Paths of the five released files (SPEC §13); dynrefer=None: the pretrained init only.
  The language model is `t5` (a FlanT5 directory) or `llm` (a Llama-format directory, the
  Vicuna variant or any lm.kind "llama" model); exactly one is given."""
  eva_vit: str         # eva_vit_g.pth
  blip2: str           # blip2_pretrained_flant5xl.pth (blip2_pretrained_vicuna7b.pth)
  t5: str | None       # a Hugging Face google/flan-t5-xl directory
  eva_clip: str        # eva_clip_psz14.pt (or a file with only its text.* keys)
  dynrefer: str | None = None  # vg1.2_5e.pth / refcocog_ft.pth
  llm: str | None = None       # a Hugging Face Llama-format directory (vicuna-7b-v1.5)


def _hf_files(path: str) -> list[str]:
  """The weight files of a Hugging Face model folder: safetensors (shards), else torch bins."""
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  return files or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))


_t5_files = _hf_files


def check_sources(sources: Sources) -> None:
  """Raises FileNotFoundError listing every missing file at once (before anything is read)."""
  missing = []
  if (sources.t5 is None) == (sources.llm is None):
    missing.append("--t5 (a FlanT5 directory) or --llm (a Llama-format directory): exactly one")
  for field in dataclasses.fields(sources):
    path = getattr(sources, field.name)
    if path is None and field.name in ("dynrefer", "t5", "llm"):
      continue
    if field.name in ("t5", "llm"):
      what = "flan-t5-xl" if field.name == "t5" else "Llama-format"
      if not os.path.isdir(path):
        missing.append(f"--{field.name}: {path} (a Hugging Face {what} directory)")
      elif not _hf_files(path):
        missing.append(f"--{field.name}: no *.safetensors or pytorch_model*.bin in {path}")
      elif field.name == "llm" and not os.path.isfile(os.path.join(path, "config.json")):
        missing.append(f"--llm: no config.json in {path}")
    elif not os.path.isfile(path):
      missing.append(f"--{field.name.replace('_', '-')}: {path}")
  if missing:
    raise FileNotFoundError(f"{len(missing)} missing file(s): " + "; ".join(missing))


def load_sources(sources: Sources) -> dict[str, dict[str, np.ndarray]]:
  """Reads every file as {key: numpy array} (weights only; LAVIS dicts unwrapped at `model`).
  The language model's folder is read under "t5" or "llm", whichever is given."""
  check_sources(sources)
  lm_sd: dict[str, np.ndarray] = {}
  for f in _hf_files(sources.t5 or sources.llm):
    lm_sd.update(load_state_dict(f))
  return {"dynrefer": (None if sources.dynrefer is None
                       else load_state_dict(sources.dynrefer, key="model")),
          "eva_vit": load_state_dict(sources.eva_vit, key="model"),
          "blip2": load_state_dict(sources.blip2, key="model"),
          "t5" if sources.t5 else "llm": lm_sd,
          "eva_clip": load_state_dict(sources.eva_clip)}


def convert_full(states: Mapping[str, Mapping[str, np.ndarray]], expected: Shapes
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
  """All five sources → ({our path: array} for every non-table parameter, notes).

  states: {"dynrefer", "eva_vit", "blip2", "t5" or "llm", "eva_clip"}: flat state dicts; "dynrefer" None
  converts the pretrained initialisation: Q-Former and t5_proj from the BLIP-2 file, and no
  DYNREFER_ONLY parameter (see left_to_model_init).
  expected: {path: shape} of the model without its tables (see TABLES).
  """
  problems = _Problems()
  notes: list[str] = []
  out: dict[str, np.ndarray] = {}
  owners = ("visual_encoder/", "ln_vision/", "query_tokens", "t5_model/", "llm_model/",
            "text_encoder/")
  leftover = sorted(k for k in expected
                    if not k.startswith(owners) and not DYNREFER_OWNED.match(k))
  if leftover:
    raise ConversionError(f"the model has parameters no source provides: {', '.join(leftover)}")

  out.update(_prefixed(problems.run(vit_conv.convert_lavis_eva_vit, states["eva_vit"],
                                    _sub(expected, "visual_encoder/")), "visual_encoder/"))

  blip2 = {k: v for k, v in states["blip2"].items()
           if k == "query_tokens" or k.startswith("ln_vision.")}
  blip2_expected = {k: v for k, v in expected.items()
                    if k == "query_tokens" or k.startswith("ln_vision/")}
  out.update(problems.run(qformer_conv.convert_qformer_lavis, blip2, blip2_expected))
  if "ln_vision/scale" in expected and "ln_vision.weight" not in blip2:
    notes.append("ln_vision absent from the BLIP-2 file: LayerNorm ones/zeros used, as LAVIS")
    out["ln_vision/scale"] = np.ones(expected["ln_vision/scale"], np.float32)
    out["ln_vision/bias"] = np.zeros(expected["ln_vision/bias"], np.float32)

  if states["dynrefer"] is not None:
    out.update(problems.run(convert_dynrefer_file, states["dynrefer"], expected))
  else:
    out.update(problems.run(convert_blip2_trainable, states["blip2"], expected))
    notes.append("no DynRefer file: "
                 + ", ".join(sorted(left_to_model_init(expected, states["blip2"])))
                 + " start from the model's initialisation (the trainer's seed)")
  if _llama(expected):
    if "llm" not in states:
      raise ConversionError("the config's LM is a Llama-format decoder (lm.kind 'llama'): "
                            "give its folder with --llm, not --t5")
    out.update(_prefixed(problems.run(llama_conv.convert_llama, states["llm"],
                                      _sub(expected, "llm_model/"),
                                      source_name="Llama-format directory"), "llm_model/"))
  else:
    if "t5" not in states:
      raise ConversionError("the config's LM is FlanT5 (lm.kind 't5'): give its folder with "
                            "--t5, not --llm")
    out.update(_prefixed(problems.run(t5_conv.convert_t5, states["t5"],
                                      _sub(expected, "t5_model/"),
                                      source_name="flan-t5 directory"), "t5_model/"))
  out.update(_prefixed(problems.run(text_conv.convert_eva_clip_text, states["eva_clip"],
                                    _sub(expected, "text_encoder/")), "text_encoder/"))
  problems.raise_if_any()
  return out, notes


def compute_tables(text_config: Mapping, text_params: dict, token_ids: Mapping[str, np.ndarray],
                   *, chunk: int = 512) -> dict[str, np.ndarray]:
  """The frozen text-embedding tables from the converted text tower (SPEC §7a-b).

  text_config: config.model.text; text_params: the nested `text_encoder` parameters;
  token_ids: {"tags", "attributes", "classes"}: int[N, L]. Returns {"clip_embeds",
  "att_embeds", "ov_embeds"}: float32[N, output_dim].
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import functional  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.models import text_tower  # pylint: disable=import-outside-toplevel
  graphdef, _, _ = functional.abstract_split(
      lambda: text_tower.TextTransformer(**dict(text_config), rngs=nnx.Rngs(0)))
  run = jax.jit(lambda p, ids: functional.merge(graphdef, p)(ids))
  out = {}
  for name, key in (("clip_embeds", "tags"), ("att_embeds", "attributes"),
                    ("ov_embeds", "classes")):
    ids = np.asarray(token_ids[key], np.int32)
    parts = []
    for i in range(0, len(ids), chunk):
      part = ids[i:i + chunk]
      pad = chunk - len(part) if len(ids) > chunk else 0  # one compiled shape per table
      padded = np.concatenate([part, np.repeat(part[:1], pad, 0)]) if pad else part
      parts.append(np.asarray(run(text_params, padded), np.float32)[:len(part)])
    out[name] = np.concatenate(parts)
  return out


# ------------------------------------------------------------------------ whole conversion

def read_names(path: str, what: str) -> list[str]:
  """Class / tag names from a text file (one per line) or JSON (a list of strings, a list of
  {"name"} records, {"categories": [...]}, or {id: name})."""
  import json  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file not found: {path}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    obj = json.loads(text)
    if isinstance(obj, dict):
      obj = obj.get("categories", obj.get(what, obj))
    if isinstance(obj, dict):
      obj = [obj[k] for k in sorted(obj, key=lambda k: int(k) if str(k).isdigit() else k)]
    names = [o["name"] if isinstance(o, dict) else str(o) for o in obj]
  else:
    names = [line.strip() for line in text.splitlines() if line.strip()]
  if not names:
    raise ValueError(f"{what} file {path} holds no names")
  return names


def build_vocab(tags: list[str], ovad_attributes: list[dict], categories: list[str]) -> dict:
  """The texts of the three tables (SPEC §7a-b): raw tag strings, OVAD templates, "the {class}"."""
  from dynrefer_jax.evaluators import attributes as attr_lib  # pylint: disable=import-outside-toplevel
  templates, owner = attr_lib.ovad_templates(ovad_attributes)
  return {"tags": list(tags), "attributes": [a["name"] for a in ovad_attributes],
          "attribute_freq": [a.get("freq_set", "") for a in ovad_attributes],
          "attribute_templates": templates, "template_to_attribute": owner.tolist(),
          "categories": list(categories),
          "class_prompts": [f"the {c.lower()}" for c in categories]}


def tokenize_vocab(vocab: dict, context_length: int, bpe_path: str | None = None
                   ) -> dict[str, np.ndarray]:
  """CLIP BPE token ids of the three tables' texts."""
  from dynrefer_jax.tokenizers import clip_bpe  # pylint: disable=import-outside-toplevel
  tok = clip_bpe.ClipTokenizer(bpe_path)
  return {"tags": tok(vocab["tags"], context_length),
          "attributes": tok(vocab["attribute_templates"], context_length),
          "classes": tok(vocab["class_prompts"], context_length)}


_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")


def llm_tokenizer(path: str, special_tokens: Mapping[str, str] | None = None):
  """The LLM folder's tokenizer with config.data.lm_special_tokens applied (the Vicuna
  variant: LAVIS's "[PAD]" pad and "</s>" as bos / eos / unk, Blip2VicunaInstruct.__init__)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import captions  # pylint: disable=import-outside-toplevel
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  captions.apply_special_tokens(tok, special_tokens)
  return tok


def _write_llm_files(config, llm_dir: str, out_dir: str, notes: list[str]) -> None:
  """OUT/tokenizer (the LLM's, special tokens applied) and OUT/llm/config.json (its HF config
  with the model's vocabulary size), from which configs read the LLM's sizes."""
  import json  # pylint: disable=import-outside-toplevel
  try:
    tok = llm_tokenizer(llm_dir, config.data.get("lm_special_tokens", None))
  except (OSError, ValueError) as e:
    notes.append(f"no tokenizer loaded from {llm_dir} ({str(e).splitlines()[0]}): put it in "
                 f"{os.path.join(out_dir, 'tokenizer')}")
  else:
    if len(tok) > config.model.lm.vocab_size:
      raise ConversionError(f"the tokenizer has {len(tok)} tokens, more than "
                            f"config.model.lm.vocab_size {config.model.lm.vocab_size}")
    tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
  hf = llama_conv.read_hf_config(llm_dir)
  hf["vocab_size"] = int(config.model.lm.vocab_size)
  os.makedirs(os.path.join(out_dir, "llm"), exist_ok=True)
  path = os.path.join(out_dir, "llm", "config.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=1)
  os.replace(path + ".tmp", path)


def convert_checkpoint(config, sources: Sources, vocab: dict, token_ids: Mapping[str, np.ndarray],
                       out_dir: str, *, log=print) -> dict:
  """Writes `out_dir`: checkpoints/ (Orbax, step 0, {"params": every variable of the model,
  tables included}), vocab.json, tokenizer/ (copied from the T5 directory; with `sources.llm`
  the LLM's, config.data.lm_special_tokens applied, and llm/config.json) and conversion.json.
  Without `sources.dynrefer` the params lack the modules listed in the report's (and the
  checkpoint metadata's) `left_to_model_init`, and its kind is PRETRAINED_INIT.

  config: a full config (config.model sizes it, config.sharding places it). vocab: from
  build_vocab. token_ids: {"tags", "attributes", "classes"} int[N, L] (tokenize_vocab).
  Returns the report written to conversion.json.
  """
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import checkpoint as ckpt_lib, functional, sharding  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.models import dynrefer as dynrefer_lib  # pylint: disable=import-outside-toplevel

  check_sources(sources)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"output directory is not empty: {out_dir}")
  ids = {k: np.asarray(v, np.int32) for k, v in token_ids.items()}
  ids["template_to_attribute"] = np.asarray(vocab["template_to_attribute"], np.int32)
  graphdef, abstract, axes = functional.abstract_split(
      lambda: dynrefer_lib.DynRefer(config.model, ids, rngs=nnx.Rngs(0)))
  del graphdef
  flat_abstract = functional.flatten(abstract)
  expected = {k: tuple(v.shape) for k, v in flat_abstract.items() if k not in TABLES}

  log(f"reading {', '.join(f'{f.name}={getattr(sources, f.name)}' for f in dataclasses.fields(sources))}")
  states = load_sources(sources)
  flat, notes = convert_full(states, expected)
  left = sorted(left_to_model_init(expected, states["blip2"])) if sources.dynrefer is None else []
  del states
  log(f"converted {len(flat)} arrays; computing the text tables")
  text_params = functional.unflatten({k[len("text_encoder/"):]: v for k, v in flat.items()
                                      if k.startswith("text_encoder/")})
  tables = compute_tables(config.model.text, text_params, ids)
  flat.update(tables)
  flat.update({"tag_token_ids": ids["tags"], "att_token_ids": ids["attributes"],
               "ov_token_ids": ids["classes"], "att_template_owner": ids["template_to_attribute"]})
  missing = sorted(k for k in set(flat_abstract) - set(flat) if k.split("/")[0] not in left)
  if missing:  # convert_full checks everything else; a new table would land here
    raise ConversionError(f"nothing fills: {', '.join(missing)}")

  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  shardings = functional.flatten(sharding.tree_shardings(
      abstract, axes, mesh, [tuple(r) for r in config.sharding.rules]))
  placed = {k: jax.device_put(np.asarray(flat[k]).astype(a.dtype), shardings[k])
            for k, a in flat_abstract.items() if k in flat}
  os.makedirs(out_dir, exist_ok=True)
  kind = "converted DynRefer" if sources.dynrefer else PRETRAINED_INIT
  report = {"kind": kind, "sources": dataclasses.asdict(sources),
            "notes": notes, "parameters": int(sum(np.size(v) for v in flat.values())),
            "trainable_parameters": int(sum(np.size(v) for k, v in flat.items()
                                            if DYNREFER_OWNED.match(k) and k not in TABLES)),
            "left_to_model_init": left,
            "model_config": json.loads(config.model.to_json_best_effort())}
  ck = ckpt_lib.Checkpointer(os.path.join(out_dir, "checkpoints"), async_save=False)
  ck.save(0, {"params": functional.unflatten(placed)}, report, force=True)
  ck.close()
  tok_dir = os.path.join(out_dir, "tokenizer")
  if sources.llm:
    _write_llm_files(config, sources.llm, out_dir, notes)
  else:
    copied = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(sources.t5, f))]
    if copied:
      os.makedirs(tok_dir, exist_ok=True)
      for f in copied:
        shutil.copyfile(os.path.join(sources.t5, f), os.path.join(tok_dir, f))
    else:
      notes.append(f"no tokenizer files in {sources.t5}: put the flan-t5 tokenizer in {tok_dir}")
  vocab = dict(vocab, text_len=int(ids["tags"].shape[1]))
  for name, obj in (("vocab.json", vocab), ("conversion.json", report)):
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
  return report
