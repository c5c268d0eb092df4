"""The compile driver: one compile of one job, read top to bottom as the data flows.

import → rewrite → smooth → plan → calibrate | choose parameters | → bias correction →
quantize → lower → check → measure → write.

`prepare` runs everything up to the calibration statistics, `finish` everything after
the activation parameters are read from them. A strategy that tries several ways of
reading the statistics (`--calib-method auto`) calls `prepare` once and `finish` with its
choice; everything else calls `compile_once`. Strategies call the driver, never the
reverse.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.calibrate.runner import CalibrationStats, calibrate
from qcompile.data.feeds import CalibrationSource, Feed, InputSpec, input_specs
from qcompile.driver import checks
from qcompile.driver.confidence import calibration_confidence
from qcompile.driver.int4_level import choose_int4_level
from qcompile.driver.job import CompileJob, Workspace
from qcompile.driver.measure import fpga_costs, measure
from qcompile.driver.report import CompileReport, options_record
from qcompile.driver.safety import (
    blame,
    checked_phase,
    checker_problem,
    correct_declared_outputs,
    ort_problem,
    recovered_agreement,
)
from qcompile.errors import QCompileError
from qcompile.ir.io import check_output_path, save_model, serialized_size
from qcompile.ir.shapes import infer_shapes, pin_input_shapes, record_observed_shapes
from qcompile.lower.integer_only import LowerToIntegerOnly
from qcompile.numerics.qparams import QParams
from qcompile.options import CompileOptions
from qcompile.passes.manager import PassRecord, pass_name, run_phase
from qcompile.passes.operator_format import DynamicToFloat, OperatorsToQDQ
from qcompile.passes.prequantized import DequantizeQDQ, quantized_ops
from qcompile.passes.rotation import rotation_notes
from qcompile.passes.smoothing import ChannelObserver, find_smooth_groups
from qcompile.quantize.bias_correction import ChannelMeanObserver, correction_inputs
from qcompile.quantize.plan import QuantPlan, build_plan
from qcompile.quantize.qdq import InsertQDQ
from qcompile.targets import get_target
from qcompile.targets.pipeline import Pipeline

logger = logging.getLogger(__name__)


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
    # the options this model was compiled with (a strategy's choices included)
    options: CompileOptions | None = None


@dataclass
class Prepared:
    """A job compiled up to its calibration statistics."""

    job: CompileJob
    workspace: Workspace
    pipe: Pipeline
    skip: frozenset[str]
    model: ir.Model  # the rewritten (and smoothed) FP32 graph
    specs: list[InputSpec]
    data: CalibrationSource
    plan: QuantPlan
    stats: CalibrationStats
    records: list[PassRecord]
    notes: list[str] = field(default_factory=list)  # e.g. passes the safety net left out

    @property
    def options(self):
        return self.job.options

    def observe(self, tensors: list[str], observer_for, key_for, progress=False):
        return observe(self, self.model, tensors, observer_for, key_for, progress)

    def activation_qparams(self, method: str) -> dict[str, QParams]:
        return checks.activation_qparams(
            self.plan, self.stats, self.pipe.profile, method, self.options.percentile
        )

    def quantized(self, qparams: dict[str, QParams], model: ir.Model | None = None) -> ir.Model:
        """A QDQ model of this graph (or of `model`, an FP32 copy of it) with these
        parameters, before integer-only lowering."""
        source = self.model if model is None else model
        candidate, _ = run_phase(
            source.clone(), "quantize", self.pipe.quantize(self.plan, qparams), skip=self.skip
        )
        candidate, _ = run_phase(
            candidate, "lower", self.pipe.lower[: _cut(self.pipe)], skip=self.skip
        )
        return candidate


def check_output(job: CompileJob) -> None:
    """Refuse a bad output path before any work."""
    if job.output is not None:
        inputs = (job.input_path,) if job.input_path else ()
        check_output_path(job.output, inputs=inputs)


def observe(prep, model, tensors, observer_for, key_for, progress=False) -> CalibrationStats:
    """One run over the calibration data (the same feeds, batch limit, hold-out and token
    mask for SmoothQuant's, the plan's and bias correction's statistics), or the
    statistics an earlier variant of the job computed on the same graph."""
    options = prep.job.options
    token_mask = checks.token_mask_input(prep.specs, options.token_mask)
    settings: Hashable = (options.holdout_every, options.max_calib_batches, token_mask)

    def run(names: list[str]) -> CalibrationStats:
        return calibrate(
            model,
            prep.data,
            names,
            observer_for,
            ort_backend.runner_factory(threads=options.threads),
            holdout_every=options.holdout_every,
            max_batches=options.max_calib_batches,
            progress=progress,
            total=prep.data.count,
            token_mask=token_mask,
        )

    return prep.workspace.observe(
        model, tensors, key_for, run, settings, prep.data, options.cache_dir
    )


def prepare(job: CompileJob, workspace: Workspace) -> Prepared | CompileResult:
    """Import, rewrite, smooth, plan and calibrate; a CompileResult when the input is an
    already quantized model the options say to keep."""
    check_output(job)
    options = job.options
    pipe = get_target(job.target).pipeline(options)
    profile = pipe.profile
    checks.target_supports(profile, options)

    # Import and canonicalize.
    graph_model = workspace.load(job.model)
    prequantized = quantized_ops(graph_model)
    quantized_input = None
    if prequantized:
        listed = ", ".join(f"{k}×{v}" for k, v in prequantized.items())
        if options.already_quantized == "error":
            raise checks.already_quantized_error(listed)
        if options.already_quantized == "keep":
            return _kept_as_is(job, graph_model, profile.name, listed)
        quantized_input = graph_model.clone()
        graph_model, _ = run_phase(
            graph_model, "import", [DynamicToFloat(), OperatorsToQDQ(), DequantizeQDQ()]
        )
        logger.warning("dequantized an already quantized model (%s) to compile it again", listed)
    if options.input_shapes:
        pin_input_shapes(graph_model, dict(options.input_shapes))
    infer_shapes(graph_model)
    specs = input_specs(graph_model)
    data = workspace.data(job.calibration, specs, options, job.image_spec)
    verify = None
    if options.verify_passes:
        verify = ort_backend.equivalence_verifier(first_feeds(data, 2))
    skip = checks.disabled_passes(pipe, options)
    # the input model's outputs on one feed: every FP32 rewrite must keep computing them
    feeds = first_feeds(data, 1)
    if not feeds:
        raise QCompileError("the calibration set is empty", hint="give at least one feed")
    feed = feeds[0]
    reference = workspace.reference(graph_model, feed)
    declared = correct_declared_outputs(graph_model, reference)
    if prequantized:
        declared.append(recovered_agreement(quantized_input, reference, feed))
    graph_model, records, notes = checked_phase(
        graph_model, "rewrite", pipe.rewrite, reference, feed, skip=skip, verify=verify
    )
    notes += rotation_notes(pipe.rewrite)
    infer_shapes(graph_model)
    prep = Prepared(
        job,
        workspace,
        pipe,
        skip,
        graph_model,
        specs,
        data,
        QuantPlan(),
        None,
        records,
        declared + notes,
    )  # type: ignore[arg-type]

    # Smooth: migrate activation outliers into weights (needs its own statistics).
    if pipe.smooth is not None and options.smoothquant and "SmoothQuant" not in skip:
        explicit = options.smooth_explicit
        if explicit == "auto" and profile.integer_only:
            explicit = "off"  # the Mul would be a float island
        groups = find_smooth_groups(graph_model, explicit=explicit)
        if groups:
            channel_stats = prep.observe(
                [g.activation for g in groups], ChannelObserver, lambda t: "channel"
            )
            graph_model, smooth_records, notes = checked_phase(
                graph_model,
                "smooth",
                pipe.smooth(groups, channel_stats.observers),
                reference,
                feed,
                verify=verify,
            )
            prep.notes += notes
            infer_shapes(graph_model)
            prep.model = graph_model
            prep.records += smooth_records

    # Plan and calibrate.
    plan = build_plan(graph_model, profile, options)
    checks.plan_has_work(plan, profile, options, graph_model)
    observer_for = pipe.calibrate.observer_for(plan)
    stats = prep.observe(
        plan.calibrated_tensors, observer_for, pipe.calibrate.key_for(plan), options.progress
    )
    record_observed_shapes(graph_model, stats.observed)
    unbounded = {t for t, obs in stats.observers.items() if obs.unbounded}
    if unbounded:
        # e.g. attention masks filled with -inf/finfo.min: keep their nodes FP32.
        plan = checks.demote(graph_model, plan, unbounded, profile, options)
        missing = [t for t in plan.calibrated_tensors if t not in stats.observers]
        if missing:  # demotion can expose tensors the first plan read through others
            extra = prep.observe(
                missing, pipe.calibrate.observer_for(plan), pipe.calibrate.key_for(plan)
            )
            stats = dataclasses.replace(
                stats,
                observers={**stats.observers, **extra.observers},
                observed={**stats.observed, **extra.observed},
                run_seconds=stats.run_seconds + extra.run_seconds,
                total_seconds=stats.total_seconds + extra.total_seconds,
            )
    prep.plan, prep.stats = plan, stats
    return prep


def finish(
    prep: Prepared, method: str, method_scores: dict[str, float] | None = None
) -> CompileResult:
    """Read the activation parameters with `method`; quantize, lower, check, measure and
    write."""
    job, options, pipe, skip = prep.job, prep.options, prep.pipe, prep.skip
    profile, plan, stats = pipe.profile, prep.plan, prep.stats
    graph_model = prep.model
    qparams = prep.activation_qparams(method)
    # clone(), not a protobuf round trip: external-data tensors keep their base directory
    fp32_model = graph_model.clone()

    # Bias correction (asked for): needs the FP32 reference taken above, and its own run.
    records = list(prep.records)
    bias_passes: list = []
    if options.bias_correction and pipe.correct_bias is not None and "BiasCorrection" not in skip:
        axes = correction_inputs(graph_model, plan)
        if axes:
            mean_stats = observe(
                prep,
                graph_model,
                list(axes),
                lambda t: ChannelMeanObserver(t, axes[t]),
                lambda t: ("mean", axes[t]),
            )
            means = {t: o.mean for t, o in mean_stats.observers.items() if o.mean is not None}
            bias_passes = pipe.correct_bias(plan, means)
            graph_model, more = run_phase(graph_model, "quantize", bias_passes, skip=skip)
            records += more

    # Quantize and lower; the QDQ graph is kept when integer-only lowering follows
    # (QONNX exports it).
    quantize_passes = pipe.quantize(plan, qparams)
    graph_model, more = run_phase(graph_model, "quantize", quantize_passes, skip=skip)
    records += more
    cut = _cut(pipe)
    lowering = pipe.lower[cut] if cut is not None else None
    qdq_model = None
    graph_model, more = run_phase(graph_model, "lower", pipe.lower[:cut], skip=skip)
    records += more
    if lowering is not None and pass_name(lowering) not in skip:
        qdq_model = graph_model.clone()
        graph_model, more = run_phase(graph_model, "lower", pipe.lower[cut:], skip=skip)
        records += more
    else:
        lowering = None
    checks.islands_allowed(lowering, options)
    for problem_of, what in ((checker_problem, "onnx.checker"), (ort_problem, "ONNX Runtime")):
        if problem_of(graph_model) is not None:
            phases = [
                ("quantize", bias_passes),
                ("quantize", quantize_passes),
                ("lower", pipe.lower),
            ]
            culprit = blame(fp32_model, phases, problem_of)
            raise RuntimeError(f"{what} rejects the compiled model (a qcompile bug): {culprit}")
    int4 = choose_int4_level(
        graph_model, fp32_model, stats.holdout[0] if stats.holdout else None, options
    )
    proto = ir.to_proto(graph_model)

    op_types = {node.name: node.op_type for node in fp32_model.graph}
    insert = next((p for p in quantize_passes if isinstance(p, InsertQDQ)), None)
    report = CompileReport(
        target=profile.name,
        input_model=job.input_path,
        options=options_record(options),
        calib_method=method,
        calib_method_scores=dict(method_scores or {}),
        calib_batches=stats.batches,
        holdout_batches=len(stats.holdout),
        holdout_is_calibration=stats.holdout_is_calibration,
        calib_seconds=stats.total_seconds,
        calib_model_seconds=stats.run_seconds,
        calibration_reused=stats.cached,
        passes=[
            {
                "phase": r.phase,
                "name": r.name,
                "seconds": r.seconds,
                "modified": r.modified,
                "skipped": r.skipped,
            }
            for r in records
        ],
        quantized_ops=dict(collections.Counter(op_types[n] for n in plan.nodes)),
        skipped_nodes=dict(plan.skipped),
        removed_activations=list(insert.removed_activations) if insert else [],
        size_fp32_bytes=serialized_size(fp32_model),
        size_quantized_bytes=proto.ByteSize(),
        notes=[*profile.notes, *prep.notes],
        integer_only=lowering is not None,
        integer_ops=dict(lowering.lowered) if lowering else {},
        float_islands=[dataclasses.asdict(i) for i in lowering.islands] if lowering else [],
        int4=int4,
    )
    if profile.cost_model == "layer-cycles":
        fpga_costs(report, fp32_model, plan, profile, options, stats.observed)
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
    if stats.cache_file:
        report.notes.append(f"calibration statistics read from the cache: {stats.cache_file}")
    if options.calib_confidence:
        report.calibration_confidence = calibration_confidence(
            stats,
            qparams,
            fp32_model,
            lambda q: prep.quantized(q, fp32_model),  # prep.model is quantized by now
            options.threads,
        )
    if job.output is not None:
        save_model(graph_model, job.output)
        report.output_model = str(job.output)
    bench_feed = stats.holdout[0] if stats.holdout else None
    return CompileResult(
        graph_model, report, plan, qdq_model, fp32_model, qparams, bench_feed, options
    )


def compile_once(job: CompileJob, workspace: Workspace) -> CompileResult:
    """One compile with the job's calibration method as given (not `auto`)."""
    prep = prepare(job, workspace)
    if isinstance(prep, CompileResult):
        return prep
    return finish(prep, job.options.calib_method)


def first_feeds(data, n: int) -> list[Feed]:
    feeds = []
    for feed in data:
        feeds.append(feed)
        if len(feeds) >= n:
            break
    return feeds


def _cut(pipe: Pipeline) -> int | None:
    """Where integer-only lowering starts in the lower phase (None: no such pass)."""
    return next((i for i, p in enumerate(pipe.lower) if isinstance(p, LowerToIntegerOnly)), None)


def _kept_as_is(job: CompileJob, model: ir.Model, target: str, listed: str) -> CompileResult:
    report = CompileReport(
        target=target,
        input_model=job.input_path,
        options=options_record(job.options),
        notes=[f"already quantized ({listed}): returned unchanged (--already-quantized keep)"],
    )
    if job.output is not None:
        save_model(model, job.output)
        report.output_model = str(job.output)
    return CompileResult(model, report, QuantPlan())
