"""What a study may become: a spec that adds runs (and nothing else), overrides that add config
keys, relative paths recorded absolute, arms checked as their cells would be, dry runs, the shipped
specs, the slices and compilation cache its cells share."""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import pytest
import study_calls
from study_calls import ARMS, one_line_error, stale_copy, study, write_spec
from test_train_helpers import REPO

store = study_calls.store  # a module-scoped fixture
spec_file = study_calls.spec_file  # a module-scoped fixture


def test_dry_run_refuses_a_changed_spec_as_the_real_run_does(spec_file, tmp_path):
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    recorded = (workdir / "study.json").read_text()
    run = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor", "slurm"]
    for dry in ([], ["--dry-run"]):
        message = one_line_error(*run, *dry, "--spec.common.train.steps=4")
        assert "this folder holds a study with other ['common']" in message
    assert (workdir / "study.json").read_text() == recorded
    assert sorted(p.name for p in workdir.iterdir()) == ["study.json"]


def test_spec_may_add_runs_to_a_study_and_nothing_else(spec_file, store, tmp_path, capsys):
    """More repeats, folds, arms or ensembles add cells (the done ones keep their configs), so a
    benchmark can grow from 10 to 20 runs per arm in its folder; fewer runs or a changed arm is
    refused, and a dry run of a growth writes nothing."""
    from focalnet_jax import cli
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    gl = {"loss": {"name": "focal", "mfl": False, "gamma": 1.0}}
    with_gl = write_spec(tmp_path / "with_gl.py", store, arms={**ARMS, "gl": gl})

    def plain(*overrides, spec=spec_file):
        return validate(load_spec(str(spec), overrides), str(spec))

    workdir = tmp_path / "s"
    Study.create(workdir, plain("--spec.folds=(0,)"))
    recorded = (workdir / "study.json").read_text()
    run = ["study", "run", "--spec", str(spec_file), "--workdir", str(workdir), "--dry-run"]
    assert cli.main([*run, "--spec.folds=(0,)", "--spec.repeats=3"]) == 0
    assert "dry run: 6 cells would run" in capsys.readouterr().out
    assert (workdir / "study.json").read_text() == recorded
    grown = Study.create(workdir, plain("--spec.repeats=3", spec=with_gl))
    assert "study grows (repeats 2 -> 3; folds [1]; arms ['gl'])" in capsys.readouterr().out
    assert len(Study.open(workdir).cells()) == len(grown.cells()) == 3 * 3 * 2
    run[3] = str(with_gl)
    for changed, fields in (
        (["--spec.repeats=2"], "['repeats']"),
        (["--spec.repeats=3", "--spec.arms.gl.loss.gamma=2.0"], "['arms']"),
        (["--spec.repeats=3", "--spec.seed=1"], "['seed']"),
    ):
        message = one_line_error(*run[1:], *changed)
        assert f"this folder holds a study with other {fields}; use a new --workdir" in message


def test_spec_overrides_take_a_value_after_a_space_as_config_overrides_do(
    spec_file, tmp_path, capsys
):
    """`--spec.repeats 3` was refused (`unrecognized argument`), where `--config.train.steps 3`
    works for `focalnet train`; both forms now give the same spec."""
    from focalnet_jax import cli
    from focalnet_jax.study.spec import load_spec

    spaced = load_spec(str(spec_file), ["--spec.repeats", "3", "--spec.common.train.steps", "7"])
    joined = load_spec(str(spec_file), ["--spec.repeats=3", "--spec.common.train.steps=7"])
    assert spaced.to_dict() == joined.to_dict()
    assert (spaced.repeats, spaced.common.train.steps) == (3, 7)
    run = ["run", "--spec", str(spec_file), "--workdir", str(tmp_path / "s"), "--dry-run"]
    assert cli.main(["study", *run, "--spec.repeats", "3", "--spec.folds", "(0,)"]) == 0
    assert "dry run: 6 cells would run" in capsys.readouterr().out  # 2 arms x 3 repeats
    message = one_line_error(*run, "--spec.repeats")
    assert message.endswith("override '--spec.repeats' has no value")


