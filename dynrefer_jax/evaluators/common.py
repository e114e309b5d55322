"""Evaluator registry, base class and the host-side plumbing every evaluator shares.

An evaluator is built from a name in the config:

  evaluator = common.get("dense_caption")(predict_fn, dataset, **cfg)
  for metric, value in evaluator.run(params):
    ...

`predict_fn(params, batch) -> dict` returns, for this process's rows of `batch`:
  "caption"          list[str] of length B
  "caption_score"    float[B]      exp(beam score), the dense-captioning confidence
  "tag_scores"       float[B, K]
  "attribute_scores" float[B, A]
  "class_scores"     float[B, C]
Each evaluator reads only the keys it needs. Outputs must be host-addressable for this
process's rows (host-local or fully replicated arrays); `np.asarray` is applied to them.

`dataset` is either a re-iterable (a list of batches, or an object whose `__iter__` starts a new
pass) or a zero-argument callable returning a fresh iterator. A bare generator is consumed by
the first `run` and would give an empty second pass, so pass the function that makes it instead.
Each batch is a dict of numpy arrays with a boolean "mask" (False = padding row), the ids
"image_id" int[B] and "region_id" int[B], and the ground truth an evaluator needs ("captions"
list of list[str], "box" float[B, 4] x1y1x2y2, "attributes" int[B, A] in {1, 0, -1},
"category" int[B]).

Multi-host: every process runs the same number of batches (padding rows have mask False), keeps
the rows with mask True, and the per-process row lists are all-gathered as pickled bytes through
`jax.experimental.multihost_utils.process_allgather`. Process 0 computes and yields the metrics;
the other processes yield nothing. In a single process nothing is gathered.
"""

import atexit
from collections.abc import Callable, Iterable, Iterator
import contextlib
import pickle
import shutil
import threading
from typing import Any

import numpy as np

_REGISTRY: dict[str, type["Evaluator"]] = {}


def register(name: str) -> Callable[[type["Evaluator"]], type["Evaluator"]]:
  """Class decorator that makes an evaluator available as `get(name)`."""

  def decorator(cls):
    if name in _REGISTRY:
      raise ValueError(f"evaluator {name!r} is already registered (by {_REGISTRY[name]!r})")
    _REGISTRY[name] = cls
    return cls

  return decorator


