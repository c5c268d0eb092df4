"""Fleets of models: `qcompile batch` and its executors (one machine, or Ray)."""

from __future__ import annotations

import os

from qcompile.fleet.batch import BatchResult, compile_task, print_summary, run_batch
from qcompile.fleet.executor import LocalExecutor, RayExecutor, make_executor
from qcompile.fleet.manifest import Task, read_tasks


def batch(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    targets: list[str] | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    time_limit_s: float | None = None,
    bench_runs: int = 20,
    bench_threads: int | None = None,
) -> BatchResult:
    """Compile every (model, target) of a manifest or folder into `out_dir`; see
    qcompile.fleet.batch for the steps and qcompile.fleet.manifest for the manifest."""
    tasks = read_tasks(source, targets)
    executor = make_executor(ray_address, ray, time_limit_s)
    return run_batch(tasks, out_dir, executor, bench_runs=bench_runs, bench_threads=bench_threads)


__all__ = [
    "BatchResult",
    "LocalExecutor",
    "RayExecutor",
    "Task",
    "batch",
    "compile_task",
    "print_summary",
    "read_tasks",
    "run_batch",
]
