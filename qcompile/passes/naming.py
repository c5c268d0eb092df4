"""Keeping the user's node names through rewrites.

A rewrite replaces matched nodes with new, generically named ones. So that reports and
--exclude/--override keep naming the user's nodes, a new node takes the name of a removed
node of the same op type that read one of the same inputs (Conv+BN -> the Conv's name).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import rewriter

# (node, name, op type, input names); holding the node keeps its id() from being reused
# by a replacement node created during the rewrite.
NodeInfo = tuple[ir.Node, str | None, str, tuple[str, ...]]


def snapshot(graph: ir.Graph) -> dict[int, NodeInfo]:
    return {
        id(n): (n, n.name, n.op_type, tuple(v.name for v in n.inputs if v is not None))
        for n in graph
    }


def restore_node_names(graph: ir.Graph, before: dict[int, NodeInfo]) -> None:
    current = {id(n) for n in graph}
    used = {n.name for n in graph}
    removed = [info[1:] for key, info in before.items() if key not in current]
    for node in graph:
        if id(node) in before and before[id(node)][0] is node:
            continue
        inputs = {v.name for v in node.inputs if v is not None}
        for name, op_type, old_inputs in removed:
            if name and op_type == node.op_type and name not in used and inputs & set(old_inputs):
                used.discard(node.name)
                node.name = name
                used.add(name)
                break


class NamePreservingRewrite(rewriter.RewritePass):
    """An onnxscript RewritePass whose replacement nodes keep the replaced nodes' names."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = snapshot(model.graph)
        result = super().call(model)
        if result.modified:
            restore_node_names(model.graph, before)
        return result
