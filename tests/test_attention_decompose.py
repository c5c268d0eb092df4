"""ONNX's fused Attention (opset 23) written out for integer-only pipelines
(qcompile/passes/attention.py): FP32-equal to ONNX Runtime's kernel, lowered without float
between the quantizers, and left alone where the pass does not cover the node."""

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
from qcompile.lower.integer_parts import float_ops_between
from qcompile.passes.attention import DecomposeAttention

HEADS, HEAD_SIZE, SEQ = 2, 8, 6
WIDTH = HEADS * HEAD_SIZE


def _attention_block(*, mask: str = "bool", **attention_attrs) -> onnx.ModelProto:
    """x → Q/K/V projections → [B, H, S, D] → Attention (opset 23) → merged heads → out
    projection; the boolean mask comes from an int64 input as BERT exports build it."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) * 0.3).astype(np.float32), n)
        for n in ("wq", "wk", "wv", "wo")
    ]
    inits += [
        numpy_helper.from_array(np.array([0, SEQ, HEADS, HEAD_SIZE], np.int64), "heads"),
        numpy_helper.from_array(np.array([0, SEQ, WIDTH], np.int64), "merged"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "mask_axes"),
        numpy_helper.from_array(np.array([1, 1, SEQ, 1], np.int64), "mask_rows"),
    ]
    nodes = []
    for p in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}_lin"]),
            helper.make_node("Reshape", [f"{p}_lin", "heads"], [f"{p}_split"]),
            helper.make_node("Transpose", [f"{p}_split"], [p], perm=[0, 2, 1, 3]),
        ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, WIDTH])]
    attention_inputs = ["q", "k", "v"]
    if mask != "none":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", SEQ]))
        nodes += [
            helper.make_node("Unsqueeze", ["mask", "mask_axes"], ["mask_keys"]),
            helper.make_node("Expand", ["mask_keys", "mask_rows"], ["mask4"]),  # [B, 1, S, S]
            helper.make_node("Cast", ["mask4"], ["mask_bool"], to=TensorProto.BOOL),
        ]
        if mask == "float":  # an additive mask: 0 where kept, −10000 where masked
            inits.append(numpy_helper.from_array(np.array(10000.0, np.float32), "big"))
            inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
            nodes += [
                helper.make_node("Cast", ["mask4"], ["mask_f"], to=TensorProto.FLOAT),
                helper.make_node("Sub", ["mask_f", "one"], ["mask_neg"]),
                helper.make_node("Mul", ["mask_neg", "big"], ["mask_add"]),
            ]
        attention_inputs.append("mask_add" if mask == "float" else "mask_bool")
    nodes += [
        helper.make_node("Attention", attention_inputs, ["att"], name="att", **attention_attrs),
        helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["att_t", "merged"], ["att_m"]),
        helper.make_node("MatMul", ["att_m", "wo"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "attention23",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", SEQ, WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _feeds(mask: bool = True) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    feeds = []
    for i in range(8):
        feed = {"x": rng.standard_normal((2, SEQ, WIDTH)).astype(np.float32)}
        if mask:  # the second sample's last positions are padding
            m = np.ones((2, SEQ), np.int64)
            m[1, SEQ - 1 - i % 3 :] = 0
            feed["mask"] = m
        feeds.append(feed)
    return feeds


def _run(proto: onnx.ModelProto, feed: dict) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@pytest.mark.parametrize(
    ("mask", "attrs"),
    [("bool", {}), ("float", {"scale": 0.3}), ("none", {})],
)
def test_written_out_attention_equals_the_fused_kernel(mask, attrs):
    model = _attention_block(mask=mask, **attrs)
    written = ir.from_proto(model)
    assert DecomposeAttention()(written).modified
    ops = [n.op_type for n in written.graph]
    assert "Attention" not in ops and ops.count("Softmax") == 1
    proto = ir.to_proto(written)
    onnx.checker.check_model(proto, full_check=True)
    for feed in _feeds(mask != "none")[:3]:
        np.testing.assert_allclose(_run(proto, feed), _run(model, feed), rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zero_like_the_operator():
    model = _attention_block(mask="bool")
    written = ir.to_proto(DecomposeAttention()(ir.from_proto(model)).model)
    feed = {"x": _feeds()[0]["x"], "mask": np.zeros((2, SEQ), np.int64)}
    np.testing.assert_array_equal(_run(written, feed), np.zeros((2, SEQ, WIDTH), np.float32))


def test_attention_23_compiles_integer_only_without_islands():
    feeds = _feeds()
    result = qcompile.compile(_attention_block(), target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    ops = {n.op_type for n in result.model.graph}
    assert "Attention" not in ops and "Softmax" not in ops, ops
    proto = ir.to_proto(result.model)
    np.testing.assert_array_equal(_run(proto, feeds[0]), run_reference(proto, feeds[0])[0])
    assert result.report.min_output_sqnr_db > 20


def test_cases_the_pass_does_not_cover_stay_fused():
    # a causal flag, and QDQ targets (ORT has the fused kernel) keep the operator
    causal = ir.from_proto(_attention_block(mask="none", is_causal=1))
    assert not DecomposeAttention()(causal).modified
    result = qcompile.compile(_attention_block(), target="cpu", calibration=_feeds(), **FAST)
    assert "Attention" in {n.op_type for n in result.model.graph}
