"""The pieces integer-only lowering is built from: integer views of tensors (activations
and constants with their scale and zero point), the emitter that writes integer nodes
before an anchor, and graph queries on Q/DQ structure."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.ir.graph import const_array
from qcompile.numerics.dyadic import Dyadic, shift_constants, to_dyadic_saturating
from qcompile.profile import PASSTHROUGH_OPS, standard_op

logger = logging.getLogger(__name__)

Q, DQ = "QuantizeLinear", "DequantizeLinear"
INT_RANGE = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
}
# data movement runs on the integers as it is (ONNX's movement ops take any type)
MOVEMENT_OPS = PASSTHROUGH_OPS | {"Identity", "Expand", "Tile", "Pad"}
# Single-input elementwise ops that become a 256-entry table (their other inputs, if any,
# must be constants).
LUT_OPS = frozenset(
    {
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "LeakyRelu",
        "Gelu",
        "FastGelu",
        "Erf",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Mish",
        "Exp",
        "Relu",
        "Clip",
        "Neg",
        "Abs",
        "Sqrt",
        "Reciprocal",
        "ThresholdedRelu",
    }
)


@dataclasses.dataclass(frozen=True)
class IntAct:
    """A run-time integer tensor standing for (value − zero_point) · scale."""

    value: ir.Value
    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclasses.dataclass(frozen=True)
class IntConst:
    """A constant integer tensor behind a DequantizeLinear (weights, biases, constants)."""

    value: ir.Value
    array: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None


@dataclasses.dataclass(frozen=True)
class OutQuant:
    """Where a lowered op's integers go: the value they replace and its parameters."""

    replace: ir.Value
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: ir.DataType


@dataclasses.dataclass(frozen=True)
class FloatIsland:
    node: str
    op_type: str
    reason: str
    group: int = 0  # ops joined by float tensors form one island


class _Emitter:
    """Adds nodes before an anchor node and constants as initializers, with unique names."""

    def __init__(
        self,
        graph: ir.Graph,
        anchor: ir.Node,
        base: str,
        used: set[str],
        constants: dict[tuple, ir.Value],
    ) -> None:
        self.graph, self.anchor, self.base, self.used = graph, anchor, base, used
        self.constants = constants  # shared by the whole pass: equal constants stored once

    def _name(self, suffix: str) -> str:
        stem = f"{self.base}_{suffix}"
        name, i = stem, 1
        while name in self.used or name in self.graph.initializers:
            name, i = f"{stem}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in self.constants:
            return self.constants[key]
        name = self._name(suffix)
        value = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
        )
        value.const_value = ir.tensor(array, name=name)
        self.graph.register_initializer(value)
        self.constants[key] = value
        return value

    def op(
        self,
        op_type: str,
        inputs: list[ir.Value | None],
        dtype: ir.DataType,
        suffix: str,
        attributes: dict | None = None,
        shape: ir.Shape | None = None,
    ) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes or {}, name=self._name(suffix))
        out = node.outputs[0]
        out.name = self._name(f"{suffix}_out")
        out.dtype = dtype
        out.shape = shape
        self.graph.insert_before(self.anchor, node)
        return out

    def cast(self, value: ir.Value, dtype: ir.DataType, suffix: str = "cast") -> ir.Value:
        if value.dtype == dtype:
            return value
        return self.op("Cast", [value], dtype, suffix, {"to": dtype}, value.shape)

    def centered(self, x: IntAct, dtype: ir.DataType, suffix: str) -> ir.Value:
        """x − zero_point, widened to `dtype` (int32 or int64)."""
        wide = self.cast(x.value, dtype, f"{suffix}_wide")
        if x.zero_point == 0:
            return wide
        zp = self.const(f"{suffix}_zp", np.asarray(x.zero_point, dtype.numpy()))
        return self.op("Sub", [wide, zp], dtype, f"{suffix}_centered", shape=x.value.shape)

    def rescaled(self, x: IntAct, out: OutQuant, suffix: str) -> ir.Value:
        """x's integers at out's parameters (unchanged when they already agree)."""
        same = x.scale == out.scale and x.zero_point == out.zero_point
        if same and out.qmin <= x.qmin and x.qmax <= out.qmax and x.value.dtype == out.dtype:
            return x.value
        centered = self.centered(x, ir.DataType.INT64, suffix)
        d = to_dyadic_saturating(x.scale / out.scale, out.qmax - out.qmin + 1)
        return self.requantize(centered, d, out)

    def requantize(
        self, acc: ir.Value, d: Dyadic, out: OutQuant, shape: tuple[int, ...] = ()
    ) -> ir.Value:
        """clamp(round_half_up(acc · m / 2**s) + zp) → out.dtype, exactly (dyadic.py)."""
        I64 = ir.DataType.INT64
        reshape = (lambda a: a.reshape(shape)) if shape else (lambda a: a)
        p = self.cast(acc, I64, "acc64")
        if np.any(d.multiplier != 1):
            m = self.const("multiplier", reshape(d.multiplier.astype(np.int64)))
            p = self.op("Mul", [p, m], I64, "scaled", shape=acc.shape)
        before, shift, after = shift_constants(d)
        biased = self.op(
            "Add", [p, self.const("round_bias", reshape(before))], I64, "biased", shape=acc.shape
        )
        unsigned = self.cast(biased, ir.DataType.UINT64, "unsigned")
        shifted = self.op(
            "BitShift",
            [unsigned, self.const("shift", reshape(shift))],
            ir.DataType.UINT64,
            "shifted",
            {"direction": "RIGHT"},
            acc.shape,
        )
        # ties (the shifted-out bits were exactly one half) go to the even neighbour
        U64 = ir.DataType.UINT64
        back = self.op(
            "BitShift",
            [shifted, self.const("shift_back", reshape(shift))],
            U64,
            "back",
            {"direction": "LEFT"},
            acc.shape,
        )
        tie = self.cast(
            self.op("Equal", [back, unsigned], ir.DataType.BOOL, "tie", shape=acc.shape),
            U64,
            "tie_u",
        )
        one = self.const("one", np.uint64(1))
        halved = self.op(
            "BitShift", [shifted, one], U64, "halved", {"direction": "RIGHT"}, acc.shape
        )
        doubled = self.op(
            "BitShift", [halved, one], U64, "doubled", {"direction": "LEFT"}, acc.shape
        )
        odd = self.op("Sub", [shifted, doubled], U64, "odd", shape=acc.shape)
        down = self.op("Mul", [tie, odd], U64, "tie_odd", shape=acc.shape)
        even = self.op("Sub", [shifted, down], U64, "even", shape=acc.shape)
        signed = self.cast(even, I64, "signed")
        offset = (np.int64(out.zero_point) - after).astype(np.int64)
        with_zp = self.op(
            "Add", [signed, self.const("zp_offset", reshape(offset))], I64, "zp", shape=acc.shape
        )
        clamped = self.op(
            "Clip",
            [
                with_zp,
                self.const("qmin", np.asarray(out.qmin, np.int64)),
                self.const("qmax", np.asarray(out.qmax, np.int64)),
            ],
            I64,
            "clamped",
            shape=acc.shape,
        )
        return self.cast(clamped, out.dtype, "requantized")


