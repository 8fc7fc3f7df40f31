"""`evaluate --all-cases` refuses a test store that is not held out from the runs: a case a run
trained on, or another exam of a patient it trained on (the run's recorded `train_patients`)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from focalnet_jax import cli
from focalnet_jax.data.build_store import preprocess_cases
from focalnet_jax.data.layouts import discover_picai
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.run_store import RECORD_FILE
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.run_predictions import check_held_out


def _run(path, **record):
    path.mkdir()
    (path / RECORD_FILE).write_text(json.dumps({"store": "s", "settings": {}, **record}))
    return path


def _warnings(caplog) -> list[str]:
    """The warnings logged (an earlier CLI test may have left the package logging INFO too)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def runs(tmp_path):
    """Two fold runs of patients p1..p4 (p1 has two exams: a, a2)."""
    fold0 = _run(tmp_path / "fold0", train_cases=["a", "b"], train_patients=["p1", "p2"])
    fold1 = _run(tmp_path / "fold1", train_cases=["c", "d"], train_patients=["p3", "p4"])
    return [fold0, fold1]


def test_a_store_of_other_patients_passes(runs, caplog):
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        check_held_out(runs, {"x": "p9", "y": "p8"}, "test")
    assert not _warnings(caplog)


def test_a_training_case_is_refused_naming_the_run(runs):
    with pytest.raises(UserError) as raised:
        check_held_out(runs, {"x": "p9", "d": "p4"}, "test")
    assert str(raised.value) == (
        f"test store test: 1 of its 2 cases are training cases of run {runs[1]} (d); its metrics "
        "would be training-set numbers: evaluate on held-out cases"
    )


def test_another_exam_of_a_training_patient_is_refused(runs):
    """Case a2 was never trained on, but its patient p1 was (through case a)."""
    test = {"x": "p9", "a2": "p1", "e": "p4", "f": "p4", "g": "p3"}
    with pytest.raises(UserError) as raised:
        check_held_out(runs, test, "test")
    assert str(raised.value) == (
        f"test store test: 1 of its 5 cases are exams of patients run {runs[0]} trained on "
        "(a2 of patient p1); its metrics would not be held-out numbers: evaluate on held-out "
        "patients (if these patient ids name other people, pass --allow-training-cases)"
    )
    with pytest.raises(UserError, match=r"3 of its 4 cases .* \(e of patient p4, f of patient "
                       r"p4, g of patient p3\)"):  # fmt: skip
        check_held_out(runs[1:], {k: v for k, v in test.items() if k != "a2"}, "test")


def test_allowed_overlap_and_old_records_are_warned(runs, tmp_path, caplog):
    old = _run(tmp_path / "old", train_cases=["a"])
    none = _run(tmp_path / "none")
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        check_held_out([*runs, old, none], {"a2": "p1"}, "test", allow_training_cases=True)
    messages = _warnings(caplog)
    assert len(messages) == 3
    assert messages[0].startswith("test store test: 1 of its 1 cases are exams of patients run")
    assert messages[0].endswith("--allow-training-cases) (allowed)")
    assert messages[1:] == [
        f"run {old} recorded no training patients (trained before they were recorded) and its "
        "training store cannot give them: test store test checked by case id only",
        f"run {none} recorded no training cases: test store test not checked against them",
    ]


@pytest.fixture
def store(tmp_path):
    """A preprocessed store of two synthetic cases: 10000_1000000 (patient 10000) and
    10001_1000001 (patient 10001)."""
    data = tmp_path / "data"
    assert cli.main(["synth", f"--out={data}", "--cases=2", "--seed=2", "--small"]) == 0
    cases = discover_picai(data / "images", data / "labels", data / "masks")
    config = PreprocessConfig(crop_size=32, label_values="isup")
    return preprocess_cases(cases, tmp_path / "store", config=config, progress=False).path


def test_an_old_record_takes_its_patients_from_its_training_store(store, tmp_path, caplog):
    """A run recorded before `train_patients`: its training store (still there) says that its
    training case 10000_1000000 is patient 10000's, so another exam of 10000 is refused."""
    old = _run(tmp_path / "old", store=str(store), train_cases=["10000_1000000"])
    test = {"10001_1000001": "10001", "10000_2000000": "10000"}
    with pytest.raises(UserError, match=r"1 of its 2 cases are exams of patients run .*old "
                       r"trained on \(10000_2000000 of patient 10000\)"):  # fmt: skip
        check_held_out([old], test, "test")
    check_held_out([old], {"10001_1000001": "10001"}, "test")  # patient 10001 did not train
    shutil.rmtree(store)  # gone: the case ids alone are checked, warned
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        check_held_out([old], test, "test")
    assert _warnings(caplog) == [
        f"run {old} recorded no training patients (trained before they were recorded) and its "
        "training store cannot give them: test store test checked by case id only"
    ]
