"""The train-step benchmarks run and report what they claim, on a tiny model: `train_step.py` (its
kinds, FLOPs, peaks and profiles, on one device and two), `mfl_scaling.py`, `mfl_modes.py` and
`mfl_chunk_loop.py` (their numbers are not checked here: speed targets live in the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import types

import pytest
from benchmark_calls import benchmark_module, completed, run
from test_train_helpers import REPO, TINY, xla_flags

TRAIN_STEP_ARGS = ("--config=configs/focalnet.py", "--steps=1", "--size=32", *TINY)


@pytest.fixture(scope="module")
def train_step_run() -> subprocess.CompletedProcess:
    """`train_step.py` on one device, FL and FL+MFL select, 2 steps of each profiled (shared: its
    FL step is also the 1-device reference of the FLOP count)."""
    return completed(
        "train_step.py", *TRAIN_STEP_ARGS, "--kinds=fl,fl_mfl_select", "--profile-steps=2"
    )


@pytest.fixture(scope="module")
def train_step_on_one_device(train_step_run) -> dict:
    return json.loads(train_step_run.stdout)


def test_train_step_benchmark_times_the_chosen_kinds(train_step_on_one_device):
    result = train_step_on_one_device
    assert result["init_time_s"] > 0  # the state's init, compiled once for both kinds
    assert {"fl", "fl_mfl_select"} <= set(result) and "fl_mfl_vmap" not in result
    assert result["ratio_fl_mfl_select_to_fl"] == pytest.approx(
        result["fl_mfl_select"]["step_time_s"] / result["fl"]["step_time_s"]
    )
    for kind in ("fl", "fl_mfl_select"):
        assert result[kind]["chunked"] is False  # 2 subsets, mfl_chunk 4: one vmap, counted
        assert result[kind]["flops_per_step"] > 0
        assert result[kind]["tflops_per_s"] == pytest.approx(
            result[kind]["flops_per_step"] / result[kind]["step_time_s"] / 1e12
        )
    assert result["model"] == "deeplab-18 width 0.125 OS 16 float32"
    assert result["platform"] == "cpu" and result["batch_size"] == 4
    # Each kind's own compiled peak (XLA's memory analysis): MFL select holds more than FL. The
    # device's running peak is null on the CPU backend (no memory statistics).
    assert 0 < result["fl"]["compiled_peak_bytes"] < result["fl_mfl_select"]["compiled_peak_bytes"]
    assert result["fl"]["peak_memory_bytes"] is None
    for kind in ("fl", "fl_mfl_select"):
        profile = result[kind]["profile"]
        assert (profile["source"], profile["calls"]) == ("host", 2)
        # The convolutions of the step are among its ops; op times are per call and add up.
        assert profile["by_kind"]["convolution"]["ms_per_call"] > 0
        assert sum(k["ms_per_call"] for k in profile["by_kind"].values()) == pytest.approx(
            profile["op_ms_per_call"]
        )
        top = [op["ms_per_call"] for op in profile["top_ops"]]
        assert len(top) == 15 and top == sorted(top, reverse=True)
    # MFL select runs the network more often than FL alone: more arithmetic per step (XLA's
    # count, not a time: op times on a shared machine are too noisy to compare in a test).
    assert result["fl_mfl_select"]["flops_per_step"] > result["fl"]["flops_per_step"]


def test_train_step_logs_each_kind_as_it_is_measured(train_step_run, train_step_on_one_device):
    """A run stopped by a time limit keeps in its log the kinds it measured: each kind's result
    is on stderr as soon as it is measured, then its profile, the same values as in the JSON
    line."""
    logged = {
        line.split(": ", 1)[0]: json.loads(line.split(": ", 1)[1])
        for line in train_step_run.stderr.splitlines()
        if line.startswith(("fl: ", "fl_mfl_select: ", "fl profile: ", "fl_mfl_select profile: "))
    }
    for kind in ("fl", "fl_mfl_select"):
        result = dict(train_step_on_one_device[kind])
        assert logged[f"{kind} profile"] == result.pop("profile")
        assert logged[kind] == result


def test_train_step_logs_a_kinds_timings_before_its_profile(monkeypatch, capsys):
    """A time limit that stopped a kind's profile lost its timings too: they were written once
    the profile was done."""
    train_step = benchmark_module("train_step")
    logged_before = []

    def profile(*args, **kwargs):
        logged_before.append(capsys.readouterr().err.splitlines())
        return {"source": "host"}

    monkeypatch.setattr(train_step.profile_summary, "profile_or_error", profile)
    monkeypatch.chdir(REPO)
    train_step.main([*TRAIN_STEP_ARGS, "--kinds=fl", "--profile-steps=1"])
    timings = json.loads(logged_before[0][-1].removeprefix("fl: "))
    assert timings["step_time_s"] > 0 and "profile" not in timings
    assert 'fl profile: {"source": "host"}' in capsys.readouterr().err


def test_train_step_flops_count_every_device_like_images_per_s(
    train_step_on_one_device, monkeypatch
):
    """XLA counts one device's program of a sharded step: on 2 devices each holds half the batch,
    so that count is about half the 1-device one; `flops_per_step` (x 2) is the whole step's
    arithmetic, as much as on one device plus the replicated work (the update of the weights)."""
    one = train_step_on_one_device["fl"]
    assert train_step_on_one_device["num_devices"] == 1
    monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
    result = run("train_step.py", *TRAIN_STEP_ARGS, "--kinds=fl")
    two = result["fl"]
    assert result["num_devices"] == 2
    assert one["flops_per_step"] == one["flops_per_device_step"]
    assert two["flops_per_step"] == 2 * two["flops_per_device_step"]
    assert 1.0 <= two["flops_per_step"] / one["flops_per_step"] < 1.3
    assert two["tflops_per_s"] == pytest.approx(two["flops_per_step"] / two["step_time_s"] / 1e12)
    assert two["images_per_s"] == pytest.approx(4 / two["step_time_s"])


def test_train_step_gives_no_flops_for_a_step_run_in_chunks():
    """XLA counts a loop's body once: `configs/mfl4.py` (14 subsets) in chunks of 4 was counted
    39 % below its unchunked step, with nothing in the line to say so."""
    train_step = benchmark_module("train_step")
    fields = {
        (subsets, chunk): train_step.flop_fields(
            types.SimpleNamespace(mfl_chunk=chunk, subsets=[()] * subsets), 2e12, 2, 0.5
        )
        for subsets, chunk in ((14, 4), (14, 0), (4, 4), (0, 4))
    }
    assert fields[14, 4] == {
        "chunked": True, "flops_per_step": None, "flops_per_device_step": None,
        "tflops_per_s": None,
    }  # fmt: skip
    for whole in ((14, 0), (4, 4), (0, 4)):  # one vmap over all subsets, or no MFL
        assert fields[whole] == {
            "chunked": False, "flops_per_step": 4e12, "flops_per_device_step": 2e12,
            "tflops_per_s": 8.0,
        }  # fmt: skip


def test_mfl_scaling_gives_no_flop_ratio_for_a_step_run_in_chunks():
    """XLA counts a loop's body once: 14 and 30 subsets in chunks of 4 gave one FLOP ratio
    (4.03), while their times grew 2.2x."""
    from types import SimpleNamespace

    mfl_scaling = benchmark_module("mfl_scaling")
    plain = SimpleNamespace(flops=100.0, peak_bytes=10, device_peak_bytes=None, compile_time_s=1.0)
    step = SimpleNamespace(flops=400.0, peak_bytes=20, device_peak_bytes=None, compile_time_s=2.0)
    chunked = mfl_scaling._result_row((14, "select"), step, plain, [3.0, 5.0, 4.0], chunk=4)
    assert (chunked["chunked"], chunked["flops_ratio"]) == (True, None)
    assert (chunked["time_ratio"], chunked["memory_ratio"]) == (4.0, 2.0)
    whole = mfl_scaling._result_row((14, "select"), step, plain, [4.0], chunk=0)
    assert (whole["chunked"], whole["flops_ratio"]) == (False, 4.0)
    assert mfl_scaling._result_row((2, "select"), step, plain, [4.0], chunk=4)["flops_ratio"] == 4.0


def test_mfl_scaling_benchmark_reports_ratios_to_the_plain_step_of_the_same_run():
    """The steps are those of `train_step_run` (FL, FL+MFL select on T2w and ADC, the same sizes):
    loaded from the session's compilation cache, not compiled again. `--components` sets the
    config's components (here as another order and another set than the config's)."""
    mfl_scaling = benchmark_module("mfl_scaling")
    for flag, components in (("adc,t2w", ("adc", "t2w")), ("t2w,adc,hbv", ("t2w", "adc", "hbv"))):
        args, overrides = mfl_scaling._parser().parse_known_args(
            [f"--config={REPO}/configs/focalnet.py", f"--components={flag}", *TINY]
        )
        for mfl in (False, True):
            config = mfl_scaling._config(args, overrides, mfl, "select", 2)
            assert tuple(config.data.components) == components
    done = completed(
        "mfl_scaling.py",
        "--config=configs/focalnet.py",
        "--components=t2w,adc",
        "--subset-counts=2",
        "--modes=select",
        "--steps=1",
        "--rounds=1",
        "--size=32",
        *TINY,
    )
    result = json.loads(done.stdout)
    (row,) = result["results"]
    assert (row["subsets"], row["mode"], row["mfl_chunk"]) == (2, "select", 4)
    assert row["memory_ratio"] == pytest.approx(row["peak_bytes"] / result["plain_peak_bytes"])
    assert row["memory_ratio"] > 1 and row["time_ratio"] > 0
    assert row["flops_ratio"] > 1  # two subsets without chunks: more arithmetic than plain
    assert row["chunked"] is False  # mfl_chunk 4 is not below 2 subsets: one vmap
    assert result["components"] == ["t2w", "adc"] and result["device"] == "cpu"
    # Each step's compile is timed and logged as it is done (a time-limited run shows how far).
    assert row["compile_time_s"] > 0 and result["plain_compile_time_s"] > 0
    compiled = [line.split(" in ")[0] for line in done.stderr.splitlines() if "compiled " in line]
    assert compiled == ["compiled plain", "compiled 2 subsets select"]


def test_mfl_scaling_rows_say_whether_the_step_ran_in_chunks():
    """The train step chunks only when `mfl_chunk` is below the subset count: at 2 subsets a
    chunk of 4 runs the same step as `mfl_chunk=0`, and the row says so."""
    mfl_scaling = benchmark_module("mfl_scaling")
    step = types.SimpleNamespace(
        peak_bytes=30, flops=3.0, device_peak_bytes=None, compile_time_s=1.0
    )
    plain = types.SimpleNamespace(
        peak_bytes=10, flops=1.0, device_peak_bytes=None, compile_time_s=1.0
    )
    chunked = {
        (subsets, chunk): mfl_scaling._result_row((subsets, "vmap"), step, plain, [2.0], chunk)[
            "chunked"
        ]
        for subsets, chunk in ((2, 4), (4, 4), (6, 4), (14, 4), (14, 0))
    }
    assert chunked == {(2, 4): False, (4, 4): False, (6, 4): True, (14, 4): True, (14, 0): False}


def test_mfl_chunk_loop_benchmark_times_the_chosen_kinds_vmapped_and_looped():
    """Two of the three kinds (each two compilations, most of the run's time): the input gradient
    is the parameter gradient's code with the other argument."""
    result = run(
        "mfl_chunk_loop.py",
        "--config=configs/focalnet.py",
        "--chunk=1",
        "--size=32",
        "--repeats=1",
        "--profile-calls=1",
        "--kinds=parameter_gradient,forward",
        *TINY,
    )
    assert (result["subsets"], result["chunk"], result["device_kind"]) == (2, 1, "cpu")
    assert (result["size"], result["repeats"]) == (32, 1)
    assert result["kinds"] == ["parameter_gradient", "forward"]
    for form in ("vmap", "loop"):  # the parameter gradient's profile: its convolutions found
        profile = result[f"parameter_gradient_{form}_profile"]
        assert profile["calls"] == 1 and profile["by_kind"]["convolution"]["ms_per_call"] > 0
    assert "forward_vmap_profile" not in result
    assert not [key for key in result if key.startswith("input_gradient")]
    for kind in ("forward", "parameter_gradient"):
        ratio = result[f"{kind}_loop_s"] / result[f"{kind}_vmap_s"]
        assert result[f"{kind}_loop_over_vmap"] == pytest.approx(ratio) and ratio > 0
        assert result[f"{kind}_vmap_temp_bytes"] > 0 and result[f"{kind}_loop_temp_bytes"] > 0


def test_mfl_scaling_times_each_kind_once():
    """`--subset-counts 6,6 --modes select,select`: the same step compiled, timed and written four
    times."""
    mfl_scaling = benchmark_module("mfl_scaling")
    parser = mfl_scaling._parser()
    args, _ = parser.parse_known_args(
        ["--config", "configs/mfl4.py", "--subset-counts", "6,2,6", "--modes", "select,select"]
    )
    assert mfl_scaling._kinds(parser, args, ("t2w", "adc", "hbv", "dce")) == [
        (2, "select"), (6, "select")
    ]  # fmt: skip


def test_mfl_modes_benchmark_finds_select_equal_to_vmap_under_frozen_normalisation():
    # Under frozen normalisation the two MFL modes are the same function of the parameters, so
    # the benchmark must measure the same loss and gradient (its control case).
    args = ("--config=configs/focalnet.py", "--size=32", *TINY, "--config.model.norm=frozen")
    result = run("mfl_modes.py", *args, "--seed=1")
    assert (result["subsets"], result["norm"], result["same_choice"]) == (2, "frozen", True)
    assert (result["seed"], result["size"]) == (1, 32)  # what set the weights and the batch
    assert result["select_mfl"] == pytest.approx(result["vmap_mfl"], rel=1e-5)
    assert result["vmap_gradient_norm"] > 0
    assert result["gradient_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["gradient_relative_difference"] < 1e-3
