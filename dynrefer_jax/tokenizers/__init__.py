"""Tokenizers implemented in the project (no hub downloads at run time)."""

from dynrefer_jax.tokenizers.clip_bpe import ClipTokenizer

__all__ = ["ClipTokenizer"]
