"""Static dims onnx's inference loses, recovered for integer-only pipelines
(qcompile/passes/static_dims.py): DeBERTa's √(head size) read from a shape."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from conftest import FAST
from onnx import helper, numpy_helper

import qcompile
from qcompile.ir.shapes import infer_shapes
from qcompile.lower.integer_parts import float_ops_between
from qcompile.passes.static_dims import FoldStaticShapeReads

HEADS, HEAD_SIZE, WIDTH = 2, 8, 16


def _scaled_heads() -> onnx.ModelProto:
    """x·Wq split into heads by Reshapes whose shapes are built from Shape reads, then
    divided by Sqrt(Cast(Squeeze(Slice(Shape(q), −1)))) as DeBERTa's export writes it;
    onnx's inference (with data propagation) loses the head size, ORT's symbolic one
    does not."""
    rng = np.random.default_rng(0)
    ints = {"axis0": [0], "minus1": [-1], "heads": [HEADS], "end": [2**63 - 1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    inits += [numpy_helper.from_array(np.array(i, np.int64), f"at{i}") for i in (0, 1, 3)]
    for name in ("wq", "wo"):
        w = rng.normal(0, 0.3, (HEAD_SIZE if name == "wo" else WIDTH, WIDTH))
        inits.append(numpy_helper.from_array(w.astype(np.float32), name))
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "wq"], ["q"]),
        node("Shape", ["q"], ["q_shape"]),
        node("Gather", ["q_shape", "at0"], ["batch"], axis=0),
        node("Gather", ["q_shape", "at1"], ["seq"], axis=0),
        node("Unsqueeze", ["batch", "axis0"], ["batch1"]),
        node("Unsqueeze", ["seq", "axis0"], ["seq1"]),
        node("Concat", ["batch1", "seq1", "heads", "minus1"], ["split_shape"], axis=0),
        node("Reshape", ["q", "split_shape"], ["q4"]),
        node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        node("Shape", ["qt"], ["qt_shape"]),
        node("Gather", ["qt_shape", "at3"], ["last"], axis=0),
        node("Unsqueeze", ["last", "axis0"], ["last1"]),
        node("Concat", ["minus1", "seq1", "last1"], ["merged_shape"], axis=0),
        node("Reshape", ["qt", "merged_shape"], ["q3"]),
        node("Shape", ["q3"], ["q3_shape"]),
        node("Slice", ["q3_shape", "minus1", "end"], ["head_size"]),
        node("Squeeze", ["head_size", "axis0"], ["head_size0"]),
        node("Cast", ["head_size0"], ["head_size_f"], to=onnx.TensorProto.FLOAT),
        node("Sqrt", ["head_size_f"], ["root"]),
        node("Div", ["q3", "root"], ["scaled"], name="scale"),
        node("MatMul", ["scaled", "wo"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled_heads",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", WIDTH])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((2, 5, WIDTH)).astype(np.float32)} for _ in range(6)]


def test_shape_read_of_a_static_dim_folds_to_a_constant():
    model = ir.from_proto(_scaled_heads())
    infer_shapes(model)
    div = next(n for n in model.graph if n.name == "scale")
    assert div.inputs[1].const_value is None and not div.inputs[0].shape.is_static(2)
    assert FoldStaticShapeReads()(model).modified
    div = next(n for n in model.graph if n.name == "scale")
    assert float(div.inputs[1].const_value.numpy()) == np.float32(np.sqrt(HEAD_SIZE))
    # the scalar-index Gather of the (static) head size folds; batch and seq stay reads
    gathers = [n for n in model.graph if n.op_type == "Gather"]
    assert sorted(n.outputs[0].name for n in gathers) == ["batch", "seq"]
    proto = ir.to_proto(model)
    feed = _feeds()[0]

    def run(m: onnx.ModelProto) -> np.ndarray:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, feed)[0]

    np.testing.assert_allclose(run(proto), run(_scaled_heads()), rtol=1e-5, atol=1e-6)


def test_division_by_a_shape_derived_constant_compiles_integer_only():
    result = qcompile.compile(_scaled_heads(), target="fpga", calibration=_feeds(), **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    assert "Div" not in {n.op_type for n in result.model.graph}
    assert result.report.min_output_sqnr_db > 20
