"""Integer RMSNorm (qcompile/lower/integer_norms.py) in the three forms models carry it,
the chain reader (qcompile/ir/norms.py), and shape-only rotary tables left outside the
integer region (qcompile/quantize/integer_scope.py)."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FAST
from onnx import TensorProto, helper

import qcompile
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.reference import run_reference
from qcompile.ir.norms import rms_norm_at
from qcompile.lower.integer_parts import float_ops_between


def _feeds(dim: int = 32) -> list[dict[str, np.ndarray]]:
    return [{"input": builders.token_embeddings(4, dim=dim, seed=i)} for i in range(8)]


def _ort(proto: onnx.ModelProto, feed: dict) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@pytest.mark.parametrize("style", ["torchscript", "dynamo", "op"])
def test_rms_norm_is_one_integer_kernel_in_every_form(style):
    # no island, nothing float between the quantizers, ORT = reference bit for bit, and at
    # least as accurate as the QDQ graph that normalizes in float
    feeds = _feeds()
    model = builders.rms_block(style=style)
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    ops = {n.op_type for n in result.model.graph}
    assert not ops & {"Pow", "Sqrt", "Reciprocal", "RMSNormalization", "ReduceMean"}, ops
    proto = ir.to_proto(result.model)
    for feed in feeds[:3]:
        np.testing.assert_array_equal(_ort(proto, feed), run_reference(proto, feed)[0])
    qdq = qcompile.compile(
        model, target="fpga", calibration=feeds, disabled_passes=("LowerToIntegerOnly",), **FAST
    )
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 1.0
    assert result.report.min_output_sqnr_db > 20


@pytest.mark.skipif(not tvm_backend.available(), reason="apache-tvm is not installed")
def test_integer_rms_norm_is_bit_exact_in_tvm():
    feeds = _feeds()
    result = qcompile.compile(builders.rms_block(), target="fpga", calibration=feeds, **FAST)
    executable, names, _ = tvm_backend.compile_model(
        result.model, input_shapes={"input": (4, 16, 32)}
    )
    runner = tvm_backend.TVMRunner(executable, names)
    proto = ir.to_proto(result.model)
    for feed in feeds[:2]:
        np.testing.assert_array_equal(runner.run(feed)[0], _ort(proto, feed))


def test_chain_reader_takes_exact_rms_norms_only():
    def anchor(model: onnx.ModelProto) -> ir.Node:
        graph = ir.from_proto(onnx.shape_inference.infer_shapes(model)).graph
        return next(n for n in graph if n.name == "norm")

    norm = rms_norm_at(anchor(builders.rms_block(style="torchscript")))
    assert norm is not None and norm.gamma is not None and norm.epsilon == pytest.approx(1e-6)
    assert sorted(n.op_type for n in norm.nodes) == sorted(
        ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Cast", "Mul"]
    )
    assert rms_norm_at(anchor(builders.rms_block(style="dynamo"))) is not None
    # 2/√(…) is not 1/√(…): the integer kernel would compute the wrong value
    model = builders.rms_block(style="torchscript")
    div = next(n for n in model.graph.node if n.op_type == "Div")
    one = next(i for i in model.graph.initializer if i.name == div.input[0])
    one.CopyFrom(onnx.numpy_helper.from_array(np.float32(2.0), one.name))
    assert rms_norm_at(anchor(model)) is None
    # the mean of squares read elsewhere too: not a chain to compute as one
    model = builders.rms_block(style="torchscript")
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    model.graph.node.append(helper.make_node("Identity", [mean.output[0]], ["side"]))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    assert rms_norm_at(anchor(model)) is None


def _rotary_block(dim: int = 32) -> onnx.ModelProto:
    """q·cos(θ) + q·sin(θ) with θ = position × inverse frequency, positions from the
    sequence length (Shape → Range), as LLaMA-style exports compute rotary tables."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    inits = [
        onnx.numpy_helper.from_array(w, "W"),
        onnx.numpy_helper.from_array(w.T.copy(), "W2"),
        onnx.numpy_helper.from_array(inv_freq, "inv_freq"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "one_index"),
        onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
        onnx.numpy_helper.from_array(np.array(1, np.int64), "step"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["q"], name="q_proj"),
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "one_index"], ["seq1"], axis=0),
        helper.make_node("Squeeze", ["seq1"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "step"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["positions_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["positions_f", "last"], ["positions_col"]),
        helper.make_node("Mul", ["positions_col", "inv_freq"], ["freqs"], name="angles"),
        helper.make_node("Concat", ["freqs", "freqs"], ["theta"], axis=-1),
        helper.make_node("Cos", ["theta"], ["cos"]),
        helper.make_node("Sin", ["theta"], ["sin"]),
        helper.make_node("Mul", ["q", "cos"], ["q_cos"]),
        helper.make_node("Mul", ["q", "sin"], ["q_sin"]),
        helper.make_node("Add", ["q_cos", "q_sin"], ["rotated"]),
        helper.make_node("MatMul", ["rotated", "W2"], ["output"], name="o_proj"),
    ]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "S", dim])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "S", dim])
    graph = helper.make_graph(nodes, "rotary", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_rotary_tables_from_the_sequence_length_stay_outside_the_integer_region():
    # the angles (positions up to S in radians) are not quantized: the tables run before
    # the quantizers of cos/sin, and the q·cos, q·sin products are integer
    feeds = _feeds()
    result = qcompile.compile(_rotary_block(), target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    assert "computed from tensor shapes alone" in result.report.skipped_nodes.get("angles", "")
    assert result.report.integer_ops["Mul"] >= 2
    assert result.report.min_output_sqnr_db > 25
    proto = ir.to_proto(result.model)
    np.testing.assert_array_equal(_ort(proto, feeds[0]), run_reference(proto, feeds[0])[0])


def test_layer_norm_feeding_a_layer_norm_is_integer():
    # SegFormer's patch embedding: LayerNorm → the block's first LayerNorm. No plan node
    # reads the first one's output, yet both kernels work on codes: it is quantized
    rng = np.random.default_rng(0)
    dim = 16
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, [dim, dim], rng.normal(0, 0.3, dim * dim)),
        helper.make_tensor("w2", TensorProto.FLOAT, [dim, dim], rng.normal(0, 0.3, dim * dim)),
        helper.make_tensor("g1", TensorProto.FLOAT, [dim], rng.uniform(0.5, 1.5, dim)),
        helper.make_tensor("b1", TensorProto.FLOAT, [dim], rng.normal(0, 0.1, dim)),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g1", "b1"], ["n1"], axis=-1),
        helper.make_node("LayerNormalization", ["n1", "g1", "b1"], ["n2"], axis=-1),
        helper.make_node("MatMul", ["n2", "w2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ln_ln",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8, dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8, dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"input": rng.standard_normal((2, 8, dim)).astype(np.float32)} for _ in range(6)]
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert result.report.integer_ops["LayerNormalization"] == 2
    proto = ir.to_proto(result.model)
    np.testing.assert_array_equal(_ort(proto, feeds[0]), run_reference(proto, feeds[0])[0])
