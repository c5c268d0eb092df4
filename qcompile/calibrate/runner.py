"""Calibration as a stage (not a pass): run the FP32 model on data and observe tensors.

`calibrate` exposes the tensors to observe as extra graph outputs (temporarily, without
copying weights), runs the model one feed at a time through a runner the caller provides
(the ORT backend in practice; this layer knows no backend), and streams every tensor
into its observer. Only observer state is kept between feeds, so memory does not grow
with the number of batches. Every n-th feed is held out for the report.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile.calibrate.observers import Observer
from qcompile.clocks import bound
from qcompile.data.feeds import Feed
from qcompile.errors import QCompileError
from qcompile.ir.graph import values_by_name
from qcompile.numerics.qparams import QParams, QuantSpec

logger = logging.getLogger(__name__)

# runner_factory(model, output_names) -> run(feed) -> {name: array}
Runner = Callable[[Feed], Mapping[str, np.ndarray]]
RunnerFactory = Callable[[ir.Model, Sequence[str]], Runner]


@dataclass
class CalibrationStats:
    observers: dict[str, Observer]
    batches: int = 0
    run_seconds: float = 0.0  # inside model execution
    observe_seconds: float = 0.0  # inside observers
    total_seconds: float = 0.0
    holdout: list[Feed] = field(default_factory=list)
    observed: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict)
    holdout_is_calibration: bool = False
    cached: bool = False  # reused from an earlier variant of the same job (no run)
    cache_file: str | None = None  # read from this --cache-dir file

    def qparams(self, tensor: str, spec: QuantSpec) -> QParams:
        if tensor not in self.observers:
            raise QCompileError("tensor was not calibrated", tensor=tensor)
        return self.observers[tensor].qparams(spec)


@dataclass
class ObserverClock:
    """Wall time spent in observers over every calibration run of a compile (SmoothQuant's,
    the plan's, bias correction's), for the report's compile-time split."""

    seconds: float = 0.0


_CLOCK: contextvars.ContextVar[ObserverClock | None] = contextvars.ContextVar(
    "observer_clock", default=None
)


def observer_clock() -> contextlib.AbstractContextManager[ObserverClock]:
    return bound(_CLOCK, ObserverClock())


@contextlib.contextmanager
def extra_outputs(model: ir.Model, names: Sequence[str]) -> Iterator[list[str]]:
    """Temporarily expose the named values as graph outputs."""
    graph = model.graph
    existing = {v.name for v in graph.outputs}
    by_name = values_by_name(graph)
    added: list[ir.Value] = []
    for name in names:
        value = by_name.get(name)
        if value is None or name in existing or value in graph.inputs or value.is_initializer():
            continue
        graph.outputs.append(value)
        added.append(value)
    try:
        yield [v.name for v in added]
    finally:
        for value in added:
            graph.outputs.remove(value)


def split_holdout(feeds: Iterable[Feed], every: int) -> Iterator[tuple[bool, Feed]]:
    """Tag every `every`-th feed (1-based) as held out; a single feed is used for both."""
    for i, feed in enumerate(feeds):
        yield ((i + 1) % every == 0), feed


def calibrate(
    model: ir.Model,
    data: Iterable[Feed],
    tensors: Sequence[str],
    observer_for: Callable[[str], Observer],
    runner_factory: RunnerFactory,
    *,
    holdout_every: int = 5,
    max_batches: int | None = None,
    progress: bool = False,
    total: int | None = None,
    token_mask: str | None = None,
) -> CalibrationStats:
    """Observe `tensors` over `data`.

    token_mask names an input like BERT's attention_mask ([batch, seq], 1 = real token):
    tensors laid out [batch, seq, ...] are then observed on real tokens only. Padding
    positions never reach a real token's output, and with fixed-length padding they
    would dominate the statistics.
    """
    start = time.perf_counter()
    graph = model.graph
    observers = {t: observer_for(t) for t in tensors}
    stats = CalibrationStats(observers=observers)
    input_names = {v.name for v in graph.inputs}
    # Constants (e.g. an Add's constant operand) are observed once, without running.
    for name in tensors:
        init = graph.initializers.get(name)
        if init is not None and init.const_value is not None:
            observers[name].observe(init.const_value.numpy())
    run_names = [t for t in tensors if t not in graph.initializers and t not in input_names]
    output_names = [v.name for v in graph.outputs]
    with extra_outputs(model, run_names) as added:
        run = runner_factory(model, output_names + added)
    observed_inputs = [t for t in tensors if t in input_names]
    first_feed: Feed | None = None

    bar_total = total if max_batches is None else min(total or max_batches, max_batches)
    workers = min(8, os.cpu_count() or 1)
    with (
        _progress(progress, bar_total) as advance,
        concurrent.futures.ThreadPoolExecutor(workers) as pool,
    ):
        for held_out, feed in split_holdout(data, holdout_every):
            if first_feed is None:
                first_feed = feed
            if held_out:
                stats.holdout.append(feed)
                advance()
                continue
            if max_batches is not None and stats.batches >= max_batches:
                break
            t0 = time.perf_counter()
            try:
                outputs = run(feed)
            except QCompileError:
                raise
            except Exception as exc:
                raise QCompileError(
                    f"the FP32 model failed on calibration feed {stats.batches}: {exc}",
                    hint="check the calibration data's shapes and dtypes against the model inputs",
                ) from exc
            t1 = time.perf_counter()
            mask = _token_mask(feed, token_mask)
            # numpy releases the GIL in its kernels: observe tensors on all cores
            arrays = [_real_tokens(outputs[n], mask) for n in run_names]
            list(pool.map(_observe, [observers[n] for n in run_names], arrays))
            for name in run_names:
                stats.observed[name] = (outputs[name].dtype, outputs[name].shape)
            for name in observed_inputs:
                observers[name].observe(feed[name])
            observed = time.perf_counter() - t1
            stats.observe_seconds += observed
            if (clock := _CLOCK.get()) is not None:
                clock.seconds += observed
            stats.run_seconds += t1 - t0
            stats.batches += 1
            advance()
    if stats.batches == 0:
        raise QCompileError("the calibration set is empty", hint="give at least one feed")
    if not stats.holdout and first_feed is not None:
        # Fewer feeds than `holdout_every`: the report is measured on calibration data.
        logger.warning("too few calibration feeds to hold any out; the report reuses feed 0")
        stats.holdout.append(first_feed)
        stats.holdout_is_calibration = True
    stats.total_seconds = time.perf_counter() - start
    logger.info(
        "calibrated %d tensors on %d feeds in %.2fs (model %.2fs, observers %.2fs)",
        len(tensors),
        stats.batches,
        stats.total_seconds,
        stats.run_seconds,
        stats.observe_seconds,
    )
    return stats


def _observe(observer: Observer, array: np.ndarray) -> None:
    observer.observe(array)  # dispatches to the subclass, unlike Observer.observe


def _token_mask(feed: Feed, name: str | None) -> np.ndarray | None:
    if name is None or name not in feed:
        return None
    mask = np.asarray(feed[name])
    if mask.ndim != 2 or not mask.any():
        return None
    return mask.astype(bool)


def _real_tokens(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None or array.ndim < 2 or array.shape[:2] != mask.shape:
        return array
    return array[mask]


@contextlib.contextmanager
def _progress(enabled: bool, total: int | None) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("calibrate", total=total)
        yield lambda: bar.advance(task)