def test_a_growth_refused_for_changed_inputs_writes_nothing(spec_file, tmp_path):
    """A study grown (`--spec.repeats=3`) after its store changed was refused only after the
    grown study.json was written; a dry run did not compare the inputs at all."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.inputs import INPUTS
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    recorded = json.loads((workdir / "study.json").read_text())
    recorded[INPUTS]["store_cases"] = "0" * 64  # as if the store's cases changed since
    (workdir / "study.json").write_text(json.dumps(recorded))
    before = (workdir / "study.json").read_text()
    run = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--spec.repeats=3"]
    for dry in (["--dry-run"], []):
        message = one_line_error(*run, *dry)
        assert "the study's store" in message and "changed since the study was recorded" in message
    assert (workdir / "study.json").read_text() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["study.json"]


def test_paths_are_recorded_absolute_and_a_study_with_relative_ones_resumes(
    spec_file, store, tmp_path, monkeypatch, capsys
):
    """`common`'s split files (and an arm's pretrained weights) given relative to the folder the
    study starts in are recorded absolute, as training records a run's paths, so `study run` or
    a cell started from another folder reads the same files. A study.json recorded before, with
    relative paths, resumes from its folder and is recorded with absolute ones."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.inputs import check_inputs
    from focalnet_jax.study.spec import cell_overrides, load_spec, validate

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    (start / "splits").mkdir(parents=True)
    (start / "weights").mkdir()
    (start / "weights" / "resnet.npz").touch()  # only its path is used here
    elsewhere.mkdir()
    ids = sorted(c["case_id"] for c in json.loads((store / "cases.json").read_text())["cases"])
    for k in (0, 1):
        val = ids[k::2]
        fold = {"train": [i for i in ids if i not in val], "val": val}
        (start / "splits" / f"fold-{k}.json").write_text(json.dumps(fold))
    overrides = ["--spec.folds=(0,)", "--spec.repeats=1", "--spec.common.data.splits=splits"]
    overrides.append("--spec.arms.fl.model.pretrained=weights/resnet.npz")
    monkeypatch.chdir(start)
    plain = validate(load_spec(str(spec_file), overrides), str(spec_file))
    assert plain["common"]["data"]["splits"] == str(start / "splits")
    assert plain["arms"]["fl"]["model"]["pretrained"] == str(start / "weights" / "resnet.npz")
    assert plain["arms"]["ce"] == ARMS["ce"]  # no path: unchanged
    assert f"--config.data.splits={start / 'splits'}" in cell_overrides(plain, "ce", 0, 0)
    # A study recorded with the relative paths, as before: resumed from its folder, it is the
    # same study, now recorded absolute; from another folder its cells read the same files.
    workdir = tmp_path / "s"
    relative = {
        **plain,
        "common": {**plain["common"], "data": {"slices": "all", "splits": "splits"}},
    }
    relative["arms"] = {
        **plain["arms"],
        "fl": {**ARMS["fl"], "model": {"pretrained": "weights/resnet.npz"}},
    }
    Study.create(workdir, relative)
    Study.create(workdir, plain)
    assert "study grows" not in capsys.readouterr().out
    recorded = json.loads((workdir / "study.json").read_text())
    assert recorded["common"] == plain["common"] and recorded["arms"] == plain["arms"]
    monkeypatch.chdir(elsewhere)
    reopened = Study.open(workdir)
    check_inputs(reopened.plain, workdir)
    assert cell_overrides(reopened.plain, "ce", 0, 0) == cell_overrides(plain, "ce", 0, 0)


