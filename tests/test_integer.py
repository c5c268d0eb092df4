"""Integer-only lowering: dyadic requantization, bit-exactness against the numpy reference
interpreter, no float between the quantizers, islands, and sub-8-bit widths."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qcompile
from qcompile.backends.ort import make_session
from qcompile.backends.reference import run_reference
from qcompile.errors import QCompileError
from qcompile.lower.integer_only import OutQuant, _Emitter, float_ops_between
from qcompile.numerics.dyadic import Dyadic, requantize, to_dyadic
from tests.conftest import FAST

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def _session(proto: onnx.ModelProto, disable_qdq_fusion: bool = False) -> ort.InferenceSession:
    return make_session(proto, qdq_fusions=not disable_qdq_fusion)


def _python_requantize(acc: int, m: int, s: int, zp: int, lo: int, hi: int) -> int:
    """round_half_even(acc·m / 2**s) + zp, clamped — with Python's unbounded integers."""
    p = acc * m
    q, r = divmod(p, 1 << s)  # floor division: r in [0, 2**s)
    half = 1 << (s - 1)
    if r > half or (r == half and q % 2 == 1):
        q += 1
    return min(max(q + zp, lo), hi)


# -- dyadic numbers ------------------------------------------------------------------------


def test_dyadic_is_accurate_and_powers_of_two_are_shifts():
    rng = np.random.default_rng(0)
    reals = np.exp(rng.uniform(np.log(1e-9), np.log(1e4), 500))
    d = to_dyadic(reals)
    assert np.all(d.multiplier < 2**31) and np.all((d.shift >= 1) & (d.shift <= 61))
    assert np.max(np.abs(d.value - reals) / reals) < 2.0**-29
    p2 = to_dyadic(np.array([2.0**-k for k in range(0, 40)]))
    assert np.all(p2.multiplier[1:] == 1)  # shift-only requantization
    assert np.allclose(p2.value, [2.0**-k for k in range(0, 40)], rtol=0, atol=0)


