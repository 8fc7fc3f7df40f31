"""Study specs and recorded study files that are refused in one line naming the file and the field,
before anything runs: bad values, stores moved or stale, arm names, SLURM options, damaged
state, metrics or jobs files, run flags, the run lock."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import study_calls
from study_calls import ARMS, one_line_error, write_spec
from test_train_helpers import REPO

from focalnet_jax.file_lock import acquire_lock, release_lock
from focalnet_jax.study.cells import RUN_LOCK

store = study_calls.store  # a module-scoped fixture
spec_file = study_calls.spec_file  # a module-scoped fixture


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--spec.repeats=0", "repeats=0: expected an integer >= 1"),
        # Each cell trained in full, then failed in `focalnet evaluate`; the study, recorded
        # with it, refused the corrected value.
        ("--spec.evaluate.picai_bootstraps=-1",
         "evaluate.picai_bootstraps=-1: expected an integer >= 0"),
        # Repeat 0's seed was checked (its arm configs), repeat 1's cells failed at their start.
        ("--spec.seed=9223372036854775807",
         "seed=9223372036854775807: repeats 0..1 train with seeds seed..seed+1, each expected in "
         "[0, 2**63)"),
        ("--spec.ensembles.both=('ce','xx')", "ensemble 'both'"),
        ("--spec.store=/no/such/store", "store '/no/such/store' does not exist"),
        ("--spec.store=", "the spec names no store: give --spec FILE:STORE or --spec.store=STORE"),
        ("--spec.arms.ce.loss.mfl=true", "loss.mfl=True with loss.name='sigmoid_ce'"),
        ("--spec.folds=(2,)", "folds=[2]"),
        # A fold given twice ran each of its cells twice and counted it twice in the report.
        ("--spec.folds=(0,1,0)", "error: folds=[0, 1, 0]: expected each fold once"),
        ("--spec.arms.ce.loss.nme=x", "arm 'ce' on base "),
        ("--spec.arms.ce.loss.nme=x", ": --config.loss.nme: unknown config key 'loss.nme'"),
        ("--spec.common.train.stpes=5", "error: common on base "),  # not the first arm's
        ("--spec.common.train.stpes=5", ": --config.train.stpes: unknown config key 'train.stpes'"),
        ("--spec.common.train.epochs=many", "common on base "),
        ("--spec.common.train.epochs=many", ": --config.train.epochs=many: expected an integer"),
        ("--spec.comon.train.steps=5", "--spec.comon.train.steps: unknown config key 'comon'"),
        # An ensemble of one arm twice is that arm, compared with itself in stats.csv.
        ("--spec.ensembles.both=('ce','ce')",
         "ensemble 'both': arm 'ce' is named twice, in ['ce', 'ce']"),
        # slurm options were checked only once study.json and the task list were written.
        ("--spec.slurm.time=8h", "slurm.time '8h': expected a SLURM time limit"),
        ("--spec.slurm.extra=(1,)", "slurm.extra=[1]: expected a list of '#SBATCH' options"),
        ("--spec.slurm.extra=('--qos=x\\necho INJECTED',)",
         "slurm.extra item '--qos=x\\necho INJECTED': expected one '#SBATCH' option on one line"),
        ("--spec.slurm.extra=(' ',)", "slurm.extra item ' ': expected one '#SBATCH' option"),
    ],
)  # fmt: skip
def test_bad_spec_is_a_one_line_error_before_anything_runs(spec_file, tmp_path, override, expected):
    workdir = tmp_path / "bad"
    message = one_line_error("run", "--spec", str(spec_file), "--workdir", str(workdir), override)
    assert expected in message
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("repeats", True, "repeats=True: expected an integer >= 1"),
        ("folds", (True,), "folds=[True]: expected folds in 0..1"),
        ("num_folds", True, "num_folds=True: expected an integer >= 2"),
    ],
)
def test_a_bool_count_in_a_spec_file_is_refused(spec_file, key, value, expected):
    """True is an int in Python: `folds = (True,)` in a spec file ran fold 1 alone."""
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    spec = load_spec(str(spec_file))
    spec[key] = value
    with pytest.raises(StudyError, match=f"^{re.escape(expected)}$"):
        validate(spec, str(spec_file))


def test_a_study_on_a_store_moved_aside_names_where_it_is(spec_file, tmp_path):
    """A preprocess stopped between its two renames leaves the store moved aside: `study run`
    said only that the store does not exist."""
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    spec = load_spec(str(spec_file))
    spec.store = str(tmp_path / "store")
    aside = tmp_path / ".store.tmp-1@host-0123abcd-89abcdef.old"
    aside.mkdir()
    with pytest.raises(StudyError) as refused:
        validate(spec, str(spec_file))
    assert str(refused.value).startswith(
        f"store '{tmp_path / 'store'}' does not exist (preprocessed store folder); its earlier "
        f"version was moved aside to {aside} by a `focalnet preprocess` stopped"
    )


def test_an_arm_too_deep_for_the_stores_images_is_refused_before_anything_runs(store, tmp_path):
    """A U-Net arm whose `unet_levels` halve the store's images past one pixel passed `study run`
    (its config was checked at the default image size), and every cell of it failed."""
    spec = tmp_path / "unet_study.py"
    spec.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    spec = ml_collections.ConfigDict()\n"
        f"    spec.base = {str(REPO / 'configs' / 'unet_sing.py')!r}\n"
        f"    spec.store = {str(store)!r}\n"
        "    spec.repeats, spec.folds, spec.num_folds = 1, (0,), 2\n"
        "    spec.common = {'model': {'unet_features': 4}}\n"
        "    spec.arms = {'deep': {'model': {'unet_levels': 8}}}\n"
        "    spec.ensembles = {}\n"
        "    return spec\n"
    )
    workdir = tmp_path / "unet"
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(workdir))
    assert "arm 'deep': model.unet_levels=8: the U-Net halves its input 8 times" in message
    assert not workdir.exists()


def test_a_study_takes_new_slurm_options_and_records_them(spec_file, tmp_path):
    """`slurm` says where the cells run, not what they compute: a study recorded with one time
    limit is run with another (it was refused as 'a study with other ['slurm']'), which is
    recorded for the next run; a changed seed is still refused."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    longer = ["--spec.slurm.time=08:00:00", "--spec.slurm.gpus=2"]
    study = Study.create(workdir, validate(load_spec(str(spec_file), longer), str(spec_file)))
    assert study.plain["slurm"]["time"] == "08:00:00"
    recorded = Study.open(workdir).plain["slurm"]
    assert (recorded["time"], recorded["gpus"]) == ("08:00:00", 2)
    message = one_line_error("run", "--spec", str(spec_file), "--workdir", str(workdir),
                              "--spec.seed=7", "--dry-run")  # fmt: skip
    assert "this folder holds a study with other ['seed']" in message


