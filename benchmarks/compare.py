"""Side-by-side: FP32, ONNX Runtime's quantizers and every qcompile target/option, on the zoo.

    python -m benchmarks.compare --models all            # writes benchmarks/RESULTS.md + results.png

For each model: ORT quantize_dynamic (defaults), ORT quantize_static with its defaults and
at its best honest settings (QDQ, per-channel, U8 activations/S8 weights, quant_pre_process
where it works), and qcompile per target and calibration method. Every row is evaluated
the same way on the same held-out data: the task metric, output SQNR and cosine vs FP32,
median latency over interleaved runs in this one process at fixed threads, size and
compile time. A quantizer that fails becomes a row saying why, not a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import logging
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import datasets, zoo
from qcompile.backends import ort as ort_backend

HERE = Path(__file__).parent
logger = logging.getLogger("benchmarks.compare")


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


class _Reader:
    """ORT CalibrationDataReader over our calibration feeds."""

    def __init__(self, feeds):
        self.feeds = list(feeds)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def _ort_dynamic(src: Path, dst: Path, task) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(src, dst)


def _ort_static_default(src: Path, dst: Path, task) -> None:
    from onnxruntime.quantization import quantize_static

    quantize_static(src, dst, _Reader(task.calibration))


def _ort_static_best(src: Path, dst: Path, task) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + ".pre.onnx")
    source = src
    cwd = os.getcwd()
    try:
        # it writes temporaries (sym_shape_infer_temp.onnx, <uuid>.data) into the cwd
        os.chdir(dst.parent)
        quant_pre_process(str(src), str(pre))
        source = pre
    except Exception as exc:  # recorded: ORT's pre-processing fails on some graphs
        logger.warning("quant_pre_process failed on %s: %s; quantizing without it", src.name, exc)
    finally:
        os.chdir(cwd)
    quantize_static(
        source,
        dst,
        _Reader(task.calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _qcompile(target: str, method: str, **options) -> Callable:
    def run(src: Path, dst: Path, task) -> dict:
        import qcompile

        extra = dict(options)
        verification = extra.pop("verification", None)
        shapes = _common_shapes(task)
        if (target == "fpga" or options.get("integer_only")) and shapes:
            # integer-only graphs need static spatial sizes (pools, cost model): pin the
            # inputs to the task's feed shapes when every feed has the same ones
            extra["input_shapes"] = shapes
        report = qcompile.compile(
            src,
            target=target,
            calibration=task.calibration,
            calib_method=method,
            bench_runs=0,
            progress=False,
            output=dst,
            verification=verification,
            **extra,
        ).report
        if report.mixed_precision:
            return {"mixed": report.mixed_precision, "speedup_hint": report.speedup}
        if not report.integer_only:
            return {"chosen_method": report.calib_method} if method == "auto" else {}
        return {
            "islands": sorted({i["op_type"] for i in report.float_islands}),
            "weight_mbit": report.fpga_weight_memory_bits / 1e6 if report.fpga_layers else None,
            "fpga_ms": report.fpga_latency_ms,
        }

    return run


def _attention(**options) -> Callable:
    """An fpga row for models with attention (a Softmax feeding a MatMul): MiniLM."""
    run = _qcompile("fpga", "mse", pow2_scales=False, **options)

    def attention_only(src: Path, dst: Path, task) -> dict:
        if task.name != "minilm":
            raise _Skip
        return run(src, dst, task)

    return attention_only


def _common_shapes(task) -> dict[str, tuple[int, ...]] | None:
    feeds = [*task.calibration, *task.evaluation, task.bench_feed]
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    if all({k: tuple(v.shape) for k, v in f.items()} == shapes for f in feeds):
        return {k: v for k, v in shapes.items() if np.issubdtype(feeds[0][k].dtype, np.floating)}
    return None


def _bit_exact(path: Path, feed) -> bool:
    """ORT (QDQ fusions off: they would rewrite float islands) equals the numpy reference."""
    import onnx

    from qcompile.backends.reference import run_reference

    sess = ort_backend.make_session(path, qdq_fusions=False)
    ours = run_reference(onnx.load(str(path)), feed)
    return all(np.array_equal(a, b) for a, b in zip(sess.run(None, feed), ours, strict=True))


def configs(quick: bool) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "ORT quantize_dynamic": _ort_dynamic,
        "ORT quantize_static (defaults)": _ort_static_default,
        "ORT quantize_static (QDQ, per-channel, U8/S8, pre-process)": _ort_static_best,
    }
    methods = ("auto",) if quick else ("auto", "mse", "percentile", "minmax", "entropy")
    for m in methods:
        out[f"qcompile cpu ({m})"] = _qcompile("cpu", m)
    out["qcompile cpu (mse, explicit smoothing)"] = _qcompile("cpu", "mse", smooth_explicit=True)
    if not quick:
        out["qcompile gpu (mse; CPU EP here, no GPU)"] = _qcompile("gpu", "mse")
        out["qcompile cpu (mse, integer-only)"] = _qcompile("cpu", "mse", integer_only=True)
        out["qcompile fpga (w8a8, pow2 scales)"] = _qcompile("fpga", "mse")
        out["qcompile fpga (w8a8, pow2 scales, bias correction)"] = _qcompile(
            "fpga", "mse", bias_correction=True
        )
        out["qcompile fpga (w8a8, float scales)"] = _qcompile("fpga", "mse", pow2_scales=False)
        out["qcompile fpga (w4a8, float scales)"] = _qcompile(
            "fpga", "mse", pow2_scales=False, weight_bits=4
        )
        out["qcompile fpga (w4a8, float scales, bias correction)"] = _qcompile(
            "fpga", "mse", pow2_scales=False, weight_bits=4, bias_correction=True
        )
        # attention probabilities at 4 bits: log2 (shift-add attention·V) vs uniform
        out["qcompile fpga (w8a8, float scales, log2 4-bit attention probs)"] = _attention(
            softmax_log2_bits=4
        )
        out["qcompile fpga (w8a8, float scales, uniform 4-bit attention probs)"] = _attention(
            overrides=("op:Where:activation_bits=4",)  # BERT masks the Softmax with a Where
        )
    out[f"qcompile cpu (mixed precision, <= {MIXED_DROP:.1%} drop)"] = _mixed("cpu", "accuracy")
    out[f"qcompile cpu (mixed precision, <= {MIXED_DROP:.1%} top-1 changes)"] = _mixed(
        "cpu", "top1"
    )
    out[f"qcompile cpu (mixed precision, <= {MIXED_DROP:.1%} drop, trace sensitivity)"] = _mixed(
        "cpu", "accuracy", sensitivity="trace"
    )
    out[f"qcompile cpu (mixed precision, layer weights <= {SIZE_BUDGET_MB:g} MB)"] = _size_budget
    out["qcompile cpu (mixed precision, <= 3% detection F1 drop)"] = _mixed_detection
    return out


def _mixed_detection(src: Path, dst: Path, task) -> dict:
    """The accuracy-budget search on the detector's own metric (benchmarks/detection.py)."""
    if task.name != "layout":
        raise _Skip("the detection-budget row is benchmarked on layout")
    from benchmarks import detection

    return _qcompile("cpu", "auto", **detection.mixed_options())(src, dst, task)


