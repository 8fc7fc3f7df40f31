"""Inference on several devices (evaluation/inference.py, ensemble.py): a batch of slices is split
over every local device, and the scores, the ensemble's flip-TTA mean, the contract predictions
files and the PI-CAI lesion maps of their scores equal those of one device.

Run as a script (`python tests/test_inference_devices.py OUT`) it predicts with two tiny
random-weight models on the first device and on every device, writes what it got to OUT.npz and
prints, as JSON, the facts the test checks (mesh sizes, rounded batch sizes, compilations, whether
a call transferred anything implicitly); the test starts it on 2 CPU devices.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

SIZE, CHANNELS, SLICES = 32, 2, 7


def _predictors(devices, batch_size: int) -> list:
    """Two tiny models (random weights, seeds 0 and 1) on `devices`."""
    import jax
    from test_train_helpers import tiny_config

    from focalnet_jax.evaluation.inference import Predictor
    from focalnet_jax.run import RunSpec

    spec = RunSpec.from_config(tiny_config(), num_devices=1, image_size=(SIZE, SIZE))
    shape = (1, SIZE, SIZE, CHANNELS)
    return [
        Predictor.from_variables(
            spec,
            spec.model.init(jax.random.key(seed), np.zeros(shape, np.float32)),
            batch_size=batch_size,
            devices=devices,
        )
        for seed in (0, 1)
    ]


def _predict_everything(devices, label: str, arrays: dict, facts: dict) -> None:
    """Scores of one model, of a flip-TTA ensemble of two, and of the contract files of a
    store's cases, into `arrays` under `label`."""
    import jax
    from test_train_helpers import FakeStore

    from focalnet_jax.evaluation.ensemble import make_ensemble
    from focalnet_jax.evaluation.inference import predict_cases
    from focalnet_jax.evaluation.predictions import read_case

    predictors = _predictors(devices, batch_size=3)
    ensemble = make_ensemble(predictors, [Path("a"), Path("b")], [None, None], "flip")
    images = np.random.default_rng(0).uniform(0.0, 1.2, (SLICES, SIZE, SIZE, CHANNELS))
    with jax.transfer_guard("disallow"):  # the variables stay where they were placed
        arrays[f"{label}/single"] = predictors[0](images)
        arrays[f"{label}/ensemble"] = ensemble(images)
    store = FakeStore(patients=3, slices=3, size=SIZE)
    store.slice_index = np.tile(np.arange(3, dtype=np.int32), 3)
    with tempfile.TemporaryDirectory() as out:
        for path in predict_cases(ensemble, store, store.case_ids, out):
            arrays[f"{label}/case/{path.stem}"] = read_case(path).scores
    first = next(predictors[0].batches(images, np.zeros((SLICES, SIZE, SIZE, 5), np.float32)))
    facts[label] = {
        "mesh": predictors[0].mesh.size,
        "rows_per_device": [shard.data.shape[0] for shard in first.dispatch().addressable_shards],
        "batch_size": ensemble.batch_size,
        "variables_on": len(jax.tree.leaves(predictors[0].variables)[0].devices()),
    }


def _run(out: str) -> dict:
    import jax

    compiles: collections.Counter = collections.Counter()

    def count(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[kwargs["fun_name"]] += 1

    arrays: dict = {}
    facts: dict = {"devices": jax.local_device_count()}
    _predict_everything(jax.local_devices()[:1], "one", arrays, facts)
    jax.monitoring.register_event_duration_secs_listener(count)
    _predict_everything(None, "all", arrays, facts)  # default: every local device
    facts["compiles_all"] = dict(compiles)
    np.savez(out, **arrays)
    return facts


@pytest.mark.usefixtures("without_compilation_cache")
def test_two_devices_predict_what_one_device_predicts(tmp_path):
    from test_train_helpers import script_json

    out = tmp_path / "scores.npz"
    facts = script_json(__file__, str(out))
    assert facts["devices"] == 2
    assert facts["one"] == {"mesh": 1, "rows_per_device": [3], "batch_size": 3, "variables_on": 1}
    # Every local device by default; batch 3 rounded up to 4, two slices a device.
    assert facts["all"] == {
        "mesh": 2,
        "rows_per_device": [2, 2],
        "batch_size": 4,
        "variables_on": 2,
    }
    # Both models share one compiled function on the 2-device mesh, whatever the call's length.
    assert facts["compiles_all"].get("jit(apply)") == 1, facts
    arrays = np.load(out)
    names = [n.split("/", 1)[1] for n in arrays.files if n.startswith("one/")]
    assert sorted(names) == ["case/case000", "case/case001", "case/case002", "ensemble", "single"]
    for name in names:
        one, two = arrays[f"one/{name}"], arrays[f"all/{name}"]
        assert one.shape == two.shape and one.std() > 1e-3, name  # scores that vary
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6, err_msg=name)
        if name.startswith("case/"):
            _assert_same_lesion_maps(one[..., 1], two[..., 1], name)


def _assert_same_lesion_maps(one: np.ndarray, two: np.ndarray, name: str) -> None:
    """The PI-CAI lesion candidates of two csPCa volumes are the same. Random weights give
    scores near 0.5 everywhere (the dynamic threshold would take the whole volume): the
    threshold is the 95th percentile of the one-device scores, so the maps hold blobs."""
    from focalnet_jax.evaluation.detection_map import CandidateSettings, lesion_candidates

    settings = CandidateSettings(threshold=str(float(np.quantile(one, 0.95))), min_voxels=0)
    maps = lesion_candidates(one, settings), lesion_candidates(two, settings)
    assert 0 < np.count_nonzero(maps[0]) < maps[0].size, name
    np.testing.assert_array_equal(maps[1], maps[0], err_msg=name)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_run(sys.argv[1])))