def test_a_damaged_state_metrics_or_jobs_file_is_a_one_line_error_naming_it(spec_file, tmp_path):
    """A cell's state file or metrics cut short (written on a node that crashed) ended `study
    status`, `study run` and `study report` with a JSONDecodeError traceback naming no file."""
    from focalnet_jax.study import slurm
    from focalnet_jax.study.cells import METRICS_JSON, STATE_FILE, Study
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    workdir = tmp_path / "s"
    study = Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    cell = study.cell("ce/rep0/fold0")
    state = study.path(cell) / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text('{"state": "do')
    for command in (["status"], ["run", "--dry-run"]):
        message = one_line_error(*command, "--workdir", str(workdir))
        assert f"error: {state}: not a readable cell state file (" in message
        assert message.endswith("remove it, and `study run` runs the cell again (resuming its "
                                "checkpoint)")  # fmt: skip
    study.write_state(cell, "done")
    metrics = study.path(cell) / METRICS_JSON
    metrics.parent.mkdir(parents=True)
    metrics.write_text("")
    message = one_line_error("report", "--workdir", str(workdir), "--partial")
    assert f"error: {metrics}: not a readable metrics file (Expecting value: " in message
    assert message.endswith("remove it, and `study run` evaluates the cell again")
    jobs = workdir / "slurm" / slurm.JOBS_FILE
    jobs.parent.mkdir()
    for text in ('{"job": "1"}', "[1]"):  # an object; an array of another type
        jobs.write_text(text)
        with pytest.raises(StudyError, match=re.escape(f"{jobs}: not a readable list of submit")):
            slurm.read_jobs(study)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--parallel", "0"], "--parallel 0: expected >= 1"),
        (["--devices", "abc"], "--devices 'abc': expected comma-separated GPU ids (integers >= 0)"),
        (["--devices", "0,-1"], "--devices '0,-1': expected comma-separated GPU ids"),
        # Two workers on one GPU (--dry-run: were it let through, nothing would run).
        (["--devices", "0,0", "--dry-run"], "--devices '0,0': GPU 0 is given twice"),
        (["--devices", "1,0,01", "--dry-run"], "--devices '1,0,01': GPU 1 is given twice"),
        # More cells at once than GPUs: a dry run said "3 at once", a real run refused it only
        # after recording the study.
        (["--parallel", "3", "--devices", "0,1"], "--parallel 3: more than the 2 GPUs ['0', '1']"),
        (["--parallel", "3", "--devices", "0,1", "--dry-run"], "--parallel 3: more than the 2"),
        (["--executor", "slurm", "--time", "banana"], "--time 'banana': expected a SLURM time"),
        (["--executor", "slurm", "--time", "1-2:3:4:5"], "--time '1-2:3:4:5': expected a SLURM"),
        # An empty --time dropped the spec's slurm.time from the job script.
        (["--executor", "slurm", "--time", ""], "--time '': expected a SLURM time limit"),
        # A newline wrote a shell line into the job script.
        (
            ["--executor", "slurm", "--sbatch", "--qos=x\necho INJECTED"],
            "--sbatch '--qos=x\\necho INJECTED': expected one '#SBATCH' option on one line",
        ),
        (["--executor", "slurm", "--sbatch=--qos=x\rid"], "--sbatch '--qos=x\\rid': expected"),
        (["--executor", "slurm", "--sbatch="], "--sbatch '': expected one '#SBATCH' option"),
        (
            ["--executor", "slurm", "--partition", "gpu\necho INJECTED"],
            "--partition 'gpu\\necho INJECTED': expected partition names separated by commas",
        ),
        # A flag of the other executor was ignored without a word.
        (["--gpus", "2"], "--gpus is a SLURM setting: it needs --executor slurm"),
        (["--sbatch=--hold"], "--sbatch is a SLURM setting: it needs --executor slurm"),
        (
            ["--executor", "slurm", "--parallel", "4"],
            "--parallel is for --executor local (SLURM places each cell's task)",
        ),
    ],
)
def test_run_flags_are_checked_before_anything_is_written(spec_file, tmp_path, flags, expected):
    workdir = tmp_path / "s"
    message = one_line_error("run", "--spec", str(spec_file), "--workdir", str(workdir), *flags)
    assert expected in message
    assert not workdir.exists()


