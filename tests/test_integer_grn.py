"""ConvNeXt-V2's GRN as one integer kernel (qcompile/lower/integer_grn.py), read from the
chain both torch exporters write (qcompile/ir/grn.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import compile_integer_checked
from onnx import TensorProto, helper, numpy_helper

from qcompile.ir.grn import grn_at

C = 24


def _grn_block(*, l2_axes=(1, 2), commuted: bool = False, gamma_scale: float = 1.0):
    """[N, 6, 6, C] → MatMul → GRN (γ, β random) → MatMul, channels last as HF writes it."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (C, C)).astype(f32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (C, C)).astype(f32), "w2"),
        numpy_helper.from_array(
            (rng.normal(0, 1, (1, 1, 1, C)) * gamma_scale).astype(f32), "gamma"
        ),
        numpy_helper.from_array(rng.normal(0, 0.2, (1, 1, 1, C)).astype(f32), "beta"),
        numpy_helper.from_array(np.array(1e-6, f32), "eps"),
        numpy_helper.from_array(np.array(list(l2_axes), np.int64), "spatial"),
        numpy_helper.from_array(np.array([-1], np.int64), "channels"),
    ]
    node = helper.make_node
    pair = (lambda a, b: [b, a]) if commuted else (lambda a, b: [a, b])
    nodes = [
        node("MatMul", ["input", "w1"], ["x"]),
        node("ReduceL2", ["x", "spatial"], ["g"], keepdims=1),
        node("ReduceMean", ["g", "channels"], ["g_mean"], keepdims=1),
        node("Add", pair("g_mean", "eps"), ["g_den"]),
        node("Div", ["g", "g_den"], ["n"]),
        node("Mul", pair("x", "n"), ["xn"]),
        node("Mul", pair("gamma", "xn"), ["gxn"]),
        node("Add", pair("gxn", "beta"), ["shifted"]),
        node("Add", pair("shifted", "x"), ["grn"], name="grn_out"),
        node("MatMul", ["grn", "w2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "grn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, 6, C])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6, 6, C])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _feeds():
    rng = np.random.default_rng(1)
    return [{"input": rng.standard_normal((2, 6, 6, C)).astype(np.float32)} for _ in range(6)]


@pytest.mark.parametrize("commuted", [False, True])
def test_grn_is_one_integer_kernel(commuted):
    model, feeds = _grn_block(commuted=commuted), _feeds()
    # against the QDQ graph, which computes GRN in float between the same two quantizers
    result = compile_integer_checked(model, feeds)
    ops = {n.op_type for n in result.model.graph}
    assert not ops & {"ReduceL2", "ReduceMean"}, ops  # integer sums and roots instead


def test_grn_reader_takes_spatial_norms_only():
    def anchor(model: onnx.ModelProto) -> ir.Node:
        graph = ir.from_proto(onnx.shape_inference.infer_shapes(model)).graph
        return next(n for n in graph if n.name == "grn_out")

    found = grn_at(anchor(_grn_block()))
    assert found is not None and found.epsilon == pytest.approx(1e-6)
    assert sorted(n.op_type for n in found.nodes) == sorted(
        ["ReduceL2", "ReduceMean", "Add", "Div", "Mul", "Mul", "Add"]
    )
    # a norm over the channels instead of the spatial axes is not GRN
    assert grn_at(anchor(_grn_block(l2_axes=(3,)))) is None
