"""SmoothQuant: FP32 outputs unchanged, outliers moved into weights, accuracy gained."""

import argparse

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.backends.ort import runner_factory
from qcompile.calibrate.runner import calibrate
from qcompile.cli.flags import add_flags, options_kwargs
from qcompile.ir import load_model
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.manager import run_phase
from qcompile.passes.smoothing import (
    ChannelObserver,
    SmoothQuant,
    find_smooth_groups,
    smoothing_scales,
)
from qcompile.targets import cpu
from tests.conftest import FAST


def _run(model, feed):
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feed
    )


def post_ln_block(seed=0, dim=32):
    """BERT's post-LN shape: the LayerNorm output feeds two linears AND a residual Add."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    w2 = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    gamma = np.ones(dim, np.float32)
    gamma[:2] = 12.0  # outlier channels, as in real BERTs
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1, name="ln"),
            helper.make_node("MatMul", ["h", "w1"], ["a"], name="fc_a"),
            helper.make_node("MatMul", ["h", "w2"], ["c"], name="fc_b"),
            helper.make_node("Add", ["a", "c"], ["ac"], name="sum"),
            helper.make_node("Add", ["ac", "h"], ["y"], name="residual"),
        ],
        "post_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        [
            numpy_helper.from_array(gamma, "g"),
            numpy_helper.from_array(np.full(dim, 0.1, np.float32), "b"),
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _assert_same_outputs(before, after, feeds):
    """Every output of `after` equals `before`'s on every feed (FP32 equivalence)."""
    for feed in feeds:
        for a, b in zip(_run(before, feed), _run(after, feed), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def _smooth(proto, feeds, explicit="off", alpha=None, shift=True):
    model, _ = run_phase(load_model(proto), "rewrite", canonicalize())
    groups = find_smooth_groups(model, explicit=explicit)
    stats = calibrate(
        model, feeds, [g.activation for g in groups], ChannelObserver, runner_factory(threads=1)
    )
    p = SmoothQuant(
        groups, stats.observers, cpu.PROFILE.activation, cpu.PROFILE.weight, alpha, shift=shift
    )
    before = ir.from_proto(ir.to_proto(model))
    model, records = run_phase(model, "smooth", [p])
    return before, model, groups, p, records


@pytest.mark.parametrize("alpha", [None, 0.5, 0.85])
def test_post_ln_smoothing_keeps_outputs_and_twins_the_layernorm(alpha):
    proto = post_ln_block()
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((16, 32)).astype(np.float32)}
        for i in range(4)
    ]
    before, after, groups, p, records = _smooth(proto, feeds, alpha=alpha)
    assert [g.consumers for g in groups] == [("fc_a", "fc_b")]
    assert records[0].modified
    # the residual keeps the original LayerNorm, the linears read a smoothed twin
    lns = [n for n in after.graph if n.op_type == "LayerNormalization"]
    assert len(lns) == 2
    onnx.checker.check_model(ir.to_proto(after), full_check=True)
    _assert_same_outputs(before, after, feeds)


def test_pre_ln_smoothing_folds_into_gamma_and_beta():
    proto = builders.transformer_block()
    feeds = [{"input": builders.token_embeddings(2, seed=i)} for i in range(4)]
    before, after, groups, p, _ = _smooth(proto, feeds, alpha=0.5)
    assert len(groups) == 2  # ln1 -> q/k/v, ln2 -> ffn1
    assert sum(n.op_type == "LayerNormalization" for n in after.graph) == 2  # folded, no twin
    _assert_same_outputs(before, after, feeds)


def test_explicit_smoothing_inserts_mul_and_keeps_outputs():
    proto = builders.mlp()
    feeds = [{"input": builders.features(16, seed=i)} for i in range(4)]
    before, after, groups, _, _ = _smooth(proto, feeds, explicit="on", alpha=0.5)
    assert groups and all(g.producer is None for g in groups)
    assert any(n.op_type == "Mul" and n.name.endswith("_smooth") for n in after.graph)
    _assert_same_outputs(before, after, feeds)


