"""`python -m dynrefer_jax.demo`: the page in headless Chromium against `dynrefer_jax.predict`,
and the HTTP API's answers to bad input (the server keeps serving after each).

The browser test starts the real command on a free loopback port with a 2-step synthetic
checkpoint, uploads a synthetic image, draws two boxes with the mouse and checks that the
caption, confidence, tags, attributes, category and views on the page equal what
`predict.Runner.predict` returns for the same image file and boxes (in this process: an
independent load of the same checkpoint); then the same for manual t values. It also uploads a
text file and checks the message. Its screenshot goes to $DEMO_SCREENSHOT when set (the
README's docs/images/demo.png is made that way), else to the test's tmp dir.

Chromium: Debian's package at /usr/bin/chromium, driven by Playwright's Python package (.ci/run
installs both). Without them the browser test is skipped, except under CI=true where it fails.
"""

import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dynrefer_jax import predict
from dynrefer_jax.demo import server as demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DEMO_CHECKPOINT / DEMO_CONFIG run the browser test on another checkpoint (the main job's,
# for the README's screenshot) instead of a 2-step smoke one.
CONFIG = os.environ.get("DEMO_CONFIG") or os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


# ------------------------------------------------------------------ HTTP API, no model needed

class _StubRunner:
  """Stands in for predict.Runner where only the server's input handling is under test."""
  step, num_views = 3, 3
  task_ts = predict.TASK_TS  # Runner.task_ts of a config without eval.task_ts

  def __init__(self):
    self.config = ml_collections.ConfigDict(dict(
        model=dict(tag_threshold=0.5, fixed_ts=()),
        data=dict(name="synthetic", seed=0, image_size=64)))
    self.calls = []

  def predict(self, image, boxes, views="auto"):
    self.calls.append((image.shape, boxes, views))
    if boxes[0][0] == 1:  # a box starting at x=1 makes the "model" fail
      raise RuntimeError("simulated failure\nsecond line")
    return [{"index": i, "box": b, "caption": "c", "views": [0.0] * 3} for i, b in
            enumerate(boxes)]


@pytest.fixture(scope="module")
def stub_server():
  runner = _StubRunner()
  engine = demo.Engine(runner, checkpoint="stub", examples=demo.synthetic_examples(
      runner.config, count=1), limits=demo.Limits(max_upload_bytes=200_000, max_pixels=250_000))
  srv = demo.make_server(engine, 0)
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv.server_address[1], runner
  srv.shutdown()
  srv.server_close()


def _request(port, method, path, body=None, headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
  finally:
    conn.close()
  ctype = resp.getheader("Content-Type", "")
  return resp.status, (json.loads(data) if ctype.startswith("application/json") else data)


def _png(shape, flat=False) -> bytes:
  import io  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  pixels = np.full(shape, 90, np.uint8) if flat else (
      np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _upload(port, data, name="x.png"):
  return _request(port, "POST", "/api/image", data, {"X-Filename": name})


def _predict(port, req):
  body = req if isinstance(req, bytes) else json.dumps(req).encode()
  return _request(port, "POST", "/api/predict", body, {"Content-Type": "application/json"})


def test_page_and_info(stub_server):
  port, _ = stub_server
  status, page = _request(port, "GET", "/")
  assert status == 200 and b"<canvas id=\"stage\"" in page and b"/app.js" in page
  for path in ("/app.js", "/style.css"):
    assert _request(port, "GET", path)[0] == 200
  status, info = _request(port, "GET", "/api/info")
  assert status == 200 and info["num_views"] == 3 and info["step"] == 3
  assert info["task_ts"] == {k: list(v) for k, v in demo.TASK_TS.items()}
  (example,) = info["examples"]
  status, png = _request(port, "GET", f"/api/image/{example['id']}")
  shown = np.asarray(Image.open(__import__("io").BytesIO(png)))
  assert status == 200 and shown.shape == (example["height"], example["width"], 3)
  assert example["regions"] and all(len(r["box"]) == 4 for r in example["regions"])


def test_upload_round_trip_and_views(stub_server):
  port, runner = stub_server
  data = _png((30, 40, 3))
  status, res = _upload(port, data)
  assert status == 200 and (res["width"], res["height"]) == (40, 30)
  # The page shows exactly the pixels the model gets.
  status, png = _request(port, "GET", f"/api/image/{res['id']}")
  np.testing.assert_array_equal(np.asarray(Image.open(__import__("io").BytesIO(png))),
                                np.asarray(Image.open(__import__("io").BytesIO(data))))
  for views, want in [({"mode": "auto"}, "auto"), (None, "auto"),
                      ({"mode": "task", "task": "attributes"}, demo.TASK_TS["attributes"]),
                      ({"mode": "manual", "ts": [0, 0.25, 1]}, (0.0, 0.25, 1.0))]:
    status, out = _predict(port, {"image_id": res["id"], "boxes": [[2, 3, 20, 25]],
                                  "views": views})
    assert status == 200, out
    assert runner.calls[-1] == ((30, 40, 3), [[2.0, 3.0, 20.0, 25.0]], want)
    assert out["image_size"] == [40, 30] and out["views_used"] == (
        want if want == "auto" else list(want))


BAD_UPLOADS = [
    ("text file", b"hello, not an image\n", "notes.txt", 400, "'notes.txt' is not an image"),
    ("empty file", b"", "empty.png", 400, "'empty.png' is empty"),
    ("truncated png", _png((30, 40, 3))[:60], "cut.png", 400, "'cut.png' could not be read"),
    ("too many pixels", _png((400, 700, 3), flat=True), "big.png", 413,
     "'big.png' is too large: 700x400 pixels (at most 0.25 megapixels)"),
    ("too many bytes", b"\0" * 300_000, "huge.bin", 413, "the upload is too large: 0.3 MB"),
]


@pytest.mark.parametrize("name,data,filename,status,message", BAD_UPLOADS,
                         ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_are_readable_and_the_server_keeps_serving(stub_server, name, data,
                                                               filename, status, message):
  del name
  port, _ = stub_server
  got, res = _upload(port, data, filename)
  assert got == status and message in res["error"], res
  assert "\n" not in res["error"]
  assert _request(port, "GET", "/api/info")[0] == 200


BAD_PREDICTS = [
    ("no box", {"boxes": []}, 400, "no box: drag on the image to draw at least one box"),
    ("boxes missing", {"boxes": None}, 400, "no box"),
    ("box outside", {"boxes": [[0, 0, 41, 10]]}, 400,
     "box 1 (0, 0, 41, 10) lies outside the 40x30 image"),
    ("second box outside", {"boxes": [[0, 0, 5, 5], [-3, 0, 5, 5]]}, 400, "box 2 (-3, 0, 5, 5)"),
    ("degenerate", {"boxes": [[5, 5, 5, 9]]}, 400, "is degenerate: need x2 > x1 and y2 > y1"),
    ("three numbers", {"boxes": [[1, 2, 3]]}, 400, "expected 4 numbers"),
    ("words", {"boxes": [["a", 0, 3, 3]]}, 400, "expected 4 numbers"),
    ("too many", {"boxes": [[0, 0, 5, 5]] * 17}, 400, "17 boxes: at most 16"),
    ("no image", {"image_id": ""}, 400, "no image: upload one or pick an example first"),
    ("forgotten image", {"image_id": "0123abcd"}, 404, "no longer on the server"),
    ("views count", {"views": {"mode": "manual", "ts": [0, 0.5]}}, 400,
     "views: this model uses 3 views, got 2 t values"),
    ("views range", {"views": {"mode": "manual", "ts": [0, 0.5, 1.5]}}, 400,
     "every t must be a number in [0, 1]"),
    ("views blank", {"views": {"mode": "manual", "ts": [0, None, 0.5]}}, 400,
     "manual views need 3 numbers"),
    ("unknown task", {"views": {"mode": "task", "task": "poetry"}}, 400,
     "unknown task prior 'poetry': one of caption, attributes, category"),
    ("unknown mode", {"views": {"mode": "guess"}}, 400, "unknown views mode 'guess'"),
    ("model failure", {"boxes": [[1, 0, 5, 5]]}, 500,
     "internal error (RuntimeError: simulated failure); the server is still running"),
]


@pytest.mark.parametrize("name,change,status,message", BAD_PREDICTS,
                         ids=[b[0] for b in BAD_PREDICTS])
def test_bad_predict_requests_are_readable(stub_server, name, change, status, message):
  del name
  port, runner = stub_server
  _, res = _upload(port, _png((30, 40, 3)))
  req = {"image_id": res["id"], "boxes": [[2, 3, 20, 25]], "views": {"mode": "auto"}}
  req.update(change)
  calls = len(runner.calls)
  got, out = _predict(port, req)
  assert got == status and message in out["error"], out
  assert len(runner.calls) == calls + (status == 500)  # bad input never reaches the model
  got, out = _predict(port, {"image_id": res["id"], "boxes": [[2, 3, 20, 25]]})
  assert got == 200 and out["regions"][0]["box"] == [2.0, 3.0, 20.0, 25.0]


def test_malformed_requests(stub_server):
  port, _ = stub_server
  assert _predict(port, b"{not json")[1] == {"error": "the request is not valid JSON"}
  assert _predict(port, b"[1, 2]")[1] == {"error": "the request must be a JSON object"}
  status, out = _request(port, "GET", "/etc/passwd")
  assert status == 404 and out == {"error": "no such page: /etc/passwd"}
  assert _request(port, "GET", "/api/image/..%2Fsecret")[0] == 404
  assert _request(port, "POST", "/api/other", b"{}")[0] == 404
  assert _request(port, "GET", "/api/info")[0] == 200


def test_cli_errors_are_one_line_before_loading(capsys, monkeypatch):
  monkeypatch.setattr(demo.Engine, "load", classmethod(lambda *a, **k: pytest.fail("loaded")))
  for argv, message in [
      (["--checkpoint", "/nonexistent/run"], "no checkpoint in /nonexistent/run"),
      (["--config", "/nonexistent.py", "--checkpoint", "/tmp"], "config file not found"),
      (["--port", "http"], "argument --port: invalid int value: 'http'"),
      (["--frobnicate"], "unrecognized arguments: --frobnicate")]:
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


# ------------------------------------------------------------------ the browser, end to end

MANUAL_TS = (0.0, 0.2, 0.45)


def _browser_or_skip():
  try:
    from playwright.sync_api import sync_playwright  # pylint: disable=import-outside-toplevel
  except ImportError:
    sync_playwright = None
  if sync_playwright is None or not os.path.exists(CHROMIUM):
    why = f"needs Playwright's Python package and {CHROMIUM} (.ci/run installs them)"
    if os.environ.get("CI"):
      pytest.fail(why)
    pytest.skip(why)
  return sync_playwright


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
  """$DEMO_CHECKPOINT, else the session's shared 2-step smoke workdir when conftest offers
  one, else our own."""
  if os.environ.get("DEMO_CHECKPOINT"):
    return os.environ["DEMO_CHECKPOINT"]
  try:
    return str(request.getfixturevalue("smoke_workdir")[0])
  except pytest.FixtureLookupError:
    from dynrefer_jax import config_lib, train  # pylint: disable=import-outside-toplevel
    workdir = str(tmp_path_factory.mktemp("demo_run"))
    train.train(config_lib.load(CONFIG), workdir, progress=False)
    return workdir


class _DemoProcess:
  """`python -m dynrefer_jax.demo --port 0` in the background; .url once it serves."""

  def __init__(self, checkpoint, log_path):
    self.log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "dynrefer_jax.demo", "--config", CONFIG, "--checkpoint",
         checkpoint, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log,
        text=True)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [self.lines.put(l) for l in self.proc.stdout],
                     daemon=True).start()

  def wait_url(self, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      try:
        line = self.lines.get(timeout=1)
      except queue.Empty:
        if self.proc.poll() is not None:
          break
        continue
      if line.startswith("DynRefer demo: "):
        return line.split(": ", 1)[1].strip()
    self.log.flush()
    with open(self.log.name, encoding="utf-8") as f:
      tail = f.read()[-3000:]
    raise AssertionError(f"the demo did not start (exit {self.proc.poll()}):\n{tail}")

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self.log.close()


def _region_on_page(card) -> dict:
  def attrs(sel):
    return [(e.get_attribute("data-name"), float(e.get_attribute("data-score")))
            for e in card.locator(sel).all()]
  return {
      "caption": card.locator("[data-testid=caption]").text_content(),
      "caption_score": float(card.locator("[data-testid=caption-score]")
                             .get_attribute("data-score")),
      "tags": attrs("[data-testid=tag]"),
      "attributes": attrs("[data-testid=attribute]"),
      "category": card.locator("[data-testid=category]").text_content(),
      "category_score": float(card.locator("[data-testid=category-score]")
                              .get_attribute("data-score")),
      "views": [float(e.get_attribute("data-t")) for e in
                card.locator("[data-testid=view]").all()],
  }


def _assert_same(shown, want):
  assert shown["caption"] == want["caption"]
  assert shown["category"] == want["category"]["name"]
  assert [n for n, _ in shown["tags"]] == [t["name"] for t in want["tags"]]
  assert [n for n, _ in shown["attributes"]] == [a["name"] for a in want["attributes"]]
  np.testing.assert_allclose([s for _, s in shown["tags"]], [t["score"] for t in want["tags"]],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([s for _, s in shown["attributes"]],
                             [a["score"] for a in want["attributes"]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([shown["caption_score"], shown["category_score"]],
                             [want["caption_score"], want["category"]["score"]],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(shown["views"], want["views"], atol=1e-6)


def test_demo_in_chromium_matches_predict(checkpoint, tmp_path):
  sync_playwright = _browser_or_skip()
  from dynrefer_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  # A synthetic test scene that no example shows, larger than the model's input, on disk.
  image, _, object_boxes, _ = synthetic.render_image(0, "test", demo.NUM_EXAMPLES + 1, 128)
  png = tmp_path / "scene.png"
  Image.fromarray(image).save(png)
  notes = tmp_path / "notes.txt"
  notes.write_text("a shopping list, not an image\n")
  h, w = image.shape[:2]
  # Two boxes to draw: around the two largest objects, with a 2-pixel margin.
  largest = sorted(object_boxes, key=lambda b: -b[2] * b[3])[:2]
  want_boxes = [[max(0, x - 2), max(0, y - 2), min(w, x + bw + 2), min(h, y + bh + 2)]
                for x, y, bw, bh in largest]

  started = time.monotonic()
  proc = _DemoProcess(checkpoint, tmp_path / "demo.log")
  try:
    # The independent path, loaded and compiled here while the server does the same.
    runner = predict.Runner.load(CONFIG, checkpoint)
    for views in ("auto", MANUAL_TS):
      runner.predict(predict.load_image(str(png)), want_boxes, views)
    url = proc.wait_url(timeout=900)
    ready = time.monotonic() - started
    with sync_playwright() as p:
      ctx = p.chromium.launch_persistent_context(
          tempfile.mkdtemp(dir=tmp_path), executable_path=CHROMIUM, headless=True,
          args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
      try:
        page = ctx.new_page()
        page.set_default_timeout(180_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")

        # A text file: a readable message on the page; the server goes on serving.
        page.set_input_files("#file", str(notes))
        error = page.locator("[data-testid=error]")
        error.wait_for(state="visible")
        assert "'notes.txt' is not an image" in error.text_content()

        page.set_input_files("#file", str(png))
        page.wait_for_function("document.getElementById('stage').dataset.imageId")
        assert error.is_hidden()

        # Draw the boxes with the mouse, from image pixels to screen pixels.
        bb = page.locator("#stage").bounding_box()
        sx, sy = bb["width"] / w, bb["height"] / h
        for x1, y1, x2, y2 in want_boxes:
          page.mouse.move(bb["x"] + (x1 + 0.5) * sx, bb["y"] + (y1 + 0.5) * sy)
          page.mouse.down()
          page.mouse.move(bb["x"] + (x2 - 0.5) * sx, bb["y"] + (y2 - 0.5) * sy, steps=6)
          page.mouse.up()
        boxes = [json.loads(b.get_attribute("data-box"))
                 for b in page.locator("[data-testid=box]").all()]
        assert len(boxes) == 2
        np.testing.assert_allclose(boxes, want_boxes, atol=1)

        image_from_file = predict.load_image(str(png))
        for run, (views, setting) in enumerate([("auto", None), (MANUAL_TS, "manual")], 1):
          if setting == "manual":
            page.check("input[name=views][value=manual]")
            for i, t in enumerate(views):
              page.fill(f"[data-testid=t{i}]", str(t))
          t0 = time.monotonic()
          page.click("[data-testid=run]")
          page.wait_for_function(f"document.getElementById('results').dataset.runs === '{run}'"
                                 " || !document.getElementById('error').hidden")
          assert error.is_hidden(), error.text_content()
          predict_s = time.monotonic() - t0
          expected = runner.predict(image_from_file, boxes, views)
          cards = page.locator("[data-testid=region]").all()
          assert len(cards) == len(expected) == 2
          if setting is None:
            assert [json.loads("[" + c.locator("[data-testid=region-box]").text_content() + "]")
                    for c in cards] == boxes
            cards[0].hover()  # its context views are outlined on the image
            shot = os.environ.get("DEMO_SCREENSHOT") or str(tmp_path / "demo.png")
            page.screenshot(path=shot, full_page=True)
            print(f"\n[demo] screenshot: {shot}; server ready after {ready:.0f}s; "
                  f"first predict {predict_s:.1f}s")
          while page.locator(".more").count():  # long tag lists: "+N more" shows the rest
            page.locator(".more").first.click()
          tags = page.locator("[data-testid=tag]").all()
          assert len(tags) == sum(len(r["tags"]) for r in expected)
          assert all(t.is_visible() for t in tags)
          for card, want in zip(cards, expected):
            _assert_same(_region_on_page(card), want)

        # A synthetic scene with its true boxes, seen with the attributes task prior.
        page.locator("[data-testid=example]").nth(1).click()
        page.wait_for_function("document.getElementById('stage').dataset.imageId === 'example-2'")
        page.click("#scene-boxes")
        n = page.locator("[data-testid=box]").count()
        assert n >= 3
        page.check("input[name=views][value=task]")
        page.select_option("#task", "attributes")
        page.click("[data-testid=run]")
        page.wait_for_function("document.getElementById('results').dataset.runs === '3'"
                               " || !document.getElementById('error').hidden")
        assert error.is_hidden(), error.text_content()
        assert page.locator("[data-testid=region]").count() == n
        assert page.locator(".truth").count() == n  # each true box shows its true caption
        shown_ts = [float(v.get_attribute("data-t"))
                    for v in page.locator("[data-testid=view]").all()]
        np.testing.assert_allclose(shown_ts, list(demo.TASK_TS["attributes"]) * n, atol=1e-6)

        # No box: a readable message, then the page still works.
        page.click("#clear")
        page.click("[data-testid=run]")
        error.wait_for(state="visible")
        assert "no box" in error.text_content()
        assert not errors, errors
      finally:
        ctx.close()
    assert proc.proc.poll() is None, "the server stopped"
  finally:
    proc.stop()
