r"""Per-device memory of the full train step on a mesh, before renting the pod slice.

  python tools/memory_plan.py --devices 64 --mesh 1,64,1 --regions-per-device 8
  python tools/memory_plan.py --devices 8 --mesh 2,4,1 --regions-per-device 2 \
      --config configs/synthetic.py:smoke                   # any config; default: full size
  python tools/memory_plan.py --devices 64 --mesh 1,64,1 --regions-per-device 8 \
      --config configs/dynrefer_vicuna_vg.py --caption-len 64   # Vicuna-7B in place of FlanT5

Lowers and compiles the jitted train step (dynrefer_jax.train.jit_train_step: the same shardings,
donation and remat policy as training) for a mesh of N fake CPU devices from abstract shapes only:
no parameter, optimizer state or batch is allocated. Prints one JSON object with the compiled
program's per-device argument, output, alias (donated), temporary and peak bytes
(peak = argument + output − alias + temporary), and the per-device bytes of the parameters,
optimizer state and batch computed from their shardings.

The batch is the trainer's (docs/ARCHITECTURE.md) at the sizes of the flags; the full-size
defaults are VG's: 1024-px padded images, 32 caption and control tokens, 77 text tokens, 4585
tags, 474 attribute templates over 117 attributes, 80 classes. `--set KEY=VALUE` overrides any
config entry (e.g. fewer layers, to extrapolate when the full compile is too slow for the
machine: parameters and saved activations grow linearly with depth), or
`--set model.scan_layers=false` for the unrolled loops of blocks (~3× the scanned peak at full
size). CPU memory figures are XLA's estimate for a CPU program; an accelerator's scheduler and
fusion differ, so leave a margin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def full_config(mesh: tuple[int, int, int], remat: str):
  from configs import common  # pylint: disable=import-outside-toplevel
  c = common.base()
  c.model = common.full_model()
  c.model.remat = remat
  c.sharding.mesh = dict(zip(("data", "fsdp", "tensor"), mesh))
  return c


def batch_spec(config, batch: int, *, image_size: int, caption_len: int, control_len: int,
               text_len: int, num_tags: int, num_attributes: int) -> dict:
  """{key: (shape, dtype)} of one global training batch."""
  del config
  return {"image": ((batch, image_size, image_size, 3), "uint8"),
          "image_hw": ((batch, 2), "int32"), "box": ((batch, 4), "float32"),
          "caption_ids": ((batch, caption_len), "int32"),
          "caption_mask": ((batch, caption_len), "int32"),
          "control_ids": ((batch, control_len), "int32"),
          "control_mask": ((batch, control_len), "int32"),
          "text_ids": ((batch, text_len), "int32"), "tags": ((batch, num_tags), "float32"),
          "category": ((batch,), "int32"), "attributes": ((batch, num_attributes), "int32"),
          "mask": ((batch,), "bool")}


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def plan(config, mesh, regions_per_device: int, *, image_size: int, caption_len: int,
         control_len: int, text_len: int, num_tags: int, num_templates: int,
         num_attributes: int, num_classes: int) -> dict:
  """Compiles the train step from abstract shapes; returns the per-device byte counts."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import checkpoint as ckpt_lib, optim, sharding, train  # pylint: disable=import-outside-toplevel

  ids = {"tags": np.zeros((num_tags, text_len), np.int32),
         "attributes": np.zeros((num_templates, text_len), np.int32),
         "classes": np.zeros((num_classes, text_len), np.int32)}
  t0 = time.time()
  _, state = train.abstract_model(config, ids, mesh)
  if config.model.get("scan_layers", False):
    train.stack_frozen(state)  # as the trainer holds them
  tx, schedule = optim.make_optimizer(config.optim, state.trainable, steps_per_epoch=1000)
  opt_abstract = jax.eval_shape(tx.init, state.trainable)
  opt_sh = train.optimizer_shardings(tx, opt_abstract, state.trainable_shardings, mesh)
  opt_abstract = ckpt_lib.abstract_with_shardings(opt_abstract, opt_sh)
  n_batch = regions_per_device * mesh.size
  spec = batch_spec(config, n_batch, image_size=image_size, caption_len=caption_len,
                    control_len=control_len, text_len=text_len, num_tags=num_tags,
                    num_attributes=num_attributes)
  batch_sh = {k: sharding.batch_sharding(mesh, len(s), state.rules) for k, (s, _) in spec.items()}
  batch = {k: jax.ShapeDtypeStruct(s, np.dtype(d), sharding=batch_sh[k])
           for k, (s, d) in spec.items()}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated)
  step = train.jit_train_step(state, tx, schedule, opt_sh, batch_sh,
                              remat=config.model.get("remat", "none"))
  lowered = step.lower(state.trainable, opt_abstract, state.frozen, batch, rng)
  t_lower = time.time() - t0
  compiled = lowered.compile()
  t_compile = time.time() - t0 - t_lower
  ma = compiled.memory_analysis()
  arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
  alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
  return {
      "mesh": dict(mesh.shape), "devices": mesh.size, "regions_per_device": regions_per_device,
      "global_batch": n_batch, "remat": config.model.get("remat", "none"),
      "scan_layers": bool(config.model.get("scan_layers", False)),
      "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
      "peak_bytes": arg + out - alias + temp,
      "trainable_bytes": shard_bytes(state.trainable), "frozen_bytes": shard_bytes(state.frozen),
      "opt_state_bytes": shard_bytes(opt_abstract), "batch_bytes": shard_bytes(batch),
      "trainable_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(state.trainable)),
      "frozen_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(state.frozen)),
      "lower_seconds": round(t_lower, 1), "compile_seconds": round(t_compile, 1),
  }