def test_a_run_refused_for_the_lock_records_nothing(spec_file, tmp_path):
    """A `study run` refused because another holds the run lock recorded its grown spec first
    (repeats 2 -> 3), which then could never be shrunk back. The spec is recorded under the lock."""
    workdir = tmp_path / "s"
    argv = ["run", "--spec", str(spec_file), "--workdir", str(workdir)]
    one_line_error(*argv, "--parallel", "0")  # refused: nothing made
    assert not workdir.exists()
    workdir.mkdir()
    holder = acquire_lock(workdir / RUN_LOCK)
    try:
        message = one_line_error(*argv, "--spec.repeats=3")
    finally:
        release_lock(holder)
    assert "another `study run`" in message
    assert not (workdir / "study.json").exists()


def test_devices_outside_the_visible_gpus_are_refused(spec_file, tmp_path, monkeypatch):
    """Inside an allocation of GPUs 2 and 3, `--devices 0,1` set each cell's
    CUDA_VISIBLE_DEVICES to GPUs the allocation does not hold."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    workdir = tmp_path / "s"
    argv = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--dry-run"]
    message = one_line_error(*argv, "--devices", "2,0")
    assert message.endswith(
        "--devices '2,0': GPU 0 is not among this process's CUDA_VISIBLE_DEVICES='2,3'; give ids "
        "from it (they are the system's ids, as CUDA_VISIBLE_DEVICES takes them) or leave "
        "--devices out"
    )
    assert not workdir.exists()


def test_slurm_time_formats():
    from focalnet_jax.study.slurm_options import check_time

    for value in ("90", "30:00", "04:00:00", "2-12", "2-12:30", "2-12:30:00", "120:00:00"):
        assert check_time(value) == value
    for value in ("banana", "1:2:3:4", "-5", "1-", "4h", "01:00 ", ""):
        with pytest.raises(ValueError, match="expected a SLURM time limit"):
            check_time(value)


def test_arm_name_with_a_dot_is_a_one_line_error_naming_it(store, tmp_path):
    spec = write_spec(tmp_path / "dot.py", store, arms={"../x": ARMS["ce"]}, ensembles={})
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert message.endswith("name '../x': expected letters, digits, '_', '-' (no dots)")
    spec = write_spec(tmp_path / "slash.py", store, arms={"a/b": ARMS["ce"]}, ensembles={})
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'a/b': expected letters, digits, '_', '-'" in message
    # `$` of a plain match would let a trailing newline into the folder name.
    spec = write_spec(tmp_path / "newline.py", store, arms={"ce\n": ARMS["ce"]}, ensembles={})
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'ce\\n': expected letters, digits, '_', '-'" in message
    assert not (tmp_path / "bad").exists()


def test_arm_names_that_differ_only_in_case_are_refused(store, tmp_path):
    """Arms `ce` and `CE` are one folder on a case-insensitive file system: their cells would
    train into, and report, each other's runs."""
    arms = {"ce": ARMS["ce"], "CE": ARMS["ce"]}
    spec = write_spec(tmp_path / "case.py", store, arms=arms, ensembles={})
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert message.endswith(
        "'CE' and 'ce': names that differ only in letter case are one folder on a "
        "case-insensitive file system; rename one"
    )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("arg", ["fold=0", "store=elsewhere"])
