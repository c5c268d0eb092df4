"""Command line: `qcompile compile | inspect | bench | batch | passes`.

Exit codes: 0 done, 2 user error (a QCompileError, printed without traceback), 1 bug.
Option flags come from qcompile.cli.flags (one per CompileOptions field).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from qcompile.cli.commands import COMMANDS
from qcompile.cli.flags import add_flags
from qcompile.errors import find_qcompile_error
from qcompile.targets import TARGETS

logger = logging.getLogger("qcompile")


def _add_logging(p: argparse.ArgumentParser, quiet: bool) -> None:
    """-v/-q, accepted before or after the subcommand."""
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-vv for debug)",
    )
    if quiet:
        p.add_argument(
            "-q", "--quiet", action="store_true", default=False, help="no progress bar or tables"
        )


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=TARGETS, default="cpu", help="target profile (default: cpu)")


def _add_tvm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tvm-target", choices=("llvm", "cuda"), default="llvm")
    p.add_argument("--tune-trials", type=int, default=0, help="TVM MetaSchedule trials (0: none)")
    p.add_argument("--tune-dir", default=None, help="TVM tuning database directory (reused)")


def build_parser() -> argparse.ArgumentParser:
    from qcompile import __version__

    parser = argparse.ArgumentParser(prog="qcompile", description="ONNX quantization compiler")
    parser.add_argument("--version", action="version", version=f"qcompile {__version__}")
    _add_logging(parser, quiet=False)
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
    _add_target(c)
    c.add_argument(
        "--image-spec",
        metavar="SPEC",
        help="for image folders: size=HxW[,mean=a/b/c,std=a/b/c,scale=..,layout=NCHW|NHWC,color=RGB|BGR]",
    )
    c.add_argument("--report", metavar="JSON", help="write the report as JSON")
    c.add_argument(
        "--verify-data",
        metavar="DATA",
        help="mixed precision: data the budget is checked on (default: the calibration data)",
    )
    c.add_argument(
        "--qonnx",
        metavar="PATH",
        help="also write the model as QONNX (Quant nodes with bit widths; integer-only targets)",
    )
    c.add_argument(
        "--backend",
        choices=("ort", "tvm"),
        default="ort",
        help="tvm: also build the compiled model with TVM into OUT.tvm/ (model.so + run.py)",
    )
    _add_tvm_options(c)
    _add_logging(c, quiet=True)
    add_flags(c, "compile")

    i = sub.add_parser("inspect", help="show ops, shapes and what would be quantized and why not")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_target(i)
    _add_logging(i, quiet=False)
    add_flags(i, "model")

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
    _add_logging(b, quiet=False)

    f = sub.add_parser("batch", help="compile every model of a manifest or folder, per target")
    f.add_argument("manifest", help="YAML/JSON manifest, or a folder of NAME.onnx + NAME.npz")
    f.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    f.add_argument("--targets", default=None, help="comma-separated targets for every model")
    f.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the compiles as Ray tasks: a local Ray, or the cluster at ADDRESS",
    )
    f.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="a compile running longer fails (its row says so)")  # fmt: skip
    f.add_argument("--bench-runs", type=int, default=20, help="latency runs per model (0: none)")
    f.add_argument("--threads", type=int, default=None, help="threads for the latency step")
    _add_logging(f, quiet=True)

    p = sub.add_parser("passes", help="list the passes of each target's pipeline")
    _add_logging(p, quiet=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:
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
