"""Decoded tokens/s: our jitted generate vs transformers' generate on the same toy T5.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/benchmark_decode.py --batch 32 --num_beams 2

Both decode the same random model (HF weights converted with convert/t5.py) on the same
inputs in this process; EOS is blocked (min_length > max_new_tokens) so both run exactly
max_new_tokens steps and token counts are equal: tokens = batch * max_new_tokens. The first
JAX call (compile) is reported apart. Prints one JSON line per measurement. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from dynrefer_jax import functional  # noqa: E402
from dynrefer_jax.convert.common import expected_shapes  # noqa: E402
from dynrefer_jax.convert.t5 import convert_t5  # noqa: E402
from dynrefer_jax.decode.beam_search import generate  # noqa: E402
from dynrefer_jax.models.t5 import T5  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--enc_len", type=int, default=40)  # 32 queries + 8 control tokens
  ap.add_argument("--num_beams", type=int, default=2)
  ap.add_argument("--max_new_tokens", type=int, default=20)
  ap.add_argument("--repetition_penalty", type=float, default=1.5)
  ap.add_argument("--length_penalty", type=float, default=0.0)
  ap.add_argument("--vocab", type=int, default=32128)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--d_ff", type=int, default=640)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--torch_device", default="cpu")
  ap.add_argument("--skip_hf", action="store_true")
  args = ap.parse_args()

  cfg = transformers.T5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=64,
                              d_ff=args.d_ff, num_heads=args.heads, num_layers=args.layers,
                              num_decoder_layers=args.layers, feed_forward_proj="gated-gelu",
                              dropout_rate=0.0, tie_word_embeddings=False,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  cfg.dense_act_fn = "gelu"
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(cfg).eval()
  hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
  model = T5(vocab_size=args.vocab, d_model=args.d_model, d_kv=64, d_ff=args.d_ff,
             num_heads=args.heads, num_encoder_layers=args.layers,
             num_decoder_layers=args.layers, rngs=nnx.Rngs(0))
  graphdef, params, _ = functional.split(model)
  flat = convert_t5({k: v.detach().numpy() for k, v in hf.state_dict().items()},
                    expected_shapes(params))
  params = functional.unflatten({k: jnp.asarray(v) for k, v in flat.items()})

  rs = np.random.RandomState(0)
  x = rs.randn(args.batch, args.enc_len, args.d_model).astype(np.float32)
  mask = np.ones((args.batch, args.enc_len), bool)
  settings = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                  min_length=args.max_new_tokens + 2,  # no early EOS: equal work on both sides
                  repetition_penalty=args.repetition_penalty,
                  length_penalty=args.length_penalty)
  tokens = args.batch * args.max_new_tokens
  common = dict(batch=args.batch, num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens, d_model=args.d_model, layers=args.layers,
                vocab=args.vocab, jax_device=str(jax.devices()[0]))

  @jax.jit
  def run(p, x, mask):
    m = functional.merge(graphdef, p)
    return generate(m, m.encode(x, mask), mask, **settings)

  xj, mj = jnp.asarray(x), jnp.asarray(mask)
  t0 = time.perf_counter()
  jax.block_until_ready(run(params, xj, mj))
  print(json.dumps(dict(common, impl="dynrefer_jax", what="compile+first_call_s",
                        value=round(time.perf_counter() - t0, 3))), flush=True)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    ids, _ = jax.block_until_ready(run(params, xj, mj))
    times.append(time.perf_counter() - t0)
  best = min(times)
  print(json.dumps(dict(common, impl="dynrefer_jax", what="tokens_per_s",
                        value=round(tokens / best, 1), seconds=round(best, 4))), flush=True)

  if args.skip_hf:
    return
  dev = torch.device(args.torch_device)
  hf = hf.to(dev)
  tx = torch.tensor(x, device=dev)
  tm = torch.tensor(mask.astype(np.int64), device=dev)
  times = []
  with torch.no_grad():
    for _ in range(args.repeats + 1):
      t0 = time.perf_counter()
      out = hf.generate(inputs_embeds=tx, attention_mask=tm, do_sample=False, **settings)
      if dev.type == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
  best = min(times[1:])
  same = bool(np.array_equal(out[:, 1:].cpu().numpy(), np.asarray(ids)))
  print(json.dumps(dict(common, impl="transformers", what="tokens_per_s",
                        value=round(tokens / best, 1), seconds=round(best, 4),
                        torch_threads=torch.get_num_threads(), torch_device=str(dev),
                        ids_identical=same)), flush=True)


if __name__ == "__main__":
  main()
