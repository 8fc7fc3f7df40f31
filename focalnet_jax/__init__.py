"""focalnet_jax: FocalNet (Cao et al., IEEE TMI 2019) for prostate cancer detection and Gleason
score prediction in multi-parametric MRI, in JAX/Flax."""

__version__ = "0.1.0"
