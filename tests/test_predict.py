"""`python -m dynrefer_jax.predict`: every bad input is one line and exit code 2 before anything
is loaded; end to end on a 2-step synthetic-world checkpoint (JSON schema, the annotated PNG,
fixed views through the library API)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dynrefer_jax import config_lib, functional, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("predict_inputs")
  rng = np.random.default_rng(0)
  image = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp / "photo.png")
  (tmp / "notes.txt").write_text("not an image")
  os.makedirs(tmp / "workdir" / "checkpoints")
  return {"tmp": tmp, "image": str(tmp / "photo.png"), "array": image,
          "text": str(tmp / "notes.txt"), "ckpt": str(tmp / "workdir")}


BAD = [
    ("missing image", {"image": "/nonexistent/photo.png"}, "image not found: /nonexistent/photo.png"),
    ("not an image", {"image": "TEXT"}, "not an image (unrecognised format)"),
    ("box outside", {"box": ["10,10,130,50"]}, "box 1 (10, 10, 130, 50) lies outside the 120x90 image"),
    ("second box outside", {"box": ["0,0,5,5", "-1,0,5,5"]}, "box 2 (-1, 0, 5, 5) lies outside"),
    ("degenerate", {"box": ["40,10,40,50"]}, "box 1 (40, 10, 40, 50) is degenerate"),
    ("inverted", {"box": ["50,10,40,50"]}, "is degenerate: need x2 > x1 and y2 > y1"),
    ("nan", {"box": ["nan,10,40,50"]}, "box 1 (nan, 10, 40, 50): coordinates must be finite"),
    ("inf", {"box": ["0,0,inf,5"]}, "coordinates must be finite"),
    ("three numbers", {"box": ["1,2,3"]}, "--box expects x1,y1,x2,y2 (4 numbers), got '1,2,3'"),
    ("words", {"box": ["a,b,c,d"]}, "--box expects x1,y1,x2,y2 (4 numbers)"),
    ("no box", {"box": []}, "no boxes given"),
    ("views count", {"views": "0,0.5"}, "this model uses 3 views, got 2 t values"),
    ("views range", {"views": "0,0.5,1.5"}, "every t must be a number in [0, 1]"),
    ("views nan", {"views": "0,nan,0.5"}, "every t must be a number in [0, 1]"),
    ("views text", {"views": "wide"}, "--views: 'wide' is not a task prior (one of caption, "
     "attributes, category), 'auto' or 3 comma-separated t values in [0, 1]"),
    ("views words", {"views": "0,a,1"}, "--views expects 'auto' or 3 comma-separated t values"),
    ("no checkpoint", {"checkpoint": "/nonexistent/run"}, "no checkpoint in /nonexistent/run"),
    ("bad config", {"config": "/nonexistent/config.py"}, "config file not found"),
]


def _argv(files, image=None, box=None, views="auto", checkpoint=None, config=CONFIG,
          out=None):
  image = files["text"] if image == "TEXT" else (image or files["image"])
  argv = ["--config", config, "--checkpoint", checkpoint or files["ckpt"], "--image", image,
          "--views", views, "--out", out or str(files["tmp"] / "out")]
  for b in (["10,10,60,50"] if box is None else box):
    argv += ["--box", b]
  return argv


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(files, capsys, monkeypatch, name, change, message):
  del name
  # Validation happens before loading: a load attempt would fail this test.
  monkeypatch.setattr(predict.Runner, "load", classmethod(lambda *a, **k: pytest.fail("loaded")))
  assert predict.main(_argv(files, **change)) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
  assert message in captured.err, captured.err
  assert not os.path.exists(files["tmp"] / "out")


def test_bad_input_from_the_command_line_has_no_traceback(files):
  proc = subprocess.run([sys.executable, "-m", "dynrefer_jax.predict"]
                        + _argv(files, box=["5,5,500,20"]),
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: box 1 (5, 5, 500, 20) lies outside the 120x90 image (x in [0, 120], y in [0, 90])"]


def test_library_validation():
  hw = (90, 120)
  np.testing.assert_array_equal(predict.validate_boxes([(0, 0, 120, 90), [1.5, 2, 3, 4]], hw),
                                np.float32([[0, 0, 120, 90], [1.5, 2, 3, 4]]))
  with pytest.raises(predict.PredictError, match=r"box 1 \(0, 0, 121, 90\) lies outside"):
    predict.validate_boxes([(0, 0, 121, 90)], hw)
  with pytest.raises(predict.PredictError, match="expected 4 numbers"):
    predict.validate_boxes([(0, 0, 1)], hw)
  assert predict.parse_views("auto", 3) == "auto"
  assert predict.parse_views("0,0.3,1", 3) == (0.0, 0.3, 1.0)
  assert predict.parse_views([0, 0.2, 0.4], 3) == (0.0, 0.2, 0.4)
  # Task priors: the presets, or config.eval.task_ts (cut to num_views, each checked).
  config = config_lib.load(CONFIG)
  tasks = predict.task_priors(config)
  assert tasks == {"caption": (0.0, 0.4, 0.5), "attributes": (0.0, 0.1, 0.2),
                   "category": (0.0, 0.1, 0.5)}
  assert predict.parse_views("attributes", 3, tasks) == (0.0, 0.1, 0.2)
  config.eval.task_ts = {"size": [0, 0.6, 0.9, 1.0]}
  assert predict.task_priors(config) == {"size": (0.0, 0.6, 0.9)}
  config.eval.task_ts = {"size": [0, 1.5, 0.9]}
  with pytest.raises(predict.PredictError, match=r"config.eval.task_ts.size: every t must be"):
    predict.task_priors(config)
  # Views by hand (SPEC §2): box(t) = b + t·(I − b), truncated; image 120 wide, 90 high.
  assert predict.view_boxes_in_image(np.array([10, 20, 50, 40.5]), (90, 120), [0, 0.5, 1]) == [
      [10, 20, 50, 40], [5, 10, 85, 65], [0, 0, 120, 90]]
  # Images are never shrunk: one window of data.window_size (64 here) when every image of the
  # batch fits in it, one of the next power of two up to 1024 (hashed from hash pixels when
  # wider than 256), else windows at five levels.
  from dynrefer_jax.views import windows  # pylint: disable=import-outside-toplevel
  assert predict.batch_layout(config, [(60, 64), (64, 10)]) == windows.Layout(64, 1, False)
  assert predict.batch_layout(config, [(60, 64), (90, 120)]) == windows.Layout(128, 1, False)
  assert predict.batch_layout(config, [(600, 257)]) == windows.Layout(1024, 1, True)
  assert predict.batch_layout(config, [(60, 64), (1025, 120)]) == windows.Layout(
      windows.CONTEXT_SIDE, windows.MAX_LEVELS, True)


@pytest.fixture(scope="module")
def trained(smoke_workdir):
  return str(smoke_workdir[0])   # CONFIG trained for its 2 smoke steps (tests/conftest.py)


def test_end_to_end_cli_and_library(files, trained, capsys):
  out = str(files["tmp"] / "e2e")
  argv = _argv(files, box=["10,10,60,50", "0,0,120,90"], checkpoint=trained, out=out)
  assert predict.main(argv) == 0
  printed = json.loads(capsys.readouterr().out)
  saved = json.loads(open(os.path.join(out, "photo.json"), encoding="utf-8").read())
  assert printed == saved
  assert saved["image_size"] == [120, 90] and saved["checkpoint_step"] == 2
  regions = saved["regions"]
  assert [r["box"] for r in regions] == [[10, 10, 60, 50], [0, 0, 120, 90]]
  for i, r in enumerate(regions):
    assert r["index"] == i
    assert isinstance(r["caption"], str) and 0 < r["caption_score"] <= 1
    assert all(t["score"] > 0.5 for t in r["tags"])  # the smoke config's tag threshold
    assert [t["score"] for t in r["tags"]] == sorted((t["score"] for t in r["tags"]), reverse=True)
    assert len(r["attributes"]) == 5 and all(0 <= a["score"] <= 1 for a in r["attributes"])
    assert set(r["category"]) == {"name", "score"}
    assert len(r["views"]) == 3 and r["views"][0] == 0.0
    assert all(t in [k / 10 for k in range(11)] for t in r["views"])
    assert r["view_boxes"][0] == [int(v) for v in r["box"]]
    assert r["view_boxes"] == predict.view_boxes_in_image(np.array(r["box"]), (90, 120),
                                                          r["views"])
  png = Image.open(os.path.join(out, "photo.png"))
  assert png.size[0] >= 120 and png.size[1] > 90 + 2 * 160  # the image, then one row per region
  np.testing.assert_array_equal(np.asarray(png.convert("RGB"))[60:85, 70:115],
                                files["array"][60:85, 70:115])  # untouched outside the boxes

  runner = predict.Runner.load(CONFIG, trained, batch_size=2)
  fixed = runner.predict(files["array"], [(10, 10, 60, 50)] * 3, views=[0, 0.3, 1.0])
  assert len(fixed) == 3 and all(r["views"] == [0.0, 0.3, 1.0] for r in fixed)
  assert fixed[2]["view_boxes"][2] == [0, 0, 120, 90]
  by_task = runner.predict(files["array"], [(10, 10, 60, 50)], views="attributes")
  assert by_task[0]["views"] == [0.0, 0.1, 0.2]
  # Several images share batches (batch_size 2: rows of images 1 and 2 in one call, image 3's
  # second box padded) and each image gets what it gets alone.
  images = [files["array"], np.ascontiguousarray(files["array"][::-1]),
            np.ascontiguousarray(files["array"][:, ::-1])]
  boxes = [[(10, 10, 60, 50)], [(0, 0, 120, 90), (5, 5, 50, 80), (30, 20, 110, 70)],
           [(20, 30, 70, 80), (1, 2, 30, 40)]]
  many = list(runner.predict_many(zip(images, boxes), views=[0, 0.3, 1.0]))
  assert len(many) == 3
  for image, bxs, got in zip(images, boxes, many):
    alone = runner.predict(image, bxs, views=[0, 0.3, 1.0])
    assert [r["index"] for r in got] == list(range(len(bxs)))
    assert [r["caption"] for r in got] == [r["caption"] for r in alone]
    assert [r["box"] for r in got] == [r["box"] for r in alone]
    np.testing.assert_allclose([r["caption_score"] for r in got],
                               [r["caption_score"] for r in alone], rtol=1e-5)
    np.testing.assert_allclose([[a["score"] for a in r["attributes"]] for r in got],
                               [[a["score"] for a in r["attributes"]] for r in alone],
                               rtol=1e-5, atol=1e-7)
  # The runner holds its layer stacks stacked (the forward slices them, no copy per call), and
  # predicts what the same weights in the per-layer layout predict.
  stacked = [p for p in functional.flatten(runner.params) if f"/{functional.STACKED}/" in p]
  assert runner.groups and stacked
  assert {p.split(f"/{functional.STACKED}/")[0] for p in stacked} == {g for g, _ in runner.groups}
  per_layer = predict.Runner(runner.config, runner.graphdef,
                             functional.unstack_layers(runner.params, runner.groups),
                             runner.vocab, batch_size=2)
  again = per_layer.predict(files["array"], [(10, 10, 60, 50)] * 3, views=[0, 0.3, 1.0])
  assert [r["caption"] for r in again] == [r["caption"] for r in fixed]
  for a, b in zip(again, fixed):
    np.testing.assert_allclose(a["caption_score"], b["caption_score"], rtol=1e-6)
    np.testing.assert_allclose([t["score"] for t in a["attributes"]],
                               [t["score"] for t in b["attributes"]], rtol=1e-6, atol=1e-7)
  # The same box three times (two batches, one padded) gives the same answer each time.
  assert fixed[0]["caption"] == fixed[1]["caption"] == fixed[2]["caption"]
  np.testing.assert_allclose([r["caption_score"] for r in fixed], fixed[0]["caption_score"],
                             rtol=1e-5)
  with pytest.raises(predict.PredictError, match="lies outside"):
    runner.predict(files["array"], [(0, 0, 500, 5)])


def test_images_larger_than_every_window(files, trained, monkeypatch):
  """An image larger than the windows (CONTEXT_SIDE shrunk to 64 px here, for speed) is cut into
  windows at five levels with hash pixels; a region whose views all lie in the full-resolution
  window, and its pHash views, come out as with the whole image in one window (both exact)."""
  from dynrefer_jax.views import windows  # pylint: disable=import-outside-toplevel
  runner = predict.Runner.load(CONFIG, trained, batch_size=2)
  box, ts = (10, 10, 40, 35), [0.0, 0.1, 0.2]  # box(0.2) = (8, 8, 56, 46): inside 60 px
  whole = [runner.predict(files["array"], [box], views=v)[0] for v in (ts, "auto")]
  monkeypatch.setattr(windows, "CONTEXT_SIDE", 64)
  assert predict.batch_layout(runner.config, [(90, 120)]) == windows.Layout(64, 5, True)
  cut = [runner.predict(files["array"], [box, (0, 0, 120, 90)], views=v) for v in (ts, "auto")]
  for alone, (got, wide) in zip(whole, cut):
    assert got["views"] == alone["views"] and got["caption"] == alone["caption"]
    np.testing.assert_allclose(got["caption_score"], alone["caption_score"], rtol=1e-4)
    np.testing.assert_allclose([a["score"] for a in got["attributes"]],
                               [a["score"] for a in alone["attributes"]], rtol=1e-4, atol=1e-6)
    assert wide["view_boxes"][-1] == [0, 0, 120, 90] or wide["views"][-1] < 1
    assert isinstance(wide["caption"], str)


@pytest.mark.slow
def test_12000_px_image_with_a_50_px_box(files, trained, tmp_path):
  """Issue 21's case, as a user runs it: `predict --image` on a 12000 x 12000 PNG with a 50 x 50
  box exits 0 with a caption, the box's t = 0 view at full resolution, under 8 GiB of peak host
  memory (the process's own, from wait4; BENCHMARKS.md has the main job's checkpoint's figure)."""
  side, (x, y) = 12000, (6007, 5003)
  big = Image.new("RGB", (side, side), (96, 120, 150))
  big.paste(Image.fromarray(files["array"]), (x - 30, y - 20))  # 120 x 90 px of detail
  path = str(tmp_path / "big.png")
  big.save(path, compress_level=1)
  del big
  box = [x, y, x + 50, y + 50]
  out = str(tmp_path / "out")
  argv = [sys.executable, "-m", "dynrefer_jax.predict"] + _argv(
      files, image=path, box=[",".join(map(str, box))], checkpoint=trained, out=out)
  with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
    proc = subprocess.Popen(argv, stdout=so, stderr=se, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-2000:]
  doc = json.loads(open(os.path.join(out, "big.json"), encoding="utf-8").read())
  assert doc["image_size"] == [side, side]
  (region,) = doc["regions"]
  assert region["box"] == box and region["view_boxes"][0] == box
  assert isinstance(region["caption"], str) and region["caption"]
  assert usage.ru_maxrss * 1024 < 8 * 2**30, usage.ru_maxrss  # KiB on Linux


def _regions_argv(files, regions, checkpoint=None, out=None, extra=()):
  return ["--config", CONFIG, "--checkpoint", checkpoint or files["ckpt"], "--regions", regions,
          "--out", out or str(files["tmp"] / "out"), *extra]


def _write(files, name, content):
  path = files["tmp"] / name
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  return str(path)


REGIONS_BAD = [
    ("missing file", None, "regions file not found"),
    ("not json", "[{", "is not readable JSON"),
    ("not a list", {"image": "photo.png"}, 'expected a JSON list of {"image": path'),
    ("empty list", [], "(non-empty)"),
    ("no boxes key", [{"image": "photo.png"}], "entry 1: expected a JSON list"),
    ("bad box in entry 2", [{"image": "photo.png", "boxes": [[0, 0, 5, 5]]},
                            {"image": "sub/photo.png", "boxes": [[0, 0, 5, 5], [0, 0, 500, 5]]}],
     "entry 2 (sub/photo.png): box 2 (0, 0, 500, 5) lies outside the 120x90 image"),
    ("missing image", [{"image": "nope.png", "boxes": [[0, 0, 5, 5]]}],
     "entry 1 (nope.png): image not found"),
    ("same image twice", [{"image": "photo.png", "boxes": [[0, 0, 5, 5]]},
                          {"image": "./photo.png", "boxes": [[1, 1, 5, 5]]}],
     "entry 2: ./photo.png is also entry 1"),
    ("no boxes", [{"image": "photo.png", "boxes": []}], "entry 1 (photo.png): no boxes given"),
]


@pytest.mark.parametrize("name,content,message", REGIONS_BAD, ids=[b[0] for b in REGIONS_BAD])
def test_bad_regions_file_is_one_line_and_exit_2(files, capsys, monkeypatch, name, content,
                                                 message):
  os.makedirs(files["tmp"] / "sub", exist_ok=True)
  Image.fromarray(files["array"]).save(files["tmp"] / "sub" / "photo.png")
  monkeypatch.setattr(predict.Runner, "load", classmethod(lambda *a, **k: pytest.fail("loaded")))
  path = (str(files["tmp"] / "absent.json") if content is None
          else _write(files, name.replace(" ", "_") + ".json", content))
  assert predict.main(_regions_argv(files, path)) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.count("\n") == 1, captured.err
  assert captured.err.startswith("error: ") and message in captured.err, captured.err
  assert not os.path.exists(files["tmp"] / "out")


@pytest.mark.parametrize("argv,message", [
    (["--image", "IMAGE", "--box", "0,0,5,5", "--regions", "R"], "not both"),
    (["--regions", "R", "--box", "0,0,5,5"], "--box goes with --image"),
    ([], "--image (with --box) or --regions FILE is required"),
])
def test_image_or_regions(files, capsys, monkeypatch, argv, message):
  monkeypatch.setattr(predict.Runner, "load", classmethod(lambda *a, **k: pytest.fail("loaded")))
  argv = [files["image"] if a == "IMAGE" else a for a in argv]
  assert predict.main(["--config", CONFIG, "--checkpoint", files["ckpt"], *argv]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err


def test_regions_file_end_to_end(files, trained, capsys):
  """Two images with the same file name (outputs photo and photo-2), paths relative to the
  regions file; predictions.jsonl holds each image's JSON; the regions are what the library
  predicts for the same image and boxes."""
  os.makedirs(files["tmp"] / "sub", exist_ok=True)
  other = np.ascontiguousarray(files["array"][::-1])
  Image.fromarray(other).save(files["tmp"] / "sub" / "photo.png")
  regions = _write(files, "regions.json", [
      {"image": "photo.png", "boxes": [[10, 10, 60, 50]]},
      {"image": "sub/photo.png", "boxes": [[0, 0, 120, 90], [20, 30, 70, 80]]}])
  out = str(files["tmp"] / "many")
  assert predict.main(_regions_argv(files, regions, checkpoint=trained, out=out)) == 0
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 3 and printed[-1].startswith("2 images, 3 regions")
  lines = [json.loads(l) for l in open(os.path.join(out, "predictions.jsonl"), encoding="utf-8")]
  assert [d["image"] for d in lines] == [files["image"], str(files["tmp"] / "sub" / "photo.png")]
  for stem, doc in zip(("photo", "photo-2"), lines):
    assert json.loads(open(os.path.join(out, stem + ".json"), encoding="utf-8").read()) == doc
    assert os.path.exists(os.path.join(out, stem + ".png"))
  assert sorted(os.listdir(out)) == ["photo-2.json", "photo-2.png", "photo.json", "photo.png",
                                     "predictions.jsonl"]  # nothing half-written left
  runner = predict.Runner.load(CONFIG, trained)
  want = runner.predict(other, [(0, 0, 120, 90), (20, 30, 70, 80)])
  got = lines[1]["regions"]
  assert [r["caption"] for r in got] == [r["caption"] for r in want]
  assert [r["views"] for r in got] == [r["views"] for r in want]
  assert lines[1]["image_size"] == [120, 90] and [r["box"] for r in got] == [
      [0, 0, 120, 90], [20, 30, 70, 80]]
