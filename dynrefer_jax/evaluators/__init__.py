"""Evaluators for the four tasks; importing this package registers them all.

  from dynrefer_jax import evaluators
  evaluator = evaluators.get("dense_caption")(predict_fn, dataset, **cfg)
  for metric, value in evaluator.run(params): ...
"""

from dynrefer_jax.evaluators import attributes
from dynrefer_jax.evaluators import dense_caption
from dynrefer_jax.evaluators import recognition
from dynrefer_jax.evaluators import region_caption
from dynrefer_jax.evaluators.common import Evaluator
from dynrefer_jax.evaluators.common import get
from dynrefer_jax.evaluators.common import register
from dynrefer_jax.evaluators.common import registered_names
