"""Data: reading mp-MRI, preprocessing to crop slices, the dataset store, folds, synthetic data.

The per-case entry point is `preprocess_case`; see docs/data.md.
"""

from focalnet_jax.data.preprocess import PreprocessedCase, preprocess_case
from focalnet_jax.data.preprocess_config import PreprocessConfig

__all__ = ["PreprocessConfig", "PreprocessedCase", "preprocess_case"]
