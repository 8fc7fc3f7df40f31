"""Training machinery of a `RunSpec`: train state (`train_state`), the per-device train step and
the evaluation step (`step`), the loop (`loop.train_and_evaluate`), the host input pipeline
(`input_pipeline`), augmentation (`augment`), the device mesh (`sharding`), checkpoints
(`checkpoint`), TensorBoard (`tb_logging`) and multi-host start-up (`distributed`)."""

from focalnet_jax.training.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
