"""The demo's model side (`Engine`) and its HTTP API (standard library only).

API (JSON unless said otherwise; every failure is `{"error": "<one readable line>"}` with a 4xx
status, and the server goes on serving):

  GET  /                      the page (static/index.html, app.js, style.css)
  GET  /api/info              checkpoint, step, number of views, view presets, limits, examples
  POST /api/image             body: the raw bytes of an image file → {id, width, height}
  GET  /api/image/<id>        the decoded image as the model sees it (PNG; JPEG when large)
  POST /api/predict           {image_id, boxes: [[x1, y1, x2, y2], ...] in image pixels,
                               views: {"mode": "auto"} | {"mode": "task", "task": name}
                                      | {"mode": "manual", "ts": [t, ...]}}
                              → {regions: [predict.Runner.predict's dicts], image_size: [W, H],
                                 views_used, seconds}
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import io
import json
import mimetypes
import os
import re
import secrets
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

from dynrefer_jax import predict

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_CONFIG = "configs/synthetic.py"
DEFAULT_CHECKPOINT = "workdirs/synthetic"

# Task priors: predict.TASK_TS (SPEC §8's trends; config.eval.task_ts replaces them).
TASK_TS = predict.TASK_TS
NUM_EXAMPLES = 6
MAX_STORED_IMAGES = 8
MAX_STORED_BYTES = 2 * 2**30  # and at most this much of them (the newest is always kept)


class DemoError(ValueError):
  """Bad input from the page; the message is shown to the user as it is."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class Limits:
  """What an upload may be. The model reads any image up to data/images.MAX_PIXELS (12000 ×
  12000) at full resolution, so the defaults admit that; a smaller limit is a server choice."""
  max_upload_bytes: int = 100 * 2**20
  max_pixels: int = 144_000_000
  max_boxes: int = 16


def _shown_path(path: str) -> str:
  """Relative to the working directory when inside it (the page shows it in its header)."""
  if not path:
    return path
  rel = os.path.relpath(os.path.abspath(path))
  return path if rel.startswith("..") else rel


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f} MB"


# ------------------------------------------------------------------------------ images

def decode_image(data: bytes, name: str, limits: Limits) -> np.ndarray:
  """uint8[H, W, 3] RGB exactly as `predict.load_image` reads the same file; DemoError with a
  readable message for an empty file, a non-image, a corrupt or a too large one."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  from dynrefer_jax.data import images  # pylint: disable=import-outside-toplevel
  label = f"'{name}'" if name else "the file"
  if not data:
    raise DemoError(f"{label} is empty")
  if len(data) > limits.max_upload_bytes:
    raise DemoError(f"{label} is too large: {_mb(len(data))} (at most "
                    f"{_mb(limits.max_upload_bytes)})", 413)
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      if w * h > limits.max_pixels:
        raise DemoError(f"{label} is too large: {w}x{h} pixels (at most "
                        f"{limits.max_pixels / 1e6:g} megapixels)", 413)
      im.load()
      arr = np.asarray(images.upright_rgb8(im), np.uint8)
  except DemoError:
    raise
  except UnidentifiedImageError:
    raise DemoError(f"{label} is not an image (PNG, JPEG, WebP, GIF, BMP or TIFF are "
                    "accepted)") from None
  except Image.DecompressionBombError:
    raise DemoError(f"{label} is too large (more pixels than PIL will decode safely)",
                    413) from None
  except (OSError, ValueError, SyntaxError) as e:
    first = (str(e).splitlines() or ["unreadable"])[0]
    raise DemoError(f"{label} could not be read as an image: {first}") from None
  except MemoryError:
    raise DemoError(f"{label} needs more memory to decode than the server has", 413) from None
  if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
    raise DemoError(f"{label} is an empty image")
  return arr


def encode_for_display(image: np.ndarray) -> tuple[bytes, str]:
  """PNG (lossless: the page crops the views from it); JPEG above 4 MP, where PNG is slow."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  if image.shape[0] * image.shape[1] > 4_000_000:
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue(), "image/png"


