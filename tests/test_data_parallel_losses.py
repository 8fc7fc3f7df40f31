"""Batch-level losses under data parallelism: nnU-Net's batch Dice sums over the global batch, so
two devices (each with half of it) compute the loss and the update of one device with all of it.

Run as a script (`python tests/test_data_parallel_losses.py`) it prints, as JSON, the loss values
and gradients on one device and on every device of the process, and the metrics and parameters
after one train step of CE + batch Dice on a tiny model; the test starts it on 2 CPU devices.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

# (loss, options): sigmoid batch Dice, CE + batch Dice, nnU-Net's softmax CE + Dice.
CASES = {
    # The default eps (1): the sums over devices scaled by 1/N (a `pmean` for the `psum`) scale
    # eps by N, which a tiny eps hides.
    "soft_dice": ("soft_dice_loss", {"eps": 1.0, "batch_dice": True}),
    "ce_dice": ("ce_dice_loss", {"eps": 1e-5, "batch_dice": True}),
    "softmax_ce_dice": (
        "ce_dice_loss",
        {"eps": 1e-5, "batch_dice": True, "activation": "softmax", "dice_background": False},
    ),
}


def _features_and_targets(channels: int):
    """4 slices of 8 x 8: lesions (a 3 x 3 square, bits up to the slice's class) only in slices
    2 and 3, so with two devices the first sees no positive bit at all."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 8, 8, channels)).astype(np.float32)
    targets = np.zeros((4, 8, 8, channels), np.float32)
    if channels == 6:  # one-hot: background where no lesion
        targets[..., 0] = 1.0
    for b, cls in ((2, 2), (3, 4)):
        if channels == 6:
            targets[b, 2:5, 2:5, 0], targets[b, 2:5, 2:5, cls] = 0.0, 1.0
        else:
            targets[b, 2:5, 2:5, :cls] = 1.0
    return features, targets


def _loss_values_and_grads() -> dict:
    """{case: {'one': [loss, *grad], 'all': [...]}}: d loss / d w for logits = w * features (w
    `[K]`, shared), on one device and as the step computes it on every device (per-device
    gradient of a per-device copy of w, then `lax.pmean`)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from focalnet_jax import losses

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    out = {}
    for case, (name, options) in CASES.items():
        loss = functools.partial(getattr(losses, name), **options)
        channels = 6 if options.get("activation") == "softmax" else 5
        features, targets = _features_and_targets(channels)
        w = jnp.linspace(0.5, 1.5, channels)
        one = jax.value_and_grad(lambda w, x, y, loss=loss: loss(w * x, y))(w, features, targets)

        def per_device(w, x, y, loss=loss):
            fn = lambda w: loss(w * x, y, axis_name="data")
            value, grad = jax.value_and_grad(fn)(lax.pcast(w, "data", to="varying"))
            return lax.pmean(value, "data"), lax.pmean(grad, "data")

        sharded = jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())
        )
        split = jax.device_put((features, targets), NamedSharding(mesh, P("data")))
        every = jax.jit(sharded)(w, *split)
        out[case] = {
            key: [float(value), *np.asarray(grad).tolist()]
            for key, (value, grad) in (("one", one), ("all", every))
        }
    return out


def _one_train_step() -> dict:
    """{'one' | 'all': [loss, grad_norm, sum of |params|, sum of |batch_stats|, step, every other
    metric]} after one CE + batch Dice step of the tiny config (augmented, sync-BN) on 4 slices
    whose lesions of class >= 3 all lie in the second half."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from test_train_helpers import tiny_config

    from focalnet_jax.run import RunSpec
    from focalnet_jax.training import step as step_lib
    from focalnet_jax.training import train_state

    overrides = ["--config.loss.mfl=false", "--config.loss.name=ce_dice"]
    overrides += ["--config.loss.batch_dice=true", "--config.loss.eps=1e-5"]
    spec = RunSpec.from_config(tiny_config(overrides=overrides))
    rng = np.random.default_rng(0)
    classes = np.zeros((4, 32, 32), np.int32)
    for b, cls in enumerate((1, 2, 3, 4)):
        classes[b, 8:16, 8:16] = cls
    batch = {
        "images": rng.uniform(0.0, 1.0, (4, 32, 32, 2)).astype(np.float32),
        "classes": classes,
        "grade_known": np.ones_like(classes, np.uint8),
        "t2w_lower_ratio": np.full(4, 0.05, np.float32),
    }
    out = {}
    for key, count in (("one", 1), ("all", jax.device_count())):
        mesh = Mesh(np.array(jax.devices()[:count]), ("data",))
        state = train_state.create_train_state(spec, jax.random.key(0), mesh)
        placed = jax.device_put(batch, NamedSharding(mesh, P("data")))
        step = step_lib.make_train_step(spec, mesh)
        state, metrics = step(state, placed, jax.random.key(1), jnp.float32(0.0))
        total = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(state.params))
        # The running averages: BatchNorm's statistics of the global batch, not of a share.
        averages = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(state.batch_stats))
        rest = [float(v) for k, v in sorted(metrics.items()) if k not in ("loss", "grad_norm")]
        out[key] = [float(metrics["loss"]), float(metrics["grad_norm"]), total, averages]
        out[key] += [int(state.step), *rest]
    return out


def _script_output() -> dict:
    from test_train_helpers import script_json

    return script_json(__file__, timeout=240)


def test_batch_dice_over_two_devices_equals_one_device():
    values = _script_output()
    step = values.pop("train_step")
    assert set(values) == set(CASES)
    for case, got in values.items():
        one, every = np.array(got["one"]), np.array(got["all"])
        assert np.abs(one[1:]).max() > 1e-4, case  # a gradient to compare
        np.testing.assert_allclose(every, one, rtol=1e-5, atol=1e-7, err_msg=case)
    # The train step passes the data axis to the loss and to BatchNorm: the same loss, gradient
    # norm, update, running averages and metrics, up to float32 summation order: the gradient
    # norm (index 1), a sum of squares over every parameter, differed by 3e-6 to 5e-6 on one CPU
    # with XLA's code for SSE4.2, AVX2 and AVX-512; the others by at most 5.5e-7.
    assert len(step["one"]) == len(step["all"]) > 5
    all_devices, one_device = np.array(step["all"]), np.array(step["one"])
    np.testing.assert_allclose(all_devices[1], one_device[1], rtol=1e-5, err_msg="gradient norm")
    others = np.delete(all_devices, 1), np.delete(one_device, 1)
    np.testing.assert_allclose(*others, rtol=2e-6, err_msg="train step")


def test_batch_dice_without_an_axis_is_the_one_device_loss():
    """Outside `shard_map` (no `axis_name`) the batch Dice is that of the batch given."""
    from focalnet_jax import losses

    features, targets = _features_and_targets(5)
    local = losses.soft_dice_loss(features, targets, eps=1e-5, batch_dice=True)
    probs = 1.0 / (1.0 + np.exp(-features.astype(np.float64)))
    overlap = (probs * targets).sum(axis=(0, 1, 2))
    total = (probs + targets).sum(axis=(0, 1, 2))
    expected = 1.0 - np.mean((2.0 * overlap + 1e-5) / (total + 1e-5))
    np.testing.assert_allclose(float(local), expected, rtol=1e-5)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps({**_loss_values_and_grads(), "train_step": _one_train_step()}))