def _parse_mesh(text: str) -> tuple[int, int, int]:
  parts = [int(p) for p in text.split(",")]
  if len(parts) != 3 or min(parts) < 1:
    raise ValueError(f"--mesh wants data,fsdp,tensor (three positive integers), got {text!r}")
  return tuple(parts)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python tools/memory_plan.py", description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=64, help="fake CPU devices (the mesh's size)")
  p.add_argument("--mesh", default="1,64,1", help="data,fsdp,tensor")
  p.add_argument("--regions-per-device", type=int, default=8)
  p.add_argument("--config", default="", help="configs/<name>.py[:arg]; default: full size")
  p.add_argument("--remat", default="", help="override config.model.remat")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--caption-len", type=int, default=32)
  p.add_argument("--control-len", type=int, default=32)
  p.add_argument("--text-len", type=int, default=0, help="0: the text tower's context length")
  p.add_argument("--num-tags", type=int, default=4585)
  p.add_argument("--num-templates", type=int, default=474)
  p.add_argument("--num-attributes", type=int, default=117)
  p.add_argument("--num-classes", type=int, default=80)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.vit.depth=4 (repeatable)")
  p.add_argument("--out", default="", help="also write the JSON here")
  args = p.parse_args(argv)
  try:
    mesh_shape = _parse_mesh(args.mesh)
    if math.prod(mesh_shape) != args.devices:
      raise ValueError(f"mesh {args.mesh} has {math.prod(mesh_shape)} devices, "
                       f"--devices is {args.devices}")
    if args.regions_per_device < 1:
      raise ValueError("--regions-per-device must be at least 1")
    if "jax" not in sys.modules:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={args.devices}")
      os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # pylint: disable=import-outside-toplevel
    devices = jax.devices()
    if len(devices) < args.devices:
      raise ValueError(f"{len(devices)} devices available, the mesh needs {args.devices} "
                       "(jax was initialised before XLA_FLAGS could be set)")
    from dynrefer_jax import config_lib, sharding  # pylint: disable=import-outside-toplevel
    if args.config:
      config = config_lib.load(args.config, [])
      with config.unlocked():
        config.sharding.mesh = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
        if args.remat:
          config.model.remat = args.remat
        for key in ("text", "lm"):
          if config.model[key].vocab_size == -1:
            config.model[key].vocab_size = 1024
    else:
      config = full_config(mesh_shape, args.remat or "none")
    config = config_lib.override(config, args.set)
    mesh = sharding.make_mesh(dict(config.sharding.mesh), devices=devices[:args.devices])
    text_len = args.text_len or config.model.text.context_length
    report = plan(config, mesh, args.regions_per_device, image_size=args.image_size,
                  caption_len=args.caption_len, control_len=args.control_len,
                  text_len=text_len, num_tags=args.num_tags, num_templates=args.num_templates,
                  num_attributes=args.num_attributes, num_classes=args.num_classes)
  except ValueError as e:  # config_lib.ConfigError is one
    print(f"error: {e}", file=sys.stderr)
    return 2
  report["peak_gib"] = round(report["peak_bytes"] / 2**30, 3)
  report["command"] = "python tools/memory_plan.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    from dynrefer_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    ckpt_lib.atomic_write_json(args.out, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
