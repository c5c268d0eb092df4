"""BatchNormalization next to a linear layer that onnxscript's BN rules (Conv,
ConvTranspose, Gemm before the BN) do not cover, folded into the layer's weights.

LeViT writes both: Linear + BatchNorm1d inside its blocks, exported as MatMul → Flatten (or
Reshape) to [N·L, C] → BatchNormalization, and a classifier BatchNorm1d → Linear on the
pooled features. Either BN is a per-column affine a·y + b, which folds into W's columns
plus a bias (after the MatMul: the flattening keeps the last axis) or into W's rows plus
b·W (before it). FP32-exact up to float rounding. In place rather than as rewrite rules:
the MatMul's output also feeds the Shape of the reshape back, which the biased output
serves as well.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import add_initializer


def _folds_into_linear(bn: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(MatMul, movement) when `bn` normalizes the columns of MatMul(x, W const) whose
    rows a Flatten/Reshape to [M, C] merged (the last axis kept), else None."""
    moved = bn.inputs[0]
    mover = moved.producer() if moved is not None else None
    if mover is None or mover.op_type not in ("Flatten", "Reshape") or len(moved.uses()) != 1:
        return None
    matmul = mover.inputs[0].producer()
    w = matmul.inputs[1].const_value if matmul is not None and matmul.op_type == "MatMul" else None
    if w is None or len(w.shape) != 2 or moved.shape is None or len(moved.shape) != 2:
        return None
    c = w.shape[1]
    params = [v.const_value if v is not None else None for v in bn.inputs[1:5]]
    if moved.shape[1] != c or any(p is None or p.size != c for p in params):
        return None
    if len(bn.outputs) != 1 or bn.attributes.get_int("training_mode", 0):
        return None
    return None if bn.outputs[0].is_graph_output() else (matmul, mover)


def _folds_into_next_linear(bn: ir.Node) -> ir.Node | None:
    """The MatMul/Gemm (W [C, K] constant, no transA) that alone reads a BN over the last
    axis of a 2-D tensor (LeViT's classifier: pooled → BatchNorm1d → Linear), else None."""
    y = bn.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or uses[0].idx != 0 or y.is_graph_output() or len(bn.outputs) != 1:
        return None
    if bn.inputs[0].shape is None or len(bn.inputs[0].shape) != 2:
        return None
    reader = uses[0].node
    w = reader.inputs[1].const_value if len(reader.inputs) > 1 else None
    if reader.op_type not in ("MatMul", "Gemm") or w is None or len(w.shape) != 2:
        return None
    if reader.op_type == "MatMul" and reader.outputs[0].is_graph_output():
        return None  # the bias Add would have to take over the graph output's name
    if reader.op_type == "Gemm" and (
        reader.attributes.get_int("transA", 0) or reader.attributes.get_float("alpha", 1.0) != 1
    ):
        return None
    c = w.shape[0] if not reader.attributes.get_int("transB", 0) else w.shape[1]
    params = [v.const_value if v is not None else None for v in bn.inputs[1:5]]
    if any(p is None or p.size != c for p in params) or bn.attributes.get_int("training_mode", 0):
        return None
    return reader


class FoldBatchNormIntoLinear(ir.passes.InPlacePass):
    """BatchNormalization over the columns of a linear layer whose rows were flattened
    (LeViT's Linear + BatchNorm1d: MatMul → Flatten or Reshape to [N·L, C] → BN) folds
    into W's columns and a bias Add before the flattening, which keeps the last axis.
    onnxscript's BN rules cover Conv/ConvTranspose/Gemm only. In place rather than as a
    rewrite rule: the MatMul's output also feeds Shape (for the reshape back), which the
    biased output serves as well."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for bn in [n for n in graph if n.op_type == "BatchNormalization"]:
            found = _folds_into_linear(bn)
            reader = None if found else _folds_into_next_linear(bn)
            if reader is not None:
                self._fold_forward(graph, bn, reader)
                modified = True
            if found is None:
                continue
            matmul, mover = found
            a, shift = _affine(bn)
            w = matmul.inputs[1]
            scaled = (w.const_value.numpy() * a).astype(np.float32)
            matmul.replace_input_with(1, add_initializer(graph, f"{w.name}_bn", scaled))
            bias = add_initializer(graph, f"{w.name}_folded", shift.astype(np.float32))
            _add_bias_after(graph, matmul, bias)
            ir.convenience.replace_all_uses_with(bn.outputs[0], mover.outputs[0])
            graph.remove(bn, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _fold_forward(graph: ir.Graph, bn: ir.Node, reader: ir.Node) -> None:
        """reader(a·y + b) = reader'(y): W's rows scaled by a, b·W added to its bias."""
        a, shift = _affine(bn)
        w_value = reader.inputs[1]
        w = w_value.const_value.numpy().astype(np.float64)
        transposed = reader.op_type == "Gemm" and reader.attributes.get_int("transB", 0)
        w_new, offset = (w * a, w @ shift) if transposed else (w * a[:, None], shift @ w)
        w_new = w_new.astype(np.float32)
        reader.replace_input_with(1, add_initializer(graph, f"{w_value.name}_bn", w_new))
        reader.replace_input_with(0, bn.inputs[0])
        bias = reader.inputs[2].const_value if len(reader.inputs) > 2 and reader.inputs[2] else None
        if reader.op_type == "Gemm":
            beta = reader.attributes.get_float("beta", 1.0)
            total = offset + (beta * bias.numpy() if bias is not None else 0.0)
            reader.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            total = np.asarray(total, np.float32)
            value = add_initializer(graph, f"{w_value.name}_bn_bias", total)
            if len(reader.inputs) < 3:
                reader.resize_inputs(3)
            reader.replace_input_with(2, value)
        else:
            bias = add_initializer(graph, f"{w_value.name}_bn_bias", offset.astype(np.float32))
            _add_bias_after(graph, reader, bias)
        graph.remove(bn, safe=True)


def _affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with BN(y) = a·y + b per channel."""
    g, b, m, v = (x.const_value.numpy().astype(np.float64) for x in bn.inputs[1:5])
    a = g / np.sqrt(v + bn.attributes.get_float("epsilon", 1e-5))
    return a, b - m * a


def _add_bias_after(graph: ir.Graph, node: ir.Node, bias: ir.Value) -> None:
    """node's output + bias, read by everything that read node's output."""
    out = node.outputs[0]
    add = ir.node("Add", [out, bias], name=f"{node.name}_bias")
    add.outputs[0].name, add.outputs[0].dtype = f"{out.name}_biased", out.dtype
    add.outputs[0].shape = out.shape
    graph.insert_after(node, add)
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, add.outputs[0])
