"""The model corpus: models nobody tuned qcompile for, compiled for each target.

`python -m benchmarks.corpus` writes benchmarks/CORPUS.md: one row per model × target with
the outcome (ok / refused with its reason / bug), output SQNR against FP32, speedup and
compile seconds. Sources:

- every model in onnx's backend test data (`onnx/backend/test/data/{light,simple,
  pytorch-converted,pytorch-operator}`, shipped in the onnx wheel) that ONNX Runtime runs;
- control-flow models (If/Loop/Scan, outer-scope reads, branches ending in Identity) and
  pre-quantized models (QDQ, QOperator, dynamic) built here (benchmarks/corpus_models.py);
- transformers architectures at random init exported with both torch exporters at several
  opsets (benchmarks/corpus_torch.py; `python -m benchmarks.corpus_torch` exports them
  into the cache first, else they are left out).

A row is a bug when qcompile raised anything but a QCompileError, or when the compiled
model's outputs differ from FP32's in name, rank, shape or dtype on a real run.
`tests/test_corpus.py` runs a small subset with the same checks in CI.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
ROUNDS = 3  # latency: fresh session pairs per ratio (the median is reported)
BACKEND_SUITES = ("light", "simple", "pytorch-converted", "pytorch-operator")


@dataclass
class CorpusModel:
    name: str
    source: str
    load: Callable[[], onnx.ModelProto]
    feeds: Callable[[onnx.ModelProto], list[dict[str, np.ndarray]]]
    tags: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)  # compile options the row needs


@dataclass
class Row:
    model: str
    source: str
    target: str
    outcome: str  # ok | refused | bug | skipped
    reason: str = ""
    sqnr_db: float | None = None
    speedup: float | None = None
    guard: str = ""  # what the speed guard did: kept, N float, FP32, or not applied
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# -- feeds -----------------------------------------------------------------------------


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in shape.dim]


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def calibration_feeds(
    model: onnx.ModelProto, given: list[dict[str, np.ndarray]], count: int = 10, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """`count` feeds: the given ones, then copies with float inputs perturbed by 10% of
    their spread (or standard normal data when nothing is given)."""
    rng = np.random.default_rng(seed)
    feeds = list(given)
    base = given or [_random_feed(model, rng)]
    while len(feeds) < count:
        src = base[len(feeds) % len(base)]
        feed = {}
        for k, v in src.items():
            if v.dtype.kind == "f" and v.size:
                spread = float(np.std(v)) or 1.0
                v = (v + rng.standard_normal(v.shape) * 0.1 * spread).astype(v.dtype)
            feed[k] = v
        feeds.append(feed)
    return feeds


def _random_feed(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for v in _graph_inputs(model):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        shape = _dims(v)
        if dtype.kind == "f":
            feed[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[v.name] = rng.random(shape) > 0.5
        else:
            feed[v.name] = rng.integers(0, 4, shape).astype(dtype)
    return feed


def _test_data_feeds(folder: Path, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    names = [v.name for v in _graph_inputs(model)]
    feeds = []
    for data_set in sorted(folder.glob("test_data_set_*")):
        files = sorted(data_set.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        if len(files) != len(names):
            continue
        feed = {}
        for name, path in zip(names, files, strict=True):
            tensor = onnx.TensorProto()
            tensor.ParseFromString(path.read_bytes())
            feed[name] = numpy_helper.to_array(tensor)
        feeds.append(feed)
    return feeds


# -- sources ---------------------------------------------------------------------------


def backend_models() -> Iterator[CorpusModel]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    for suite in BACKEND_SUITES:
        for path in sorted(glob.glob(str(root / suite / "*.onnx"))) + sorted(
            glob.glob(str(root / suite / "*" / "model.onnx"))
        ):
            path = Path(path)
            name = path.stem if path.name != "model.onnx" else path.parent.name
            folder = path.parent if path.name == "model.onnx" else None

            def feeds(model, folder=folder):
                given = _test_data_feeds(folder, model) if folder is not None else []
                return calibration_feeds(model, given)

            yield CorpusModel(
                name, f"onnx/{suite}", lambda p=path: onnx.load(str(p)), feeds, (suite,)
            )


def all_models() -> list[CorpusModel]:
    from benchmarks import corpus_models, corpus_torch

    return [*backend_models(), *corpus_models.built_models(), *corpus_torch.exported_models()]


# -- one model -------------------------------------------------------------------------


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def sqnr(reference: list[np.ndarray], got: list[np.ndarray]) -> float | None:
    """Output SQNR over the float outputs (None for models whose outputs are all zero)."""
    from qcompile.driver.safety import outputs_sqnr_db

    return outputs_sqnr_db(reference, got)


@dataclass
class Reference:
    """The FP32 model and what it computes on the corpus feeds."""

    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    session: object
    names: list[str]
    outputs: list[list[np.ndarray]]


def reference(entry: CorpusModel) -> Reference | str:
    """The entry's FP32 run, or why ORT cannot run it (the row is then skipped)."""
    try:
        model = entry.load()
        feeds = entry.feeds(model)
        sess = _session(model)
        names = [o.name for o in sess.get_outputs()]
        return Reference(model, feeds, sess, names, [sess.run(None, f) for f in feeds])
    except Exception as exc:  # noqa: BLE001 - the corpus keeps models ORT runs
        return f"ONNX Runtime does not run it: {str(exc).splitlines()[0][:120]}"


