"""Integer AveragePool in every window geometry (qcompile/lower/integer_pool.py) and the
pooling heads around it: ceil_mode windows past the end, a pooler whose kernel is wider
than its map (HF EfficientNet), SiLU → ReduceMean (MobileViT, EfficientNet dynamo)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FAST, compile_integer_checked
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.backends.reference import run_reference
from qcompile.numerics.dyadic import DyadicRangeError, requantize, to_dyadic_saturating


def _pool_model(size: int, **pool) -> onnx.ModelProto:
    """Conv (8 channels, size×size) → AveragePool(**pool) → 1×1 Conv."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("AveragePool", ["c"], ["p"], name="pool", **pool),
        helper.make_node("Conv", ["p", "w2"], ["output"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "pool",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _check_integer(model: onnx.ModelProto, size: int, lowered: str) -> None:
    rng = np.random.default_rng(1)
    feeds = [
        {"input": rng.standard_normal((2, 3, size, size)).astype(np.float32)} for _ in range(6)
    ]
    result = compile_integer_checked(model, feeds)
    assert result.report.integer_ops[lowered] == 1


@pytest.mark.parametrize(
    ("size", "pool"),
    [
        # HF EfficientNet's pooler: a kernel wider than the map, ceil_mode → a global mean
        (5, {"kernel_shape": [8, 8], "strides": [8, 8], "ceil_mode": 1}),
        # ceil_mode windows past the padded end count only what they cover (both modes)
        (6, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4, "ceil_mode": 1,
             "count_include_pad": 1}),
        (5, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1,
             "count_include_pad": 0}),
        (7, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1,
             "count_include_pad": 0}),
        # floor mode, padding counted: one divisor for every window
        (6, {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1] * 4,
             "count_include_pad": 1}),
    ],
)  # fmt: skip
def test_average_pool_windows_are_integer_and_exact(size, pool):
    _check_integer(_pool_model(size, **pool), size, "AveragePool")


def test_silu_before_reduce_mean_pooling_is_integer():
    # the SiLU's Mul feeds a ReduceMean, which the plan does not list as a node: its
    # output must still be quantized for the integer ReduceMean to read codes
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["c", "s"], ["silu"], name="silu"),
        helper.make_node("ReduceMean", ["silu", "axes"], ["mean"], keepdims=0, name="mean"),
        helper.make_node("Gemm", ["mean", "fc"], ["output"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "silu_pool",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _check_integer(model, 6, "ReduceMean")


def test_requantization_past_the_multiplier_range_saturates_like_the_real_factor():
    # scales 2**31+ apart (a vanishing branch concatenated with an all-zero one): one
    # input step already overflows the output, at the real factor and at the one we use
    d = to_dyadic_saturating(5.07e30, 256)
    codes = np.array([-3, -1, 0, 1, 2], np.int64)
    np.testing.assert_array_equal(requantize(codes, d, 0, -128, 127), [-128, -128, 0, 127, 127])
    np.testing.assert_array_equal(requantize(codes, d, 5, 0, 255), [0, 0, 5, 255, 255])
    with pytest.raises(DyadicRangeError):  # a 32-bit output would not saturate at 2**30
        to_dyadic_saturating(5.07e30, 2**32)


def test_codes_model_cuts_at_the_output_dequantizers():
    # a classifier's Softmax after the integer region is float; the codes before it are
    # what ORT, the reference (and TVM) must agree on bit for bit
    from qcompile.backends.reference import codes_model

    model = _pool_model(6, kernel_shape=[2, 2], strides=[2, 2])
    model.graph.node.append(helper.make_node("Softmax", ["output"], ["probs"], axis=1))
    model.graph.output[0].name = "probs"
    rng = np.random.default_rng(1)
    feeds = [{"input": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    proto = ir.to_proto(qcompile.compile(model, target="fpga", calibration=feeds, **FAST).model)
    assert proto.graph.node[-1].op_type == "Softmax"  # left float at the graph output
    codes = codes_model(proto)
    assert [o.type.tensor_type.elem_type for o in codes.graph.output] == [TensorProto.INT8]
    assert "Softmax" not in {n.op_type for n in codes.graph.node}
    session = ort.InferenceSession(codes.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds[0])[0], run_reference(codes, feeds[0])[0])
