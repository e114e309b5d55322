r"""Input pipeline at Visual Genome's training scale: a training process's data side, before and
after the TFDS / ArrayRecord switch (issue 22), measured in one run.

  python tools/benchmark_input.py --work /tmp/bench_input            # VG scale (defaults)
  python tools/benchmark_input.py --work /tmp/bi --images 2000 --regions 94000   # quick check

Data: fake records at VG V1.2 training scale (--images 77,398 images, --regions 3,600,000
regions; captions of 2-7 words over a made-up vocabulary, tag ids parsed against a 4,585-tag list)
pointing at a few real JPEGs (--jpegs; by default four 427-600 px photos shipped in the test
requirements' packages), written once under --work in both formats: the record file
`<split>.json` that tools/prepare_data.py wrote before (read by the baseline's sources.JsonSource)
and the TFDS dataset dynrefer_vg (ArrayRecord, images embedded) the builders write now.

Each path runs in its own fresh process, as a training process does: configs/dynrefer_vg.py with
the real vocabularies' sizes (4,585 tags, 117 OVAD-style attributes, 80 classes), a T5-style
SentencePiece tokenizer and the CLIP BPE, `data.setup.prepare`, then the training iterator
(global batch --batch, one process). The baseline is the code at --baseline_rev (default: the
commit before the one that removed sources.JsonSource), extracted with `git archive`; "after" is
this checkout. Reported per path: seconds to import, to prepare, to the first batch (and their
sum from process start, and the process's CPU seconds over all threads up to then), regions/s
over --steps batches after the first (with the cores the process kept busy then, its CPU
seconds over the wall time, and its CPU milliseconds per region: how much of the machine each
path uses, and what a region costs), and the process's peak resident memory (ru_maxrss). A
path can be left out (--paths after) when the machine lacks the memory the baseline needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VG_IMAGES, VG_REGIONS = 77398, 3600000
NUM_TAGS, NUM_ATTRIBUTES, NUM_CLASSES = 4585, 117, 80


def default_jpegs() -> list[str]:
  """Real photos that ship inside installed packages (sklearn, matplotlib, scikit-image)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  found = []
  for package, rel in (("sklearn", "datasets/images/china.jpg"),
                       ("sklearn", "datasets/images/flower.jpg"),
                       ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                       ("skimage", "data/rocket.jpg")):
    spec = importlib.util.find_spec(package)
    if spec and spec.origin:
      path = os.path.join(os.path.dirname(spec.origin), rel)
      if os.path.isfile(path):
        found.append(path)
  return found


# ----------------------------------------------------------------------------- fake data


def vocabulary(rng):
  nouns = [f"thing{i}" for i in range(3000)]
  adjectives = [f"hue{i}" for i in range(100)]
  phrases = [f"{adjectives[i % 100]} {nouns[(7 * i) % 3000]}"
             for i in range(NUM_TAGS - len(nouns) - len(adjectives))]
  del rng
  return nouns, adjectives, nouns + adjectives + phrases


