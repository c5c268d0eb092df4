"""TVM vs ONNX Runtime on the zoo, same machine and threads: untuned and tuned builds.

    python -m benchmarks.tvm_bench --tune-trials 64      # every zoo model, untuned and tuned

For each model: ORT FP32, ORT running qcompile's CPU INT8 model, and TVM (llvm, this CPU's
own -mcpu) building, untuned, the FP32 model, the CPU INT8 QDQ model (which TVM's
pre-lowering turns into integer ops) and qcompile's integer-only model (ops with no
integer form left as float islands); then the FP32 model tuned with MetaSchedule
(`--tune-trials` over its convolution and matrix-product tasks, database in a scratch
dir) on the models named by `--tune`. Parity compares TVM with ORT running the same
graph: the FP32 and QDQ models as ORT deploys them, the integer-only graph as written
(QDQ fusions off), which is the graph's own semantics, so there "bit-exact" is expected.
Latency: median of `--runs` runs of the model's benchmark feed. Writes
benchmarks/TVM.md, which compare.py folds into RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

import qcompile
from benchmarks import datasets, zoo
from benchmarks.machine import cpu_description
from qcompile.backends import ort as ort_backend
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.reference import codes_model, run_reference
from qcompile.numerics.qparams import sqnr_db

HERE = Path(__file__).parent


def _ort_ms(
    model, feed, threads: int, runs: int, qdq_fusions: bool = True
) -> tuple[float, list[np.ndarray]]:
    sess = ort_backend.make_session(model, threads=threads, qdq_fusions=qdq_fusions)
    out = sess.run(None, dict(feed))
    return ort_backend.bench({"m": sess}, feed, runs=runs)["m"], out


def measure(name: str, threads: int, runs: int, tune: bool, trials: int) -> list[dict]:
    path = zoo.fetch(name)
    task = datasets.task_data(name, path)
    feed = task.bench_feed
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    rows = []
    fp32_ms, fp32_out = _ort_ms(str(path), feed, threads, runs)
    rows.append({"config": "ORT FP32", "ms": fp32_ms})
    int8 = qcompile.compile(path, calibration=task.calibration, progress=False, bench_runs=0)
    int8_ms, int8_out = _ort_ms(int8.model, feed, threads, runs)
    rows.append({"config": "ORT, qcompile cpu INT8 (QDQ)", "ms": int8_ms})
    integer = qcompile.compile(
        path,
        calibration=task.calibration,
        progress=False,
        bench_runs=0,
        integer_only=True,
        input_shapes=shapes,
        allow_float=("re:.*",),  # ops with no integer form stay float islands
    )
    # the integer-only graph's own semantics (ORT's QDQ fusions would rewrite float
    # islands into fused kernels that round differently), cut at its output dequantizers:
    # the codes are what the three implementations must agree on; a float op after them
    # (a classifier's Softmax) may differ in the last ulp between runtimes
    codes = codes_model(ir.to_proto(integer.model))
    _, integer_out = _ort_ms(codes, feed, threads, 1, qdq_fusions=False)
    reference_equal = all(
        np.array_equal(a, b)
        for a, b in zip(integer_out, run_reference(codes, dict(feed)), strict=True)
    )
    islands = len(integer.report.float_islands)
    qdq = "qcompile cpu INT8 (QDQ → integer ops)"
    builds = [
        ("TVM llvm untuned, FP32", str(path), fp32_out, 0),
        (f"TVM llvm untuned, {qdq}", int8.model, int8_out, 0),
        (
            f"TVM llvm untuned, qcompile integer-only codes ({islands} float islands)",
            codes,
            integer_out,
            0,
        ),
    ]
    if tune:
        builds.append((f"TVM llvm tuned ({trials} trials), FP32", str(path), fp32_out, trials))
    for label, model, reference, n in builds:
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="qcompile-tune-") as work:
                executable, names, _ = tvm_backend.compile_model(
                    model,
                    target=tvm_backend.host_target(threads),
                    input_shapes=shapes,
                    tune_trials=n,
                    work_dir=work,
                )
        except Exception as exc:  # noqa: BLE001 - a failed build is a row, not a crash
            rows.append({"config": label, "error": str(exc).splitlines()[0][:160]})
            continue
        build_s = time.perf_counter() - t0
        runner = tvm_backend.TVMRunner(executable, names)
        t0 = time.perf_counter()
        got = runner.run(feed)
        first = time.perf_counter() - t0
        # untuned builds of the big models take seconds to minutes per run: 3 runs there,
        # and over 10 s a run, one more run after this first (warm-up) one
        if first < 1.0:
            ms = runner.bench(feed, runs=runs)
        elif first < 10.0:
            ms = runner.bench(feed, runs=3)
        else:
            ms = runner.bench(feed, runs=1, warmup=0)
        rows.append(
            {
                "config": label,
                "ms": ms,
                "build_s": build_s,
                "parity_db": sqnr_db(reference[0], got[0]),
                "exact": all(np.array_equal(a, b) for a, b in zip(reference, got, strict=True)),
            }
        )
        if model is codes:  # ORT = the numpy reference as well: three ways
            rows[-1]["exact"] = rows[-1]["exact"] and reference_equal
    for row in rows:
        if "ms" in row:
            row["vs_ort_fp32"] = row["ms"] / fp32_ms
    return rows


def format_rows(name: str, rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {name} | {r['config']} | – | – | – | failed: {r['error']} | – |")
            continue
        parity = r.get("parity_db")
        lines.append(
            f"| {name} | {r['config']} | {r['ms']:.2f} | {r['vs_ort_fp32']:.2f} | "
            f"{'–' if 'build_s' not in r else format(r['build_s'], '.0f')} | "
            f"{'–' if parity is None else ('∞' if np.isinf(parity) else f'{parity:.1f}')} | "
            f"{'–' if 'exact' not in r else ('yes' if r['exact'] else 'no')} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ocr_cls,orientation,ocr_rec,ocr_det,minilm")
    parser.add_argument(
        "--tune", default="ocr_cls,orientation,ocr_rec,ocr_det,minilm", help="models to tune"
    )
    parser.add_argument("--tune-trials", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=str(HERE / "TVM.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    names = args.models.split(",")
    tuned = set(args.tune.split(",")) if args.tune else set()
    lines = [
        "## TVM (apache-tvm Relax, llvm) vs ONNX Runtime",
        "",
        f"`python -m benchmarks.tvm_bench --models {args.models} --tune {args.tune} "
        f"--tune-trials {args.tune_trials} --runs {args.runs}` on "
        f"{cpu_description()}, {args.threads} threads for both; "
        f"latency = median of {args.runs} runs on the model's benchmark feed (3 for builds "
        "over a second a run, 1 after the warm-up run for builds over 10 s). Parity: TVM's "
        "output vs ORT running the same graph (dB; ∞ = identical); integer-only graphs run "
        "in ORT as written (QDQ fusions off), cut at their output dequantizers: the row "
        "compares the integer codes, and for those rows bit-exact means ORT = TVM = the numpy "
        "reference (`qcompile.backends.reference`); float ops after the codes (a "
        "classifier's Softmax) may differ in the last ulp. Float islands, if any (ops with no "
        "integer form, kept float by `--allow-float`), are computed by each runtime in its "
        "own float order, so a code can flip there. Tuning: MetaSchedule, "
        f"XGBoost cost model, {args.tune_trials} trials on the heaviest convolution/"
        "matrix-product tasks (16 each).",
        "",
        "| model | config | latency ms | latency ÷ ORT FP32 | build/tune s | parity dB | "
        "bit-exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rows = measure(name, args.threads, args.runs, name in tuned, args.tune_trials)
        lines.extend(format_rows(name, rows))
        Path(args.out).write_text("\n".join([*lines, ""]))  # partial results survive
        for r in rows:
            print(name, r, flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
