"""tools/prepare_data.py end to end: TFDS builds from a manual dir, the bad-record report,
atomicity, one-line errors, `tfds build` (tools/tfds_build.py) and the pipeline on the result."""

import importlib.util
import os

import numpy as np
import pytest

from dynrefer_jax.data import builders, pipeline, sources
from dynrefer_jax.data import tokenizer as tok_lib
from test_builders import write_coco_fixture, write_vg_fixture

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


prepare_data = _tool("prepare_data")


def test_vg_end_to_end(tmp_path, capsys):
  raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
  write_vg_fixture(raw)
  (tmp_path / "raw" / "ram_tag_list.txt").write_text("kite\nred kite\nred\ndog\nman\ncake")
  assert prepare_data.main(["--dataset", "vg", "--manual_dir", raw, "--data_dir", data]) == 0
  assert '"regions_out": 6' in capsys.readouterr().out
  builder = builders.load("vg", data)
  assert builder.is_prepared() and builder.info.file_format.value == "array_record"
  assert str(builder.info.version) == "1.0.0" and "1.0.0" in builder.RELEASE_NOTES
  meta = builder.info.metadata["splits"]
  assert sorted(meta) == ["train", "val"]  # densecap's test split lists no image of the file
  report = meta["train"]["report"]
  assert report["skipped"] == {"box_outside_image": 1, "caption_too_long": 1,
                               "caption_empty": 1, "box_negative_size": 1}
  assert report["repaired"] == {"box_clipped": 2, "box_widened": 1, "image_mode_L": 1}
  assert meta["train"]["num_regions"] == [5, 1]  # the region index: regions per image

  src = sources.RegionSource(builder, "train")
  r = src.read(np.arange(src.num_examples))
  assert r.region_id.tolist() == [1, 2, 3, 5, 8, 10] and r.image_id.tolist() == [1] * 5 + [2]
  assert r.caption == ["a red kite", "man", "dog", "pole", "cafe half cake", "a dog"]
  np.testing.assert_allclose(r.box[1], [5, 0, 15, 6])
  # "a red kite" -> kite, red kite, red = ids 0, 1, 2; "man" -> 4; "dog" -> 3; "cake" -> 5.
  assert [t.tolist() for t in r.tag_ids] == [[0, 1, 2], [4], [3], [], [5], [3]]
  with open(os.path.join(raw, "images", "1.jpg"), "rb") as fh:
    assert r.image[0] == fh.read()

  # The built split feeds the pipeline directly.
  tok = tok_lib.build_tokenizer(r.caption + src.tag_vocab, str(tmp_path / "tok"))
  batch = next(pipeline.make_train_iterator(src, global_batch_size=4, seed=0, tokenizer=tok,
                                            window_size=64, with_ids=True))
  assert batch["image"].shape == (4, 1, 64, 64, 3) and batch["tags"].shape == (4, 6)
  assert src.max_image_side == 64
  assert (batch["category"] == -1).all() and (batch["attributes"].shape == (4, 0))


def test_bad_records_are_reported_not_fatal(tmp_path, capsys):
  """COCO's bad-record matrix (corrupt, missing, CMYK, 16-bit, EXIF-rotated images; an unknown
  category; a NaN box): the build completes, every decision is counted."""
  raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
  write_coco_fixture(raw)
  assert prepare_data.main(["--dataset", "coco", "--manual_dir", raw, "--data_dir", data]) == 0
  printed = capsys.readouterr().out
  assert '"image_corrupt": 2' in printed and '"regions_out": 5' in printed
  builder = builders.load("coco", data)
  report = builder.info.metadata["splits"]["val"]["report"]
  assert report["skipped"] == {"image_corrupt": 2, "image_missing": 1,
                               "regions_of_skipped_images": 3, "unknown_category": 1,
                               "box_nan": 1}
  assert report["repaired"] == {"image_mode_RGBA": 1, "image_mode_CMYK": 1,
                                "image_mode_I;16": 1, "image_exif_rotated": 1}
  assert len(report["examples"]["image_corrupt"]) == 2
  assert builder.info.metadata["splits"]["val"]["max_image_side"] == 1280  # stored unshrunk (> the old 1024)
  src = sources.RegionSource(builder, "val")
  r = src.read(np.arange(src.num_examples))
  assert r.caption == ["person", "car", "toothbrush", "person", "person"]
  assert r.category.tolist() == [0, 1, 2, 0, 0]
  assert src.split_vocab["categories"] == ["person", "car", "toothbrush"]


def test_killed_build_leaves_nothing_that_reads_as_built(tmp_path, monkeypatch):
  raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
  write_vg_fixture(raw)
  real, calls = builders.base.image_example, []

  def failing(*args, **kw):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt  # as if the run were killed while writing the second image
    return real(*args, **kw)

  monkeypatch.setattr(builders.base, "image_example", failing)
  with pytest.raises(KeyboardInterrupt):
    prepare_data.main(["--dataset", "vg", "--manual_dir", raw, "--data_dir", data])
  assert not builders.load("vg", data).is_prepared()
  assert not [n for n in os.listdir(os.path.join(data, "dynrefer_vg")) if "incomplete" in n]
  monkeypatch.setattr(builders.base, "image_example", real)
  assert prepare_data.main(["--dataset", "vg", "--manual_dir", raw, "--data_dir", data]) == 0
  assert builders.load("vg", data).is_prepared()


def test_missing_files_are_one_line_errors(tmp_path, capsys):
  raw = tmp_path / "raw"
  write_vg_fixture(str(raw))
  os.remove(raw / "densecap_splits.json")
  rc = prepare_data.main(["--dataset", "coco", "vg", "--manual_dir", str(raw),
                          "--data_dir", str(tmp_path / "data")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.count("\n") == 0
  assert "instances_val2017.json" in err and "val2017/" in err  # coco's files: none there
  assert not os.path.exists(tmp_path / "data" / "dynrefer_vg")  # nothing built
  rc = prepare_data.main(["--dataset", "vg", "--manual_dir", str(raw), "--data_dir", "x"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "densecap_splits.json" in err and "region_descriptions" not in err
  assert prepare_data.main(["--dataset", "vg", "--manual_dir", str(tmp_path / "no"),
                            "--data_dir", "x"]) == 2
  with pytest.raises(SystemExit) as e:  # CLI misuse: argparse's exit 2
    prepare_data.main(["--dataset", "lvis", "--manual_dir", str(raw), "--data_dir", "x"])
  assert e.value.code == 2


def test_tfds_build_command_writes_the_same_dataset(tmp_path):
  """TFDS's own `build` command (tools/tfds_build.py runs it) with --imports finds the
  builders and writes the same records as prepare_data."""
  raw = str(tmp_path / "raw")
  write_coco_fixture(raw)
  ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
  assert prepare_data.main(["--dataset", "coco", "--manual_dir", raw, "--data_dir", ours]) == 0
  with pytest.raises(SystemExit) as e:  # absl's app.run exits when the command returns
    _tool("tfds_build").main(["dynrefer_coco", "--imports", "dynrefer_jax.data.builders",
                              "--manual_dir", raw, "--data_dir", theirs,
                              "--file_format", "array_record"])
  assert e.value.code in (0, None)
  a, b = builders.load("coco", ours), builders.load("coco", theirs)
  assert b.is_prepared() and b.info.metadata["splits"] == a.info.metadata["splits"]
  ra, rb = (sources.RegionSource(x, "val").read(np.arange(5)) for x in (a, b))
  assert ra.region_id.tolist() == rb.region_id.tolist() and list(ra.image) == list(rb.image)
