"""What the inference tests share: the module-scoped `cv` fixture, a two-fold cross-validation of
a tiny network trained for two steps on a small synthetic PI-CAI store (a test module takes it as
`cv = inference_models.cv`), its exams' files (`exam`), `focalnet predict` of one exam
(`predict_one`) and an image read as an array (`read`)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_calls import run_cli
from test_train_helpers import small_synthetic_store, tiny_config

CASES = 5


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """{'data', 'store', 'cv'}: a small synthetic PI-CAI folder, its store, and `cv/fold0`,
    `cv/fold1` runs (2 steps each) of a two-fold cross-validation on it."""
    from focalnet_jax.training import train_and_evaluate

    root = tmp_path_factory.mktemp("inference")
    store = small_synthetic_store(root, cases=CASES, seed=4)
    overrides = ["--config.train.steps=2", "--config.loss.mfl=False", "--config.data.slices=all",
                 "--config.data.num_folds=2", f"--config.data.store={store}"]  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        for fold in (0, 1):
            config = tiny_config(overrides=[*overrides, f"--config.data.fold={fold}"])
            train_and_evaluate(config, root / "cv" / f"fold{fold}")
    return {"data": root / "data", "store": store, "cv": root / "cv"}


def exam(data: Path, index: int = 0) -> dict[str, Path]:
    """The files of the index-th synthetic case (sorted ids): components and gland mask."""
    t2w = sorted((data / "images").glob("*/*_t2w.mha"))[index]
    case = t2w.name[: -len("_t2w.mha")]
    return {
        "case": case,
        "t2w": t2w,
        "adc": t2w.with_name(f"{case}_adc.mha"),
        "mask": data / "masks" / f"{case}.nii.gz",
    }


def predict_one(checkpoints, files, out, *extra) -> Path:
    argv = ["predict", "--t2w", files["t2w"], "--adc", files["adc"], "--mask", files["mask"]]
    for checkpoint in checkpoints:
        argv += ["--checkpoint", checkpoint]
    run_cli([*argv, "--out", out, *extra])
    return out


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
