"""A study records what its cells train on (digests of the loaded base config and of the store's
case table) and refuses to start a cell once either changed: `study run` in one line, and a cell
started later from a queue as a failed cell with the reason."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from focalnet_jax.cli import main
from focalnet_jax.study.cell_runner import failure_reason, run_cell
from focalnet_jax.study.cells import STUDY_FILE, Study
from focalnet_jax.study.inputs import INPUTS, check_inputs, splits_digest
from focalnet_jax.study.spec import StudyError

CONFIG = """
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = {seed}
    return config
"""


def _recorded(base, store, **fields) -> dict:
    """A one-cell study's spec as `spec.validate` gives it (every field `Study.open` reads)."""
    plain = {"base": str(base), "store": str(store), "repeats": 1, "num_folds": 5, "folds": [0],
             "seed": 0, "common": {}, "arms": {"ce": {}}, "ensembles": {},
             "evaluate": {"picai_bootstraps": 0, "figures": False},
             "slurm": {"partition": "", "time": "", "gpus": 0, "cpus": 0, "throttle": 0,
                       "extra": []},
             "spec_file": str(base.parent / "spec.py")}  # fmt: skip
    return {**plain, **fields}


@pytest.fixture()
def study(tmp_path):
    """(study folder, base config file, store's cases.json) of a recorded one-cell study."""
    base, store = tmp_path / "base.py", tmp_path / "store"
    base.write_text(CONFIG.format(seed=0))
    store.mkdir()
    (store / "cases.json").write_text(json.dumps({"cases": [{"case_id": "a"}]}))
    Study.create(tmp_path / "study", _recorded(base, store))
    return tmp_path / "study", base, store / "cases.json"


def test_the_recorded_digests_are_those_of_the_loaded_config_and_the_case_table(study):
    root, base, cases = study
    recorded = json.loads((root / STUDY_FILE).read_text())[INPUTS]
    config = '{"seed": 0}'  # ml_collections' JSON of the loaded config
    assert recorded == {
        "base_config": hashlib.sha256(config.encode()).hexdigest(),
        "store_cases": hashlib.sha256(cases.read_bytes()).hexdigest(),
    }
    check_inputs(Study.open(root).plain, root)  # unchanged: no error


def test_a_changed_base_config_or_store_is_refused(study, capsys):
    root, base, cases = study
    original = base.read_text()
    base.write_text(CONFIG.format(seed=1))
    with pytest.raises(StudyError, match="study's base config .* changed") as raised:
        check_inputs(Study.open(root).plain, root)
    assert f"store {cases.parent}" not in str(raised.value)
    base.write_text(original + "\n# a comment changes nothing loaded\n")
    check_inputs(Study.open(root).plain, root)
    cases.write_text(json.dumps({"cases": [{"case_id": "a"}, {"case_id": "b"}]}))
    with pytest.raises(SystemExit) as raised:
        main(["study", "run", "--workdir", str(root)])
    message = capsys.readouterr().err.strip()
    assert raised.value.code == 2 and "\n" not in message
    assert f"the study's store {cases.parent} changed since the study was recorded" in message


def test_a_cell_started_after_a_change_fails_with_the_reason(study):
    root, base, _ = study
    base.write_text(CONFIG.format(seed=1))
    study_ = Study.open(root)
    cell = study_.cell("ce/rep0/fold0")
    assert run_cell(root, cell.name) == 1
    state = study_.state(cell)
    assert state.state == "failed" and "base config" in state.record["error"]
    assert "base config" in study_.log_path(cell).read_text()


def test_a_cell_started_from_a_relative_folder_records_absolute_paths(study, monkeypatch):
    """`study cell --workdir st` recorded the log as `st/.../cell.log`, which `study status`
    run from another folder showed as a path that does not exist there."""
    root, base, _ = study
    base.write_text(CONFIG.format(seed=1))
    monkeypatch.chdir(root.parent)
    assert run_cell(root.name, "ce/rep0/fold0") == 1
    study_ = Study.open(root)
    log = study_.state(study_.cell("ce/rep0/fold0")).record["log"]
    assert log == str(root / "ce/rep0/fold0/cell.log") and Path(log).is_file()


@pytest.mark.parametrize("damage", ["config_broken", "config_gone", "store_gone"])
def test_a_cell_whose_inputs_cannot_be_read_fails_with_the_reason(study, damage):
    """A base config that no longer loads, or a store not there (its file system not mounted on
    the node a queued cell starts on), left the cell `running` with no reason anywhere."""
    root, base, cases = study
    if damage == "config_broken":
        base.write_text(base.read_text() + "\nsyntax error here(\n")
        reason = f"config file {base}: syntax error at line "
    elif damage == "config_gone":
        base.unlink()
        reason = f"config file {base} does not exist"
    else:
        cases.unlink()
        reason = f"store {cases.parent}: cannot read {cases} (No such file or directory)"
    study_ = Study.open(root)
    cell = study_.cell("ce/rep0/fold0")
    assert run_cell(root, cell.name) == 1
    state = study_.state(cell)
    assert state.state == "failed" and state.record["error"].startswith(reason)
    assert f"cell ce/rep0/fold0 failed: {reason}" in study_.log_path(cell).read_text()


