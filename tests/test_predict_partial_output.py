"""`<out>.partial` of a resumable `focalnet predict` (evaluation/partial_output.py), without a
model: an `--out` given by a link or as `.`, a killed writer's temporary files and a partial
killed while emptied, and the settings and inputs `--resume` compares (a threshold written
otherwise, another series of a case's folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.partial_output import LOCK_FILE, lock_file, partial_folder


def test_an_out_given_by_a_link_is_made_where_the_link_points(tmp_path):
    """`--out results` with `results -> disk/results`: the partial, the lock and the finished
    output are beside and in the folder the link points to, and the link is kept (it became the
    output folder itself, the folder it pointed to left with the earlier output)."""
    from focalnet_jax.evaluation.partial_output import partial_output

    real, link = tmp_path / "disk" / "results", tmp_path / "results"
    real.mkdir(parents=True)
    (real / "models.json").write_text("{}\n")  # an earlier output
    link.symlink_to(real)
    settings = {"models": [{"run": "r", "step": 2}], "tta": "none"}
    with pytest.raises(RuntimeError), partial_output(link, settings, resume=False, overwrite=True):
        raise RuntimeError("stopped")
    assert partial_folder(link) == real.with_name("results.partial")
    assert partial_folder(link).is_dir() and lock_file(link).parent == real.parent
    with partial_output(link, settings, resume=True, overwrite=True) as (partial, _, _):
        (partial / "case0").mkdir()
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in real.iterdir()) == ["case0", "models.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "results"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["results"]


def test_an_out_of_dot_is_made_beside_the_working_folder(tmp_path, monkeypatch):
    """`--layout picai ... --out .` ended in a ValueError traceback ('.' has an empty name)."""
    from focalnet_jax.evaluation.partial_output import partial_output

    out = tmp_path / "results"
    out.mkdir()
    monkeypatch.chdir(out)
    settings = {"models": [{"run": "r", "step": 2}], "tta": "none"}
    assert partial_folder(".") == tmp_path / "results.partial"
    with partial_output(Path("."), settings, resume=False, overwrite=False) as (partial, _, _):
        (partial / "case0").mkdir()
    assert sorted(p.name for p in out.iterdir()) == ["case0", "models.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_resume_removes_a_killed_writers_temporary_files_and_folders(tmp_path):
    """A writer killed by SIGKILL leaves `.<case>.tmp-<pid>/` folders and, mid errors.csv or
    models.json, `.<file>.tmp-<pid>` files (and an earlier version its `.predict.lock`); the run
    that resumes removes them, so `--out` ends with none of them."""
    from focalnet_jax.evaluation.partial_output import partial_output

    out, settings = tmp_path / "out", {"models": [{"run": "r", "step": 2}], "tta": "none"}
    with pytest.raises(RuntimeError), partial_output(out, settings, resume=False, overwrite=False):
        raise RuntimeError("stopped")  # the partial is kept for --resume
    partial = partial_folder(out)
    (partial / ".case0.tmp-4242").mkdir()
    (partial / ".errors.csv.tmp-4242").write_text("case,file,reason\n")
    (partial / LOCK_FILE).write_text("pid 4242 on host\n")
    with partial_output(out, settings, resume=True, overwrite=False) as (_, done, failed):
        assert (done, failed) == (set(), [])
        assert sorted(p.name for p in partial.iterdir()) == ["models.json"]
    assert sorted(p.name for p in out.iterdir()) == ["models.json"]


def test_a_partial_killed_while_emptied_or_begun_is_still_predicts(tmp_path, monkeypatch):
    """`--overwrite` empties an earlier partial entry by entry, in the file system's order; a kill
    after its models.json went left case folders without one, which every rerun refused as not
    predict's ("holds c1 but no models.json"): models.json now goes last. A run killed while
    writing its first models.json left only `.models.json.tmp-<pid>`, refused so too; now taken
    as predict's own."""
    from focalnet_jax.evaluation import partial_output as partial_lib

    out, settings = tmp_path / "out", {"models": [{"run": "r", "step": 2}], "tta": "none"}
    with (
        pytest.raises(RuntimeError),
        partial_lib.partial_output(out, settings, resume=False, overwrite=False) as (partial, _, _),
    ):
        for k in range(20):  # models.json among 21 entries in the directory's order
            (partial / f"case{k}").mkdir()
        raise RuntimeError("stopped")
    removed, remove = [], partial_lib._remove
    monkeypatch.setattr(
        partial_lib, "_remove", lambda path: (removed.append(path.name), remove(path))
    )
    with partial_lib.partial_output(out, settings, resume=False, overwrite=True) as (_, done, _):
        assert done == set()
    assert len(removed) == 21 and removed[-1] == "models.json"
    assert sorted(p.name for p in out.iterdir()) == ["models.json"]
    shutil.rmtree(out)
    partial = partial_folder(out)
    partial.mkdir()
    (partial / ".models.json.tmp-4242").write_text("{")
    message = "holds an unfinished run of focalnet predict into this --out: add --resume"
    with pytest.raises(UserError, match=message):
        with partial_lib.partial_output(out, settings, resume=False, overwrite=False):
            pass
    with partial_lib.partial_output(out, settings, resume=True, overwrite=False) as (_, done, _):
        assert done == set()
    assert sorted(p.name for p in out.iterdir()) == ["models.json"]


