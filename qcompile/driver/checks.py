"""What the driver checks and decides between its stages: the options against the target's
capabilities, the plan, demotion of unquantizable tensors, float islands, pass names."""

from __future__ import annotations

import collections
import dataclasses
import logging

import onnx_ir as ir

from qcompile.calibrate.observers import HistogramObserver, read_as
from qcompile.calibrate.runner import CalibrationStats
from qcompile.errors import QCompileError
from qcompile.lower.integer_only import LowerToIntegerOnly
from qcompile.numerics.qparams import QParams
from qcompile.options import CompileOptions
from qcompile.passes.manager import pass_name
from qcompile.profile import TargetProfile
from qcompile.quantize.plan import QuantPlan, build_plan, nodes_touching
from qcompile.targets.pipeline import Pipeline

logger = logging.getLogger(__name__)

# Passes outside the rewrite/lower lists that --disable-pass may name.
OPTIONAL_QUANTIZE_PASSES = frozenset({"SmoothQuant", "QuantizeEmbeddings", "BiasCorrection"})


def target_supports(profile: TargetProfile, options: CompileOptions) -> None:
    """Refuse options the target's kernels cannot run (its profile's capabilities)."""
    if options.softmax_log2_bits is not None and not profile.log2_softmax:
        raise QCompileError(
            f"a log2 Softmax quantizer needs shift arithmetic, which '{profile.name}' "
            "(ONNX Runtime's kernels) does not run",
            hint="compile with --target fpga",
        )
    asked = {options.weight_bits, options.activation_bits}
    asked |= {b for o in options.overrides for b in (o.weight_bits, o.activation_bits) if b}
    per_node = any(o.weight_bits or o.activation_bits for o in options.overrides)
    if any(not profile.allows_bits(b) for b in asked) or (per_node and len(profile.bit_widths) < 2):
        raise QCompileError(
            f"bit widths other than 8 are for the FPGA-like target, not '{profile.name}'",
            hint="compile with --target fpga (ONNX Runtime's CPU/GPU kernels are 8-bit)",
        )
    if options.int4_weights and (not profile.int4_weights or options.integer_only):
        raise QCompileError(
            "INT4 weight-only MatMuls keep FP32 activations: they are for the cpu and gpu "
            "targets, not integer-only graphs",
            hint="drop --int4-weights, or use --weight-bits 4 on the fpga target",
        )


def already_quantized_error(listed: str) -> QCompileError:
    return QCompileError(
        f"the model is already quantized ({listed}); quantizing it again would round twice",
        hint="--already-quantized keep returns it unchanged; --already-quantized "
        "requantize dequantizes its QDQ pairs and compiles it afresh",
    )


def plan_has_work(
    plan: QuantPlan, profile: TargetProfile, options: CompileOptions, model: ir.Model | None = None
) -> None:
    if options.int4_weights and not plan.int4_nodes:
        patterns = ", ".join(m.pattern for m in options.int4_weights)
        raise QCompileError(
            f"--int4-weights {patterns} matches no MatMul with a constant 2-D weight",
            hint="INT4 weights apply to MatMul (our fusions turn 2-D MatMul + Add into Gemm, "
            "which stays INT8); `qcompile inspect` lists the nodes",
        )
    if not plan.nodes and not plan.int4_nodes:
        ops = collections.Counter(n.op_type for n in model.graph) if model is not None else {}
        listed = ", ".join(f"{op}×{n}" for op, n in sorted(ops.items())[:12])
        compute = "/".join(sorted(profile.compute_ops))
        raise QCompileError(
            f"nothing in this model can be quantized for target {profile.name}: it has no "
            f"{compute} with a constant weight and no op between quantized ones"
            + (f" (its ops: {listed})" if listed else ""),
            hint="run `qcompile inspect` to see each node's reason",
        )


def disabled_passes(pipe: Pipeline, options: CompileOptions) -> frozenset[str]:
    """Validate --disable-pass names against the target's pipeline."""
    known = {pass_name(p) for p in (*pipe.rewrite, *pipe.lower)} | OPTIONAL_QUANTIZE_PASSES
    for name in options.disabled_passes:
        if name not in known:
            raise QCompileError(
                f"no pass named '{name}' in the {pipe.profile.name} pipeline",
                hint=f"passes that can be disabled: {', '.join(sorted(known))}",
            )
    return frozenset(options.disabled_passes)


def token_mask_input(specs, choice: str | None) -> str | None:
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


def activation_spec(profile: TargetProfile, plan: QuantPlan, tensor: str):
    bits = plan.tensor_bits.get(tensor)
    return (
        profile.activation if bits is None else dataclasses.replace(profile.activation, bits=bits)
    )


def activation_qparams(
    plan: QuantPlan, stats: CalibrationStats, profile: TargetProfile, method: str, percentile: float
) -> dict[str, QParams]:
    """Each calibrated tensor's parameters, read with `method` unless the plan gives the
    tensor a method of its own (per-node overrides)."""
    out = {}
    for t in plan.calibrated_tensors:
        observer = stats.observers[t]
        own = plan.tensor_methods.get(t)
        if isinstance(observer, HistogramObserver) and (own is None or own[0] == "auto"):
            observer = read_as(observer, method, percentile)  # type: ignore[arg-type]
        out[t] = observer.qparams(activation_spec(profile, plan, t))
    return out


def islands_allowed(lowering: LowerToIntegerOnly | None, options: CompileOptions) -> None:
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


def demote(
    model: ir.Model,
    plan: QuantPlan,
    unbounded: set[str],
    profile: TargetProfile,
    options: CompileOptions,
) -> QuantPlan:
    """The plan without the nodes that read or write tensors holding Inf/NaN/sentinels."""
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
