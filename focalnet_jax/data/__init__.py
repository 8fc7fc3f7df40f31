"""Data: reading mp-MRI, preprocessing to crop slices, the dataset store, folds, synthetic data.

The per-case entry point is the contract `preprocess_case` (SPEC section 4); see docs/data.md.
"""

from focalnet_jax.data.preprocess import PreprocessConfig, PreprocessedCase, preprocess_case

__all__ = ["PreprocessConfig", "PreprocessedCase", "preprocess_case"]
