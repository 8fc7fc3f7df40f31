"""The run layer: a config validated and resolved once (`spec.RunSpec`), and the run directory
that training writes and evaluation reads (`workdir`)."""

from focalnet_jax.run.spec import DATA_AXIS, FoldSplit, RunSpec, clip_inputs, per_device_batch

__all__ = ["DATA_AXIS", "FoldSplit", "RunSpec", "clip_inputs", "per_device_batch"]
