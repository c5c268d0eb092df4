"""ONNX's fused `Attention` (opset 23) written out as the MatMul → Softmax → MatMul
chain that integer-only pipelines lower.

torch's dynamo exporter writes scaled_dot_product_attention as one `Attention` node from
opset 23 on; at opset 18 it writes the chain below, which the integer plan already
quantizes (MatMul of codes, integer Softmax, additive mask as preprocessing). The pass
writes exactly that chain — the same ops, in the same association, as the opset-18
export of the same model:

    Y = MatMul(Where(IsNaN(P), 0, P), V),   P = Softmax(MatMul(Q·√s, Kᵀ·√s) + bias)

with bias = Where(mask, 0, −inf) for a boolean mask and the mask itself for a float one.
The IsNaN guard gives fully masked rows zero probabilities, as the operator's function
body does (a row of −inf scores has no softmax).

Why not expand the operator's function body (onnx.defs' context-dependent function)?
It is written for every case at once — grouped-query heads, KV cache, causal masks,
softcapping — and leaves Shape/Equal/Where/Expand/Reshape chains that fold only for static
head counts and an unused all-masked-rows ReduceMax branch; the integer plan would have to
recognise all of it. The cases written here are the ones exporters emit for encoders and
decoders without a cache: 4-D Q/K/V with equal head counts, no past key/value, no softcap,
no causal flag, only Y read. Any other Attention node is left as it is (and the integer
plan then names it).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import add_initializer


def _decomposable(node: ir.Node) -> bool:
    """Whether `node` is an Attention this pass writes out (see the module docstring)."""
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
        return False
    if any(v is not None for v in node.inputs[4:]) or len(node.inputs) < 3:
        return False
    if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
        return False
    attrs = node.attributes
    if attrs.get_float("softcap", 0.0) != 0.0 or attrs.get_int("is_causal", 0):
        return False
    q, k, v = node.inputs[:3]
    shapes = [x.shape if x is not None else None for x in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        return False
    heads = {shapes[0][1], shapes[1][1], shapes[2][1]}
    if len(heads) != 1 or not isinstance(shapes[0][1], int):
        return False  # grouped-query heads would need K/V expanded first
    return attrs.get_float("scale", 0.0) > 0 or isinstance(shapes[0][3], int)


def _scale(node: ir.Node) -> float:
    """The attribute's scale, or 1/√(head size) as the operator defines its default."""
    scale = node.attributes.get_float("scale", 0.0)
    return scale if scale > 0 else 1.0 / math.sqrt(node.inputs[0].shape[3])


class DecomposeAttention(ir.passes.InPlacePass):
    """Attention (opset 23) → Mul/Transpose/MatMul/Add/Softmax/MatMul, as torch's opset-18
    export of scaled_dot_product_attention writes it. Only integer-only pipelines run it;
    the QDQ targets keep the fused operator for ONNX Runtime's kernel."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in [n for n in graph if _decomposable(n)]:
            self._write_out(graph, node)
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _write_out(graph: ir.Graph, node: ir.Node) -> None:
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        y = node.outputs[0]
        base = node.name or "attention"
        b, h, sq, _ = q.shape
        skv = k.shape[2]
        root = np.float32(math.sqrt(_scale(node)))
        sqrt_scale = add_initializer(graph, f"{base}_sqrt_scale", np.array(root))
        made: list[ir.Node] = []

        def emit(op: str, inputs, shape, dtype=ir.DataType.FLOAT, **attributes) -> ir.Value:
            step = ir.node(op, inputs, attributes=attributes, name=f"{base}_{op}_{len(made)}")
            out = step.outputs[0]
            out.name, out.dtype = f"{step.name}_out", dtype
            out.shape = ir.Shape(shape) if shape is not None else None
            made.append(step)
            return out

        kt = emit("Transpose", [k], [b, h, k.shape[3], skv], perm=[0, 1, 3, 2])
        scores = emit(
            "MatMul",
            [
                emit("Mul", [q, sqrt_scale], list(q.shape)),
                emit("Mul", [kt, sqrt_scale], [b, h, k.shape[3], skv]),
            ],
            [b, h, sq, skv],
        )
        if mask is not None:
            if mask.dtype == ir.DataType.BOOL:
                zero = add_initializer(graph, f"{base}_zero", np.array(0.0, np.float32))
                minus_inf = add_initializer(
                    graph, f"{base}_minus_inf", np.array(-np.inf, np.float32)
                )
                shape = list(mask.shape) if mask.shape is not None else None
                mask = emit("Where", [mask, zero, minus_inf], shape)
            scores = emit("Add", [scores, mask], [b, h, sq, skv])
        probs = emit("Softmax", [scores], [b, h, sq, skv], axis=-1)
        nan = emit("IsNaN", [probs], [b, h, sq, skv], dtype=ir.DataType.BOOL)
        zero_p = add_initializer(graph, f"{base}_zero_prob", np.array(0.0, np.float32))
        safe = emit("Where", [nan, zero_p, probs], [b, h, sq, skv])
        out = emit("MatMul", [safe, v], list(y.shape) if y.shape is not None else None)
        graph.insert_before(node, made)
        if y.is_graph_output():  # the graph output keeps its name
            name, y.name = y.name, f"{y.name}_fused"
            out.name = name
        ir.convenience.replace_all_uses_with(y, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