def offset_channels_block(seed=0, dim=32):
    """A LayerNorm whose channels sit around different centres (β = ±5) and a small
    width (γ), feeding a MatMul + bias and a Gemm: one per-tensor zero point cannot
    centre them all, a per-channel shift can."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    w2 = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    beta = np.where(np.arange(dim) % 2 == 0, 5.0, -5.0).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1, name="ln"),
            helper.make_node("MatMul", ["h", "w1"], ["m"], name="fc_a"),
            helper.make_node("Add", ["m", "b1"], ["a"], name="fc_a_bias"),
            helper.make_node("Gemm", ["h", "w2", "b2"], ["c"], name="fc_b", transB=1),
            helper.make_node("Add", ["a", "c"], ["y"], name="sum"),
        ],
        "offsets",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        [
            numpy_helper.from_array(np.full(dim, 0.5, np.float32), "g"),
            numpy_helper.from_array(beta, "b"),
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.full(dim, 0.2, np.float32), "b1"),
            numpy_helper.from_array(w2.T.copy(), "w2"),
            numpy_helper.from_array(np.full(dim, -0.1, np.float32), "b2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_channel_shift_folds_into_beta_and_biases_and_keeps_outputs():
    proto = offset_channels_block()
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((16, 32)).astype(np.float32)}
        for i in range(4)
    ]
    before, after, groups, p, _ = _smooth(proto, feeds)
    assert p.shifted == {"h"}
    ln = next(n for n in after.graph if n.op_type == "LayerNormalization")
    beta = ln.inputs[2].const_value.numpy()
    assert np.abs(beta).max() < 1.0  # the ±5 centres left the LayerNorm ...
    bias_a = next(n for n in after.graph if n.name == "fc_a_bias").inputs[1].const_value.numpy()
    assert not np.allclose(bias_a, 0.2)  # ... and went into the consumers' biases
    _assert_same_outputs(before, after, feeds)
    _, unshifted, _, q, _ = _smooth(proto, feeds, shift=False)
    assert not q.shifted


def test_channel_shift_improves_quantized_accuracy():
    proto = offset_channels_block()
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((32, 32)).astype(np.float32)}
        for i in range(10)
    ]
    off = qcompile.compile(proto, calibration=feeds, smooth_shift=False, **FAST)
    on = qcompile.compile(proto, calibration=feeds, smooth_shift=True, **FAST)
    # measured: 40.4 -> 43.7 dB (the rest is weight noise)
    assert on.report.min_output_sqnr_db > off.report.min_output_sqnr_db + 2.0


def test_smoothing_scales_formula():
    a = np.array([8.0, 1.0])
    w = [np.array([[0.5, 0.25], [2.0, 1.0]])]
    s = smoothing_scales(a, w, 0.5)
    np.testing.assert_allclose(s, np.sqrt(a) / np.sqrt(np.array([0.5, 2.0])), rtol=1e-6)


def test_smoothquant_improves_outlier_model_accuracy():
    proto = post_ln_block()
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((32, 32)).astype(np.float32)}
        for i in range(10)
    ]
    off = qcompile.compile(
        proto, calibration=feeds, smoothquant=False, calib_method="minmax", **FAST
    )
    on = qcompile.compile(proto, calibration=feeds, smoothquant=True, calib_method="minmax", **FAST)
    assert on.report.min_output_sqnr_db > off.report.min_output_sqnr_db + 1.0
    assert any(p["name"] == "SmoothQuant" and p["modified"] for p in on.report.passes)


def test_explicit_smoothing_compiles_with_a_float_mul_before_the_quantizer():
    proto = builders.mlp()
    feeds = [{"input": builders.features(32, seed=i)} for i in range(10)]
    result = qcompile.compile(
        proto, calibration=feeds, smooth_explicit="on", smooth_alpha=0.5, **FAST
    )
    model = ir.to_proto(result.model)
    muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert muls
    # the Mul reads the float tensor and feeds a QuantizeLinear: one rounding, not two
    consumers = {n.op_type for n in model.graph.node for m in muls if m.output[0] in n.input}
    assert consumers == {"QuantizeLinear"}
    assert "constant scaling" in result.report.skipped_nodes[muls[0].name]
    onnx.checker.check_model(model, full_check=True)
    plain = qcompile.compile(proto, calibration=feeds, smoothquant=False, **FAST)
    assert result.report.min_output_sqnr_db > plain.report.min_output_sqnr_db - 1.0


# -- hypothesis: random LayerNorm -> linear groups, with and without a residual reader ------


@st.composite
def ln_groups(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dim = draw(st.sampled_from([8, 16]))
    consumers = draw(st.integers(1, 3))
    residual = draw(st.booleans())
    gamma = rng.uniform(0.2, 3.0, dim).astype(np.float32)
    gamma[rng.integers(0, dim)] *= draw(st.sampled_from([1.0, 10.0, 40.0]))  # an outlier channel
    inits = [
        numpy_helper.from_array(gamma, "g"),
        numpy_helper.from_array(rng.normal(0, 0.3, dim).astype(np.float32), "b"),
    ]
    if draw(st.booleans()):  # channels centred far apart: the shift has work to do
        inits[1] = numpy_helper.from_array(
            rng.choice([-6.0, 0.0, 6.0], dim).astype(np.float32), "b"
        )
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1, name="ln")]
    outs = []
    for i in range(consumers):
        w = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
        bias = rng.normal(0, 0.5, dim).astype(np.float32)
        kind = draw(st.sampled_from(["matmul", "matmul+bias", "gemm", "gemm+C"]))
        if kind.startswith("gemm"):
            trans_b = draw(st.booleans())
            inits.append(numpy_helper.from_array(w.T.copy() if trans_b else w, f"w{i}"))
            inputs = ["h", f"w{i}"]
            if kind == "gemm+C":
                inits.append(numpy_helper.from_array(bias, f"c{i}"))
                inputs.append(f"c{i}")
            alpha, beta = draw(st.sampled_from([(1.0, 1.0), (0.5, 2.0)]))
            nodes.append(
                helper.make_node(
                    "Gemm",
                    inputs,
                    [f"y{i}"],
                    name=f"fc{i}",
                    transB=int(trans_b),
                    alpha=alpha,
                    beta=beta,
                )
            )
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            mm_out = f"m{i}" if kind == "matmul+bias" else f"y{i}"
            nodes.append(helper.make_node("MatMul", ["h", f"w{i}"], [mm_out], name=f"fc{i}"))
            if kind == "matmul+bias":
                inits.append(numpy_helper.from_array(bias, f"bias{i}"))
                nodes.append(
                    helper.make_node("Add", [f"bias{i}", mm_out], [f"y{i}"], name=f"add{i}")
                )
        outs.append(f"y{i}")
    if residual:
        nodes.append(helper.make_node("Add", ["h", outs[0]], ["r"], name="residual"))
        outs[0] = "r"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", dim]) for o in outs],
        inits,
    )
    return (
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        dim,
        draw(st.sampled_from([None, 0.5])),
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ln_groups())
def test_random_smoothing_groups_keep_fp32_outputs(case):
    proto, dim, alpha = case
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((12, dim)).astype(np.float32) * 3}
        for i in range(3)
    ]
    before, after, groups, p, records = _smooth(proto, feeds, alpha=alpha)
    assert len(groups) == 1
    _assert_same_outputs(before, after, feeds)
    if p.shifted:  # only groups whose every consumer has a bias to take δ·W
        kinds = {n.op_type for n in before.graph}
        assert "Gemm" in kinds or "Add" in kinds
    _, again = run_phase(
        after, "again", [SmoothQuant([], {}, cpu.PROFILE.activation, cpu.PROFILE.weight)]
    )
    assert again[0].modified is False


def _mlp_with_outlier_channels() -> onnx.ModelProto:
    """The test MLP with a few of fc1's and fc2's output channels 20x wider, so both
    Relu outputs (fc2's input: 128 columns after it; fc3's: 16) have outlier channels."""
    proto = builders.mlp()
    for init in proto.graph.initializer:
        if init.name in ("W_1", "W_5"):
            w = onnx.numpy_helper.to_array(init).copy()
            w[:, :3] *= 20.0
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    return proto


def test_explicit_smoothing_auto_smooths_wide_consumers_unless_integer_only():
    proto = _mlp_with_outlier_channels()
    feeds = [{"input": builders.features(32, seed=i)} for i in range(10)]

    def smoothed(**kw) -> set[str]:
        model = ir.to_proto(qcompile.compile(proto, calibration=feeds, **kw, **FAST).model)
        return {
            n.name for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth")
        }

    # default auto: fc2 (128 columns) gets its Mul, fc3 (16 columns) is too narrow to pay
    assert smoothed() == {"relu_4_out_smooth"}
    assert smoothed(smooth_explicit="on") == {"relu_4_out_smooth", "relu_7_out_smooth"}
    assert smoothed(smooth_explicit="off") == set()
    # integer-only: a float Mul would be an island, so auto leaves it out
    assert smoothed(integer_only=True) == set()


def test_smooth_explicit_flag_bare_means_on():
    parser = argparse.ArgumentParser()
    add_flags(parser, "compile")

    def explicit(*argv: str) -> str:
        return options_kwargs(parser.parse_args(list(argv))).get("smooth_explicit", "unset")

    assert explicit("--smooth-explicit") == "on"
    assert explicit("--smooth-explicit", "off") == "off"
    assert explicit() == "unset"  # the dataclass default (auto) applies
