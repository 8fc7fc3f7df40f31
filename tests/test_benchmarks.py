"""The benchmark scripts run and report what they claim, on a tiny model (their numbers are not
checked here: speed targets live in the benchmarks, not in tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_train_helpers import REPO, TINY, small_synthetic_store, xla_flags

from focalnet_jax.evaluation.predictions import write_case


def _benchmark_module(name: str):
    """A module of benchmarks/ (they import each other from the script directory)."""
    folder = str(REPO / "benchmarks")
    spec = importlib.util.spec_from_file_location(name, f"{folder}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


profile_summary = _benchmark_module("profile_summary")
result_line = _benchmark_module("result_line")


def _run(script: str, *args: str) -> dict:
    """The one JSON line of `benchmarks/SCRIPT ARGS` (its numbers are not checked here)."""
    return json.loads(_completed(script, *args).stdout)


def _completed(script: str, *args: str) -> subprocess.CompletedProcess:
    """`benchmarks/SCRIPT ARGS` run as `_run` runs it, checked to exit 0 and print one line."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line, nothing else on stdout
    return done


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return small_synthetic_store(tmp_path_factory.mktemp("bench"), cases=10, seed=2)


TRAIN_STEP_ARGS = ("--config=configs/focalnet.py", "--steps=1", "--size=32", *TINY)


