"""Measuring a compiled model for the report: output and per-tensor agreement with FP32
on held-out feeds, latency of both, and the FPGA cost model's per-layer rows."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.calibrate.runner import extra_outputs
from qcompile.data.feeds import Feed
from qcompile.driver.report import CompileReport, OutputGroup, OutputReport, TensorReport
from qcompile.numerics.qparams import QParams, fake_quantize
from qcompile.options import CompileOptions
from qcompile.quantize.integer_scope import LOWERED_WHEN_QUANTIZED
from qcompile.quantize.qdq import effective_qparams
from qcompile.quantize.quant_plan import QuantPlan
from qcompile.targets.fpga_cost import layer_costs

logger = logging.getLogger(__name__)


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
    fp_names = [o.name for o in fp_sess.get_outputs()][: len(out_names)]
    if fp_names != out_names:
        raise RuntimeError(
            f"the compiled model's outputs are {out_names}, FP32's {fp_names} (a qcompile bug)"
        )
    fp_run = [t for t in tensors if t in set(fp_added)]
    tensors = [t for t in tensors if (t in inputs or t in fp_run) and dq_outputs[t] in set(q_added)]
    fp_run = [t for t in fp_run if t in tensors]
    sums = {name: [0.0] * 5 for name in out_names}  # signal, noise, dot, |a|², |b|²
    groups = concat_groups(fp32_model)
    group_sums = {(name, g): [0.0] * 5 for name in out_names for g in groups.get(name, ())}
    acc = {t: [0.0] * 5 for t in tensors}
    local = {t: [0.0] * 5 for t in tensors}
    effective = {t: effective_qparams(plan, qparams, t) for t in tensors}
    for i, feed in enumerate(feeds):
        per_tensor = bool(tensors) and i < TENSOR_REPORT_FEEDS
        fp_all = fp_sess.run(out_names + (fp_run if per_tensor else []), dict(feed))
        q_out = q_sess.run(out_names, dict(feed))
        for name, a, b in zip(out_names, fp_all[: len(out_names)], q_out, strict=True):
            same_shape(name, a, b)
            accumulate(sums[name], a, b)
            for g in groups.get(name, ()):
                part = branch_slice(*g[1:])
                accumulate(group_sums[(name, g)], a[part], b[part])
        if not per_tensor:
            continue
        fp_vals = {t: feed[t] for t in tensors if t in inputs}
        fp_vals.update(zip(fp_run, fp_all[len(out_names) :], strict=True))
        q_vals = q_inst.run([dq_outputs[t] for t in tensors], dict(feed))
        for t, q_val in zip(tensors, q_vals, strict=True):
            accumulate(acc[t], fp_vals[t], q_val)
            accumulate(local[t], fp_vals[t], fake_quantize(fp_vals[t], effective[t]))
    report.outputs = [
        OutputReport(
            n,
            sqnr(s),
            cosine(s),
            [OutputGroup(*g, sqnr(group_sums[(n, g)])) for g in groups.get(n, ())],
        )
        for n, s in sums.items()
    ]
    report.tensors = [
        TensorReport(
            t,
            float(effective[t].scale),
            int(effective[t].zero_point),
            sqnr(local[t]),
            sqnr(acc[t]),
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


def same_shape(name: str, fp32: np.ndarray, got: np.ndarray) -> None:
    """Outputs are compared shape-aware: a changed shape or dtype is a bug, not an SQNR."""
    fp32, got = np.asarray(fp32), np.asarray(got)
    if fp32.shape != got.shape or fp32.dtype != got.dtype:
        raise RuntimeError(
            f"the compiled model's output {name} is {got.dtype}{list(got.shape)} where FP32's "
            f"is {fp32.dtype}{list(fp32.shape)} (a qcompile bug)"
        )


def accumulate(s: list[float], a: np.ndarray, b: np.ndarray) -> None:
    """Running Σa², Σ(a−b)², Σab, Σa², Σb² (float32 BLAS dots: dB-level precision is
    enough; float64 where float32 overflows, as onnx's light models' outputs of ~1e20 do)."""
    dots = _dots(a, b, np.float32)
    if not all(np.isfinite(dots)):
        dots = _dots(a, b, np.float64)
    aa, dd, ab, bb = dots
    s[0] += aa
    s[1] += dd
    s[2] += ab
    s[3] += aa
    s[4] += bb


def _dots(a: np.ndarray, b: np.ndarray, dtype) -> tuple[float, float, float, float]:
    a = np.asarray(a, dtype).ravel()
    b = np.asarray(b, dtype).ravel()
    d = a - b
    with np.errstate(over="ignore", invalid="ignore"):
        return (float(np.dot(a, a)), float(np.dot(d, d)), float(np.dot(a, b)),
                float(np.dot(b, b)))  # fmt: skip


def concat_groups(model: ir.Model) -> dict[str, list[tuple[str, int, int, int]]]:
    """Per graph output assembled by a Concat (directly, or through a Transpose):
    (source tensor, axis, start, stop) of each branch's slice, where the branches' sizes
    along the axis are known. Detectors concatenate box coordinates (hundreds of pixels)
    with class scores (0-1): the output's SQNR is the boxes', and the scores hide in it."""
    found: dict[str, list[tuple[str, int, int, int]]] = {}
    for out in model.graph.outputs:
        node, perm = out.producer(), None
        if node is not None and node.op_type == "Transpose":
            attr = node.attributes.get("perm")
            perm = list(attr.as_ints()) if attr is not None else None
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node is None or node.op_type != "Concat" or len(node.inputs) < 2:
            continue
        rank = len(out.shape) if out.shape is not None else None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else None
        if rank is None or axis is None:
            continue
        axis %= rank
        sizes = []
        for value in node.inputs:
            dims = value.shape if value is not None else None
            size = dims[axis] if dims is not None and len(dims) == rank else None
            if not isinstance(size, int):
                break
            sizes.append((value.name, size))
        else:
            out_axis = perm.index(axis) if perm is not None and axis in perm else axis
            edges = np.cumsum([0] + [size for _, size in sizes])
            found[out.name] = [
                (name, out_axis, int(edges[i]), int(edges[i + 1]))
                for i, (name, _) in enumerate(sizes)
            ]
    return found


def branch_slice(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    """The index of one concat_groups branch within its output."""
    return (slice(None),) * axis + (slice(start, stop),)


def sqnr(s: Sequence[float]) -> float:
    if s[1] == 0.0:
        return float("inf")
    if s[0] == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(s[0] / s[1]))


def cosine(s: Sequence[float]) -> float:
    denom = float(np.sqrt(s[3] * s[4]))
    return 1.0 if denom == 0.0 else s[2] / denom


def fpga_costs(
    report: CompileReport, fp32_model: ir.Model, plan: QuantPlan, profile, options, observed
) -> None:
    w_bits, a_bits = {}, {}
    for node in fp32_model.graph:
        if plan.nodes.get(node.name) != "compute":
            continue
        w_bits[node.name] = plan.weight_bits.get(node.name, profile.weight.bits)
        source = plan.tensors.get(node.inputs[0].name, node.inputs[0].name)
        a_bits[node.name] = plan.tensor_bits.get(source, profile.activation.bits)
    kernels = frozenset()
    if profile.integer_only or options.integer_only:  # the other integer kernels too
        kernels = frozenset(plan.nodes) | {
            n.name for n in fp32_model.graph if n.op_type in LOWERED_WHEN_QUANTIZED
        }
    costs = layer_costs(
        fp32_model, plan.nodes, w_bits, a_bits, options.fpga_macs_per_cycle, observed, kernels
    )
    report.fpga_layers = [c.to_dict() for c in costs]
    report.fpga_macs_per_cycle = options.fpga_macs_per_cycle
    report.fpga_clock_mhz = options.fpga_clock_mhz
