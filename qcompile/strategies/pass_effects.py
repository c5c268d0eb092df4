"""`--pass-effects`: each accuracy pass's effect on output SQNR, the compile repeated
without it."""

from __future__ import annotations

from qcompile.driver.compile import CompileResult
from qcompile.driver.job import CompileJob, Workspace
from qcompile.strategies.auto_method import compile_single

ACCURACY_PASSES = ("CrossLayerEqualization", "SmoothQuant", "FuseForQuantization", "BiasCorrection")


def pass_effects(job: CompileJob, workspace: Workspace, result: CompileResult) -> list[dict]:
    ran = {p["name"] for p in result.report.passes if p["modified"] and not p["skipped"]}
    effects = []
    for name in ACCURACY_PASSES:
        if name not in ran:
            continue
        without = job.variant(
            disabled_passes=(*job.options.disabled_passes, name),
            pass_effects=False,
            bench_runs=0,
            progress=False,
        )
        sqnr_without = compile_single(without, workspace).report.min_output_sqnr_db
        effects.append(
            {
                "pass": name,
                "sqnr_db_without": sqnr_without,
                "sqnr_db_gain": result.report.min_output_sqnr_db - sqnr_without,
            }
        )
    return effects
