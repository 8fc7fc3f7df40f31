"""How a predictor runs its batches (evaluation/inference.py, ensemble.py), on untrained tiny
models: batch sizes refused, the cases of a store pooled into whole batches, the next batch (or
model) dispatched before one is read back, one compilation for exams of any length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from focalnet_jax.evaluation.inference import Predictor


def _tiny_predictor(batch_size: int, seed: int = 0):
    import jax
    from test_train_helpers import tiny_config

    from focalnet_jax.run import RunSpec

    spec = RunSpec.from_config(tiny_config(), num_devices=1, image_size=(32, 32))
    variables = spec.model.init(jax.random.key(seed), np.zeros((1, 32, 32, 2), np.float32))
    return Predictor.from_variables(spec, variables, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, True])
def test_a_batch_size_below_one_or_not_an_integer_is_refused(batch_size):
    # -3 was rounded to -2 (a multiple of 2 devices) and every batch loop ran no step: all-zero
    # scores, no detection, no error; 0 failed at the first call.
    with pytest.raises(
        ValueError, match=f"batch_size: expected an integer >= 1, got {batch_size!r}"
    ):
        _tiny_predictor(batch_size=batch_size)


def test_cases_of_a_store_share_whole_inference_batches(tmp_path):
    """5 cases of 3 slices at batch 4: 4 model calls (15 slices), not one padded call per case,
    and each case's scores are those of the case predicted alone."""
    import dataclasses

    from test_train_helpers import FakeStore

    from focalnet_jax.evaluation.inference import predict_cases
    from focalnet_jax.evaluation.predictions import read_case

    store = FakeStore(patients=5, slices=3, size=32)
    store.slice_index = np.tile(np.arange(3, dtype=np.int32), 5)
    predictor = _tiny_predictor(batch_size=4)
    calls = []
    counted = dataclasses.replace(
        predictor, apply=lambda v, x: calls.append(len(x)) or predictor.apply(v, x)
    )
    paths = predict_cases(counted, store, store.case_ids, tmp_path)
    assert calls == [4, 4, 4, 4]
    for case_id, path in zip(store.case_ids, paths, strict=True):
        alone = predictor(store.images[store.case_slices(case_id)])
        np.testing.assert_allclose(read_case(path).scores, alone, atol=1e-6, err_msg=case_id)


def test_pooled_predictions_pad_only_the_last_batch_and_keep_the_case_order():
    """Cases of 3, 5, 2, 7, 1 and 0 slices at batch 4: ceil(18 / 4) = 5 batches (flushing the
    pooled cases whenever they fill a batch would take 6); every case gets its own scores."""
    import dataclasses

    from focalnet_jax.evaluation.inference import pooled_predictions

    rng = np.random.default_rng(0)
    cases = [(f"c{i}", rng.uniform(0, 1, (n, 32, 32, 2)).astype(np.float32))
             for i, n in enumerate((3, 5, 2, 7, 1, 0))]  # fmt: skip
    predictor = _tiny_predictor(batch_size=4)
    calls = []
    counted = dataclasses.replace(
        predictor, apply=lambda v, x: calls.append(len(x)) or predictor.apply(v, x)
    )
    out = list(pooled_predictions(counted, iter(cases), 4))
    assert len(calls) == 5
    assert [key for key, _ in out] == [key for key, _ in cases]
    for (key, images), (_, scores) in zip(cases, out, strict=True):
        assert scores.shape == (*images.shape[:3], 5)
        np.testing.assert_allclose(scores, predictor(images), atol=1e-6, err_msg=key)


