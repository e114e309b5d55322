"""tools/prepare_data.py end to end: records, report, TFRecord shards, atomicity, pipeline."""

import glob
import importlib.util
import json
import os

import numpy as np
import pytest

from dynrefer_jax.data import pipeline, sources
from dynrefer_jax.data import tokenizer as tok_lib
from test_builders import write_coco_fixture, write_vg_fixture

_spec = importlib.util.spec_from_file_location(
    "prepare_data", os.path.join(os.path.dirname(__file__), "..", "tools", "prepare_data.py"))
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)


def _vg_args(root, out, *extra):
  return ["--dataset", "vg", "--split", "train", "--out", out,
          "--image_dir", os.path.join(root, "images"),
          "--region_descriptions", os.path.join(root, "region_descriptions.json"),
          "--image_data", os.path.join(root, "image_data.json"),
          "--densecap_splits", os.path.join(root, "densecap_splits.json"), *extra]


def _read_shards(out, split):
  import tensorflow as tf
  examples = []
  for path in sorted(glob.glob(os.path.join(out, f"{split}-*-of-*.tfrecord"))):
    for raw in tf.data.TFRecordDataset(path):
      examples.append(tf.train.Example.FromString(raw.numpy()))
  return examples


def test_vg_end_to_end(tmp_path):
  root, out = str(tmp_path / "raw"), str(tmp_path / "out")
  write_vg_fixture(root)
  vocab = tmp_path / "tags.txt"
  vocab.write_text("kite\nred kite\nred\ndog\nman\ncake")
  report = prepare_data.main(_vg_args(root, out, "--tag_list", str(vocab),
                                      "--images_per_shard", "1"))
  with open(os.path.join(out, "train_report.json")) as f:
    assert json.load(f) == report
  assert report["skipped"] == {"box_outside_image": 1, "caption_too_long": 1,
                               "caption_empty": 1, "box_negative_size": 1}
  assert report["repaired"] == {"box_clipped": 2, "box_widened": 1, "image_mode_L": 1}
  assert report["shards"] == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert not glob.glob(os.path.join(out, "*.tmp"))

  examples = _read_shards(out, "train")
  assert len(examples) == 2
  f = {k: v for k, v in examples[0].features.feature.items()}
  assert f["image/id"].int64_list.value == [1]
  assert list(f["region/id"].int64_list.value) == [1, 2, 3, 5, 8]
  assert [c.decode() for c in f["region/caption"].bytes_list.value] == [
      "a red kite", "man", "dog", "pole", "cafe half cake"]
  np.testing.assert_allclose(np.reshape(f["region/box"].float_list.value, (5, 4))[1],
                             [5, 0, 15, 6])
  # "a red kite" -> kite, red kite, red = ids 0, 1, 2; "man" -> 4; "dog" -> 3.
  assert list(f["region/num_tags"].int64_list.value) == [3, 1, 1, 0, 1]
  assert list(f["region/tag_ids"].int64_list.value) == [0, 1, 2, 4, 3, 5]
  with open(os.path.join(root, "images", "1.jpg"), "rb") as fh:
    assert f["image/encoded"].bytes_list.value[0] == fh.read()

  # The record file feeds the pipeline directly.
  src = sources.JsonSource(out, "train")
  assert src.num_examples == 6
  tok = tok_lib.build_tokenizer(list(src.table.caption) + src.table.tag_vocab,
                                str(tmp_path / "tok"))
  batch = next(pipeline.make_train_iterator(src, global_batch_size=4, seed=0, tokenizer=tok,
                                            window_size=64, with_ids=True))
  assert batch["image"].shape == (4, 1, 64, 64, 3) and batch["tags"].shape == (4, 6)
  assert (batch["category"] == -1).all() and (batch["attributes"].shape == (4, 0))


def test_killed_run_leaves_no_partial_shard(tmp_path, monkeypatch):
  root, out = str(tmp_path / "raw"), str(tmp_path / "out")
  write_vg_fixture(root)
  real = prepare_data._example
  calls = []

  def failing(image, regions):
    calls.append(image["id"])
    if len(calls) == 2:
      raise KeyboardInterrupt  # as if the run were killed while writing the second shard
    return real(image, regions)

  monkeypatch.setattr(prepare_data, "_example", failing)
  with pytest.raises(KeyboardInterrupt):
    prepare_data.main(_vg_args(root, out, "--images_per_shard", "1"))
  names = sorted(os.listdir(out))
  assert "train-00000-of-00002.tfrecord" in names
  assert not [n for n in names if n.startswith("train-00001") or n.endswith(".tmp")]
  assert "train_report.json" not in names  # the report is written only after all shards
  assert len(_read_shards(out, "train")) == 1


def test_coco_report_counts_bad_images(tmp_path):
  root, out = str(tmp_path / "raw"), str(tmp_path / "out")
  write_coco_fixture(root)
  report = prepare_data.main(["--dataset", "coco", "--split", "val", "--out", out,
                              "--image_dir", os.path.join(root, "images"),
                              "--annotations", os.path.join(root, "instances.json"),
                              "--no_tfrecords"])
  assert report["skipped"]["image_corrupt"] == 2 and report["skipped"]["image_missing"] == 1
  assert report["regions_out"] == 5 and "shards" not in report
  assert len(report["examples"]["image_corrupt"]) == 2
  data = json.load(open(os.path.join(out, "val.json")))
  assert data["vocab"]["categories"] == ["person", "car", "toothbrush"]
