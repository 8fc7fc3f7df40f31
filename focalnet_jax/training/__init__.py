"""Training machinery of a `RunSpec`: train state (`train_state`), the per-device train step and
the evaluation step (`step`), the loop (`loop.train_and_evaluate`), the host input pipeline
(`input_pipeline`), augmentation (`augment`), the device mesh (`sharding`), checkpoints
(`checkpoint`), TensorBoard (`tb_logging`) and multi-host start-up (`distributed`).

`train_and_evaluate` is imported on first use, so readers such as `tb_logging.read_scalars` (used
by `focalnet study report`) start without importing JAX.
"""

__all__ = ["train_and_evaluate"]


def __getattr__(name: str):
    if name == "train_and_evaluate":
        from focalnet_jax.training.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
