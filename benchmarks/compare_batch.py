"""compare.py's compiles as `qcompile batch` tasks, and the measurement of their rows.

Every row of a zoo model (ORT's quantizers and each qcompile configuration) is one batch
task: it runs in a child process of its own (a quantizer that crashes or hangs is a row
saying so), on this machine or, with `--ray`, as a Ray task; a rerun with the same
`--work DIR` skips the rows whose content key (model, data, configuration, library
versions) has not changed. The task's data file is the zoo task's data pickled without
its metric (`DIR/NAME.task.pkl`), so its bytes key the data. Accuracy and latency are
then measured here, every row of a model in one process on the same feeds, as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qcompile.backends import ort as ort_backend

logger = logging.getLogger("benchmarks.compare")

TARGET = "row"  # the batch target column: a compare row is not one qcompile target


@dataclass
class Row:
    model: str
    config: str
    path: Path | None = None
    compile_seconds: float | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    sqnr_db: float | None = None
    cosine: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    size_mb: float | None = None
    # integer-only rows: what the compile report says, and the reference check
    extra: dict = field(default_factory=dict)


def compile_rows(
    name: str, model_path: Path, task, labels: list[str], quick: bool, work: Path, executor
) -> list[Row]:
    """Each configuration in `labels` compiled as a batch task; FP32 first."""
    from qcompile.fleet.batch import run_batch
    from qcompile.fleet.manifest import Task

    work.mkdir(parents=True, exist_ok=True)
    data = work / f"{name}.task.pkl"
    payload = pickle.dumps(dataclasses.replace(task, metric=None), protocol=5)
    if not data.exists() or data.read_bytes() != payload:
        data.write_bytes(payload)
    tasks = [
        Task(f"{name}-{i:02d}", TARGET, str(model_path), str(data),
             {"config": label, "quick": quick})
        for i, label in enumerate(labels)
    ]  # fmt: skip
    result = run_batch(tasks, work, executor, work=compile_one, bench_runs=0)
    rows = [Row(name, "FP32", path=model_path)]
    for label, out in zip(labels, result.rows, strict=True):
        if out.get("skip"):
            continue
        row = Row(name, label, compile_seconds=out.get("seconds"))
        if out["status"] == "ok":
            row.path, row.extra = work / out["output"], out.get("extra") or {}
            if "chosen_method" in row.extra:  # auto: say what it chose
                row.config = label.replace("auto", f"auto → {row.extra['chosen_method']}")
        else:
            row.error = out.get("reason") or out["status"]
            logger.warning("%s / %s failed:\n%s", name, label, out.get("traceback", row.error))
        rows.append(row)
    return rows


def compile_one(task, out_dir: str) -> dict[str, Any]:
    """The work of one row (in the task's child process): its configuration's compile."""
    from benchmarks import compare

    with open(task.calibration, "rb") as f:
        data = pickle.load(f)
    compile_fn = compare.configs(task.options["quick"])[task.options["config"]]
    dst = Path(out_dir) / f"{task.id}.onnx"
    try:
        extra = compile_fn(Path(task.model), dst, data) or {}
    except compare.Skip as skip:
        return {"skip": True, "reason": str(skip) or "not benchmarked on this model"}
    # numpy scalars in reports: the row is stored as JSON
    extra = json.loads(
        json.dumps(extra, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )
    return {"output": dst.name, "extra": extra}


def timing_session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle worker threads must not spin: with several sessions timed interleaved, one
    # session's spinning threads would steal the cores from the next one's run.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _bit_exact(path: Path, feed) -> bool:
    """ORT (QDQ fusions off: they would rewrite float islands) equals the numpy reference."""
    import onnx

    from qcompile.backends.reference import run_reference

    # one sample: the reference's int64 intermediates of a whole batch of PP-OCR rec
    # lines outgrow a 23 GB machine (not where the model fixes its batch: orientation's 8)
    model = onnx.load(str(path))
    fixed = {
        i.name
        for i in model.graph.input
        if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_value > 1
    }
    feed = {k: v[:1] if np.ndim(v) and k not in fixed else v for k, v in feed.items()}
    sess = ort_backend.make_session(path, qdq_fusions=False)
    ours = run_reference(model, feed)
    return all(np.array_equal(a, b) for a, b in zip(sess.run(None, feed), ours, strict=True))


def _sqnr_db(a: np.ndarray, b: np.ndarray) -> float:
    noise = float(np.sum((a - b) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(float(np.sum(a * a)) / noise))


def _flat(outs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([o.ravel() for out in outs for o in out]).astype(np.float64)


def _qdq_graph_sqnr(row: Row, task, fp32: np.ndarray) -> float | None:
    """Output SQNR of the QDQ graph an integer-only row was lowered from (same feeds)."""
    name = row.extra.get("qdq_graph")
    if not name:
        return None
    sess = timing_session(row.path.with_name(name), 2)
    return _sqnr_db(fp32, _flat([sess.run(None, f) for f in task.evaluation]))


def measure(rows: list[Row], task, threads: int, runs: int) -> None:
    """Task metric, SQNR, cosine, size and interleaved latency of every compiled row."""
    sessions = {}
    for row in rows:
        if row.path is None:
            continue
        try:
            sessions[row.config] = timing_session(row.path, threads)
        except Exception as exc:
            row.error = f"ORT cannot load it: {str(exc).splitlines()[0][:160]}"
            row.path = None
    fp32_sess = sessions["FP32"]
    fp32_out = [fp32_sess.run(None, f) for f in task.evaluation]
    for row in rows:
        sess = sessions.get(row.config)
        if sess is None:
            continue
        try:
            outs = [sess.run(None, f) for f in task.evaluation]
        except Exception as exc:
            row.error = f"ORT fails at run time: {str(exc).splitlines()[0][:160]}"
            sessions.pop(row.config)
            continue
        row.metrics = task.metric(fp32_out, outs)
        a, b = _flat(fp32_out), _flat(outs)
        row.sqnr_db = _sqnr_db(a, b)
        row.cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        row.size_mb = sum(p.stat().st_size for p in row.path.parent.glob(row.path.name + "*")) / 1e6
        if "islands" in row.extra:
            row.extra["qdq_sqnr_db"] = _qdq_graph_sqnr(row, task, a)
            t0 = time.perf_counter()
            row.extra["bit_exact"] = _bit_exact(row.path, task.evaluation[0])
            row.extra["reference_s"] = time.perf_counter() - t0

    # Latency: interleaved runs, same feed and threads for every session.
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, task.bench_feed)
    for _ in range(runs):
        for key, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, task.bench_feed)
            times[key].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["FP32"])
    for row in rows:
        if row.config in times:
            row.latency_ms = statistics.median(times[row.config])
            row.speedup = base / row.latency_ms
