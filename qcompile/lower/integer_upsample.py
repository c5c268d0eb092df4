"""Integer ConvTranspose for the upsampling case, kernel = stride (PP-OCR det's DBNet head,
U-Nets, FPN upsampling): ONNX has no integer ConvTranspose, but with kernel = stride the
output windows do not overlap, so

    y[co, h·s + i, w·s + j] = b[co] + Σ_ci x[ci, h, w] · W[ci, co, i, j]

is a 1×1 ConvInteger with C_out·s² output channels, channel co·s² + i·s + j holding
W[ci, co, i, j], followed by DepthToSpace (CRD) that puts channel (co, i, j) at pixel
(h·s + i, w·s + j). The accumulator is requantized per expanded channel (the scale of co
repeated s² times) before the DepthToSpace, which ONNX Runtime runs on 8-bit integers
and not on int32; requantizing first or after moves the same integers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.lower.integer_parts import IntAct, IntConst, _Emitter, _is_int32, _np
from qcompile.numerics.dyadic import to_dyadic

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly


def upsampling_stride(node: ir.Node, kernel: tuple[int, ...]) -> int | None:
    """s when the ConvTranspose is a 2-D kernel = stride = s upsampling without padding,
    dilation, output padding or groups; else None."""
    a = node.attributes
    strides = tuple(a.get_ints("strides", [1] * len(kernel)))
    if len(kernel) != 2 or kernel[0] != kernel[1] or strides != kernel:
        return None
    if any(a.get_ints("pads", [0] * 4)) or any(a.get_ints("output_padding", [0, 0])):
        return None
    if set(a.get_ints("dilations", [1, 1])) != {1} or a.get_int("group", 1) != 1:
        return None
    if a.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in a:
        return None
    return kernel[0]


def conv_transpose(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    x, w = low._int_view(node.inputs[0]), low._int_view(node.inputs[1])
    bias = low._int_view(node.inputs[2]) if len(node.inputs) > 2 else None
    if not isinstance(x, IntAct) or not isinstance(w, IntConst) or w.axis not in (1, None):
        return "input or weight not quantized per tensor / per output channel"
    if len(node.inputs) > 2 and node.inputs[2] is not None and not _is_int32(bias):
        return "bias not quantized to int32"
    s = upsampling_stride(node, tuple(w.array.shape[2:]))
    if s is None:
        return "no integer form unless kernel = stride (2-D, no padding, dilation or groups)"
    out = low._out_quant(node.outputs[0], graph)
    if out is None:
        return "output not quantized"
    c_in, c_out = w.array.shape[:2]
    # [C_in, C_out, s, s] -> [C_out·s², C_in, 1, 1], channel co·s² + i·s + j
    kernel = np.ascontiguousarray(w.array.transpose(1, 2, 3, 0)).reshape(c_out * s * s, c_in, 1, 1)
    inputs = [x.value, emit.const("weight_1x1", kernel)]
    inputs.append(emit.const("x_zp", np.asarray(x.zero_point, _np(x.value))))
    if np.any(w.zero_point != 0):
        zp = np.repeat(np.broadcast_to(w.zero_point, (c_out,)), s * s)
        inputs.append(emit.const("w_zp", zp.astype(kernel.dtype)))
    acc = emit.op("ConvInteger", inputs, ir.DataType.INT32, "acc")
    expanded = (c_out * s * s, 1, 1)
    if bias is not None:
        b = np.repeat(bias.array.astype(np.int32).reshape(c_out), s * s).reshape(expanded)
        acc = emit.op("Add", [acc, emit.const("bias", b)], ir.DataType.INT32, "acc_bias")
    scale = np.repeat(np.broadcast_to(x.scale * w.scale.astype(np.float64), (c_out,)), s * s)
    y = emit.requantize(acc, to_dyadic(scale / out.scale), out, expanded)
    attrs = {"blocksize": s, "mode": "CRD"}
    up = emit.op("DepthToSpace", [y], out.dtype, "upsampled", attrs)
    low._finish(graph, out, up, node.outputs[0].shape)
    return None
