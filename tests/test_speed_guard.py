"""The speed guard: never slower than FP32, decided by measurement, reproducible with a
cache. Timing itself is not asserted (benchmarks do that); what is asserted holds for
any timing: the decision logic on given profiles, the guard's invariants, its reasons
for not applying, and byte-identical reruns from its cache."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FAST, sha256

import qcompile
from qcompile.errors import QCompileError
from qcompile.strategies.speed_guard import KEEP_SPEEDUP, charge

GUARDED = {**FAST, "speed_guard": True}


def _compiled_cnn(**options):
    return qcompile.compile(
        builders.cnn(),
        target="cpu",
        calibration={"input": builders.images(20, seed=1)},
        **{**FAST, **options},
    )


def test_charge_leaves_float_only_what_costs_more_quantized():
    result = _compiled_cnn()
    fp32, q_model = result.fp32_model, result.model
    quantized = set(result.plan.nodes)
    compute = [n.name for n in fp32.graph if n.name in quantized and n.op_type == "Conv"]
    assert len(compute) >= 2
    cheap, dear = compute[0], compute[1]
    f_times = {n.name: 0.10 for n in fp32.graph}
    q_times = {n: 0.05 for n in quantized}  # every quantized kernel pays ...
    q_times[dear] = 0.50  # ... except one, five times slower than its FP32 kernel
    sizes = {v.name: 1000 for n in fp32.graph for v in (*n.inputs, *n.outputs) if v is not None}
    slower = charge(fp32, q_model, quantized, f_times, q_times, sizes)
    assert dear in slower and cheap not in slower
    assert slower[dear]["quantized_ms"] == pytest.approx(0.50)
    assert slower[dear]["fp32_ms"] == pytest.approx(0.10)


def test_charge_counts_standing_quantizers_and_the_boundary_float_adds():
    result = _compiled_cnn()
    fp32, q_model = result.fp32_model, result.model
    quantized = set(result.plan.nodes)
    first = next(n for n in fp32.graph if n.name in quantized and n.op_type == "Conv")
    f_times = {n.name: 0.10 for n in fp32.graph}
    q_times = {n: 0.09 for n in quantized}
    # the input's QuantizeLinear runs as a kernel of its own: the first Conv pays it
    q_in = next(
        n for n in q_model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "input"
    )
    q_times[q_in.name] = 0.20
    sizes = {v.name: 100 for n in fp32.graph for v in (*n.inputs, *n.outputs) if v is not None}
    sizes["input"] = 1000  # the input quantizer ran at 0.2 ms per 1000 elements
    slower = charge(fp32, q_model, quantized, f_times, q_times, sizes)
    assert first.name in slower
    assert slower[first.name]["quantized_ms"] == pytest.approx(0.29)
    # leaving it float adds a quantizer on its (Relu's) output, which quantized nodes
    # read: 100 elements at the input quantizer's rate
    assert slower[first.name]["boundary_ms"] == pytest.approx(0.02)
    # with a large output that quantizer costs more than the Conv saves: it stays INT8
    sizes_big = {k: v * 1000 for k, v in sizes.items()}
    sizes_big["input"] = 1000
    assert first.name not in charge(fp32, q_model, quantized, f_times, q_times, sizes_big)


def _outputs(model):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output]


def test_guard_returns_the_fastest_variant_it_measured():
    model = builders.mobile_block()
    result = qcompile.compile(
        model, target="cpu", calibration={"input": builders.images(24, size=24)},
        calib_batch_size=4, **GUARDED,
    )  # fmt: skip
    guard = result.report.speed_guard
    assert guard["applied"], guard
    variants = guard["variants"]
    assert variants[0]["variant"] == "as compiled"
    quantized = [v for v in variants if not v["variant"].startswith("FP32")]
    best = max(quantized, key=lambda v: v["speedup"])
    if best["speedup"] < KEEP_SPEEDUP:  # no quantized variant paid: FP32 comes back
        assert result.report.quantized_ops == {}
        assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph)
        assert any("FP32 model returned" in n for n in result.report.notes)
    else:
        assert any(n.op_type == "QuantizeLinear" for n in result.model.graph)
    assert _outputs(result.model) == _outputs(model)


@pytest.mark.parametrize(
    ("target", "options", "reason"),
    [
        ("fpga", {}, "qonnx"),
        ("cpu", {"integer_only": True}, "integer-only"),
        ("cpu", {"speed_guard": False}, "--no-speed-guard"),
        ("cpu", {"size_budget_mb": 0.03}, "size budget"),
    ],
)
def test_guard_says_why_it_does_not_apply(target, options, reason):
    opts = {**GUARDED, **options}
    if target == "fpga":
        opts["pow2_scales"] = False
    if "size_budget_mb" in options:
        opts["mixed_verify_feeds"] = 4
    result = qcompile.compile(
        builders.cnn(), target=target, calibration={"input": builders.images(20, seed=1)},
        **opts,
    )  # fmt: skip
    guard = result.report.speed_guard
    assert not guard["applied"] and reason in guard["reason"]


def test_gpu_target_without_its_provider_is_not_measured_on_the_cpu():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here: the guard measures on it")
    result = _compiled_cnn(speed_guard=True) if False else qcompile.compile(
        builders.cnn(), target="gpu", calibration={"input": builders.images(20, seed=1)},
        **GUARDED,
    )  # fmt: skip
    assert "not available here" in result.report.speed_guard["reason"]


def test_cached_decision_gives_byte_identical_reruns(tmp_path):
    hashes, hits = [], []
    for i in range(2):
        out = tmp_path / f"run{i}.onnx"
        result = qcompile.compile(
            builders.mobile_block(), target="cpu",
            calibration={"input": builders.images(24, size=24)}, calib_batch_size=4,
            output=out, cache_dir=str(tmp_path / "cache"), **GUARDED,
        )  # fmt: skip
        hashes.append(sha256(out))
        hits.append(result.report.speed_guard["cache_hit"])
    assert hits == [False, True]
    assert hashes[0] == hashes[1]


def test_time_budget_bounds_the_guard_and_is_checked():
    result = qcompile.compile(
        builders.mobile_block(), target="cpu",
        calibration={"input": builders.images(24, size=24)}, calib_batch_size=4,
        time_budget_s=1e-6, **GUARDED,
    )  # fmt: skip
    guard = result.report.speed_guard
    # the first measurement always happens; no profiling round starts after the budget
    assert all(not v["variant"].startswith("round") for v in guard["variants"])
    with pytest.raises(QCompileError, match="time budget"):
        qcompile.make_options(time_budget_s=0)


def test_no_speed_guard_flag_maps_to_the_option():
    import argparse

    from qcompile.cli.flags import add_flags, options_kwargs

    parser = argparse.ArgumentParser()
    add_flags(parser, "compile")
    args = parser.parse_args(["--no-speed-guard", "--time-budget", "20"])
    assert options_kwargs(args) == {"speed_guard": False, "time_budget_s": 20.0}


def test_fp32_fallback_keeps_values_exact():
    """Whatever the guard picks, the held-out outputs it reports are the model's own."""
    result = qcompile.compile(
        builders.mobile_block(), target="cpu",
        calibration={"input": builders.images(24, size=24)}, calib_batch_size=4, **GUARDED,
    )  # fmt: skip
    if result.report.quantized_ops:
        pytest.skip("a quantized variant was faster here; the fallback did not run")
    import onnxruntime as ort

    x = builders.images(4, size=24, seed=7)
    ref = ort.InferenceSession(builders.mobile_block().SerializeToString()).run(None, {"input": x})
    got = ort.InferenceSession(ir.to_proto(result.model).SerializeToString()).run(
        None, {"input": x}
    )
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_slower_everywhere_keeps_the_int4_weights_asked_for(monkeypatch):
    """Asked for INT4 weights (a size choice), a guard that finds nothing faster than FP32
    returns FP32 compute with the INT4 weights, not the FP32 model."""
    from qcompile.backends import ort as ort_backend

    monkeypatch.setattr(ort_backend, "bench", lambda sessions, feed, runs, **_: {
        name: (1.0 if name == "fp32" else 2.0) for name in sessions
    })  # fmt: skip
    result = qcompile.compile(
        builders.transformer_block(),
        calibration=[{"input": builders.token_embeddings(2, seed=i)} for i in range(8)],
        int4_weights=["op:MatMul"],
        **GUARDED,
    )
    ops = {n.op_type for n in result.model.graph}
    assert "MatMulNBits" in ops and "QuantizeLinear" not in ops
    assert "INT4 weights asked for" in result.report.speed_guard["decision"]
    everywhere = qcompile.compile(
        builders.transformer_block(),
        calibration=[{"input": builders.token_embeddings(2, seed=i)} for i in range(8)],
        **GUARDED,
    )
    assert everywhere.report.quantized_ops == {}  # no size asked for: the FP32 model
