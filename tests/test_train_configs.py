"""Every config in configs/ builds, compiles from abstract shapes (`.lower(...).compile()`) and runs
2 train steps with tiny overrides (ResNet-18 at width 0.125 or a 3-level U-Net, 32 x 32 slices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_helpers import REPO, FakeStore, tiny_config

from focalnet_jax import losses
from focalnet_jax.data.folds import case_rows
from focalnet_jax.run import RunSpec
from focalnet_jax.training import input_pipeline, sharding, train_state
from focalnet_jax.training import step as step_lib

CONFIGS = [
    "default.py",
    "focalnet.py",
    "deeplab_onehot.py",
    "unet_mult.py",
    "unet_sing.py",
    "ablation_loss.py:loss=ce",
    "ablation_loss.py:loss=fl",
    "ablation_loss.py:loss=fl_mfl",
    "ablation_augment.py:augment=none",
    "ablation_augment.py:augment=basic",
    "ablation_augment.py:augment=advanced",
    "picai.py",
    "demo.py",
    "mfl4.py",
]
_RESULTS: dict[str, dict] = {}  # configs that resolve identically are run once


def test_every_config_file_is_listed():
    files = {p.name for p in (REPO / "configs").glob("*.py")}
    assert files == {c.split(":")[0] for c in CONFIGS}


def _two_steps(config) -> dict:
    components = tuple(config.data.components)
    store = FakeStore(patients=4, slices=2, components=components)
    mesh = sharding.make_mesh()
    spec = RunSpec.from_config(config).for_store(store)
    batch_size = spec.global_batch
    batches = input_pipeline.TrainBatches(
        input_pipeline.SliceReader(store, components),
        case_rows(store, store.case_ids, "annotated"),
        batch_size,
        mesh,
        seed=0,
    )
    step = step_lib.make_train_step(spec, mesh)
    placed = sharding.batch_sharding(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=placed)
        for k, v in batches.local_batch(0).items()
    }
    key, lam = jax.random.key(0), jnp.float32(50.0)
    compiled = step.lower(
        train_state.abstract_train_state(spec, mesh), abstract_batch, key, lam
    ).compile()
    state = train_state.create_train_state(spec, key, mesh)
    initial = jax.device_get(state.params)
    history = []
    for s in range(2):
        state, metrics = compiled(state, batches.device_batch(s), key, lam)
        history.append(jax.device_get(metrics))
    change = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(initial), jax.tree.leaves(jax.device_get(state.params)), strict=True
        )
    )
    return {"step": int(state.step), "metrics": history, "change": change}


@pytest.mark.parametrize("spec", CONFIGS)
def test_config_builds_and_runs_two_steps(spec):
    config = tiny_config(f"configs/{spec}")
    key = config.to_json(sort_keys=True)
    if key not in _RESULTS:
        _RESULTS[key] = _two_steps(config)
    result = _RESULTS[key]
    assert result["step"] == 2
    assert result["change"] > 0
    for metrics in result["metrics"]:
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
        assert metrics[config.loss.name] > 0
        if config.loss.mfl:
            shares = metrics["mfl_subset_share"]
            assert len(shares) == len(
                losses.component_subsets(config.data.components, config.loss.subsets)
            )
            np.testing.assert_allclose(np.sum(shares), 1.0, rtol=1e-6)
            np.testing.assert_allclose(
                metrics["loss"], metrics[config.loss.name] + 50.0 * metrics["mfl"], rtol=1e-5
            )
        else:
            np.testing.assert_allclose(metrics["loss"], metrics[config.loss.name], rtol=1e-6)
