"""Deciding what to quantize: which nodes, which tensors, and why not the others.

The plan is computed from the graph, the target profile and the options alone, before
any calibration, so calibration only observes the tensors that will be quantized and
`qcompile inspect` can show the decisions without running anything.

Rules (chosen so ORT's CPU EP and TensorRT fuse the result into integer kernels):
- compute ops (Conv, Gemm, MatMul...) quantize activation inputs, weights (per output
  channel), the bias (int32, scale s_x·s_w) and their output;
- arithmetic ops (Add, Concat, pools, Sigmoid...) quantize all float inputs and outputs;
- data-movement ops (Reshape, MaxPool...) are quantized only when their input already is,
  and their output shares the input's parameters so ORT can drop the Q/DQ pair;
- a Relu/Clip that alone consumes a quantized op's output is folded into it: the
  activation's output is what gets quantized, and where the quantizer's clamp reproduces
  the activation exactly (zero point at qmin) the activation node is removed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompile.options import CompileOptions
from qcompile.profile import TargetProfile, standard_op
from qcompile.quantize.integer_scope import (
    LOWERED_WHEN_QUANTIZED,
    left_unquantized,
    read_as_codes,
    rewired_for_kernels,
)
from qcompile.quantize.kept_float import kept_float_reason
from qcompile.quantize.quant_plan import FLOAT_TYPES, BiasUse, NodeKind, QuantPlan, WeightUse
from qcompile.quantize.weight_only import int4_eligible
from qcompile.quantize.wide_inputs import wide_add_inputs

logger = logging.getLogger(__name__)


def _is_float(value: ir.Value | None) -> bool:
    if value is None:
        return False
    # Unknown dtype: assume float (calibration records the real one).
    return value.dtype is None or value.dtype in FLOAT_TYPES


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None:
        return None
    return value.const_value


def _weight_axis(
    node: ir.Node, weight: ir.TensorProtocol, profile: TargetProfile, per_channel: bool
) -> int | None:
    if not (per_channel and profile.per_channel_weights):
        return None
    rank = len(weight.shape)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        group = node.attributes.get_int("group", 1)
        return 1 if group == 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1 if (rank == 2 and profile.per_channel_matmul) else None
    return None


def _node_kind(node: ir.Node, profile: TargetProfile, options: CompileOptions) -> NodeKind | None:
    op = node.op_type
    if standard_op(node.domain, op) is None:
        return None  # (com.microsoft's Gelu/FastGelu are ONNX's Gelu before opset 20)
    if op in profile.compute_ops:
        return "compute"
    if op == "Softmax" and not options.quantize_softmax:
        return None
    if op in profile.arith_ops:
        return "arith"
    if op in profile.passthrough_ops:
        return "passthrough"
    return None


def _activation_inputs(node: ir.Node, kind: NodeKind) -> list[int]:
    """Input indices of `node` that are quantized as activations."""
    op = node.op_type
    if kind == "passthrough":
        return [0]
    if op in ("Conv", "ConvTranspose", "Gemm"):
        return [0]
    if op == "MatMul":
        return [0] if _const(node.inputs[1]) is not None else [0, 1]
    if op in ("Add", "Mul", "Concat"):
        return list(range(len(node.inputs)))
    return [0]


def build_plan(
    model: ir.Model,
    profile: TargetProfile,
    options: CompileOptions,
    demoted: dict[str, str] | None = None,
) -> QuantPlan:
    """The plan for `model`; `demoted` maps node names forced to stay float to the reason."""
    graph = model.graph
    demoted = demoted or {}
    plan = QuantPlan()
    nodes = list(graph)
    kinds: dict[str, NodeKind] = {}
    graph_outputs = {v.name for v in graph.outputs}

    # 0. Ops kept FP32 by design are reported, so users see where the float time goes.
    for node in nodes:
        reason = kept_float_reason(node)
        if reason:
            plan.skipped[node.name or ""] = reason

    # 1. Candidate compute/arith nodes.
    for node in nodes:
        if options.wants_int4(node.name or "", node.op_type):
            if int4_eligible(node):
                plan.int4_nodes.add(node.name or "")
                plan.skipped[node.name or ""] = "INT4 weights, FP32 activations (MatMulNBits)"
                continue
            logger.warning(
                "node %s matches --int4-weights but has no constant 2-D weight: it is "
                "quantized as usual",
                node.name,
            )
        kind = _node_kind(node, profile, options)
        if kind is None or kind == "passthrough":
            continue
        name = node.name or ""
        if options.is_excluded(name, node.op_type):
            plan.skipped[name] = "excluded by option"
            continue
        if name in demoted:
            plan.skipped[name] = demoted[name]
            continue
        act_idx = _activation_inputs(node, kind)
        ins = [node.inputs[i] for i in act_idx if i < len(node.inputs)]
        if not ins or not all(_is_float(v) for v in ins if v is not None):
            plan.skipped[name] = "inputs are not float"
            continue
        if kind == "compute":
            reason = _compute_weight_problem(node)
            if reason:
                plan.skipped[name] = reason
                continue
        kinds[name] = kind

    # 1b. An arithmetic op is worth an integer kernel only inside an integer chain: when
    # its output reaches a quantized op (through data movement or a foldable activation).
    # Otherwise its result is dequantized at once, and the rounding costs accuracy for
    # nothing: in transformers, residual Adds feeding LayerNorm would clip the famous
    # outlier channels; a bias Add after a MatMul would stop ORT from using
    # MatMulIntegerToFloat.
    reaches: dict[str, bool] = {}
    through = profile.passthrough_ops | profile.fusible_activations

    def reaches_int(value: ir.Value) -> bool:
        if value.name in reaches:
            return reaches[value.name]
        reaches[value.name] = False  # cycle guard
        result = False
        for use in value.uses():
            n = use.node
            k = kinds.get(n.name or "")
            if (k == "compute" and not _chain_only(n)) or (
                k is not None and _chain_only(n) and keep_arith(n)
            ):
                result = True
            elif n.op_type in through and not options.is_excluded(n.name or "", n.op_type):
                result = any(reaches_int(out) for out in n.outputs)
            if result:
                break
        reaches[value.name] = result
        return result

    kept: dict[str, bool] = {}

    def keep_arith(node: ir.Node) -> bool:
        if node.name not in kept:
            kept[node.name] = False
            kept[node.name] = any(reaches_int(out) for out in node.outputs)
        return kept[node.name]

    # Integer-only graphs want every op in integers, chain or not: rules 1b and 1c are off.
    integer_only = profile.integer_only or options.integer_only
    for name, reason in left_unquantized(nodes).items() if integer_only else ():
        if kinds.pop(name, None) is not None:  # quantize/integer_scope.py says why
            plan.skipped[name] = reason
    for node in () if integer_only else reversed(nodes):
        name = node.name or ""
        if kinds.get(name) in ("arith", "compute") and _chain_only(node) and not keep_arith(node):
            del kinds[name]
            plan.skipped[name] = (
                "MatMul of two activations whose result stays float: ORT has no integer kernel for it"
                if node.op_type == "MatMul"
                else "its result feeds no integer op (an integer kernel would gain nothing)"
            )

    # 1c. A Mul/Add of a float tensor by a constant (input normalization, SmoothQuant's
    # explicit scale) gains nothing from an integer kernel unless its input already is
    # integer: quantizing both sides would round twice. Its output is quantized by its
    # consumers instead.
    for node in () if integer_only else nodes:
        name = node.name or ""
        if kinds.get(name) != "arith" or node.op_type not in ("Mul", "Add"):
            continue
        variable = [v for v in node.inputs if v is not None and _const(v) is None]
        if len(variable) == len(node.inputs):
            continue
        if not any(v.producer() is not None and v.producer().name in kinds for v in variable):
            del kinds[name]
            plan.skipped[name] = (
                "constant scaling of a float tensor (its consumers quantize the result)"
            )

    # 2. Fold Relu/Clip into their producer's output quantizer.
    fused_output: dict[str, ir.Value] = {}  # producer node -> value to quantize instead
    for node in nodes:
        name = node.name or ""
        if kinds.get(name) not in ("compute", "arith") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if out.name in graph_outputs or len(uses) != 1:
            continue
        act = uses[0].node
        if act.op_type not in profile.fusible_activations or options.is_excluded(
            act.name or "", act.op_type
        ):
            continue
        if act.op_type == "Clip" and not _clip_bounds_constant(act):
            continue
        plan.fused_activations[act.name or ""] = name
        fused_output[name] = act.outputs[0]

    # 3. Data-movement nodes follow their (quantized or fused-into-quantized) producer.
    for node in nodes:
        name = node.name or ""
        kind = kinds.get(name)
        if kind is None and _node_kind(node, profile, options) == "passthrough":
            src = node.inputs[0] if node.inputs else None
            producer = src.producer() if src is not None else None
            if options.is_excluded(name, node.op_type):
                plan.skipped[name] = "excluded by option"
            elif (
                src is not None
                and _is_float(src)
                and producer is not None
                and (
                    producer.name in kinds
                    or producer.name in plan.fused_activations
                    or (integer_only and producer.op_type in LOWERED_WHEN_QUANTIZED)
                )
            ):
                kinds[name] = "passthrough"

    # 3b. y = x · k with a positive scalar k and x quantized: no op at all. Its readers
    # dequantize x's integers with scale k·s_x (a "scale alias"), as exact as the Mul.
    for node in nodes:
        name = node.name or ""
        alias = _scale_alias(node, kinds, graph_outputs)
        if alias is not None:
            del kinds[name]
            plan.aliases[node.outputs[0].name] = alias
            plan.skipped[name] = "positive scalar scale folded into the dequantizer"

    # 4. Tensors: activation inputs of quantized nodes, and outputs with quantized consumers.
    # Integer-only Adds read a Linear layer's accumulator wide (quantize/wide_inputs.py).
    wide, lookups = wide_add_inputs(nodes, kinds, graph_outputs) if integer_only else ({}, [])
    for gather in lookups:  # an embedding table, quantized per column (wide_inputs.py)
        table = gather.inputs[0]
        axis = 1 if options.per_channel is not False else None
        plan.weights.append(WeightUse(gather.name or "", 0, table.name, axis))

    def consumer_quantized(value: ir.Value) -> bool:
        return any(
            (u.node.name or "") in kinds and u.idx not in wide.get(u.node.name or "", ())
            for u in value.uses()
        )

    for node in nodes:
        name = node.name or ""
        kind = kinds.get(name)
        if kind is None:
            continue
        plan.nodes[name] = kind
        for i in _activation_inputs(node, kind):
            if name in wide and (i in wide[name] or _const(node.inputs[i]) is not None):
                continue
            if i < len(node.inputs) and node.inputs[i] is not None:
                # Constant operands of Add/Mul/Concat are quantized like activations
                # (same type, per tensor); calibration observes them like any tensor.
                _add_tensor(plan, node.inputs[i].name, name)
        outs = [fused_output[name]] if name in fused_output else list(node.outputs)
        for out in outs:
            if not _is_float(out):
                continue
            # ORT fuses Conv/Gemm into integer kernels only with a quantized output; a
            # MatMul whose consumers stay float becomes MatMulIntegerToFloat instead.
            # Graph outputs stay float unless quantized nodes also read them: a head's
            # output precision is the user's accuracy, not ours to spend.
            # Also quantized for float readers: a wide Add's sum (the lowering keeps 16
            # bits of its calibrated range for a LayerNorm) and, integer-only, moved
            # integers (a LayerNorm/Softmax after a Transpose/Flatten reads them as they
            # are). Never when the reader takes the value wide.
            must = (
                (kind == "compute" and node.op_type != "MatMul")
                or name in wide
                or (integer_only and kind == "passthrough")
                or (integer_only and read_as_codes(out))  # SiLU → ReduceMean
            )
            read_wide = any(u.idx in wide.get(u.node.name or "", ()) for u in out.uses())
            must = must and out.name not in graph_outputs and not read_wide
            if must or consumer_quantized(out):
                plan.tensors.setdefault(out.name, out.name)
                plan.consumers.setdefault(out.name, [])
            if must:
                plan.rewire_all.add(out.name)
        if kind == "compute":
            _add_weight_and_bias(plan, node, profile, options)
    for value in rewired_for_kernels(nodes, graph_outputs) if integer_only else ():
        plan.tensors.setdefault(value.name, value.name)  # LN → LN, GRN input
        plan.consumers.setdefault(value.name, [])
        plan.rewire_all.add(value.name)

    # 4b. Scale aliases: the source is quantized (even if the removed Mul was its only
    # reader); the alias itself needs no statistics of its own.
    for source, _ in plan.aliases.values():
        plan.tensors.setdefault(source, source)
        plan.consumers.setdefault(source, [])
        plan.alias_sources.add(source)

    # 5. Data-movement outputs share their input's parameters.
    for node in nodes:
        name = node.name or ""
        if kinds.get(name) != "passthrough":
            continue
        src = node.inputs[0].name
        if src in plan.aliases:
            continue  # an alias's scale differs from its source's: keep own statistics
        for out in node.outputs:
            if out.name in plan.tensors:
                plan.tensors[out.name] = plan.tensors.get(src, src)

    # 5b. An alias uses its source's statistics (resolved after step 5 remapped sources).
    # The Mul is removed either way, so float readers also go through the alias's DQ.
    for alias, (source, _) in plan.aliases.items():
        plan.tensors[alias] = plan.tensors[source]

    # 6. Per-node calibration and bit-width overrides apply to the node's output tensors.
    for node in nodes:
        override = options.override_for(node.name or "", node.op_type)
        if override is None:
            continue
        if override.weight_bits is not None and any(w.node == node.name for w in plan.weights):
            plan.weight_bits[node.name] = override.weight_bits
        outs = [fused_output[node.name]] if node.name in fused_output else node.outputs
        for out in outs:
            if out.name not in plan.tensors:
                continue
            if override.activation_bits is not None:
                plan.tensor_bits[out.name] = override.activation_bits
            if override.calib_method is not None or override.percentile is not None:
                plan.tensor_methods[out.name] = (
                    override.calib_method or options.calib_method,
                    override.percentile or options.percentile,
                )

    # 7. Attention probabilities: the first input of a two-activation MatMul that comes
    # from a Softmax gets a log2 quantizer when asked (fpga).
    if options.softmax_log2_bits is not None:
        for node in nodes:
            if node.op_type != "MatMul" or node.name not in plan.nodes:
                continue
            probs = node.inputs[0]
            if _const(node.inputs[1]) is not None or probs.name not in plan.tensors:
                continue
            if plan.tensors[probs.name] == probs.name and _after_softmax(probs):
                plan.log2_tensors[probs.name] = options.softmax_log2_bits
    return plan


def _after_softmax(value: ir.Value, depth: int = 4) -> bool:
    """Produced by a Softmax, directly or through masking/layout ops (BERT's Where)."""
    producer = value.producer()
    if producer is None or depth == 0:
        return False
    if producer.op_type == "Softmax":
        return True
    if producer.op_type in ("Where", "Reshape", "Transpose", "Identity", "Cast"):
        data = producer.inputs[1:] if producer.op_type == "Where" else producer.inputs[:1]
        return any(v is not None and _after_softmax(v, depth - 1) for v in data)
    return False


def nodes_touching(model: ir.Model, plan: QuantPlan, tensors: set[str]) -> set[str]:
    """Quantized nodes that read or write any of `tensors`."""
    found = set()
    for node in model.graph:
        if node.name not in plan.nodes:
            continue
        names = {v.name for v in node.inputs if v is not None} | {v.name for v in node.outputs}
        if node.name in plan.fused_activations.values():
            # a folded activation's output is its producer's quantized output
            for act, producer in plan.fused_activations.items():
                if producer == node.name:
                    names |= {v.name for n in model.graph if n.name == act for v in n.outputs}
        if names & tensors:
            found.add(node.name)
    return found


def _scale_alias(
    node: ir.Node, kinds: dict[str, NodeKind], graph_outputs: set[str]
) -> tuple[str, float] | None:
    if kinds.get(node.name or "") != "arith" or node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    consts = [v for v in node.inputs if _const(v) is not None]
    if len(consts) != 1 or consts[0].const_value.size != 1 or node.outputs[0].name in graph_outputs:
        return None
    k = float(consts[0].const_value.numpy().reshape(()))
    x = next(v for v in node.inputs if _const(v) is None)
    producer = x.producer()
    if not (k > 0 and np.isfinite(k)) or producer is None or producer.name not in kinds:
        return None
    return x.name, k


def _chain_only(node: ir.Node) -> bool:
    """Ops worth integer kernels only inside an integer chain: elementwise/pool ops, and
    a MatMul of two activations (QLinearMatMul needs a quantized output; there is no
    integer-to-float kernel for two dynamic inputs)."""
    if node.op_type == "MatMul":
        return len(node.inputs) > 1 and _const(node.inputs[1]) is None
    return node.op_type not in ("Conv", "ConvTranspose", "Gemm")


def _add_tensor(plan: QuantPlan, tensor: str, consumer: str) -> None:
    plan.tensors.setdefault(tensor, tensor)
    plan.consumers.setdefault(tensor, [])
    if consumer not in plan.consumers[tensor]:
        plan.consumers[tensor].append(consumer)


def _compute_weight_problem(node: ir.Node) -> str | None:
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "Gemm"):
        if len(node.inputs) < 2 or _const(node.inputs[1]) is None:
            return "weight is not a constant initializer"
        if op == "Gemm" and node.attributes.get_int("transA", 0):
            return "Gemm with transA is not quantized"
    return None