def synthetic_examples(config, count: int = NUM_EXAMPLES) -> list[dict]:
  """Scenes of the synthetic world's test split, rendered in memory (same seed and size as the
  config's data when it is the synthetic world), with each object's box and true caption."""
  from dynrefer_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  d = config.get("data", {})
  is_synthetic = d.get("name") == "synthetic"
  seed = int(d.get("seed", 0)) if is_synthetic else 0
  size = int(d.get("image_size", 128)) if is_synthetic else 128
  out = []
  for i in range(count):
    image, objects, boxes, _ = synthetic.render_image(seed, "test", i, size)
    regions = [{"box": [x, y, x + w, y + h], "caption": synthetic.describe(o, objects)[0]}
               for o, (x, y, w, h) in zip(objects, boxes)]
    out.append({"id": f"example-{i + 1}", "name": f"synthetic test scene {i + 1}",
                "image": image, "regions": regions})
  return out


# ------------------------------------------------------------------------------ the model

class _AnyViewsPredictor:
  """`inference.Predictor` with the t values as an argument of the compiled function rather
  than constants: one compile serves every task prior and every manual setting. The caption
  stage is the image-prior predictor's own (same shapes, so compiled once for both)."""

  def __init__(self, runner: predict.Runner):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from dynrefer_jax import functional, inference  # pylint: disable=import-outside-toplevel
    base = runner.predictor("auto")
    self._inner = inference.Predictor(runner.graphdef, runner.config, runner.vocab,
                                      groups=runner.groups)
    self._inner._caption = base._caption  # pylint: disable=protected-access
    self.tag_threshold = self._inner.tag_threshold
    graphdef, groups = runner.graphdef, runner.groups
    t2a = np.asarray(runner.vocab.template_to_attribute)

    def heads(params, batch, ts):
      out = functional.merge(graphdef, params, groups).predict_heads(batch, ts, t2a)
      out["ts"] = ts
      return out

    jitted = jax.jit(heads)
    self.ts: tuple[float, ...] = ()

    def bound(params, batch):
      ts = jnp.broadcast_to(jnp.asarray(self.ts, jnp.float32),
                            (batch["box"].shape[0], len(self.ts)))
      return jitted(params, batch, ts)

    self._inner._heads = bound  # pylint: disable=protected-access

  def __call__(self, params, batch):
    return self._inner(params, batch)


class _DemoRunner(predict.Runner):
  """Runner whose fixed-t predictions share one compiled function (see _AnyViewsPredictor);
  the image prior ('auto') is predict.Runner's own path, unchanged."""

  _any_views: _AnyViewsPredictor | None = None

  def predictor(self, views="auto"):
    if views == "auto":
      return super().predictor("auto")
    if self._any_views is None:
      self._any_views = _AnyViewsPredictor(self)
    self._any_views.ts = tuple(float(t) for t in views)
    return self._any_views


