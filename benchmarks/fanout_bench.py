"""Search fan-out measured: mixed precision's sensitivity phase and `auto`'s scoring,
serial vs `--fanout ray`, on a zoo model (qcompile.driver.fanout).

    python -m benchmarks.fanout_bench --model orientation

Prints, per run, the wall time of the whole compile and of the sensitivity phase, and
whether the fanned-out run chose and wrote exactly what the serial one did. The FPGA
target's mixed precision is used because its cost (weight bits) is not a timing, so the
two runs can be compared byte for byte; the sensitivity phase is the same code on every
target. Both runs use `--threads 1` per ORT session (identical results need identical
thread counts); the serial run with every core is printed for reference.
"""

from __future__ import annotations

import argparse
import logging
import time

import onnx_ir as ir

import qcompile
from benchmarks import datasets, zoo


def _run(src, task, fanout: str, threads: int | None, budget: float) -> dict:
    start = time.perf_counter()
    result = qcompile.compile(
        src, target="fpga", calibration=task.calibration, calib_method="auto",
        max_accuracy_drop=budget, metric="cosine", fanout=fanout, threads=threads,
        bench_runs=0, progress=False, calib_confidence=False,
    )  # fmt: skip
    mp = result.report.mixed_precision
    return {
        "wall_s": time.perf_counter() - start,
        "sensitivity_s": mp["phase_seconds"]["sensitivity"],
        "choices": [(layer["node"], layer["choice"]) for layer in mp["layers"]],
        "auto": result.report.calib_method_scores,
        "bytes": ir.to_proto(result.model).SerializeToString(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="orientation")
    parser.add_argument("--budget", type=float, default=0.01, help="cosine drop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    src = zoo.fetch(args.model)
    task = datasets.task_data(args.model, src)
    runs = {
        "serial, threads 1": _run(src, task, "serial", 1, args.budget),
        "ray, threads 1 per task": _run(src, task, "ray", 1, args.budget),
        "serial, all cores": _run(src, task, "serial", None, args.budget),
    }
    base = runs["serial, threads 1"]
    for label, r in runs.items():
        same = r["choices"] == base["choices"] and r["auto"] == base["auto"]
        print(
            f"{args.model:12s} {label:26s} compile {r['wall_s']:7.1f} s  sensitivity "
            f"{r['sensitivity_s']:6.1f} s  same choices/auto scores as serial: {same}  "
            f"same bytes: {r['bytes'] == base['bytes']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
