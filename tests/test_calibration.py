"""Calibration stage: memory flat in the number of batches; time spent in the model."""

import tracemalloc

import builders
import numpy as np

from qcompile.backends.ort import runner_factory
from qcompile.calibrate.runner import calibrate
from qcompile.ir import load_model
from qcompile.options import CompileOptions
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.manager import run_phase
from qcompile.quantize.plan import build_plan
from qcompile.targets import cpu
from qcompile.targets.pipeline import Calibration


def _setup(method="entropy"):
    model, _ = run_phase(load_model(builders.transformer_block()), "rewrite", canonicalize())
    plan = build_plan(model, cpu.PROFILE, CompileOptions())
    return model, plan, Calibration(method, 99.99).observer_for(plan)


def _feeds(n):
    for i in range(n):  # a generator: the data itself is never all in memory
        yield {"input": builders.token_embeddings(4, seq=32, seed=i)}


def _peak(n, method):
    model, plan, observers = _setup(method)
    tracemalloc.start()
    calibrate(
        model,
        _feeds(n),
        plan.calibrated_tensors,
        observers,
        runner_factory(threads=1),
        holdout_every=10**9,
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_calibration_memory_is_flat_in_the_number_of_batches():
    for method in ("minmax", "entropy"):
        small, large = _peak(5, method), _peak(60, method)
        # 12x the batches; peak must not grow beyond noise (one batch's tensors + observers)
        assert large < small * 1.25 + 256 * 1024, (method, small, large)


def test_stats_record_batches_and_time_split():
    model, plan, observers = _setup("percentile")
    stats = calibrate(
        model,
        _feeds(10),
        plan.calibrated_tensors,
        observers,
        runner_factory(threads=1),
        holdout_every=5,
    )
    assert stats.batches == 8 and len(stats.holdout) == 2
    assert stats.run_seconds > 0 and stats.observe_seconds > 0
    assert set(stats.observers) == set(plan.calibrated_tensors)
    qp = stats.qparams(plan.calibrated_tensors[0], cpu.PROFILE.activation)
    assert np.isfinite(qp.scale)
