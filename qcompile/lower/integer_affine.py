"""Integer BatchNormalization that no linear layer absorbed (DenseNet's and Inception-v2's
pre-activation BN after a Concat or a pool, in onnx's model data).

Inference BN is a per-channel affine y = a·x + b with a = γ/√(var + ε), b = β − a·mean.
With c = q − z the input integers (real s_x·c),

    y / s_y = c·(a·s_x/s_y) + b/s_y,

so with F fraction bits, M = round(a·s_x/s_y·2**F) and B = round(b/s_y·2**F) per channel
(M may be negative: γ may be), the int64 accumulator c·M + B shifted right by F
(rounding half to even) plus z_y is the output code. F is the largest that keeps
|c·M + B| below 2**46, which leaves M at least 22 significant bits for the largest a.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.lower.integer_parts import _Emitter, _static_dims
from qcompile.lower.integer_reductions import _real, int_view
from qcompile.numerics.dyadic import Dyadic

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly

ACC_BITS = 46
MAX_FRACTION = 40


def batch_norm(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """Inference BatchNormalization (NCHW, one output) as a per-channel integer affine."""
    x, out = int_view(low, node.inputs[0]), low._out_quant(node.outputs[0], graph)
    if x is None or out is None or len(node.outputs) != 1:
        return "input or output not quantized (or training outputs used)"
    if node.attributes.get_int("training_mode", 0):
        return "training mode"
    params = [_real(low, v) for v in node.inputs[1:5]]
    dims = _static_dims(node.inputs[0])
    if any(p is None for p in params) or dims is None or len(dims) < 2 or dims[1] <= 0:
        return "scale, bias, mean or variance is not a constant, or the channel count unknown"
    channels = dims[1]
    gamma, beta, mean, var = (np.broadcast_to(p.reshape(-1), (channels,)) for p in params)
    a = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    b = beta - a * mean
    ratio, offset = a * x.scale / out.scale, b / out.scale
    magnitude = max(abs(x.qmax - x.zero_point), abs(x.qmin - x.zero_point))
    peak = magnitude * float(np.max(np.abs(ratio))) + float(np.max(np.abs(offset))) + 1.0
    f = min(MAX_FRACTION, ACC_BITS - 1 - math.ceil(math.log2(peak)))
    if f < 1:
        return "the affine's range leaves no fraction bits in int64"
    shape = [1, channels] + [1] * (len(dims) - 2)
    m = np.rint(ratio * 2.0**f).astype(np.int64).reshape(shape)
    bias = np.rint(offset * 2.0**f).astype(np.int64).reshape(shape)
    I64 = ir.DataType.INT64
    c = emit.centered(x, I64, "x")
    scaled = emit.op("Mul", [c, emit.const("multiplier", m)], I64, "scaled")
    acc = emit.op("Add", [scaled, emit.const("offset", bias)], I64, "affine")
    y = emit.requantize(acc, Dyadic(np.int64(1), np.asarray(f, np.int64)), out)
    low._finish(graph, out, y, node.outputs[0].shape)
    return None
