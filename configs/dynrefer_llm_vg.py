r"""DynRefer with any Llama-format decoder LLM (Llama 3, Qwen2, Vicuna, ...) in place of
FlanT5-XL: the Vicuna variant's model and recipe (configs/dynrefer_vicuna_vg.py) with the LLM's
sizes read from its folder, never written here.

The argument is the LLM: a Hugging Face folder (config.json, safetensors, tokenizer), to
convert it, or the tools/convert_checkpoint.py output made from it (its llm/config.json; it is
then also the default config.model_init):

  python tools/convert_checkpoint.py --config configs/dynrefer_llm_vg.py:Llama-3.2-3B \
      --eva-vit eva_vit_g.pth --blip2 blip2_pretrained_vicuna7b.pth --llm Llama-3.2-3B \
      --eva-clip eva_clip_psz14.pt --tags ram_tag_list.txt --ovad ovad2000.json \
      --classes coco.json --out ckpts/llama3_init
  python -m dynrefer_jax.train --config configs/dynrefer_llm_vg.py:ckpts/llama3_init \
      --workdir workdirs/llama3 --config.data.dir=DATA

"smoke" in place of DIR: the Vicuna config's smoke run (a toy decoder LLM, tiny fixture).

No BLIP-2 checkpoint was trained for such an LLM: `--blip2` (LAVIS's Vicuna or FlanT5 file)
supplies the query tokens, ln_vision and the Q-Former; its llm_proj is taken only when it fits
the LLM's width (Vicuna-7B: 4096), otherwise training starts llm_proj from its own
initialisation (conversion.json: `left_to_model_init`). The tokenizer is the LLM's own; one
without a pad token pads with its eos (padding is masked everywhere).
"""

import os

from configs import common, dynrefer_vicuna_vg
from dynrefer_jax.convert import llama as llama_conv


def get_config(arg=None):
  if arg == "smoke":  # the toy decoder LLM on the real-format fixture, as the Vicuna config's
    return dynrefer_vicuna_vg.get_config("smoke")
  if not arg:
    raise ValueError("configs/dynrefer_llm_vg.py:DIR needs DIR: a Hugging Face Llama-format "
                     "folder or its tools/convert_checkpoint.py output")
  path = os.path.expanduser(arg)
  converted = os.path.isfile(os.path.join(path, "vocab.json"))
  try:
    hf = llama_conv.read_hf_config(os.path.join(path, "llm") if converted else path)
  except FileNotFoundError as e:
    raise ValueError(str(e)) from None
  c = dynrefer_vicuna_vg.get_config()
  c.model.lm = llama_conv.lm_config(hf)
  c.data.lm_special_tokens = {}
  c.trainable = list(common.ORIGINAL_TRAINABLE_LLM)
  if converted:
    c.model_init = path
  return c