def test_spec_overrides_may_add_config_keys_to_common_and_arms(store):
    """The shipped bosma22 spec has `common = {}`: `--spec.common.train.steps=500`, as the docs
    show it, was refused (unknown key 'common.train'); common and arm overrides may name any key
    of the base config, read as Python literals, and a typo is still refused by the base."""
    from focalnet_jax.study.spec import StudyError, cell_overrides, load_spec, validate

    bosma22 = f"{REPO / 'configs' / 'studies' / 'bosma22.py'}:{store}"
    overrides = [
        "--spec.num_folds=2",
        "--spec.common.train.steps=500",
        "--spec.arms.ce_fl.loss.weights=(0.25,0.75)",
        "--spec.arms.fl.loss.gamma=1.0",
        "--spec.arms.fl2.loss.name=focal",
        "--spec.arms.fl2.loss.mfl=false",
    ]
    plain = validate(load_spec(bosma22, overrides), bosma22)
    assert plain["common"] == {"train": {"steps": 500}}
    assert plain["arms"]["ce_fl"]["loss"]["weights"] == [0.25, 0.75]
    assert plain["arms"]["fl"]["loss"] == {"name": "focal", "mfl": False, "gamma": 1.0}
    assert plain["arms"]["fl2"] == {"loss": {"name": "focal", "mfl": False}}  # a new arm
    cell = cell_overrides(plain, "ce_fl", 1, 0)
    assert "--config.train.steps=500" in cell and "--config.loss.weights=(0.25, 0.75)" in cell
    with pytest.raises(StudyError, match=r"^common on base .*: unknown config key 'train.stpes'"):
        validate(load_spec(bosma22, [*overrides, "--spec.common.train.stpes=5"]), bosma22)
    with pytest.raises(StudyError, match="unknown config key 'comon'"):
        load_spec(bosma22, ["--spec.comon.train.steps=5"])


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("spec.arms = {'ce': 'sigmoid_ce'}",
         "arm 'ce': 'sigmoid_ce': expected a nested dict of config overrides"),
        ("spec.arms = {'ce': {}}\n    spec.ensembles = {'both': 5}",
         "ensemble 'both': 5: expected a list of arm names"),
    ],
)  # fmt: skip
def test_spec_arms_and_ensembles_of_the_wrong_type_are_one_line_errors(
    store, tmp_path, fields, expected
):
    """A spec file's arm or ensemble of the wrong type gave a traceback (AttributeError,
    TypeError), not the one-line error of every other spec mistake."""
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    path = tmp_path / "typed.py"
    path.write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    spec = ml_collections.ConfigDict()\n"
        f"    spec.base, spec.store = {str(REPO / 'configs' / 'focalnet.py')!r}, {str(store)!r}\n"
        "    spec.repeats, spec.num_folds = 1, 2\n"
        f"    {fields}\n    return spec\n"
    )
    with pytest.raises(StudyError, match="^" + re.escape(expected)):
        validate(load_spec(str(path)), str(path))


def test_an_ensemble_of_lesion_only_and_graded_arms_is_refused(store, tmp_path):
    """An ensemble of a U-Net-Sing arm (binary: its lesion probability in every column) and a
    FocalNet arm averaged the lesion probability into P(GS >= 8) and the rest, and evaluated
    it without a word; `predict` refuses such an ensemble."""
    from focalnet_jax.evaluation.predictions import write_case
    from focalnet_jax.study.ensembles import average_predictions
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    path = tmp_path / "mixed.py"
    path.write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    spec = ml_collections.ConfigDict()\n"
        f"    spec.base, spec.store = {str(REPO / 'configs' / 'focalnet.py')!r}, {str(store)!r}\n"
        "    spec.repeats, spec.num_folds = 1, 2\n"
        "    spec.arms = {'fl': {}, 'sing': {'loss': {'name': 'binary_ce', 'mfl': False}}}\n"
        "    spec.ensembles = {'mix': ('fl', 'sing')}\n    return spec\n"
    )
    expected = (
        "ensemble 'mix': its arms disagree on output encodings (fl: ordinal; sing: binary): a "
        "lesion-only model's score is no P(class >= k) of a graded one"
    )
    with pytest.raises(StudyError, match="^" + re.escape(expected) + "$"):
        validate(load_spec(str(path)), str(path))
    # Predictions of such members (a spec edited since, cells done): refused as they meet.
    for name, encoding in (("a", None), ("b", "binary")):
        write_case(tmp_path / name, "c1", scores=np.full((1, 8, 8, 5), 0.5, np.float32),
                   lesions=np.zeros((1, 8, 8), np.int32), lesion_classes=[],
                   spacing=(1.0, 1.0), patient_id="p1")  # fmt: skip
        record = {"models": [{"run": f"/{name}", "step": 1}], "tta": "none"}
        record |= {"output_encoding": encoding} if encoding else {}
        (tmp_path / name / "models.json").write_text(json.dumps(record))
    with pytest.raises(StudyError, match=r"members disagree on output encodings: .*a: graded; "):
        average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    assert not (tmp_path / "mean").exists()
    (tmp_path / "a" / "models.json").write_text(json.dumps(record))  # both binary: recorded
    average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    assert json.loads((tmp_path / "mean" / "models.json").read_text()) == {
        "output_encoding": "binary"
    }