def int32_behind_dq(value: ir.Value | None) -> tuple[ir.Value, np.ndarray, int] | None:
    """(q, scale, axis) for DequantizeLinear(q, scale, 0) of a run-time int32 tensor q (a
    kept accumulator or residual sum), or None."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != DQ or dq.inputs[0].dtype != ir.DataType.INT32:
        return None
    src, scale = dq.inputs[0], const_array(dq.inputs[1])
    if src.const_value is not None or scale is None:
        return None
    zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if zp is not None and np.any(zp != 0):
        return None
    return src, scale, dq.attributes.get_int("axis", 1)


def _np(value: ir.Value) -> np.dtype:
    return value.dtype.numpy()


def _is_int32(view) -> bool:
    return (
        isinstance(view, IntConst) and view.array.dtype == np.int32 and not np.any(view.zero_point)
    )


def _is_graph_output(value: ir.Value, graph: ir.Graph) -> bool:
    return any(v is value for v in graph.outputs)


def _static_dims(value: ir.Value) -> list[int] | None:
    """The shape with -1 for dynamic dims (None when even the rank is unknown)."""
    if value is None or value.shape is None:
        return None
    return [int(d) if isinstance(d, int) else -1 for d in value.shape]


def _activation_bounds(node: ir.Node) -> tuple[float, float] | None:
    """Real clamp bounds of a Relu/Clip with constant bounds (None: not foldable)."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    bounds = [-np.inf, np.inf]
    for i in (1, 2):
        if i < len(node.inputs) and node.inputs[i] is not None:
            c = const_array(node.inputs[i])
            if c is None:
                return None
            bounds[i - 1] = float(c)
    return bounds[0], bounds[1]


def _quantizer(q: ir.Node, fold: tuple[float, float] | None = None) -> OutQuant | None:
    """A QuantizeLinear as an OutQuant; `fold` = real bounds of a Relu/Clip before it."""
    if q.op_type != Q:
        return None
    scale, zp = const_array(q.inputs[1]), const_array(q.inputs[2]) if len(q.inputs) > 2 else None
    if scale is None or zp is None or scale.ndim != 0:
        return None
    q_out = q.outputs[0]
    replace = q_out
    lo, hi = INT_RANGE[q_out.dtype]
    narrow = _narrowing_clip(q_out)
    if narrow is not None:
        replace, (lo, hi) = narrow.outputs[0], _narrowed(narrow.outputs[0])
    s, z = float(scale), int(zp)
    if fold is not None:  # Q(clip(x, a, b)) = clip(Q(x), Q(a), Q(b)): rounding is monotone
        lo_real, hi_real = fold
        if np.isfinite(lo_real):
            lo = max(lo, int(np.clip(np.rint(lo_real / s) + z, lo, hi)))
        if np.isfinite(hi_real):
            hi = min(hi, int(np.clip(np.rint(hi_real / s) + z, lo, hi)))
    return OutQuant(replace, s, z, lo, hi, q_out.dtype)


