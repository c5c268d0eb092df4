"""Integer upsampling: linear (bilinear) Resize, in `resize` below, and ConvTranspose.

ConvTranspose for the upsampling case, kernel = stride (PP-OCR det's DBNet head, U-Nets,
FPN upsampling): ONNX has no integer ConvTranspose, but with kernel = stride the output
windows do not overlap, so

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

from qcompile.ir.graph import const_array
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


# -- Resize, mode "linear": integer interpolation weights ------------------------------
LINEAR_FRACTION = 15  # interpolation weights in units of 2**-15; each pair sums to 2**15
COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def linear_taps(n_in: int, n_out: int, scale: float, mode: str) -> tuple[np.ndarray, ...]:
    """(low index, high index, low weight, high weight) per output position along one axis,
    the weights integers summing to 2**LINEAR_FRACTION.

    As ONNX Runtime computes it (and the ONNX reference, which pads by the edge value):
    the source coordinate x of output i by the coordinate mode, clamped to [0, n_in − 1];
    taps floor(x) and min(floor(x) + 1, n_in − 1) with weights 1 − frac(x) and frac(x)."""
    i = np.arange(n_out, dtype=np.float64)
    if mode == "align_corners":
        x = i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    elif mode == "asymmetric":
        x = i / scale
    else:
        x = (i + 0.5) / scale - 0.5
        if mode == "pytorch_half_pixel" and n_out == 1:
            x = np.zeros(1)
    x = np.clip(x, 0, n_in - 1)
    low = np.floor(x).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    w_high = np.rint((x - low) * 2**LINEAR_FRACTION).astype(np.int64)
    return low, high, 2**LINEAR_FRACTION - w_high, w_high


def _same_tensor(a: ir.Value, b: ir.Value) -> bool:
    """a and b hold the same tensor, up to a DequantizeLinear/QuantizeLinear pair."""
    seen = []
    for v in (a, b):
        chain = [v]
        while chain[-1].producer() is not None and chain[-1].producer().op_type in (
            "DequantizeLinear", "QuantizeLinear"):  # fmt: skip
            chain.append(chain[-1].producer().inputs[0])
        seen.append({id(x) for x in chain})
    return bool(seen[0] & seen[1])


def _kept_leading_axes(node: ir.Node, sizes: ir.Value | None) -> int:
    """k when `sizes` is Concat(Slice(Shape(X), 0, k) or Shape(X, end=k), …) with X the
    Resize's input (torch's F.interpolate(size=…) keeps N and C that way): the first k
    axes keep their size, known or not."""
    concat = sizes.producer() if sizes is not None else None
    if concat is None or concat.op_type != "Concat" or not concat.inputs:
        return 0
    head = concat.inputs[0].producer()
    if head is not None and head.op_type == "Slice" and len(head.inputs) >= 3:
        starts, ends = const_array(head.inputs[1]), const_array(head.inputs[2])
        steps = const_array(head.inputs[4]) if len(head.inputs) > 4 else None
        if starts is None or ends is None or starts.size != 1 or int(starts[0]) != 0:
            return 0
        if steps is not None and int(steps.ravel()[0]) != 1:
            return 0
        k, head = int(ends[0]), head.inputs[0].producer()
    elif head is not None and head.op_type == "Shape":
        k = head.attributes.get_int("end", 0)
        if head.attributes.get_int("start", 0) != 0 or k <= 0:
            return 0
    else:
        return 0
    if head is None or head.op_type != "Shape" or head.attributes.get_int("start", 0) != 0:
        return 0
    return k if _same_tensor(head.inputs[0], node.inputs[0]) else 0


def _resize_axes(node: ir.Node, dims_in: list, dims_out: list, opset: int) -> list | str:
    """[(axis, n_in, n_out, scale, coordinate mode)] for the axes the Resize changes: sizes
    from the constant `sizes` or the inferred output shape, the scale from `scales` or
    n_out / n_in (as ONNX Runtime does when sizes are given)."""
    a = node.attributes
    if opset >= 18 and a.get_int("antialias", 0):
        return "antialias"
    mode = a.get_string("coordinate_transformation_mode", "half_pixel")
    mode = mode if opset >= 11 else "asymmetric"
    if mode not in COORDINATES:
        return f"coordinate_transformation_mode {mode}"
    rank, first = len(dims_in), 2 if opset >= 11 else 1
    axes = [x % rank for x in a.get_ints("axes", range(rank))]
    scales = const_array(node.inputs[first]) if len(node.inputs) > first else None
    sizes = const_array(node.inputs[3]) if opset >= 11 and len(node.inputs) > 3 else None
    kept = _kept_leading_axes(node, node.inputs[3]) if opset >= 11 and len(node.inputs) > 3 else 0
    found = []
    for axis in range(kept, rank):
        n_in, n_out, scale = dims_in[axis], dims_out[axis], None
        if axis in axes and scales is not None and scales.size == len(axes):
            scale = float(scales[axes.index(axis)])
        if axis in axes and sizes is not None and sizes.size == len(axes):
            n_out = int(sizes[axes.index(axis)])
        if axis not in axes or scale == 1.0 or (scale is None and n_in == n_out):
            continue
        if not isinstance(n_in, int) or not isinstance(n_out, int):
            return f"axis {axis} resized to a size unknown at compile time"
        found.append((axis, n_in, n_out, scale or n_out / n_in, mode))
    return found


def resize(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """Resize: nearest moves codes (data movement); linear interpolates the codes.

    Linear is separable: along each resized axis, y = x[low]·w_low + x[high]·w_high with
    integer weights (`linear_taps`), two Gathers, two Muls and an Add on int64 values
    centered at the zero point. After k axes the sum is 2**(15k) times the interpolated
    value to within k·2**-16 of a step per unit weight error, and one dyadic
    requantization (2**-15k · s_x/s_y) rounds it. The QDQ graph's float Resize rounds the
    same real value, so the two agree except where that value sits within ~0.01 of a
    rounding tie."""
    if node.attributes.get_string("mode", "nearest") != "linear":
        return low._movement(node, emit, graph)
    x, out = low._int_view(node.inputs[0]), low._out_quant(node.outputs[0], graph)
    if not isinstance(x, IntAct) or out is None:
        return "input or output not quantized"
    dims_in = list(node.inputs[0].shape or [])
    dims_out = list(node.outputs[0].shape or [])
    if not dims_in or len(dims_in) != len(dims_out):
        return "input or output rank unknown"
    opset = graph.opset_imports.get("", 11)
    axes = _resize_axes(node, dims_in, dims_out, opset)
    if isinstance(axes, str):
        return f"linear Resize with {axes} has no integer form here"
    rank = len(dims_in)
    I64 = ir.DataType.INT64
    value = emit.centered(x, I64, "x")
    for axis, n_in, n_out, scale, mode in axes:
        lo, hi, w_lo, w_hi = linear_taps(n_in, n_out, scale, mode)
        shape = [1] * rank
        shape[axis] = n_out
        terms = []
        for name, index, weight in (("low", lo, w_lo), ("high", hi, w_hi)):
            taps = emit.op("Gather", [value, emit.const(f"{name}_index", index)], I64,
                           f"{name}_taps{axis}", {"axis": axis})  # fmt: skip
            weights = emit.const(f"{name}_weight", weight.reshape(shape))
            terms.append(emit.op("Mul", [taps, weights], I64, f"{name}_weighted{axis}"))
        value = emit.op("Add", terms, I64, f"interpolated{axis}")
    scale = x.scale / out.scale / 2.0 ** (LINEAR_FRACTION * len(axes))
    y = emit.requantize(value, to_dyadic(scale), out)
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


UPSAMPLING = {"ConvTranspose": conv_transpose, "Resize": resize}
