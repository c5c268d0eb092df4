"""`--calib-method auto` also decides whether cross-layer equalization stays."""

from __future__ import annotations

from qcompile.driver.compile import CompileResult, check_output
from qcompile.driver.job import CompileJob, Workspace
from qcompile.driver.measure import bench_latency
from qcompile.ir.io import save_model
from qcompile.passes.manager import pass_name
from qcompile.strategies.auto_method import compile_single
from qcompile.targets import get_target

CLE = "CrossLayerEqualization"


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
    best = with_cle = compile_single(job.variant(bench_runs=0), workspace)
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
