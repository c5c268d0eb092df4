"""The CLI end to end: compile writes model + JSON report; inspect, bench, passes."""

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from qcompile.cli import main
from tests.conftest import QUIET, compile_cli, sha256


def test_compile_writes_model_and_report(cnn_path, cnn_calib, tmp_path, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    before = sha256(cnn_path)
    code = compile_cli(
        cnn_path,
        cnn_calib,
        out,
        "--report",
        str(report),
        "--bench-runs",
        "3",
        "--calib-method",
        "mse",
        "--no-speed-guard",
    )
    assert code == 0
    assert sha256(cnn_path) == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    data = json.loads(report.read_text())
    assert data["target"] == "cpu" and data["calib_method"] == "mse"
    assert data["quantized_ops"]["Conv"] == 7 and data["outputs"][0]["sqnr_db"] > 30
    assert "qcompile → cpu" in capsys.readouterr().err


def test_inspect_explains_decisions(cnn_path, capsys):
    assert main(["inspect", str(cnn_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    decisions = {d["node"]: d for d in data["nodes"]}
    assert decisions["stem_conv"]["decision"] == "quantized"
    assert decisions["relu_7"]["decision"] == "fused"
    assert main(["inspect", str(cnn_path), "--exclude", "op:Concat", "--json"]) == 0
    decisions = {d["node"]: d for d in json.loads(capsys.readouterr().out)["nodes"]}
    assert decisions["concat"]["why"] == "excluded by option"


def test_bench_and_passes(cnn_path, cnn_calib, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert compile_cli(cnn_path, cnn_calib, out, *QUIET) == 0
    assert (
        main(["bench", str(cnn_path), str(out), "--input-shape", "input=1,3,32,32", "--runs", "3"])
        == 0
    )
    assert "median latency" in capsys.readouterr().out
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "InsertQDQ" in listing and "BiasCorrection (with --bias-correction)" in listing


def test_bias_correction_and_smooth_shift_flags(cnn_path, cnn_calib, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    flags = ("--bias-correction", "--smooth-shift", "--report", str(report))
    code = compile_cli(cnn_path, cnn_calib, out, *QUIET, *flags)
    assert code == 0
    passes = {p["name"]: p for p in json.loads(report.read_text())["passes"]}
    assert passes["BiasCorrection"]["modified"]
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_disable_pass(cnn_path, cnn_calib, tmp_path, capsys):
    import qcompile
    from qcompile.errors import QCompileError

    result = qcompile.compile(
        cnn_path,
        calibration=cnn_calib,
        disabled_passes=("DefaultRewrites",),
        progress=False,
        bench_runs=0,
    )
    # without onnxscript's rewrites BatchNorm is not folded, so it stays (float) in the graph
    assert any(n.op_type == "BatchNormalization" for n in result.model.graph)
    assert any(p["name"] == "DefaultRewrites" and p["skipped"] for p in result.report.passes)
    try:
        qcompile.compile(
            cnn_path, calibration=cnn_calib, disabled_passes=("NoSuchPass",), progress=False
        )
    except QCompileError as err:
        assert "NoSuchPass" in str(err) and "FuseForQuantization" in str(err)
    else:
        raise AssertionError("unknown pass name accepted")
    out = tmp_path / "q.onnx"
    flags = ("--disable-pass", "FuseForQuantization")
    assert compile_cli(cnn_path, cnn_calib, out, *QUIET, *flags) == 0


def test_bundled_example_compiles_as_the_readme_says(tmp_path):
    """README's first command, minus the install: the bundled model and data work."""
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "qcompile" / "examples"
    out, report = tmp_path / "cnn.int8.onnx", tmp_path / "cnn.report.json"
    code = compile_cli(
        examples / "cnn.onnx",
        examples / "cnn_calib.npz",
        out,
        "--calib-batch-size",
        "4",
        "--report",
        str(report),
        "--quiet",
        "--bench-runs",
        "0",
    )
    assert code == 0
    data = json.loads(report.read_text())
    assert data["holdout_batches"] >= 1 and not data["holdout_is_calibration"]
    assert (
        data["outputs"][0]["sqnr_db"] > 30
        and data["size_quantized_bytes"] < 0.35 * data["size_fp32_bytes"]
    )


def test_every_option_field_has_one_flag_and_no_cli_default():
    import dataclasses

    from qcompile.cli.flags import FLAGS, NOT_FLAGS, options_kwargs
    from qcompile.cli.main import build_parser
    from qcompile.options import CompileOptions

    fields = {f.name for f in dataclasses.fields(CompileOptions)}
    flagged = [f.field for f in FLAGS]
    assert len(flagged) == len(set(flagged))  # one flag per field
    assert set(flagged) | NOT_FLAGS == fields
    # nothing given -> nothing set: every default is the dataclass's
    args = build_parser().parse_args(["compile", "m.onnx", "-o", "o.onnx", "--calib", "c.npz"])
    assert options_kwargs(args) == {}
    args = build_parser().parse_args(
        ["compile", "m.onnx", "-o", "o.onnx", "--calib", "c.npz", "--per-tensor",
         "--max-accuracy-drop", "0.5%", "--token-mask", "none", "--exclude", "a", "--exclude", "b"]
    )  # fmt: skip
    assert options_kwargs(args) == {
        "per_channel": False,
        "max_accuracy_drop": 0.005,
        "token_mask": None,
        "exclude": ("a", "b"),
    }


def test_options_doc_is_generated_from_the_flags():
    from qcompile.cli.flags import markdown_table

    doc = (Path(__file__).parent.parent / "docs" / "options.md").read_text()
    begin, end = "<!-- generated: begin -->\n", "<!-- generated: end -->"
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == markdown_table()


def test_version_and_verbosity_after_the_subcommand(capsys, cnn_path, cnn_calib, tmp_path):
    import qcompile
    from qcompile.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert qcompile.__version__ in capsys.readouterr().out
    out = tmp_path / "q.onnx"
    assert compile_cli(cnn_path, cnn_calib, out, "--bench-runs", "0", "-q", "-v") == 0
    assert out.exists()