def test_spec_file_fields_misspelt_are_refused(tmp_path):
    """A spec file's `fold = (1,)` (for `folds`) or `slurm = {"gpu": 1}` (for `gpus`) was kept
    silently: the study ran every fold, its SLURM tasks asked for no GPU."""
    from focalnet_jax.study.spec import StudyError, load_spec

    def spec_with(extra: str) -> str:
        path = tmp_path / "typo.py"
        path.write_text(
            "import ml_collections\n\ndef get_config():\n"
            "    spec = ml_collections.ConfigDict()\n"
            "    spec.base, spec.store, spec.repeats, spec.num_folds = 'b.py', 's', 1, 2\n"
            "    spec.arms = {'ce': {'loss': {'name': 'sigmoid_ce'}}}\n"
            f"    {extra}\n    return spec\n"
        )
        return str(path)

    assert load_spec(spec_with("spec.folds = (1,)")).folds == (1,)
    assert load_spec(spec_with("spec.slurm = {'gpus': 1}")).slurm.gpus == 1
    with pytest.raises(StudyError, match=r"^spec .*typo.py: unknown field 'fold'; expected one of"):
        load_spec(spec_with("spec.fold = (1,)"))
    with pytest.raises(StudyError, match=r"unknown field\(s\) \['slurm.gpu'\]; slurm has \["):
        load_spec(spec_with("spec.slurm = {'gpu': 1, 'time': '01:00:00'}"))
    with pytest.raises(StudyError, match=r"unknown field\(s\) \['evaluate.picai_bootstrap'\]"):
        load_spec(spec_with("spec.evaluate = {'picai_bootstrap': 500}"))
    # A field of another type than its default's ended in ConfigDict's TypeError traceback.
    for extra, message in [
        ("spec.seed = '1'", "seed='1': expected int (its default is 0)"),
        ("spec.seed = 1.5", "seed=1.5: expected int (its default is 0)"),
        ("spec.evaluate = {'picai_bootstraps': 'x'}",
         "evaluate.picai_bootstraps='x': expected int (its default is 0)"),
        ("spec.slurm = {'gpus': 'one'}", "slurm.gpus='one': expected int (its default is 0)"),
    ]:  # fmt: skip
        with pytest.raises(StudyError, match=r"^spec .*typo.py: " + re.escape(message) + "$"):
            load_spec(spec_with(extra))


def test_spec_store_is_opened_before_anything_runs(spec_file, store, tmp_path):
    workdir = tmp_path / "bad"
    run = ["run", "--spec", str(spec_file), "--workdir", str(workdir)]
    empty = tmp_path / "empty"
    empty.mkdir()
    message = one_line_error(*run, f"--spec.store={empty}")
    assert message.startswith("focalnet study run: error: store ")
    assert "no cases.json" in message
    message = one_line_error(*run, f"--spec.store={stale_copy(store, tmp_path)}")
    assert "format version 1" in message
    # The store holds 8 patients (one case each): 9 folds cannot all hold a patient.
    message = one_line_error(*run, "--spec.num_folds=9")
    assert f"num_folds=9: store {store} has only 8 patients" in message
    assert not workdir.exists()


