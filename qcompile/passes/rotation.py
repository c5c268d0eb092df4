"""QuaRot-style rotation of an RMSNorm residual stream, folded into weights; FP32-exact.

For an orthogonal Q (QᵀQ = I), a decoder whose residual stream h is only

- written by embedding lookups (a constant table) and by linear layers (x·W + b) added to it,
- read by RMSNorms, h / √(mean(h²) + ε) · γ over the last axis, whose outputs feed only
  linear layers (and by Shape),

computes the same outputs carrying h·Q instead of h: every table and writer gets W·Q
(b·Q), every reader Qᵀ·diag(γ)·W with the norm's γ set to ones, and the norm commutes
with Q because the sum of squares over the last axis is rotation-invariant. The stream and
the norms' outputs then have their outlier channels spread over all channels
("incoherence processing", QuaRot / SpinQuant), so the per-tensor activation quantizers
in front of Q/K/V, gate/up and lm_head lose less. LayerNorm streams (BERT, ViT, GPT-2)
are left alone: its mean subtraction commutes only with rotations that keep the ones
vector, and exporters' post-LN graphs read the stream after the norm, not before.

Q is a randomized Hadamard matrix H·diag(±1)/√d for d a power of two, H_{2^k} ⊗ R_m (R_m
a seeded random orthogonal m×m) otherwise; seeded, so a compile is deterministic. No
online rotations: the value projection and down projection inputs (QuaRot's online
Hadamards) keep their own bases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import scipy.linalg

from qcompile.ir.graph import add_initializer, const_array, matmul_bias
from qcompile.ir.norms import reduces_last_axis, rms_factor

logger = logging.getLogger(__name__)

SHAPE_ONLY = frozenset({"Shape", "Size"})
NORM_OPS = frozenset({"SimplifiedLayerNormalization", "RMSNormalization"})


def rotation_matrix(d: int, seed: int = 0) -> np.ndarray:
    """An orthogonal d×d matrix (float64): randomized Hadamard where d allows it."""
    rng = np.random.default_rng(seed)
    k = (d & -d).bit_length() - 1  # d = 2^k · m with m odd
    m = d >> k
    h = scipy.linalg.hadamard(1 << k).astype(np.float64) / np.sqrt(1 << k)
    if m > 1:
        r, _ = np.linalg.qr(rng.standard_normal((m, m)))
        h = np.kron(h, r)
    signs = rng.choice([-1.0, 1.0], size=d)
    return signs[:, None] * h


@dataclass
class Stream:
    """What rotating one residual stream touches."""

    tables: list[ir.Node] = field(default_factory=list)  # Gathers of [V, d] tables
    writers: list[ir.Node] = field(default_factory=list)  # MatMuls whose [k, d] W gets ·Q
    # (γ owner node, γ input index or None, reader MatMuls/Gemms)
    norms: list[tuple[ir.Node | None, int | None, list[ir.Node]]] = field(default_factory=list)


def _rank(value: ir.Value) -> int | None:
    return value.shape.rank() if value.shape is not None else None


def _linear_reader(use: ir.Usage, d: int) -> bool:
    node = use.node
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if use.idx != 0 or w is None or w.ndim != 2:
        return False
    if node.op_type == "MatMul":
        return w.shape[0] == d
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        return (w.shape[1] if node.attributes.get_int("transB", 0) else w.shape[0]) == d
    return False


def _readers(value: ir.Value, d: int) -> list[ir.Node] | None:
    """The linear layers reading a norm's output, or None if anything else reads it."""
    if value.is_graph_output():
        return None
    uses = [u for u in value.uses() if u.node.op_type not in SHAPE_ONLY]
    if not uses or not all(_linear_reader(u, d) for u in uses):
        return None
    return [u.node for u in uses]


def _gamma(node: ir.Node, d: int) -> int | None:
    """Index of a Mul's constant per-channel operand (RMSNorm's γ as exporters write it)."""
    if node.op_type != "Mul":
        return None
    for i, value in enumerate(node.inputs):
        c = const_array(value)
        if c is not None and c.size == d and c.shape[-1] == d:
            return i
    return None


def _normalized_readers(out: ir.Value, d: int) -> tuple[ir.Node | None, int | None, list] | None:
    """(γ Mul, its γ index, readers) for a normalized value, γ optional."""
    direct = _readers(out, d)
    if direct is not None:
        return None, None, direct
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    mul = uses[0].node
    slot = _gamma(mul, d)
    if slot is None or slot == uses[0].idx:
        return None
    readers = _readers(mul.outputs[0], d)
    return None if readers is None else (mul, slot, readers)


def _writer(value: ir.Value, d: int) -> ir.Node | None:
    """The MatMul (bias Add optional) or table Gather that alone writes `value`."""
    if len(list(value.uses())) != 1 or value.is_graph_output():
        return None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Add":
        matmul = next(
            (
                v.producer()
                for v in node.inputs
                if v.producer() and v.producer().op_type == "MatMul"
            ),
            None,
        )
        if matmul is None or matmul_bias(matmul, d) != (
            node,
            1 - node.inputs.index(matmul.outputs[0]),
        ):
            return None
        node = matmul
    if node.op_type == "Gather" and _table(node, d):
        return node
    if node.op_type == "MatMul" and len(list(node.outputs[0].uses())) == 1:
        w = const_array(node.inputs[1])
        if w is not None and w.ndim == 2 and w.shape[1] == d:
            return node
    return None


def _table(node: ir.Node, d: int) -> bool:
    table = const_array(node.inputs[0])
    return (
        table is not None
        and table.ndim == 2
        and table.shape[1] == d
        and node.attributes.get_int("axis", 0) == 0
        and table.dtype == np.float32
    )


