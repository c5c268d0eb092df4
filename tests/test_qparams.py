import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.numerics.qparams import QuantSpec, dequantize, quantize, range_to_qparams, sqnr_db

U8 = QuantSpec(bits=8, signed=False, symmetric=False)
S8 = QuantSpec(bits=8, signed=True, symmetric=True)
S8W = QuantSpec(bits=8, signed=True, symmetric=True, narrow=True)


def test_asymmetric_u8_matches_formula():
    qp = range_to_qparams(-1.0, 3.0, U8)
    assert qp.scale == pytest.approx(4.0 / 255, rel=1e-6)
    assert int(qp.zero_point) == round(1.0 / (4.0 / 255))
    # zero is exact
    assert dequantize(quantize(np.zeros(1, np.float32), qp), qp)[0] == 0.0


def test_range_always_includes_zero():
    qp = range_to_qparams(2.0, 5.0, U8)
    assert int(qp.zero_point) == 0
    assert qp.scale == pytest.approx(5.0 / 255, rel=1e-6)


def test_symmetric_signed_zero_point_is_zero():
    qp = range_to_qparams(-2.0, 1.0, S8)
    assert int(qp.zero_point) == 0
    assert qp.scale == pytest.approx(2.0 / 127.5, rel=1e-6)
    w = range_to_qparams(-2.0, 1.0, S8W)
    assert w.scale == pytest.approx(2.0 / 127, rel=1e-6)
    assert (S8W.qmin, S8W.qmax) == (-127, 127)


def test_zero_range_gives_exact_zero_mapping():
    qp = range_to_qparams(0.0, 0.0, U8)
    assert float(qp.scale) == 1.0
    x = np.zeros(5, np.float32)
    np.testing.assert_array_equal(dequantize(quantize(x, qp), qp), x)


def test_pow2_scales_are_powers_of_two():
    spec = QuantSpec(bits=8, signed=True, symmetric=True, scale_kind="pow2")
    for hi in (0.3, 1.0, 7.7, 123.0):
        qp = range_to_qparams(-hi, hi, spec)
        assert np.log2(float(qp.scale)) == int(np.log2(float(qp.scale)))
        assert float(qp.scale) * 127.5 >= hi  # never clips the range


def test_per_channel_qparams_shape():
    qp = range_to_qparams(np.array([-1.0, -2.0]), np.array([1.0, 4.0]), S8W, axis=0)
    assert qp.scale.shape == (2,) and qp.axis == 0


@pytest.mark.parametrize("spec", [U8, S8])
def test_quantize_matches_onnxruntime_bit_exactly(spec):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * 3).astype(np.float32)
    # include exact .5 ties to check round-half-to-even
    qp = range_to_qparams(-4.0, 5.0, spec)
    x[:10] = (np.arange(10) + 0.5) * float(qp.scale)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.UINT8 if not spec.signed else TensorProto.INT8, [1000]
            )
        ],
        [numpy_helper.from_array(qp.scale, "s"), numpy_helper.from_array(qp.zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], quantize(x, qp))
    onnx.checker.check_model(model)


def test_sqnr():
    x = np.ones(10)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0)