@pytest.fixture(scope="module")
def train_step_run() -> subprocess.CompletedProcess:
    """`train_step.py` on one device, FL and FL+MFL select, 2 steps of each profiled (shared: its
    FL step is also the 1-device reference of the FLOP count)."""
    return _completed(
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
    train_step = _benchmark_module("train_step")
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


def test_fold_time_takes_a_sigterm_after_the_last_step_as_a_complete_run(monkeypatch):
    """Such a run had validated and checkpointed at its last step; counted as stopped there, one
    validation too few was taken out of the projection."""
    from focalnet_jax.training.graceful_stop import TrainingStopped

    fold_time = _benchmark_module("fold_time")

    def train(config, workdir, store):
        raise TrainingStopped(6, workdir, complete=True)

    monkeypatch.setattr(fold_time, "train_and_evaluate", train)
    monkeypatch.setattr(fold_time, "loop_timings", lambda workdir, batch_size: {})
    config = types.SimpleNamespace(train=types.SimpleNamespace(batch_size=4))
    assert fold_time._timed_run(config, None)[2] is None


def _device_trace(xla_ops_line: str = "") -> str:
    """An XSpace (text proto) as a GPU trace has it: kernels on a stream line, each with the
    annotation of the HLO op that launched it; a host plane beside it. Times in picoseconds."""
    kernel = (
        "events {{ metadata_id: {m} offset_ps: {start} duration_ps: {length} "
        'stats {{ metadata_id: 10 str_value: "{annotation}" }} }}'
    )
    kernels = [
        (1, 0, 3_000_000, "Thunk:#hlo_op=fusion.1,hlo_module=jit_step#"),  # 3 us
        (2, 4_000_000, 1_000_000, "Thunk:#hlo_op=fusion.1,hlo_module=jit_step#"),  # 1 us
        (3, 6_000_000, 4_000_000, "jit_step::Thunk:#hlo_op=custom-call.7#"),  # 4 us, a conv
        (4, 11_000_000, 2_000_000, "Thunk:#hlo_op=copy.3#"),  # 2 us
    ]
    events = "\n".join(
        kernel.format(m=m, start=t, length=d, annotation=a) for m, t, d, a in kernels
    )
    names = ["void fusion_kernel", "void fusion_kernel", "sm90_xmma_fprop_implicit_gemm", "copy"]
    metadata = "\n".join(
        f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
        for i, n in enumerate(names, 1)
    )
    return f"""
planes {{
  id: 1
  name: "/device:GPU:0"
  lines {{ id: 1 name: "Stream #7(compute)" timestamp_ns: 1000
{events}
  }}
  {xla_ops_line}
  {metadata}
  event_metadata {{ key: 9 value {{ id: 9 name: "fusion.9" }} }}
  stat_metadata {{ key: 10 value {{ id: 10 name: "annotation" }} }}
}}
planes {{
  id: 2
  name: "/host:CPU"
  lines {{ id: 1 name: "tf_XLAEigen/1" timestamp_ns: 0
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: 50000000 }}
  }}
  event_metadata {{ key: 1 value {{ id: 1 name: "fusion.1" }} }}
}}
"""


def test_profile_summary_groups_device_kernels_by_their_hlo_op():
    space = jax.profiler.ProfileData.from_text_proto(_device_trace())
    summary = profile_summary.summarize(space, calls=2, top=2)
    # 10 us of kernels over 2 calls; the host plane (a 50 us event) is not counted.
    assert summary["source"] == "device" and summary["ops"] == 3
    assert summary["op_ms_per_call"] == pytest.approx(0.005)
    assert summary["top_ops"] == [
        {"op": "fusion.1", "kind": "fusion", "ms_per_call": 0.002, "share": 0.4,
         "count_per_call": 1.0},
        {"op": "custom-call.7", "kind": "convolution", "ms_per_call": 0.002, "share": 0.4,
         "count_per_call": 0.5},
    ]  # fmt: skip
    assert summary["by_kind"]["copy/transpose"] == {"ms_per_call": 0.001, "share": 0.2}
    # cuDNN's convolution is a custom call: its kind comes from the kernel's name.
    assert summary["by_kind"]["convolution"] == {"ms_per_call": 0.002, "share": 0.4}
    # Where the profiler derived an `XLA Ops` line, only its events count.
    xla_ops = (
        'lines { id: 2 name: "XLA Ops" timestamp_ns: 1000 '
        "events { metadata_id: 9 offset_ps: 0 duration_ps: 8000000 } }"
    )
    space = jax.profiler.ProfileData.from_text_proto(_device_trace(xla_ops))
    summary = profile_summary.summarize(space, calls=1)
    assert summary["top_ops"] == [
        {"op": "fusion.9", "kind": "fusion", "ms_per_call": 0.008, "share": 1.0,
         "count_per_call": 1.0},
    ]  # fmt: skip


HLO_MODULE = """
HloModule jit_step

%fused_conv (p0: f32[1,8,8,2], p1: f32[3,3,2,4]) -> f32[1,8,8,4] {
  %p0 = f32[1,8,8,2]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,2,4]{3,2,1,0} parameter(1)
  %conv.1 = f32[1,8,8,4] convolution(%p0, %p1), window={size=3x3}, dim_labels=b01f_01io->b01f
  ROOT %max.2 = f32[1,8,8,4]{3,2,1,0} maximum(%conv.1, %conv.1)
}

%fused_outer (q0: f32[1,8,8,2], q1: f32[3,3,2,4]) -> f32[1,8,8,4] {
  %q0 = f32[1,8,8,2]{3,2,1,0} parameter(0)
  %q1 = f32[3,3,2,4]{3,2,1,0} parameter(1)
  ROOT %inner = f32[1,8,8,4]{3,2,1,0} fusion(%q0, %q1), kind=kOutput, calls=%fused_conv
}

%fused_convert (r0: f32[4]) -> bf16[4] {
  %r0 = f32[4]{0} parameter(0)
  %t = f32[4]{0} transpose(%r0), dimensions={0}
  ROOT %convert.3 = bf16[4]{0} convert(%t)
}

ENTRY %main (a: f32[1,8,8,2], b: f32[3,3,2,4], c: f32[4]) -> (f32[1,8,8,4], bf16[4]) {
  %a = f32[1,8,8,2]{3,2,1,0} parameter(0)
  %b = f32[3,3,2,4]{3,2,1,0} parameter(1)
  %c = f32[4]{0} parameter(2)
  %ynn_fusion.7 = f32[1,8,8,4]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_outer
  %convert_fusion = bf16[4]{0} fusion(%c), kind=kLoop, calls=%fused_convert
  %custom-call.9 = (f32[1,8,8,4], u8[0]) custom-call(%a), custom_call_target="__cudnn$convForward"
  %copy.4 = f32[4]{0} copy(%c)
  ROOT %tuple = (f32[1,8,8,4]{3,2,1,0}, bf16[4]{0}) tuple(%ynn_fusion.7, %convert_fusion)
}
"""


def test_hlo_kinds_name_each_op_by_what_it_computes():
    kinds = profile_summary.hlo_kinds(HLO_MODULE)
    assert kinds["ynn_fusion.7"] == "convolution"  # a fusion around a fusion holding a conv
    assert kinds["convert_fusion"] == "fusion"  # `convert` is no convolution; a fused transpose
    assert kinds["custom-call.9"] == "convolution"  # cuDNN's convolution is a custom call
    assert kinds["copy.4"] == "copy/transpose" and kinds["tuple"] == "other"
    # A compiled module of this machine's backend: its convolution is found, under any name.
    x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
    conv = lambda x, w: jax.nn.relu(
        jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    ).sum()
    compiled = jax.jit(conv).lower(x, w).compile()
    assert "convolution" in set(profile_summary.hlo_kinds(compiled.as_text()).values())


def test_profile_summary_counts_only_leaf_events():
    """A while loop's event holds its body's ops: only the ops count; a zero-length marker at an
    op's start makes no container of it; two GPUs' planes give the mean per device."""
    text = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines { id: 1 name: "XLA Ops" timestamp_ns: 0
    events { metadata_id: 1 offset_ps: 0 duration_ps: 10000000 }
    events { metadata_id: 2 offset_ps: 1000000 duration_ps: 2000000 }
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 2000000 }
    events { metadata_id: 3 offset_ps: 12000000 duration_ps: 1000000 }
    events { metadata_id: 4 offset_ps: 12000000 duration_ps: 0 }
  }
  event_metadata { key: 1 value { id: 1 name: "while.1" } }
  event_metadata { key: 2 value { id: 2 name: "convolution.4" } }
  event_metadata { key: 3 value { id: 3 name: "reduce.2" } }
  event_metadata { key: 4 value { id: 4 name: "marker" } }
}
planes {
  id: 2
  name: "/device:GPU:1"
  lines { id: 1 name: "XLA Ops" timestamp_ns: 0
    events { metadata_id: 2 offset_ps: 0 duration_ps: 4000000 }
    events { metadata_id: 3 offset_ps: 5000000 duration_ps: 1000000 }
  }
  event_metadata { key: 2 value { id: 2 name: "convolution.4" } }
  event_metadata { key: 3 value { id: 3 name: "reduce.2" } }
}
"""
    summary = profile_summary.summarize(jax.profiler.ProfileData.from_text_proto(text), calls=1)
    assert summary["devices"] == 2
    assert [(op["op"], op["ms_per_call"], op["count_per_call"]) for op in summary["top_ops"]] == [
        ("convolution.4", 0.004, 1.5), ("reduce.2", 0.001, 1.0),
    ]  # fmt: skip
    assert summary["by_kind"]["convolution"]["share"] == pytest.approx(0.8)


def test_op_kind_from_the_profiler_category_first_then_the_names():
    assert profile_summary.op_kind(None, "convert_fusion", "loop_convert_fusion") == "fusion"
    assert profile_summary.op_kind(None, "custom-call.3", "sm90_xmma_wgrad_kernel") == (
        "convolution"
    )
    assert profile_summary.op_kind("non-fusion elementwise", "conv_like.1") == "fusion"
    assert profile_summary.op_kind("convolution", "fusion.2") == "convolution"
    assert profile_summary.op_kind(None, "all-reduce.1") == "collective"


def test_train_step_flops_count_every_device_like_images_per_s(
    train_step_on_one_device, monkeypatch
):
    """XLA counts one device's program of a sharded step: on 2 devices each holds half the batch,
    so that count is about half the 1-device one; `flops_per_step` (x 2) is the whole step's
    arithmetic, as much as on one device plus the replicated work (the update of the weights)."""
    one = train_step_on_one_device["fl"]
    assert train_step_on_one_device["num_devices"] == 1
    monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
    result = _run("train_step.py", *TRAIN_STEP_ARGS, "--kinds=fl")
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
    train_step = _benchmark_module("train_step")
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


@pytest.mark.usefixtures("without_compilation_cache")
def test_fold_time_benchmark_projects_the_paper_fold_from_a_short_run(small_store):
    result = _run(
        "fold_time.py",
        "--config=configs/focalnet.py",
        f"--store={small_store}",
        "--train-slices=40",
        "--max-steps=6",
        *TINY,
        "--config.train.log_every=2",
    )
    # 200 epochs of 40 // 4 = 10 steps: 2000 steps, of which 6 ran.
    assert (result["fold_steps"], result["steps_run"], result["projected"]) == (2000, 6, True)
    steady, overhead = result["steady_step_time_s"], result["overhead_s"]
    assert steady > 0 and overhead > 0
    assert result["wall_s"] == pytest.approx(overhead + 6 * steady)
    assert result["mfl"] == "vmap" and result["store_train_slices"] > 0  # the paper's, as trained
    assert result["compilation_cache"] is None
    # The fold validates only at the end (eval_every 0): the run validates at steps 3 and 6, so
    # that a validation after the compiled one is timed. Checkpoints every 1000 steps and at the
    # end; the fold's validation set is the store's share of the schedule's 40 slices.
    assert result["run_eval_every"] == 3
    assert result["validations"] == {"run": 2, "fold": 1}
    assert result["checkpoints"] == {"run": 1, "fold": 2}
    val = result["val_slices"]
    assert val["schedule"] == round(40 * val["store"] / result["store_train_slices"])
    validation, saving = result["validation_s"], result["checkpoint_s"]
    assert validation > 0 and saving > 0 and result["projection_leaves_out"] == []
    expected = overhead + 2000 * steady + validation * (val["schedule"] / val["store"] - 2) + saving
    assert result["projected_fold_s"] == pytest.approx(expected)


def test_fold_time_projection_adds_the_folds_validations_and_checkpoints():
    fold_time = _benchmark_module("fold_time")
    timings = {
        "intervals": [5.0, 0.1, 0.3, 0.2],  # steady 0.2 s a step
        "validation_s": [9.0, 2.0, 4.0],  # the first compiles: 3 s each after it
        "checkpoint_s": [1.0, 0.5],  # 0.75 s each
    }
    counts = {"validations": {"run": 3, "fold": 9}, "checkpoints": {"run": 2, "fold": 18}}
    got = fold_time._projection(100.0, timings, 300, 17400, counts, val_scale=2.0)
    overhead = 100.0 - 300 * 0.2
    assert (got["steady_step_time_s"], got["validation_s"], got["checkpoint_s"]) == (0.2, 3.0, 0.75)
    # 9 validations of twice the slices, less the run's 3 (in the overhead); 16 more checkpoints.
    assert got["projected_fold_s"] == pytest.approx(
        overhead + 17400 * 0.2 + (9 * 3.0 * 2 - 3 * 3.0) + (18 - 2) * 0.75
    )
    assert got["projection_leaves_out"] == [] and got["projected"]
    # A SIGTERM before the second validation: no validation timed, and the line says so.
    stopped = fold_time._projection(
        100.0, timings | {"validation_s": [9.0]}, 300, 17400, counts, val_scale=2.0
    )
    assert stopped["validation_s"] is None and stopped["projection_leaves_out"] == ["validations"]
    assert stopped["projected_fold_s"] == pytest.approx(overhead + 17400 * 0.2 + 16 * 0.75)
    # The whole fold ran: its wall time, nothing projected.
    whole = fold_time._projection(100.0, timings, 17400, 17400, counts, val_scale=1.0)
    assert whole["projected_fold_s"] == 100.0 and not whole["projected"]


def test_fold_time_run_validates_twice_when_shortened():
    fold_time = _benchmark_module("fold_time")
    assert fold_time.run_eval_every(0, 6, 2000) == 3  # steps 3 and 6
    assert fold_time.run_eval_every(2000, 2000, 17400) == 1000  # 1000 and 2000
    assert fold_time.run_eval_every(2000, 1999, 17400) == 1000  # 1000 and 1999
    assert fold_time.run_eval_every(400, 1200, 1200) == 400  # the whole fold: the config's
    assert fold_time.run_eval_every(400, 900, 1200) == 400  # 400, 800, 900: twice already


def test_fold_time_counts_validations_as_the_loop_runs_them():
    fold_time = _benchmark_module("fold_time")
    # The paper's config: every 2000 of 17,400 steps (8 times) and once more at the end.
    assert fold_time.event_counts(2000, 17400) == 9
    assert fold_time.event_counts(400, 1200) == 3  # the demo: 400, 800, 1200
    assert fold_time.event_counts(0, 5) == 1
    # Stopped by SIGTERM after a step: validated at the earlier multiples only, not at its stop
    # (counted once too often where it stopped at one), checkpointed there too.
    every = {"validations": (2, 2), "checkpoints": (4, 4)}
    counts = {steps: fold_time._event_counts(every, steps, 12, True) for steps in (6, 7)}
    assert [counts[6]["validations"]["run"], counts[7]["validations"]["run"]] == [2, 3]
    assert counts[6]["validations"]["fold"] == 6


def test_bf16_curves_redraw_a_saved_result(tmp_path):
    saved = REPO / "benchmarks" / "results" / "bf16_loss_curves_demo_cpu_2026-12-01.json"
    png = tmp_path / "curves.png"
    result = _run("bf16_loss_curves.py", f"--result={saved}", f"--plot={png}")
    assert result == json.loads(saved.read_text())
    with Image.open(png) as image:
        assert image.size == (840, 480)  # 7 x 4 inches at 120 dpi


def test_bf16_curves_train_both_dtypes_and_evaluate_them(small_store, tmp_path):
    png = tmp_path / "curves.png"
    result = _run(
        "bf16_loss_curves.py",
        f"--store={small_store}",
        "--config=configs/demo.py",
        "--steps=6",
        "--smooth=2",
        "--evaluate",
        f"--plot={png}",
        *TINY,
        "--config.train.log_every=1",
        "--config.loss.mfl=false",  # the dtype is what differs; MFL's steps compile longer
    )
    assert result["steps"] == [1, 2, 3, 4, 5, 6]
    assert len(result["loss_float32"]) == len(result["loss_bfloat16"]) == 6
    assert result["loss_float32"] != result["loss_bfloat16"]  # the compute dtype took effect
    for dtype in ("float32", "bfloat16"):
        sensitivities = result["froc_sensitivity_at_1fp"][dtype]
        assert set(sensitivities) == {"index", "clinically_significant", "all"}
        assert all(0.0 <= v <= 1.0 for v in sensitivities.values())
        assert "val/loss" in result["final_val"][dtype]
    assert png.stat().st_size > 0


def test_inference_benchmark_times_one_model_and_an_ensemble_of_four_components(monkeypatch):
    """On 2 devices: inference splits each batch of slices over every local device.
    `configs/mfl4.py` (T2w, ADC, high-b DWI, DCE) was refused: the exam had T2w and ADC only."""
    monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
    result = _run("inference.py", "--config=configs/mfl4.py", "--models=2", "--repeats=1", *TINY)
    assert result["components"] == ["t2w", "adc", "hbv", "dce"]
    assert result["slices"] == 20 and result["platform"] == "cpu"
    assert result["num_devices"] == 2
    for count in ("models_1", "models_2"):
        assert 0 < result[count]["predict_s"] < result[count]["with_preprocessing_s"]
    assert result["preprocess_s"] > 0 and result["write_outputs_s"] > 0
    assert result["model"] == "deeplab-18 width 0.125 OS 16 float32"


def test_flat_maxima_benchmark_counts_each_upsampled_peak_once(monkeypatch):
    monkeypatch.setenv("BENCHMARK_COMMIT", "0123abc")
    result = _run("flat_maxima.py", "--patients=6", "--peaks=4", "--upsample=half_pixel")
    assert result["commit"] == "0123abc" and result["date"]  # what ran, and when
    # Every peak is one flat maximum (the background is below min_score); pixel by pixel an
    # interior peak gives 2 x 2 window maxima, a border peak 4 x 2, a corner one 4 x 4.
    assert result["upsample"] == "half_pixel"
    assert result["one_per_flat_maximum"]["detections_per_patient"] == 4.0
    assert 4 * 2 + 8 * 2 <= result["every_window_max_pixel"]["detections_per_patient"] <= 4 * 16
    # Upsampled as the model does by default, each peak's top is one pixel: both rules agree.
    result = _run("flat_maxima.py", "--patients=6", "--peaks=4")
    assert result["upsample"] == "aligned"
    assert result["one_per_flat_maximum"] == result["every_window_max_pixel"]
    assert result["one_per_flat_maximum"]["detections"] == 24


def test_flat_maxima_benchmark_counts_detections_per_patient_not_per_case(tmp_path):
    """Two one-slice cases of one patient: 8 detections over one patient, not two."""
    scores = np.full((1, 64, 64, 5), 1e-4, np.float32)
    for row, col in ((10, 10), (10, 50), (50, 10), (50, 50)):
        scores[0, row - 1 : row + 1, col - 1 : col + 1] = 0.6  # a flat top of 2 x 2 pixels
    lesions = np.zeros((1, 64, 64), np.int32)
    lesions[0, 8:13, 8:13] = 1
    for case_id in ("p0_exam1", "p0_exam2"):
        write_case(
            tmp_path, case_id, scores=scores, lesions=lesions, lesion_classes=[2],
            spacing=(0.5, 0.5), patient_id="p0",
        )  # fmt: skip
    result = _run("flat_maxima.py", f"--predictions={tmp_path}")
    assert (result["cases"], result["patients"]) == (2, 1)
    assert result["one_per_flat_maximum"]["detections"] == 8
    assert result["one_per_flat_maximum"]["detections_per_patient"] == 8.0
    # Pixel by pixel every top is 4 window maxima.
    assert result["every_window_max_pixel"]["detections_per_patient"] == 32.0


def test_store_open_benchmark_opens_every_case_it_wrote():
    result = _run("store_open.py", "--cases=30", "--slices=3")
    assert (result["cases"], result["slices"]) == (30, 90)
    assert result["open_seconds"] > 0 and result["target_seconds"] == 3.0


def test_mfl_scaling_gives_no_flop_ratio_for_a_step_run_in_chunks():
    """XLA counts a loop's body once: 14 and 30 subsets in chunks of 4 gave one FLOP ratio
    (4.03), while their times grew 2.2x."""
    from types import SimpleNamespace

    mfl_scaling = _benchmark_module("mfl_scaling")
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
    mfl_scaling = _benchmark_module("mfl_scaling")
    for flag, components in (("adc,t2w", ("adc", "t2w")), ("t2w,adc,hbv", ("t2w", "adc", "hbv"))):
        args, overrides = mfl_scaling._parser().parse_known_args(
            [f"--config={REPO}/configs/focalnet.py", f"--components={flag}", *TINY]
        )
        for mfl in (False, True):
            config = mfl_scaling._config(args, overrides, mfl, "select", 2)
            assert tuple(config.data.components) == components
    done = _completed(
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
    mfl_scaling = _benchmark_module("mfl_scaling")
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
    result = _run(
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


@pytest.mark.parametrize(
    ("text", "chosen"),
    [("b,a", ["b", "a"]), (" a , a,", ["a"]), ("", None), (",", None), ("a,d", None)],
)
def test_kinds_flag_keeps_the_order_given_and_refuses_unknown_or_no_names(text, chosen, capsys):
    import argparse

    benchmark_flags = _benchmark_module("benchmark_flags")
    parser = argparse.ArgumentParser(prog="bench")
    benchmark_flags.add_kinds_flag(parser, ("a", "b", "c"), "things to time")
    assert parser.parse_args([]).kinds == "a,b,c"
    if chosen is not None:
        assert benchmark_flags.chosen_kinds(parser, text, ("a", "b", "c")) == chosen
        return
    with pytest.raises(SystemExit) as stop:
        benchmark_flags.chosen_kinds(parser, text, ("a", "b", "c"))
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"bench: error: --kinds: expected names from a,b,c, got {text!r}"


def test_profile_or_error_keeps_the_reason_when_tracing_fails():
    def failing():
        raise ZeroDivisionError("division by zero")

    assert profile_summary.profile_or_error(failing, 1) == {
        "error": "ZeroDivisionError: division by zero"
    }


def test_result_line_records_the_commit_of_the_checkout(monkeypatch):
    monkeypatch.delenv("BENCHMARK_COMMIT", raising=False)
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    expected = described.stdout.strip() if described.returncode == 0 else None
    assert result_line.commit() == expected
    monkeypatch.setenv("BENCHMARK_COMMIT", "0123abc")  # a copy of the tree without .git
    assert result_line.provenance()["commit"] == "0123abc"


# Stands in for python in benchmarks/gpu_checks.sh: runs the benchmark until its flags are parsed
# (`parse_known_args`), loads its config with what is left (config overrides only, else an
# error), prints its arguments as the one JSON line and stops before measuring anything.
_FLAGS_ONLY = """
import argparse, json, os, runpy, sys
if sys.argv[1] == "-c":
    exec(sys.argv[2])
    sys.exit(0)