# Corpus targets that are a target plus options: `cpu-int` is `--target cpu --integer-only`
TARGET_VARIANTS: dict[str, tuple[str, dict]] = {"cpu-int": ("cpu", {"integer_only": True})}


def target_options(target: str) -> tuple[str, dict]:
    """(qcompile target, extra options) of a corpus target name."""
    return TARGET_VARIANTS.get(target, (target, {}))


def run_model(entry: CorpusModel, target: str, bench_runs: int = 10) -> Row:
    """Compile in this process and check the result."""
    import qcompile
    from qcompile.errors import find_qcompile_error

    row = Row(entry.name, entry.source, target, "skipped")
    ref = reference(entry)
    if isinstance(ref, str):
        row.reason = ref
        return row
    start = time.perf_counter()
    try:
        # default flags, deployed on one thread: the speed guard times what the row times
        base, variant = target_options(target)
        result = qcompile.compile(
            ref.model,
            target=base,
            calibration=ref.feeds,
            progress=False,
            bench_runs=0,
            threads=1,
            **{**variant, **entry.options},
        )
    except Exception as exc:  # noqa: BLE001 - classified below
        row.seconds = time.perf_counter() - start
        user = find_qcompile_error(exc)
        if user is not None:
            row.outcome, row.reason = "refused", user.message.splitlines()[0][:200]
        else:
            row.outcome = "bug"
            row.reason = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
            logging.debug("%s", traceback.format_exc())
        return row
    row.seconds = time.perf_counter() - start
    row.guard = _guard(result.report.speed_guard)
    row.extra["quantized_ops"] = sum(result.report.quantized_ops.values())
    return check_compiled(row, ref, onnx_ir.to_proto(result.model), bench_runs)


def check_compiled(row: Row, ref: Reference, q_proto: onnx.ModelProto, bench_runs: int) -> Row:
    """Run the compiled model on the corpus feeds: same output structure as FP32 (else a
    bug), its SQNR, and its speed against FP32."""
    from qcompile.driver.safety import Outputs, structure_difference

    try:
        q_sess = _session(q_proto)
        got_names = [o.name for o in q_sess.get_outputs()]
        got = [q_sess.run(None, f) for f in ref.feeds]
    except Exception as exc:  # noqa: BLE001 - a model we produced that ORT rejects
        row.outcome, row.reason = "bug", f"ORT rejects the compiled model: {str(exc)[:200]}"
        return row
    for expected, out in zip(ref.outputs, got, strict=True):
        problem = structure_difference(Outputs(ref.names, expected), Outputs(got_names, out))
        if problem:
            row.outcome, row.reason = "bug", problem
            return row
    row.outcome = "ok"
    row.sqnr_db = min(
        (s for s in (sqnr(r, g) for r, g in zip(ref.outputs, got, strict=True)) if s is not None),
        default=None,
    )
    if bench_runs:
        from qcompile.backends.ort import bench

        # sub-millisecond models need many runs for a median inside a few percent
        t0 = time.perf_counter()
        ref.session.run(None, ref.feeds[0])
        once = max(time.perf_counter() - t0, 1e-5)
        runs = int(min(1000, max(bench_runs, 0.2 / once)))
        # the median of ROUNDS ratios, each from a fresh pair of sessions: one pair's
        # ratio moved by up to 6% on identical models (an FP32 fallback measured 0.94×)
        ratios = []
        for i in range(ROUNDS):
            pair = (ref.session, q_sess) if i == 0 else (_session(ref.model), _session(q_proto))
            lat = bench({"fp32": pair[0], "q": pair[1]}, ref.feeds[0], runs=runs, warmup=5)
            ratios.append(lat["fp32"] / lat["q"] if lat["q"] > 0 else math.nan)
        row.speedup = float(np.median(ratios))
    return row


