r"""DynRefer-Vicuna (the original's `configs/train/vg/vicuna_vg1.2_5e.yaml` over
`configs/base/models/dynrefer_vicuna.yaml`): Vicuna-v1.5-7B in place of FlanT5-XL, initialised
from LAVIS's `blip2_pretrained_vicuna7b.pth`, VG V1.2, 5 epochs, the recipe of configs/dynrefer_vg.py
(SPEC §9) with `llm_proj` trainable in place of `t5_proj`; evaluated on the same splits.

The LLM reads the prefix [llm_proj(Z) ; control words] and the caption after it
(dynrefer_vicuna.py's llm_forward, InstructBLIP-Vicuna's packing); the tokenizer is Vicuna's with
LAVIS's special tokens ("[PAD]" added, "</s>" as bos / eos / unk: `data.lm_special_tokens`), so
the embedding has 32001 rows. Generation: 2 beams, 20 new tokens, repetition penalty 1.5
(`model.generate`, as the T5 model's; docs/SPEC_NOTES.md on max_new_tokens).

  # weights (the pretrained init; --dynrefer FILE for a trained DynRefer-Vicuna .pth):
  python tools/convert_checkpoint.py --config configs/dynrefer_vicuna_vg.py \
      --eva-vit eva_vit_g.pth --blip2 blip2_pretrained_vicuna7b.pth --llm vicuna-7b-v1.5/ \
      --eva-clip eva_clip_psz14.pt --tags ram_tag_list.txt --ovad ovad2000.json \
      --classes coco.json --out ckpts/vicuna_init
  python -m dynrefer_jax.train --config configs/dynrefer_vicuna_vg.py --workdir workdirs/vicuna \
      --config.data.dir=DATA --config.model_init=ckpts/vicuna_init
  python -m dynrefer_jax.evaluate --config configs/dynrefer_vicuna_vg.py \
      --checkpoint workdirs/vicuna --config.data.dir=DATA

Arguments: "" (full size), "smoke" (a toy decoder LLM on the tiny real-format fixture: 2 CPU
steps, no user files).
"""

from configs import common, dynrefer_vg, synthetic

# Vicuna-v1.5-7B (lmsys/vicuna-7b-v1.5 config.json: LLaMA-2 7B), vocabulary + LAVIS's "[PAD]".
VICUNA_7B = dict(kind="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008,
                 num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                 rope_theta=10000.0, rope_scaling={}, attention_bias=False, o_bias=False,
                 tie_word_embeddings=False, init_std=0.02, residual_init_scale=1.0)

# Blip2VicunaInstruct.__init__: pad "[PAD]" added; "</s>" becomes bos, eos and unk.
LAVIS_VICUNA_TOKENS = dict(pad_token="[PAD]", bos_token="</s>", eos_token="</s>",
                           unk_token="</s>")


def get_config(arg=None):
  arg = arg or ""
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown argument {arg!r}: '' or 'smoke'")
  c = dynrefer_vg.get_config(arg)
  c.trainable = list(common.ORIGINAL_TRAINABLE_LLM)
  c.model.lm = dict(VICUNA_7B)
  c.data.name = "vg"
  c.data.lm_special_tokens = dict(LAVIS_VICUNA_TOKENS)
  # max_txt_len 32 for the control words (truncated on the left). The caption: the original
  # pads each batch to its longest caption (max_output_txt_len 256, never reached by a caption
  # of at most 50 words); static shapes need one length: 64 Vicuna tokens (docs/SPEC_NOTES.md).
  c.data.control_len = 32
  c.data.caption_len = 64
  if arg == "smoke":
    c.model.lm = synthetic.llama_lm()
    c.trainable = [".*"]
    c.data.lm_special_tokens = {}
    c.data.caption_len = c.data.control_len = 16
  return c
