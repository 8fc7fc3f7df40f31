"""A run's `config.json` records its paths (`data.store`, `data.splits`) absolute, made so against
the folder training started in, so that `evaluate --workdir` finds the store and the split files
from any folder; a `config.json` saved before, with relative paths, is read against the current
folder (a warning names the file and the folder where they are not there)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from test_train_helpers import REPO, TINY, small_synthetic_store

from focalnet_jax import cli
from focalnet_jax.config_loading import load_config
from focalnet_jax.data.store import open_store
from focalnet_jax.errors import UserError
from focalnet_jax.run import workdir as workdir_lib

CONFIG = str(REPO / "configs" / "focalnet.py")
RUN = [*TINY, "--config.train.steps=1", "--config.loss.mfl=False", "--config.data.num_folds=2"]
RUN += ["--config.data.slices=all"]
# Given folds other than the seeded ones (fold 0 of seed 0 validates on 10000 and 10001).
GIVEN = [
    (["10000_1000000", "10003_1000003"], ["10001_1000001", "10002_1000002"]),
    (["10001_1000001", "10002_1000002"], ["10000_1000000", "10003_1000003"]),
]
RELATIVE = ["--config.data.store=store", "--config.data.splits=splits"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step run trained in folder `root` with `data.store=store`, `data.splits=splits`."""
    root = tmp_path_factory.mktemp("run_paths")
    small_synthetic_store(root, cases=4, seed=2)
    (root / "splits").mkdir()
    for k, (train, val) in enumerate(GIVEN):
        (root / "splits" / f"fold-{k}.json").write_text(json.dumps({"train": train, "val": val}))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        train = ["train", f"--config={CONFIG}", "--workdir=run", *RUN, *RELATIVE]
        assert cli.main(train) == 0
    return root


def test_config_json_records_absolute_paths_and_evaluate_runs_from_another_folder(
    run, tmp_path, monkeypatch
):
    saved = json.loads((run / "run" / workdir_lib.CONFIG_FILE).read_text())["data"]
    assert (saved["store"], saved["splits"]) == (str(run / "store"), str(run / "splits"))
    record = json.loads((run / "run" / "store.json").read_text())
    assert (record["store"], record["val_cases"]) == (str(run / "store"), GIVEN[0][1])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    evaluate = ["evaluate", f"--workdir={run / 'run'}", f"--out={out}", "--no-picai"]
    assert cli.main([*evaluate, "--no-figures"]) == 0  # the store of its config, found from here
    assert sorted(p.stem for p in (out / "predictions").glob("*.npz")) == GIVEN[0][1]
    models = json.loads((out / "predictions" / "models.json").read_text())
    assert models["store"] == {"path": str(run / "store"), "slices": "all"}  # the store read
    # Its fold, recomputed from the saved config (as for a run that recorded no cases).
    spec, _ = workdir_lib.load_for_inference(run / "run")
    split = spec.fold_split(open_store(spec.config.data.store))
    assert (list(split.train_cases), list(split.val_cases)) == GIVEN[0]


def test_a_config_json_with_relative_paths_is_read_against_the_current_folder(
    run, tmp_path, monkeypatch, caplog
):
    old = tmp_path / "old"
    shutil.copytree(run / "run", old)
    path = old / workdir_lib.CONFIG_FILE
    saved = json.loads(path.read_text())
    saved["data"].update(store="store", splits="splits")  # as saved before paths were absolute
    path.write_text(json.dumps(saved))
    monkeypatch.chdir(run)  # the folder it was trained in: it reads and resumes as it did
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        data = workdir_lib.read_config(old).data
    assert (data.store, data.splits) == (str(run / "store"), str(run / "splits"))
    assert not caplog.records
    workdir_lib.check_resumed_config(load_config(CONFIG, [*RUN, *RELATIVE]), old)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        data = workdir_lib.read_config(old).data
        workdir_lib.read_config(old)  # warned once
    assert data.splits == str(elsewhere / "splits")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: data.{key} {key!r} is relative (saved before config.json recorded absolute "
        f"paths) and does not exist relative to the current folder {elsewhere}: run from the "
        "folder the run was trained in, or write its absolute path into config.json"
        for key in ("store", "splits")
    ]
    # A run saved with absolute paths, resumed from here with the same relative ones, would read
    # other split files: refused, naming them.
    with pytest.raises(UserError, match=f"data.splits '{run / 'splits'}' -> '{elsewhere}/splits'"):
        workdir_lib.check_resumed_config(load_config(CONFIG, [*RUN, *RELATIVE]), run / "run")