class Engine:
  """The loaded model, the uploaded images and the examples; predictions one at a time."""

  def __init__(self, runner: predict.Runner, *, checkpoint: str = "", limits: Limits | None = None,
               examples: Sequence[dict] = ()):
    self.runner = runner
    self.checkpoint = checkpoint
    self.limits = limits or Limits()
    self.num_views = runner.num_views
    self.task_ts = runner.task_ts
    self.fixed_by_config = tuple(runner.config.model.get("fixed_ts", ()) or ())
    self.examples = {e["id"]: e for e in examples}
    self._images: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self._images_lock = threading.Lock()
    self._model_lock = threading.Lock()

  @classmethod
  def load(cls, config_spec_or_config, checkpoint: str, *, overrides: Sequence[str] = (),
           batch_size: int = 8, limits: Limits | None = None) -> "Engine":
    runner = _DemoRunner.load(config_spec_or_config, checkpoint, batch_size=batch_size,
                              overrides=overrides)
    return cls(runner, checkpoint=checkpoint, limits=limits,
               examples=synthetic_examples(runner.config))

  # images ------------------------------------------------------------------------------
  def add_image(self, data: bytes, name: str = "") -> tuple[str, np.ndarray]:
    image = decode_image(data, name, self.limits)
    image_id = secrets.token_hex(8)
    with self._images_lock:
      self._images[image_id] = image
      while len(self._images) > MAX_STORED_IMAGES or (
          len(self._images) > 1 and sum(a.nbytes for a in self._images.values()) >
          MAX_STORED_BYTES):
        self._images.popitem(last=False)
    return image_id, image

  def image(self, image_id: str) -> np.ndarray:
    if image_id in self.examples:
      return self.examples[image_id]["image"]
    with self._images_lock:
      if image_id in self._images:
        self._images.move_to_end(image_id)
        return self._images[image_id]
    raise DemoError("that image is no longer on the server (it keeps the last "
                    f"{MAX_STORED_IMAGES} uploads): upload it again", 404)

  # views -------------------------------------------------------------------------------
  def resolve_views(self, spec: Any) -> str | tuple[float, ...]:
    """'auto' or a tuple of t from the page's {"mode": ...} object."""
    if self.fixed_by_config:
      return "auto"  # the model was trained with fixed t; the predictor uses them regardless
    if spec is None:
      return "auto"
    if not isinstance(spec, dict):
      raise DemoError("views must be an object with a 'mode': auto, task or manual")
    mode = spec.get("mode", "auto")
    if mode == "auto":
      return "auto"
    if mode == "task":
      task = spec.get("task")
      if task not in self.task_ts:
        raise DemoError(f"unknown task prior {task!r}: one of {', '.join(self.task_ts)}")
      return self.task_ts[task]
    if mode == "manual":
      ts = spec.get("ts")
      if not isinstance(ts, list):
        raise DemoError(f"manual views need {self.num_views} t values in [0, 1]")
      try:
        values = [float(t) for t in ts]
      except (TypeError, ValueError):
        raise DemoError(f"manual views need {self.num_views} numbers t in [0, 1], got "
                        f"{', '.join(map(str, ts))}") from None
      try:
        return predict.parse_views(values, self.num_views)
      except predict.PredictError as e:
        raise DemoError(str(e).replace("--views: ", "views: ")) from None
    raise DemoError(f"unknown views mode {mode!r}: auto, task or manual")

  # predictions -------------------------------------------------------------------------
  def check_boxes(self, boxes: Any, image: np.ndarray) -> list[list[float]]:
    if not isinstance(boxes, list) or not boxes:
      raise DemoError("no box: drag on the image to draw at least one box")
    if len(boxes) > self.limits.max_boxes:
      raise DemoError(f"{len(boxes)} boxes: at most {self.limits.max_boxes} at a time")
    try:
      checked = predict.validate_boxes(boxes, image.shape[:2])
    except predict.PredictError as e:
      raise DemoError(str(e)) from None
    return checked.tolist()

  def predict(self, image_id: str, boxes: Any, views: Any = None) -> dict:
    image = self.image(str(image_id))
    checked = self.check_boxes(boxes, image)
    resolved = self.resolve_views(views)
    start = time.perf_counter()
    with self._model_lock:
      regions = self.runner.predict(image, checked, resolved)
    return {"regions": regions, "image_size": [int(image.shape[1]), int(image.shape[0])],
            "views_used": resolved if resolved == "auto" else list(resolved),
            "seconds": round(time.perf_counter() - start, 3)}

  def warm_up(self) -> float:
    """Compiles both predict paths (image prior and fixed t) so that no user waits for it, for
    images that fit in the model's window and for larger ones (their own layout of windows:
    predict.batch_layout)."""
    start = time.perf_counter()
    image = next(iter(self.examples.values()))["image"] if self.examples else np.zeros(
        (64, 64, 3), np.uint8)
    from dynrefer_jax.views import windows  # pylint: disable=import-outside-toplevel
    large = max(int(self.runner.config.data.window_size), windows.CONTEXT_SIDE) + 1
    for img in (image, np.zeros((large, large, 3), np.uint8)):
      h, w = img.shape[:2]
      box = [[0, 0, max(1, w // 2), max(1, h // 2)]]
      with self._model_lock:
        self.runner.predict(img, box, "auto")
        if not self.fixed_by_config:
          self.runner.predict(img, box, next(iter(self.task_ts.values())))
    return time.perf_counter() - start

  def info(self) -> dict:
    return {
        "checkpoint": _shown_path(self.checkpoint), "step": self.runner.step,
        "num_views": self.num_views,
        "task_ts": {k: list(v) for k, v in self.task_ts.items()},
        "fixed_by_config": list(self.fixed_by_config),
        "tag_threshold": float(self.runner.config.model.tag_threshold),
        "limits": dataclasses.asdict(self.limits),
        "examples": [{"id": e["id"], "name": e["name"], "width": int(e["image"].shape[1]),
                      "height": int(e["image"].shape[0]), "regions": e["regions"]}
                     for e in self.examples.values()],
    }


# ------------------------------------------------------------------------------ HTTP

_STATIC_FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js",
                 "/style.css": "style.css"}
_IMAGE_PATH = re.compile(r"^/api/image/([A-Za-z0-9-]{1,64})$")
_MAX_JSON_BYTES = 1 << 20


class Handler(http.server.BaseHTTPRequestHandler):
  """Every request ends in a response; an unexpected failure is a 500 with a one-line message
  (and a traceback on the server's stderr), never a dead server."""

  engine: Engine  # set by make_server
  server_version = "dynrefer-demo"
  protocol_version = "HTTP/1.1"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args  # one line per request is noise; errors are logged in _fail

  def _send(self, status: int, body: bytes, content_type: str, *, cache: bool = False):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
    self.send_header("X-Content-Type-Options", "nosniff")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj: Any):
    self._send(status, json.dumps(obj).encode(), "application/json")

  def _fail(self, e: Exception):
    if self.command == "POST":
      self.close_connection = True  # the body may be unread: it must not parse as a request
    if isinstance(e, DemoError):
      self._json(e.status, {"error": str(e)})
      return
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    first = (str(e).splitlines() or [""])[0][:300]
    self._json(500, {"error": f"internal error ({type(e).__name__}: {first}); the server "
                              "is still running"})

  def _body(self, limit: int) -> bytes:
    try:
      length = int(self.headers.get("Content-Length", ""))
    except ValueError:
      self.close_connection = True
      raise DemoError("the request has no Content-Length", 411) from None
    if length > limit:
      # Unread bytes would reset the connection before the browser reads our answer: drain a
      # reasonable amount, refuse beyond it.
      self.close_connection = True
      if length <= 16 * limit:
        remaining = length
        while remaining > 0:
          chunk = self.rfile.read(min(remaining, 1 << 20))
          if not chunk:
            break
          remaining -= len(chunk)
      raise DemoError(f"the upload is too large: {_mb(length)} (at most {_mb(limit)})", 413)
    return self.rfile.read(length) if length > 0 else b""

  def do_HEAD(self):  # noqa: N802
    self.do_GET()

  def do_GET(self):  # noqa: N802
    try:
      path = self.path.split("?", 1)[0]
      if path in _STATIC_FILES:
        name = _STATIC_FILES[path]
        with open(os.path.join(STATIC, name), "rb") as f:
          body = f.read()
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send(200, body, ctype + ("; charset=utf-8" if ctype.startswith("text/") or
                                       ctype.endswith("javascript") else ""))
      elif path == "/api/info":
        self._json(200, self.engine.info())
      elif path == "/favicon.ico":
        self._send(204, b"", "image/x-icon", cache=True)
      elif (m := _IMAGE_PATH.match(path)):
        body, ctype = encode_for_display(self.engine.image(m.group(1)))
        self._send(200, body, ctype, cache=True)
      else:
        raise DemoError(f"no such page: {path}", 404)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)

  def do_POST(self):  # noqa: N802
    try:
      path = self.path.split("?", 1)[0]
      if path == "/api/image":
        data = self._body(self.engine.limits.max_upload_bytes)
        from urllib.parse import unquote  # pylint: disable=import-outside-toplevel
        name = unquote(self.headers.get("X-Filename", ""))[:200]
        image_id, image = self.engine.add_image(data, name)
        self._json(200, {"id": image_id, "width": int(image.shape[1]),
                         "height": int(image.shape[0])})
      elif path == "/api/predict":
        raw = self._body(_MAX_JSON_BYTES)
        try:
          req = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
          raise DemoError("the request is not valid JSON") from None
        if not isinstance(req, dict):
          raise DemoError("the request must be a JSON object")
        if not req.get("image_id"):
          raise DemoError("no image: upload one or pick an example first")
        self._json(200, self.engine.predict(req["image_id"], req.get("boxes"),
                                            req.get("views")))
      else:
        raise DemoError(f"no such endpoint: {path}", 404)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    # A client that hangs up mid-response is not the server's problem; keep serving quietly.
    exc = sys.exc_info()[1]
    if isinstance(exc, (ConnectionError, TimeoutError)):
      return
    super().handle_error(request, client_address)


