"""The compiler checks itself: FP32 rewrites against the input model, and the compiled
graph against ONNX's checker, naming the pass that broke either.

- After the rewrite and smoothing phases, the rewritten FP32 graph runs on a calibration
  feed next to the input model. Outputs must keep their names, shapes and dtypes and
  agree to float tolerance. When they do not, the phase is replayed pass by pass from its
  input, each pass checked the same way; a pass that breaks the model is left out (the
  report names it and says what it changed) and the rest of the phase runs without it.
- A compiled graph the checker rejects is an internal error that names the first pass
  after which the checker fails (the quantize and lower phases are replayed to find it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.data.feeds import Feed
from qcompile.numerics.qparams import sqnr_db
from qcompile.passes.manager import PassRecord, pass_name, run_phase

logger = logging.getLogger(__name__)

# Relative error (‖a − b‖ / ‖a‖) an FP32-preserving rewrite may introduce: reassociated
# sums, folded BatchNorm, rescaled channels. 1e-3 is 60 dB: rewrites that round
# differently stay well under it; a wrong shape, a dropped term or a swapped operand
# does not.
REL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Outputs:
    names: list[str]
    arrays: list[np.ndarray]


def run_outputs(model: ir.Model | onnx.ModelProto, feed: Feed) -> Outputs:
    """The model's outputs on `feed` (ONNX Runtime, basic optimizations)."""
    sess = ort_backend.make_session(model, opt_level=ort_backend.OptLevel.ORT_ENABLE_BASIC)
    names = [o.name for o in sess.get_outputs()]
    return Outputs(names, sess.run(None, dict(feed)))


def correct_declared_outputs(model: ir.Model, observed: Outputs) -> list[str]:
    """Declared output shapes never override what the model returns: an output whose
    declared rank or static dims disagree with a real run gets a shape of the observed
    rank (dims that agree kept, the others unknown). Returns a note per output changed."""
    notes = []
    by_name = {v.name: v for v in model.graph.outputs}
    for name, array in zip(observed.names, observed.arrays, strict=True):
        value, shape = by_name.get(name), np.shape(array)
        if value is None or value.shape is None:
            continue
        declared = list(value.shape)
        agrees = len(declared) == len(shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(declared, shape, strict=True)
        )
        if agrees:
            continue
        kept = [
            d if len(declared) == len(shape) and d == n else None
            for d, n in zip(declared, shape, strict=False)
        ]
        kept += [None] * (len(shape) - len(kept))
        value.shape = ir.Shape(kept)
        note = (
            f"output {name} is declared {[str(d) for d in declared]} but the model returns "
            f"shape {list(shape)}: the declared shape was not used"
        )
        logger.warning(note)
        notes.append(note)
    return notes


def recovered_agreement(quantized: ir.Model, recovered: Outputs, feed: Feed) -> str:
    """A note on how closely the FP32 model recovered from a quantized input computes what
    the input computed (output SQNR of the input against the recovered model)."""
    try:
        given = run_outputs(quantized, feed)
    except Exception as exc:  # noqa: BLE001 - the note says so
        return f"requantize: the quantized input does not run in ONNX Runtime ({exc})"
    db = outputs_sqnr_db(recovered.arrays, given.arrays)
    db = float("inf") if db is None else db
    return (
        f"requantize: the FP32 model recovered from the quantized input agrees with it at "
        f"{db:.1f} dB output SQNR on the first calibration feed (the input's own rounding)"
    )


