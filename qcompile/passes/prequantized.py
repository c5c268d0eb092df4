"""Models that arrive already quantized: detect them, and undo QDQ quantization on request.

Quantizing a QDQ model again would stack a second rounding on the first and, worse,
calibrate on tensors that are already coarse. The compiler therefore stops and lets the
user choose (`--already-quantized keep|requantize`); `DequantizeQDQ` implements
"requantize" by turning the model back into FP32: every weight behind a
DequantizeLinear becomes its float value, every QuantizeLinear → DequantizeLinear pair
on an activation disappears. Operator-format models (QLinearConv, ConvInteger...) have no
float ops left to return to and are refused with that reason.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from qcompile.errors import QCompileError
from qcompile.ir.graph import required_source_quantizer

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
OPERATOR_FORMAT_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSoftmax",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
        "QAttention",
    }
)


def _all_nodes(graph: ir.Graph):
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _all_nodes(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield from _all_nodes(g)


def quantized_ops(model: ir.Model) -> dict[str, int]:
    """Quantization ops in the model (subgraphs included), by op type."""
    counts = collections.Counter(
        n.op_type for n in _all_nodes(model.graph) if n.op_type in QDQ_OPS | OPERATOR_FORMAT_OPS
    )
    return dict(sorted(counts.items()))


class DequantizeQDQ(ir.passes.InPlacePass):
    """QDQ model → FP32 model.

    Requires: no operator-format quantized ops (QLinear*, *Integer, dynamic quantization).
    Ensures: no QuantizeLinear/DequantizeLinear left; weights are the float values the
    DequantizeLinear nodes produced (bit for bit: the same arithmetic in float32).
    """

    def requires(self, model: ir.Model) -> None:
        inside = sum(1 for n in _all_nodes(model.graph) if n.op_type in QDQ_OPS) - sum(
            1 for n in model.graph if n.op_type in QDQ_OPS
        )
        if inside:
            raise QCompileError(
                f"{inside} QuantizeLinear/DequantizeLinear node(s) sit inside If/Loop/Scan "
                "subgraphs",
                hint="requantize handles the main graph only; compile the FP32 original",
            )
        found = {k: v for k, v in quantized_ops(model).items() if k in OPERATOR_FORMAT_OPS}
        if found:
            listed = ", ".join(f"{k}×{v}" for k, v in found.items())
            raise QCompileError(
                f"cannot requantize these operator-format ops: {listed}",
                hint="requantize handles QDQ models, ONNX Runtime's QLinear*/QGemm operator "
                "format and quantize_dynamic's output; compile the original FP32 model instead",
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "DequantizeLinear":
                continue
            src = node.inputs[0]
            scale = node.inputs[1].const_value if node.inputs[1] is not None else None
            zp_value = node.inputs[2] if len(node.inputs) > 2 else None
            out = node.outputs[0]
            if src.const_value is not None and scale is not None:
                q = src.const_value.numpy().astype(np.float32)
                s = scale.numpy().astype(np.float32)
                zp = (
                    zp_value.const_value.numpy().astype(np.float32)
                    if zp_value is not None and zp_value.const_value is not None
                    else np.zeros_like(s)
                )
                axis = node.attributes.get_int("axis", 1)
                if s.ndim == 1 and q.ndim > 0:
                    shape = [1] * q.ndim
                    shape[axis % q.ndim] = -1
                    s, zp = s.reshape(shape), zp.reshape(shape)
                real = ((q - zp) * s).astype(np.float32)
                value = ir.Value(name=f"{out.name}_float", shape=ir.Shape(real.shape))
                value.dtype = ir.DataType.FLOAT
                value.const_value = ir.tensor(real, name=value.name)
                graph.register_initializer(value)
                _replace(graph, out, value)
            else:
                q = required_source_quantizer(
                    node, "this is not a QDQ model qcompile can requantize"
                )
                _replace(graph, out, self._saturated(graph, node, q))
            graph.remove(node, safe=True)
            modified = True
        for node in reversed(list(graph)):
            unused = not any(v.uses() or v in graph.outputs for v in node.outputs)
            if node.op_type in ("QuantizeLinear", "Clip") and unused:
                graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _saturated(graph: ir.Graph, dq: ir.Node, q: ir.Node) -> ir.Value:
        """Q → DQ without the rounding: x clamped to the quantizer's range, times the
        dequantizer's own scale factor (a scale alias dequantizes at k·s).

        The clamp is kept because QDQ compilers (qcompile included) delete Relu/ReLU6
        nodes whose clamping the quantizer's saturation reproduces."""
        x = q.inputs[0]
        s_q = float(q.inputs[1].const_value.numpy())
        zp = q.inputs[2].const_value.numpy() if len(q.inputs) > 2 and q.inputs[2] else None
        dtype = np.dtype(zp.dtype) if zp is not None else np.dtype(np.uint8)
        lo_q, hi_q = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        clip = dq.inputs[0].producer()
        if clip is not None and clip.op_type == "Clip":
            lo_q = max(lo_q, int(clip.inputs[1].const_value.numpy()))
            hi_q = min(hi_q, int(clip.inputs[2].const_value.numpy()))
        z = int(zp) if zp is not None else 0
        lo = np.float32((lo_q - z) * s_q)
        hi = np.float32((hi_q - z) * s_q)
        base = dq.outputs[0].name
        bounds = []
        for suffix, bound in (("min", lo), ("max", hi)):
            v = ir.Value(name=f"{base}_{suffix}", shape=ir.Shape([]))
            v.dtype = ir.DataType.FLOAT
            v.const_value = ir.tensor(np.asarray(bound, np.float32), name=v.name)
            graph.register_initializer(v)
            bounds.append(v)
        node = ir.node("Clip", [x, *bounds], name=f"{base}_saturation")
        node.outputs[0].name = f"{base}_saturated"
        node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, x.shape
        graph.insert_before(dq, node)
        y = node.outputs[0]
        s_dq = float(dq.inputs[1].const_value.numpy())
        if s_dq != s_q:  # scale alias: the DQ reads the Q's integers at k·s
            k = ir.Value(name=f"{base}_alias", shape=ir.Shape([]))
            k.dtype = ir.DataType.FLOAT
            k.const_value = ir.tensor(np.asarray(s_dq / s_q, np.float32), name=k.name)
            graph.register_initializer(k)
            mul = ir.node("Mul", [y, k], name=f"{base}_alias_scale")
            mul.outputs[0].name = f"{base}_rescaled"
            mul.outputs[0].dtype, mul.outputs[0].shape = ir.DataType.FLOAT, x.shape
            graph.insert_before(dq, mul)
            y = mul.outputs[0]
        return y


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Readers of `old` read `new`; a graph output keeps its name through an Identity."""
    if old in graph.outputs:
        ident = ir.node("Identity", [new], name=f"{old.name}_identity")
        graph.append(ident)
        index = list(graph.outputs).index(old)
        graph.outputs[index] = ident.outputs[0]
        old.replace_all_uses_with(ident.outputs[0])
        name = old.name
        old.name = f"{name}_quantized_output"
        ident.outputs[0].name, ident.outputs[0].dtype = name, ir.DataType.FLOAT
        ident.outputs[0].shape = old.shape
        graph.outputs[index] = ident.outputs[0]
        return
    old.replace_all_uses_with(new)
