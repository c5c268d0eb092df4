"""Integer ConvTranspose for kernel = stride upsampling (qcompile/lower/integer_upsample.py),
with the bias Add and BatchNormalization exporters write after it folded first (PP-OCR
det's DBNet head): no float op, ORT = reference, as accurate as the QDQ graph."""

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
from qcompile.errors import QCompileError
from qcompile.lower.integer_parts import float_ops_between


def upsampling_head(kernel: int = 2, stride: int = 2, c: int = 8) -> onnx.ModelProto:
    """Conv → ConvTranspose (no bias) → Add(bias) → BatchNormalization → Relu → Conv, as
    Paddle exports DBNet's upsampling."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        init("w0", c, 3, 3, 3),
        init("wt", c, c // 2, kernel, kernel),
        init("bt", 1, c // 2, 1, 1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c // 2).astype(np.float32), "bn_g"),
        init("bn_b", c // 2),
        init("bn_m", c // 2),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c // 2).astype(np.float32), "bn_v"),
        init("w1", 1, c // 2, 3, 3),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["f"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node(
            "ConvTranspose",
            ["f", "wt"],
            ["up"],
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            name="up",
        ),  # fmt: skip
        helper.make_node("Add", ["up", "bt"], ["up_b"], name="up_bias"),
        helper.make_node(
            "BatchNormalization", ["up_b", "bn_g", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"
        ),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w1"], ["y"], pads=[1, 1, 1, 1], name="conv1"),
    ]
    graph = helper.make_graph(
        nodes,
        "upsampling_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int = 6):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 12, 16)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("target", ["fpga", "cpu-integer"])
def test_upsampling_conv_transpose_is_integer_and_matches_the_reference(target):
    kw = {"integer_only": True} if target == "cpu-integer" else {}
    name = target.split("-")[0]
    feeds = _feeds()
    result = qcompile.compile(upsampling_head(), target=name, calibration=feeds, **kw, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    ops = [n.op_type for n in result.model.graph]
    assert "DepthToSpace" in ops and "ConvTranspose" not in ops
    assert "BatchNormalization" not in ops  # folded once the bias Add was
    proto = ir.to_proto(result.model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds[:2]:
        np.testing.assert_array_equal(sess.run(None, feed)[0], run_reference(proto, feed)[0])
    qdq = qcompile.compile(
        upsampling_head(), target=name, calibration=feeds, **kw,
        disabled_passes=("LowerToIntegerOnly",), **FAST,
    )  # fmt: skip
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 1.0
    assert result.report.min_output_sqnr_db > 25.0


def test_overlapping_conv_transpose_is_refused_naming_the_node():
    # kernel 3, stride 2: output windows overlap; no integer form, the refusal names it
    with pytest.raises(QCompileError, match="'up'") as err:
        qcompile.compile(upsampling_head(kernel=3), target="fpga", calibration=_feeds(), **FAST)
    assert "kernel = stride" in str(err.value)


def test_fpga_cost_model_counts_the_upsampling_macs():
    # 8 -> 4 channels, 2x2 kernel = stride on 12x16: each of the 4·24·32 outputs reduces
    # over the 8 input channels only (the windows do not overlap)
    result = qcompile.compile(upsampling_head(), target="fpga", calibration=_feeds(), **FAST)
    layers = {layer["node"]: layer for layer in result.report.fpga_layers}
    assert layers["up"]["macs"] == 4 * 24 * 32 * 8


# -- linear Resize ------------------------------------------------------------------------
def _resize_model(mode: str, sizes: tuple[int, int] | None) -> onnx.ModelProto:
    """Conv → Relu → Resize(linear) → Conv at 9×11, upsampled ×2 by scales (opset 17) or
    to `sizes` of the last two axes (opset 18's `axes`; for pytorch_half_pixel, sizes
    concatenated to N and C from Shape, as torch writes F.interpolate(size=…))."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal((2, 4, 1, 1)) * 0.3).astype(np.float32), "w1"),
    ]
    extra = []
    if sizes is None:
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        resize_inputs = ["h", "", "scales"]
    elif mode == "pytorch_half_pixel":  # as torch writes F.interpolate(size=…): N, C from Shape
        inits += [
            numpy_helper.from_array(np.array(sizes, np.int64), "hw"),
            numpy_helper.from_array(np.array([0], np.int64), "start"),
            numpy_helper.from_array(np.array([2], np.int64), "end"),
        ]
        extra = [
            helper.make_node("Shape", ["h"], ["h_shape"]),
            helper.make_node("Slice", ["h_shape", "start", "end"], ["nc"]),
            helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        ]
        resize_inputs = ["h", "", "", "sizes"]
    else:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        resize_inputs = ["h", "", "", "sizes"]
    axes = {} if sizes is None or extra else {"axes": [2, 3]}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["h"]),
        *extra,
        helper.make_node(
            "Resize",
            resize_inputs,
            ["up"],
            name="resize",
            mode="linear",
            coordinate_transformation_mode=mode,
            **axes,
        ),  # fmt: skip
        helper.make_node("Conv", ["up", "w1"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 11])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "resize", [x], [y], inits)
    opset = 17 if sizes is None else 18
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize(
    ("mode", "sizes"),
    [
        ("half_pixel", None),
        ("pytorch_half_pixel", (20, 17)),
        ("align_corners", (20, 23)),
        ("asymmetric", None),
        ("half_pixel", (5, 7)),  # downscaling
    ],
)
def test_linear_resize_interpolates_codes(mode, sizes):
    # no float op; ORT = reference; the integer Resize equals the QDQ graph's float Resize
    # of the same codes up to one step where the value sits at a rounding tie
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 3, 9, 11)).astype(np.float32)} for _ in range(6)]
    model = _resize_model(mode, sizes)
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    assert result.report.integer_ops["Resize"] == 1
    proto = ir.to_proto(result.model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds[0])[0]
    np.testing.assert_array_equal(got, run_reference(proto, feeds[0])[0])
    qdq = qcompile.compile(
        model, target="fpga", calibration=feeds, disabled_passes=("LowerToIntegerOnly",), **FAST
    )
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 0.2
