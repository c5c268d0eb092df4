"""ConvNeXt-V2's Global Response Normalization, read back from its elementwise ops.

GRN(x) = γ·(x·N) + β + x on a channels-last [N, H, W, C] tensor, with
G = ‖x‖₂ over the spatial axes (per sample and channel) and N = G / (mean_C(G) + ε).
Both torch exporters write it as

    ReduceL2(x, spatial, keepdims) → ReduceMean(·, last axis) → Add ε → Div(G, ·)
    → Mul(x, ·) → Mul(γ, ·) → Add(·, β) → Add(·, x)

(commuted operands allowed). The integer-only plan quantizes only the chain's input and
output and the lowering computes it as one kernel (`lower/integer_grn.py`): 8-bit
quantization of G, its mean or N in between would lose most of the precision, and a Div
of two activations has no integer form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import const_array, scalar_const
from qcompile.ir.norms import Same, reduces_last_axis


@dataclass(frozen=True)
class GRN:
    """One GRN chain ending in `anchor` (the residual Add)."""

    x: ir.Value
    output: ir.Value
    gamma: np.ndarray
    beta: np.ndarray
    epsilon: float
    nodes: tuple[ir.Node, ...]  # every node of the chain but the anchor


def _split(node: ir.Node, op: str) -> tuple[ir.Value, ir.Value, ir.Node] | None:
    """(the non-constant operand, the other, node) of a two-input `op`, either order."""
    if node is None or node.op_type != op or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is None or b is None:
        return None
    return (b, a, node) if a.const_value is not None else (a, b, node)


def _producer(value: ir.Value, op: str) -> ir.Node | None:
    node = value.producer()
    return node if node is not None and node.op_type == op else None


def _reduced_axes(node: ir.Node) -> list[int] | None:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1:
        found = const_array(node.inputs[1])
        axes = None if found is None else [int(a) for a in found.ravel()]
    return None if axes is None else list(axes)


def _spatial_l2(norm: ir.Node, x: ir.Value) -> bool:
    """ReduceL2 of x over every axis but the first and the last, kept."""
    rank = len(x.shape) if x.shape is not None else None
    axes = _reduced_axes(norm)
    if rank is None or rank < 3 or axes is None or not norm.attributes.get_int("keepdims", 1):
        return False
    return sorted(a % rank for a in axes) == list(range(1, rank - 1))


def _identical(a: ir.Value, b: ir.Value) -> bool:
    return a is b


def _quantized_source(value: ir.Value) -> ir.Value:
    """v for DequantizeLinear(QuantizeLinear(v)), else the value itself."""
    dq = value.producer()
    q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.inputs[0] if q is not None and q.op_type == "QuantizeLinear" else value


def grn_at(anchor: ir.Node, same: Same = _identical) -> GRN | None:
    """The GRN chain whose final residual Add is `anchor`, else None. In a QDQ graph the
    anchor reads both operands through quantizers, and `same` says whether two values
    carry the same integers (x reaches the chain through separate DequantizeLinears)."""
    if anchor.op_type != "Add" or len(anchor.inputs) != 2 or None in anchor.inputs:
        return None
    for x, branch in (anchor.inputs, anchor.inputs[::-1]):
        found = _chain(x, _quantized_source(branch), same)
        if found is not None:
            gamma, beta, epsilon, nodes = found
            return GRN(x, anchor.outputs[0], gamma, beta, epsilon, nodes)
    return None


def _chain(x: ir.Value, branch: ir.Value, same: Same):
    nodes: list[ir.Node] = []
    beta = np.zeros(1, np.float32)
    node = branch.producer()
    shifted = _split(node, "Add")
    if shifted is not None and shifted[1].const_value is not None:
        beta = shifted[1].const_value.numpy()
        nodes.append(node)
        node = shifted[0].producer()
    scaled = _split(node, "Mul")
    if scaled is None or scaled[1].const_value is None:
        return None
    gamma = scaled[1].const_value.numpy()
    nodes.append(node)
    applied = _split(scaled[0].producer(), "Mul")
    if applied is None:
        return None
    a, b, mul = applied
    ratio = b if same(a, x) else a if same(b, x) else None
    divide = _producer(ratio, "Div") if ratio is not None else None
    if divide is None:
        return None
    g, denominator = divide.inputs
    norm, shift = _producer(g, "ReduceL2"), _split(denominator.producer(), "Add")
    if norm is None or not same(norm.inputs[0], x) or not _spatial_l2(norm, x) or shift is None:
        return None
    epsilon = scalar_const(shift[1])
    mean = _producer(shift[0], "ReduceMean")
    if epsilon is None or mean is None or mean.inputs[0] is not g:
        return None
    if not reduces_last_axis(mean, len(x.shape)):
        return None
    nodes += [mul, divide, shift[2], mean, norm]
    readers = {id(u.node) for u in branch.uses()}  # the anchor, or its quantizer
    inside = {id(n) for n in nodes} | readers
    for n in nodes:  # nothing outside the chain reads its interior
        for v in n.outputs:
            if v.is_graph_output() or any(id(u.node) not in inside for u in v.uses()):
                return None
    return gamma, beta, epsilon, tuple(nodes)
