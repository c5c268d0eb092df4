"""Constant Pad in integer-only graphs (qcompile/lower/integer_select.py): the padding is
the code that stands for the pad value — the zero point for 0, as Swin pads its
windows — so the Pad moves codes like any data movement; a value off the input's grid
is refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FAST
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.backends.reference import run_reference
from qcompile.errors import QCompileError
from qcompile.lower.integer_parts import float_ops_between


def padded_convs(value: float | None = None) -> onnx.ModelProto:
    """Conv → Relu → Pad(constant; 1 row top, 2 columns right) → Transpose → Conv."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype("f"), "w0"),
        numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.3).astype("f"), "w1"),
        numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64), "pads"),
    ]
    pad_inputs = ["r", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "pad_value"))
        pad_inputs.append("pad_value")
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["f"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Relu", ["f"], ["r"], name="relu"),
        helper.make_node("Pad", pad_inputs, ["p"], mode="constant", name="pad"),
        # (a Pad right before the Conv would be folded into the Conv's own pads)
        helper.make_node("Transpose", ["p"], ["t"], perm=[0, 1, 3, 2], name="transpose"),
        helper.make_node("Conv", ["t", "w1"], ["y"], name="conv1"),
    ]
    graph = helper.make_graph(
        nodes,
        "padded_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int = 6):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 10, 12)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("target, value", [("fpga", None), ("cpu-integer", 0.0)])
def test_zero_pad_moves_codes_and_matches_the_reference(target, value):
    kw = {"integer_only": True} if target == "cpu-integer" else {}
    feeds = _feeds()
    model = padded_convs(value)
    result = qcompile.compile(model, target=target.split("-")[0], calibration=feeds, **kw, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    pads = [n for n in result.model.graph if n.op_type == "Pad"]
    assert len(pads) == 1 and pads[0].inputs[0].dtype in (ir.DataType.INT8, ir.DataType.UINT8)
    proto = ir.to_proto(result.model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds[:2]:
        got = sess.run(None, feed)[0]
        np.testing.assert_array_equal(got, run_reference(proto, feed)[0])
        assert got.shape == fp32.run(None, feed)[0].shape == (1, 4, 12, 9)
    assert result.report.min_output_sqnr_db > 25.0


def test_pad_value_off_the_grid_is_refused_naming_the_node():
    with pytest.raises(QCompileError, match="'pad'") as err:
        qcompile.compile(padded_convs(0.3), target="fpga", calibration=_feeds(), **FAST)
    assert "not a code of its input" in str(err.value)
