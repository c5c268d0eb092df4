"""The Python API: `qcompile.compile(model, target=..., calibration=..., **options)`.

This is the driver every entry point shares. It reads top to bottom as the data flows:
import → rewrite → plan → calibrate → quantize → lower → check → measure.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.errors import QCompileError
from qcompile.ir.io import ModelSource, check_output_path, load_model, save_model, serialized_size
from qcompile.ir.shapes import infer_shapes, pin_input_shapes, record_observed_shapes
from qcompile.options import CompileOptions, NodeMatcher, NodeOverride
from qcompile.passes.manager import pass_name, run_phase
from qcompile.passes.prequantized import DequantizeQDQ, quantized_ops
from qcompile.passes.smoothing import ChannelObserver, find_smooth_groups
from qcompile.quantize import mixed
from qcompile.quantize.bias_correction import ChannelMeanObserver, correction_inputs
from qcompile.quantize.calibration import (
    CalibrationStats,
    calibrate,
    extra_outputs,
    observer_clock,
)
from qcompile.quantize.data import Feed, ImageSpec, input_specs, open_calibration, read_labels
from qcompile.quantize.integer import LowerToIntegerOnly
from qcompile.quantize.observers import AUTO_METHODS, HistogramObserver, read_as
from qcompile.quantize.plan import QuantPlan, build_plan, nodes_touching
from qcompile.quantize.qdq import InsertQDQ, effective_qparams
from qcompile.quantize.qparams import QParams, fake_quantize
from qcompile.quantize.weight_only import (
    Int4Spec,
    Int4WeightOnly,
    int4_eligible,
    quantize_int4,
)
from qcompile.report import CompileReport, OutputReport, TensorReport
from qcompile.targets import get_target
from qcompile.targets.fpga_cost import layer_costs

logger = logging.getLogger(__name__)

CalibrationInput = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


@dataclass
class CompileResult:
    model: ir.Model
    report: CompileReport
    plan: QuantPlan
    # the QDQ graph before integer-only lowering (None when the model was not lowered)
    qdq_model: ir.Model | None = None
    # the rewritten FP32 graph the plan refers to, and the activation parameters used
    fp32_model: ir.Model | None = None
    qparams: dict[str, QParams] = field(default_factory=dict)
    bench_feed: Feed | None = None  # the held-out feed latency is measured on


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
    with ort_backend.clocked() as clock, observer_clock() as observers:
        if (
            options.max_accuracy_drop is not None
            or options.size_budget_mb
            or options.latency_budget_ms
        ):
            result = _compile_mixed(
                model, target, calibration, image_spec, options, output, verification
            )
        elif _chooses_equalization(target, options):
            result = _compile_choosing_equalization(
                model, target, calibration, image_spec, options, output
            )
        else:
            result = _compile(model, target, calibration, image_spec, options, output)
        if options.pass_effects:
            result.report.pass_effects = _pass_effects(
                model, target, calibration, image_spec, options, result
            )
    report = result.report
    report.compile_seconds = time.perf_counter() - start
    report.ort_session_seconds = clock.session_seconds
    report.ort_run_seconds = clock.run_seconds
    report.observer_seconds = observers.seconds
    return result


def _compile(
    model: ModelSource,
    target: str,
    calibration: CalibrationInput,
    image_spec: ImageSpec | None,
    options: CompileOptions,
    output: str | os.PathLike | None,
) -> CompileResult:
    input_path = _check_output(model, output)
    target_module = get_target(target)
    pipe = target_module.pipeline(options)
    profile = pipe.profile
    _check_bit_widths(profile, options)
    if options.int4_weights and (profile.name == "fpga" or options.integer_only):
        raise QCompileError(
            "INT4 weight-only MatMuls keep FP32 activations: they are for the cpu and gpu "
            "targets, not integer-only graphs",
            hint="drop --int4-weights, or use --weight-bits 4 on the fpga target",
        )

    # Import and canonicalize.
    graph_model = load_model(model)
    prequantized = quantized_ops(graph_model)
    if prequantized:
        listed = ", ".join(f"{k}×{v}" for k, v in prequantized.items())
        if options.already_quantized == "error":
            raise QCompileError(
                f"the model is already quantized ({listed}); quantizing it again would round twice",
                hint="--already-quantized keep returns it unchanged; --already-quantized "
                "requantize dequantizes its QDQ pairs and compiles it afresh",
            )
        if options.already_quantized == "keep":
            return _kept_as_is(graph_model, profile, input_path, output, listed)
        graph_model, _ = run_phase(graph_model, "import", [DequantizeQDQ()])
        logger.warning("dequantized an already quantized model (%s) to compile it again", listed)
    if options.input_shapes:
        pin_input_shapes(graph_model, dict(options.input_shapes))
    infer_shapes(graph_model)
    specs = input_specs(graph_model)
    data = open_calibration(
        calibration,
        specs,
        batch_size=options.calib_batch_size,
        image_spec=image_spec,
        seed=options.seed,
    )
    verify = None
    if options.verify_passes:
        verify = ort_backend.equivalence_verifier(_first_feeds(data, 2))
    skip = _disabled_passes(pipe, options)
    graph_model, records = run_phase(graph_model, "rewrite", pipe.rewrite, verify=verify, skip=skip)
    infer_shapes(graph_model)

    # Smooth: migrate activation outliers into weights (needs its own statistics).
    smooth_records = []
    token_mask = _token_mask_input(specs, options.token_mask)

    def observe(
        model: ir.Model, tensors: list[str], observer_for, progress: bool = False
    ) -> CalibrationStats:
        """One run over the calibration data: the same feeds, batch limit, hold-out and
        token mask for SmoothQuant's, the plan's and bias correction's statistics."""
        return calibrate(
            model,
            data,
            tensors,
            observer_for,
            ort_backend.runner_factory(threads=options.threads),
            holdout_every=options.holdout_every,
            max_batches=options.max_calib_batches,
            progress=progress,
            total=data.count,
            token_mask=token_mask,
        )

    if pipe.smooth is not None and options.smoothquant and "SmoothQuant" not in skip:
        groups = find_smooth_groups(graph_model, explicit=options.smooth_explicit)
        if groups:
            channel_stats = observe(graph_model, [g.activation for g in groups], ChannelObserver)
            graph_model, smooth_records = run_phase(
                graph_model, "smooth", pipe.smooth(groups, channel_stats.observers), verify=verify
            )
            infer_shapes(graph_model)

    # Plan and calibrate.
    plan = build_plan(graph_model, profile, options)
    if options.int4_weights and not plan.int4_nodes:
        patterns = ", ".join(m.pattern for m in options.int4_weights)
        raise QCompileError(
            f"--int4-weights {patterns} matches no MatMul with a constant 2-D weight",
            hint="INT4 weights apply to MatMul (our fusions turn 2-D MatMul + Add into Gemm, "
            "which stays INT8); `qcompile inspect` lists the nodes",
        )
    if not plan.nodes and not plan.int4_nodes:
        raise QCompileError(
            "nothing in this model can be quantized for target " + profile.name,
            hint="run `qcompile inspect` to see each node's reason",
        )

    stats = observe(
        graph_model, plan.calibrated_tensors, pipe.calibrate.observer_for(plan), options.progress
    )
    record_observed_shapes(graph_model, stats.observed)
    unbounded = {t for t, obs in stats.observers.items() if obs.unbounded}
    if unbounded:
        # e.g. attention masks filled with -inf/finfo.min: keep their nodes FP32.
        plan = _demote(graph_model, plan, unbounded, profile, options)
        missing = [t for t in plan.calibrated_tensors if t not in stats.observers]
        if missing:  # demotion can expose tensors the first plan read through others
            extra = observe(graph_model, missing, pipe.calibrate.observer_for(plan))
            stats.observers.update(extra.observers)
            stats.observed.update(extra.observed)
            stats.run_seconds += extra.run_seconds
            stats.total_seconds += extra.total_seconds
    method = options.calib_method
    method_scores: dict[str, float] = {}
    if method == "auto":
        feeds = _first_feeds(data, AUTO_SCORE_FEEDS)
        method, method_scores = _choose_method(graph_model, plan, stats, feeds, pipe, options, skip)
    qparams = _activation_qparams(plan, stats, profile, method, options.percentile)
    # clone(), not a protobuf round trip: external-data tensors keep their base directory
    fp32_model = graph_model.clone()

    # Bias correction (asked for): needs the FP32 reference taken above, and its own run.
    bias_records = []
    if options.bias_correction and pipe.correct_bias is not None and "BiasCorrection" not in skip:
        axes = correction_inputs(graph_model, plan)
        if axes:
            mean_stats = observe(graph_model, list(axes), lambda t: ChannelMeanObserver(t, axes[t]))
            means = {t: o.mean for t, o in mean_stats.observers.items() if o.mean is not None}
            graph_model, bias_records = run_phase(
                graph_model, "quantize", pipe.correct_bias(plan, means), skip=skip
            )

    # Quantize and lower.
    quantize_passes = pipe.quantize(plan, qparams)
    graph_model, q_records = run_phase(graph_model, "quantize", quantize_passes, skip=skip)
    # Lower; the QDQ graph is kept when integer-only lowering follows (QONNX exports it).
    cut = next((i for i, p in enumerate(pipe.lower) if isinstance(p, LowerToIntegerOnly)), None)
    lowering = pipe.lower[cut] if cut is not None else None
    qdq_model = None
    graph_model, l_records = run_phase(graph_model, "lower", pipe.lower[:cut], skip=skip)
    if lowering is not None and pass_name(lowering) not in skip:
        qdq_model = graph_model.clone()
        graph_model, more = run_phase(graph_model, "lower", pipe.lower[cut:], skip=skip)
        l_records += more
    else:
        lowering = None
    _check_islands(lowering, options)
    proto = ir.to_proto(graph_model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise RuntimeError(
            f"the compiled model failed onnx.checker (a qcompile bug): {exc}"
        ) from exc

    op_types = {node.name: node.op_type for node in fp32_model.graph}
    insert = next((p for p in quantize_passes if isinstance(p, InsertQDQ)), None)
    report = CompileReport(
        target=profile.name,
        input_model=input_path,
        calib_method=method,
        calib_method_scores=method_scores,
        calib_batches=stats.batches,
        holdout_batches=len(stats.holdout),
        holdout_is_calibration=stats.holdout_is_calibration,
        calib_seconds=stats.total_seconds,
        calib_model_seconds=stats.run_seconds,
        passes=[
            {
                "phase": r.phase,
                "name": r.name,
                "seconds": r.seconds,
                "modified": r.modified,
                "skipped": r.skipped,
            }
            for r in (*records, *smooth_records, *bias_records, *q_records, *l_records)
        ],
        quantized_ops=dict(collections.Counter(op_types[n] for n in plan.nodes)),
        skipped_nodes=dict(plan.skipped),
        removed_activations=list(insert.removed_activations) if insert else [],
        size_fp32_bytes=serialized_size(fp32_model),
        size_quantized_bytes=proto.ByteSize(),
        notes=list(profile.notes),
        integer_only=lowering is not None,
        integer_ops=dict(lowering.lowered) if lowering else {},
        float_islands=[dataclasses.asdict(i) for i in lowering.islands] if lowering else [],
    )
    if profile.name == "fpga":
        _fpga_costs(report, fp32_model, plan, profile, options, stats.observed)
    measure(
        report,
        fp32_model,
        graph_model,
        stats.holdout,
        plan,
        qparams,
        insert.dq_outputs if insert else {},
        profile.execution_providers,
        options,
    )
    if output is not None:
        save_model(graph_model, output)
        report.output_model = str(output)
    bench_feed = stats.holdout[0] if stats.holdout else None
    return CompileResult(graph_model, report, plan, qdq_model, fp32_model, qparams, bench_feed)


def _check_output(model: ModelSource, output: str | os.PathLike | None) -> str | None:
    """Refuse a bad output path before any work; returns the input's path, if it has one."""
    input_path = str(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None:
        check_output_path(output, inputs=(input_path,) if input_path else ())
    return input_path


CLE = "CrossLayerEqualization"


def _chooses_equalization(target: str, options: CompileOptions) -> bool:
    """`--calib-method auto` also decides whether cross-layer equalization stays."""
    pipe = get_target(target).pipeline(options)
    return (
        options.calib_method == "auto"
        and CLE not in options.disabled_passes
        and any(pass_name(p) == CLE for p in pipe.rewrite)
    )


def _compile_choosing_equalization(
    model: ModelSource,
    target: str,
    calibration: CalibrationInput,
    image_spec: ImageSpec | None,
    options: CompileOptions,
    output: str | os.PathLike | None,
) -> CompileResult:
    """Compile with and without cross-layer equalization; keep the better output SQNR on
    the calibration feeds (the score `auto` picks its method by).

    CLE rescales the channels of an activation so one per-tensor range fits them all. That
    helped PP-OCR det and hurt PP-OCR rec by 2.8 dB of output SQNR (benchmarks/RESULTS.md),
    and the calibration-feed score predicted both, so each model gets its own choice."""
    _check_output(model, output)
    trial = dataclasses.replace(options, bench_runs=0)
    best = with_cle = _compile(model, target, calibration, image_spec, trial, None)
    if any(p["name"] == CLE and p["modified"] for p in with_cle.report.passes):
        without = dataclasses.replace(trial, disabled_passes=(*trial.disabled_passes, CLE))
        without_cle = _compile(model, target, calibration, image_spec, without, None)
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
            get_target(target).pipeline(options).profile.execution_providers,
            options,
        )
    if output is not None:
        save_model(best.model, output)
        best.report.output_model = str(output)
    return best


ACCURACY_PASSES = ("CrossLayerEqualization", "SmoothQuant", "FuseForQuantization", "BiasCorrection")


def _pass_effects(model, target, calibration, image_spec, options, result) -> list[dict]:
    """Each accuracy pass's effect on output SQNR: the compile repeated without it."""
    ran = {p["name"] for p in result.report.passes if p["modified"] and not p["skipped"]}
    effects = []
    for name in ACCURACY_PASSES:
        if name not in ran:
            continue
        without = dataclasses.replace(
            options,
            disabled_passes=(*options.disabled_passes, name),
            pass_effects=False,
            bench_runs=0,
            progress=False,
        )
        other = _compile(model, target, calibration, image_spec, without, None)
        sqnr_without = other.report.min_output_sqnr_db
        effects.append(
            {
                "pass": name,
                "sqnr_db_without": sqnr_without,
                "sqnr_db_gain": result.report.min_output_sqnr_db - sqnr_without,
            }
        )
    return effects


def _compile_mixed(
    model: ModelSource,
    target: str,
    calibration: CalibrationInput,
    image_spec: ImageSpec | None,
    options: CompileOptions,
    output: str | os.PathLike | None,
    verification: CalibrationInput | None = None,
) -> CompileResult:
    """Mixed precision under a budget (qcompile.quantize.mixed): compile all-INT8 once,
    measure per-layer sensitivity and cost, solve, verify, repair, compile the choice."""
    if options.softmax_log2_bits is not None:
        raise QCompileError(
            "mixed precision does not model the log2 Softmax quantizer yet",
            hint="drop --softmax-log2, or search without a budget",
        )
    start = time.perf_counter()
    plain = dataclasses.replace(
        options,
        max_accuracy_drop=None,
        size_budget_mb=None,
        latency_budget_ms=None,
        bench_runs=0,
        progress=False,
    )
    base = _compile(model, target, calibration, image_spec, plain, None)
    # every candidate compiles with the method "auto" chose for the all-INT8 base
    plain = dataclasses.replace(plain, calib_method=base.report.calib_method)
    fp32, plan, profile = base.fp32_model, base.plan, get_target(target).pipeline(plain).profile
    data = open_calibration(
        calibration if verification is None else verification,
        input_specs(fp32),
        batch_size=options.calib_batch_size,
        image_spec=image_spec,
    )
    feeds = _first_feeds(data, options.mixed_verify_feeds)
    labels = read_labels(options.labels) if options.labels is not None else None
    metric = mixed.resolve_metric(options.metric, labels)
    fp32_sess = ort_backend.make_session(fp32, threads=options.threads)
    fp32_outputs = [fp32_sess.run(None, dict(f)) for f in feeds]
    if isinstance(options.metric, str):  # e.g. too few labels: fail before the search
        metric(fp32_outputs, fp32_outputs)

    fpga = profile.name == "fpga"
    objective = (
        "size" if (fpga or options.size_budget_mb) and not options.latency_budget_ms else "latency"
    )
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
    trace = options.sensitivity == "trace"
    switch, flags = mixed.switch_model(fp32, plan, base.qparams, specs, trace=trace)
    sens_feeds = feeds[: max(2, len(feeds) // 4)]
    if options.metric in mixed.ARGMAX_METRICS:  # noise where flips happen
        sens_feeds = mixed.near_tie_feeds(feeds, fp32_outputs, 32) or sens_feeds
    cache = mixed.MeasurementCache.open(
        options.cache_dir, switch, base.model, [*sens_feeds, feeds[0]], objective, options.threads
    )
    nsr = cache.get("nsr") or cache.put(
        "nsr", mixed.sensitivities(switch, flags, sens_feeds, options.threads)
    )
    weights = {
        w.node: int(fp32.graph.initializers[w.tensor].const_value.size)
        for w in plan.weights
        if w.tensor in fp32.graph.initializers
    }
    if objective == "latency":
        measured = cache.get("costs") or cache.put(
            "costs", _layer_times(fp32, base.model, layer_nodes, int4, feeds[0], options)
        )
        t_fp32, t_int8, boundary, t_int4 = (
            measured[k] for k in ("fp32", "int8", "boundary", "int4")
        )
    layers = []
    op_types = {n.name: n.op_type for n in fp32.graph}
    for node in layer_nodes:
        n_w = weights.get(node, 0)
        if objective == "latency":
            fp = t_fp32.get(node, 0.0)
            # an FP32 layer among INT8 ones pays a dequantize and a quantize around it
            cands = [
                mixed.Candidate("fp32", fp + boundary.get(node, 0.0), 0.0),
                mixed.Candidate("int8", t_int8.get(node, fp), nsr[(node, "int8")]),
            ]
            if node in int4:  # FP32 activations: it pays the same boundary as FP32
                cost = t_int4.get(node, fp) + boundary.get(node, 0.0)
                cands.append(mixed.Candidate(INT4_LABEL, cost, nsr[(node, INT4_LABEL)]))
        elif fpga:
            cands = [
                mixed.Candidate(label, n_w * spec.bits, nsr[(node, label)], spec.bits)
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
        compiled = _compile(model, target, calibration, image_spec, options_for(choice), None)
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
    found = mixed.search(
        layers=layers,
        compile_choice=run_choice,
        fp32_outputs=fp32_outputs,
        metric=metric,
        max_drop=options.max_accuracy_drop,
        cost_budget=cost_budget,
        initial_nsr_budget=start_budget,
        objective=objective,
    )
    if all(label == "fp32" for label in found.choice.values()):
        best = min(layers, key=lambda layer: layer.candidates[-1].nsr)
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
    result = _compile(model, target, calibration, image_spec, final_options, output)
    result.report.mixed_precision = _mixed_report(
        found, options, time.perf_counter() - start, cache.hit
    )
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
    t_int8 = mixed.node_times_ms(int8, feed, threads=options.threads)
    t_int4: dict[str, float] = {}
    if int4:  # every candidate MatMul as MatMulNBits in one FP32 model, profiled
        int4_model = fp32.clone()
        Int4WeightOnly(frozenset(int4))(int4_model)
        t_int4 = mixed.node_times_ms(int4_model, feed, threads=options.threads)
    return {
        "fp32": mixed.node_times_ms(fp32, feed, threads=options.threads),
        "int8": t_int8,
        "boundary": mixed.boundary_ms(fp32, int8, layer_nodes, feed, t_int8),
        "int4": t_int4,
    }


def _mixed_report(
    found, options: CompileOptions, seconds: float, cached: bool = False
) -> dict[str, Any]:
    return {
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


def _fpga_costs(
    report: CompileReport, fp32_model: ir.Model, plan: QuantPlan, profile, options, observed
) -> None:
    w_bits, a_bits = {}, {}
    for node in fp32_model.graph:
        if plan.nodes.get(node.name) != "compute":
            continue
        w_bits[node.name] = plan.weight_bits.get(node.name, profile.weight.bits)
        source = plan.tensors.get(node.inputs[0].name, node.inputs[0].name)
        a_bits[node.name] = plan.tensor_bits.get(source, profile.activation.bits)
    costs = layer_costs(
        fp32_model, plan.nodes, w_bits, a_bits, options.fpga_macs_per_cycle, observed
    )
    report.fpga_layers = [c.to_dict() for c in costs]
    report.fpga_macs_per_cycle = options.fpga_macs_per_cycle
    report.fpga_clock_mhz = options.fpga_clock_mhz


def _kept_as_is(
    model: ir.Model, profile, input_path: str | None, output, listed: str
) -> CompileResult:
    report = CompileReport(
        target=profile.name,
        input_model=input_path,
        notes=[f"already quantized ({listed}): returned unchanged (--already-quantized keep)"],
    )
    if output is not None:
        save_model(model, output)
        report.output_model = str(output)
    return CompileResult(model, report, QuantPlan())


def _check_bit_widths(profile, options: CompileOptions) -> None:
    if profile.name == "fpga":
        return
    if options.softmax_log2_bits is not None:
        raise QCompileError(
            f"a log2 Softmax quantizer needs shift arithmetic, which '{profile.name}' "
            "(ONNX Runtime's kernels) does not run",
            hint="compile with --target fpga",
        )
    asked = options.weight_bits != 8 or options.activation_bits != 8
    asked |= any(o.weight_bits or o.activation_bits for o in options.overrides)
    if asked:
        raise QCompileError(
            f"bit widths other than 8 are for the FPGA-like target, not '{profile.name}'",
            hint="compile with --target fpga (ONNX Runtime's CPU/GPU kernels are 8-bit)",
        )


INT4_LABEL = "int4w"  # mixed-precision candidate: INT4 weights, FP32 activations (cpu/gpu)
# Calibration feeds `--calib-method auto` scores each method on.
AUTO_SCORE_FEEDS = 16


def _activation_qparams(
    plan: QuantPlan, stats: CalibrationStats, profile, method: str, percentile: float
) -> dict[str, QParams]:
    """Each calibrated tensor's parameters, read with `method` unless the plan gives the
    tensor a method of its own (per-node overrides)."""
    out = {}
    for t in plan.calibrated_tensors:
        observer = stats.observers[t]
        own = plan.tensor_methods.get(t)
        if isinstance(observer, HistogramObserver) and (own is None or own[0] == "auto"):
            observer = read_as(observer, method, percentile)  # type: ignore[arg-type]
        out[t] = observer.qparams(_activation_spec(profile, plan, t))
    return out


def _choose_method(
    graph_model: ir.Model,
    plan: QuantPlan,
    stats: CalibrationStats,
    feeds: Sequence[Feed],
    pipe,
    options: CompileOptions,
    skip: frozenset[str],
) -> tuple[str, dict[str, float]]:
    """`--calib-method auto`: quantize with each of AUTO_METHODS from the one calibration
    run and keep the method whose QDQ model has the best output SQNR (the worst output's)
    over `feeds`. Which method wins depends on the model (benchmarks/RESULTS.md has every
    method per zoo model).

    The feeds are the calibration data itself, held-out ones included: the few held-out
    feeds alone picked the method that was worse on the evaluation sets of two zoo
    models, and choosing one of three clipping rules barely fits the data it is scored
    on."""
    make = ort_backend.make_session
    fp32 = make(graph_model, threads=options.threads)
    reference = [fp32.run(None, dict(f)) for f in feeds]
    cut = next((i for i, p in enumerate(pipe.lower) if isinstance(p, LowerToIntegerOnly)), None)
    scores: dict[str, float] = {}
    for method in AUTO_METHODS:
        qparams = _activation_qparams(plan, stats, pipe.profile, method, options.percentile)
        candidate, _ = run_phase(
            graph_model.clone(), "quantize", pipe.quantize(plan, qparams), skip=skip
        )
        candidate, _ = run_phase(candidate, "lower", pipe.lower[:cut], skip=skip)
        sess = make(candidate, threads=options.threads)
        sums: dict[int, list[float]] = collections.defaultdict(lambda: [0.0] * 5)
        for feed, ref in zip(feeds, reference, strict=True):
            for i, (a, b) in enumerate(zip(ref, sess.run(None, dict(feed)), strict=True)):
                _accumulate(sums[i], a, b)
        scores[method] = min(_sqnr(s) for s in sums.values())
    best = max(AUTO_METHODS, key=lambda m: scores[m])  # ties: the earlier (mse first)
    logger.info(
        "calibration method %s (calibration-feed output SQNR: %s)",
        best,
        ", ".join(f"{m} {v:.1f} dB" for m, v in scores.items()),
    )
    return best, scores


def _activation_spec(profile, plan: QuantPlan, tensor: str):
    bits = plan.tensor_bits.get(tensor)
    return (
        profile.activation if bits is None else dataclasses.replace(profile.activation, bits=bits)
    )


def _check_islands(lowering: LowerToIntegerOnly | None, options: CompileOptions) -> None:
    """Float islands in an integer-only graph must be ones the user allowed."""
    if lowering is None:
        return
    # an island is allowed as a whole when the user allowed any of its ops (the Relu right
    # after an allowed ConvTranspose stays float with it)
    allowed = {i.group for i in lowering.islands if options.float_allowed(i.node, i.op_type)}
    refused = [i for i in lowering.islands if i.group not in allowed]
    if refused:
        listed = "; ".join(f"{i.node} ({i.op_type}: {i.reason})" for i in refused[:8])
        ops = sorted({i.op_type for i in refused})
        raise QCompileError(
            f"{len(refused)} op(s) stay float inside the integer-only graph: {listed}",
            node=refused[0].node,
            hint="allow them with "
            + " ".join(f"--allow-float op:{op}" for op in ops)
            + ", keep them FP32 with --exclude, or compile without --integer-only",
        )


def _demote(
    model: ir.Model, plan: QuantPlan, unbounded: set[str], profile, options: CompileOptions
) -> QuantPlan:
    demoted: dict[str, str] = {}  # only demotions: other skip reasons are re-derived
    for _ in range(len(plan.nodes) + 1):  # demoting can only shrink the plan: a fixpoint
        nodes = nodes_touching(model, plan, unbounded)
        if not nodes:
            return plan
        for name in sorted(nodes):
            tensor = sorted(unbounded & _tensors_of(model, name))
            reason = f"reads/writes '{tensor[0] if tensor else '?'}', which holds Inf/NaN or mask sentinels"
            demoted[name] = reason
            logger.warning("keeping %s FP32: %s", name, reason)
        plan = build_plan(model, profile, options, demoted=demoted)
    raise RuntimeError("demoting unquantizable nodes did not converge")


def _tensors_of(model: ir.Model, node_name: str) -> set[str]:
    for node in model.graph:
        if node.name == node_name:
            return {v.name for v in node.inputs if v is not None} | {v.name for v in node.outputs}
    return set()


OPTIONAL_QUANTIZE_PASSES = frozenset({"SmoothQuant", "QuantizeEmbeddings", "BiasCorrection"})


def _disabled_passes(pipe, options: CompileOptions) -> frozenset[str]:
    """Validate --disable-pass names against the target's pipeline."""
    known = {pass_name(p) for p in (*pipe.rewrite, *pipe.lower)} | OPTIONAL_QUANTIZE_PASSES
    for name in options.disabled_passes:
        if name not in known:
            raise QCompileError(
                f"no pass named '{name}' in the {pipe.profile.name} pipeline",
                hint=f"passes that can be disabled: {', '.join(sorted(known))}",
            )
    return frozenset(options.disabled_passes)


def _token_mask_input(specs, choice: str | None) -> str | None:
    if choice is None:
        return None
    if choice != "auto":
        if choice not in {s.name for s in specs}:
            raise QCompileError("token_mask names no model input", tensor=choice)
        return choice
    for spec in specs:
        if "attention_mask" in spec.name.lower() and spec.dtype.kind in "iub" and spec.rank == 2:
            return spec.name
    return None


def _first_feeds(data: Iterable[Feed], n: int) -> list[Feed]:
    feeds = []
    for feed in data:
        feeds.append(feed)
        if len(feeds) >= n:
            break
    return feeds


# Held-out feeds the per-tensor SQNR table is measured on (outputs use them all): it is a
# diagnostic, and fake-quantizing every activation of every held-out feed in numpy made
# the report the part of compile time that grew fastest with the calibration set.
TENSOR_REPORT_FEEDS = 2


def measure(
    report: CompileReport,
    fp32_model: ir.Model,
    q_model: ir.Model,
    feeds: Sequence[Feed],
    plan: QuantPlan,
    qparams: Mapping[str, QParams],
    dq_outputs: Mapping[str, str],
    providers: Sequence[str],
    options: CompileOptions,
) -> None:
    """Fill the report's accuracy, size and latency from held-out feeds."""
    make = ort_backend.make_session
    available = ort_backend.available_providers()
    if providers and providers[0] not in available:
        used = next((p for p in providers if p in available), "CPUExecutionProvider")
        report.notes.append(
            f"{providers[0]} is not available here: accuracy and latency were measured on {used}"
        )
    # Sessions are the expensive part of measuring, so each is built once and reused:
    # - the FP32 model, instrumented with the quantized tensors as extra outputs, gives both
    #   the reference outputs and the reference tensors (extra outputs do not change values);
    # - the deployed quantized model, fully optimized (its optimized graph gives the fused op
    #   counts), gives the outputs users will see;
    # - the quantized model, instrumented at its dequantizers, gives per-tensor errors (it
    #   cannot be the deployed one: reading a dequantizer's output blocks ORT's fusions).
    on_cpu = providers[0] == "CPUExecutionProvider"
    if on_cpu:
        q_sess, optimized = ort_backend.session_and_optimized_graph(
            q_model, providers=providers, threads=options.threads
        )
        report.ort_ops = ort_backend.op_counts(optimized)
    else:
        q_sess, optimized = make(q_model, providers=providers, threads=options.threads), None
    out_names = [o.name for o in q_sess.get_outputs()]
    inputs = {v.name for v in fp32_model.graph.inputs}
    tensors = [t for t in plan.tensors if t in dq_outputs]
    with (
        extra_outputs(fp32_model, tensors) as fp_added,
        extra_outputs(q_model, [dq_outputs[t] for t in tensors]) as q_added,
    ):
        fp_sess = make(fp32_model, providers=providers, threads=options.threads)
        q_inst = (
            make(q_model, threads=options.threads, opt_level=ort_backend.OptLevel.ORT_ENABLE_BASIC)
            if q_added
            else None
        )
    fp_run = [t for t in tensors if t in set(fp_added)]
    tensors = [t for t in tensors if (t in inputs or t in fp_run) and dq_outputs[t] in set(q_added)]
    fp_run = [t for t in fp_run if t in tensors]
    sums = {name: [0.0] * 5 for name in out_names}  # signal, noise, dot, |a|², |b|²
    acc = {t: [0.0] * 5 for t in tensors}
    local = {t: [0.0] * 5 for t in tensors}
    effective = {t: effective_qparams(plan, qparams, t) for t in tensors}
    for i, feed in enumerate(feeds):
        per_tensor = bool(tensors) and i < TENSOR_REPORT_FEEDS
        fp_all = fp_sess.run(out_names + (fp_run if per_tensor else []), dict(feed))
        q_out = q_sess.run(out_names, dict(feed))
        for name, a, b in zip(out_names, fp_all[: len(out_names)], q_out, strict=True):
            _accumulate(sums[name], a, b)
        if not per_tensor:
            continue
        fp_vals = {t: feed[t] for t in tensors if t in inputs}
        fp_vals.update(zip(fp_run, fp_all[len(out_names) :], strict=True))
        q_vals = q_inst.run([dq_outputs[t] for t in tensors], dict(feed))
        for t, q_val in zip(tensors, q_vals, strict=True):
            _accumulate(acc[t], fp_vals[t], q_val)
            _accumulate(local[t], fp_vals[t], fake_quantize(fp_vals[t], effective[t]))
    report.outputs = [OutputReport(n, _sqnr(s), _cos(s)) for n, s in sums.items()]
    report.tensors = [
        TensorReport(
            t,
            float(effective[t].scale),
            int(effective[t].zero_point),
            _sqnr(local[t]),
            _sqnr(acc[t]),
        )
        for t in tensors
    ]
    if options.bench_runs and feeds:
        bench_latency(report, fp32_model, q_model, feeds[0], providers, options, q_sess, optimized)


def bench_latency(
    report: CompileReport,
    fp32_model: ir.Model,
    q_model: ir.Model,
    feed: Feed,
    providers: Sequence[str],
    options: CompileOptions,
    q_sess=None,
    optimized: ir.Model | None = None,
) -> None:
    """FP32 vs quantized median latency into the report, with a note when INT8 is slower."""
    make = ort_backend.make_session
    threads = options.threads or os.cpu_count() or 1
    f_s = make(fp32_model, providers=providers, threads=threads)
    q_s = (
        q_sess
        if q_sess is not None and threads == options.threads
        else make(q_model, providers=providers, threads=threads)
    )
    lat = ort_backend.bench({"fp32": f_s, "q": q_s}, feed, runs=options.bench_runs)
    report.latency_fp32_ms, report.latency_quantized_ms = lat["fp32"], lat["q"]
    report.bench_threads = threads
    if report.speedup is not None and report.speedup < 1.0 and report.integer_only:
        report.notes.append(
            f"integer-only graphs are for integer hardware and bit-exact checks: ONNX "
            f"Runtime runs their int64 requantization op by op, {1 / report.speedup:.1f}× "
            "slower than FP32 here; for ONNX Runtime speed compile without --integer-only"
        )
    elif report.speedup is not None and report.speedup < 1.0:
        islands = ort_backend.float_islands_in(optimized or ort_backend.optimized_model(q_model))
        where = ", ".join(f"{op}×{n}" for op, n in sorted(islands.items())) or "none found"
        note = (
            f"the quantized model is {1 / report.speedup:.2f}× SLOWER than FP32 here; float ops "
            f"between integer kernels: {where}. Try --exclude on them or their neighbours."
        )
        report.notes.append(note)
        logger.warning(note)


def _accumulate(s: list[float], a: np.ndarray, b: np.ndarray) -> None:
    """Running Σa², Σ(a−b)², Σab, Σa², Σb² (float32 BLAS dots: dB-level precision is enough)."""
    a = np.asarray(a, np.float32).ravel()
    b = np.asarray(b, np.float32).ravel()
    d = a - b
    aa = float(np.dot(a, a))
    s[0] += aa
    s[1] += float(np.dot(d, d))
    s[2] += float(np.dot(a, b))
    s[3] += aa
    s[4] += float(np.dot(b, b))


def _sqnr(s: Sequence[float]) -> float:
    if s[1] == 0.0:
        return float("inf")
    if s[0] == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(s[0] / s[1]))


def _cos(s: Sequence[float]) -> float:
    denom = float(np.sqrt(s[3] * s[4]))
    return 1.0 if denom == 0.0 else s[2] / denom


__all__ = ["CompileResult", "compile", "make_options"]
