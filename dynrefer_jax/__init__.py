"""dynrefer_jax: DynRefer (region-level vision-language modelling) in JAX/Flax NNX."""

import flax

# Parameters carry logical axis names as metadata ("out_sharding"); we map them to mesh axes
# ourselves (dynrefer_jax/sharding.py) rather than letting Flax shard eagerly at creation.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
