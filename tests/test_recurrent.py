"""LSTM unrolled for integer-only pipelines (qcompile/passes/recurrent.py): the same
function as ONNX Runtime's LSTM kernel, then quantized and lowered without a float op."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FAST, compile_integer_checked
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.errors import QCompileError
from qcompile.passes.recurrent import UnrollLSTM

STEPS, BATCH, FEATURES, HIDDEN = 5, 2, 6, 4


def _lstm_model(direction: str = "forward", steps: int | str = STEPS, bias: bool = True,
                outputs: int = 3) -> onnx.ModelProto:  # fmt: skip
    """input → MatMul → LSTM → (Y reshaped → MatMul, Y_h, Y_c)."""
    rng = np.random.default_rng(0)
    d = 2 if direction == "bidirectional" else 1
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (FEATURES, FEATURES)).astype(f32), "proj"),
        numpy_helper.from_array(rng.normal(0, 0.4, (d, 4 * HIDDEN, FEATURES)).astype(f32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.4, (d, 4 * HIDDEN, HIDDEN)).astype(f32), "r"),
        numpy_helper.from_array(rng.normal(0, 0.3, (d * HIDDEN, 3)).astype(f32), "head"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat"),
    ]
    lstm_inputs = ["x", "w", "r"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (d, 8 * HIDDEN)).astype(f32), "b"))
        lstm_inputs.append("b")
    names = ["y", "y_h", "y_c"][:outputs]
    node = helper.make_node
    nodes = [
        node("MatMul", ["input", "proj"], ["x"]),
        node("LSTM", lstm_inputs, names, name="lstm", hidden_size=HIDDEN, direction=direction),
        node("Transpose", ["y"], ["y_t"], perm=[0, 2, 1, 3]),
        node("Reshape", ["y_t", "flat"], ["y_flat"]),
        node("MatMul", ["y_flat", "head"], ["output"]),
    ]
    graph_outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    graph_outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names[1:]]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [steps, BATCH, FEATURES])],
        graph_outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    shape = (STEPS, BATCH, FEATURES)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _run(proto: onnx.ModelProto, feed) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("bias", [True, False])
def test_unrolled_lstm_computes_what_the_kernel_does(direction, bias):
    proto = _lstm_model(direction, bias=bias)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))  # the sequence length
    assert UnrollLSTM()(model).modified
    unrolled = ir.to_proto(model)
    assert "LSTM" not in {n.op_type for n in unrolled.graph.node}
    onnx.checker.check_model(unrolled, full_check=True)
    for feed in _feeds(2):
        for want, got in zip(_run(proto, feed), _run(unrolled, feed), strict=True):
            assert want.shape == got.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_compiles_integer_only(direction):
    result = compile_integer_checked(_lstm_model(direction, outputs=1), _feeds(), min_db=25.0)
    assert "LSTM" not in {n.op_type for n in result.model.graph}


def test_an_lstm_of_unknown_length_is_refused_with_the_fix():
    with pytest.raises(
        QCompileError, match=r"LSTM: not unrolled: the sequence length.*input-shape"
    ):
        qcompile.compile(_lstm_model(steps="T", outputs=1), target="fpga", calibration=_feeds(),
                         **FAST)  # fmt: skip
    # pinned, it compiles
    result = qcompile.compile(_lstm_model(steps="T", outputs=1), target="fpga",
                              calibration=_feeds(), input_shapes={"input": (STEPS, BATCH, FEATURES)},
                              **FAST)  # fmt: skip
    assert result.report.float_islands == []


def test_control_flow_in_the_integer_region_is_refused_naming_why():
    from benchmarks import corpus_models

    feeds = [{"x": np.random.default_rng(i).standard_normal((6, 16)).astype(np.float32)}
             for i in range(4)]  # fmt: skip
    with pytest.raises(QCompileError, match=r"loop \(Loop: control flow: .* not the bodies"):
        qcompile.compile(corpus_models.loop_and_scan(), target="fpga", calibration=feeds, **FAST)
