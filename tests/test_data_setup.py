"""data/setup.py on real-format data: built by tools/prepare_data.py (TFDS builders) from tiny
annotation files (data/fixture.py writes them in the public layouts), then batches, eval
iterators, vocabularies and the one-line errors for bad or missing paths."""

import importlib.util
import json
import os

import numpy as np
import pytest

from dynrefer_jax import config_lib
from dynrefer_jax.data import fixture, setup
from dynrefer_jax.data import tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "prepare_data", os.path.join(ROOT, "tools", "prepare_data.py"))
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Raw fixture files, built with the real CLI into the TFDS data dir DATA, and a
  T5-convention tokenizer folder standing in for flan-t5-xl. DATA_untagged holds VG built
  from a manual dir without ram_tag_list.txt."""
  base = tmp_path_factory.mktemp("real")
  raw = fixture.write_raw(str(base / "raw"))
  data = base / "data"
  assert prepare_data.main(["--dataset", *fixture.DATASETS, "--manual_dir", str(base / "raw"),
                            "--data_dir", str(data)]) == 0
  untagged = base / "raw_untagged"
  os.makedirs(untagged)
  for name in os.listdir(base / "raw"):
    if name != "ram_tag_list.txt":
      os.symlink(base / "raw" / name, untagged / name)
  assert prepare_data.main(["--dataset", "vg", "--manual_dir", str(untagged),
                            "--data_dir", str(base / "data_untagged")]) == 0
  texts = [r["phrase"] for e in json.load(open(raw["region_descriptions"]))
           for r in e["regions"]] + fixture.TAGS + [c for _, c in fixture.CLASSES]
  tok_dir = str(base / "t5_tokenizer")
  tok_lib.build_tokenizer(texts, tok_dir)
  return {"raw": raw, "data": str(data), "untagged": str(base / "data_untagged"),
          "tokenizer": tok_dir, "base": base}


def _config(prepared, *overrides):
  """dynrefer_vg's data section at toy model size, pointed at the prepared fixture."""
  raw = prepared["raw"]
  return config_lib.load(os.path.join(ROOT, "configs", "dynrefer_vg.py:smoke"), [
      "data.fixture=false", f"data.dir={prepared['data']}",
      f"data.tokenizer_dir={prepared['tokenizer']}", f"data.tag_list={raw['tag_list']}",
      f"data.ovad_annotations={raw['ovad']}", f"data.class_names={raw['classes']}",
      *overrides])


def test_training_batch_has_documented_shapes(prepared, tmp_path):
  c = _config(prepared)
  data = setup.prepare(c, str(tmp_path))
  setup.resolve_vocab(c, data)
  assert c.model.text.vocab_size == 49408          # the CLIP BPE's
  assert c.model.lm.vocab_size == len(data.tokenizer)
  assert data.tag_names == fixture.TAGS
  assert data.category_names == ["person", "car", "dog"]
  assert data.attribute_names == [a["name"] for a in fixture.OVAD_ATTRIBUTES]
  # SPEC §7b templates: "is" -> 2 per synonym, "has" -> 2 ("the {syn} {type}", "the  has ...").
  assert data.meta["attribute_templates"][:4] == ["the black", "the  is black",
                                                  "the long hair length",
                                                  "the  has long hair length"]
  assert data.template_to_attribute.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
  assert data.meta["class_prompts"] == ["the person", "the car", "the dog"]
  L = c.data.text_len
  assert {k: v.shape for k, v in data.text_token_ids.items()} == {
      "tags": (19, L), "attributes": (8, L), "classes": (3, L)}
  assert data.text_token_ids["classes"][0, 0] == 49406            # CLIP SOT
  assert data.num_train_examples == 16                              # 4 VG images x 4 regions

  b = data.example_batch()
  B, S, K = c.train.batch_size, c.data.window_size, len(fixture.TAGS)
  expected = {"image": (np.uint8, (B, 1, S, S, 3)), "image_hw": (np.int32, (B, 2)),
              "window": (np.float32, (B, 1, 6)),
              "box": (np.float32, (B, 4)),
              "caption_ids": (np.int32, (B, c.data.caption_len)),
              "caption_mask": (np.int32, (B, c.data.caption_len)),
              "control_ids": (np.int32, (B, c.data.control_len)),
              "control_mask": (np.int32, (B, c.data.control_len)),
              "text_ids": (np.int32, (B, L)), "tags": (np.float32, (B, K)),
              "category": (np.int32, (B,)), "attributes": (np.int32, (B, 3)),
              "mask": (np.bool_, (B,))}
  assert {k: (v.dtype.type, v.shape) for k, v in b.items()} == expected
  assert (b["text_ids"][:, 0] == 49406).all() and (b["text_ids"] == 49407).sum(1).tolist() == [1] * B
  assert (b["tags"].sum(1) > 0).all()            # every fixture phrase names a listed tag
  assert (b["category"] == -1).all() and (b["attributes"] == -1).all()   # VG has neither
  assert b["mask"].all()
  hw = b["image_hw"]
  assert (b["box"][:, 2] <= hw[:, 1]).all() and (b["box"][:, 3] <= hw[:, 0]).all()


