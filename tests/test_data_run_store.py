"""A run records its store's settings (`<workdir>/store.json`); resuming, `evaluate --workdir` and
`predict` refuse or avoid a store made with other settings, naming the settings; a run from before
the record still resumes and evaluates, with a one-line warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
from test_train_helpers import REPO, TINY

from focalnet_jax import cli
from focalnet_jax.data.build_store import preprocess_cases
from focalnet_jax.data.layouts import discover_picai
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.run_store import (
    CASE_DATA,
    RECORD_FILE,
    check_run_store,
    read_run_store,
)
from focalnet_jax.data.store import open_store
from focalnet_jax.data.store_settings import VERSION_CHANGE, StaleStoreError
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.ensemble import preprocess_settings
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.run.checkpoint_digests import variables_digest

RUN = [
    *TINY,
    "--config.train.steps=1",
    "--config.loss.mfl=False",
    "--config.data.num_folds=2",
    "--config.data.slices=all",
]


def _train(workdir, store, *extra):
    return cli.main(
        ["train", f"--config={REPO / 'configs' / 'focalnet.py'}", f"--workdir={workdir}",
         *RUN, f"--config.data.store={store}", *extra]
    )  # fmt: skip


def _store(root, out, drop=None, **settings) -> Path:
    """The synthetic cases of `root/data` (but case `drop`) at 32 x 32 pixels (small, so that
    training is quick)."""
    cases = discover_picai(
        root / "data" / "images", root / "data" / "labels", root / "data" / "masks"
    )
    cases = [case for case in cases if case.case_id != drop]
    config = PreprocessConfig(crop_size=32, label_values="isup", **settings)
    return preprocess_cases(cases, out, config=config, progress=False).path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step run on store `a` (B-spline); store `b`: the same cases, linear interpolation."""
    root = tmp_path_factory.mktemp("run_store")
    assert cli.main(["synth", f"--out={root / 'data'}", "--cases=4", "--seed=2", "--small"]) == 0
    a, b = _store(root, root / "store"), _store(root, root / "linear", interpolator="linear")
    assert _train(root / "run", a) == 0
    return {"root": root, "a": a, "b": b, "workdir": root / "run"}


