"""Training: train state and optimiser (`train_state`), the per-device step (`step`) and the loop
(`loop.train_and_evaluate`)."""

from focalnet_jax.training.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
