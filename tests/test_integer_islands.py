"""Forms the corpus compiled only with float islands while Softmax and LayerNorm islands
were allowed by default: a pooled mean read by a LayerNorm (ConvNeXt, BEiT) and scaled
embeddings on the cpu target (Gemma). Integer-only now, with no island allowed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FAST, compile_integer_checked, corpus_model
from onnx import TensorProto, helper, numpy_helper

import qcompile


def _pooled_layer_norm() -> onnx.ModelProto:
    """Conv → ReduceMean over H, W → LayerNorm → Gemm, as ConvNeXt's and BEiT's poolers."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.3, (5, 8)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "spatial"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4, name="conv"),
        helper.make_node("ReduceMean", ["c", "spatial"], ["pooled"], keepdims=0, name="mean"),
        helper.make_node("LayerNormalization", ["pooled", "gamma", "beta"], ["n"], name="norm"),
        helper.make_node("Gemm", ["n", "fc"], ["output"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes, "pooled_ln",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_pooled_mean_read_by_a_layer_norm_is_integer():
    rng = np.random.default_rng(1)
    feeds = [{"input": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    result = compile_integer_checked(_pooled_layer_norm(), feeds)
    ops = {n.op_type for n in result.model.graph}
    assert not ops & {"ReduceMean", "LayerNormalization"}, ops


@pytest.mark.slow  # a cached corpus export (python -m benchmarks.corpus_torch)
def test_gemma_compiles_integer_only_on_cpu():
    """Gemma's scaled embeddings on `cpu --integer-only`: the cpu target's int8 embedding
    tables dequantize rows with a float Mul, which left the embedding scale and the first
    RMSNorm float inside the integer region; integer-only graphs keep the plan's tables."""
    model, feeds = corpus_model("gemma.torchscript.opset17")
    result = qcompile.compile(model, target="cpu", calibration=feeds, integer_only=True, **FAST)
    assert result.report.float_islands == []


def test_a_layer_norm_of_a_vanishing_input_is_its_beta():
    """ε dominates an input at scale ~1e-20 (random-init MobileViT): E = ε·n³/s² is past
    int64 and the output is β; the kernel caps E where every normalized value still
    truncates to 0 and saturates the requantization, instead of leaving the norm float."""
    rng = np.random.default_rng(0)
    dim = 16
    inits = [
        numpy_helper.from_array((1e-20 * rng.normal(0, 1, (dim, dim))).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(dim, np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 1, dim).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.3, (dim, 4)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["x"], name="tiny"),
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="norm"),
        helper.make_node("MatMul", ["n", "w2"], ["output"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "vanishing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6, 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"input": rng.standard_normal((2, 6, dim)).astype(np.float32)} for _ in range(6)]
    result = compile_integer_checked(model, feeds)
    assert "LayerNormalization" not in {n.op_type for n in result.model.graph}