def structure_difference(reference: Outputs, got: Outputs) -> str | None:
    """How `got`'s outputs differ from `reference`'s in names, shapes or dtypes."""
    if got.names != reference.names:
        return f"outputs {got.names} instead of {reference.names}"
    for name, a, b in zip(reference.names, reference.arrays, got.arrays, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {name} is {b.dtype}{list(b.shape)} instead of {a.dtype}{list(a.shape)}"
    return None


def difference(reference: Outputs, got: Outputs) -> str | None:
    """How `got` differs from `reference` beyond float tolerance (None: it does not)."""
    if (problem := structure_difference(reference, got)) is not None:
        return problem
    for name, a, b in zip(reference.names, reference.arrays, got.arrays, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                return f"output {name} changed"
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(a64)
        if not np.array_equal(finite, np.isfinite(b64)):
            return f"output {name} changed which values are finite"
        norm = float(np.linalg.norm(a64[finite]))
        err = float(np.linalg.norm(a64[finite] - b64[finite]))
        if err > REL_TOLERANCE * norm + 1e-30 and err > 1e-6:
            return f"output {name} changed by {err / max(norm, 1e-30):.2g} (relative)"
    return None


def outputs_sqnr_db(reference: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float | None:
    """Output SQNR over every float output of matching shape (None: no signal to compare)."""
    pairs = [
        (np.ravel(a), np.ravel(b))
        for a, b in zip(reference, got, strict=True)
        if np.asarray(a).dtype.kind == "f" and np.shape(a) == np.shape(b)
    ]
    if not pairs or not any(np.any(a) or np.any(b) for a, b in pairs):
        return None
    return sqnr_db(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))


def checked_phase(
    model: ir.Model,
    phase: str,
    passes: Sequence[ir.passes.PassBase],
    reference: Outputs,
    feed: Feed,
    *,
    skip: frozenset[str] = frozenset(),
    verify=None,
) -> tuple[ir.Model, list[PassRecord], list[str]]:
    """Run a phase of FP32-preserving passes; if the result no longer computes the input
    model's outputs, replay it pass by pass and leave out each pass that breaks them.
    Returns the model, the pass records and notes naming the passes left out."""
    before = model.clone()
    result, records = run_phase(model, phase, passes, verify=verify, skip=skip)
    problem = _problem(result, reference, feed)
    if problem is None:
        return result, records, []
    logger.warning("the %s phase changed FP32 results (%s): finding the pass", phase, problem)
    model, records, notes = before, [], []
    for p in passes:
        name = pass_name(p)
        if name in skip:
            records.append(PassRecord(phase, name, 0.0, False, skipped=True))
            continue
        keep = model.clone()
        model, one = run_phase(model, phase, [p])
        if one[0].modified and (problem := _problem(model, reference, feed)) is not None:
            note = f"pass {name} ({phase}) changed FP32 results ({problem}); it was left out"
            logger.warning(note)
            notes.append(note)
            model = keep
            records.append(PassRecord(phase, name, one[0].seconds, False, skipped=True))
            continue
        records += one
    if (problem := _problem(model, reference, feed)) is not None:
        raise RuntimeError(f"the {phase} phase changes FP32 results ({problem}), pass by pass too")
    return model, records, notes


def _problem(model: ir.Model, reference: Outputs, feed: Feed) -> str | None:
    try:
        got = run_outputs(model, feed)
    except Exception as exc:  # noqa: BLE001 - a graph we produced that ORT rejects
        return f"ONNX Runtime rejects it: {str(exc).splitlines()[0][:200]}"
    return difference(reference, got)


def checker_problem(model: ir.Model) -> str | None:
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    except Exception as exc:  # noqa: BLE001 - what the checker says
        return str(exc).splitlines()[0][:300]
    return None


def ort_problem(model: ir.Model) -> str | None:
    try:
        ort_backend.make_session(model)
    except Exception as exc:  # noqa: BLE001 - what ONNX Runtime says
        return str(exc).splitlines()[0][:300]
    return None


def blame(
    model: ir.Model,
    phases: Sequence[tuple[str, Sequence[ir.passes.PassBase]]],
    problem_of=checker_problem,
) -> str:
    """The first pass after which `problem_of` finds a problem (`model` is the graph
    before the phases; it is copied)."""
    model = model.clone()
    for phase, passes in phases:
        for p in passes:
            model, _ = run_phase(model, phase, [p])
            if (problem := problem_of(model)) is not None:
                return f"pass {pass_name(p)} ({phase}): {problem}"
    return "no single pass (each step alone passes the check)"