def get(name: str) -> type["Evaluator"]:
  """Returns the evaluator class registered as `name`."""
  if name not in _REGISTRY:
    raise KeyError(f"unknown evaluator {name!r}; valid names: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def registered_names() -> list[str]:
  return sorted(_REGISTRY)


def gather_objects(obj: Any, allgather: Callable[[np.ndarray], np.ndarray] | None = None
                   ) -> list[Any]:
  """All-gathers one picklable object per process; returns them in process order.

  The objects are pickled to uint8 buffers, padded to the longest one, and gathered with
  `allgather` (default: `multihost_utils.process_allgather`, which stacks along a new leading
  axis). Pickle is safe here: every buffer comes from a process of this same job.

  Args:
    obj: this process's object.
    allgather: `f(uint8[L]) -> uint8[P, L]`; injectable for tests.

  Returns:
    A list of P objects.
  """
  if allgather is None:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return [obj]
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    allgather = multihost_utils.process_allgather
  data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  # int32: without jax_enable_x64 an int64 array would be narrowed anyway.
  sizes = np.asarray(allgather(np.array([data.size], np.int32))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  bufs = np.asarray(allgather(buf))
  return [pickle.loads(bufs[p, :sizes[p]].tobytes()) for p in range(len(sizes))]


def _process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


class Evaluator:
  """Runs `predict_fn` over `dataset`, gathers the rows on process 0 and yields metrics.

  Subclasses implement `rows(batch, preds, keep)` (host-side records for the kept rows of one
  batch) and `metrics(rows)` (a dict of floats from all rows of all processes).
  """

  def __init__(self, predict_fn: Callable[[Any, dict], dict], dataset: Iterable[dict] |
               Callable[[], Iterator[dict]], **cfg):
    self.predict_fn = predict_fn
    self.dataset = dataset
    self.cfg = cfg

  def _batches(self) -> Iterator[dict]:
    return iter(self.dataset() if callable(self.dataset) else self.dataset)

  def collect(self, params) -> list[Any]:
    """Runs the model over this process's batches; returns its rows (padding dropped)."""
    rows = []
    for batch in self._batches():
      if "mask" in batch:
        keep = np.asarray(batch["mask"], bool).reshape(-1)
      else:  # an unpadded batch
        keep = np.ones(len(batch["image_id"]), bool)
      preds = self.predict_fn(params, batch)
      rows.extend(self.rows(batch, preds, keep))
    return rows

  def run(self, params) -> Iterator[tuple[str, float]]:
    """Yields `(metric name, value)` on process 0; nothing on the other processes.

    Iterate it on every process: the work, gather included (a collective), runs lazily.
    """
    rows = [r for part in gather_objects(self.collect(params)) for r in part]
    if _process_index() != 0:
      return
    for name, value in self.metrics(rows).items():
      yield name, float(value)

  def rows(self, batch: dict, preds: dict, keep: np.ndarray) -> list[Any]:
    raise NotImplementedError

  def metrics(self, rows: list[Any]) -> dict[str, float]:
    raise NotImplementedError


def take(x, keep: np.ndarray) -> list:
  """Rows `keep` (bool[B]) of an array or a list, as a Python list."""
  if isinstance(x, (list, tuple)):
    return [v for v, k in zip(x, keep) if k]
  return list(np.asarray(x)[keep])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of x1y1x2y2 boxes, continuous coordinates (as torchvision's `box_iou`).

  Args:
    a: float[N, 4]; b: float[M, 4].

  Returns:
    float64[N, M].
  """
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a[:, None] + area_b[None, :] - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    # Degenerate boxes (zero union) overlap nothing, instead of giving NaN.
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


_METEOR: dict[str, Any] = {"scorer": None}
_METEOR_LOCK = threading.Lock()


# The evaluators that run Java (pycocoevalcap's PTB tokenizer and METEOR 1.5 are jars).
NEEDS_JAVA = ("region_caption", "dense_caption")


class MissingJava(RuntimeError):
  """No `java` on PATH; the message is one line that says what to install."""


def require_java(what: str = "caption evaluation") -> None:
  """Raises MissingJava unless a `java` executable is on PATH (pycocoevalcap starts `java` by
  name). Checked before the work that needs it, so a run fails at once, not after training."""
  if shutil.which("java") is None:
    raise MissingJava(f"{what} needs Java: pycocoevalcap's PTB tokenizer and METEOR run "
                      "`java`, which is not on PATH (install a Java runtime, e.g. "
                      "`apt-get install default-jre-headless`)")


@contextlib.contextmanager
def shared_meteor():
  """The process's one pycocoevalcap `Meteor` (`java -jar meteor-1.5.jar -stdio`), started on
  first use and stopped at exit: each start costs seconds (the JVM and a 2 GB paraphrase table),
  and an evaluation scores METEOR several times (region and dense captioning, their baselines,
  every checkpoint). Each request line is scored on its own, so calls do not affect each other.
  One caller at a time; a scorer whose call failed, or whose process died, is replaced."""
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
  require_java("METEOR")
  with _METEOR_LOCK:
    scorer = _METEOR["scorer"]
    if scorer is None or scorer.meteor_p.poll() is not None:
      scorer = _METEOR["scorer"] = Meteor()
    try:
      yield scorer
    except BaseException:
      _METEOR["scorer"] = None   # its pipes may hold half an exchange
      _close_meteor(scorer)
      raise


def close_shared_meteor() -> None:
  """Stops the shared METEOR process (a later shared_meteor() starts a new one)."""
  with _METEOR_LOCK:
    scorer, _METEOR["scorer"] = _METEOR["scorer"], None
    if scorer is not None:
      _close_meteor(scorer)


atexit.register(close_shared_meteor)


def meteor_scores(pairs: list[tuple[str, list[str]]]) -> list[float]:
  """METEOR 1.5 of each (candidate, references) pair, through the shared Java process.

  pycocoevalcap's `Meteor` runs one `java -jar meteor-1.5.jar -stdio` subprocess; one
  `compute_score` call streams every pair through it (keyed by pair index), so the JVM start
  and the paraphrase-table load are paid once per process (shared_meteor), not per pair.

  Args:
    pairs: (candidate, non-empty list of references). Newlines are replaced by spaces: the
      jar reads one line per request.

  Returns:
    METEOR in [0, 1] per pair, in order.
  """
  if not pairs:
    return []
  clean = lambda s: " ".join(s.replace("|||", " ").split())
  res, gts = {}, {}
  for i, (cand, refs) in enumerate(pairs):
    if not refs:
      raise ValueError(f"pair {i} has no references")
    res[i] = [clean(cand)]
    gts[i] = [clean(r) for r in refs]
  with shared_meteor() as scorer:
    _, scores = scorer.compute_score(gts, res)
  return [float(s) for s in scores]


def _close_meteor(scorer) -> None:
  """Stops a pycocoevalcap Meteor's JVM now rather than whenever it is garbage-collected.

  pycocoevalcap 1.2's Meteor has no close(); its __del__ closes stdin, kills and reaps the
  process, and is harmless when the garbage collector runs it a second time.
  """
  scorer.__del__()
