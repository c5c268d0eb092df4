"""Which Add inputs an integer-only graph reads as wide accumulators, not 8-bit codes.

A Linear layer's int32 accumulator (bias included) is exact; requantizing it to 8 bits
before a bias Add or a residual Add rounds twice and, in transformers, cuts the outlier
channels that the residual stream carries to the next LayerNorm. Integer-only lowering
(`lower/integer_wide.py`) adds such an accumulator to the Add's other terms at a common
fine scale in int64 instead, and requantizes once. The plan therefore does not quantize
those inputs (nor the Add's constant operands: the lowering rounds a bias at that fine
scale, not to 8 bits per tensor).
"""

from __future__ import annotations

import onnx_ir as ir

WEIGHTED = frozenset({"Conv", "Gemm", "MatMul"})


def _weighted(node: ir.Node) -> bool:
    """A Linear layer with a constant weight (an int32 accumulator with a known bound)."""
    if node.op_type not in WEIGHTED or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    return node.inputs[1].const_value is not None


def embedding_table(node: ir.Node) -> ir.Value | None:
    """The constant float [rows, width] table of a row lookup Gather(table, ids), if any."""
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return None
    table = node.inputs[0]
    const = table.const_value if table is not None else None
    if const is None or len(const.shape) != 2 or not const.dtype.is_floating_point():
        return None
    return table


def wide_add_inputs(
    nodes: list[ir.Node], kinds: dict[str, str], graph_outputs: set[str]
) -> tuple[dict[str, set[int]], list[ir.Node]]:
    """(Add node name -> indices of inputs read wide, embedding lookups among them).

    An input is read wide when it is the only use of a quantized Linear layer's output,
    of a row lookup in a constant table (a transformer's embeddings: the table is then
    quantized per column like a weight, not per tensor like an activation), or of another
    such Add's output; never a graph output."""
    wide_nodes: set[str] = set()
    lookups: dict[str, ir.Node] = {}
    result: dict[str, set[int]] = {}
    for node in nodes:  # topological: producers first
        name = node.name or ""
        if kinds.get(name) == "compute" and _weighted(node):
            wide_nodes.add(name)
            continue
        if name not in kinds and embedding_table(node) is not None:
            wide_nodes.add(name)
            lookups[name] = node
            continue
        if node.op_type != "Add" or kinds.get(name) != "arith":
            continue
        wide = set()
        for i, value in enumerate(node.inputs):
            producer = value.producer() if value is not None else None
            if (
                producer is not None
                and (producer.name or "") in wide_nodes
                and len(value.uses()) == 1
                and value.name not in graph_outputs
            ):
                wide.add(i)
        if wide:
            result[name] = wide
            wide_nodes.add(name)
    read = {
        node.inputs[i].producer().name for node in nodes for i in result.get(node.name or "", ())
    }
    return result, [g for n, g in lookups.items() if n in read]
