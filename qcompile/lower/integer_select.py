"""Integer forms for two ops the plan leaves float next to quantized tensors: attention's
mask Where, and data movement of a float constant (a ViT's class token Expand).

Both replace `Q(op(...))` by `op` on integers that equal what the QDQ graph computes:
Q(DQ(x)) is x requantized to the quantizer (a dyadic rescale), and Q(c) of a constant is
computed here once (a mask sentinel such as −3.4e38 becomes the quantizer's lowest code,
exactly as QuantizeLinear saturates it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import const_array
from qcompile.lower.integer_masks import wide_sum
from qcompile.lower.integer_parts import MOVEMENT_OPS, IntAct, OutQuant, _Emitter

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly


def _quantized_constant(array: np.ndarray, out: OutQuant) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(array.astype(np.float64) / out.scale) + out.zero_point
    q = np.where(np.isnan(q), out.zero_point, q)  # QuantizeLinear's NaN: not defined; zp
    return np.clip(q, out.qmin, out.qmax).astype(out.dtype.numpy())


def where(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """Where(condition, a, b) with a, b quantized tensors or float constants: both brought
    to the output quantizer's integers, the condition (a boolean computed from integer
    inputs such as an attention mask) used as it is."""
    out = low._out_quant(node.outputs[0], graph)
    if out is None:
        return "output not quantized"
    if node.inputs[0] is None or node.inputs[0].dtype != ir.DataType.BOOL:
        return "condition is not a boolean tensor"
    branches = []
    for i, v in enumerate(node.inputs[1:3], start=1):
        view = low._int_view(v) or wide_sum(low, v)
        constant = const_array(v)
        if isinstance(view, IntAct):
            branches.append(emit.rescaled(view, out, f"branch{i}"))
        elif constant is not None and np.issubdtype(constant.dtype, np.floating):
            branches.append(emit.const(f"branch{i}_q", _quantized_constant(constant, out)))
        else:
            return f"input {i} is neither quantized nor a float constant"
    y = emit.op("Where", [node.inputs[0], *branches], out.dtype, "select")
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


def constant_movement(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """Data movement (Expand, Reshape, Tile...) of a float constant whose result is
    quantized: the constant quantized once, moved as integers. None when not that case."""
    if node.op_type not in MOVEMENT_OPS or len(node.outputs) != 1:
        return "not data movement"
    data = const_array(node.inputs[0]) if node.inputs else None
    if data is None or not np.issubdtype(data.dtype, np.floating):
        return "data input is not a float constant"
    if any(v is not None and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
           for v in node.inputs[1:]):  # fmt: skip
        return "a float parameter input"
    out = low._out_quant(node.outputs[0], graph)
    if out is None:
        return "output not quantized"
    q = emit.const("data_q", _quantized_constant(data, out))
    y = emit.op(node.op_type, [q, *node.inputs[1:]], out.dtype, "int",
                dict(node.attributes.items()))  # fmt: skip
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


def movement_parameters(node: ir.Node, x: IntAct, emit: _Emitter) -> list | str:
    """A movement op's non-data inputs for its integer clone, or why it has none.

    Everything moves codes unchanged except a constant Pad, whose padding is a value:
    on integers it is the code that stands for it — the zero point for ONNX's default 0
    (a Swin window's padding) — which exists only if the value lies on x's grid."""
    params = list(node.inputs[1:])
    if node.op_type == "Resize" and node.attributes.get_string("mode", "nearest") != "nearest":
        return "Resize other than nearest interpolates"
    if node.op_type != "Pad" or node.attributes.get_string("mode", "constant") != "constant":
        return params
    given = params[1] if len(params) > 1 else None
    array = np.zeros(()) if given is None else const_array(given)
    if array is None or array.size != 1:
        return "constant Pad with a run-time pad value"
    value = np.float32(array.reshape(()))
    code = int(np.rint(value / np.float32(x.scale))) + x.zero_point
    if not x.qmin <= code <= x.qmax or (code - x.zero_point) * np.float32(x.scale) != value:
        return f"constant Pad value {value} is not a code of its input"
    fill = emit.const("pad_value", np.asarray(code, dtype=x.value.dtype.numpy()))
    return [params[0], fill, *params[2:]]