def fake_images(num_images: int, num_regions: int, jpegs: list[str], seed: int = 0):
  """Yields (image_id, jpeg path, width, height, regions) with regions [(id, xyxy, caption)];
  deterministic. Region counts are multinomial (VG's mean of ~47 per image)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  nouns, adjectives, _ = vocabulary(rng)
  sizes = [Image.open(p).size for p in jpegs]
  counts = rng.multinomial(num_regions, np.full(num_images, 1.0 / num_images))
  relations = ["on", "in", "near", "behind", "holding", "wearing", "of", "with"]
  region_id = 1
  for i in range(num_images):
    k = i % len(jpegs)
    w, h = sizes[k]
    regions = []
    for _ in range(int(counts[i])):
      x1, y1 = rng.uniform(0, w - 8), rng.uniform(0, h - 8)
      x2, y2 = rng.uniform(x1 + 4, w), rng.uniform(y1 + 4, h)
      n1, n2 = nouns[rng.integers(3000)], nouns[rng.integers(3000)]
      adj = adjectives[rng.integers(100)]
      form = rng.integers(3)
      caption = (f"{adj} {n1}" if form == 0 else f"a {adj} {n1} {relations[rng.integers(8)]} "
                 f"the {n2}" if form == 1 else f"the {n1} {relations[rng.integers(8)]} {n2}")
      regions.append((region_id, [float(x1), float(y1), float(x2), float(y2)], caption))
      region_id += 1
    yield i + 1, jpegs[k], w, h, regions


def write_vocab_files(work: str) -> dict:
  """The tag list, OVAD-style attribute file, class list and a T5-style tokenizer folder."""
  os.makedirs(work, exist_ok=True)
  nouns, adjectives, tags = vocabulary(None)
  paths = {k: os.path.join(work, v) for k, v in dict(
      tag_list="ram_tag_list.txt", ovad="ovad2000.json", classes="coco_classes.json",
      tokenizer="t5_tokenizer").items()}
  with open(paths["tag_list"], "w") as f:
    f.write("\n".join(tags))
  attributes = [{"id": i, "name": f"kind{i // 4}:value{i}", "type": f"kind{i // 4}",
                 "parent_type": "kind", "is_has_att": "is" if i % 3 else "has",
                 "freq_set": "head"} for i in range(NUM_ATTRIBUTES)]
  with open(paths["ovad"], "w") as f:
    json.dump({"attributes": attributes}, f)
  with open(paths["classes"], "w") as f:
    json.dump([f"class{i}" for i in range(NUM_CLASSES)], f)
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  d = paths["tokenizer"]
  os.makedirs(d, exist_ok=True)
  texts = tags + [f"a {a} {n} on the {m}" for a, n, m in zip(adjectives * 30, nouns, nouns[1:])]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts + ["|", "a,b|"]), model_prefix=os.path.join(d, "spiece"),
      vocab_size=2000, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}, f)
  return paths


def write_json_records(path: str, images, parser) -> None:
  """The record file tools/prepare_data.py wrote before (sources.JsonSource), streamed."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write('{"dataset": {"image_root": ""}, "images": [')
    anns = tempfile.TemporaryFile("w+")
    sep_image = sep_ann = ""
    for image_id, jpeg, w, h, regions in images:
      f.write(sep_image + json.dumps(
          {"id": image_id, "file_name": jpeg, "width": w, "height": h}))
      sep_image = ", "
      for rid, (x1, y1, x2, y2), caption in regions:
        set1, set2 = parser.tag_ids(caption)
        anns.write(sep_ann + json.dumps(
            {"id": rid, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
             "caption": caption, "references": [caption], "category": None, "att_vec": None,
             "tag_ids": sorted(set(set1) | set(set2))}))
        sep_ann = ", "
    f.write('], "annotations": [')
    anns.seek(0)
    while chunk := anns.read(1 << 24):
      f.write(chunk)
    f.write('], "vocab": ' + json.dumps({"tags": list(parser.vocabulary), "categories": [],
                                          "attributes": []}) + "}")
  os.replace(tmp, path)


def write_tfds(data_dir: str, images, num_images: int, parser) -> None:
  """The same regions as the TFDS dataset dynrefer_vg (split train), through the builders'
  example writer (builders/base.py), tag ids parsed as their cleaning does. `images()` yields
  the fake images."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data.builders import base, vg  # pylint: disable=import-outside-toplevel

  class FakeVg(vg.DynreferVg, skip_registration=True):
    name = "dynrefer_vg"

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._fake()}

    def _fake(self):
      counts, cache, side = [], {}, 0
      for i, (image_id, jpeg, w, h, regions) in enumerate(images()):
        side = max(side, w, h)
        if jpeg not in cache:
          with open(jpeg, "rb") as f:
            cache[jpeg] = f.read()
        regs = []
        for rid, box, caption in regions:
          set1, set2 = parser.tag_ids(caption)
          regs.append({"id": rid, "box": box, "caption": caption,
                       "tag_ids": sorted(set(set1) | set(set2))})
        counts.append(len(regs))
        yield base.spaced_key(i, num_images), base.image_example(
            cache[jpeg], image_id, os.path.basename(jpeg), w, h, regs, {})
      self.record_split("train", counts, {"regions_in": sum(counts), "regions_out": sum(counts),
                                          "images_out": len(counts), "repaired": {},
                                          "skipped": {}},
                        {"tags": list(parser.vocabulary), "categories": [], "attributes": []},
                        side)

  tfds.disable_progress_bar()
  FakeVg(data_dir=data_dir, file_format="array_record").download_and_prepare()


def prepare_data(args) -> dict:
  """Writes (once) the vocabularies and both formats under --work; returns their paths."""
  from dynrefer_jax.data import tags as tags_lib  # pylint: disable=import-outside-toplevel
  key = f"{args.images}x{args.regions}x{'+'.join(args.jpegs)}"
  stamp = os.path.join(args.work, "data_done.json")
  if os.path.exists(stamp):
    with open(stamp) as f:
      done = json.load(f)
    if done.get("key") == key:
      return done
  vocab = write_vocab_files(os.path.join(args.work, "vocab"))
  parser = tags_lib.TagParser(tags_lib.load_vocabulary(vocab["tag_list"]))
  t0 = time.time()
  json_dir = os.path.join(args.work, "json_records")
  write_json_records(os.path.join(json_dir, "vg", "train.json"),
                     fake_images(args.images, args.regions, args.jpegs), parser)
  t1 = time.time()
  tfds_dir = os.path.join(args.work, "tfds")
  write_tfds(tfds_dir, lambda: fake_images(args.images, args.regions, args.jpegs),
             args.images, parser)
  done = dict(vocab, key=key, json_dir=json_dir, tfds_dir=tfds_dir,
              write_json_s=round(t1 - t0, 1), write_tfds_s=round(time.time() - t1, 1))
  with open(stamp, "w") as f:
    json.dump(done, f)
  return done


# ----------------------------------------------------------------------------- measurement

# Runs in a fresh process with the tree under test on sys.path: a training process's data side.
_CHILD = r"""
import json, os, resource, sys, time
t0 = time.time()
args = json.loads(sys.argv[1])
import jax
from dynrefer_jax import config_lib
from dynrefer_jax.data import setup
t_import = time.time()
c = config_lib.load("configs/dynrefer_vg.py", [
    f"data.dir={args['data_dir']}", "data.train=vg/train", "eval.splits=[]",
    f"data.tag_list={args['tag_list']}", f"data.ovad_annotations={args['ovad']}",
    f"data.class_names={args['classes']}", f"data.tokenizer_dir={args['tokenizer']}",
    f"train.batch_size={args['batch']}"])
