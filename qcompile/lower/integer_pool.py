"""Integer AveragePool: window sums as a ones-kernel depthwise ConvInteger, then a dyadic
1/divisor — one divisor for the whole tensor, or one per output position where windows
hold different numbers of counted inputs.

ONNX Runtime's divisor (checked against torch's avg_pool2d) is the number of window taps
inside the input when `count_include_pad` is 0, and inside the padded input
[−pad_begin, size + pad_end) when it is 1 — so the full kernel, except for the windows
`ceil_mode` adds past the end, which count only what they cover. With zero pads both
modes count the real inputs: HF EfficientNet's pooler, AvgPool2d(kernel 320,
ceil_mode=True) on a 1×1 map, is a global mean. ConvInteger has no ceil mode: those
windows get extra end padding (the zero point, which adds 0 to a centered sum), and a
single window wider than the padded input shrinks to it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.lower.integer_parts import IntAct, _Emitter, _static_dims
from qcompile.numerics.dyadic import to_dyadic

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly


def _axis_geometry(size: int, k: int, s: int, d: int, pb: int, pe: int, ceil: bool):
    """(output count, extra end padding, kernel for ConvInteger, divisor per output) of one
    spatial axis, with ONNX's rule that a ceil-mode window starts inside the padded input."""
    padded, span = size + pb + pe, d * (k - 1) + 1
    n_out = (math.ceil if ceil else math.floor)((padded - span) / s) + 1
    if ceil and (n_out - 1) * s >= size + pb:
        n_out -= 1
    if n_out < 1:
        return None
    extra = max((n_out - 1) * s + span - padded, 0)
    kernel = k
    if n_out == 1 and d == 1 and k > padded:  # one window over everything
        kernel, extra = padded, 0
    taps = np.arange(n_out)[:, None] * s - pb + np.arange(k) * d
    return n_out, extra, kernel, taps


def _divisors(a, taps: list[np.ndarray], dims: list[int], pads: list[int]) -> np.ndarray:
    """Counted inputs per output position: taps inside the input (count_include_pad=0) or
    inside the padded input (=1)."""
    rank = len(taps)
    include_pad = bool(a.get_int("count_include_pad", 0))
    counts = None
    for i, t in enumerate(taps):
        lo, hi = (-pads[i], dims[i] + pads[i + rank]) if include_pad else (0, dims[i])
        per_axis = ((t >= lo) & (t < hi)).sum(axis=1)
        counts = per_axis if counts is None else np.multiply.outer(counts, per_axis)
    return counts.astype(np.float64)


def average_pool(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph):
    """A ones-kernel depthwise ConvInteger (the window sums) with a dyadic 1/divisor."""
    x, out = low._int_view(node.inputs[0]), low._out_quant(node.outputs[0], graph)
    if not isinstance(x, IntAct) or out is None:
        return "input or output not quantized"
    a = node.attributes
    kernel = list(a.get_ints("kernel_shape", []))
    rank = len(kernel)
    pads = list(a.get_ints("pads", [0] * 2 * rank))
    strides = list(a.get_ints("strides", [1] * rank))
    dilations = list(a.get_ints("dilations", [1] * rank))
    ceil = bool(a.get_int("ceil_mode", 0))
    dims = _static_dims(node.inputs[0]) or _static_dims(x.value)
    if a.get_string("auto_pad", "NOTSET") != "NOTSET":
        return "auto_pad changes the divisor per window"
    if dims is None or dims[1] <= 0:
        return "channel count unknown at compile time (pin it with --input-shape)"
    uniform = not ceil and (a.get_int("count_include_pad", 0) or not any(pads))
    spatial = dims[2:]
    if not uniform and (len(spatial) != rank or any(d <= 0 for d in spatial)):
        return "windows of different sizes (padding or ceil_mode) need the spatial size at compile time"
    conv_kernel, conv_pads, taps = list(kernel), list(pads), []
    for i in range(rank if not uniform else 0):
        geometry = _axis_geometry(
            spatial[i], kernel[i], strides[i], dilations[i], pads[i], pads[i + rank], ceil
        )
        if geometry is None:
            return "no output window (kernel larger than the padded input)"
        _, extra, conv_kernel[i], axis_taps = geometry
        conv_pads[i + rank] += extra
        taps.append(axis_taps)
    channels = dims[1]
    ones = np.ones((channels, 1, *conv_kernel), dtype=x.value.dtype.numpy())
    attrs = {"group": channels, "kernel_shape": conv_kernel, "pads": conv_pads}
    attrs["strides"] = strides
    if "dilations" in a:
        attrs["dilations"] = dilations
    inputs = [
        x.value,
        emit.const("ones", ones),
        emit.const("x_zp", np.asarray(x.zero_point, ones.dtype)),
    ]
    acc = emit.op("ConvInteger", inputs, ir.DataType.INT32, "window_sum", attrs)
    if uniform:
        y = emit.requantize(acc, to_dyadic(x.scale / (out.scale * int(np.prod(kernel)))), out)
    else:  # a dyadic 1/count per output position
        counts = _divisors(a, taps, spatial, pads)
        shape = (1, 1, *counts.shape)
        y = emit.requantize(acc, to_dyadic(x.scale / (out.scale * counts)), out, shape)
    low._finish(graph, out, y, node.outputs[0].shape)
    return None