def test_arm_components_must_be_in_the_store(store, tmp_path):
    arms = {"ce": {"data": {"components": ("t2w", "adc", "dce")}}}
    spec = write_spec(tmp_path / "dce.py", store, arms=arms, ensembles={})
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'ce': data.components ('t2w', 'adc', 'dce'): ['dce'] not in store" in message


def test_arm_config_is_checked_as_its_cells_would(store, tmp_path):
    # Valid keys, a value `focalnet train` refuses: refused before any cell starts.
    arms = {"fl": {"loss": {"name": "ordinal_focal", "mfl": True, "mfl_weight": "bogus"}}}
    spec = write_spec(tmp_path / "weight.py", store, arms=arms, ensembles={})
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'fl': loss.mfl_weight: expected 'auto' or a number, got 'bogus'" in message
    assert not (tmp_path / "bad").exists()


def test_verbose_is_accepted_after_every_action(tmp_path, capsys):
    for action in ("status", "report", "cell", "run"):
        argv = [action, "--workdir", str(tmp_path / "none"), "--verbose"]
        argv += ["--cell", "a/rep0/fold0"] if action == "cell" else []
        message = one_line_error(*argv)
        assert message.startswith(f"focalnet study {action}: error: {tmp_path / 'none'}: not a")
        assert "Traceback" in capsys.readouterr().err  # --verbose took effect


@pytest.mark.parametrize(
    ("arm", "expected"),
    [
        ({"loss": {"nme": "x"}}, "arm 'ce' on base"),  # checked against the base config
        ({"seed": 3}, "'seed' is set by the study"),
        ({"data": {"fold_seed": 7}}, "arm 'ce': 'data.fold_seed' chooses the folds, which every"),
        ({"loss": {"name": "ce_focal"}}, "loss.mfl=True with loss.name='ce_focal'"),
        # A cell failed on it only once it started, maybe hours later from a queue.
        ({"model": {"pretrained": "/no/such/r18.npz"}}, "'ce': model.pretrained /no/such/r18.npz:"),
        ({"model": {"pretrained": "None"}}, "None: no such file (without pretrained weights"),
    ],
)
def test_arm_overrides_are_checked_against_the_base_config(store, tmp_path, arm, expected):
    spec = write_spec(tmp_path / "bad.py", store, arms={"ce": arm}, ensembles={})
    message = one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert expected in message
    assert not (tmp_path / "bad").exists()


def test_slurm_dry_run_prints_one_array_of_the_cells_not_done(spec_file, tmp_path):
    args = ["run", "--spec", str(spec_file), "--workdir", str(tmp_path / "s"), "--executor=slurm"]
    args += ["--dry-run", "--throttle=3", "--partition=gpu", "--time=02:00:00", "--gpus=1"]
    script = study(*args, "--sbatch=--qos=short").stdout
    assert "#SBATCH --array=0-7%3" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-task=1" in script and "#SBATCH --qos=short" in script
    assert "#SBATCH --time=02:00:00" in script
    assert f"{sys.executable} -m focalnet_jax.cli study cell --workdir" in script
    assert not (tmp_path / "s").exists()


def test_local_dry_run_prints_the_cell_commands_and_starts_nothing(spec_file, tmp_path):
    workdir = tmp_path / "s"
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--dry-run"]
    lines = study(*args, "--parallel=2").stdout.splitlines()
    assert lines[0] == "8 cells: 0 done, 0 running or queued elsewhere, 8 to run"
    command = f"{sys.executable} -m focalnet_jax.cli study cell --workdir {workdir.resolve()}"
    order = [(r, k, arm) for r in (0, 1) for k in (0, 1) for arm in ("ce", "fl")]
    assert lines[1:9] == [f"{command} --cell {arm}/rep{r}/fold{k}" for r, k, arm in order]
    assert lines[9] == "dry run: 8 cells would run, 2 at once; nothing started"
    assert not workdir.exists()


