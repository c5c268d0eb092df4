"""Where compile time goes: model execution in ONNX Runtime vs qcompile's own work.

    python -m benchmarks.compile_time --models all --repeat 1,4   # writes COMPILE_TIME.md

Each zoo model is compiled for the CPU target twice: on its benchmark calibration set, and
on that set repeated `k` times (same feeds; only the amount of work changes). The report's
clocks (qcompile.backends.ort.OrtClock, qcompile.calibrate.runner.ObserverClock) split
the wall time into
- ORT run: inside InferenceSession.run (calibration, SmoothQuant statistics, measuring),
- ORT sessions: building InferenceSessions,
- observers: histogram/statistics work on the activations (numpy kernels, thread pool),
  over every calibration run of the compile,
- the rest (report.qcompile_seconds): import, rewrite passes, parameter search, QDQ
  insertion, checker, report, and the Python between model runs.
The marginal rows (difference between the two sizes) show what each extra feed costs.
The report's latency benchmark is off (bench_runs=0): it is model execution but not compile
work. The speed guard (on by default) stays on: it is part of a default compile, and its
timing runs count as ORT run time.

`--mixed orientation` adds the bounded-search rows: RESULTS.md's accuracy-budget search
on that classifier (`--max-accuracy-drop 0.5%`, metric accuracy, its verification half),
with default settings and under each `--time-budgets` value, timed wall to wall (speed
guard and output write included), each with a fresh cache.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import qcompile
from benchmarks import datasets, zoo
from benchmarks.machine import cpu_description

HERE = Path(__file__).parent


def _split(report) -> dict[str, float]:
    return {
        "total": report.compile_seconds,
        "ORT run": report.ort_run_seconds,
        "ORT sessions": report.ort_session_seconds,
        "observers": report.observer_seconds,
        "rest": report.qcompile_seconds,
        "feeds": report.calib_batches + report.holdout_batches,
    }


def measure(name: str, repeats: list[int], trials: int) -> list[tuple[int, dict[str, float]]]:
    path = zoo.fetch(name)
    task = datasets.task_data(name, path)
    rows = []
    for k in repeats:
        runs = []
        for _ in range(trials):
            res = qcompile.compile(
                path, target="cpu", calibration=task.calibration * k, progress=False, bench_runs=0
            )
            runs.append(_split(res.report))
        rows.append((k, {key: statistics.median(r[key] for r in runs) for key in runs[0]}))
    return rows


def _table(results: dict[str, list[tuple[int, dict[str, float]]]]) -> list[str]:
    cols = ("total", "ORT run", "ORT sessions", "observers", "rest")
    lines = [
        "| model | calibration | feeds | "
        + " | ".join(f"{c} (s)" for c in cols)
        + " | ORT share |",
        "|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for name, rows in results.items():
        for k, s in rows:
            share = (s["ORT run"] + s["ORT sessions"]) / s["total"]
            lines.append(
                f"| {name} | ×{k} | {s['feeds']:.0f} | "
                + " | ".join(f"{s[c]:.2f}" for c in cols)
                + f" | {share:.0%} |"
            )
        (k0, a), (k1, b) = rows[0], rows[-1]
        if k1 != k0:
            d = {c: b[c] - a[c] for c in (*cols, "feeds")}
            share = (d["ORT run"] + d["ORT sessions"]) / d["total"]
            lines.append(
                f"| {name} | marginal ×{k0}→×{k1} | +{d['feeds']:.0f} | "
                + " | ".join(f"{d[c]:+.2f}" for c in cols)
                + f" | {share:.0%} |"
            )
    return lines


def mixed_wall(name: str, budgets: list[float | None]) -> list[str]:
    """Wall time of the accuracy-budget search, as benchmarked in RESULTS.md."""
    from benchmarks.compare import MIXED_DROP, classifier_split

    src = zoo.fetch(name)
    task = datasets.task_data(name, src)
    verify, labels, _, _ = classifier_split(task)
    rows = [
        f"## Bounded searches: mixed precision on {name}",
        "",
        f"`max_accuracy_drop={MIXED_DROP}`, metric accuracy on {len(verify)} verification "
        "feeds, 2 threads, speed guard on; wall = the whole `qcompile.compile` call.",
        "",
        "| --time-budget | wall s | search s | of it sensitivity s | speed guard s | "
        "stopped by budget | verified drop | budget met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for budget in budgets:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = qcompile.compile(
                src, calibration=task.calibration, output=f"{tmp}/out.onnx", threads=2,
                max_accuracy_drop=MIXED_DROP, metric="accuracy", labels=labels,
                verification=verify, mixed_verify_feeds=len(verify), time_budget_s=budget,
                progress=False,
            ).report  # fmt: skip
            wall = time.perf_counter() - start
        mp, guard = report.mixed_precision, report.speed_guard or {}
        rows.append(
            f"| {budget if budget else 'none'} | {wall:.1f} | {mp['search_seconds']:.1f} | "
            f"{mp.get('phase_seconds', {}).get('sensitivity', 0):.1f} | "
            f"{guard.get('seconds', 0):.1f} | {mp['stopped_by_time_budget']} | "
            f"{mp['verified_drop']:.4f} | {mp['budget_met']} |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="comma-separated zoo names or 'all'")
    parser.add_argument("--repeat", default="1,4", help="calibration-set multiples")
    parser.add_argument("--trials", type=int, default=3, help="compiles per size (median)")
    parser.add_argument("--mixed", default="", help="a zoo classifier for the search rows")
    parser.add_argument("--time-budgets", default="20", help="comma-separated seconds")
    parser.add_argument("--out", default=str(HERE / "COMPILE_TIME.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    names = list(zoo.ZOO) if args.models == "all" else args.models.split(",")
    repeats = [int(k) for k in args.repeat.split(",")]
    results = {}
    for name in names:
        results[name] = measure(name, repeats, args.trials)
        print("\n".join(_table({name: results[name]})[2:]), flush=True)
    text = [
        "# Where qcompile's compile time goes",
        "",
        f"`python -m benchmarks.compile_time --models {args.models} --repeat {args.repeat} "
        f"--trials {args.trials}` on {cpu_description()}, "
        f"Python {platform.python_version()}; medians of {args.trials} compiles, CPU target, "
        "default (MSE) calibration, no report latency benchmark (bench_runs=0), speed guard "
        "on (its timing runs count as ORT run). See the module docstring for the columns.",
        "",
        *_table(results),
        "",
    ]
    if args.mixed:
        budgets = [None] + [float(b) for b in args.time_budgets.split(",") if b]
        text[2] = text[2].replace(
            "--trials", f"--mixed {args.mixed} --time-budgets {args.time_budgets} --trials"
        )
        text += [*mixed_wall(args.mixed, budgets), ""]
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