def test_eval_iterators_remap_labels(prepared, tmp_path):
  c = _config(prepared)
  data = setup.prepare(c, str(tmp_path))
  ovad = list(data.eval_iterator("ovad", batch_size=8))
  assert len(ovad) == 1
  b = ovad[0]
  keep = b["mask"]
  assert keep.sum() == 4 and set(b) >= {"image_id", "region_id", "captions"}
  assert sorted(map(tuple, b["attributes"][keep].tolist())) == sorted(
      [(1, 0, -1), (0, 1, 1), (1, -1, 0), (0, 0, 1)])
  names = np.asarray(data.category_names)[b["category"][keep]]
  assert set(names) <= {"person", "car", "dog"} and len(set(names)) == 3
  coco = next(iter(data.eval_iterator("coco", batch_size=8)))
  assert coco["mask"].sum() == 6 and (coco["category"][coco["mask"]] >= 0).all()
  assert [c[0] for c in coco["captions"][:6]] == list(
      np.asarray(data.category_names)[coco["category"][:6]])
  dense = next(iter(data.eval_iterator("vg_dense", batch_size=8)))
  assert dense["mask"].sum() == 8
  assert dense["tags"].sum() > 0   # prepared without --tag_list: parsed against the tag list
  assert dense["control_ids"][0, 1] == data.tokenizer.eos_token_id       # "|" then </s>


def test_vocab_from_converted_checkpoint_and_from_captions(prepared, tmp_path):
  conv = tmp_path / "converted"
  os.makedirs(conv)
  vocab = {"tags": ["dog", "kite", "sky"], "attributes": ["color:black"],
           "attribute_freq": ["head"], "attribute_templates": ["the black", "the  is black"],
           "template_to_attribute": [0, 0], "categories": ["dog", "person"],
           "class_prompts": ["the dog", "the person"], "text_len": 77}
  json.dump(vocab, open(conv / "vocab.json", "w"))
  tok_lib.build_tokenizer(["a dog", "the sky"], str(conv / "tokenizer"))
  c = config_lib.load(os.path.join(ROOT, "configs", "dynrefer_vg.py:smoke"), [
      "data.fixture=false", f"data.dir={prepared['data']}", f"model_init={conv}"])
  data = setup.prepare(c, str(tmp_path / "w"))
  assert data.tag_names == ["dog", "kite", "sky"] and data.category_names == ["dog", "person"]
  assert data.template_to_attribute.tolist() == [0, 0]
  assert len(data.tokenizer) == len(tok_lib.load_tokenizer(str(conv / "tokenizer")))
  b = next(iter(data.eval_iterator("ovad", batch_size=8)))
  # OVAD's other two attributes are not the model's: only "color:black" is scored.
  assert b["attributes"].shape == (8, 1)
  # The training split's tags were parsed against the fixture list: re-parsed against these.
  assert data.example_batch()["tags"].shape == (8, 3)

  c = _config(prepared, "data.tag_list=", f"data.dir={prepared['untagged']}",
              "data.max_tags=5", "eval.splits=['vg_dense']")
  data = setup.prepare(c, str(tmp_path / "w2"))
  assert len(data.tag_names) == 5
  assert data.example_batch()["tags"].sum() > 0


def _error(prepared, tmp_path, *overrides) -> str:
  with pytest.raises(setup.DataError) as e:
    setup.prepare(_config(prepared, *overrides), str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_bad_paths_are_one_line_errors(prepared, tmp_path):
  assert "--config.data.dir=" in _error(prepared, tmp_path, "data.dir=")
  assert "no such directory" in _error(prepared, tmp_path, f"data.dir={tmp_path}/nope")
  msg = _error(prepared, tmp_path, "data.train=vg/nope")
  assert "config.data.train=vg/nope" in msg and "prepare_data.py --dataset vg" in msg
  assert "config.data.splits.coco=" in _error(prepared, tmp_path, "data.splits.coco=coco/nope")
  msg = _error(prepared, tmp_path, "data.train=lvis/train")
  assert "config.data.train=lvis/train" in msg and "dataset/split" in msg
  assert "does not define" in _error(prepared, tmp_path, "eval.splits=['vg_dense', 'lvis']")
  assert "--config.data.tag_list: file not found" in _error(
      prepared, tmp_path, f"data.tag_list={tmp_path}/ram.txt")
  assert "--config.data.ovad_annotations=ovad2000.json" in _error(
      prepared, tmp_path, "data.ovad_annotations=")
  assert "--config.data.tokenizer_dir" in _error(prepared, tmp_path, "data.tokenizer_dir=")
  assert "--config.data.tokenizer_dir: no such directory" in _error(
      prepared, tmp_path, f"data.tokenizer_dir={tmp_path}/t5")
  assert "--config.data.class_names" in _error(
      prepared, tmp_path, f"data.class_names={tmp_path}/coco.json")


def test_unbuilt_dataset_is_one_line_error(prepared, tmp_path):
  """A data dir without the datasets the config names (here: only VG built) says which to
  build, for every missing split, in one line."""
  msg = _error(prepared, tmp_path, f"data.dir={prepared['untagged']}")
  assert "3 split(s) not built" in msg and "config.data.splits.ovad=ovad/test" in msg
  assert "tools/prepare_data.py --dataset vg_reg|ovad|coco" in msg


def test_train_cli_prints_one_line(prepared, tmp_path, capsys):
  from dynrefer_jax import train  # pylint: disable=import-outside-toplevel
  rc = train.main(["--config", os.path.join(ROOT, "configs", "dynrefer_vg.py"),
                   "--workdir", str(tmp_path)])
  err = capsys.readouterr().err.strip()
  assert rc == 1 and err.count("\n") == 0
  assert err.startswith("error: config.data.dir is empty") and "--config.data.dir=" in err
