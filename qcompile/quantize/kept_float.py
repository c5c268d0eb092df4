"""Ops the plan keeps FP32 whatever the target: control flow and recurrent layers."""

from __future__ import annotations

import onnx_ir as ir

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def kept_float_reason(node: ir.Node) -> str | None:
    """Why the plan keeps `node` (and everything inside it) FP32, or None."""
    if node.op_type in CONTROL_FLOW_OPS:
        inner = sum(len(list(g)) for a in node.attributes.values() for g in _subgraphs(a))
        return (
            f"control flow: its subgraphs' {inner} op(s) stay FP32 (calibrating inside "
            "branches that run for some inputs only is not attempted)"
        )
    if node.op_type in RECURRENT_OPS:
        return "recurrent op: stays FP32 (ONNX Runtime has no static-INT8 kernel for it)"
    return None


def _subgraphs(attr: ir.Attr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []
