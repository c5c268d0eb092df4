"""Running a phase of passes: names, per-pass timing and optional verification.

onnx-ir's `PassManager` composes passes; we add what a compiler user asks for when a
pass goes wrong: which pass, how long each took, and (with `verify`) a check after each
pass that the model is still valid and computes the same FP32 outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from qcompile.errors import QCompileError, find_qcompile_error

logger = logging.getLogger(__name__)

# verify(before, after, pass_name) raises QCompileError when `after` is not equivalent.
Verifier = Callable[[ir.Model, ir.Model, str], None]


@dataclass(frozen=True)
class PassRecord:
    phase: str
    name: str
    seconds: float
    modified: bool
    skipped: bool = False  # disabled by the user


def pass_name(p: ir.passes.PassBase) -> str:
    return type(p).__name__


def run_phase(
    model: ir.Model,
    phase: str,
    passes: Sequence[ir.passes.PassBase],
    *,
    verify: Verifier | None = None,
    skip: frozenset[str] = frozenset(),
) -> tuple[ir.Model, list[PassRecord]]:
    """Run `passes` in order (except those named in `skip`); one record per pass."""
    records: list[PassRecord] = []
    for p in passes:
        name = pass_name(p)
        if name in skip:
            records.append(PassRecord(phase, name, 0.0, False, skipped=True))
            continue
        before = model.clone() if verify else None
        start = time.perf_counter()
        try:
            result = p(model)
        except Exception as exc:
            user_error = find_qcompile_error(exc)
            if user_error is not None:
                raise user_error from exc
            raise RuntimeError(f"pass {name} ({phase}) failed: {exc}") from exc
        seconds = time.perf_counter() - start
        model = result.model
        records.append(PassRecord(phase, name, seconds, bool(result.modified)))
        logger.debug("%s/%s: %.3fs modified=%s", phase, name, seconds, result.modified)
        if verify is not None and result.modified:
            assert before is not None
            try:
                verify(before, model, name)
            except QCompileError:
                raise
            except Exception as exc:
                raise RuntimeError(f"verification after pass {name} failed: {exc}") from exc
    return model, records