def test_a_study_recorded_without_digests_is_not_checked(study):
    root, base, _ = study
    plain = json.loads((root / STUDY_FILE).read_text())
    del plain[INPUTS]
    base.write_text(CONFIG.format(seed=1))
    check_inputs(plain, root)


def test_a_change_of_the_given_split_files_is_refused(tmp_path):
    """`data.splits` (set in `common`) chooses each cell's patients: split files edited between
    cells would give the cells other folds, so their digest is recorded and checked too."""
    base, store, splits = tmp_path / "base.py", tmp_path / "store", tmp_path / "splits.json"
    base.write_text(CONFIG.format(seed=0))
    store.mkdir()
    (store / "cases.json").write_text(json.dumps({"cases": [{"case_id": "a"}]}))
    splits.write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    root = tmp_path / "study"
    Study.create(root, _recorded(base, store, common={"data": {"splits": str(splits)}}))
    recorded = json.loads((root / STUDY_FILE).read_text())[INPUTS]
    assert recorded["splits"] == hashlib.sha256(b"splits.json\0" + splits.read_bytes()).hexdigest()
    check_inputs(Study.open(root).plain, root)  # unchanged: no error
    splits.write_text(json.dumps([{"train": ["b"], "val": ["a"]}]))
    with pytest.raises(StudyError, match=f"study's splits {splits} changed"):
        check_inputs(Study.open(root).plain, root)
    # A study recorded before split files were digested is not checked for them.
    study_file = json.loads((root / STUDY_FILE).read_text())
    del study_file[INPUTS]["splits"]
    check_inputs(study_file, root)


def test_the_digest_of_a_split_folder_covers_the_files_training_reads(tmp_path):
    """A folder's digest: its split files as `data.folds.split_files` lists them (the files
    `read_given_split` reads), by name and bytes; a file training never reads does not count."""
    folder = tmp_path / "picai"
    folder.mkdir()
    for name in ("ds-config-train-fold-0.json", "ds-config-valid-fold-0.json", "fold-1.json"):
        (folder / name).write_text(json.dumps({"subject_list": [name]}))
    expected = hashlib.sha256()
    for name in ("ds-config-train-fold-0.json", "ds-config-valid-fold-0.json", "fold-1.json"):
        expected.update(name.encode() + b"\0" + (folder / name).read_bytes())
    assert splits_digest(str(folder)) == expected.hexdigest()
    (folder / "fold-notes.json").write_text("{}")  # matched `fold-*.json`, never read
    assert splits_digest(str(folder)) == expected.hexdigest()
    (folder / "fold-1.json").write_text("[]")
    assert splits_digest(str(folder)) != expected.hexdigest()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "fold-x.json").write_text("{}")
    with pytest.raises(StudyError, match=f"data.splits {empty}: the folder holds no split files"):
        splits_digest(str(empty))


def test_a_failed_cell_names_the_signal_that_stopped_its_training_not_an_earlier_error_line():
    """A cell whose `focalnet train` was stopped by SIGTERM records the stop line, even after an
    earlier line that looks like an error (a warning naming an exception); a user error or a
    traceback's last line are reasons likewise; without any, the last line."""
    stop = (
        "focalnet train: stopped by SIGTERM at step 7 in w; checkpoint saved, run again to resume"
    )
    warning = "OSError: [Errno 5] a read retried on the way"  # matched the old pattern
    assert failure_reason(["step 6", warning, stop, ""]) == stop
    assert failure_reason(["focalnet train: interrupted by SIGTERM"]) == (
        "focalnet train: interrupted by SIGTERM"
    )
    assert failure_reason(["x", "focalnet train: error: bad", "y"]) == "focalnet train: error: bad"
    assert failure_reason(["Traceback", "KeyError: 'a'", "done"]) == "KeyError: 'a'"
    assert failure_reason(["a", "last words", ""]) == "last words"
    assert failure_reason(["", ""]) is None


def test_a_store_preprocessed_again_from_a_changed_image_is_a_changed_store(tmp_path):
    """The case table held no trace of the stored images: a store rebuilt with `--overwrite`
    after one ADC was re-exported had the same cases.json, and a study's done and remaining
    cells trained on other data without a word. Each record holds its data's SHA-256."""
    import SimpleITK as sitk

    from focalnet_jax.study.inputs import input_digests

    data, store = tmp_path / "data", tmp_path / "store"
    assert main(["synth", f"--out={data}", "--cases=2", "--seed=3", "--small"]) == 0
    preprocess = ["preprocess", "--layout=picai", f"--images={data / 'images'}"]
    preprocess += [f"--labels={data / 'labels'}", f"--out={store}", "--overwrite"]
    base = tmp_path / "base.py"
    base.write_text(CONFIG.format(seed=0))
    plain = {"base": str(base), "store": str(store)}
    assert main(preprocess) == 0
    before = input_digests(plain)
    assert main(preprocess) == 0  # the same images: the same digests
    assert input_digests(plain) == before
    adc = next((data / "images").glob("*/*_adc.mha"))
    image = sitk.ReadImage(str(adc))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 0.6, str(adc))
    assert main(preprocess) == 0
    assert input_digests(plain)["store_cases"] != before["store_cases"]