@pytest.mark.parametrize("name", ["bosma22", "focalnet_ablation", "synthetic_mfl"])
def test_shipped_specs_validate_against_their_base(name, store):
    from focalnet_jax.study.spec import arm_config, load_spec, validate

    plain = validate(load_spec(f"{REPO / 'configs' / 'studies' / name}.py:{store}"), name)
    configs = {arm: arm_config(plain, arm) for arm in plain["arms"]}
    if name == "bosma22":
        assert not any(c.loss.mfl for c in configs.values())
        assert tuple(configs["ce_fl"].loss.weights) == (0.5, 0.5)
        dice = configs["ce_dice"].loss
        assert (dice.name, dice.eps, dice.batch_dice) == ("ce_dice", 1e-5, True)
        assert tuple(dice.weights) == (0.2, 1.0)  # nnU-Net's 1:1 with a CE averaged over 5 bits
        assert sorted(plain["ensembles"]["ensemble"]) == sorted(plain["arms"])
    if name == "focalnet_ablation":
        assert configs["fl_mfl"].loss.mfl and not configs["fl"].loss.mfl
        assert configs["fl_mfl"].loss.mfl_mode == "vmap"  # the paper's MFL under batch norm
        assert configs["unet_sing"].model.name == "unet" and not configs["aug_none"].augment.flip
    if name == "synthetic_mfl":
        assert [c.loss.mfl for c in configs.values()] == [False, False, True]
        assert plain["repeats"] >= 3


def test_local_workers_one_per_gpu_unless_parallel_is_given():
    """`--parallel 1` on a 2-GPU host runs one cell at a time (it was taken for the default and
    became 2); without `--parallel`, one worker per GPU."""
    from focalnet_jax.study import commands, local

    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    args = parser.parse_args(["run", "--workdir", "w", "--parallel", "1"])
    assert local.worker_slots(args.parallel, ["0", "1"]) == 1
    args = parser.parse_args(["run", "--workdir", "w"])
    assert local.worker_slots(args.parallel, ["0", "1"]) == 2
    assert local.worker_slots(args.parallel, []) == 1
    assert local.worker_slots(3, []) == 3


def test_every_cell_and_ensemble_is_evaluated_on_the_studys_slices(store, tmp_path):
    """An arm that trains on annotated slices only, in a study whose common config says all
    slices: its cells were evaluated on its own data.slices, so its FP rate counted the lesion
    slices of the patients with a lesion while the other arm's counted every slice and patient,
    and stats.csv compared the two. Every cell and ensemble now evaluates on the study's."""
    from focalnet_jax.study.cell_runner import cell_commands
    from focalnet_jax.study.cells import Cell, Study
    from focalnet_jax.study.spec import evaluation_slices, load_spec, validate

    arms = {**ARMS, "ce_annotated": {**ARMS["ce"], "data": {"slices": "annotated"}}}
    spec = write_spec(tmp_path / "slices.py", store, arms=arms)
    plain = validate(load_spec(str(spec)), str(spec))
    assert evaluation_slices(plain) == "all"  # common's data.slices, not an arm's
    for arm in arms:
        train, evaluate = cell_commands(Study(tmp_path / "s", plain), Cell(arm, 0, 0))
        assert ("--config.data.slices=annotated" in train) == (arm == "ce_annotated")
        assert evaluate[evaluate.index("--slices") + 1] == "all"


def test_cells_share_the_studys_cache_unless_one_is_set_in_the_environment(
    spec_file, tmp_path, monkeypatch
):
    from focalnet_jax.study.cell_runner import cell_commands
    from focalnet_jax.study.cells import Cell, Study
    from focalnet_jax.study.spec import load_spec, validate

    study_ = Study(tmp_path / "s", validate(load_spec(str(spec_file)), str(spec_file)))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    train, _ = cell_commands(study_, Cell("ce", 0, 0))
    cache = train[train.index("--compilation_cache") + 1]
    assert cache == str((tmp_path / "s" / "compilation_cache").resolve())
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
    train, _ = cell_commands(study_, Cell("ce", 0, 0))
    assert "--compilation_cache" not in train  # `focalnet train` reads the variable itself
