"""benchmarks/compare.py compiles its rows through `qcompile batch` (compare_batch.py)."""

from __future__ import annotations

import builders
import numpy as np
import onnx

from benchmarks.compare_batch import compile_rows, measure
from benchmarks.datasets import TaskData
from qcompile.fleet.executor import LocalExecutor


def _metric(fp32, quant) -> dict[str, float]:
    a = np.concatenate([o[0] for o in fp32]).argmax(1)
    b = np.concatenate([o[0] for o in quant]).argmax(1)
    return {"agreement": float(np.mean(a == b))}


def test_compare_rows_compile_as_batch_tasks_and_a_rerun_reuses_them(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(builders.cnn(size=32), model)
    feeds = [{"input": builders.images(4, 32, seed=i)} for i in range(6)]
    task = TaskData(feeds[:4], feeds[4:], _metric, "agreement", feeds[0], name="cnn")
    labels = [
        "ORT quantize_dynamic",
        "qcompile cpu (auto)",
        "qcompile cpu (mixed precision, <= 0.5% drop)",  # benchmarked on other models: no row
    ]
    rows = compile_rows("cnn", model, task, labels, True, tmp_path / "work", LocalExecutor())
    assert [r.config for r in rows][:2] == ["FP32", "ORT quantize_dynamic"]
    assert rows[2].config.startswith("qcompile cpu (auto → ")  # what auto chose
    assert len(rows) == 3 and all(r.path.is_file() and r.error is None for r in rows)
    measure(rows, task, threads=1, runs=2)
    assert rows[0].metrics == {"agreement": 1.0} and rows[0].sqnr_db == float("inf")
    assert all(r.sqnr_db > 10 and r.speedup > 0 for r in rows[1:])
    # a rerun compiles nothing (same content keys): the outputs are the stored ones
    stamps = {r.config: r.path.stat().st_mtime_ns for r in rows[1:]}
    again = compile_rows("cnn", model, task, labels, True, tmp_path / "work", LocalExecutor())
    assert {r.config: r.path.stat().st_mtime_ns for r in again[1:]} == stamps


def test_an_integer_only_row_is_judged_against_the_qdq_graph_it_was_lowered_from(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(builders.cnn(size=32), model)
    feeds = [{"input": builders.images(4, 32, seed=i)} for i in range(6)]
    task = TaskData(feeds[:4], feeds[4:], _metric, "agreement", feeds[0], name="cnn")
    label = "qcompile cpu (mse, integer-only)"
    rows = compile_rows("cnn", model, task, [label], False, tmp_path / "work", LocalExecutor())
    measure(rows, task, threads=1, runs=1)
    row = rows[1]
    assert row.error is None and row.extra["islands"] == [] and row.extra["bit_exact"]
    assert (row.path.parent / row.extra["qdq_graph"]).is_file()
    # the integer lowering's own loss: a few tenths of a dB either way, not the QDQ graph's
    assert 10 < row.extra["qdq_sqnr_db"] < float("inf")
    assert abs(row.sqnr_db - row.extra["qdq_sqnr_db"]) < 1.0
    ops = {n.op_type for n in onnx.load(row.path.parent / row.extra["qdq_graph"]).graph.node}
    assert "Conv" in ops and "DequantizeLinear" in ops  # the QDQ graph, not the lowered one
    assert "Conv" not in {n.op_type for n in onnx.load(row.path).graph.node}
