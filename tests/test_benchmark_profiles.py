"""The benchmarks' profile summary (benchmarks/profile_summary.py) on hand-written traces and HLO:
device kernels grouped by the HLO op that launched them, each op's kind, only leaf events counted,
and a failed trace kept as its reason."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from benchmark_calls import benchmark_module

profile_summary = benchmark_module("profile_summary")


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


def test_profile_or_error_keeps_the_reason_when_tracing_fails():
    def failing():
        raise ZeroDivisionError("division by zero")

    assert profile_summary.profile_or_error(failing, 1) == {
        "error": "ZeroDivisionError: division by zero"
    }
