"""The subcommands: compile, inspect, bench, batch, passes. Each returns the exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys

from qcompile.cli.flags import options_kwargs


def _options(args: argparse.Namespace, **extra):
    from qcompile.api import make_options

    return make_options(**options_kwargs(args), **extra)


def cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qcompile.api import build_tvm, export_qonnx
    from qcompile.api import compile as compile_model
    from qcompile.data.feeds import ImageSpec
    from qcompile.ir.io import check_output_path, write_text_atomic

    check_output_path(args.output, inputs=(args.model,))
    for extra_output in (args.report, args.qonnx):
        if extra_output:
            check_output_path(extra_output, inputs=(args.model, args.output))
    options = _options(args, progress=not args.quiet and sys.stderr.isatty())
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
        export_qonnx(result, args.qonnx, dict(options.input_shapes) or None)
    if args.backend == "tvm":
        out_dir = f"{args.output}.tvm"
        build_tvm(
            args.output,
            out_dir,
            target=args.tvm_target,
            input_shapes=dict(options.input_shapes) or None,
            tune_trials=args.tune_trials,
            tune_dir=args.tune_dir,
            threads=options.threads,
        )
        print(out_dir)
    print(args.output)
    return 0


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
        nodes = [
            dict(zip(("node", "op", "decision", "why"), d, strict=True)) for d in info.decisions
        ]
        print(
            json.dumps(
                {
                    "opset": info.opset,
                    "inputs": info.inputs,
                    "outputs": info.outputs,
                    "ops": info.op_counts,
                    "nodes": nodes,
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
        from qcompile.api import build_tvm
        from qcompile.backends import tvm as tvm_backend

        shapes = {k: v.shape for k, v in feed.items()}
        device = "cuda" if args.tvm_target == "cuda" else "cpu"
        latency = {}
        for path in paths:
            executable, names = build_tvm(
                path,
                target=args.tvm_target,
                input_shapes=shapes,
                tune_trials=args.tune_trials,
                tune_dir=args.tune_dir,
                threads=args.threads,
            )
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


def cmd_batch(args: argparse.Namespace) -> int:
    """Exit 0 when every task compiled or was refused for a reason in the user's model
    (both are rows), 1 when a task failed (crashed, timed out, worker lost)."""
    from qcompile.fleet import batch, print_summary

    result = batch(
        args.manifest,
        args.output,
        targets=args.targets.split(",") if args.targets else None,
        ray=args.ray is not None,
        ray_address=args.ray or None,
        time_limit_s=args.time_limit,
        bench_runs=args.bench_runs,
        bench_threads=args.threads,
    )
    if not args.quiet:
        print_summary(result)
    print(f"summary: {os.path.join(args.output, 'summary.md')}")
    return 1 if result.failed else 0


def cmd_passes(args: argparse.Namespace) -> int:
    from qcompile.options import CompileOptions
    from qcompile.passes.manager import pass_name
    from qcompile.quantize.quant_plan import QuantPlan
    from qcompile.targets import TARGETS, get_target

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


COMMANDS = {
    "compile": cmd_compile,
    "inspect": cmd_inspect,
    "bench": cmd_bench,
    "batch": cmd_batch,
    "passes": cmd_passes,
}