def _guard(guard: dict | None) -> str:
    if not guard or not guard.get("applied"):
        return "–"
    decision = guard["decision"]
    if decision.startswith("FP32"):
        return "FP32"
    if "left float" in decision:
        return f"{len(guard['left_float'])} float"
    return "kept"


# -- the report ------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "–"
    if x == float("inf"):
        return "∞"
    return format(x, spec)


def write_markdown(rows: list[Row], path: Path, command: str, seconds: float) -> None:
    import onnxruntime

    import qcompile

    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r.target, {}).setdefault(r.outcome, 0)
        counts[r.target][r.outcome] += 1
    lines = [
        "# qcompile model corpus",
        "",
        f"Generated by `{command}` — do not edit by hand.",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; total {seconds:.0f} s",
        f"- qcompile {qcompile.__version__}, onnx {onnx.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; speedup: the median of {ROUNDS} ratios, each from a fresh "
        "pair of sessions timed interleaved (single-thread runs, at least --bench-runs and "
        "enough for 0.2 s), FP32 and compiled model in one process; compiled with default "
        "flags and `threads=1`",
        "- guard: what the speed guard did (`kept` the compiled model, left `N float` "
        "nodes float, returned the `FP32` model, or `–` not applied: fpga, refused)",
        "- outcome: `ok` (compiled, ORT runs it, outputs match FP32's names/shapes/dtypes), "
        "`refused` (a QCompileError: the reason), `bug` (anything else), `skipped` (ORT does "
        "not run the FP32 model)",
        "",
        "| target | " + " | ".join(("ok", "refused", "bug", "skipped")) + " |",
        "|---|---|---|---|---|",
    ]
    for target, c in counts.items():
        lines.append(
            f"| {target} | "
            + " | ".join(str(c.get(k, 0)) for k in ("ok", "refused", "bug", "skipped"))
            + " |"
        )
    lines += ["", "| target | ok rows timed | below 0.97× FP32 | kept | N float | FP32 |"]
    lines.append("|---|---|---|---|---|---|")
    for target in counts:
        timed = [r for r in rows if r.target == target and r.speedup is not None]
        slow = [r for r in timed if r.speedup < 0.97]
        kinds = [r.guard.split()[-1] if r.guard else "" for r in timed]
        lines.append(
            f"| {target} | {len(timed)} | {len(slow)} "
            f"({', '.join(r.model for r in slow) or 'none'}) | {kinds.count('kept')} | "
            f"{kinds.count('float')} | {kinds.count('FP32')} |"
        )
    lines += [
        "",
        "| model | source | target | outcome | SQNR dB | speedup | guard | compile s | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r.model} | {r.source} | {r.target} | {r.outcome} | {_fmt(r.sqnr_db, '.1f')} | "
            f"{_fmt(r.speedup, '.2f')} | {r.guard} | {r.seconds:.2f} | {reason} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus")
    parser.add_argument(
        "--targets",
        default="cpu",
        help="comma-separated targets; cpu-int: cpu with --integer-only",
    )
    parser.add_argument("--only", default=None, help="substring of model names to keep")
    parser.add_argument("--bench-runs", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "CORPUS.md"))
    parser.add_argument(
        "--batch",
        metavar="DIR",
        default=None,
        help="compile through `qcompile batch` (each task in its own process; inputs and "
        "outputs under DIR, a rerun skips what is done) instead of in this process",
    )
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("qcompile", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    start = time.perf_counter()
    rows = []
    entries = [e for e in all_models() if not args.only or args.only in e.name]
    targets = args.targets.split(",")
    if args.batch:
        from benchmarks.corpus_batch import run_through_batch

        use_ray = args.ray is not None
        rows = run_through_batch(
            entries, targets, args.bench_runs, Path(args.batch), use_ray, args.ray or None
        )
        for row in rows:
            _print(row)
    for entry in [] if args.batch else entries:
        for target in targets:
            row = run_model(entry, target, args.bench_runs)
            rows.append(row)
            _print(row)
    # the arguments it ran with (from the command line, argv is None here)
    command = "python -m benchmarks.corpus " + " ".join(sys.argv[1:] if argv is None else argv)
    write_markdown(rows, Path(args.out), command.strip(), time.perf_counter() - start)
    return 0


def _print(row: Row) -> None:
    print(
        f"{row.model:45s} {row.target:5s} {row.outcome:8s} {_fmt(row.sqnr_db, '.1f'):>6s} "
        f"{_fmt(row.speedup, '.2f'):>5s} {row.guard:8s} {row.reason[:80]}",
        flush=True,
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
