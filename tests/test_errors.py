"""Bad input gets a QCompileError naming what failed; the input file is never touched."""

import os
import shutil
from pathlib import Path

import builders
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile.errors import QCompileError
from tests.conftest import FAST, compile_cli, sha256


def _compile(model, calib, **kw):
    return qcompile.compile(model, calibration=calib, **FAST, **kw)


def test_truncated_model(tmp_path, cnn_path, cnn_calib):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(cnn_path.read_bytes()[:1000])
    before = sha256(bad)
    with pytest.raises(QCompileError, match="truncated.onnx") as err:
        _compile(bad, cnn_calib)
    assert "protobuf" in str(err.value) or "could not read" in str(err.value)
    assert sha256(bad) == before


def test_garbage_bytes_model(tmp_path, cnn_calib):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"this is not an onnx model at all \x00\xff" * 10)
    with pytest.raises(QCompileError, match="garbage.onnx"):
        _compile(bad, cnn_calib)


def test_missing_model_file(tmp_path, cnn_calib):
    with pytest.raises(QCompileError, match="does not exist"):
        _compile(tmp_path / "nope.onnx", cnn_calib)


def test_unsupported_op_names_the_node(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["h"], name="ok"),
            helper.make_node("FancyOp", ["h"], ["y"], name="my_custom_node", domain="com.example"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    before = sha256(path)
    with pytest.raises(QCompileError, match="'x'") as err:
        _compile(path, {"input": np.ones((1, 4), np.float32)} | {})
    with pytest.raises(QCompileError, match="FancyOp|my_custom_node|nothing in this model"):
        _compile(path, {"x": np.ones((1, 4), np.float32)})
    assert "x" in str(err.value)  # the first call named the missing input
    assert sha256(path) == before


def test_unsupported_opset_version(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)])
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    with pytest.raises(QCompileError, match="future.onnx|opset"):
        _compile(path, {"x": np.ones(1, np.float32)})


def test_calibration_missing_input(cnn_path, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, image=builders.images(4))
    with pytest.raises(QCompileError, match="'input'") as err:
        _compile(cnn_path, calib)
    assert "image" in str(err.value)  # also says what was found


def test_calibration_wrong_shape(cnn_path, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, input=np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(QCompileError, match="input") as err:
        _compile(cnn_path, calib)
    assert "axis 2" in str(err.value)


def test_calibration_wrong_rank(cnn_path, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, input=np.zeros((3, 32, 32), np.float32))
    with pytest.raises(QCompileError, match="rank 3"):
        _compile(cnn_path, calib)


def test_calibration_wrong_dtype(cnn_path, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, input=np.zeros((4, 3, 32, 32), np.int64))
    with pytest.raises(QCompileError, match="dtype int64"):
        _compile(cnn_path, calib)


def test_calibration_nan(cnn_path, tmp_path):
    data = builders.images(4)
    data[1, 0, 0, 0] = np.nan
    calib = tmp_path / "c.npz"
    np.savez(calib, input=data)
    with pytest.raises(QCompileError, match="NaN"):
        _compile(cnn_path, calib)


def test_empty_calibration(cnn_path):
    with pytest.raises(QCompileError, match="empty"):
        _compile(cnn_path, [])


def test_output_equal_to_input_is_refused(cnn_path, cnn_calib):
    before = sha256(cnn_path)
    with pytest.raises(QCompileError, match="overwrite the input"):
        _compile(cnn_path, cnn_calib, output=cnn_path)
    # also through a different spelling of the same path
    with pytest.raises(QCompileError, match="overwrite the input"):
        _compile(cnn_path, cnn_calib, output=cnn_path.parent / "." / cnn_path.name)
    # and through --calib-method auto, which compiles twice before writing
    with pytest.raises(QCompileError, match="overwrite the input"):
        _compile(cnn_path, cnn_calib, output=cnn_path, calib_method="auto")
    assert sha256(cnn_path) == before


def test_output_in_missing_directory(cnn_path, cnn_calib, tmp_path):
    with pytest.raises(QCompileError, match="directory does not exist"):
        _compile(cnn_path, cnn_calib, output=tmp_path / "missing" / "q.onnx")


def test_output_is_a_directory(cnn_path, cnn_calib, tmp_path):
    with pytest.raises(QCompileError, match="is a directory"):
        _compile(cnn_path, cnn_calib, output=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_output_unwritable(cnn_path, cnn_calib, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(QCompileError, match="permission"):
        _compile(cnn_path, cnn_calib, output=ro / "q.onnx")


def test_failed_compile_leaves_no_partial_output(cnn_path, tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous result")
    with pytest.raises(QCompileError, match="calibration set is empty"):
        _compile(cnn_path, [], output=out)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_user_error_exit_2_without_traceback(cnn_path, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    shutil.copy(cnn_path, bad)
    bad.write_bytes(bad.read_bytes()[:500])
    before = sha256(bad)
    calib = tmp_path / "c.npz"
    np.savez(calib, input=builders.images(4))
    code = compile_cli(bad, calib, tmp_path / "q.onnx", "--quiet")
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err and "bad.onnx" in captured.err
    assert sha256(bad) == before
    assert not (tmp_path / "q.onnx").exists()


def test_cli_bad_option_values_exit_2(cnn_path, cnn_calib, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert (
        compile_cli(cnn_path, cnn_calib, out, "--quiet", "--input-shape", "nosuch=1,3,32,32") == 2
    )
    assert "nosuch" in capsys.readouterr().err
    assert (
        compile_cli(cnn_path, cnn_calib, out, "--quiet", "--override", "stem_conv:colour=blue") == 2
    )
    assert "colour" in capsys.readouterr().err


def test_cli_internal_error_exit_1(cnn_path, cnn_calib, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr("qcompile.driver.compile.build_plan", boom)
    code = compile_cli(cnn_path, cnn_calib, tmp_path / "q.onnx", "--quiet")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "simulated bug" in err


def test_missing_external_data_names_the_file(tmp_path, cnn_model, cnn_calib):
    path = tmp_path / "ext.onnx"
    model = onnx.ModelProto()
    model.CopyFrom(cnn_model)  # onnx.save converts to external data in place
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(QCompileError, match="weights.bin"):
        _compile(path, cnn_calib)


def test_bad_input_is_never_modified_on_success(cnn_path, cnn_calib, tmp_path):
    before = sha256(cnn_path)
    _compile(cnn_path, cnn_calib, output=tmp_path / "q.onnx")
    assert sha256(cnn_path) == before
    assert Path(tmp_path / "q.onnx").stat().st_size > 0