from focalnet_jax.config_loading import load_config
parse = argparse.ArgumentParser.parse_known_args
def parse_and_stop(self, args=None, namespace=None):
    known, overrides = parse(self, args, namespace)
    load_config(known.config, overrides)
    flags = {k: str(v) for k, v in vars(known).items()}
    argv = sys.argv[1:] if args is None else list(args)
    print(json.dumps({"script": script, "argv": argv, "flags": flags, "overrides": overrides}))
    sys.exit(0)
argparse.ArgumentParser.parse_known_args = parse_and_stop
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("quick", ["0", "1"])
def test_gpu_checks_pass_only_flags_and_overrides_the_benchmarks_declare(tmp_path, quick):
    (tmp_path / "flags_only.py").write_text(_FLAGS_ONLY)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path}/flags_only.py" "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(out), "all"],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHON": str(python),
            "QUICK": quick,
            "REQUIRE_GPU": "0",
            "WHEELS": str(tmp_path / "no_wheels"),
        },  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (out / "gpu_checks.log").read_text() if out.is_dir() else ""
    assert done.returncode == 0, done.stderr[-2000:] + log[-3000:]
    lines = {
        path.name.split("_cpu_")[0]: json.loads(path.read_text()) for path in out.glob("*.json")
    }
    assert {name: line["script"] for name, line in lines.items()} == {
        "fold_time_bfloat16": "benchmarks/fold_time.py",
        "train_step_bfloat16": "benchmarks/train_step.py",
        "train_step_float32": "benchmarks/train_step.py",
        "mfl_scaling": "benchmarks/mfl_scaling.py",
        "inference": "benchmarks/inference.py",
    }
    # What the scripts check after parsing: step kinds, subset counts and modes.
    train_step = _benchmark_module("train_step")
    for name in ("train_step_bfloat16", "train_step_float32"):
        assert set(lines[name]["flags"]["kinds"].split(",")) <= set(train_step.KINDS)
    mfl_scaling = _benchmark_module("mfl_scaling")
    parser = mfl_scaling._parser()
    args, overrides = parser.parse_known_args(lines["mfl_scaling"]["argv"])
    components = mfl_scaling._config(args, overrides, mfl=False).data.components
    kinds = [(2, "select"), (6, "select"), (14, "select")]
    assert mfl_scaling._kinds(parser, args, components) == kinds
    assert "jax " in log and "'SimpleITK': '" in log  # the preflight's versions
    assert '"script": "benchmarks/mfl_scaling.py"' in done.stdout  # each line printed too


