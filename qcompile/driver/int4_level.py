"""INT4 weight-only MatMuls as a speed option: MatMulNBits' `accuracy_level` by measurement.

Level 0 dequantizes the 4-bit weights and multiplies in FP32; level 4 also quantizes the
activations to int8 per block and uses integer dot products, faster where the CPU has
them, at some accuracy. Which pays depends on the CPU and the shapes, so both are timed
on the held-out feed against FP32 (interleaved medians) and their output SQNR against
FP32 measured; level 4 is kept when it is faster and costs at most MAX_SQNR_LOSS_DB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.driver.safety import outputs_sqnr_db
from qcompile.options import CompileOptions
from qcompile.quantize.weight_only import set_accuracy_level

logger = logging.getLogger(__name__)

MAX_SQNR_LOSS_DB = 1.0  # output SQNR level 4 may give up for its speed
RUNS = 20


def choose_int4_level(
    model: ir.Model,
    fp32_model: ir.Model,
    feed: Mapping[str, np.ndarray] | None,
    options: CompileOptions,
) -> dict[str, Any] | None:
    """Set the accuracy_level of `model`'s MatMulNBits nodes (in place): as asked, or by
    measurement on `feed`; returns what the report's `int4` says (None: no such node)."""
    if not any(n.op_type == "MatMulNBits" for n in model.graph):
        return None
    fixed = options.int4_accuracy_level
    if fixed is not None or feed is None:
        level = fixed or 0
        set_accuracy_level(model, level)
        return {
            "accuracy_level": level,
            "chosen_by": "--int4-accuracy-level" if fixed else "default",
        }
    threads = options.threads or os.cpu_count() or 1
    feed = dict(feed)
    make = ort_backend.make_session
    fp32 = make(fp32_model, threads=threads)
    reference = fp32.run(None, feed)
    sessions: dict[str, Any] = {"fp32": fp32}
    measured: dict[int, dict[str, Any]] = {}
    for level in (0, 4):
        set_accuracy_level(model, level)
        sess = make(model, threads=threads)
        sessions[f"level{level}"] = sess
        measured[level] = {"sqnr_db": outputs_sqnr_db(reference, sess.run(None, feed))}
    times = ort_backend.bench(sessions, feed, runs=RUNS, warmup=3)
    for level in (0, 4):
        measured[level]["ms"] = times[f"level{level}"]
    fast = measured[4]["ms"] < measured[0]["ms"]
    sqnr0, sqnr4 = measured[0]["sqnr_db"], measured[4]["sqnr_db"]
    close = sqnr0 is None or sqnr4 is None or sqnr4 >= sqnr0 - MAX_SQNR_LOSS_DB
    chosen = 4 if fast and close else 0
    set_accuracy_level(model, chosen)
    logger.info("MatMulNBits accuracy_level %d (%s)", chosen, measured)
    return {
        "accuracy_level": chosen,
        "chosen_by": "measurement",
        "fp32_ms": times["fp32"],
        "levels": {str(k): v for k, v in measured.items()},
    }