def test_a_base_that_sets_the_fold_or_store_is_refused_before_any_cell(spec_file, arg, tmp_path):
    """`base = configs/picai.py:fold=0` passed validation and --dry-run; then every cell of
    another fold failed at its start (`train` refuses `:fold=0` with --config.data.fold=1)."""
    base = f"{REPO / 'configs' / 'focalnet.py'}:{arg}"
    args = ("--spec", str(spec_file), f"--spec.base={base}", "--workdir", str(tmp_path / "bad"))
    message = one_line_error("run", *args, "--dry-run")
    key, field = ("fold", "folds") if arg.startswith("fold") else ("store", "store")
    assert message.endswith(
        f"base {base!r}: its {key}= is for one run; the study sets data.{key} of each cell (its "
        f"{field!r} field): drop {key}= from base"
    )
    assert not (tmp_path / "bad").exists()


def test_corrupt_study_file_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "study.json").write_text('{"arms": ')
    for action in ("status", "run", "report"):
        message = one_line_error(action, "--workdir", str(tmp_path))
        assert f"{tmp_path / 'study.json'}: not a readable study file" in message


def test_a_study_file_without_a_recorded_field_is_a_one_line_error_naming_it(spec_file, tmp_path):
    """`{}` (another program's study.json) ended status, run and report in a KeyError traceback;
    one without `evaluate` passed `run --dry-run`, and each cell then failed."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    recorded = json.loads((workdir / "study.json").read_text())
    del recorded["evaluate"]
    (workdir / "study.json").write_text(json.dumps(recorded))
    for action in ("status", "run", "report"):
        message = one_line_error(
            action, "--workdir", str(workdir), *(["--dry-run"] * (action == "run"))
        )
        assert message.endswith(
            f"{workdir / 'study.json'}: not a readable study file (no evaluate); use a new "
            "--workdir"
        )
    (workdir / "study.json").write_text("{}")
    message = one_line_error("status", "--workdir", str(workdir))
    assert message.endswith(
        "(no base, store, repeats, num_folds, folds, seed, common, arms, ensembles, evaluate, "
        "slurm, spec_file); use a new --workdir"
    )


RECORDED = {
    "base": "/studies/configs/focalnet.py",
    "store": "/studies/store",
    "repeats": 1,
    "num_folds": 2,
    "folds": [0, 1],
    "seed": 0,
    "common": {},
    "arms": {"ce": {}, "fl": {}},
    "ensembles": {"both": ["ce", "fl"]},
    "evaluate": {"picai_bootstraps": 0, "figures": False},
    "slurm": {"partition": "", "time": "", "gpus": 0, "cpus": 0, "throttle": 0, "extra": []},
    "spec_file": "/studies/tiny_study.py",
}  # a study.json as `study run` records it, written by hand (nothing is read from its paths)


def write_recorded(workdir: Path, **changes) -> Path:
    """`workdir/study.json` holding RECORDED with `changes`; returns it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.json").write_text(json.dumps({**RECORDED, **changes}))
    return workdir / "study.json"


