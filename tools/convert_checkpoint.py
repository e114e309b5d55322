r"""Convert the released DynRefer weights into one Orbax checkpoint of the full model.

  python tools/convert_checkpoint.py --config configs/<full-size config>.py \
      --dynrefer ckpts/vg1.2_5e.pth --eva-vit eva_vit_g.pth \
      --blip2 blip2_pretrained_flant5xl.pth --t5 flan-t5-xl/ --eva-clip eva_clip_psz14.pt \
      --tags ram_tag_list.txt --ovad ovad2000.json --classes coco.json --out ckpts/vg1.2_jax

  # the Vicuna variant (configs/dynrefer_vicuna_vg.py) or any Llama-format LLM
  # (configs/dynrefer_llm_vg.py:LLM_DIR): --llm in place of --t5, LAVIS's Vicuna BLIP-2 file
  python tools/convert_checkpoint.py --config configs/dynrefer_vicuna_vg.py \
      --eva-vit eva_vit_g.pth --blip2 blip2_pretrained_vicuna7b.pth --llm vicuna-7b-v1.5/ \
      --eva-clip eva_clip_psz14.pt --tags ram_tag_list.txt --ovad ovad2000.json \
      --classes coco.json --out ckpts/vicuna_init

Reads only with torch.load(weights_only=True) or safetensors. The LLM folder is read as
Hugging Face writes it (config.json, safetensors shards or pytorch_model*.bin, the tokenizer).
Writes OUT/checkpoints (Orbax, step 0: {"params": every variable, the tag / attribute-template /
class text-embedding tables precomputed}), OUT/vocab.json, OUT/tokenizer/ (with --llm: the
LLM's, config.data.lm_special_tokens added; and OUT/llm/config.json) and OUT/conversion.json;
`python -m
dynrefer_jax.predict --checkpoint OUT` and `python -m dynrefer_jax.evaluate --checkpoint OUT`
read it. A missing file or key is one line listing everything missing, exit code 2.

Without --dynrefer it writes the pretrained initialisation the original's training starts from
(CHECKPOINTS.md §6): the frozen towers plus BLIP-2's query tokens, Q-Former and t5_proj
(llm_proj), with
DynRefer's own modules (cvem_*, cem_memory, tag_*, attr_*) left to the trainer's initialisation;
train from it with --config.model_init=OUT (conversion.json: "kind": "pretrained init").
Memory: the full model is ~4.2 B parameters (~17 GB in float32) held on the host once; with
Vicuna-7B ~8.4 B (~34 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dynrefer_jax import config_lib  # noqa: E402  pylint: disable=wrong-import-position
from dynrefer_jax.convert import dynrefer as conv  # noqa: E402  pylint: disable=wrong-import-position
from dynrefer_jax.convert.common import ConversionError  # noqa: E402  pylint: disable=wrong-import-position


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise config_lib.ConfigError(message)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    p = _Parser(prog="tools/convert_checkpoint.py")
    p.add_argument("--dynrefer", default=None,
                   help="the released DynRefer .pth (vg1.2_5e.pth, refcocog_ft.pth); without "
                   "it: the pretrained init the original trains from (no DynRefer heads)")
    p.add_argument("--t5", default=None, help="a Hugging Face google/flan-t5-xl directory "
                   "(config.model.lm.kind 't5')")
    p.add_argument("--llm", default=None, help="a Hugging Face Llama-format directory, e.g. "
                   "vicuna-7b-v1.5 (config.model.lm.kind 'llama')")
    for name, what in (("eva-vit", "LAVIS eva_vit_g.pth"),
                       ("blip2", "blip2_pretrained_flant5xl.pth (Vicuna variant: "
                        "blip2_pretrained_vicuna7b.pth)"),
                       ("eva-clip", "eva_clip_psz14.pt (EVA-CLIP text tower)"),
                       ("tags", "the RAM tag list (one tag per line)"),
                       ("ovad", "ovad2000.json (its 'attributes' records)"),
                       ("classes", "class names: coco.json or a text file"),
                       ("out", "output directory (new or empty)")):
      p.add_argument(f"--{name}", required=True, help=what)
    p.add_argument("--bpe", default=None, help="CLIP bpe_simple_vocab_16e6.txt.gz "
                   "(default: the one in the open_clip package)")
    args = p.parse_args(rest)
    if spec is None:
      raise config_lib.ConfigError("--config=configs/<name>.py[:arg] is required")
    config = config_lib.load(spec, overrides)
    kind = config.model.lm.get("kind", "t5")
    wanted, other = ("llm", "t5") if kind == "llama" else ("t5", "llm")
    if getattr(args, wanted) is None or getattr(args, other) is not None:
      raise config_lib.ConfigError(f"the config's language model is lm.kind {kind!r}: give "
                                   f"--{wanted} (and not --{other})")
    sources = conv.Sources(dynrefer=args.dynrefer, eva_vit=args.eva_vit, blip2=args.blip2,
                           t5=args.t5, eva_clip=args.eva_clip, llm=args.llm)
    missing = []
    try:
      conv.check_sources(sources)
    except FileNotFoundError as e:
      missing.append(str(e))
    for flag in ("tags", "ovad", "classes"):
      if not os.path.isfile(getattr(args, flag)):
        missing.append(f"--{flag}: {getattr(args, flag)}")
    if missing:
      raise FileNotFoundError("missing: " + "; ".join(missing))
    if os.path.exists(args.out) and os.listdir(args.out):
      raise FileExistsError(f"--out {args.out} is not empty")
    with open(args.ovad, encoding="utf-8") as f:
      ovad = json.load(f)
    attrs = ovad["attributes"] if isinstance(ovad, dict) else ovad
    vocab = conv.build_vocab(conv.read_names(args.tags, "tags"), attrs,
                             conv.read_names(args.classes, "categories"))
    token_ids = conv.tokenize_vocab(vocab, int(config.model.text.context_length), args.bpe)
    report = conv.convert_checkpoint(config, sources, vocab, token_ids, args.out,
                                     log=lambda m: print(m, file=sys.stderr, flush=True))
  except (config_lib.ConfigError, ConversionError, FileNotFoundError, FileExistsError,
          ValueError, KeyError) as e:
    msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
    print("error: " + msg.replace("\n", " "), file=sys.stderr)
    return 2
  print(json.dumps({k: report[k] for k in ("kind", "parameters", "trainable_parameters",
                                            "left_to_model_init", "notes")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
