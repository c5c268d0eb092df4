"""The Python API: `qcompile.compile(model, target=..., calibration=..., **options)`, and
the QONNX and TVM outputs of a compiled model.

`compile` turns its arguments into a `CompileJob` and hands it to the strategy the
options ask for; each strategy runs the compile driver (qcompile.driver) one or more
times over one shared `Workspace`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import onnx

from qcompile.backends import ort as ort_backend
from qcompile.calibrate.runner import observer_clock
from qcompile.data.feeds import ImageSpec
from qcompile.driver.compile import CompileResult, check_output
from qcompile.driver.job import CalibrationInput, CompileJob, Workspace
from qcompile.errors import QCompileError
from qcompile.ir.io import ModelSource, save_model
from qcompile.options import CompileOptions, NodeMatcher, NodeOverride
from qcompile.strategies.equalization import (
    chooses_equalization,
    compile_choosing_equalization,
    compile_equalizing_hardswish,
)
from qcompile.strategies.mixed.precision import compile_mixed
from qcompile.strategies.pass_effects import pass_effects
from qcompile.strategies.speed_guard import speed_guard


def make_options(**kwargs: Any) -> CompileOptions:
    """CompileOptions from keyword arguments, accepting plain strings for patterns."""
    known = {f.name for f in fields(CompileOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise QCompileError(
            f"unknown option '{unknown[0]}'", hint=f"options are: {', '.join(sorted(known))}"
        )
    for key in ("exclude", "allow_float", "int4_weights"):
        if key in kwargs:
            if isinstance(kwargs[key], (str, NodeMatcher)):
                kwargs[key] = (kwargs[key],)
            kwargs[key] = tuple(
                m if isinstance(m, NodeMatcher) else NodeMatcher(m) for m in kwargs[key]
            )
    if "overrides" in kwargs:
        kwargs["overrides"] = tuple(
            o if isinstance(o, NodeOverride) else NodeOverride.parse(o) for o in kwargs["overrides"]
        )
    if "input_shapes" in kwargs and isinstance(kwargs["input_shapes"], Mapping):
        kwargs["input_shapes"] = tuple((k, tuple(v)) for k, v in kwargs["input_shapes"].items())
    return CompileOptions(**kwargs)


def compile(  # noqa: A001 - the public name users expect
    model: ModelSource,
    *,
    target: str = "cpu",
    calibration: CalibrationInput,
    image_spec: ImageSpec | None = None,
    options: CompileOptions | None = None,
    output: str | os.PathLike | None = None,
    verification: CalibrationInput | None = None,
    **option_kwargs: Any,
) -> CompileResult:
    """Quantize `model` for `target`; optionally write it to `output` (atomically).

    `verification`: data a mixed-precision search checks its budget on (same forms as
    `calibration`; default: the calibration data). Give data like what will be deployed:
    a classifier's argmax flips easily on ambiguous calibration images.
    """
    start = time.perf_counter()
    if options is None:
        options = make_options(**option_kwargs)
    elif option_kwargs:
        raise QCompileError("pass either options= or keyword options, not both")
    job = CompileJob(model, target, calibration, options, output, image_spec, verification)
    check_output(job)
    workspace = Workspace()
    if options.time_budget_s:
        workspace.deadline = start + options.time_budget_s
    # strategies compile without writing; the model the speed guard keeps is written once
    unwritten = dataclasses.replace(job, output=None)
    with ort_backend.clocked() as clock, observer_clock() as observers:
        if (
            options.max_accuracy_drop is not None
            or options.size_budget_mb
            or options.latency_budget_ms
        ):
            result = compile_mixed(unwritten, workspace)
        elif chooses_equalization(job):
            result = compile_choosing_equalization(unwritten, workspace)
        else:
            result = compile_equalizing_hardswish(unwritten, workspace)
        result = speed_guard(job, workspace, result)
        if options.pass_effects:
            result.report.pass_effects = pass_effects(job, workspace, result)
    if output is not None:
        save_model(result.model, output)
        result.report.output_model = str(output)
    report = result.report
    report.compile_seconds = time.perf_counter() - start
    report.ort_session_seconds = clock.session_seconds
    report.ort_run_seconds = clock.run_seconds
    report.observer_seconds = observers.seconds
    return result


def export_qonnx(
    result: CompileResult,
    path: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> onnx.ModelProto:
    """The compiled model as QONNX (Quant nodes with bit widths), written to `path` when
    given. Needs an integer-only compile (the fpga target, or integer_only=True)."""
    from qcompile.backends.qonnx import to_qonnx

    if result.qdq_model is None:
        raise QCompileError(
            "QONNX export needs an integer-only compile",
            hint="use --target fpga or --integer-only",
        )
    shapes = dict(input_shapes) if input_shapes else None
    proto = to_qonnx(result.qdq_model, shapes)  # type: ignore[arg-type]
    if path is not None:
        save_model(proto, path)
    return proto


def build_tvm(
    model: CompileResult | ModelSource,
    out_dir: str | os.PathLike | None = None,
    *,
    target: str = "llvm",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tune_trials: int = 0,
    tune_dir: str | os.PathLike | None = None,
    threads: int | None = None,
):
    """Build a (compiled) model with TVM Relax for `target` ("llvm" or "cuda"); with
    `out_dir`, export model.so and run.py there. Returns (executable, input names)."""
    from qcompile.backends import tvm as tvm_backend

    if not tvm_backend.available():
        raise QCompileError("the TVM backend needs apache-tvm", hint="pip install -e '.[tvm]'")
    source = model.model if isinstance(model, CompileResult) else model
    tvm_target = tvm_backend.host_target(threads) if target == "llvm" else tvm_backend.cuda_target()
    executable, names, _ = tvm_backend.compile_model(
        source,
        target=tvm_target,
        input_shapes=dict(input_shapes) if input_shapes else None,
        tune_trials=tune_trials,
        work_dir=tune_dir,
    )
    if out_dir is not None:
        tvm_backend.export(executable, Path(out_dir), names)
    return executable, names


__all__ = ["CompileResult", "build_tvm", "compile", "export_qonnx", "make_options"]
