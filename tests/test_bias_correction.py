"""Bias correction: the shift it removes is exactly what weight rounding adds to E[y],
and it pays off where weights are coarse (4-bit, per-tensor, power-of-two)."""

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.quantize.bias_correction import ChannelMeanObserver, output_shift
from tests.conftest import FAST, compile_transformer_fpga


def _run_single(node: onnx.NodeProto, x: np.ndarray, w: np.ndarray, out_rank: int) -> np.ndarray:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("group", [1, 2, 8])
def test_conv_shift_equals_the_output_change_on_mean_input(group):
    rng = np.random.default_rng(group)
    c, m = 8, 8
    w = rng.standard_normal((m, c // group, 3, 3)).astype(np.float32)
    w_hat = (w + rng.normal(0, 0.05, w.shape)).astype(np.float32)
    mean = rng.normal(0, 2, c)
    x = np.broadcast_to(mean[None, :, None, None], (1, c, 5, 5)).astype(np.float32).copy()
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group)
    diff = _run_single(node, x, w_hat, 4) - _run_single(node, x, w, 4)
    ir_node = ir.from_proto(helper.make_model(helper.make_graph([node], "g", [], []))).graph.node(0)
    shift = output_shift(ir_node, w, w_hat, mean)
    np.testing.assert_allclose(diff[0, :, 1, 1], shift, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_and_matmul_shift(trans_b):
    rng = np.random.default_rng(trans_b)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    w_hat = (w + rng.normal(0, 0.05, w.shape)).astype(np.float32)
    mean = rng.normal(0, 2, 6)
    x = np.tile(mean, (3, 1)).astype(np.float32)
    stored, stored_hat = (w.T.copy(), w_hat.T.copy()) if trans_b else (w, w_hat)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b, alpha=0.5)
    diff = _run_single(node, x, stored_hat, 2) - _run_single(node, x, stored, 2)
    ir_node = ir.from_proto(helper.make_model(helper.make_graph([node], "g", [], []))).graph.node(0)
    np.testing.assert_allclose(diff[0], output_shift(ir_node, stored, stored_hat, mean), atol=1e-4)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    diff = _run_single(mm, x, w_hat, 2) - _run_single(mm, x, w, 2)
    ir_mm = ir.from_proto(helper.make_model(helper.make_graph([mm], "g", [], []))).graph.node(0)
    np.testing.assert_allclose(diff[0], output_shift(ir_mm, w, w_hat, mean), atol=1e-4)


def test_channel_mean_observer_streams_the_mean():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 1, (2, 4, 5, 5)).astype(np.float32) for _ in range(3)]
    obs = ChannelMeanObserver("x", axis=1)
    for b in batches:
        obs.observe(b)
    expected = np.concatenate(batches).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(obs.mean, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "options",
    [dict(target="fpga", weight_bits=4), dict(target="cpu", per_channel=False)],
    ids=["fpga-w4", "cpu-per-tensor"],
)
def test_bias_correction_pays_off_with_coarse_weights(options):
    # un-normalized inputs (mean 2): weight rounding then shifts every output's mean
    proto = builders.cnn()
    feeds = [{"input": builders.images(4, seed=i) + 2.0} for i in range(10)]
    kw = dict(calib_method="minmax", **options, **FAST)
    off = qcompile.compile(proto, calibration=feeds, bias_correction=False, **kw)
    on = qcompile.compile(proto, calibration=feeds, bias_correction=True, **kw)
    assert any(p["name"] == "BiasCorrection" and p["modified"] for p in on.report.passes)
    # measured: fpga-w4 10.7 -> 19.4 dB, cpu-per-tensor 32.6 -> 42.6 dB
    assert on.report.min_output_sqnr_db > off.report.min_output_sqnr_db + 5.0
    onnx.checker.check_model(ir.to_proto(on.model), full_check=True)


def test_bias_correction_keeps_int32_biases_on_cpu():
    proto = builders.cnn()
    feeds = [{"input": builders.images(4, seed=i)} for i in range(8)]
    result = qcompile.compile(proto, calibration=feeds, bias_correction=True, **FAST)
    model = ir.to_proto(result.model)
    # the corrected biases went through InsertQDQ: int32 initializers feeding DQs
    int32 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT32]
    assert int32
    assert result.report.min_output_sqnr_db > 25.0


def test_matmul_bias_adds_stay_integer_on_the_integer_only_target():
    # the plan names a MatMul's bias Add operand; the corrected bias must keep that name
    # (a renamed copy went unquantized and the integer-only lowering refused the Add)
    result, _ = compile_transformer_fpga(weight_bits=4, bias_correction=True)
    assert any(p["name"] == "BiasCorrection" and p["modified"] for p in result.report.passes)
    assert "Add" in result.report.integer_ops
