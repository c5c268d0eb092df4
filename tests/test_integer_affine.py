"""Caffe2-era CNN pieces in integer-only graphs: a BatchNormalization no linear layer
absorbed (qcompile/lower/integer_affine.py) and Sum residuals (passes/fusion.SumAsAdds)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import compile_integer_checked
from onnx import TensorProto, helper, numpy_helper


def _block(kind: str) -> onnx.ModelProto:
    """Two Convs; "bn": Concat → BatchNormalization (γ of both signs) → Relu → Conv, as
    DenseNet's pre-activation blocks; "sum2"/"sum3": their outputs (and the input's
    projection) summed by Sum → Relu → Conv, as Caffe2's ResNet writes residuals."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(f32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(f32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 1, 1)).astype(f32), "w3"),
    ]
    node = helper.make_node
    nodes = [
        node("Conv", ["input", "w1"], ["a"], pads=[1] * 4),
        node("Conv", ["input", "w2"], ["b"], pads=[1] * 4),
    ]
    if kind == "bn":
        channels = 8
        inits += [
            numpy_helper.from_array(rng.normal(0, 1, channels).astype(f32), "gamma"),
            numpy_helper.from_array(rng.normal(0, 0.3, channels).astype(f32), "beta"),
            numpy_helper.from_array(rng.normal(0, 0.5, channels).astype(f32), "mean"),
            numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(f32), "var"),
        ]
        nodes += [
            node("Concat", ["a", "b"], ["cat"], axis=1),
            node(
                "BatchNormalization", ["cat", "gamma", "beta", "mean", "var"], ["n"], name="bn"
            ),  # fmt: skip
        ]
    else:
        channels = 4
        terms = ["a", "b"] + (["c"] if kind == "sum3" else [])
        if kind == "sum3":
            nodes.append(node("Conv", ["input", "w3"], ["c"]))
        nodes.append(node("Sum", terms, ["n"], name="sum"))
    inits.append(
        numpy_helper.from_array(rng.normal(0, 0.3, (4, channels, 1, 1)).astype(f32), "w_out")
    )
    nodes += [node("Relu", ["n"], ["r"]), node("Conv", ["r", "w_out"], ["output"])]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("kind", ["bn", "sum2", "sum3"])
def test_standalone_batch_norm_and_sum_are_integer(kind):
    rng = np.random.default_rng(1)
    feeds = [{"input": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    result = compile_integer_checked(_block(kind), feeds)
    ops = {n.op_type for n in result.model.graph}
    assert not ops & {"BatchNormalization", "Sum"}, ops