def test_predictor_dispatches_the_next_batch_before_reading_one_back():
    """10 slices at batch 4: batch i + 1 is handed to the device before batch i's scores are
    read back, so the host's copy of one batch overlaps the device's work on the next."""
    import dataclasses

    predictor = _tiny_predictor(batch_size=4)
    events = []

    class Scores:
        def __init__(self, value, index):
            self.value, self.index = value, index

        def __array__(self, dtype=None, copy=None):
            events.append(f"read {self.index}")
            return np.asarray(self.value)

    def apply(variables, images):
        index = sum(event.startswith("dispatch") for event in events)
        events.append(f"dispatch {index}")
        return Scores(predictor.apply(variables, images), index)

    images = np.random.default_rng(0).uniform(0, 1, (10, 32, 32, 2)).astype(np.float32)
    scores = dataclasses.replace(predictor, apply=apply)(images)
    assert events == ["dispatch 0", "dispatch 1", "read 0", "dispatch 2", "read 1", "read 2"]
    np.testing.assert_allclose(scores, predictor(images), atol=0)


class _LoggedScores:
    """Scores whose read-back is logged in `events`."""

    def __init__(self, value, tag: str, events: list):
        self.value, self.tag, self.events = value, tag, events

    def __array__(self, dtype=None, copy=None):
        self.events.append(f"read {self.tag}")
        return np.asarray(self.value)


def _logged(predictor, model: int, events: list):
    """`predictor` whose dispatches (`dispatch <model>.<batch>`) and reads are logged."""
    import dataclasses
    import itertools

    counter = itertools.count()

    def apply(variables, images):
        tag = f"{model}.{next(counter)}"
        events.append(f"dispatch {tag}")
        return _LoggedScores(predictor.apply(variables, images), tag, events)

    return dataclasses.replace(predictor, apply=apply)


def test_ensemble_dispatches_the_next_model_before_reading_the_last_one_back():
    """Two models, 6 slices with flip TTA (12 a model, 3 batches of 4): model 1's first batch is
    dispatched before model 0's last scores are read back (one batch waits at a time, across
    models), and the scores are the mean over models of each one's plain and re-flipped
    prediction, the models called one by one."""
    from focalnet_jax.evaluation.ensemble import LEFT_RIGHT_AXIS, make_ensemble

    plain = [_tiny_predictor(batch_size=4, seed=seed) for seed in (0, 1)]
    events: list[str] = []
    logged = [_logged(p, model, events) for model, p in enumerate(plain)]
    ensemble = make_ensemble(logged, [Path("a"), Path("b")], [None, None], "flip")
    ensemble.predictors = logged  # make_ensemble shares one model's apply: keep both logs
    images = np.random.default_rng(0).uniform(0, 1.2, (6, 32, 32, 2)).astype(np.float32)
    scores = ensemble(images)
    assert events == [
        "dispatch 0.0", "dispatch 0.1", "read 0.0", "dispatch 0.2", "read 0.1",
        "dispatch 1.0", "read 0.2", "dispatch 1.1", "read 1.0", "dispatch 1.2", "read 1.1",
        "read 1.2",
    ]  # fmt: skip
    flipped = np.flip(images, LEFT_RIGHT_AXIS)
    each = [0.5 * (p(images) + np.flip(p(flipped), LEFT_RIGHT_AXIS)) for p in plain]
    np.testing.assert_allclose(scores, np.mean(each, axis=0), atol=1e-6)
    assert np.abs(each[0] - each[1]).max() > 1e-3  # two different models


@pytest.mark.usefixtures("without_compilation_cache")
def test_one_compilation_serves_exams_of_any_length_and_the_flip_ensemble():
    """Padded batches: a model compiles once for exams of 3, 7, 9 and 1 slices, and a flip-TTA
    ensemble of two such models (one shared function) compiles nothing more."""
    import collections

    import jax

    from focalnet_jax.evaluation.ensemble import make_ensemble

    compiles = collections.Counter()

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[kwargs["fun_name"]] += 1

    predictor = _tiny_predictor(batch_size=4)
    other = _tiny_predictor(batch_size=4)
    ensemble = make_ensemble([predictor, other], [Path("a"), Path("b")], [None, None], "flip")
    rng = np.random.default_rng(0)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for n in (3, 7, 9, 1):
            images = rng.uniform(0, 1, (n, 32, 32, 2)).astype(np.float32)
            assert predictor(images).shape == (n, 32, 32, 5)
            assert ensemble(images).shape == (n, 32, 32, 5)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert dict(compiles) == {"jit(apply)": 1}
