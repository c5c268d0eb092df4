"""InsertQDQ: rewrite an FP32 graph into a QDQ graph following a QuantPlan.

Activations get a QuantizeLinear→DequantizeLinear pair (one per tensor, read only by
quantized consumers, so float consumers keep full precision). Weights become int8
initializers behind a DequantizeLinear (per output channel where the plan says so);
biases become int32 with scale s_x·s_w, which is what ORT's QLinearConv/QGemm and
TensorRT expect. Folded Relu/Clip nodes are removed where the output quantizer's clamp
reproduces them exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.calibrate.observers import weight_qparams
from qcompile.errors import QCompileError
from qcompile.ir.graph import add_initializer, source_quantizer, values_by_name
from qcompile.numerics.qparams import QParams, quantize
from qcompile.profile import TargetProfile
from qcompile.quantize.log2 import insert_log2_pair
from qcompile.quantize.quant_plan import QuantPlan

logger = logging.getLogger(__name__)

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
SHAPE_ONLY = frozenset({"Shape", "Size"})
INT32_MAX = np.iinfo(np.int32).max
# Keep quantized biases below 2^30 so accumulator + bias has headroom.
BIAS_LIMIT = float(2**30)


class _Names:
    """Unique value names derived from existing ones."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used: set[str] = {v.name for v in graph.inputs if v.name}
        self.used |= set(graph.initializers)
        for node in graph:
            self.used |= {v.name for v in node.outputs if v.name}

    def make(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def activation_removable(act: ir.Node, qp: QParams) -> bool:
    """True when Q(x) already clamps exactly as Relu/Clip(x) would."""
    if qp.per_channel or int(qp.zero_point) != qp.spec.qmin:
        return False  # the quantizer's lower clamp is at real value 0 only when zp == qmin
    hi_real = float(qp.scale) * (qp.spec.qmax - qp.spec.qmin)
    if act.op_type == "Relu":
        return True
    if act.op_type == "Clip":
        lo = _clip_bound(act, 1, act.attributes.get_float("min", -np.inf))
        hi = _clip_bound(act, 2, act.attributes.get_float("max", np.inf))
        return lo == 0.0 and hi_real <= hi * (1 + 1e-6)
    return False


def _clip_bound(node: ir.Node, index: int, default: float) -> float:
    if index < len(node.inputs) and node.inputs[index] is not None:
        tensor = node.inputs[index].const_value
        if tensor is None:
            return float("nan")
        return float(tensor.numpy())
    return default


class InsertQDQ(ir.passes.InPlacePass):
    """Insert Q/DQ for activations and quantize weights and biases, as the plan says.

    Requires: no QuantizeLinear/DequantizeLinear on the tensors the plan quantizes.
    Ensures: every planned tensor is read by its quantized consumers through a DQ.
    """

    def __init__(
        self,
        plan: QuantPlan,
        activation_qparams: Mapping[str, QParams],
        profile: TargetProfile,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.qparams = activation_qparams
        self.weight_spec = profile.weight
        self.remove_activations = profile.remove_clamping_activations
        self.removed_activations: list[str] = []
        # quantized tensor -> name of its DequantizeLinear output (for reports)
        self.dq_outputs: dict[str, str] = {}

    def ensures(self, model: ir.Model) -> None:
        """Well-formed pairs: every DequantizeLinear reads a constant or the integers of a
        QuantizeLinear (through the Clip that narrows sub-8-bit codes), and every
        QuantizeLinear reads a float tensor."""
        for node in model.graph:
            x = node.inputs[0] if node.inputs else None
            if x is None:
                continue
            if (
                node.op_type == "DequantizeLinear"
                and x.const_value is None
                and source_quantizer(node) is None
                and not _integer_codes(x)
            ):
                raise RuntimeError(
                    f"InsertQDQ left DequantizeLinear {node.name} reading {x.name}, "
                    "which no QuantizeLinear produced"
                )
            if node.op_type == "QuantizeLinear" and x.dtype not in _FLOAT_TYPES:
                raise RuntimeError(f"InsertQDQ left QuantizeLinear {node.name} on {x.dtype}")

    def requires(self, model: ir.Model) -> None:
        missing = [t for t in set(self.plan.tensors.values()) if t not in self.qparams]
        if missing:
            raise QCompileError(
                "no calibration statistics for a tensor the plan quantizes",
                tensor=missing[0],
                hint="calibrate with data that reaches this tensor",
            )
        for node in model.graph:
            if (
                node.op_type in QDQ_OPS
                and node.inputs[0] is not None
                and node.inputs[0].name in self.plan.tensors
            ):
                raise QCompileError(
                    "tensor is already quantized", tensor=node.inputs[0].name, node=node.name
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = _Names(graph)
        nodes = {n.name: n for n in graph}
        if self.remove_activations:
            self._remove_clamping_activations(graph, nodes)
        values = values_by_name(graph)
        modified = bool(self.removed_activations)

        q_outputs: dict[str, ir.Value] = {}
        for tensor, source in self.plan.tensors.items():
            if tensor in self.plan.aliases:
                continue  # after their sources, below
            value = values.get(tensor)
            if value is None:
                raise QCompileError("planned tensor not found in the graph", tensor=tensor)
            if not self._gets_qdq(tensor):
                continue
            consumers = self.plan.consumers.get(tensor, [])
            rewire_all = tensor in self.plan.rewire_all
            qp = self.qparams[source]
            if value.const_value is not None:
                # a constant operand (e.g. of an Add): quantized once, here, not at run time
                array = value.const_value.numpy().astype(np.float32)
                dq_out = self._quantize_weight(graph, names, value, array, qp)
                q_out = None
            elif tensor in self.plan.log2_tensors:
                q_out, dq_out = insert_log2_pair(
                    graph,
                    value,
                    self.plan.log2_tensors[tensor],
                    names.make,
                    lambda base, array: self._initializer(graph, names, base, array),
                )
            else:
                q_out, dq_out = self._qdq_pair(graph, names, value, qp)
                q_outputs[tensor] = q_out
            self.dq_outputs[tensor] = dq_out.name
            for use in list(value.uses()):
                if use.node.op_type in QDQ_OPS and use.node.inputs[0] is value:
                    continue  # our own QuantizeLinear
                if use.node.op_type in SHAPE_ONLY and q_out is not None:
                    # Shape needs no values: reading the int tensor keeps the DQ fusable
                    use.node.replace_input_with(use.idx, q_out)
                elif rewire_all or use.node.name in consumers:
                    use.node.replace_input_with(use.idx, dq_out)
            modified = True

        for alias, (source, _k) in self.plan.aliases.items():
            if source in q_outputs and alias in values:
                self._alias(
                    graph,
                    names,
                    values[alias],
                    q_outputs[source],
                    effective_qparams(self.plan, self.qparams, alias),
                )
                modified = True

        biases = {b.node: b for b in self.plan.biases}
        quantized_weights: dict[tuple[str, int | None, bytes], tuple[ir.Value, QParams]] = {}
        for w in self.plan.weights:
            node = nodes[w.node]
            value = node.inputs[w.input_index]
            array = value.const_value.numpy().astype(np.float32)
            qp = weight_qparams(array, self.plan.weight_spec(w.node, self.weight_spec), w.axis)
            bias = biases.get(w.node)
            x_qp = effective_qparams(self.plan, self.qparams, bias.activation) if bias else None
            if bias is not None:
                qp = _fit_bias(
                    qp, node.inputs[bias.input_index].const_value.numpy(), x_qp, node.name
                )
            key = (w.tensor, w.axis, qp.scale.tobytes())
            if key not in quantized_weights:
                quantized_weights[key] = (self._quantize_weight(graph, names, value, array, qp), qp)
            node.replace_input_with(w.input_index, quantized_weights[key][0])
            if bias is not None:
                bias_value = node.inputs[bias.input_index]
                node.replace_input_with(
                    bias.input_index,
                    self._quantize_bias(graph, names, bias_value, x_qp, qp, node.name),
                )
            modified = True
        graph.sort()
        return ir.passes.PassResult(model, modified)

    # -- pieces ---------------------------------------------------------------------------

    def _gets_qdq(self, tensor: str) -> bool:
        return (
            bool(self.plan.consumers.get(tensor))
            or tensor in self.plan.rewire_all
            or tensor in self.plan.alias_sources
        )

    def _alias(
        self, graph: ir.Graph, names: _Names, alias: ir.Value, q_source: ir.Value, qp: QParams
    ) -> None:
        """Replace `alias = source · k` by a DequantizeLinear of the source's integers at k·s."""
        mul = alias.producer()
        base = alias.name
        scale = self._initializer(graph, names, f"{base}_scale", np.asarray(qp.scale, np.float32))
        zp = self._initializer(graph, names, f"{base}_zero_point", np.asarray(qp.zero_point))
        dq = _dequantize_node(names, base, [q_source, scale, zp], None, alias.shape)
        graph.insert_after(q_source.producer(), dq)
        alias.replace_all_uses_with(dq.outputs[0])
        graph.remove(mul, safe=True)
        self.dq_outputs[alias.name] = dq.outputs[0].name

    def _remove_clamping_activations(self, graph: ir.Graph, nodes: dict[str, ir.Node]) -> None:
        graph_outputs = {v.name for v in graph.outputs}
        for act_name in self.plan.fused_activations:
            act = nodes[act_name]
            out = act.outputs[0]
            if (
                out.name not in self.plan.tensors
                or out.name in graph_outputs
                or not self._gets_qdq(out.name)
            ):
                continue  # without a quantizer right after it, the activation must stay
            if not activation_removable(act, self.qparams[self.plan.tensors[out.name]]):
                continue
            src = act.inputs[0]
            name = out.name
            out.replace_all_uses_with(src)
            graph.remove(act, safe=True)
            src.name = name
            self.removed_activations.append(act_name)
            del nodes[act_name]

    def _initializer(
        self, graph: ir.Graph, names: _Names, base: str, array: np.ndarray
    ) -> ir.Value:
        return add_initializer(graph, base, array, names.used)

    def _qdq_pair(
        self, graph: ir.Graph, names: _Names, value: ir.Value, qp: QParams
    ) -> tuple[ir.Value, ir.Value]:
        base = value.name
        scale = self._initializer(graph, names, f"{base}_scale", np.asarray(qp.scale, np.float32))
        zp = self._initializer(graph, names, f"{base}_zero_point", np.asarray(qp.zero_point))
        q_node = ir.node(
            "QuantizeLinear", [value, scale, zp], name=names.make(f"{base}_QuantizeLinear")
        )
        q_node.outputs[0].name = names.make(f"{base}_quantized")
        added = [q_node]
        q_out = q_node.outputs[0]
        q_out.dtype, q_out.shape = ir.DataType.from_numpy(q_dtype(qp)), value.shape
        if (qp.spec.qmin, qp.spec.qmax) != _storage_range(qp.spec):
            # narrower than its int8/uint8 storage (2-7 bits): QuantizeLinear saturates at
            # the storage type's bounds only, so an integer Clip narrows the range
            lo = self._initializer(
                graph, names, f"{base}_qmin", np.asarray(qp.spec.qmin, q_dtype(qp))
            )
            hi = self._initializer(
                graph, names, f"{base}_qmax", np.asarray(qp.spec.qmax, q_dtype(qp))
            )
            clip = ir.node("Clip", [q_out, lo, hi], name=names.make(f"{base}_narrow"))
            clip.outputs[0].name = names.make(f"{base}_quantized_{qp.spec.bits}bit")
            added.append(clip)
            clip.outputs[0].dtype, clip.outputs[0].shape = q_out.dtype, q_out.shape
            q_out = clip.outputs[0]
        dq_node = _dequantize_node(names, base, [q_out, scale, zp], None, value.shape)
        added.append(dq_node)
        dq_out = dq_node.outputs[0]
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, added)
        else:
            graph.insert_before(next(iter(graph)), added)
        return q_out, dq_out

    def _quantize_weight(
        self, graph: ir.Graph, names: _Names, value: ir.Value, w: np.ndarray, qp: QParams
    ) -> ir.Value:
        return self._constant_dq(
            graph, names, value.name, quantize(w, qp), qp.scale, qp.zero_point, qp.axis
        )

    def _quantize_bias(
        self,
        graph: ir.Graph,
        names: _Names,
        value: ir.Value,
        x_qp: QParams,
        w_qp: QParams,
        node: str,
    ) -> ir.Value:
        b = value.const_value.numpy().astype(np.float64)
        scale = (np.float64(x_qp.scale) * w_qp.scale.astype(np.float64)).astype(np.float32)
        q = np.clip(np.rint(b / scale.astype(np.float64)), -INT32_MAX, INT32_MAX).astype(np.int32)
        axis = 0 if scale.ndim == 1 else None
        return self._constant_dq(
            graph, names, value.name, q, scale, np.zeros(scale.shape, np.int32), axis
        )

    def _constant_dq(
        self,
        graph: ir.Graph,
        names: _Names,
        base: str,
        q: np.ndarray,
        scale: np.ndarray,
        zero_point: np.ndarray,
        axis: int | None,
    ) -> ir.Value:
        """An integer initializer behind a DequantizeLinear (weights, biases, constants)."""
        q_init = self._initializer(graph, names, f"{base}_quantized", q)
        s_init = self._initializer(graph, names, f"{base}_scale", np.asarray(scale, np.float32))
        zp_init = self._initializer(graph, names, f"{base}_zero_point", np.asarray(zero_point))
        dq = _dequantize_node(names, base, [q_init, s_init, zp_init], axis, ir.Shape(q.shape))
        graph.insert_before(next(iter(graph)), dq)
        return dq.outputs[0]


def _dequantize_node(
    names: _Names, base: str, inputs: list[ir.Value], axis: int | None, shape: ir.Shape | None
) -> ir.Node:
    """A DequantizeLinear named after `base`, its float output typed and shaped."""
    dq = ir.node(
        "DequantizeLinear",
        inputs,
        attributes={"axis": axis} if axis is not None else {},
        name=names.make(f"{base}_DequantizeLinear"),
    )
    out = dq.outputs[0]
    out.name = names.make(f"{base}_dequantized")
    out.dtype, out.shape = ir.DataType.FLOAT, shape
    return dq


def q_dtype(qp: QParams) -> np.dtype:
    return qp.spec.numpy_dtype


def _storage_range(spec) -> tuple[int, int]:
    info = np.iinfo(spec.numpy_dtype)
    return int(info.min), int(info.max)


def effective_qparams(plan: QuantPlan, qparams: Mapping[str, QParams], tensor: str) -> QParams:
    """The parameters a tensor is dequantized with: a scale alias scales its source's."""
    qp = qparams[plan.tensors[tensor]]
    if tensor in plan.aliases:
        k = plan.aliases[tensor][1]
        return QParams(
            (qp.scale * np.float32(k)).astype(np.float32), qp.zero_point, qp.spec, qp.axis
        )
    return qp


def _fit_bias(w_qp: QParams, bias: np.ndarray, x_qp: QParams, node: str) -> QParams:
    """Widen weight scales where s_x·s_w is too fine for the int32 bias (ORT does the same).

    A near-dead input activation (tiny s_x) would otherwise saturate the bias. Only the
    channels that need it get coarser weights, and the node is named in the log.
    """
    s_x = float(x_qp.scale)
    needed = np.abs(bias.astype(np.float64)) / (s_x * BIAS_LIMIT)
    scale = w_qp.scale.astype(np.float64)
    if not np.any(needed > scale):
        return w_qp
    logger.info(
        "node %s: widening %d weight scale(s) so the int32 bias fits",
        node,
        int(np.sum(needed > scale)),
    )
    if scale.ndim == 0:  # per-tensor weights: one scale must cover every channel's bias
        widened = np.asarray(max(float(scale), float(needed.max())), np.float32)
    else:
        widened = np.maximum(scale, needed).astype(np.float32)
    return QParams(widened, w_qp.zero_point, w_qp.spec, w_qp.axis)


_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


def _integer_codes(value: ir.Value) -> bool:
    """Integer codes computed by integer ops (the log2 quantizer's comparisons) rather
    than a QuantizeLinear."""
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type != "DequantizeLinear"
        and (value.dtype is not None and value.dtype not in _FLOAT_TYPES)
    )
