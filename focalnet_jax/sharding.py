"""The 1-D `data` mesh over every device of every process, and the shardings used with it.

Everything outside the per-device train step is global-view `jax.jit` with these `NamedSharding`s:
batches are split along their leading axis over `data`; the train state is replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from focalnet_jax.errors import UserError

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """1-D mesh named `data` over `jax.devices()` (all processes)."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, P())


def per_device_batch(global_batch: int, mesh: Mesh) -> int:
    """Examples per device; a global batch not divisible by the device count is an error."""
    devices = mesh.devices.size
    if global_batch <= 0 or global_batch % devices:
        raise UserError(
            f"train.batch_size={global_batch} is not divisible by the {devices} devices of the "
            f"'{DATA_AXIS}' mesh ({jax.process_count()} processes x {jax.local_device_count()} "
            "local devices); choose a multiple of the device count"
        )
    return global_batch // devices
