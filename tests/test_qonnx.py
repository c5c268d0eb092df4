"""QONNX export: qonnx's own executor runs it and agrees with our QDQ and integer models."""

from __future__ import annotations

import builders
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qcompile
from qcompile.backends.qonnx import QONNX_DOMAIN, execute, qonnx_available, to_qonnx
from qcompile.errors import QCompileError
from tests.conftest import FAST, compile_cli

pytestmark = pytest.mark.skipif(
    not qonnx_available(), reason="the qonnx package is not installed (pip install '.[fpga]')"
)


def _run(model: ir.Model, feed) -> np.ndarray:
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize(
    "options",
    [{}, {"weight_bits": 4, "activation_bits": 6}, {"pow2_scales": False}],
    ids=["w8a8-pow2", "w4a6-pow2", "w8a8-float-scales"],
)
def test_qonnx_executor_matches_our_integer_model(options):
    model = builders.cnn(size=32)
    feeds = [{"input": builders.images(4, 32, seed=i)} for i in range(8)]
    result = qcompile.compile(model, target="fpga", calibration=feeds, **options, **FAST)
    qonnx_model = to_qonnx(result.qdq_model, {"input": (4, 3, 32, 32)})
    quants = [n for n in qonnx_model.graph.node if n.op_type == "Quant"]
    assert quants and all(n.domain == QONNX_DOMAIN for n in quants)
    assert not {n.op_type for n in qonnx_model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    inits = {t.name: numpy_helper.to_array(t) for t in qonnx_model.graph.initializer}
    widths = {float(inits[n.input[3]]) for n in quants}
    expected = {float(options.get("weight_bits", 8)), float(options.get("activation_bits", 8))}
    assert expected <= widths
    for feed in feeds[:2]:
        ours = _run(result.model, feed)  # the integer-only graph in ORT
        theirs = execute(qonnx_model, feed)[0]
        # same arithmetic written two ways: float convs between Quant vs integer kernels
        scale = np.abs(ours).max()
        assert np.max(np.abs(ours - theirs)) <= 1e-5 * scale + 1e-6


def test_cli_writes_qonnx_and_refuses_it_without_integer_lowering(tmp_path, cnn_path, cnn_calib):
    out, q = tmp_path / "out.onnx", tmp_path / "out.qonnx.onnx"
    assert (
        compile_cli(cnn_path, cnn_calib, out, "--target", "fpga", "--qonnx", str(q), "--quiet") == 0
    )
    assert q.exists()
    assert (
        compile_cli(
            cnn_path, cnn_calib, tmp_path / "b.onnx", "--qonnx", str(tmp_path / "b.q"), "--quiet"
        )
        == 2
    )
    with pytest.raises(QCompileError, match="DequantizeLinear|QuantizeLinear|integer"):
        to_qonnx(
            qcompile.compile(
                builders.mlp(),
                calibration={"input": builders.features(16)},
                integer_only=True,
                **FAST,
            ).model
        )


def test_python_api_exports_qonnx(tmp_path):
    """qcompile.export_qonnx: the same export as --qonnx, from a CompileResult."""
    feeds = [{"input": builders.images(4, 32, seed=i)} for i in range(6)]
    result = qcompile.compile(builders.cnn(size=32), target="fpga", calibration=feeds, **FAST)
    path = tmp_path / "m.qonnx.onnx"
    proto = qcompile.export_qonnx(result, path, {"input": (4, 3, 32, 32)})
    assert path.exists() and any(n.op_type == "Quant" for n in proto.graph.node)
    got = execute(proto, feeds[0])[0]
    np.testing.assert_allclose(got, _run(result.qdq_model, feeds[0]), rtol=1e-4, atol=1e-4)
    cpu = qcompile.compile(builders.cnn(size=32), calibration=feeds, **FAST)
    with pytest.raises(QCompileError, match="integer-only compile"):
        qcompile.export_qonnx(cpu)


def test_qonnx_executor_runs_an_integer_only_transformer():
    """A pre-LN transformer block compiled for fpga (no float islands in its integer model):
    the QONNX export keeps LayerNorm, Softmax, GELU and the attention MatMuls as float ops
    between Quant nodes; qonnx's executor reproduces our QDQ graph and stays within the
    integer kernels' approximation of our integer-only model."""
    model = builders.transformer_block(dim=32, heads=2, ffn=64)
    feeds = [{"input": builders.token_embeddings(2, seq=8, dim=32, seed=i)} for i in range(6)]
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []  # the integer model has no float op
    qonnx_model = to_qonnx(result.qdq_model, {"input": (2, 8, 32)})
    ops = {n.op_type for n in qonnx_model.graph.node}
    assert {"Quant", "LayerNormalization", "Softmax", "MatMul"} <= ops
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    for feed in feeds[:2]:
        theirs = execute(qonnx_model, feed)[0]
        qdq = _run(result.qdq_model, feed)
        ours = _run(result.model, feed)
        scale = np.abs(qdq).max()
        assert np.max(np.abs(qdq - theirs)) <= 1e-5 * scale + 1e-6  # same float arithmetic
        sqnr = 10 * np.log10(np.sum(theirs**2) / np.sum((ours - theirs) ** 2))
        assert sqnr > 30, sqnr  # 36-37 dB: integer LayerNorm/Softmax/GELU vs float ones
