"""Where SmoothQuant's 1/s folds: the producers of a linear layer's input, FP32-exactly.

X·W = (X/s)·(s·W) needs X/s computed for free, by the node that writes X:

- a LayerNormalization (BERT's post-LN and ViT/GPT-2's pre-LN blocks alike) or an
  RMSNorm op (SimplifiedLayerNormalization, RMSNormalization): γ/s (and β/s);
- a Mul by a per-channel constant, which is how exporters write RMSNorm's γ
  (LLaMA: x · rsqrt(mean(x²) + ε) · γ): γ/s;
- a gated MLP's product, act(gate(h)) ⊙ up(h) (LLaMA/Mistral's SwiGLU): dividing the
  up projection's output channel j (weights and bias) by s_j divides X_j by s_j, because
  the gate side multiplies channel by channel. The GELU → FFN2 edge of BERT-like blocks
  has no such producer (GELU(x/s) ≠ GELU(x)/s), so it is smoothed only with
  --smooth-explicit (an inserted Mul).

When X has readers besides the linear layers (a residual), norms and γ-Muls get a
smoothed twin; a gated product is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import add_initializer, const_array, matmul_bias

NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})


def _last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() == 0 or not isinstance(shape[-1], int):
        return None
    return shape[-1]


def norm_foldable(node: ir.Node, out: ir.Value) -> bool:
    """A norm over the last axis with constant γ (and β), written to its first output."""
    if node.op_type not in NORMS or out is not node.outputs[0]:
        return False
    if node.attributes.get_int("axis", -1) not in (-1, len(out.shape or ()) - 1):
        return False
    if const_array(node.inputs[1]) is None:
        return False
    beta = node.inputs[2] if len(node.inputs) > 2 else None
    return beta is None or const_array(beta) is not None


def gamma_input(node: ir.Node, out: ir.Value) -> int | None:
    """Index of a Mul's constant operand that scales only the last axis (RMSNorm's γ)."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    channels = _last_dim(out)
    for i, value in enumerate(node.inputs):
        c = const_array(value)
        if c is not None and channels and c.size == channels > 1 and c.shape[-1] == channels:
            return i
    return None