data = setup.prepare(c, args["workdir"])
t_prepare = time.time()
it = data.train_iterator(start_step=0)
first = next(it)
t_first = time.time()
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu_first = usage.ru_utime + usage.ru_stime  # all threads: less sensitive to a shared machine
n = 0
for _ in range(args["steps"]):
  n += len(next(it)["image"])
t_end = time.time()
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu_end = usage.ru_utime + usage.ru_stime
print(json.dumps({
    "import_s": t_import - t0, "prepare_s": t_prepare - t_import,
    "first_batch_s": t_first - t_prepare, "start_to_first_batch_s": t_first - t0,
    "cpu_to_first_batch_s": cpu_first, "regions_per_s": n / (t_end - t_first),
    "cores_busy": (cpu_end - cpu_first) / (t_end - t_first),
    "cpu_ms_per_region": 1e3 * (cpu_end - cpu_first) / max(n, 1),
    "regions": data.num_train_examples, "peak_rss_gib": usage.ru_maxrss / 2**20}), flush=True)
# A live tf.data iterator whose threads run Python can hang the interpreter's exit (the
# baseline's pipeline does not close it): the figures are out, leave at once.
os._exit(0)
"""


def baseline_tree(rev: str, work: str) -> str:
  """The baseline's files (`git archive`, read-only on the repository)."""
  if not rev:
    out = subprocess.run(["git", "log", "-S", "class JsonSource", "--format=%H", "-1", "--",
                          "dynrefer_jax/data/sources.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    if not out:
      raise SystemExit("error: no commit removed sources.JsonSource; pass --baseline_rev")
    rev = out + "^"
  rev = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.strip()
  tree = os.path.join(work, f"baseline-{rev[:10]}")
  if not os.path.isdir(tree):
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True,
                             check=True).stdout
    tmp = tempfile.mkdtemp(dir=work)
    import io  # pylint: disable=import-outside-toplevel
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
      tar.extractall(tmp, filter="data")
    os.replace(tmp, tree)
  return tree


def measure(tree: str, data_dir: str, data: dict, args, name: str) -> dict:
  child = dict(data_dir=data_dir, tag_list=data["tag_list"], ovad=data["ovad"],
               classes=data["classes"], tokenizer=data["tokenizer"], batch=args.batch,
               steps=args.steps, workdir=os.path.join(args.work, f"workdir_{name}"))
  env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child)], cwd=tree, env=env,
                       capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"error: the {name} process failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--work", required=True, help="folder for the data (kept) and the baseline")
  p.add_argument("--images", type=int, default=VG_IMAGES)
  p.add_argument("--regions", type=int, default=VG_REGIONS)
  p.add_argument("--jpegs", nargs="+", default=None)
  p.add_argument("--batch", type=int, default=64, help="global batch (one process)")
  p.add_argument("--steps", type=int, default=40, help="batches timed after the first")
  p.add_argument("--paths", default="before,after",
                 help="which to measure ('' : only write the data)")
  p.add_argument("--baseline_rev", default="")
  args = p.parse_args(argv)
  args.jpegs = [os.path.abspath(j) for j in (args.jpegs or default_jpegs())]
  if not args.jpegs:
    p.error("no JPEGs found: pass --jpegs")
  os.makedirs(args.work, exist_ok=True)
  data = prepare_data(args)
  results = {"images": args.images, "regions": args.regions, "batch": args.batch,
             "steps": args.steps, "jpegs": [os.path.basename(j) for j in args.jpegs],
             "write_json_s": data["write_json_s"], "write_tfds_s": data["write_tfds_s"]}
  for name in filter(None, args.paths.split(",")):
    if name == "before":
      tree = baseline_tree(args.baseline_rev, args.work)
      results["before"] = measure(tree, data["json_dir"], data, args, "before")
    elif name == "after":
      results["after"] = measure(ROOT, data["tfds_dir"], data, args, "after")
    print(json.dumps({name: results[name]}), flush=True)
    results["load_after_" + name] = os.getloadavg()[0]
  if "before" in results and "after" in results:
    results["regions_per_s_ratio"] = (results["after"]["regions_per_s"]
                                      / results["before"]["regions_per_s"])
  print(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
