"""`qcompile batch`: every (model, target) of a manifest compiled, measured and summarised.

Three steps:
1. compile: each task not already done runs through an executor (executor.py), writing
   `OUT/NAME.TARGET.onnx` and its row `OUT/NAME.TARGET.json` (status, reason, accuracy,
   size, the task's content key);
2. measure: latency of each new ok row against its FP32 model, in this process, one
   model at a time and after every compile has finished, so no other work of the batch
   shares the machine while it is timed (interleaved medians, `bench_threads` threads);
3. summarise: `OUT/summary.json`, `OUT/summary.md` and a table on the terminal.

A rerun skips every task whose row exists with the same content key and did not fail:
changing a model, its data, an option or a library version compiles it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcompile.errors import QCompileError
from qcompile.fleet.executor import Work
from qcompile.fleet.manifest import Task
from qcompile.ir.io import write_text_atomic

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "id",
    "status",
    "reason",
    "output_sqnr_db",
    "cosine",
    "speedup",
    "size_mb",
    "fp32_size_mb",
    "seconds",
    "cached",
)


def compile_task(task: Task, out_dir: str) -> dict[str, Any]:
    """The work of one task (runs in the task's child process): compile without timing
    (the measure step times it later, alone), write the model and return its row."""
    from qcompile.api import compile as compile_model

    options = {**task.options, "bench_runs": 0, "progress": False}
    output = Path(out_dir) / f"{task.id}.onnx"
    result = compile_model(
        task.model, target=task.target, calibration=task.calibration, output=output, **options
    )
    report = result.report
    sqnr = report.min_output_sqnr_db
    return {
        "output": output.name,
        "output_sqnr_db": sqnr if math.isfinite(sqnr) else None,
        "cosine": min((o.cosine for o in report.outputs), default=None),
        "size_mb": report.size_quantized_bytes / 1e6,
        "fp32_size_mb": report.size_fp32_bytes / 1e6,
        "compile_seconds": report.compile_seconds,
        "speed_guard": (report.speed_guard or {}).get("decision"),
        "notes": list(report.notes)[:5],
    }


@dataclasses.dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    seconds: float
    executor: str

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]


def run_batch(
    tasks: Sequence[Task],
    out_dir: str | os.PathLike,
    executor,
    *,
    work: Work = compile_task,
    bench_runs: int = 20,
    bench_threads: int | None = None,
) -> BatchResult:
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    todo: list[Task] = []
    keys = {task.id: task.key() for task in tasks}  # hashes every model and data file once
    for task in tasks:
        previous = _read_row(out / f"{task.id}.json")
        if previous and previous.get("key") == keys[task.id] and previous["status"] != "failed":
            rows[task.id] = {**previous, "cached": True}
        else:
            todo.append(task)
    logger.info("batch: %d task(s), %d already done", len(tasks), len(tasks) - len(todo))
    fresh: list[str] = []
    for task, row in executor.map(work, todo, str(out)):
        row = {
            "id": task.id,
            "name": task.name,
            "target": task.target,
            "model": task.model,
            "key": keys[task.id],
            "cached": False,
            **row,
        }
        row.setdefault("reason", "")
        rows[task.id] = row
        if row["status"] == "ok":
            fresh.append(task.id)
        else:
            _write_row(out, row)  # failed and refused rows are written now; ok after timing
        logger.info("batch: %s %s %s", task.id, row["status"], row.get("reason", ""))
    by_id = {t.id: t for t in tasks}
    for task_id in fresh:
        rows[task_id].update(_measure(by_id[task_id], out, bench_runs, bench_threads))
        _write_row(out, rows[task_id])
    ordered = [rows[t.id] for t in tasks]
    result = BatchResult(ordered, time.perf_counter() - start, executor.name)
    write_summary(result, out)
    return result


def _measure(task: Task, out: Path, runs: int, threads: int | None) -> dict[str, Any]:
    """Latency of the compiled model against its FP32 input, alone on the machine."""
    if runs <= 0:
        return {"speedup": None}
    from qcompile.backends import ort as ort_backend
    from qcompile.data.feeds import input_specs, open_calibration
    from qcompile.ir.io import load_model

    try:
        fp32 = load_model(task.model)
        feed = next(iter(open_calibration(task.calibration, input_specs(fp32), batch_size=1)))
        sessions = {
            "fp32": ort_backend.make_session(fp32, threads=threads),
            "q": ort_backend.make_session(str(out / f"{task.id}.onnx"), threads=threads),
        }
        latency = ort_backend.bench(sessions, feed, runs=runs)
    except QCompileError as exc:
        return {"speedup": None, "measure_error": str(exc).splitlines()[0]}
    return {
        "speedup": latency["fp32"] / latency["q"],
        "latency_ms": latency["q"],
        "fp32_latency_ms": latency["fp32"],
    }


def _read_row(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_row(out: Path, row: dict[str, Any]) -> None:
    stored = {k: v for k, v in row.items() if k != "cached"}
    write_text_atomic(out / f"{row['id']}.json", json.dumps(stored, indent=2, sort_keys=True))


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        fmt = {"speedup": ".2f", "cosine": ".4f"}.get(column, ".1f")
        return format(value, fmt) + ("×" if column == "speedup" else "")
    return str(value).replace("|", "/")[:120]


def write_summary(result: BatchResult, out: Path) -> None:
    counts = {s: sum(r["status"] == s for r in result.rows) for s in ("ok", "refused", "failed")}
    summary = {
        "executor": result.executor,
        "seconds": result.seconds,
        "counts": counts,
        "rows": [{k: v for k, v in r.items() if k != "traceback"} for r in result.rows],
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    lines = [
        "# qcompile batch",
        "",
        f"{len(result.rows)} task(s) in {result.seconds:.1f} s ({result.executor} executor): "
        + ", ".join(f"{v} {k}" for k, v in counts.items()),
        "",
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r, c) for c in SUMMARY_COLUMNS) + " |" for r in result.rows]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")


def print_summary(result: BatchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"qcompile batch: {len(result.rows)} task(s), {result.seconds:.1f} s")
    for column in SUMMARY_COLUMNS:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*(_cell(row, c) for c in SUMMARY_COLUMNS))
    Console().print(table)
