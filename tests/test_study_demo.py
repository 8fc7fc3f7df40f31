"""`make demo` and the synthetic study (`focalnet_jax.study.synthetic`): an older store rebuilt, bad
flags and a missing clone refused before any step, a failed step named, data made with other
arguments refused."""

from __future__ import annotations

import json
import re

import pytest
import study_calls
from study_calls import stale_copy

from focalnet_jax.study.synthetic import focalnet

store = study_calls.store  # a module-scoped fixture


def test_demo_rebuilds_a_store_of_an_older_format(store, tmp_path):
    from focalnet_jax.study.synthetic import _store_is_current

    assert _store_is_current(store)
    assert not _store_is_current(stale_copy(store, tmp_path))
    assert not _store_is_current(tmp_path / "absent")


@pytest.mark.parametrize(
    ("module", "flag", "message"),
    [
        ("focalnet_jax.demo", "--workers=0", "--workers 0: expected at least 1"),
        ("focalnet_jax.demo", "--cases=0", "--cases 0: expected at least 1"),
        ("focalnet_jax.demo", "--seed=-1", "--seed -1: expected 0 to 4294967295"),
        ("focalnet_jax.study.synthetic", "--parallel=0", "--parallel 0: expected at least 1"),
    ],
)
def test_the_demo_and_synthetic_study_refuse_a_bad_flag_before_any_step(
    tmp_path, capsys, module, flag, message
):
    """`--workers 0` was refused by `focalnet preprocess` after the 60 cases were synthesised
    (35 s), `--parallel 0` by `study run` after the store was made; each left `--out` half full."""
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "out"), flag])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m {module}: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("focalnet_jax.demo", "CONFIG"), ("focalnet_jax.study.synthetic", "SPEC")],
)
def test_the_demo_and_synthetic_study_outside_a_clone_stop_before_any_step(
    tmp_path, monkeypatch, module, name
):
    """Installed from a wheel (no configs/), the synthetic study synthesised and preprocessed
    its cases, then failed at `study run` on the missing spec file."""
    import importlib

    imported = importlib.import_module(module)
    monkeypatch.setattr(imported, name, tmp_path / "configs" / "missing.py")
    with pytest.raises(SystemExit, match="not found: run the .* from a clone of the repository"):
        imported.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_failed_step_of_the_demo_names_its_command(tmp_path):
    """`focalnet synth --out failed with status 2`: the command's name and its first flag."""

    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="^focalnet synth failed with status 2$"):
        focalnet(["synth", "--out", str(tmp_path / "afile"), "--cases", "2"])


def test_synthetic_runner_refuses_data_made_with_other_arguments(tmp_path, capsys):
    """`--out` holding data of another `--cases`, `--seed` or `--single-share` was reused: the
    study then ran on data other than the command asked for. `focalnet synth` records what it
    was given in synth.json; data without it (an older version) is rebuilt, its store too."""
    from focalnet_jax.study.synthetic import synthetic_store

    # One preprocessing worker (`focalnet preprocess` itself): no pool started for 2 cases.
    store = synthetic_store(tmp_path, cases=2, seed=0, single_share=0.4, workers=1)
    assert "$ focalnet preprocess" in capsys.readouterr().out
    record = json.loads((tmp_path / "data" / "synth.json").read_text())
    assert (record["cases"], record["seed"], record["config"]["components"]) == (
        2, 0, ["t2w", "adc", "hbv"],
    )  # fmt: skip
    assert record["config"]["t2w_only_share"] == record["config"]["adc_only_share"] == 0.4
    cases = (store / "cases.json").read_bytes()
    assert synthetic_store(tmp_path, cases=2, seed=0, single_share=0.4) == store
    assert "$ focalnet" not in capsys.readouterr().out  # made as asked: kept
    for asked, differ in (
        ({"cases": 3, "seed": 0, "single_share": 0.4}, "cases 2 (asked 3)"),
        ({"cases": 2, "seed": 1, "single_share": 0.4}, "seed 0 (asked 1)"),
        (
            {"cases": 2, "seed": 0, "single_share": 0.3},
            "config.t2w_only_share 0.4 (asked 0.3), config.adc_only_share 0.4 (asked 0.3)",
        ),
    ):
        with pytest.raises(SystemExit, match=re.escape(f"synthetic data made with {differ};")):
            synthetic_store(tmp_path, **asked)
    assert "$ focalnet" not in capsys.readouterr().out
    (tmp_path / "data" / "synth.json").unlink()
    synthetic_store(tmp_path, cases=2, seed=0, single_share=0.4, workers=1)
    out = capsys.readouterr().out
    assert "has no synth.json (an older version)" in out and "$ focalnet preprocess" in out
    assert (store / "cases.json").read_bytes() == cases  # the same arguments: the same data


def test_synthetic_study_help_shows_its_command_as_written(capsys):
    # The docstring's line continuation joined the command's two lines with a run of 9 spaces.
    from focalnet_jax.study import synthetic

    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    out = capsys.readouterr().out
    assert (
        "    python -m focalnet_jax.study.synthetic --out runs/synthetic_mfl \\\n"
        "        [--results docs/results/synthetic_mfl] [--spec.KEY=VALUE ...]\n"
    ) in out
    assert not re.search(r"\S {3,}\S", out.split("options:")[0])
