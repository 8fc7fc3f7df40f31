"""A checkpoint of finite variables whose model computes NaN: `focalnet predict` (PI-CAI folders
and one exam) and `focalnet evaluate --workdir` refuse the first case in one line naming the case
and the checkpoint (focalnet_jax/evaluation/inference.py `check_scores`)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_calls import cli_error, run_cli
from test_train_helpers import tiny_config

from focalnet_jax.run import RunSpec
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import checkpoint


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """{'images', 'run'}: 2 synthetic PI-CAI cases, and a 2-step run (trained on their store)
    with a step 3 whose first convolution, finite, overflows to infinity: the scores are NaN."""
    from focalnet_jax.training import train_and_evaluate

    root = tmp_path_factory.mktemp("non_finite")
    data, store, run = root / "data", root / "store", root / "run"
    run_cli(["synth", f"--out={data}", "--cases=2", "--seed=3", "--small"])
    run_cli(["preprocess", "--layout=picai", f"--images={data / 'images'}",
             f"--labels={data / 'labels'}", f"--out={store}"])  # fmt: skip
    overrides = ["--config.train.steps=2", "--config.data.slices=all", "--config.loss.mfl=False",
                 f"--config.data.store={store}", "--config.data.num_folds=2"]  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        train_and_evaluate(tiny_config(overrides=overrides), run)
    spec = RunSpec.from_config(workdir_lib.read_config(run), num_devices=1, training=False)
    manager = workdir_lib.make_manager(run)
    state = jax.device_get(workdir_lib.restore(manager, workdir_lib._abstract_checkpoint(spec)))
    conv1 = state["params"]["backbone"]["conv1"]
    conv1["kernel"] = np.full_like(conv1["kernel"], 1e38)
    checkpoint.save(manager, 3, state, newer_than=0)
    checkpoint.finish_saves(manager, newer_than=0)
    manager.close()
    return {"images": data / "images", "run": run}


def _refusal(case: str, run: Path, command: str) -> str:
    return (
        f"focalnet {command}: error: case {case}: checkpoint {run / 'checkpoints' / '3'} gives "
        "non-finite scores (NaN) from finite variables: the model is unusable; retrain it, or "
        "predict with another checkpoint (--step)"
    )


def test_predict_names_the_case_and_checkpoint(overflowing, tmp_path):
    """Was a 30-line traceback from the lesion candidates ('zero-size array to reduction
    operation maximum'), naming neither."""
    run, images = overflowing["run"], overflowing["images"]
    first = sorted(p.name[: -len("_t2w.mha")] for p in images.glob("*/*_t2w.mha"))[0]
    message = cli_error(["predict", "--checkpoint", run, "--layout", "picai", "--images", images,
                         "--out", tmp_path / "out"])  # fmt: skip
    assert message == _refusal(first, run, "predict")
    t2w, adc = (next(images.glob(f"*/{first}_{c}.mha")) for c in ("t2w", "adc"))
    message = cli_error(["predict", "--checkpoint", run, "--t2w", t2w, "--adc", adc,
                         "--out", tmp_path / "exam"])  # fmt: skip
    assert message == _refusal(t2w.name.split(".")[0], run, "predict")
    assert not (tmp_path / "out").exists() and not (tmp_path / "exam").exists()


def test_evaluate_names_the_case_and_checkpoint_not_a_temporary_file(overflowing, tmp_path):
    """Was one line naming `.predictions.tmp-.../<case>.npz`, gone by then, and its 'scores'."""
    run = overflowing["run"]
    message = cli_error(["evaluate", "--workdir", run, "--out", tmp_path / "eval"])
    case = message.split("case ")[1].split(":")[0]
    assert message == _refusal(case, run, "evaluate")
    assert ".tmp" not in message and not (tmp_path / "eval").exists()


def test_an_ensemble_names_its_model_of_non_finite_scores_in_that_models_component_order():
    """Models of t2w,adc,hbv and t2w,hbv,adc: each was re-run alone on the ensemble's order of
    the channels, so the one whose hbv filter overflows got adc (zeros) and passed, and the
    error named no checkpoint; and --step, refused for several runs, was the remedy given."""
    from pathlib import Path

    from test_train_helpers import tiny_config

    from focalnet_jax.errors import UserError
    from focalnet_jax.evaluation.ensemble import make_ensemble
    from focalnet_jax.evaluation.inference import Predictor, check_scores

    predictors = []
    for components in ("t2w,adc,hbv", "t2w,hbv,adc"):
        config = tiny_config(overrides=[f"--config.data.components={components}"])
        spec = RunSpec.from_config(config, num_devices=1, image_size=(32, 32))
        variables = spec.model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
        variables = jax.tree.map(np.array, variables)  # writable copies
        if components.endswith("adc"):  # its hbv channel (1) overflows to infinity
            variables["params"]["backbone"]["conv1"]["kernel"][:, :, 1] = 1e38
        predictors.append(Predictor.from_variables(spec, variables, batch_size=2))
    runs = [Path("runA"), Path("runB")]
    models = make_ensemble(predictors, runs, [None, None])
    images = np.zeros((2, 32, 32, 3), np.float32)
    images[..., models.components.index("hbv")] = 0.5
    scores = models(images)
    with pytest.raises(UserError) as refused:
        check_scores(models, "c1", images, scores)
    assert str(refused.value) == (
        "case c1: checkpoint runB gives non-finite scores (NaN) from finite variables: the model "
        "is unusable; retrain it, or leave its run out (name the others with --checkpoint)"
    )