@pytest.mark.parametrize(
    ("changes", "argv", "expected"),
    [
        # A TypeError traceback in status; an empty table and exit 0 for repeats < 1.
        ({"repeats": "2"}, ["status"], "repeats='2': expected an integer >= 1"),
        ({"repeats": -1}, ["status"], "repeats=-1: expected an integer >= 1"),
        # A ValueError traceback in report; an AttributeError in a dry run.
        ({"ensembles": "x"}, ["report", "--partial"],
         "ensembles='x': expected a dict: name -> arm names"),
        ({"common": None}, ["run", "--dry-run"], "common=None: expected a dict"),
        # `study cell` trained fold 7 of a 2-fold study.
        ({"folds": [0, 7]}, ["cell", "--cell", "ce/rep0/fold0"], "folds=[0, 7]: expected folds"),
        ({"base": 3}, ["status"], "base=3: expected a path"),
        ({"seed": -1}, ["status"], "seed=-1: repeats 0..0 train with seeds"),
        # A ValueError traceback writing the job script; "--mem" written one letter a line.
        ({"slurm": {**RECORDED["slurm"], "gpus": "two"}}, ["run", "--dry-run"],
         "slurm.gpus='two': expected an integer >= 0"),
        ({"slurm": {**RECORDED["slurm"], "extra": "--mem=4G"}}, ["status"],
         "slurm.extra='--mem=4G': expected a list of '#SBATCH' options"),
    ],
)  # fmt: skip
def test_a_study_file_with_a_field_of_another_type_or_range_is_a_one_line_error(
    tmp_path, changes, argv, expected
):
    """study.json edited by hand is checked on reading as the spec is (`spec.check_fields`)."""
    from focalnet_jax.study.cells import Study

    write_recorded(tmp_path / "ok")
    assert len(Study.open(tmp_path / "ok").cells()) == 4  # unchanged, it reads
    path = write_recorded(tmp_path / "s", **changes)
    message = one_line_error(argv[0], "--workdir", str(tmp_path / "s"), *argv[1:])
    assert f"error: {path}: not a readable study file ({expected}" in message
    assert message.endswith("); use a new --workdir")


def test_a_study_recorded_with_slurm_options_now_refused_opens_and_its_job_script_refuses_them(
    tmp_path,
):
    """A study.json recorded before the SLURM options were checked (a time `8h`, an empty or a
    two-line `extra` item) still opens (its trained cells are not lost, and a spec may replace
    the options); the job script refuses the options it would write."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.errors import StudyError
    from focalnet_jax.study.slurm import sbatch_script

    slurm = {**RECORDED["slurm"], "time": "8h", "extra": ["", "--qos=x\necho INJECTED"]}
    write_recorded(tmp_path, slurm=slurm)
    study = Study.open(tmp_path)
    assert len(study.cells()) == 4
    for options, expected in [
        (slurm, "slurm.time '8h': expected a SLURM time limit"),
        ({**slurm, "time": ""}, "slurm.extra item '': expected one '#SBATCH' option on one line"),
        ({**slurm, "time": "", "extra": slurm["extra"][1:]},
         "slurm.extra item '--qos=x\\necho INJECTED': expected one '#SBATCH' option on one line"),
        ({**slurm, "time": "", "extra": [], "partition": "gpu\nid"},
         "slurm.partition 'gpu\\nid': expected partition names separated by commas"),
    ]:  # fmt: skip
        with pytest.raises(StudyError) as refused:
            sbatch_script(study, tmp_path / "tasks.txt", 4, options, "study")
        assert str(refused.value).startswith(expected)


@pytest.mark.parametrize(
    ("record", "argv", "expected"),
    [
        # A ValueError, then a TypeError traceback in report; a TypeError (len) in status.
        ({"state": "done", "attempts": "x"}, ["report"], "attempts 'x': expected a number"),
        ({"state": "done", "total_seconds": None}, ["report", "--partial"],
         "total_seconds None: expected a number"),
        ({"state": 5}, ["status"],
         "state 5: expected one of done, failed, running, interrupted, pending"),
        ({"state": "finished"}, ["status"], "state 'finished': expected one of done, "),
        ({"state": "failed", "seconds": True}, ["status"], "seconds True: expected a number"),
        ({"state": "failed", "attempt_seconds": ["x"]}, ["status"],
         "attempt_seconds ['x']: expected a list of numbers"),
    ],
)  # fmt: skip
def test_a_state_file_with_a_field_of_another_type_is_a_one_line_error_naming_it(
    tmp_path, record, argv, expected
):
    from focalnet_jax.study.cells import STATE_FILE

    write_recorded(tmp_path)
    state = tmp_path / "ce" / "rep0" / "fold0" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"cell": "ce/rep0/fold0", "time": 1.0, **record}))
    message = one_line_error(argv[0], "--workdir", str(tmp_path), *argv[1:])
    assert f"error: {state}: not a readable cell state file ({expected}" in message
    assert message.endswith("remove it, and `study run` runs the cell again (resuming its "
                            "checkpoint)")  # fmt: skip


def test_report_refuses_a_file_where_its_folder_goes_and_keeps_it(tmp_path):
    """A file at DIR/report was moved aside for good to a hidden `.report.tmp-...old` name."""
    write_recorded(tmp_path)
    (tmp_path / "report").write_text("mine")
    for partial in ([], ["--partial"]):
        message = one_line_error("report", "--workdir", str(tmp_path), *partial)
        expected = f"error: report folder {tmp_path / 'report'} exists and is not a folder"
        assert message.endswith(expected)
    assert (tmp_path / "report").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "study.json"]
