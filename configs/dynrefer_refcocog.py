r"""DynRefer fine-tuned on RefCOCOg (MDETR train split) for 3 epochs from the VG model, lr 1e-4
per-epoch cosine, tag threshold 0.76 (SPEC §9); evaluated on RefCOCOg region captioning
(GLaMM / Kosmos-2 val protocol, SPEC §14: METEOR 18.1, CIDEr 115.3).

Data: the TFDS dataset refcocog (train: MDETR's finetune_refcocog_train.json, val: GLaMM's
finetune_refcocog_val_captions.json, COCO train2014/; ram_tag_list.txt in the manual dir),
built into the TFDS data dir DATA (README "Data"):

  python tools/prepare_data.py --dataset refcocog --manual_dir RAW --data_dir DATA

  # the VG model, converted: tools/convert_checkpoint.py --config configs/dynrefer_refcocog.py \
  #     --dynrefer vg1.2_5e.pth ... --out ckpts/vg1.2_jax
  python -m dynrefer_jax.train --config configs/dynrefer_refcocog.py --workdir workdirs/refcocog \
      --config.data.dir=DATA --config.model_init=ckpts/vg1.2_jax
  python -m dynrefer_jax.evaluate --config configs/dynrefer_refcocog.py \
      --checkpoint workdirs/refcocog --config.data.dir=DATA --config.model_init=ckpts/vg1.2_jax
  # or from your own VG run (model_init = its workdir: its trainable weights, the frozen ones
  # from what it was trained from; evaluate finds them through the workdir, no model_init):
  python -m dynrefer_jax.train --config configs/dynrefer_refcocog.py --workdir workdirs/refcocog \
      --config.data.dir=DATA --config.model_init=workdirs/vg
  # the released fine-tuned weights (refcocog_ft.pth converted to ckpts/refcocog_jax):
  python -m dynrefer_jax.evaluate --config configs/dynrefer_refcocog.py \
      --checkpoint ckpts/refcocog_jax --config.data.dir=DATA

Arguments: "" (full size), "smoke" (toy model, tiny fixture, 2 CPU steps).
"""

from configs import common

SPLITS = {"refcocog": "refcocog/val"}


def get_config(arg=None):
  arg = arg or ""
  c = common.base()
  c.model = common.full_model()
  c.model.tag_threshold = 0.76
  c.data = common.real_data(train="refcocog/train", splits=SPLITS)
  c.data.name = "refcocog"
  c.optim.epochs = 3
  c.train.batch_size = 512
  c.eval = dict(batch_size=64, view_selection="phash", splits=list(SPLITS),
                tasks=dict(refcocog=["region_caption"]),
                evaluators=dict(region_caption=dict(key="image_id")),
                published="refcocog",
                # configs/eval/refcoco/refcocog_reg.yaml (docs/SPEC_NOTES.md)
                protocol=dict(refcocog=dict(tag_threshold=0.76)))
  if arg == "smoke":
    common.smoke_real(c)
  elif arg:
    raise ValueError(f"unknown argument {arg!r}: '' or 'smoke'")
  return c
