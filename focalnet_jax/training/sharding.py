"""The 1-D `data` mesh over every device of every process, and the shardings used with it.

Everything outside the per-device train step is global-view `jax.jit` with these `NamedSharding`s:
batches are split along their leading axis over `data`; the train state is replicated.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from focalnet_jax import run
from focalnet_jax.run import DATA_AXIS

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "make_mesh",
    "per_device_batch",
    "put_replicated",
    "replicated",
]


def make_mesh() -> Mesh:
    """1-D mesh named `data` over `jax.devices()` (all processes)."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, P())


@functools.cache
def _identity_onto(target: NamedSharding):
    return jax.jit(lambda tree: tree, out_shardings=target)


def put_replicated(tree, mesh: Mesh):
    """`tree` (the same value in every process: host or single-device arrays, PRNG keys) as
    arrays replicated over all of `mesh`'s devices. `jax.device_put` refuses a sharding over
    other processes' devices; a jitted identity places each process's own copies."""
    return _identity_onto(replicated(mesh))(tree)


def per_device_batch(global_batch: int, mesh: Mesh) -> int:
    """Examples per device; a global batch not divisible by the device count is an error."""
    return run.per_device_batch(global_batch, mesh.devices.size)
