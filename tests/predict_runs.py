"""What the resumable-predict tests share: the module-scoped `tiny` fixture, a 2-step run on a
3-case synthetic PI-CAI folder and its uninterrupted prediction (a test module takes it as
`tiny = predict_runs.tiny`), the `predict` command line, a run stopped once it wrote its first
case, and the comparison of an output with the uninterrupted one."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_calls import run_cli
from test_train_helpers import tiny_config

from focalnet_jax.evaluation import batch_predict
from focalnet_jax.evaluation.partial_output import partial_folder

CASES = 3
MAPS = ("lesion_score", "cspca_score", "detection_map")


def _overrides(root: Path) -> list[str]:
    """The settings of the fixture's run, trained on the store in `root`."""
    return ["--config.train.steps=2", "--config.data.slices=all", "--config.loss.mfl=False",
            f"--config.data.store={root / 'store'}", "--config.data.num_folds=2"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{'data': synthetic PI-CAI folder of 3 cases, 'run': a 2-step run, 'reference': an
    uninterrupted prediction of every case}."""
    from focalnet_jax.training import train_and_evaluate

    root = tmp_path_factory.mktemp("resume")
    data, store = root / "data", root / "store"
    run_cli(["synth", f"--out={data}", f"--cases={CASES}", "--seed=3", "--small"])
    run_cli(["preprocess", "--layout=picai", f"--images={data / 'images'}",
             f"--labels={data / 'labels'}", f"--out={store}"])  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        train_and_evaluate(tiny_config(overrides=_overrides(root)), root / "run")
        run_cli([*_predict(root / "run", data / "images", root / "reference")])
    return {"data": data, "run": root / "run", "reference": root / "reference", "root": root}


def _predict(run: Path, images: Path, out: Path, *more) -> list[str]:
    return ["predict", "--checkpoint", str(run), "--layout", "picai", "--images", str(images),
            "--batch-size", "2", "--out", str(out), *map(str, more)]  # fmt: skip


def _cases(images: Path) -> list[str]:
    return sorted(p.name[: -len("_t2w.mha")] for p in images.glob("*/*_t2w.mha"))


def _finished(partial: Path) -> list[str]:
    return sorted(p.name for p in partial.iterdir() if p.is_dir() and not p.name.startswith("."))


def assert_same_outputs(out: Path, reference: Path, extra: tuple[str, ...] = ()) -> None:
    """Same files (but `extra` in `out`); maps equal numerically, detections.csv equal within its
    4 decimals, models.json byte for byte."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files == sorted([*extra, *(str(p.relative_to(reference)) for p in reference.rglob("*"))])
    assert (out / "models.json").read_bytes() == (reference / "models.json").read_bytes()
    for case in _finished(reference):
        for name in MAPS:
            got, want = (sitk.ReadImage(str(d / case / f"{name}.nii.gz")) for d in (out, reference))
            assert got.GetSize() == want.GetSize()
            np.testing.assert_allclose(
                sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want), atol=1e-5
            )
        rows = [list(csv.reader((d / case / "detections.csv").open())) for d in (out, reference)]
        assert rows[0][0] == rows[1][0] and len(rows[0]) == len(rows[1])
        if len(rows[0]) > 1:
            np.testing.assert_allclose(
                np.array(rows[0][1:], float), np.array(rows[1][1:], float), atol=2e-4
            )


def _interrupted(
    tiny, out: Path, monkeypatch, images: Path, *more, run: Path | None = None
) -> None:
    """A run into `out` of the models of `run` (default the fixture's) stopped (as by Ctrl-C)
    once it has written its first case."""
    write = batch_predict.write_case_folder

    def once(partial, case_id, writer):
        if _finished(partial):
            raise KeyboardInterrupt
        return write(partial, case_id, writer)

    with monkeypatch.context() as patched:
        patched.setattr(batch_predict, "write_case_folder", once)
        with pytest.raises(SystemExit) as stopped:
            run_cli([*_predict(run or tiny["run"], images, out), *more])
    assert stopped.value.code == 130
    assert len(_finished(partial_folder(out))) == 1