def _clip_bounds_constant(node: ir.Node) -> bool:
    return all(v is None or _const(v) is not None for v in node.inputs[1:3])


def _add_weight_and_bias(
    plan: QuantPlan, node: ir.Node, profile: TargetProfile, options: CompileOptions
) -> None:
    name = node.name or ""
    weight_value = node.inputs[1] if len(node.inputs) > 1 else None
    weight = _const(weight_value)
    if weight is None or weight_value is None:
        return  # MatMul of two activations: both quantized as activations
    override = options.override_for(name, node.op_type)
    per_channel = (
        options.per_channel
        if override is None or override.per_channel is None
        else override.per_channel
    )
    axis = _weight_axis(node, weight, profile, per_channel)
    plan.weights.append(WeightUse(name, 1, weight_value.name, axis))
    if (
        node.op_type in ("Conv", "ConvTranspose", "Gemm")
        and len(node.inputs) > 2
        and node.inputs[2] is not None
    ):
        bias = node.inputs[2]
        bias_const = _const(bias)
        n_out = weight.shape[axis] if axis is not None else None
        if (
            bias_const is not None
            and len(bias_const.shape) == 1
            and (n_out is None or bias_const.shape[0] == n_out)
        ):
            plan.biases.append(BiasUse(name, 2, bias.name, node.inputs[0].name, weight_value.name))


__all__ = ["QuantPlan", "build_plan", "nodes_touching"]