def _user_error(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_training_records_the_store_settings(run):
    record = json.loads((run["workdir"] / RECORD_FILE).read_text())
    store = open_store(run["a"])
    train, val = record.pop("train_cases"), record.pop("val_cases")
    patients = record.pop("train_patients")
    assert patients == sorted({open_store(run["a"]).case(c)["patient_id"] for c in train})
    case_data = record.pop(CASE_DATA)
    assert case_data == {c: store.case(c)["data_sha256"][:16] for c in train + val}
    assert record == {
        "store": str(run["a"]),
        "fingerprint": store.fingerprint,
        "settings": store.settings,
        "total_steps": 1,
    }
    assert record["settings"]["preprocess"]["interpolator"] == "bspline"
    assert val and not set(train) & set(val) and sorted(train + val) == sorted(store.case_ids)


def test_fold_evaluation_uses_the_recorded_validation_cases(run, tmp_path, capsys, caplog):
    """A store rebuilt with the same settings but other cases: the recorded validation cases are
    evaluated where it holds them all, refused (naming the missing ones) where it does not."""
    record = json.loads((run["workdir"] / RECORD_FILE).read_text())
    train, val = record["train_cases"], record["val_cases"]
    without_train = _store(run["root"], tmp_path / "without_train", drop=train[0])
    out = tmp_path / "eval"
    evaluate = ["evaluate", "--workdir", str(run["workdir"]), "--no-picai", "--no-figures"]
    assert cli.main([*evaluate, "--store", str(without_train), "--out", str(out)]) == 0
    assert sorted(p.stem for p in (out / "predictions").glob("*.npz")) == sorted(val)
    metrics = json.loads((out / "metrics.json").read_text())
    weights = [variables_digest(workdir_lib.load_for_inference(run["workdir"])[1])]
    models = [{"run": str(run["workdir"]), "step": 1}]
    store = {"path": str(without_train), "slices": "all"}  # the store read
    assert metrics["models"] == {
        "models": models,
        "tta": "none",
        "weights": weights,
        "store": store,
    }
    without_val = _store(run["root"], tmp_path / "without_val", drop=val[0])
    line = _user_error(
        [*evaluate, "--store", str(without_val), "--out", str(tmp_path / "e2")], capsys
    )
    assert line == (
        f"focalnet evaluate: error: store {without_val} lacks 1 of the {len(val)} validation "
        f"cases run {run['workdir']} recorded: {val[0]}"
    )
    # A record from before the case ids were kept: the fold is recomputed, with a warning.
    old = tmp_path / "old"
    shutil.copytree(run["workdir"], old)
    del record["train_cases"], record["val_cases"]
    (old / RECORD_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert (
            cli.main([*evaluate[:2], str(old), *evaluate[3:], "--out", str(tmp_path / "e3")]) == 0
        )
    assert f"run {old} recorded no validation cases: recomputing fold 0 of store {run['a']}" in [
        r.getMessage() for r in caplog.records
    ]


def test_resume_on_a_store_with_other_settings_is_refused(run, capsys):
    line = _user_error(
        ["train", f"--config={REPO / 'configs' / 'focalnet.py'}", f"--workdir={run['workdir']}",
         *RUN, f"--config.data.store={run['b']}", "--config.train.steps=2"], capsys
    )  # fmt: skip
    assert line == (
        f"focalnet train: error: run {run['workdir']} was trained on store {run['a']}, made with "
        f"other settings than store {run['b']}: preprocess.interpolator: run 'bspline', now "
        "'linear'"
    )
    manager = workdir_lib.make_manager(run["workdir"], read_only=True)
    assert manager.all_steps() == [1]  # nothing trained, nothing saved
    manager.close()


def _relabelled_store(run, tmp_path, case: str) -> Path:
    """`tmp_path/relabelled`: store `a` of the run's data, but an ISUP 3 lesion added to the
    label of `case` (its settings those of store `a`)."""
    shutil.copytree(run["root"] / "data", tmp_path / "data")
    label_file = tmp_path / "data" / "labels" / f"{case}.nii.gz"
    label = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayFromImage(label)
    z, y, x = (n // 2 for n in array.shape)
    array[z, y - 4 : y + 4, x - 4 : x + 4] = 3  # an ISUP 3 lesion at the crop's centre
    relabelled = sitk.GetImageFromArray(array)
    relabelled.CopyInformation(label)
    sitk.WriteImage(relabelled, str(label_file))
    store = _store(tmp_path, tmp_path / "relabelled")
    assert open_store(store).settings == open_store(run["a"]).settings
    return store


def test_resume_on_a_store_with_other_labels_is_refused_and_on_a_moved_one_records_it(
    run, tmp_path, capsys
):
    """Same settings and cases, another label of one training case (e.g. expert labels instead
    of AI-derived ones): the resume trained on other ground truth without a word. A copy of the
    store elsewhere resumes, and store.json then names it, as config.json does."""
    workdir = tmp_path / "run"
    shutil.copytree(run["workdir"], workdir)
    case = json.loads((workdir / RECORD_FILE).read_text())["train_cases"][0]
    other_labels = _relabelled_store(run, tmp_path, case)
    resume = ["train", f"--config={REPO / 'configs' / 'focalnet.py'}", f"--workdir={workdir}",
              *RUN, "--config.train.steps=2"]  # fmt: skip
    line = _user_error([*resume, f"--config.data.store={other_labels}"], capsys)
    assert line == (
        f"focalnet train: error: run {workdir}: store {other_labels} holds other images or labels "
        f"for case {case} (1 case of the run differ) than the store the run trained on: resume "
        "on the store it trained on"
    )
    moved = tmp_path / "moved"
    shutil.copytree(run["a"], moved)
    assert cli.main([*resume, f"--config.data.store={moved}"]) == 0
    record = json.loads((workdir / RECORD_FILE).read_text())
    assert record["store"] == str(moved) == workdir_lib.read_config(workdir).data.store


def test_evaluate_refuses_a_store_with_other_settings(run, capsys, tmp_path):
    out = tmp_path / "eval"
    line = _user_error(
        ["evaluate", "--workdir", str(run["workdir"]), "--store", str(run["b"]), "--out", str(out)],
        capsys,
    )
    assert line.startswith(f"focalnet evaluate: error: run {run['workdir']} was trained on store")
    assert "preprocess.interpolator: run 'bspline', now 'linear'" in line
    assert not out.exists()


def test_evaluate_on_other_labels_of_a_validation_case_says_so(run, tmp_path, caplog):
    """Same settings and cases, another label of a validation case (corrected since, or the
    data of another dataset under the same ids): the metrics were reported as the run's fold
    without a word. They are of the data the store holds now, which a warning names."""
    case = json.loads((run["workdir"] / RECORD_FILE).read_text())["val_cases"][0]
    store = _relabelled_store(run, tmp_path, case)
    argv = ["evaluate", "--workdir", run["workdir"], "--store", store, "--out", tmp_path / "e",
            "--no-picai", "--no-figures"]  # fmt: skip
    caplog.set_level("WARNING", logger="focalnet_jax")
    assert cli.main([str(a) for a in argv]) == 0
    assert (
        f"store {store} holds other images or labels for 1 case of run {run['workdir']} than the "
        f"store it trained on (first: {case}): evaluated on the data the store holds now"
    ) in caplog.messages
    caplog.clear()
    argv[4] = run["a"]
    assert cli.main([str(a) for a in argv]) == 0
    assert not [m for m in caplog.messages if "other images or labels" in m]


def test_a_run_from_before_the_record_resumes_and_evaluates_with_a_warning(run, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(run["workdir"], old)
    (old / RECORD_FILE).unlink()
    evaluate = ["evaluate", "--workdir", str(old), "--out", str(tmp_path / "eval"), "--no-picai"]
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert cli.main([*evaluate, "--no-figures"]) == 0
    warnings = [r.getMessage() for r in caplog.records if RECORD_FILE in r.getMessage()]
    assert warnings == [
        f"run {old} has no {RECORD_FILE} (trained before store settings were recorded): "
        f"store {run['a']} not checked"
    ]
    assert (tmp_path / "eval" / "metrics.json").is_file()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert _train(old, run["a"]) == 0  # resumes at its last step: nothing left to train
    warnings = [r.getMessage() for r in caplog.records if RECORD_FILE in r.getMessage()]
    assert warnings == [
        f"run {old} has no {RECORD_FILE} (started before store settings were recorded): "
        f"recording store {run['a']}"
    ]
    assert json.loads((old / RECORD_FILE).read_text())["store"] == str(run["a"])


def test_predict_preprocesses_as_the_run_was_trained(run, tmp_path, caplog):
    config = workdir_lib.read_config(run["workdir"])
    assert preprocess_settings(config, run["workdir"])["interpolator"] == "bspline"
    # The training store rebuilt with other settings since: the recorded settings still hold.
    config.data.store = str(run["b"])
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert preprocess_settings(config, run["workdir"])["interpolator"] == "bspline"
    assert any(
        f"store {run['b']} was rebuilt since training (interpolator: run 'bspline', store "
        "'linear')" in r.getMessage()
        for r in caplog.records
    )
    # A run without a record: the training store's settings, as before.
    old = tmp_path / "old"
    shutil.copytree(run["workdir"], old, ignore=shutil.ignore_patterns(RECORD_FILE))
    assert preprocess_settings(config, old)["interpolator"] == "linear"
    # Neither a record nor the training store: the preprocessing is unknown, an error.
    config.data.store = str(tmp_path / "gone")
    with pytest.raises(UserError) as raised:
        preprocess_settings(config, old)
    assert str(raised.value) == (
        f"run {old} records no store settings ({RECORD_FILE}) and its training store "
        f"{tmp_path / 'gone'} is not readable: its preprocessing is unknown; restore that store, "
        "set data.store in config.json to a copy, or give a copy as `focalnet evaluate --workdir "
        "RUN --store COPY`"
    )
    # A copy given (evaluate --workdir RUN --store COPY) is read instead of data.store.
    assert preprocess_settings(config, old, run["b"])["interpolator"] == "linear"
    with pytest.raises(UserError, match=f"store {tmp_path / 'gone2'} \\(--store\\) is not read"):
        preprocess_settings(config, old, tmp_path / "gone2")


def test_check_run_store_ignores_only_the_named_keys(run):
    settings = open_store(run["a"]).settings
    annotated = {**settings, "slices": "annotated"}
    check_run_store(run["workdir"], annotated, against="x", ignore=("slices",))
    with pytest.raises(StaleStoreError, match="slices: run 'all', now 'annotated'"):
        check_run_store(run["workdir"], annotated, against="x")


def test_predict_names_a_given_component_the_model_does_not_use(run, tmp_path, caplog):
    case = next((run["root"] / "data" / "images").glob("*/*_t2w.mha"))
    files = {c: str(case).replace("_t2w.mha", f"_{c}.mha") for c in ("t2w", "adc", "hbv")}
    argv = ["predict", f"--checkpoint={run['workdir']}", f"--out={tmp_path / 'pred'}"]
    argv += [f"--{c}={path}" for c, path in files.items()]
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert cli.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert warnings == [
        "component(s) ['hbv'] of the exam not used: the model(s) were trained on ['t2w', 'adc']"
    ]
    assert (tmp_path / "pred" / "detection_map.nii.gz").is_file()


def test_a_process_that_does_not_write_the_record_does_not_warn_of_its_absence(tmp_path, caplog):
    """Process 1 of a new two-process run may find the config.json that process 0 has just
    written and not yet its store.json: it warned that the run had started before store settings
    were recorded. Only the writer warns."""
    from test_train_helpers import FakeStore

    from focalnet_jax.data.run_store import record_run_store

    (tmp_path / "config.json").write_text("{}")
    store = FakeStore()
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        record_run_store(tmp_path, store, write=False)
        assert caplog.records == [] and not (tmp_path / RECORD_FILE).exists()
        record_run_store(tmp_path, store, write=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"run {tmp_path} has no {RECORD_FILE} (started before store settings were recorded): "
        f"recording store {store.path}"
    ]


@pytest.mark.parametrize(
    "record",
    ["[]", "{}", '{"store": "/s", "settings": null}', '{"store": 1, "settings": {}}'],
)
def test_a_malformed_store_record_is_refused_in_one_line(tmp_path, record):
    """Before, `store.json` of a list, without settings or with null settings ended in a
    TypeError, KeyError or AttributeError traceback."""
    (tmp_path / RECORD_FILE).write_text(record)
    with pytest.raises(StaleStoreError) as refused:
        read_run_store(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path / RECORD_FILE}: not a store record (expected an object with a 'store' path "
        "and its 'settings' object)"
    )
    (tmp_path / RECORD_FILE).write_text('{"store": "/s", "settings": {}, "train_cases": "a"}')
    with pytest.raises(StaleStoreError, match=r"'train_cases' is not a list of ids$"):
        read_run_store(tmp_path)


@pytest.mark.parametrize("all_cases", [False, True])
def test_a_stop_after_new_predictions_leaves_no_metrics_of_the_earlier_ones(
    run, tmp_path, monkeypatch, all_cases
):
    """`evaluate --workdir` again into the same --out, stopped (Ctrl-C) after its new predictions
    were swapped in and before their metrics were written: the earlier metrics.json and
    report.md stayed beside the new predictions, a folder that contradicted itself."""
    from focalnet_jax.data import atomic_files
    from focalnet_jax.evaluation import evaluate

    out = tmp_path / "eval"
    argv = ["evaluate", "--workdir", str(run["workdir"]), "--out", str(out), "--no-picai"]
    if all_cases:
        argv += ["--all-cases", "--store", str(run["a"]), "--allow-training-cases"]
    assert cli.main([*argv, "--no-figures"]) == 0
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    first = json.loads((out / "predictions" / "models.json").read_text())
    assert first["tta"] == "none"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    # Stopped while the new predictions reach the disk: the earlier ones and their metrics stay.
    with monkeypatch.context() as patch:
        patch.setattr(atomic_files, "sync_folder", stopped)
        with pytest.raises(SystemExit) as raised:
            cli.main([*argv, "--no-figures", "--tta", "flip"])
    assert raised.value.code == 130
    assert json.loads((out / "predictions" / "models.json").read_text()) == first
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    monkeypatch.setattr(evaluate, "evaluate_predictions", stopped)
    with pytest.raises(SystemExit) as raised:
        cli.main([*argv, "--no-figures", "--tta", "flip"])
    assert raised.value.code == 130
    assert json.loads((out / "predictions" / "models.json").read_text())["tta"] == "flip"
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()


def test_a_run_trained_on_a_store_of_another_version_is_named_in_a_warning(run, tmp_path, caplog):
    """A run trained on a store of an earlier format version was preprocessed for predict as
    this version without a word, its inputs differing from those it trained on."""
    old = tmp_path / "old"
    shutil.copytree(run["workdir"], old)
    record = json.loads((old / RECORD_FILE).read_text())
    record["settings"]["version"] = 2
    (old / RECORD_FILE).write_text(json.dumps(record))
    config = workdir_lib.read_config(old)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert preprocess_settings(config, old) == record["settings"]["preprocess"]
        assert preprocess_settings(config, run["workdir"])
    warning = (
        f"run {old} was trained on a store of format version 2; preprocessing as version 4 "
        f"({VERSION_CHANGE}): its inputs may differ slightly from those it was trained on"
    )
    assert [r.getMessage() for r in caplog.records] == [warning]
    # evaluate --workdir on a store of this version: evaluated, with the warning (it was
    # refused as "made with other settings: version: run 2, now 3").
    caplog.clear()
    evaluate = ["evaluate", "--workdir", str(old), "--out", str(tmp_path / "eval"), "--no-picai"]
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert cli.main([*evaluate, "--no-figures"]) == 0
    assert warning in [r.getMessage() for r in caplog.records]
