"""RMSNorm as exporters write it, read back from its elementwise ops.

Torch's exporters decompose `h * rsqrt(mean(h², -1) + ε) * γ` into Pow (or Mul h·h),
ReduceMean over the last axis, Add ε, Sqrt, Reciprocal (dynamo) or Div(1, ·)
(TorchScript), Mul by h, then Mul by γ, sometimes with float→float Casts in between.
The integer-only plan and lowering treat that chain as one kernel (like
LayerNormalization), and the QuaRot rotation needs to know which Mul normalizes its
residual stream; both read it here. ORT's transformer optimizer recognizes the same
chain (its SimplifiedLayerNormalization fusion) but writes a contrib op that neither the
ONNX checker nor TVM knows, so the chain stays as it is and is only read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from qcompile.ir.graph import const_array, scalar_const

Same = Callable[[ir.Value, ir.Value], bool]


def _identical(a: ir.Value, b: ir.Value) -> bool:
    return a is b


def reduces_last_axis(node: ir.Node, rank: int | None) -> bool:
    """A ReduceMean/ReduceSum over the last axis alone, keeping it (axes as attribute or input)."""
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1:
        found = const_array(node.inputs[1])
        axes = None if found is None else [int(a) for a in found.ravel()]
    if axes is None or len(axes) != 1 or not node.attributes.get_int("keepdims", 1):
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _float_cast(node: ir.Node | None) -> bool:
    """A Cast to float32 of a float32 value: a no-op TorchScript writes around norms."""
    return (
        node is not None
        and node.op_type == "Cast"
        and node.attributes.get_int("to", 0) == ir.DataType.FLOAT
        and node.inputs[0].dtype == ir.DataType.FLOAT
    )


def _behind_casts(value: ir.Value, seen: list[ir.Node]) -> ir.Node | None:
    node = value.producer()
    while _float_cast(node):
        seen.append(node)
        node = node.inputs[0].producer()
    return node


@dataclass(frozen=True)
class RMSNorm:
    """One RMSNorm chain: `anchor` applies the factor to `h` (Mul by 1/√, or Div by √)."""

    anchor: ir.Node
    h: ir.Value
    epsilon: float
    interior: tuple[ir.Node, ...]  # square, ReduceMean, + ε, √, 1/x and Casts among them
    gamma: ir.Node | None = None  # the Mul by a constant γ over the last axis, if one follows
    gamma_index: int = 1

    @property
    def nodes(self) -> tuple[ir.Node, ...]:
        tail = (self.anchor,) if self.gamma is None else (self.anchor, self.gamma)
        return self.interior + tail

    @property
    def output(self) -> ir.Value:
        return (self.gamma or self.anchor).outputs[0]


def rms_factor(factor: ir.Value, h: ir.Value, *, root: bool, same: Same = _identical):
    """(ε, nodes) when `factor` is 1/√(mean(h², last axis) + ε) (`root`: √(...) instead),
    else None. `same` says whether two values are h (the QDQ graph reads h through more
    than one DequantizeLinear)."""
    nodes: list[ir.Node] = []
    node = _behind_casts(factor, nodes)
    if not root:
        if node is not None and node.op_type == "Div" and scalar_const(node.inputs[0]) == 1.0:
            nodes.append(node)
            node = _behind_casts(node.inputs[1], nodes)
        elif node is not None and node.op_type == "Reciprocal":
            nodes.append(node)
            node = _behind_casts(node.inputs[0], nodes)
        else:
            return None
    if node is None or node.op_type != "Sqrt":
        return None
    nodes.append(node)
    node, epsilon = _behind_casts(node.inputs[0], nodes), 0.0
    if node is not None and node.op_type == "Add":
        constant = [scalar_const(v) for v in node.inputs]
        if len(node.inputs) != 2 or (constant[0] is None) == (constant[1] is None):
            return None
        nodes.append(node)
        epsilon = float(constant[0] if constant[0] is not None else constant[1])
        node = _behind_casts(node.inputs[1 if constant[0] is not None else 0], nodes)
    rank = h.shape.rank() if h.shape is not None else None
    if node is None or node.op_type != "ReduceMean" or not reduces_last_axis(node, rank):
        return None
    nodes.append(node)
    square = node.inputs[0].producer()
    if square is None:
        return None
    if square.op_type == "Pow":
        ok = same(square.inputs[0], h) and scalar_const(square.inputs[1]) == 2.0
    else:
        ok = square.op_type == "Mul" and all(same(v, h) for v in square.inputs)
    return (epsilon, [*nodes, square]) if ok and epsilon >= 0 else None


def _gamma_after(anchor: ir.Node) -> tuple[ir.Node, int, list[ir.Node]] | None:
    """The Mul by a constant per-channel γ that alone reads the anchor (through Casts)."""
    value, casts = anchor.outputs[0], []
    while True:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        node = uses[0].node
        if not _float_cast(node):
            break
        casts.append(node)
        value = node.outputs[0]
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    index = 1 - uses[0].idx
    gamma = const_array(node.inputs[index])
    if gamma is None or gamma.ndim > 1 and any(d != 1 for d in gamma.shape[:-1]):
        return None
    return node, index, casts


def rms_norm_at(anchor: ir.Node, same: Same = _identical) -> RMSNorm | None:
    """The RMSNorm whose factor `anchor` applies: h·(1/√…) in either order, or h / √…."""
    if anchor.op_type not in ("Mul", "Div") or len(anchor.inputs) != 2:
        return None
    order = (0,) if anchor.op_type == "Div" else (0, 1)
    for i in order:
        h, factor = anchor.inputs[i], anchor.inputs[1 - i]
        if h is None or factor is None:
            continue
        found = rms_factor(factor, h, root=anchor.op_type == "Div", same=same)
        if found is None:
            continue
        epsilon, interior = found
        if any(
            len(list(n.outputs[0].uses())) != 1 or n.outputs[0].is_graph_output() for n in interior
        ):
            return None  # a step also read elsewhere: not a chain to compute as one
        after = _gamma_after(anchor)
        if after is None:
            return RMSNorm(anchor, h, epsilon, tuple(interior))
        gamma, index, casts = after
        return RMSNorm(anchor, h, epsilon, tuple(interior + casts), gamma, index)
    return None