def test_a_candidate_threshold_written_otherwise_is_the_same_setting(tmp_path):
    """`--candidate-threshold 0.30` then `--resume --candidate-threshold 0.3` was refused
    ('"0.30" in the partial, "0.3" now'), though both are one threshold; a partial of an earlier
    version recorded the text as typed, and resumes with the same number written otherwise."""
    from focalnet_jax.evaluation.detection_map import CandidateSettings
    from focalnet_jax.evaluation.partial_output import _check_resumable, recorded_settings
    from focalnet_jax.evaluation.predictions import MODELS_FILE

    typed, plain = CandidateSettings("0.30"), CandidateSettings("0.3")
    assert recorded_settings({}, 0.5, typed) == recorded_settings({}, 0.5, plain)
    assert recorded_settings({}, 0.5, typed)["candidates"]["threshold"] == "0.3"
    earlier = recorded_settings({}, 0.5, plain)
    earlier["candidates"]["threshold"] = "0.30"  # as typed
    (tmp_path / MODELS_FILE).write_text(json.dumps(earlier))
    _check_resumable(tmp_path, recorded_settings({}, 0.5, plain))  # no error
    with pytest.raises(
        UserError, match=r'candidates\.threshold: "0\.3" in the partial, "0\.4" now'
    ):
        _check_resumable(tmp_path, recorded_settings({}, 0.5, CandidateSettings("0.4")))


def test_resume_refuses_a_finished_case_predicted_from_another_series_of_its_folder(tmp_path):
    """A manifest's `t2w_series` changed between the stopped run and its resume: the case
    finished from the first series was kept beside cases of the second, the folder's files (all
    that was recorded) being the same."""
    from focalnet_jax.data.layouts import CaseSpec
    from focalnet_jax.evaluation.partial_output import case_inputs, input_files, record_inputs

    folder = tmp_path / "t2w"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"a slice")
    partial = tmp_path / "out.partial"
    partial.mkdir()

    def spec(series: str) -> CaseSpec:
        return CaseSpec("a", "pa", {"t2w": str(folder)}, series={"t2w": series, "adc": ""})

    record_inputs(partial, set(), {"a": case_inputs(spec("t2_tse_tra"))})
    record_inputs(partial, {"a"}, {"a": case_inputs(spec("t2_tse_tra"))})  # the same: resumed
    with pytest.raises(UserError) as refused:
        record_inputs(partial, {"a"}, {"a": case_inputs(spec("B_flipped"))})
    # ... and a refusal names the file that changed, not the series it did not record.
    (partial / "inputs.json").write_text(json.dumps({"a": input_files({"t2w": str(folder)})}))
    (folder / "2.dcm").write_bytes(b"another slice")
    with pytest.raises(UserError, match=r"was predicted from another t2w \(1 file, "):
        record_inputs(partial, {"a"}, {"a": case_inputs(spec("B_flipped"))})
    assert str(refused.value) == (
        f"--resume: case a of {partial} was predicted from another t2w_series (series t2_tse_tra; "
        "now series B_flipped); resume with the same input files, or add --overwrite (without "
        "--resume) to start over"
    )
    # A partial of an earlier version recorded the files alone: compared on those.
    (partial / "inputs.json").write_text(json.dumps({"a": input_files({"t2w": str(folder)})}))
    record_inputs(partial, {"a"}, {"a": case_inputs(spec("B_flipped"))})
