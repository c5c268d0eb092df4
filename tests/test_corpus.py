"""Models nobody tuned qcompile for: a CI subset of the corpus (benchmarks/corpus.py) with
its invariants, and one test per failure the corpus found."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FAST

import qcompile
from benchmarks import corpus, corpus_models
from qcompile.cli import main

# Small onnx backend-test models covering what the corpus found broken: IR-3 exports whose
# initializers are listed as inputs (Conv, ConvTranspose, Linear), opset-6 Pad, and plain
# models with nothing to quantize (a refusal, not a bug).
BACKEND_SUBSET = (
    "test_Conv2d",
    "test_Conv1d_groups",
    "test_Conv3d_stride",
    "test_ConvTranspose2d",
    "test_Linear_no_bias",
    "test_operator_conv",
    "test_ZeroPad2d",
    "test_MaxPool2d",
    "test_sequence_model1",
)


def _entries():
    wanted = set(BACKEND_SUBSET)
    backend = [e for e in corpus.backend_models() if e.name in wanted]
    assert {e.name for e in backend} == wanted
    return backend + corpus_models.built_models()


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e.name)
def test_corpus_subset_has_no_bug(entry):
    row = corpus.run_model(entry, "cpu", bench_runs=0)
    assert row.outcome in ("ok", "refused"), f"{row.outcome}: {row.reason}"
    if row.outcome == "refused":  # refusals name what is missing
        assert "nothing in this model can be quantized" in row.reason
    else:
        assert row.sqnr_db is None or row.sqnr_db > 20


def _run(model, feed):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def test_wrong_declared_output_shape_keeps_the_real_shape():
    """A recognizer that declares [1, seqlen] but returns [T, 1, C]: the compiled model
    returns [T, 1, C] and the same tokens, and the report says the declaration was not
    used (it used to return (1, T·C) and report a fine SQNR on flattened outputs)."""
    model, feeds = corpus_models.crnn(declared="wrong"), corpus_models.crnn_feeds()
    result = qcompile.compile(model, calibration=feeds, **FAST)
    for feed in feeds[:4]:
        want, got = _run(model, feed)[0], _run(result.model, feed)[0]
        assert got.shape == want.shape == (24, 1, 12)
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8
    assert any("declared" in n and "probs" in n for n in result.report.notes)


def test_output_declared_without_shape_compiles():
    model, feeds = corpus_models.crnn(declared="none"), corpus_models.crnn_feeds()
    result = qcompile.compile(model, calibration=feeds, **FAST)
    assert _run(result.model, feeds[0])[0].shape == (24, 1, 12)


@pytest.mark.parametrize("same_value", [False, True])
def test_if_whose_branches_end_in_identity(same_value):
    model = corpus_models.if_identity(same_value=same_value)
    feeds = corpus.calibration_feeds(model, [])
    result = qcompile.compile(model, calibration=feeds, **FAST)
    np.testing.assert_allclose(
        _run(result.model, feeds[0])[0], _run(model, feeds[0])[0], rtol=0.2, atol=0.2
    )


def test_ir3_initializers_listed_as_inputs_are_weights():
    entry = next(e for e in corpus.backend_models() if e.name == "test_Conv2d")
    model = entry.load()
    assert model.ir_version < 4 and {t.name for t in model.graph.initializer} <= {
        v.name for v in model.graph.input
    }
    result = qcompile.compile(model, calibration=entry.feeds(model), **FAST)
    assert result.report.quantized_ops.get("Conv") == 1
    assert result.model.ir_version >= 8
    assert [v.name for v in result.model.graph.inputs] == [model.graph.input[0].name]


@pytest.mark.parametrize("kind", ["qdq", "qoperator", "dynamic"])
@pytest.mark.parametrize("base", ["cnn", "crnn"])
def test_prequantized_models_requantize(kind, base):
    """ORT's three formats, of a CNN and a CNN+LSTM, back to FP32 and compiled afresh; the
    report states how closely the recovered model agrees with the input."""
    model = corpus_models.prequantized(kind, base)
    feeds = corpus_models.cnn_feeds() if base == "cnn" else corpus_models.crnn_feeds()
    result = qcompile.compile(model, calibration=feeds, already_quantized="requantize", **FAST)
    agreement = [n for n in result.report.notes if n.startswith("requantize:")]
    assert len(agreement) == 1 and " dB " in agreement[0]
    db = float(agreement[0].split(" at ")[1].split(" dB")[0])
    assert db > 25
    want, got = _run(model, feeds[0])[0], _run(result.model, feeds[0])[0]
    assert got.shape == want.shape
    assert corpus.sqnr([want], [got]) > 20


def test_a_rewrite_pass_that_breaks_the_model_is_left_out_and_named(monkeypatch):
    """A rewrite pass whose output changes FP32 results is undone; the report names it."""
    from qcompile.passes.fusion import FuseForQuantization

    original = FuseForQuantization.call

    def broken(self, model):
        result = original(self, model)
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"  # a wrong rewrite
                return ir.passes.PassResult(model, True)
        return result

    monkeypatch.setattr(FuseForQuantization, "call", broken)
    feeds = corpus_models.cnn_feeds()
    result = qcompile.compile(corpus_models.cnn(), calibration=feeds, **FAST)
    assert any("FuseForQuantization" in n and "left out" in n for n in result.report.notes)
    skipped = [p for p in result.report.passes if p["name"] == "FuseForQuantization"]
    assert skipped and skipped[0]["skipped"]
    np.testing.assert_allclose(
        _run(result.model, feeds[0])[0], _run(corpus_models.cnn(), feeds[0])[0], rtol=0.1, atol=0.1
    )


def test_a_quantize_pass_that_produces_an_invalid_graph_is_a_bug_naming_it(
    monkeypatch, tmp_path, capsys
):
    """A graph qcompile produced that ORT or the checker rejects: exit 1 (a bug), naming the
    pass, never a user error about the input."""
    from qcompile.quantize.qdq import InsertQDQ

    original = InsertQDQ.call

    def broken(self, model):
        result = original(self, model)
        node = next(n for n in model.graph if n.op_type == "Conv")
        node.op_type = "NoSuchOp"
        return result

    monkeypatch.setattr(InsertQDQ, "call", broken)
    path = tmp_path / "cnn.onnx"
    onnx.save(corpus_models.cnn(), path)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in corpus_models.cnn_feeds()]))
    code = main(
        ["compile", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"),
         "--quiet", "--bench-runs", "0"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "pass InsertQDQ (quantize)" in err and "internal error" in err
    assert not (tmp_path / "q.onnx").exists()


def test_report_compares_outputs_shape_aware():
    """A compiled output with another shape is a bug, not a flattened SQNR."""
    from qcompile.driver.measure import same_shape

    same_shape("y", np.zeros((24, 1, 12), np.float32), np.zeros((24, 1, 12), np.float32))
    with pytest.raises(RuntimeError, match=r"output y is float32\[1, 288\]"):
        same_shape("y", np.zeros((24, 1, 12), np.float32), np.zeros((1, 288), np.float32))


def test_the_corpus_through_qcompile_batch_matches_the_in_process_rows(tmp_path):
    """`python -m benchmarks.corpus --batch DIR`: the same outcomes and SQNR as compiling
    in this process, a rerun reads every task from DIR."""
    import dataclasses

    from benchmarks.corpus_batch import run_through_batch

    wanted = {"test_Conv2d", "test_Linear_no_bias", "test_MaxPool2d"}
    # the speed guard's timing-dependent choices stay out of an equality test
    entries = [
        dataclasses.replace(e, options={"speed_guard": False})
        for e in corpus.backend_models()
        if e.name in wanted
    ]
    targets = ["cpu", "cpu-int"]  # cpu-int: the cpu target with --integer-only
    batch = run_through_batch(entries, targets, 0, tmp_path)
    local = [corpus.run_model(e, t, bench_runs=0) for e in entries for t in targets]
    assert [(r.model, r.target, r.outcome, r.sqnr_db, r.guard) for r in batch] == [
        (r.model, r.target, r.outcome, r.sqnr_db, r.guard) for r in local
    ]
    plain, integer = local[0], local[1]  # test_Conv2d on cpu and on cpu-int
    assert plain.outcome == integer.outcome == "ok" and plain.sqnr_db != integer.sqnr_db
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert '"cached": false' in summary
    run_through_batch(entries, targets, 0, tmp_path)
    assert '"cached": false' not in (tmp_path / "out" / "summary.json").read_text()


def test_output_sums_survive_outputs_past_float32s_range():
    """onnx's light models output ~1e20: float32 dots overflow to inf (SQNR ∞ for any
    error); the sums fall back to float64."""
    from qcompile.driver.measure import accumulate

    a = np.full(1000, 1e20, np.float32)
    s = [0.0] * 5
    accumulate(s, a, a * np.float32(1.01))
    assert all(np.isfinite(s))
    assert 10 * np.log10(s[0] / s[1]) == pytest.approx(40.0, abs=0.01)
