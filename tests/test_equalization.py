"""Cross-layer equalization: FP32 outputs unchanged, per-channel ranges equalized."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.ir.io import load_model
from qcompile.passes.equalization import GATE_SUFFIX, CrossLayerEqualization
from qcompile.passes.fusion import FuseForQuantization


def _chain(seed: int, depthwise: bool, skew: float, act: str | None) -> onnx.ModelProto:
    """conv(3→8) → act → [dw conv 8 | conv 8→8] → act → conv(8→4), channel ranges skewed."""
    rng = np.random.default_rng(seed)
    c = 8
    w1 = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    w1 *= np.exp(rng.uniform(-skew, skew, c)).astype(np.float32)[:, None, None, None]
    b1 = rng.standard_normal(c).astype(np.float32)
    w2 = rng.standard_normal((c, 1 if depthwise else c, 3, 3)).astype(np.float32)
    w2 *= np.exp(rng.uniform(-skew, skew, c)).astype(np.float32)[:, None, None, None]
    b2 = rng.standard_normal(c).astype(np.float32)
    w3 = rng.standard_normal((4, c, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], pads=[1, 1, 1, 1], name="c1")]
    cur = "y1"
    if act:
        nodes.append(helper.make_node(act, [cur], ["a1"], name="a1"))
        cur = "a1"
    nodes.append(
        helper.make_node(
            "Conv",
            [cur, "w2", "b2"],
            ["y2"],
            pads=[1, 1, 1, 1],
            group=c if depthwise else 1,
            name="c2",
        )
    )
    cur = "y2"
    if act:
        nodes.append(helper.make_node(act, [cur], ["a2"], name="a2"))
        cur = "a2"
    nodes.append(helper.make_node("Conv", [cur, "w3"], ["out"], name="c3"))
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"))
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, x):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    depthwise=st.booleans(),
    skew=st.floats(0.0, 3.0),
    act=st.sampled_from([None, "Relu", "HardSwish"]),
)
def test_equalization_keeps_fp32_outputs(seed, depthwise, skew, act):
    proto = _chain(seed, depthwise, skew, act)
    x = np.random.default_rng(seed).standard_normal((2, 3, 12, 12)).astype(np.float32)
    model = load_model(proto)
    FuseForQuantization()(model)  # HardSwish in the canonical form the pass reads
    CrossLayerEqualization(hardswish=True)(model)
    ref = _run(proto, x)
    # float32 rounding of the rescaled weights: relative to the output's magnitude
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_equalization_balances_ranges_and_skips_non_homogeneous_activations():
    proto = _chain(0, depthwise=True, skew=2.0, act="Relu")
    model = load_model(proto)
    assert CrossLayerEqualization()(model).modified
    inits = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    r1 = np.abs(inits["w1"].reshape(8, -1)).max(1)
    r2 = np.abs(inits["w2"].reshape(8, -1)).max(1)
    # the dw conv's channels are also the next pw conv's inputs, so the chain settles
    # between both pairs; each channel is far more balanced than the 2-e-fold skew
    assert np.max(np.maximum(r1 / r2, r2 / r1)) < 2.0
    # Sigmoid is not positively homogeneous: nothing may change across it
    clipped = load_model(_chain(0, depthwise=True, skew=2.0, act="Sigmoid"))
    assert not CrossLayerEqualization()(clipped).modified


def test_equalization_crosses_hardswish_through_a_depthwise_gate():
    """HardSwish pairs are equalized: each gets a 1×1 depthwise gate Conv holding s, the
    chain's ranges are balanced, and rerunning the pass reuses the gate."""
    model = load_model(_chain(1, depthwise=True, skew=2.5, act="HardSwish"))
    FuseForQuantization()(model)
    assert not CrossLayerEqualization()(model).modified  # HardSwish pairs only on request
    assert CrossLayerEqualization(hardswish=True)(model).modified
    gates = [n for n in model.graph if n.name.endswith(GATE_SUFFIX)]
    assert len(gates) == 2 and not any(n.op_type == "Add" for n in model.graph)
    inits = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    r1 = np.abs(inits["w1"].reshape(8, -1)).max(1)
    r2 = np.abs(inits["w2"].reshape(8, -1)).max(1)
    assert np.max(np.maximum(r1 / r2, r2 / r1)) < 2.0
    CrossLayerEqualization(hardswish=True)(model)
    assert [n.name for n in model.graph if n.name.endswith(GATE_SUFFIX)] == [n.name for n in gates]


def _tiny_channel_chain() -> onnx.ModelProto:
    """Stem channels 1/100 of the others, HardSwish, a depthwise conv that amplifies them."""
    proto = _chain(3, depthwise=True, skew=0.0, act="HardSwish")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    tiny = np.ones(8, np.float32)
    tiny[[1, 4, 6]] = 0.01
    inits["w1"] = inits["w1"] * tiny[:, None, None, None]
    inits["b1"] = inits["b1"] * tiny
    inits["w2"] = inits["w2"] / tiny[:, None, None, None]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    return proto


def test_hardswish_equalization_rescues_tiny_channels_before_a_depthwise_conv():
    """The PP-PicoDet failure in small: stem channels 1/100 of the widest, HardSwish, a
    depthwise conv that amplifies them. Per-tensor activation quantization turns the tiny
    channels into noise unless the pair is equalized across the HardSwish."""
    proto = _tiny_channel_chain()
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)} for _ in range(6)]
    fast = {"progress": False, "bench_runs": 0, "speed_guard": False}

    def compile_(**kw):
        return qcompile.compile(proto, calibration=calibration, **fast, **kw)

    def sqnr(result) -> float:
        return min(o.sqnr_db for o in result.report.outputs)

    auto = compile_(equalize_hardswish="auto")
    off = compile_(equalize_hardswish="off")
    without = compile_(disabled_passes=("CrossLayerEqualization",))
    assert sqnr(auto) > sqnr(without) + 10.0, (sqnr(auto), sqnr(without))
    assert sqnr(off) < sqnr(auto) - 10.0  # the Relu-only CLE cannot cross HardSwish
    assert any("HardSwish pairs kept" in note for note in auto.report.notes)
    assert sum(n.name.endswith(GATE_SUFFIX) for n in auto.model.graph) == 2
    assert not any(n.name.endswith(GATE_SUFFIX) for n in off.model.graph)


def test_mixed_precision_keeps_the_hardswish_gates_its_base_chose():
    proto = _tiny_channel_chain()
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)} for _ in range(6)]
    result = qcompile.compile(
        proto,
        calibration=calibration,
        max_accuracy_drop=0.001,
        progress=False,
        bench_runs=0,
        speed_guard=False,
    )
    assert result.report.mixed_precision is not None
    assert sum(n.name.endswith(GATE_SUFFIX) for n in result.model.graph) == 2