def _requantize_model(d: Dyadic, zp: int, lo: int, hi: int, n: int) -> onnx.ModelProto:
    acc = ir.Value(name="acc", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([n]))
    ident = ir.node("Identity", [acc], name="out")
    graph = ir.Graph([acc], [ident.outputs[0]], nodes=[ident], opset_imports={"": 17}, name="rq")
    emit = _Emitter(graph, ident, "rq", set(), {})
    y = emit.requantize(acc, d, OutQuant(acc, 1.0, zp, lo, hi, ir.DataType.INT8))
    ident.replace_input_with(0, y)
    out = ident.outputs[0]
    out.name, out.dtype, out.shape = "y", ir.DataType.INT8, ir.Shape([n])
    return ir.to_proto(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize(
    "m,s",
    [(2**31 - 1, 61), (2**31 - 1, 31), (1, 1), (1, 3), (1518500250, 40), (3, 2), (1, 61)],
)
def test_requantization_in_onnx_runtime_is_exact_at_the_int32_boundaries(m, s):
    edges = [I32_MIN, I32_MIN + 1, -(2**30), -3, -2, -1, 0, 1, 2, 3, 2**30, I32_MAX - 1, I32_MAX]
    ties = [k * (1 << (s - 1)) for k in range(-5, 6)] if s < 31 else []  # exact halves
    rng = np.random.default_rng(s)
    acc = np.array(
        edges
        + [t for t in ties if I32_MIN <= t <= I32_MAX]
        + list(rng.integers(I32_MIN, I32_MAX, 200)),
        dtype=np.int32,
    )
    zp, lo, hi = 3, -128, 127
    d = Dyadic(np.asarray(m, np.int64), np.asarray(s, np.int64))
    proto = _requantize_model(d, zp, lo, hi, acc.size)
    onnx.checker.check_model(proto, full_check=True)
    got = _session(proto).run(None, {"acc": acc})[0]
    want = np.array([_python_requantize(int(a), m, s, zp, lo, hi) for a in acc])
    np.testing.assert_array_equal(got.astype(np.int64), want)
    np.testing.assert_array_equal(requantize(acc, d, zp, lo, hi), want)
    np.testing.assert_array_equal(run_reference(proto, {"acc": acc})[0], got)


# -- whole models --------------------------------------------------------------------------

MODELS = {
    "cnn": (lambda: builders.cnn(size=32), lambda: builders.images(40, 32, seed=3)),
    "mobile_block": (builders.mobile_block, lambda: builders.images(40, 24, seed=3)),
    "mlp": (builders.mlp, lambda: builders.features(64, seed=3)),
}


def _feeds(model: onnx.ModelProto, data: np.ndarray, batch: int = 4) -> list[dict]:
    name = model.graph.input[0].name
    return [{name: data[i : i + batch]} for i in range(0, len(data), batch)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("target", ["cpu", "fpga"])
def test_integer_only_models_are_bit_exact_with_no_float_inside(name, target):
    build, data = MODELS[name]
    model, feeds = build(), _feeds(build(), data())
    options = {"integer_only": True} if target == "cpu" else {}
    result = qcompile.compile(model, target=target, calibration=feeds, **options, **FAST)
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    report = result.report
    assert report.integer_only and report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    ops = {n.op_type for n in proto.graph.node}
    assert ops & {"ConvInteger", "MatMulInteger"}
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == 1  # input, once
    assert not ops & {"Conv", "Gemm", "MatMul", "QLinearConv", "Relu", "Sigmoid", "HardSigmoid"}
    sess = _session(proto)
    for feed in feeds:
        for got, want in zip(sess.run(None, feed), run_reference(proto, feed), strict=True):
            np.testing.assert_array_equal(got, want)  # equality, not closeness
    # accuracy: the integer graph is as good as the QDQ graph it came from
    as_qdq = {} if target == "cpu" else {"disabled_passes": ("LowerToIntegerOnly",)}
    qdq = qcompile.compile(model, target=target, calibration=feeds, **as_qdq, **FAST)
    assert report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 1.0


def test_an_island_the_user_did_not_allow_is_a_clear_error():
    # an overlapping ConvTranspose (kernel 3, stride 2) has no integer form
    feeds = [{"input": builders.images(4, 16, seed=i)} for i in range(6)]
    with pytest.raises(QCompileError) as err:
        qcompile.compile(builders.decoder(up_kernel=3), target="fpga", calibration=feeds, **FAST)
    assert "ConvTranspose" in str(err.value) and "--allow-float op:ConvTranspose" in str(err.value)
    result = qcompile.compile(
        builders.decoder(up_kernel=3),
        target="fpga",
        calibration=feeds,
        allow_float="op:ConvTranspose",
        **FAST,
    )
    islands = result.report.float_islands
    assert {i["op_type"] for i in islands} <= {"ConvTranspose", "Relu"}
    assert len({i["group"] for i in islands}) == 1  # the Relu after it floats with it
    # the rest went integer (the final Sigmoid reads the output dequantizer: outside)
    assert {"Conv", "AveragePool", "Resize", "Add"} <= set(result.report.integer_ops)
    proto = ir.to_proto(result.model)
    # as with Softmax above, ORT's QDQ fusions would rewrite the DQ → ConvTranspose island
    sess = _session(proto, disable_qdq_fusion=True)
    np.testing.assert_array_equal(sess.run(None, feeds[0])[0], run_reference(proto, feeds[0])[0])


def test_four_bit_weights_and_activations_stay_in_range():
    model = builders.cnn(size=32)
    feeds = _feeds(model, builders.images(24, 32, seed=5))
    result = qcompile.compile(
        model,
        target="fpga",
        calibration=feeds,
        weight_bits=4,
        activation_bits=4,
        overrides=("stem_conv:weight_bits=8",),
        **FAST,
    )
    proto = ir.to_proto(result.model)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "ConvInteger" and "ones" not in n.input[1]]
    ranges = {n.name: int(np.abs(inits[n.input[1]]).max()) for n in convs}
    assert ranges.pop("stem_conv_acc") > 7  # the override kept 8 bits there
    assert max(ranges.values()) <= 7  # symmetric narrow 4-bit weights: [-7, 7]
    # every requantization clamps to the signed 4-bit range [-8, 7] (or tighter, for ReLU)
    # (int32 clamps are the exact wide sums of residual Adds, not activations)
    clips = [n for n in proto.graph.node if n.op_type == "Clip" and inits[n.input[2]] < 2**16]
    assert clips and all(inits[c.input[1]] >= -8 and inits[c.input[2]] <= 7 for c in clips)
    sess = _session(proto)
    np.testing.assert_array_equal(sess.run(None, feeds[0])[0], run_reference(proto, feeds[0])[0])


def test_bit_widths_are_refused_on_the_cpu_target():
    with pytest.raises(QCompileError, match="--target fpga"):
        qcompile.compile(
            builders.mlp(), calibration={"input": builders.features(16)}, weight_bits=4, **FAST
        )


def test_a_factor_no_dyadic_can_express_leaves_the_op_float(monkeypatch):
    """Scales 2**31 apart (vanishing random-init activations) have no int32 multiplier: the
    op stays a float island with that reason instead of crashing the lowering."""
    from qcompile.lower import integer_only
    from qcompile.numerics.dyadic import DyadicRangeError, to_dyadic

    with pytest.raises(DyadicRangeError, match="requantization factors"):
        to_dyadic(2.0**40)

    def refuse(node, emit, graph):
        raise DyadicRangeError("requantization factors must be in [0, 2**31), got 1e+12")

    monkeypatch.setattr(integer_only.LowerToIntegerOnly, "_gemm", lambda self, *a: refuse(*a))
    result = qcompile.compile(
        builders.mlp(), target="fpga", calibration={"input": builders.features(24)},
        allow_float="op:Gemm", **FAST,
    )  # fmt: skip
    islands = [i for i in result.report.float_islands if i["op_type"] == "Gemm"]
    assert islands and all("no dyadic requantization" in i["reason"] for i in islands)