def _gpu_checks(tmp_path, names: str, **env: str) -> subprocess.CompletedProcess:
    """`benchmarks/gpu_checks.sh TMP/out NAMES` with this Python on the CPU, no wheels, `env`."""
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(tmp_path / "out"), names],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "WHEELS": str(tmp_path / "no_wheels"),
            "JAX_PLATFORMS": "cpu",
            **env,
        },  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_checks_stop_before_any_benchmark_where_jax_sees_no_gpu(tmp_path):
    out = tmp_path / "out"
    done = _gpu_checks(tmp_path, "mfl_scaling")
    assert done.returncode == 2
    assert done.stderr.startswith("preflight failed: JAX sees no GPU (platform cpu)")
    assert [p.name for p in out.iterdir()] == ["gpu_checks.log"]
    misspelt = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(out), "fold_time_bf16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert misspelt.returncode == 2
    assert misspelt.stderr.startswith("unknown benchmark 'fold_time_bf16': expected names of ")


_SCRIPT_FILES = {str(path) for path in (REPO / "benchmarks").glob("*.py")}  # run in-process


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # A typo asking for a short run ran the whole fold.
        (["fold_time.py", "--config", "configs/demo.py", "--max-steps", "-5"],
         "argument --max-steps: expected an integer >= 0, got '-5'"),
        (["fold_time.py", "--config", "configs/demo.py", "--store", "/nonexistent"],
         "store /nonexistent does not exist"),
        # A ZeroDivisionError, a StatisticsError, an IndexError: after minutes of compiling.
        (["train_step.py", "--config", "configs/demo.py", "--steps", "0"],
         "argument --steps: expected an integer >= 1, got '0'"),
        (["mfl_scaling.py", "--config", "configs/mfl4.py", "--subset-counts", "2,,6"],
         "--subset-counts: expected comma-separated integers, got '2,,6'"),
        (["inference.py", "--config", "configs/focalnet.py", "--models", "0"],
         "argument --models: expected an integer >= 1, got '0'"),
        # Timings of 0 x 0 images; a numpy traceback.
        (["mfl_chunk_loop.py", "--config", "configs/mfl4.py", "--size", "0"],
         "argument --size: expected an integer >= 1, got '0'"),
        # The "loop" of 2 subsets in chunks of 4 was the vmap again, timed as a loop.
        (["mfl_chunk_loop.py", "--config", "configs/demo.py", "--size", "8"],
         "--chunk 4: the config's 2 subsets would run in one vmap, with no loop to time; choose "
         "--chunk below 2"),
        (["mfl_modes.py", "--config", "configs/demo.py", "--size", "2"],
         "argument --size: expected an integer >= 3, got '2'"),
        # A moving average wider than the curve reported a gap of 0 for opposite curves (after
        # two whole runs), a width of 0 a ValueError traceback.
        (["bf16_loss_curves.py", "--store", "/nonexistent", "--smooth", "0"],
         "argument --smooth: expected an integer >= 1, got '0'"),
        (["bf16_loss_curves.py", "--store", "/nonexistent", "--smooth", "61"],
         "--smooth 61: the runs log 60 train/loss points; choose fewer"),
        # A config value the project refuses: a UserError traceback.
        (["train_step.py", "--config", "configs/demo.py", "--config.model.depth=7"],
         "depth: expected one of (18, 34, 50, 101, 152), got 7"),
        (["mfl_scaling.py", "--config", "configs/nonexistent.py", "--subset-counts", "2"],
         "config file configs/nonexistent.py does not exist"),
        (["flat_maxima.py", "--predictions", "/nonexistent"],
         "/nonexistent: predictions folder does not exist"),
        # More peaks than fit 3 cells apart on the 16 x 16 grid drew forever; a negative seed
        # ended in numpy's traceback.
        (["flat_maxima.py", "--patients", "1", "--peaks", "40"],
         "--peaks 40: patient 0 got 14 peaks 3 cells apart, then 10000 draws in a row found no "
         "room for another on the 16 x 16 grid; use fewer"),
        (["flat_maxima.py", "--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
        # One case timed in this process, labelled "2 workers" with a speedup.
        (["preprocess.py", "--cases", "1", "--workers", "2"],
         "--workers 2: more than the 1 --cases (at most one worker per case)"),
    ],
)  # fmt: skip
def test_bad_benchmark_arguments_are_one_line_errors(argv, message, monkeypatch, capsys):
    """Each script run as `python benchmarks/SCRIPT ARGS` runs it (`__main__`, its directory first
    on `sys.path`), in this process: a Python started for each spent seconds importing JAX."""
    script, *rest = argv
    folder = str(REPO / "benchmarks")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [f"{folder}/{script}", *rest])
    monkeypatch.setattr(sys, "path", [folder, *sys.path])
    before = set(sys.modules)
    try:
        with pytest.raises(SystemExit) as ended:  # any other exception: a traceback
            runpy.run_path(f"{folder}/{script}", run_name="__main__")
    finally:  # the scripts' sibling modules, imported by name, are not left for other tests
        for name in set(sys.modules) - before:
            if getattr(sys.modules[name], "__file__", None) in _SCRIPT_FILES:
                del sys.modules[name]
    done = capsys.readouterr()
    assert ended.value.code == 2 and done.out == "", done.err
    assert done.err.splitlines()[-1] == f"{script}: error: {message}", done.err
    assert "Traceback" not in done.err


