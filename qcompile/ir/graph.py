"""Small graph helpers shared by passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.errors import QCompileError


def add_initializer(
    graph: ir.Graph, base: str, array: np.ndarray, taken: set[str] | None = None
) -> ir.Value:
    """Register `array` as an initializer named `base` (suffixed until unique)."""
    name, i = base, 1
    while name in graph.initializers or (taken is not None and name in taken):
        name = f"{base}_{i}"
        i += 1
    if taken is not None:
        taken.add(name)
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
    )
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents as numpy, or None when it is not a constant."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def scalar_const(value: ir.Value | None) -> float | None:
    """The value's constant contents when it holds exactly one number, else None."""
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the graph: inputs, initializers and node outputs."""
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def matmul_bias(node: ir.Node, n_out: int) -> tuple[ir.Node, int] | None:
    """(Add node, input index) of a MatMul's bias: the Add that alone reads the MatMul's
    output, with a constant operand of shape [n_out] (or [1, ..., n_out]); None if absent."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or out.is_graph_output():
        return None
    add = uses[0].node
    other = 1 - uses[0].idx
    bias = const_array(add.inputs[other])
    if bias is None or bias.ndim == 0 or bias.shape[-1] != n_out:
        return None
    if any(d != 1 for d in bias.shape[:-1]):
        return None
    return add, other


def source_quantizer(dq: ir.Node) -> ir.Node | None:
    """The QuantizeLinear whose integers a DequantizeLinear reads, through the integer
    Clip that narrows sub-8-bit activations; None when there is none."""
    q = dq.inputs[0].producer()
    if q is not None and q.op_type == "Clip":
        q = q.inputs[0].producer()
    return q if q is not None and q.op_type == "QuantizeLinear" else None


def required_source_quantizer(dq: ir.Node, hint: str) -> ir.Node:
    """source_quantizer(), or an error naming the DequantizeLinear that has none."""
    q = source_quantizer(dq)
    if q is None:
        raise QCompileError(
            "a DequantizeLinear reads integers that no QuantizeLinear produced",
            node=dq.name,
            hint=hint,
        )
    return q
