"""`--calib-method auto`: one calibration run, read as each of AUTO_METHODS; the method
whose QDQ model has the best output SQNR on the calibration feeds is kept.

This is the strategy every other strategy compiles through (`compile_single`): with a
fixed method it is the driver's `compile_once`.
"""

from __future__ import annotations

import collections
import logging

import onnx
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.calibrate.observers import AUTO_METHODS
from qcompile.driver.compile import (
    CompileResult,
    Prepared,
    compile_once,
    finish,
    first_feeds,
    prepare,
)
from qcompile.driver.fanout import make_fanout, task_threads
from qcompile.driver.job import CompileJob, Workspace
from qcompile.driver.measure import accumulate, sqnr

logger = logging.getLogger(__name__)

# Calibration feeds `--calib-method auto` scores each method on.
AUTO_SCORE_FEEDS = 16


def compile_single(job: CompileJob, workspace: Workspace) -> CompileResult:
    """One compile; `auto` chooses the calibration method from the one calibration run."""
    if job.options.calib_method != "auto":
        return compile_once(job, workspace)
    prep = prepare(job, workspace)
    if isinstance(prep, CompileResult):
        return prep
    method, scores = choose_method(prep)
    return finish(prep, method, scores)


def choose_method(prep: Prepared) -> tuple[str, dict[str, float]]:
    """Quantize with each of AUTO_METHODS and keep the method whose QDQ model has the best
    output SQNR (the worst output's) over the first calibration feeds. Which method wins
    depends on the model (benchmarks/RESULTS.md has every method per zoo model).

    The feeds are the calibration data itself, held-out ones included: the few held-out
    feeds alone picked the method that was worse on the evaluation sets of two zoo
    models, and choosing one of three clipping rules barely fits the data it is scored
    on."""
    options = prep.options
    fanout = make_fanout(options.fanout, options.ray_address, options.threads)
    threads = task_threads(fanout, options.threads)
    feeds = first_feeds(prep.data, AUTO_SCORE_FEEDS)
    fp32 = ort_backend.make_session(prep.model, threads=threads)
    reference = [fp32.run(None, dict(f)) for f in feeds]
    serial = fanout.name == "serial"
    scores: dict[str, float] = {}
    later: dict[str, bytes] = {}  # fanned out: scored together once all are built
    for method in AUTO_METHODS:
        if (scores or later) and prep.workspace.out_of_time():
            logger.info("--time-budget spent: calibration methods not tried after %s", method)
            tried = ", ".join([*scores, *later])
            prep.notes.append(f"--time-budget: --calib-method auto compared {tried} only")
            break
        candidate = prep.quantized(prep.activation_qparams(method))
        if serial:
            scores[method] = score(feeds, reference, threads, candidate)
        else:
            later[method] = ir.serde.serialize_model(candidate).SerializeToString()
    if later:
        values = fanout.map(score, (feeds, reference, threads), [(m,) for m in later.values()])
        scores = dict(zip(later, values, strict=True))
    best = max(scores, key=lambda m: scores[m])  # ties: the earlier (mse first)
    logger.info(
        "calibration method %s (calibration-feed output SQNR: %s)",
        best,
        ", ".join(f"{m} {v:.1f} dB" for m, v in scores.items()),
    )
    return best, scores


def score(feeds, reference, threads: int | None, model) -> float:
    """The worst output's SQNR of `model` (ir, or serialized for a fanned-out task) over
    `feeds` against the FP32 `reference` outputs."""
    if isinstance(model, bytes):
        model = ir.from_proto(onnx.load_from_string(model))
    sess = ort_backend.make_session(model, threads=threads)
    sums: dict[int, list[float]] = collections.defaultdict(lambda: [0.0] * 5)
    for feed, ref in zip(feeds, reference, strict=True):
        for i, (a, b) in enumerate(zip(ref, sess.run(None, dict(feed)), strict=True)):
            accumulate(sums[i], a, b)
    return min(sqnr(s) for s in sums.values())
