"""The FocalNet train step (focalnet_jax/training/step.py) on 2 devices equals 1 device: focal loss
+ MFL with sync-BN, in both MFL modes, augmentation on. Each slice's MFL subset is chosen from
outputs normalised with the global batch's statistics (BatchNorm reduces over `data` in every
subset pass), so the loss terms, the subset shares, the update and the running averages are those
of one device holding the whole batch.

Run as a script (`python tests/test_train_step_devices.py`) it prints, as JSON, per MFL mode and
device count the step's metrics, the parameter update and the running averages; the test starts
it on 2 CPU devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

MODES = ("select", "vmap")
# A large learning rate: the update (new - old parameters) stands well above float32 rounding.
OVERRIDES = ["--config.train.batch_size=4", "--config.optim.lr=1.0"]


def _batch() -> dict:
    """4 slices of 32 x 32, each with an 8 x 8 lesion (classes 1..4) dark in T2w or ADC."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 1.0, (4, 32, 32, 2)).astype(np.float32)
    classes = np.zeros((4, 32, 32), np.int32)
    for b in range(4):
        r, c = 4 + 4 * b, 6 + 3 * b
        classes[b, r : r + 8, c : c + 8] = 1 + b
        images[b, r : r + 8, c : c + 8, b % 2] *= 0.3
    return {
        "images": images,
        "classes": classes,
        "grade_known": np.ones_like(classes, np.uint8),
        "t2w_lower_ratio": np.full(4, 0.05, np.float32),
    }


def _steps() -> dict:
    """{mode: {devices: {'metrics', 'update', 'batch_stats'}}} after one step from the same
    state, on the first device and on every device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from test_train_helpers import tiny_config

    from focalnet_jax.run import RunSpec
    from focalnet_jax.training import step as step_lib
    from focalnet_jax.training import train_state

    flat = lambda tree: [np.ravel(x).tolist() for x in jax.tree.leaves(jax.device_get(tree))]
    out = {}
    for mode in MODES:
        spec = RunSpec.from_config(
            tiny_config(overrides=[*OVERRIDES, f"--config.loss.mfl_mode={mode}"])
        )
        out[mode] = {}
        for count in (1, jax.device_count()):
            mesh = Mesh(np.array(jax.devices()[:count]), ("data",))
            state = train_state.create_train_state(spec, jax.random.key(0), mesh)
            before = jax.device_get(state.params)
            batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
            step = step_lib.make_train_step(spec, mesh)
            state, metrics = step(state, batch, jax.random.key(1), jnp.float32(50.0))
            update = jax.tree.map(np.subtract, jax.device_get(state.params), before)
            out[mode][count] = {
                "metrics": {k: np.ravel(v).tolist() for k, v in jax.device_get(metrics).items()},
                "update": flat(update),
                "batch_stats": flat(state.batch_stats),
            }
    return out


def test_focalnet_step_with_mfl_and_sync_bn_on_two_devices_equals_one_device():
    from test_train_helpers import script_json

    steps = script_json(__file__)
    for mode in MODES:
        one, two = steps[mode]["1"], steps[mode]["2"]
        assert one["metrics"].keys() == two["metrics"].keys()
        assert one["metrics"]["mfl"][0] > 0 and len(one["metrics"]["mfl_subset_share"]) == 2
        for name, value in one["metrics"].items():
            np.testing.assert_allclose(two["metrics"][name], value, rtol=2e-5, err_msg=name)
        for kind in ("update", "batch_stats"):
            for a, b in zip(one[kind], two[kind], strict=True):
                a, b = np.asarray(a), np.asarray(b)
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max() + 1e-7)
        assert max(np.abs(np.asarray(u)).max() for u in one["update"]) > 1e-2  # it moved


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_steps()))