def test_evaluate_from_another_folder_says_the_relative_store_was_taken_against_it(
    run, tmp_path, monkeypatch, capsys
):
    # `evaluate --workdir` of an old run (data.store 'store' saved relative) from another folder
    # ended with "store <there>/store does not exist", a path the user never typed.
    from focalnet_jax.data.run_store import RECORD_FILE

    old = tmp_path / "old"
    shutil.copytree(run / "run", old, ignore=shutil.ignore_patterns("eval"))
    path = old / workdir_lib.CONFIG_FILE
    saved = json.loads(path.read_text())
    saved["data"].update(store="store", splits=str(run / "splits"))
    path.write_text(json.dumps(saved))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    note = (
        f"(data.store 'store' saved relative in {path} and taken against the current folder "
        f"{elsewhere})"
    )
    evaluate = ["evaluate", f"--workdir={old}", "--no-picai", "--no-figures"]
    for recorded in (True, False):  # the run's store settings recorded (store.json), or not
        if not recorded:
            (old / RECORD_FILE).unlink()
        capsys.readouterr()
        with pytest.raises(SystemExit) as raised:
            cli.main([*evaluate, f"--out={tmp_path / 'eval'}"])
        err = capsys.readouterr().err
        assert raised.value.code == 2 and err.count("\n") == 1, err
        assert err == (
            f"focalnet evaluate: error: store {elsewhere / 'store'} of run {old} does not exist "
            f"{note}: run from the folder the run was trained in, or pass --store\n"
            if recorded
            else f"focalnet evaluate: error: run {old} records no store settings ({RECORD_FILE}) "
            f"and its training store {elsewhere / 'store'} is not readable {note}: its "
            "preprocessing is unknown; restore that store, set data.store in config.json to a "
            "copy, or give a copy as `focalnet evaluate --workdir RUN --store COPY`\n"
        )
    # As the message says: --store names the store, from here.
    assert cli.main([*evaluate, f"--out={tmp_path / 'eval'}", f"--store={run / 'store'}"]) == 0
    assert sorted(p.stem for p in (tmp_path / "eval" / "predictions").glob("*.npz")) == GIVEN[0][1]


def test_evaluate_of_a_run_whose_store_was_moved_aside_names_where_it_is(run, tmp_path, capsys):
    # A preprocess killed between its two renames leaves the store moved aside; `evaluate` said
    # only that the run's store does not exist.
    old = tmp_path / "old"
    shutil.copytree(run / "run", old, ignore=shutil.ignore_patterns("eval"))
    store, aside = tmp_path / "store", tmp_path / ".store.tmp-1@host-0123abcd-89abcdef.old"
    shutil.copytree(run / "store", aside)
    path = old / workdir_lib.CONFIG_FILE
    saved = json.loads(path.read_text())
    saved["data"]["store"] = str(store)
    path.write_text(json.dumps(saved))
    evaluate = ["evaluate", f"--workdir={old}", "--no-picai", "--no-figures"]
    with pytest.raises(SystemExit) as raised:
        cli.main([*evaluate, f"--out={tmp_path / 'eval'}"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"focalnet evaluate: error: store {store} does not exist; its earlier version was moved "
        f"aside to {aside} by a `focalnet preprocess` stopped before it replaced store: run "
        "`focalnet preprocess` again "
    )
