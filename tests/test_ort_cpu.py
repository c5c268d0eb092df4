"""The cpu target writes float-output QDQ MatMuls as ORT's MatMulIntegerToFloat kernel
with the bias folded in; other readers get the standard Q/DQ form back."""

from __future__ import annotations

import builders
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qcompile
from qcompile.lower.ort_cpu import FuseMatMulIntegerToFloat, expand_matmul_integer_to_float
from tests.conftest import FAST


def _run(model: ir.Model, feed) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def compiled():
    feeds = [{"input": builders.token_embeddings(2, seed=i)} for i in range(6)]
    result = qcompile.compile(builders.transformer_block(), calibration=feeds, **FAST)
    return result, feeds


def test_cpu_target_writes_the_kernel_with_the_bias_folded_in(compiled):
    result, _ = compiled
    kernels = [n for n in result.model.graph if n.op_type == "MatMulIntegerToFloat"]
    assert kernels and all(n.domain == "com.microsoft" for n in kernels)
    # the block's Linear layers with a float output carry their bias: no Add reads them
    with_bias = [n for n in kernels if len(n.inputs) == 7 and n.inputs[6] is not None]
    assert with_bias
    for node in with_bias:
        assert not any(u.node.op_type == "Add" and u.node.inputs[1] is node.inputs[6]
                       for u in node.outputs[0].uses())  # fmt: skip
    assert result.model.opset_imports["com.microsoft"] == 1
    # layers keep their names (reports and the guard's profiles name them)
    fp32_names = {n.name for n in result.fp32_model.graph}
    assert all(n.name in fp32_names for n in kernels)


def test_the_kernel_computes_what_the_qdq_graph_computes(compiled):
    """Expanding the kernels back to DQ → MatMul → Add gives the graph ORT fuses itself;
    both run in ORT and agree to float rounding (the bias is added in float either way)."""
    result, feeds = compiled
    expanded = ir.from_proto(ir.to_proto(result.model))
    count = expand_matmul_integer_to_float(expanded)
    assert count == _ops(result.model)["MatMulIntegerToFloat"]
    assert "MatMulIntegerToFloat" not in _ops(expanded)
    for feed in feeds[:3]:
        for a, b in zip(_run(result.model, feed), _run(expanded, feed), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # and the fusion of the expanded graph writes the same kernels again
    FuseMatMulIntegerToFloat()(expanded)
    assert _ops(expanded).get("MatMulIntegerToFloat") == count


def test_quantized_outputs_and_other_targets_are_left_alone(compiled):
    result, feeds = compiled
    # a MatMul whose output is quantized again stays for ORT's QLinearMatMul fusion
    for node in result.model.graph:
        if node.op_type == "MatMul":
            assert any(u.node.op_type == "QuantizeLinear" for u in node.outputs[0].uses()) or (
                node.inputs[0].producer() is None
                or node.inputs[0].producer().op_type != "DequantizeLinear"
            )
    # TensorRT/CUDA read standard Q/DQ: the gpu target keeps it
    gpu = qcompile.compile(builders.transformer_block(), target="gpu", calibration=feeds, **FAST)
    assert "MatMulIntegerToFloat" not in _ops(gpu.model)
    assert _ops(gpu.model).get("MatMul")


def test_requantize_reads_the_kernel_back(compiled, tmp_path):
    """A cpu output compiled again (--already-quantized requantize) goes through the kernel's
    float form, as for any ORT operator-format model."""
    result, feeds = compiled
    path = tmp_path / "int8.onnx"
    ir.save(result.model, path)
    again = qcompile.compile(path, calibration=feeds, already_quantized="requantize", **FAST)
    assert _ops(again.model).get("MatMulIntegerToFloat")
    out_a, out_b = _run(result.model, feeds[0])[0], _run(again.model, feeds[0])[0]
    noise = np.sum((out_a - out_b) ** 2) / np.sum(out_a**2)
    assert 10 * np.log10(1 / noise) > 20