def trace_stream(root: ir.Node) -> Stream | str:
    """Everything rotating the stream that embedding Gather `root` starts touches, or why
    the stream does not allow it."""
    d = const_array(root.inputs[0]).shape[1]
    stream = Stream(tables=[root])
    values: set[ir.Value] = set()
    joins: list[tuple[ir.Node, ir.Value]] = []
    todo = [root.outputs[0]]
    while todo:
        h = todo.pop()
        if h in values:
            continue
        values.add(h)
        if h.is_graph_output():
            return f"the stream {h.name} is a graph output"
        for use in h.uses():
            node = use.node
            if node.op_type in SHAPE_ONLY:
                continue
            if node.op_type == "Add" and len(node.inputs) == 2:
                joins.append((node, node.inputs[1 - use.idx]))
                todo.append(node.outputs[0])
            elif node.op_type in NORM_OPS and use.idx == 0:
                if node.attributes.get_int("axis", -1) not in (-1, (_rank(h) or 0) - 1):
                    return f"{node.name} normalizes another axis"
                if const_array(node.inputs[1]) is None:
                    return f"{node.name}: γ is not a constant"
                readers = _readers(node.outputs[0], d)
                if readers is None or len(node.inputs) > 2 and node.inputs[2] is not None:
                    return f"{node.name}: its output feeds more than linear layers"
                stream.norms.append((node, 1, readers))
            elif node.op_type == "Pow":
                outs = list(node.outputs[0].uses())
                if not (len(outs) == 1 and reduces_last_axis(outs[0].node, _rank(h))):
                    return f"{node.name}: h² is not averaged over the last axis"
            elif node.op_type in ("Mul", "Div") and rms_factor(
                node.inputs[1 - use.idx], h, root=node.op_type == "Div"
            ):
                if node.op_type == "Div" and use.idx != 0:
                    return f"{node.name} divides by the stream"
                found = _normalized_readers(node.outputs[0], d)
                if found is None:
                    return f"{node.name}: the normalized stream feeds more than linear layers"
                stream.norms.append(found)
            else:
                return f"{node.name} ({node.op_type}) reads the stream"
    for add, other in joins:
        if other in values:
            continue
        writer = _writer(other, d)
        if writer is None:
            return f"{add.name} adds something other than a linear layer to the stream"
        (stream.tables if writer.op_type == "Gather" else stream.writers).append(writer)
    return stream


class RotateResidualStream(ir.passes.InPlacePass):
    """Rotate every RMSNorm residual stream that starts at an embedding lookup.

    Requires: float32 embedding tables and linear weights as constants.
    Ensures: FP32 outputs unchanged up to float rounding.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.rotated: list[str] = []  # the roots' names
        self.refused: dict[str, str] = {}  # root -> why the stream does not allow it

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Gather" or not _table(node, _width(node)):
                continue
            found = trace_stream(node)
            if isinstance(found, str):
                self.refused[node.name] = found
                logger.info("no rotation from %s: %s", node.name, found)
                continue
            if not found.norms:
                self.refused[node.name] = "no RMSNorm reads the stream"
                continue
            q = rotation_matrix(_width(node), self.seed)
            self._apply(graph, found, q)
            self.rotated.append(node.name)
            modified = True
        return ir.passes.PassResult(model, modified)

    def _apply(self, graph: ir.Graph, stream: Stream, q: np.ndarray) -> None:
        for gather in stream.tables:
            _set(graph, gather, 0, const_array(gather.inputs[0]).astype(np.float64) @ q)
        for matmul in stream.writers:
            _set(graph, matmul, 1, const_array(matmul.inputs[1]).astype(np.float64) @ q)
            bias = matmul_bias(matmul, q.shape[0])
            if bias is not None:
                add, slot = bias
                b = const_array(add.inputs[slot]).astype(np.float64)
                _set(graph, add, slot, (b.reshape(-1, q.shape[0]) @ q).reshape(b.shape))
        for owner, slot, readers in stream.norms:
            gamma = np.ones(q.shape[0])
            if owner is not None:
                gamma = const_array(owner.inputs[slot]).astype(np.float64)
                _set(graph, owner, slot, np.ones(gamma.shape))
            left = q.T * gamma.reshape(-1)[None, :]  # Qᵀ·diag(γ)
            for reader in readers:
                w = const_array(reader.inputs[1]).astype(np.float64)
                transposed = reader.op_type == "Gemm" and reader.attributes.get_int("transB", 0)
                _set(graph, reader, 1, (left @ w.T).T if transposed else left @ w)


def _width(gather: ir.Node) -> int:
    table = const_array(gather.inputs[0])
    return int(table.shape[1]) if table is not None and table.ndim == 2 else -1


def _set(graph: ir.Graph, node: ir.Node, slot: int, array: np.ndarray) -> None:
    """Give `node` a rotated copy of its constant input (shared initializers stay as
    they are for their other readers)."""
    old = node.inputs[slot]
    value = add_initializer(graph, f"{old.name}_rotated", array.astype(np.float32))
    node.replace_input_with(slot, value)
    if old.is_initializer() and not list(old.uses()) and not old.is_graph_output():
        graph.initializers.pop(old.name)


def rotation_notes(passes) -> list[str]:
    """What --rotate did, for the report: the streams rotated, or why none was."""
    notes = []
    for p in passes:
        if isinstance(p, RotateResidualStream):
            if p.rotated:
                notes.append(f"--rotate: residual stream from {', '.join(p.rotated)} rotated")
            for root, why in p.refused.items():
                notes.append(f"--rotate: stream from {root} not rotated: {why}")
            if not p.rotated and not p.refused:
                notes.append("--rotate: no embedding lookup starts a residual stream")
    return notes
