"""Import: paths, bytes, protos, external data, opset upgrade, Constant nodes, shapes."""

import builders
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.errors import QCompileError
from qcompile.ir import load_model, pin_input_shapes, save_model
from qcompile.ir.shapes import parse_input_shapes
from tests.conftest import FAST


def test_load_from_path_bytes_proto(cnn_path, cnn_model):
    for source in (cnn_path, str(cnn_path), cnn_model.SerializeToString(), cnn_model):
        model = load_model(source)
        assert len(model.graph) == len(cnn_model.graph.node)


def test_external_data_round_trip(tmp_path, cnn_model):
    model = onnx.ModelProto()
    model.CopyFrom(cnn_model)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    calib = {"input": builders.images(10)}
    out = tmp_path / "q.onnx"
    result = qcompile.compile(path, calibration=calib, output=out, **FAST)
    assert result.report.min_output_sqnr_db > 30
    # forced external data on output: model + .data beside it, loadable
    save_model(result.model, tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").exists()
    reloaded = onnx.load(tmp_path / "big.onnx")
    onnx.checker.check_model(reloaded)


def _opset11_model():
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Clip", ["h"], ["y"], min=0.0, max=6.0, name="clip"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 6
    return model


def test_old_opset_is_upgraded_and_constants_lifted():
    model = load_model(_opset11_model())
    assert model.opset_imports[""] >= 13
    result = qcompile.compile(
        _opset11_model(),
        calibration={"x": np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32)},
        **FAST,
    )
    ops = [n.op_type for n in result.model.graph]
    assert "Constant" not in ops
    assert result.report.quantized_ops == {"MatMul": 1}


def test_opset_upgrade_adds_no_shape_annotations():
    # the converter's shape inference annotates every tensor; ONNX Runtime fuses more
    # with those (Add+LayerNormalization -> SkipLayerNormalization), so an upgraded FP32
    # model would time differently from the user's: keep only what the user declared
    proto = _opset11_model()
    proto.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    upgraded = ir.to_proto(load_model(proto))
    assert upgraded.opset_import[0].version >= 13
    assert [v.name for v in upgraded.graph.value_info] == ["h"]


def test_dynamic_shapes_work_without_pinning(cnn_model):
    # batch is symbolic 'N'; calibration feeds of batch 8 and a held-out batch of 3
    feeds = [{"input": builders.images(8, seed=i)} for i in range(4)] + [
        {"input": builders.images(3, seed=9)}
    ]
    result = qcompile.compile(cnn_model, calibration=feeds, **FAST)
    assert result.report.holdout_batches == 1
    first = result.model.graph.inputs[0]
    assert not isinstance(first.shape[0], int)  # still dynamic in the output


def test_pinning_input_shapes(cnn_model):
    result = qcompile.compile(
        cnn_model,
        calibration={"input": builders.images(8)},
        input_shapes={"input": (2, 3, 32, 32)},
        **FAST,
    )
    assert list(result.model.graph.inputs[0].shape) == [2, 3, 32, 32]


def test_pinning_errors():
    model = load_model(builders.cnn())
    with pytest.raises(QCompileError, match="nosuch"):
        pin_input_shapes(model, {"nosuch": (1, 3, 32, 32)})
    with pytest.raises(QCompileError, match="rank"):
        pin_input_shapes(model, {"input": (1, 3, 32)})
    with pytest.raises(QCompileError, match="axis 1"):
        pin_input_shapes(model, {"input": (1, 4, 32, 32)})
    with pytest.raises(QCompileError, match="NAME="):
        parse_input_shapes(["1,3,224,224"])
    assert parse_input_shapes(["a=1,3", "b:0=2"]) == {"a": (1, 3), "b:0": (2,)}


def test_shape_inference_failure_falls_back(monkeypatch, cnn_model):
    """Like ORT's quant_pre_process on YOLOv8, inference may die; we must not."""
    import onnx_ir.passes.common as common_passes

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __call__(self, model):
            raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(common_passes, "ShapeInferencePass", Broken)
    result = qcompile.compile(cnn_model, calibration={"input": builders.images(10)}, **FAST)
    assert result.report.min_output_sqnr_db > 30


def test_values_without_types_are_calibrated(cnn_model):
    # strip value_info and intermediate types entirely
    model = onnx.ModelProto()
    model.CopyFrom(cnn_model)
    del model.graph.value_info[:]
    m = ir.from_proto(model)
    for node in m.graph:
        for out in node.outputs:
            if out not in m.graph.outputs:
                out.type = None
                out.shape = None
    result = qcompile.compile(m, calibration={"input": builders.images(10)}, **FAST)
    assert result.report.quantized_ops["Conv"] == 7
