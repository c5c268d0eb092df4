"""The speed guard: a compiled model never runs slower than the FP32 model it came from.

ONNX Runtime's quantized kernels do not pay everywhere: a depthwise convolution, a small
MatMul or a lone quantized Mul can cost more than its FP32 kernel once the QuantizeLinear
and DequantizeLinear around it run as kernels of their own. The guard measures the model
the compile produced against the FP32 model, in one process on the deployment's thread
count; when it is slower, it profiles both, charges each quantized node with its own
kernel time plus its share of the Q/DQ kernels ORT did not fuse, and leaves float the
nodes whose quantized cost exceeds their FP32 cost plus the Q/DQ that keeping them float
would add. Each round is a real compile measured end to end; the fastest variant wins,
and when no variant is faster than FP32 the FP32 model itself is returned, and the report
says so. Timing decides, so a rerun can decide differently; with `cache_dir` the
decisions are kept and a rerun is byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.backends.ort_profile import node_times_ms
from qcompile.calibrate.runner import extra_outputs
from qcompile.data.feeds import input_specs
from qcompile.driver.compile import CompileResult, first_feeds
from qcompile.driver.job import CompileJob, Workspace, graph_fingerprint
from qcompile.driver.report import CompileReport, OutputReport
from qcompile.errors import QCompileError
from qcompile.ir.io import serialized_size
from qcompile.options import NodeMatcher
from qcompile.quantize.quant_plan import QuantPlan
from qcompile.strategies.auto_method import compile_single
from qcompile.targets import get_target

logger = logging.getLogger(__name__)

MAX_ROUNDS = 3  # profile → leave float → recompile rounds after the first measurement
PROFILE_RUNS = 10
# A node is left float only when its quantized cost exceeds the float alternative by this
# much: profiler times of sub-0.01 ms kernels jitter, and a flapping decision costs a round.
MARGIN = 1.05
MIN_SAVING_MS = 0.002
# A quantized variant is kept when it beats FP32 by this factor: interleaved medians of
# identical models differ by up to ~3% here, and a variant inside that noise buys size
# and costs accuracy without a speed gain anyone can count on.
KEEP_SPEEDUP = 1.03
MAX_TIMED_RUNS = 2000
IMPROVES = 1.02  # a round's variant replaces the best one when this much faster
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FOLDED = frozenset({"Relu", "Clip"})  # the plan quantizes their output for the producer


@dataclass
class Variant:
    label: str
    left_float: tuple[str, ...]
    quantized_ms: float
    fp32_ms: float
    result: CompileResult | None  # None: the FP32 model itself

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.quantized_ms if self.quantized_ms > 0 else math.inf

    def record(self) -> dict[str, Any]:
        return {
            "variant": self.label,
            "left_float": len(self.left_float),
            "fp32_ms": round(self.fp32_ms, 4),
            "quantized_ms": round(self.quantized_ms, 4),
            "speedup": round(self.speedup, 3),
        }


@dataclass
class _Timer:
    """Interleaved median latency of a candidate against the FP32 model (one process, the
    deployment's threads and provider), enough runs for about half a second each."""

    fp32: ir.Model
    feed: Mapping[str, np.ndarray]
    threads: int
    providers: tuple[str, ...]
    _fp32_session: Any = None
    runs: int = 0

    def measure(self, model: ir.Model) -> tuple[float, float]:
        make = ort_backend.make_session
        if self._fp32_session is None:
            self._fp32_session = make(self.fp32, providers=self.providers, threads=self.threads)
        candidate = make(model, providers=self.providers, threads=self.threads)
        if not self.runs:
            self._fp32_session.run(None, dict(self.feed))  # the first run allocates
            t0 = time.perf_counter()
            for _ in range(3):
                self._fp32_session.run(None, dict(self.feed))
            once = max((time.perf_counter() - t0) / 3, 1e-5)
            # sub-millisecond graphs need thousands of runs for a median within ~1%
            self.runs = int(min(MAX_TIMED_RUNS, max(8, 0.5 / once)))
        lat = ort_backend.bench(
            {"fp32": self._fp32_session, "q": candidate}, self.feed, runs=self.runs, warmup=5
        )
        return lat["fp32"], lat["q"]


def not_applicable(job: CompileJob, result: CompileResult) -> str | None:
    """Why the guard cannot measure this compile here (None: it can)."""
    options = job.options
    if not options.speed_guard:
        return "off (--no-speed-guard)"
    if result.fp32_model is None or result.options is None:
        return "the input model was returned as it is"
    profile = get_target(job.target).pipeline(result.options).profile
    if profile.default_backend != "ort":
        return f"the {profile.name} target deploys on {profile.default_backend}, not ONNX Runtime"
    if result.report.integer_only:
        return (
            "integer-only graphs are for integer hardware and bit-exact checks, not for "
            "ONNX Runtime's speed"
        )
    provider = profile.execution_providers[0]
    if provider not in ort_backend.available_providers():
        return f"{provider} is not available here: there is nothing to measure the target on"
    if options.size_budget_mb:
        return "a size budget decides what is quantized"
    return None


def speed_guard(job: CompileJob, workspace: Workspace, result: CompileResult) -> CompileResult:
    """The fastest of: the compiled model, variants with slower-quantized nodes left
    float, and the FP32 model; the report's `speed_guard` says which and why."""
    reason = not_applicable(job, result)
    if reason is not None:
        result.report.speed_guard = {"applied": False, "reason": reason}
        return result
    assert result.options is not None and result.fp32_model is not None
    start = time.perf_counter()
    options = result.options
    profile = get_target(job.target).pipeline(options).profile
    threads = options.threads or os.cpu_count() or 1
    fp32_input = workspace.load(job.model)
    feed = (
        result.bench_feed
        or first_feeds(
            workspace.data(job.calibration, input_specs(fp32_input), options, job.image_spec), 1
        )[0]
    )
    timer = _Timer(fp32_input, feed, threads, tuple(profile.execution_providers))
    cache = _DecisionCache(options.cache_dir, result, threads, profile.execution_providers)

    def variant(left_float: tuple[str, ...], label: str) -> Variant:
        if not left_float:
            fp_ms, q_ms = timer.measure(result.model)
            return Variant(label, (), q_ms, fp_ms, result)
        compiled = _compile_without(job, workspace, result, left_float)
        if compiled is None:  # nothing left to quantize
            fp_ms, q_ms = timer.measure(fp32_input)
            return Variant(
                f"FP32 ({label}: nothing left to quantize)", left_float, q_ms, fp_ms, None
            )
        fp_ms, q_ms = timer.measure(compiled.model)
        return Variant(label, left_float, q_ms, fp_ms, compiled)

    decided = cache.read()
    tried: list[Variant] = []
    why: dict[str, dict[str, float]] = {}
    if decided is not None:
        left, fallback = tuple(decided["left_float"]), decided["fp32"]
        why = decided.get("why", {})
        chosen = (
            Variant("FP32 (cached decision)", left, math.nan, math.nan, None)
            if fallback
            else variant(left, "cached decision")
        )
        tried.append(chosen)
    else:
        current = best = variant((), "as compiled")
        tried.append(current)
        # Profile even a model faster than FP32: a region that runs slower quantized
        # (e.g. attention's activation×activation MatMuls) is speed left on the table.
        for i in range(MAX_ROUNDS):
            if current.result is None:
                break
            if workspace.out_of_time():
                result.report.notes.append("speed guard: stopped by --time-budget")
                break
            slower = slower_nodes(current.result, feed, threads)
            new = sorted(set(slower) - set(current.left_float))
            if not new:
                break
            why.update({n: slower[n] for n in new if n not in why})
            current = variant(tuple(sorted({*current.left_float, *new})), f"round {i + 1}")
            tried.append(current)
            improved = current.speedup > best.speedup * IMPROVES
            if improved:
                best = current
            elif best.speedup >= KEEP_SPEEDUP:
                break  # fast already, and leaving more float did not pay
        chosen = best
        if chosen.speedup < KEEP_SPEEDUP and result.plan.int4_nodes and result.plan.nodes:
            # INT4 weights were asked for (size): FP32 compute, weights still INT4
            tried.append(variant(tuple(sorted(result.plan.nodes)), "INT4 weights only"))
            chosen = max(tried, key=lambda v: v.speedup)
        if chosen.speedup < KEEP_SPEEDUP and not result.plan.int4_nodes:
            fp_ms, same_ms = timer.measure(fp32_input)
            chosen = Variant("FP32", tuple(), same_ms, fp_ms, None)
            tried.append(chosen)
        cache.write(chosen.left_float, chosen.result is None, why)
    out = chosen.result if chosen.result is not None else _fp32_result(result, fp32_input)
    _report(out.report, result.report, chosen, tried, why, cache.hit, time.perf_counter() - start)
    if options.bench_runs and not math.isnan(chosen.quantized_ms):
        out.report.latency_fp32_ms, out.report.latency_quantized_ms = (
            chosen.fp32_ms,
            chosen.quantized_ms,
        )
        out.report.bench_threads = threads
    return out


def slower_nodes(
    result: CompileResult, feed: Mapping[str, np.ndarray], threads: int
) -> dict[str, dict[str, float]]:
    """Quantized nodes that cost more than FP32 would, with the measured milliseconds.

    A node's quantized cost is its kernel in the quantized model's profile plus a share
    of every QuantizeLinear/DequantizeLinear kernel ORT left standing on a tensor it reads
    or writes (shared equally among the quantized nodes on that tensor). Its float cost
    is its FP32 kernel plus the Q/DQ that leaving it float adds where it meets quantized
    neighbours, at the per-element rate the profile's Q/DQ kernels ran at."""
    assert result.fp32_model is not None
    fp32, q_model = result.fp32_model, result.model
    f_times = node_times_ms(fp32, feed, threads=threads, runs=PROFILE_RUNS)
    q_times = node_times_ms(q_model, feed, threads=threads, runs=PROFILE_RUNS)
    return charge(fp32, q_model, set(result.plan.nodes), f_times, q_times, _value_sizes(fp32, feed))


def charge(
    fp32: ir.Model,
    q_model: ir.Model,
    quantized: set[str],
    f_times: Mapping[str, float],
    q_times: Mapping[str, float],
    sizes: Mapping[str, int],
) -> dict[str, dict[str, float]]:
    """`slower_nodes` on given profiles: kernel ms per node name of each model, and the
    elements of each activation."""
    producer = {v.name: n.name for n in fp32.graph for v in n.outputs}
    consumers: dict[str, list[str]] = {}
    for n in fp32.graph:
        for v in n.inputs:
            if v is not None and v.const_value is None and v.name:
                consumers.setdefault(v.name, []).append(n.name)

    q_nodes = {n.name: n for n in q_model.graph}
    q_cost = {n: q_times.get(n, 0.0) for n in quantized}
    rates = []
    for name, ms in q_times.items():
        node = q_nodes.get(name)
        if node is None or node.op_type not in _QDQ or node.name in quantized:
            continue
        tensor = _quantized_tensor(node)
        if tensor is not None:
            if sizes.get(tensor):
                rates.append(ms / sizes[tensor])
            near = [producer.get(tensor), *consumers.get(tensor, ())]
        else:  # a constant's DequantizeLinear (weights): its readers pay it
            near = [c.name for c in node.outputs[0].consumers()]
        sharing = sorted({n for n in near if n is not None and n in quantized})
        for n in sharing:
            q_cost[n] += ms / len(sharing)
    rate = float(np.median(rates)) if rates else 1e-6  # ms per element

    fp32_nodes = {n.name: n for n in fp32.graph}
    slower = {}
    for name in sorted(quantized):
        node = fp32_nodes.get(name)
        if node is None:
            continue
        boundary = 0.0
        for v in node.inputs:
            if v is not None and v.const_value is None and _meets(v, quantized, upstream=True):
                boundary += rate * sizes.get(v.name, 0)
        for v in node.outputs:
            if _meets(v, quantized, upstream=False):
                boundary += rate * sizes.get(v.name, 0)
        float_cost = f_times.get(name, 0.0) + boundary
        if q_cost[name] > MARGIN * float_cost + MIN_SAVING_MS:
            slower[name] = {
                "quantized_ms": round(q_cost[name], 4),
                "fp32_ms": round(f_times.get(name, 0.0), 4),
                "boundary_ms": round(boundary, 4),
            }
    return slower


def _meets(value: ir.Value, quantized: set[str], *, upstream: bool, depth: int = 3) -> bool:
    """Does this edge touch a quantized node, looking through the Relu/Clip the plan folds
    into a producer's output quantizer? Then leaving its float end float adds a Q or DQ."""
    if depth == 0:
        return False
    if upstream:
        p = value.producer()
        if p is None:
            return False
        if p.name in quantized:
            return True
        return p.op_type in _FOLDED and any(
            _meets(v, quantized, upstream=True, depth=depth - 1) for v in p.inputs[:1] if v
        )
    for c in value.consumers():
        if c.name in quantized:
            return True
        if c.op_type in _FOLDED and any(
            _meets(v, quantized, upstream=False, depth=depth - 1) for v in c.outputs
        ):
            return True
    return False


def _quantized_tensor(node: ir.Node) -> str | None:
    """The float tensor a Q/DQ kernel serves: Q's input, or the input of the Q a DQ reads."""
    source = node.inputs[0]
    if source is None:
        return None
    if node.op_type == "QuantizeLinear":
        return source.name
    q = source.producer()
    if q is not None and q.op_type == "QuantizeLinear" and q.inputs[0] is not None:
        return q.inputs[0].name
    return None


def _value_sizes(model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Elements of every activation on this feed."""
    names = sorted({v.name for n in model.graph for v in n.outputs if v.name})
    with extra_outputs(model, names) as added:
        sess = ort_backend.make_session(model)
        values = sess.run(added, dict(feed)) if added else []
    sizes = {n: int(np.size(a)) for n, a in zip(added, values, strict=True)}
    sizes.update({k: int(np.size(v)) for k, v in feed.items()})
    return sizes


def _compile_without(
    job: CompileJob, workspace: Workspace, result: CompileResult, left_float: tuple[str, ...]
) -> CompileResult | None:
    """The job as `result` was compiled, with these nodes excluded (None: no node left
    to quantize)."""
    assert result.options is not None
    options = result.options
    variant = dataclasses.replace(
        job,
        output=None,
        options=dataclasses.replace(
            options,
            exclude=(*options.exclude, *(NodeMatcher(n) for n in left_float)),
            calib_method=result.report.calib_method or options.calib_method,
            max_accuracy_drop=None,
            size_budget_mb=None,
            latency_budget_ms=None,
            bench_runs=0,
            progress=False,
            speed_guard=False,
        ),
    )
    try:
        return compile_single(variant, workspace)
    except QCompileError as exc:
        logger.info("speed guard: variant without %d nodes: %s", len(left_float), exc.message)
        return None


def _fp32_result(base: CompileResult, fp32: ir.Model) -> CompileResult:
    """The FP32 model as the compile's result: nothing quantized, outputs exact."""
    report = dataclasses.replace(
        base.report,
        quantized_ops={},
        removed_activations=[],
        ort_ops={},
        tensors=[],
        outputs=[OutputReport(o.name, math.inf, 1.0) for o in base.report.outputs],
        size_quantized_bytes=serialized_size(fp32),
        notes=_without_slower_warning(base.report.notes),
        mixed_precision=None,
    )
    return CompileResult(fp32, report, QuantPlan(), fp32_model=base.fp32_model)


def _without_slower_warning(notes: list[str]) -> list[str]:
    """The measurement's "SLOWER than FP32" warning is the guard's to answer: it drops the
    warning and says what it did instead."""
    return [n for n in notes if "SLOWER than FP32" not in n]


def _report(
    report: CompileReport,
    base: CompileReport,
    chosen: Variant,
    tried: list[Variant],
    why: Mapping[str, Mapping[str, float]],
    cache_hit: bool,
    seconds: float,
) -> None:
    left = chosen.left_float
    if chosen.result is None:
        what = (
            f"FP32 model returned: no quantized variant ran {KEEP_SPEEDUP - 1:.0%} faster "
            "than FP32 here"
        )
    elif chosen.speedup < KEEP_SPEEDUP:
        what = (
            f"no variant ran faster than FP32 here; the fastest keeps the INT4 weights asked "
            f"for ({chosen.speedup:.2f}× FP32, {len(left)} node(s) left float)"
        )
    elif left:
        what = f"{len(left)} quantized node(s) left float: they ran slower quantized"
    else:
        what = "kept as compiled"
    notes = report.notes
    if chosen.result is not None and left:  # a variant of the strategy's choice
        report.mixed_precision = base.mixed_precision
        report.calib_method_scores = base.calib_method_scores
        notes = [*base.notes, *(n for n in notes if n not in base.notes)]
    report.notes = _without_slower_warning(notes)
    if chosen.result is None or left:
        best = max(
            (v for v in tried if v.result is not None), key=lambda v: v.speedup, default=None
        )
        if best is not None:
            what += f" (best quantized variant {best.speedup:.2f}× FP32)"
        report.notes.append(f"speed guard: {what}; --no-speed-guard keeps every quantized op")
    report.speed_guard = {
        "applied": True,
        "decision": what,
        "cache_hit": cache_hit,
        "seconds": round(seconds, 3),
        "variants": [v.record() for v in tried if not math.isnan(v.quantized_ms)],
        "left_float": [{"node": n, **why.get(n, {})} for n in left],
        "quantized_ops_before": dict(base.quantized_ops),
    }


class _DecisionCache:
    """The guard's decision for one compiled graph on one machine, thread count and
    provider: a rerun with the same `cache_dir` reads it and compiles the same model."""

    def __init__(self, cache_dir: str | None, result: CompileResult, threads: int, providers):
        self.hit = False
        self.path: Path | None = None
        if cache_dir:
            import onnxruntime

            key = json.dumps(
                [
                    graph_fingerprint(result.model),
                    threads,
                    list(providers),
                    platform.machine(),
                    platform.processor(),
                    os.cpu_count(),
                    onnxruntime.__version__,
                ]
            )
            digest = hashlib.sha256(key.encode()).hexdigest()[:32]
            self.path = Path(cache_dir) / "speed_guard" / f"{digest}.json"

    def read(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            decided = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        self.hit = True
        return decided

    def write(self, left_float: tuple[str, ...], fp32: bool, why: Mapping) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        payload = {"left_float": list(left_float), "fp32": fp32, "why": dict(why)}
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