def gated_up_projection(node: ir.Node) -> tuple[ir.Node, tuple[ir.Node, int] | None] | None:
    """(up projection, its bias slot or None) when `node` is a Mul of two activations one
    of which a MatMul/Gemm with a constant, unshared 2-D weight writes for this Mul alone."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    if any(const_array(v) is not None for v in node.inputs):
        return None
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is None or len(list(value.uses())) != 1 or value.is_graph_output():
            continue
        bias: tuple[ir.Node, int] | None = None
        if producer.op_type == "Add":  # MatMul + bias: the MatMul whose bias this Add is
            linear = next(
                (
                    p
                    for p in (v.producer() for v in producer.inputs if v is not None)
                    if p is not None and p.op_type == "MatMul"
                ),
                None,
            )
            w = const_array(linear.inputs[1]) if linear is not None else None
            bias = matmul_bias(linear, w.shape[1]) if w is not None and w.ndim == 2 else None
            if bias is None:
                continue
            producer = linear
        if producer.op_type not in ("MatMul", "Gemm"):
            continue
        w = const_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        if w is None or w.ndim != 2 or len(list(producer.inputs[1].uses())) != 1:
            continue
        trans_b = producer.op_type == "Gemm" and producer.attributes.get_int("transB", 0)
        if (w.shape[0] if trans_b else w.shape[1]) != _last_dim(node.outputs[0]):
            continue  # the product's channels must be the projection's own outputs
        if producer.op_type == "Gemm":
            if producer.attributes.get_int("transA", 0):
                continue
            c = producer.inputs[2] if len(producer.inputs) > 2 else None
            if c is not None and const_array(c) is None:
                continue
            bias = (producer, 2) if c is not None else None
        return producer, bias
    return None


def foldable(node: ir.Node, out: ir.Value, has_other_readers: bool) -> bool:
    if norm_foldable(node, out) or gamma_input(node, out) is not None:
        return True
    return not has_other_readers and gated_up_projection(node) is not None


def fold_inverse_scale(
    graph: ir.Graph,
    producer: ir.Node,
    x: ir.Value,
    inv: np.ndarray,
    delta: np.ndarray | None,
    twin_needed: bool,
) -> ir.Value:
    """Make `producer` (or its twin, when X has other readers) write (X − δ)/s; returns
    the smoothed value. δ (a shift) only with a LayerNorm, whose β absorbs it."""
    if producer.op_type in NORMS:
        return _fold_norm(graph, producer, x, inv, delta, twin_needed)
    gamma_at = gamma_input(producer, x)
    if gamma_at is not None:
        gamma = const_array(producer.inputs[gamma_at]).astype(np.float32)
        scaled = add_initializer(
            graph,
            f"{producer.name}_smooth_gamma",
            (gamma * inv.reshape(gamma.shape)).astype(np.float32),
        )
        if not twin_needed:
            producer.replace_input_with(gamma_at, scaled)
            return x
        inputs = list(producer.inputs)
        inputs[gamma_at] = scaled
        return _twin(graph, producer, inputs, x)
    up, bias = gated_up_projection(producer)  # type: ignore[misc]
    w = const_array(up.inputs[1]).astype(np.float32)
    trans_b = up.op_type == "Gemm" and up.attributes.get_int("transB", 0)
    w = w * (inv[:, None] if trans_b else inv[None, :])
    up.replace_input_with(1, add_initializer(graph, f"{up.inputs[1].name}_smoothed", w))
    if bias is not None:
        owner, idx = bias
        b = const_array(owner.inputs[idx]).astype(np.float32)
        if b.size == 1:  # a scalar bias broadcast to every channel becomes a vector
            b = np.full(inv.shape, float(b.ravel()[0]), np.float32)
        scaled_b = b * inv.reshape((1,) * (b.ndim - 1) + (-1,))
        owner.replace_input_with(
            idx, add_initializer(graph, f"{owner.inputs[idx].name}_smoothed", scaled_b)
        )
    return x


def _fold_norm(
    graph: ir.Graph,
    ln: ir.Node,
    x: ir.Value,
    inv: np.ndarray,
    delta: np.ndarray | None,
    twin_needed: bool,
) -> ir.Value:
    gamma = const_array(ln.inputs[1]).astype(np.float32) * inv
    has_beta = len(ln.inputs) > 2 and ln.inputs[2] is not None
    beta = const_array(ln.inputs[2]).astype(np.float32) if has_beta else np.zeros_like(gamma)
    beta = (beta if delta is None else beta - delta) * inv
    g = add_initializer(graph, f"{ln.name}_smooth_gamma", gamma)
    b = (
        add_initializer(graph, f"{ln.name}_smooth_beta", beta)
        if has_beta or delta is not None
        else None
    )
    if not twin_needed:
        ln.replace_input_with(1, g)
        if b is not None:
            if len(ln.inputs) < 3:
                ln.resize_inputs(3)
            ln.replace_input_with(2, b)
        return x
    return _twin(graph, ln, [ln.inputs[0], g, *([b] if b is not None else [])], x)


def _twin(graph: ir.Graph, node: ir.Node, inputs: list, x: ir.Value) -> ir.Value:
    """A copy of `node` with other constants, for the linear layers; X's other readers
    keep the original."""
    twin = ir.node(
        node.op_type,
        inputs,
        attributes=dict(node.attributes),
        domain=node.domain,
        name=f"{node.name}_smoothed",
    )
    twin.outputs[0].name = f"{x.name}_smoothed"
    twin.outputs[0].dtype, twin.outputs[0].shape = x.dtype, x.shape
    graph.insert_after(node, twin)
    return twin.outputs[0]