def _narrowing_clip(q_out: ir.Value) -> ir.Node | None:
    """The integer Clip InsertQDQ puts after a Q for activations narrower than 8 bits."""
    uses = list(q_out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Clip" and uses[0].idx == 0:
        clip = uses[0].node
        if all(const_array(v) is not None for v in clip.inputs[1:3] if v is not None):
            return clip
    return None


def _narrowed(value: ir.Value) -> tuple[int, int]:
    """Integer range of a tensor: its type's, or a narrowing Clip's bounds."""
    lo, hi = INT_RANGE.get(value.dtype, (-(2**31), 2**31 - 1))
    node = value.producer()
    if node is not None and node.op_type == "Clip" and value.dtype in INT_RANGE:
        if len(node.inputs) > 1 and const_array(node.inputs[1]) is not None:
            lo = max(lo, int(const_array(node.inputs[1])))
        if len(node.inputs) > 2 and const_array(node.inputs[2]) is not None:
            hi = min(hi, int(const_array(node.inputs[2])))
    return lo, hi


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere, graph outputs included, and takes its name."""
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name = old.name
    old.name = f"{name}_replaced"
    new.name = name


def _connected(nodes: list[ir.Node]) -> list[int]:
    """Component index per node, nodes joined when one reads the other's output."""
    index = {id(n): i for i, n in enumerate(nodes)}
    parent = list(range(len(nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, n in enumerate(nodes):
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in index:
                parent[root(i)] = root(index[id(p)])
    roots = [root(i) for i in range(len(nodes))]
    order = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return [order[r] for r in roots]


def float_ops_between(graph: ir.Graph) -> list[ir.Node]:
    """Ops with a float run-time input or output between the input quantizers and the
    output dequantizers (reachable from a QuantizeLinear and reaching a DequantizeLinear);
    Q/DQ nodes themselves count when they sit inside, i.e. around a float island.

    Reaching goes through values, not through Shape/Size: what is computed from a tensor's
    dimensions alone (rotary cos/sin tables from the sequence length, masks from it) does
    not depend on the quantized data. Such ops run once per input shape, before the
    integers they feed are quantized, like a model input's preprocessing."""
    nodes = list(graph)
    consumers: dict[int, list[ir.Node]] = {id(n): [] for n in nodes}
    producers: dict[int, list[ir.Node]] = {id(n): [] for n in nodes}
    for n in nodes:
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in consumers and p.op_type not in ("Shape", "Size"):
                consumers[id(p)].append(n)
                producers[id(n)].append(p)

    def reach(starts: list[ir.Node], edges: dict[int, list[ir.Node]]) -> set[int]:
        seen, stack = set(), list(starts)
        while stack:
            n = stack.pop()
            for m in edges[id(n)]:
                if id(m) not in seen:
                    seen.add(id(m))
                    stack.append(m)
        return seen

    after_q = reach([n for n in nodes if n.op_type == Q], consumers)
    before_dq = reach([n for n in nodes if n.op_type == DQ], producers)
    inside = after_q & before_dq
    float_types = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)

    def is_float(v: ir.Value | None) -> bool:
        return v is not None and v.const_value is None and v.dtype in float_types

    return [
        n
        for n in nodes
        if id(n) in inside
        and n.op_type not in ("Shape", "Size")  # they read no values, only dimensions
        and (any(map(is_float, n.inputs)) or any(map(is_float, n.outputs)))
    ]


def _evaluate(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """The op applied to `x` by ONNX's reference implementation (constant inputs kept)."""
    from onnx.reference import ReferenceEvaluator

    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [x.size])]
    names, inits = ["x"], []
    for i, v in enumerate(node.inputs[1:], start=1):
        if v is None:
            names.append("")
            continue
        names.append(f"p{i}")
        inits.append(onnx.numpy_helper.from_array(v.const_value.numpy(), f"p{i}"))
    proto = ir.to_proto(node)
    # a contrib op with a standard form (com.microsoft's Gelu...) is tabulated as that op
    op, extra = standard_op(node.domain, node.op_type) or (node.op_type, {})
    one = onnx.helper.make_node(op, names, ["y"], **extra)
    one.attribute.extend(proto.attribute)
    graph = onnx.helper.make_graph(
        [one],
        "lut",
        inputs,
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    return np.asarray(ReferenceEvaluator(model).run(None, {"x": x})[0])
