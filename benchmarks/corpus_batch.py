"""The corpus compiled through `qcompile batch` (`python -m benchmarks.corpus --batch DIR`).

The project's own fleet path: every corpus model is written as `DIR/inputs/NAME.onnx`
with its feeds as `NAME.npz` (rank + 1 arrays: whole feeds), every (model, target) is a
batch task run in a child process of its own (on Ray with `--ray`), and the rows are
checked and timed here exactly as the in-process corpus does (benchmarks/corpus.py). A
rerun with the same DIR skips the tasks whose content key has not changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from benchmarks.corpus import (
    CorpusModel,
    Row,
    check_compiled,
    reference,
    run_model,
    target_options,
)


def _guard(decision: str | None) -> str:
    """The corpus's guard column from the batch row's speed-guard decision."""
    if not decision:
        return "–"
    if decision.startswith("FP32"):
        return "FP32"
    if "left float" in decision:
        return f"{decision.split()[0]} float"
    return "kept"


def _write_inputs(ref, folder: Path, name: str) -> tuple[str, str] | None:
    """NAME.onnx and NAME.npz, or None when the feeds do not stack (shapes differ)."""
    try:
        arrays = {k: np.stack([f[k] for f in ref.feeds]) for k in ref.feeds[0]}
    except ValueError:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    model_path, data_path = folder / f"{name}.onnx", folder / f"{name}.npz"
    onnx.save(ref.model, model_path)
    np.savez(data_path, **arrays)
    return str(model_path), str(data_path)


def run_through_batch(
    entries: list[CorpusModel],
    targets: list[str],
    bench_runs: int,
    work: Path,
    use_ray: bool = False,
    ray_address: str | None = None,
) -> list[Row]:
    from qcompile.fleet.batch import run_batch
    from qcompile.fleet.executor import make_executor
    from qcompile.fleet.manifest import Task

    rows: dict[tuple[str, str], Row] = {}
    refs, tasks, task_targets = {}, [], []
    for entry in entries:
        ref = reference(entry)
        written = None if isinstance(ref, str) else _write_inputs(ref, work / "inputs", entry.name)
        for target in targets:
            if isinstance(ref, str):
                rows[entry.name, target] = Row(entry.name, entry.source, target, "skipped", ref)
            elif written is None:  # feeds of different shapes: no .npz holds them
                rows[entry.name, target] = run_model(entry, target, bench_runs)
            else:
                base, variant = target_options(target)
                options = {"threads": 1, **variant, **entry.options}
                # a variant (cpu-int) gets its own task name: its outputs must not
                # overwrite the plain target's
                name = entry.name if base == target else f"{entry.name}.{target}"
                tasks.append(Task(name, base, *written, options=options))
                task_targets.append((entry.name, target))
        if not isinstance(ref, str):
            refs[entry.name] = (entry, ref)
    out = work / "out"
    result = run_batch(tasks, out, make_executor(ray_address, use_ray, None), bench_runs=0)
    for (name, target), got in zip(task_targets, result.rows, strict=True):
        entry, ref = refs[name]
        row = Row(entry.name, entry.source, target, "bug", seconds=got.get("seconds", 0.0))
        if got["status"] == "refused":
            row.outcome, row.reason = "refused", got.get("reason", "")[:200]
        elif got["status"] != "ok":
            row.reason = got.get("reason", "")[:200]
        else:
            row.guard = _guard(got.get("speed_guard"))
            row = check_compiled(row, ref, onnx.load(out / got["output"]), bench_runs)
        rows[entry.name, target] = row
    return [rows[e.name, t] for e in entries for t in targets]