def test_mfl_scaling_times_each_kind_once():
    """`--subset-counts 6,6 --modes select,select`: the same step compiled, timed and written four
    times."""
    mfl_scaling = _benchmark_module("mfl_scaling")
    parser = mfl_scaling._parser()
    args, _ = parser.parse_known_args(
        ["--config", "configs/mfl4.py", "--subset-counts", "6,2,6", "--modes", "select,select"]
    )
    assert mfl_scaling._kinds(parser, args, ("t2w", "adc", "hbv", "dce")) == [
        (2, "select"), (6, "select")
    ]  # fmt: skip


def test_gpu_checks_preflight_imports_the_benchmarks_asked_for(tmp_path):
    """The preflight imported a fixed list: on a node without matplotlib (or tqdm) it passed, and
    `inference` (or `fold_time`) failed on its import after the other checks' minutes."""
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n"
    )
    done = _gpu_checks(tmp_path, "inference", PYTHONPATH=str(tmp_path / "blocked"), QUICK="1")
    assert done.returncode == 2, done.stderr
    assert done.stderr == "preflight failed: ModuleNotFoundError: No module named 'matplotlib'\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_checks.log"]


def test_mfl_modes_benchmark_finds_select_equal_to_vmap_under_frozen_normalisation():
    # Under frozen normalisation the two MFL modes are the same function of the parameters, so
    # the benchmark must measure the same loss and gradient (its control case).
    args = ("--config=configs/focalnet.py", "--size=32", *TINY, "--config.model.norm=frozen")
    result = _run("mfl_modes.py", *args, "--seed=1")
    assert (result["subsets"], result["norm"], result["same_choice"]) == (2, "frozen", True)
    assert (result["seed"], result["size"]) == (1, 32)  # what set the weights and the batch
    assert result["select_mfl"] == pytest.approx(result["vmap_mfl"], rel=1e-5)
    assert result["vmap_gradient_norm"] > 0
    assert result["gradient_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["gradient_relative_difference"] < 1e-3


def test_plot_mfl_scaling_refuses_what_is_not_a_result_in_one_line(tmp_path, capsys):
    """A missing file, a non-JSON file and another JSON file ended in tracebacks."""
    plot = _benchmark_module("plot_mfl_scaling")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "other.json").write_text("{}")
    row = {"subsets": 2, "mode": "select", "mfl_chunk": 0, "time_ratio": 2.0}
    run = {"results": [row], "model": "m", "batch_size": 1, "image_size": 8, "device": "cpu"}
    (tmp_path / "row.json").write_text(json.dumps({**run, "date": "2026-12-06"}))
    expected = {
        "missing.json": "No such file or directory",
        "empty.json": "not JSON (Expecting value: line 1 column 1 (char 0))",
        "other.json": "not a result of mfl_scaling.py (no results, model, batch_size, "
        "image_size, device, date)",
        "row.json": "not a result of mfl_scaling.py (a row has no memory_ratio)",
    }
    for name, reason in expected.items():
        with pytest.raises(SystemExit) as ended:
            plot.main([str(tmp_path / name), "--out", str(tmp_path / "plot.png")])
        assert ended.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"{tmp_path / name}: {reason}")
    assert not (tmp_path / "plot.png").exists()