def make_server(engine: Engine | None, port: int = 7860) -> http.server.ThreadingHTTPServer:
  """A threading HTTP server on 127.0.0.1:port (0: a free port; see .server_address). The
  engine may be set later as `server.RequestHandlerClass.engine`, before serving."""
  handler = type("DemoHandler", (Handler,), {"engine": engine})
  return _Server(("127.0.0.1", port), handler)


# ------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  from dynrefer_jax import config_lib  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)

  class _Parser(argparse.ArgumentParser):
    def error(self, message):
      raise DemoError(message)

  try:
    rest, spec, overrides = config_lib.split_argv(argv)
    p = _Parser(prog="python -m dynrefer_jax.demo",
                description="Serve the DynRefer demo page on 127.0.0.1.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="a training workdir or a tools/convert_checkpoint.py output "
                        f"(default: {DEFAULT_CHECKPOINT}, the main job's)")
    p.add_argument("--port", type=int, default=7860, help="0 picks a free port")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-upload-mb", type=float, default=100.0)
    p.add_argument("--max-megapixels", type=float, default=144.0,
                   help="at most 144 (12000 x 12000, the model's limit)")
    args = p.parse_args(rest)
    spec = spec or DEFAULT_CONFIG
    config = config_lib.load(spec, overrides)
    try:
      predict.checkpoint_root(args.checkpoint)
    except predict.PredictError as e:
      hint = "; `bash run.sh` writes it" if args.checkpoint == DEFAULT_CHECKPOINT else ""
      raise DemoError(f"{e}{hint}") from None
    if not 0 <= args.port <= 65535:
      raise DemoError(f"--port must be in [0, 65535], got {args.port}")
    if args.batch_size < 1:
      raise DemoError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (args.max_upload_mb > 0 and 0 < args.max_megapixels <= 144):
      raise DemoError("--max-upload-mb must be positive and --max-megapixels in (0, 144]")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_pixels=int(args.max_megapixels * 1e6))
  except (DemoError, predict.PredictError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:  # bind before the slow part: a busy port is an error now, not after compiling
    server = make_server(None, args.port)
  except OSError as e:
    print(f"error: cannot listen on 127.0.0.1:{args.port}: {e.strerror or e}", file=sys.stderr)
    return 2
  print(f"[demo] loading {args.checkpoint} ({spec})", file=sys.stderr, flush=True)
  try:
    engine = Engine.load(config, args.checkpoint, batch_size=args.batch_size, limits=limits)
  except predict.PredictError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"[demo] step {engine.runner.step}; compiling", file=sys.stderr, flush=True)
  seconds = engine.warm_up()
  server.RequestHandlerClass.engine = engine
  port = server.server_address[1]
  print(f"[demo] compiled in {seconds:.1f}s", file=sys.stderr, flush=True)
  print(f"DynRefer demo: http://127.0.0.1:{port}/", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