SIZE_BUDGET_MB = 8.0  # MiniLM's 36 linear layers: 42.5 MB FP32, 10.6 MB INT8


def _size_budget(src: Path, dst: Path, task) -> dict:
    """`--size-budget`: least output noise with the quantized layers' weights under the
    budget; INT8 alone does not fit, so some layers take INT4 weights (MatMulNBits)."""
    if task.name != "minilm":
        raise _Skip("the size-budget row is benchmarked on minilm")
    return _qcompile("cpu", "auto", size_budget_mb=SIZE_BUDGET_MB)(src, dst, task)


MIXED_DROP = 0.005
MIXED_MODELS = ("minilm", "orientation")


def _mixed(target: str, classifier_metric: str, **options) -> Callable:
    """The accuracy-budget search (`--max-accuracy-drop 0.5%`).

    MiniLM: cosine, checked on the calibration sentences; the evaluation set stays held
    out (the `top1` row does not apply to it). Orientation: `accuracy` against labels (what
    "0.5% accuracy drop" means) or `top1` (share of answers that differ from FP32's, an
    upper bound). Both move on near-tie samples, so the search is checked on every other
    evaluation sample and the result judged on the others (both halves hold rendered
    pages and real scans). A 0.5% budget cannot be measured on 36 samples (one flip is
    2.8%), so 100 scan-like rendered pages are split between them by page: 200 more
    samples on each side (236 held out in all: one flip is 0.42%).
    """

    def run(src: Path, dst: Path, task) -> dict:
        if task.name not in MIXED_MODELS:
            raise _Skip("mixed precision is benchmarked on " + " and ".join(MIXED_MODELS))
        classifier = task.labels is not None
        if not classifier and classifier_metric != "accuracy":
            raise _Skip("one mixed-precision row (cosine) for models without labels")
        verify, held, held_labels = None, task.evaluation, task.labels
        labeled: dict = {"metric": "cosine"}
        if classifier:
            verify, verify_labels, held, held_labels = classifier_split(task)
            labeled["metric"] = classifier_metric
            if classifier_metric == "accuracy":
                labeled["labels"] = verify_labels
        png = f"pareto_{task.name}" + (f"_{classifier_metric}" if classifier else "")
        png += "_trace.png" if options.get("sensitivity") == "trace" else ".png"
        extra = _qcompile(
            target,
            "auto",
            max_accuracy_drop=MIXED_DROP,
            pareto_png=str(HERE / png),
            verification=verify,
            mixed_verify_feeds=len(verify) if verify else 24,
            **labeled,
            **options,
        )(src, dst, task)
        extra["pareto_png"] = png
        fp32 = _session(src, 2)
        quant = _session(dst, 2)
        a = [fp32.run(None, f) for f in held]
        b = [quant.run(None, f) for f in held]
        held_out = {"samples": int(sum(len(o[0]) for o in a))}
        if classifier:
            pa = np.concatenate([o[0] for o in a]).argmax(1)
            pb = np.concatenate([o[0] for o in b]).argmax(1)
            held_out["top1_agreement"] = float(np.mean(pa == pb))
            held_out["flips"] = int(np.sum(pa != pb))
            held_out["flips_in_evaluation_half"] = int(np.sum((pa != pb)[: len(task.labels) // 2]))
            held_out["accuracy_fp32"] = float(np.mean(pa == held_labels))
            held_out["accuracy"] = float(np.mean(pb == held_labels))
        else:
            held_out["metric"] = task.metric(a, b)
        extra["held_out"] = held_out
        return extra

    return run


def classifier_split(task) -> tuple[list[dict], np.ndarray, list[dict], np.ndarray]:
    """(verification feeds, their labels, held-out feeds, their labels) of a classifier's
    mixed-precision row: every other evaluation sample, plus for orientation 100 rendered
    pages (50 batches of 2) split by batch."""
    verify, held = _split_samples(task.evaluation)
    verify_labels, held_labels = task.labels[0::2], task.labels[1::2]
    if task.name == "orientation":
        pages, labels = datasets.orientation_pages(500, 100)
        verify, held = verify + pages[0::2], held + pages[1::2]
        by_batch = labels.reshape(50, 8)
        verify_labels = np.concatenate([verify_labels, by_batch[0::2].ravel()])
        held_labels = np.concatenate([held_labels, by_batch[1::2].ravel()])
    return verify, verify_labels, held, held_labels


def _split_samples(feeds: list[dict]) -> tuple[list[dict], list[dict]]:
    """Even samples for the search to check on, odd ones held out (batches of 8)."""
    keys = list(feeds[0])
    stacked = {k: np.concatenate([f[k] for f in feeds]) for k in keys}

    def batches(part: slice) -> list[dict]:
        n = len(stacked[keys[0]][part])
        return [{k: stacked[k][part][i : i + 8] for k in keys} for i in range(0, n, 8)]

    return batches(slice(0, None, 2)), batches(slice(1, None, 2))


class _Skip(Exception):
    """A configuration that does not apply to this model (no row is written)."""


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle worker threads must not spin: with several sessions timed interleaved, one
    # session's spinning threads would steal the cores from the next one's run.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def evaluate(
    name: str,
    model_path: Path,
    task,
    cfgs: dict[str, Callable],
    threads: int,
    runs: int,
    work: Path,
) -> list[Row]:
    rows = [Row(name, "FP32", path=model_path)]
    for label, fn in cfgs.items():
        dst = work / f"{name}-{len(rows)}.onnx"
        row = Row(name, label)
        t0 = time.perf_counter()
        try:
            row.extra = fn(model_path, dst, task) or {}
            row.path = dst
            if "chosen_method" in row.extra:  # auto: say what it chose
                row.config = row.config.replace("auto", f"auto → {row.extra['chosen_method']}")
        except _Skip:
            continue
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            logger.warning("%s / %s failed:\n%s", name, label, traceback.format_exc())
        row.compile_seconds = time.perf_counter() - t0
        rows.append(row)

    sessions = {}
    for row in rows:
        if row.path is None:
            continue
        try:
            sessions[row.config] = _session(row.path, threads)
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
        a = np.concatenate([o.ravel() for out in fp32_out for o in out]).astype(np.float64)
        b = np.concatenate([o.ravel() for out in outs for o in out]).astype(np.float64)
        noise = float(np.sum((a - b) ** 2))
        row.sqnr_db = float("inf") if noise == 0 else 10 * np.log10(float(np.sum(a * a)) / noise)
        row.cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        row.size_mb = sum(p.stat().st_size for p in row.path.parent.glob(row.path.name + "*")) / 1e6
        if "islands" in row.extra:
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
    return rows


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        if np.isinf(v):
            return "∞"
        return f"{v:.{digits}f}"
    return str(v)


def write_results(
    all_rows: dict[str, list[Row]], tasks: dict, args, out: Path, plot: Path, seconds: float
) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = []
    for lib in ("onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            libs.append(f"{lib} {importlib.metadata.version(lib)}")
    lines = [
        "# qcompile benchmark results",
        "",
        "Generated by `python -m benchmarks.compare "
        + " ".join(args.argv)
        + "` — do not edit by hand.",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- CPU: {cpu}, {args.threads} threads for every session; latency = median of {args.runs} interleaved runs",
        f"- libraries: {', '.join(libs)}",
        f"- total benchmark time: {seconds:.0f} s",
        "",
        "SQNR and cosine compare each model's outputs with FP32 over the whole evaluation set. "
        "Speedup is FP32 latency / row latency measured in the same process.",
        "",
    ]
    for name, rows in all_rows.items():
        entry = zoo.ZOO[name]
        metric_names = sorted({k for r in rows for k in r.metrics})
        task = tasks[name]
        lines += [
            f"## {name}",
            "",
            entry.description + ".",
            f"Calibration feeds: {len(task.calibration)}, evaluation feeds: {len(task.evaluation)}; "
            f"headline metric: `{task.primary}`.",
            "",
        ]
        header = [
            "config",
            *metric_names,
            "SQNR dB",
            "cosine",
            "latency ms",
            "speedup",
            "size MB",
            "compile s",
        ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            if r.error:
                lines.append(
                    f"| {r.config} | "
                    + " | ".join(["–"] * (len(header) - 2))
                    + f" | failed: {r.error} |"
                )
                continue
            cells = [
                r.config,
                *(_fmt(r.metrics.get(m)) for m in metric_names),
                _fmt(r.sqnr_db, 1),
                _fmt(r.cosine, 4),
                _fmt(r.latency_ms, 2),
                _fmt(r.speedup, 2) + "×",
                _fmt(r.size_mb, 2),
                _fmt(r.compile_seconds, 1) if r.config != "FP32" else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        integer_rows = [r for r in rows if "islands" in r.extra and not r.error]
        if integer_rows:
            lines += [
                "Integer-only rows: ORT output vs the numpy reference interpreter on the first "
                "evaluation feed (equality; ORT with its QDQ fusions off, which would rewrite "
                "float islands), float islands left, weight memory and the FPGA cost model's "
                "latency (256 8×8 MACs/cycle at 200 MHz, first-order).",
                "",
                "| config | bit-exact | float islands | weight Mbit | FPGA est. ms | reference s |",
                "|---|---|---|---|---|---|",
            ]
            for r in integer_rows:
                lines.append(
                    f"| {r.config} | {'yes' if r.extra.get('bit_exact') else 'NO'} | "
                    f"{', '.join(r.extra['islands']) or 'none'} | "
                    f"{_fmt(r.extra.get('weight_mbit'), 2)} | {_fmt(r.extra.get('fpga_ms'), 3)} | "
                    f"{_fmt(r.extra.get('reference_s'), 1)} |"
                )
            lines.append("")
    lines += [f"![accuracy vs speedup]({plot.name})", ""]
    lines += _mixed_section(all_rows)
    tvm = HERE / "TVM.md"  # written by benchmarks/tvm_bench.py (run it first)
    if tvm.exists():
        lines += [tvm.read_text(), ""]
    out.write_text("\n".join(lines))
    _plot(all_rows, tasks, plot)


def _held_out_text(held: dict) -> str:
    if not held:
        return "–"
    if "top1_agreement" in held:
        return (
            f"{held['samples']} samples, top-1 agreement with FP32 {held['top1_agreement']:.4f} "
            f"({held.get('flips', '?')} flipped, {held.get('flips_in_evaluation_half', '?')} of "
            f"them in the evaluation set's held-out half), accuracy {held['accuracy']:.4f} vs "
            f"FP32 {held['accuracy_fp32']:.4f}: accuracy drop "
            f"{held['accuracy_fp32'] - held['accuracy']:.2%} (budget {MIXED_DROP:.1%}: "
            f"{'met' if held['accuracy_fp32'] - held['accuracy'] <= MIXED_DROP else 'MISSED'}), "
            f"top-1 agreement drop {1 - held['top1_agreement']:.2%}"
        )
    return f"{held['samples']} samples, " + ", ".join(
        f"{k} {v:.4f}" for k, v in held["metric"].items()
    )


def _mixed_section(all_rows: dict[str, list[Row]]) -> list[str]:
    """Per-layer choices and the Pareto plot of each mixed-precision row."""
    lines = []
    for name, rows in all_rows.items():
        for r in rows:
            mp = r.extra.get("mixed")
            if not mp or r.error:
                continue
            lines += [
                f"## Mixed precision: {name}",
                "",
                f"`{r.config}`: metric `{mp['metric']}`, sensitivity "
                f"`{mp.get('sensitivity', 'measured')}` (drop vs FP32 measured on the "
                f"verification feeds during the search: {mp['verified_drop']:.4f}"
                + (
                    f", budget {mp['max_accuracy_drop']}: "
                    f"{'met' if mp['budget_met'] else 'MISSED'}). "
                    f"Held out: {_held_out_text(r.extra['held_out'])}. "
                    if "held_out" in r.extra
                    else f"; predicted weight bits {mp['predicted_cost'] / 1e6:.2f} Mbit). "
                    "Evaluation-set metrics: the table above. "
                )
                + f"Objective: {mp['objective']}; "
                f"search time {mp['search_seconds']:.1f} s "
                f"({len(mp['steps'])} verify/repair step(s)).",
                "",
                f"![Pareto front]({r.extra.get('pareto_png', f'pareto_{name}.png')})",
                "",
            ]
            int4 = any("int4w" in layer["candidates"] for layer in mp["layers"])
            unit = "ms" if mp["objective"] == "latency" else "Mbit"
            scale = 1.0 if unit == "ms" else 1e-6
            head = (
                f"| layer | op | choice | INT8 sensitivity (NSR dB) | FP32 {unit} | INT8 {unit} |"
            )
            head += " INT4-weight sensitivity (NSR dB) | INT4-weight " + unit + " |" if int4 else ""
            lines += [head, "|" + "---|" * (head.count("|") - 1)]
            for layer in mp["layers"]:
                c = layer["candidates"]
                q8 = c.get("int8")  # absent when INT8 cost no less than FP32 (not measured)
                row = (
                    f"| {layer['node']} | {layer['op_type']} | {layer['choice']} | "
                    + (f"{q8['nsr_db']:.1f}" if q8 else "–")
                    + f" | {c['fp32']['cost'] * scale:.3f} | "
                    + (f"{q8['cost'] * scale:.3f}" if q8 else "–")
                    + " |"
                )
                if int4:
                    w4 = c.get("int4w")
                    row += f" {w4['nsr_db']:.1f} | {w4['cost'] * scale:.3f} |" if w4 else " – | – |"
                lines.append(row)
            lines.append("")
    return lines


def _plot(all_rows: dict[str, list[Row]], tasks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(all_rows)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], all_rows.items(), strict=True):
        primary = tasks[name].primary
        for r in rows:
            if r.error or r.speedup is None:
                continue
            color = (
                "black"
                if r.config == "FP32"
                else "tab:red"
                if r.config.startswith("ORT")
                else "tab:blue"
            )
            ax.scatter(r.speedup, r.metrics.get(primary, np.nan), color=color, s=30)
            ax.annotate(
                r.config.replace("qcompile ", "qc ").split(" (")[0]
                + ("" if "(" not in r.config else " " + r.config.split("(")[1][:10]),
                (r.speedup, r.metrics.get(primary, np.nan)),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_title(name)
        ax.set_xlabel("speedup vs FP32 (×)")
        ax.set_ylabel(primary)
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs speedup (black FP32, red ORT quantizer, blue qcompile)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="comma-separated zoo names or 'all'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="one qcompile row per model")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--plot", default=str(HERE / "results.png"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    names = list(zoo.ZOO) if args.models == "all" else args.models.split(",")
    start = time.perf_counter()
    all_rows, tasks = {}, {}
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as tmp:
        for name in names:
            path = zoo.fetch(name)
            tasks[name] = datasets.task_data(name, path)
            print(f"== {name}", flush=True)
            all_rows[name] = evaluate(
                name, path, tasks[name], configs(args.quick), args.threads, args.runs, Path(tmp)
            )
            for r in all_rows[name]:
                print(
                    f"  {r.config:60s} {r.error or ''} {tasks[name].primary}={_fmt(r.metrics.get(tasks[name].primary))} "
                    f"sqnr={_fmt(r.sqnr_db, 1)} speedup={_fmt(r.speedup, 2)}",
                    flush=True,
                )
    write_results(
        all_rows, tasks, args, Path(args.out), Path(args.plot), time.perf_counter() - start
    )
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
