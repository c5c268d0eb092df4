"""Integer RMSNorm, for ONNX's RMSNormalization (opset 23) and for the chain torch's
exporters write (`ir/norms.py` reads the chain; the plan quantizes only its ends,
`quantize/integer_scope.py`); and InstanceNormalization of one channel (GroupNorm with one
group) as the integer LayerNorm.

The derivation follows the integer LayerNorm next door (`integer_reductions.layer_norm`,
after I-BERT) without the mean. With c = q − z the input integers (real s·c) over the
last axis of size n, mean(x²) = s²·Σc²/n, so

    x / sqrt(mean(x²) + ε) = c·sqrt(n) / sqrt(Σc² + ε·n/s²).

Scaling c by 2**m first (c' = c·2**m, m as large as int64 allows for Σc'²) leaves that
ratio unchanged and makes the integer square root's floor 2**m times finer:
t = trunc(c'·2**K / isqrt(Σc'² + E)), E = round(ε·n·4**m/s²), is the normalized value /
sqrt(n) with K = 15 fraction bits (|t| <= 2**K + 1, since c'² <= Σc'²). γ is quantized per
tensor to G = round(γ/s_γ) (int16 magnitudes), and the accumulator t·G (int32) is
requantized by the dyadic s_γ·sqrt(n)/2**K / s_y like a Conv's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.ir.norms import rms_norm_at
from qcompile.lower.integer_affine import batch_norm
from qcompile.lower.integer_grn import grn
from qcompile.lower.integer_lrn import lrn
from qcompile.lower.integer_parts import _Emitter, _static_dims
from qcompile.lower.integer_reductions import (
    GAMMA_BITS,
    _i64,
    _real,
    _shifted,
    int_view,
    layer_norm,
    normalized_times_gamma,
    same_integers,
)
from qcompile.numerics.dyadic import to_dyadic
from qcompile.passes.recurrent import unroll_refusal

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly

I64 = ir.DataType.INT64
FRACTION = 15  # K: fraction bits of the normalized value
SUM_BITS = 61  # Σc'² + E stays below 2**SUM_BITS (isqrt handles up to 62 bits)


def rms_norm(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """RMSNormalization, or the Mul/Div that applies a decomposed RMSNorm's factor (any
    other Mul is lowered as a Mul). None when written, else why not."""
    if node.op_type == "RMSNormalization":
        h, output = node.inputs[0], node.outputs[0]
        gamma = _real(low, node.inputs[1]) if len(node.inputs) > 1 else None
        if gamma is None or len(node.outputs) != 1:
            return "scale is not a constant"
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        dims = _static_dims(h)
        if dims is None or node.attributes.get_int("axis", -1) not in (-1, len(dims) - 1):
            return "normalizes over more than the last axis"
    else:
        norm = rms_norm_at(node, same_integers(low))
        if norm is None:
            return low._mul(node, emit, graph) if node.op_type == "Mul" else "no integer form"
        h, output, epsilon = norm.h, norm.output, norm.epsilon
        gamma = None
        if norm.gamma is not None:
            gamma = _real(low, norm.gamma.inputs[norm.gamma_index])
    return _integer_rms(low, h, output, gamma, epsilon, emit, graph)


def _integer_rms(
    low: LowerToIntegerOnly,
    h: ir.Value,
    output: ir.Value,
    gamma: np.ndarray | None,
    epsilon: float,
    emit: _Emitter,
    graph: ir.Graph,
) -> str | None:
    x, out = int_view(low, h), low._out_quant(output, graph)
    if x is None or out is None:
        return "input or output not quantized"
    dims = _static_dims(h)
    n = dims[-1] if dims else -1
    if n <= 0:
        return "the normalized axis has no static size"
    gamma = np.ones(n) if gamma is None else gamma
    if gamma.size not in (1, n):
        return f"γ has {gamma.size} values for an axis of {n}"
    gamma = np.broadcast_to(gamma.reshape(-1), (n,))
    bits = int((SUM_BITS - math.log2(n)) // 2)  # |c| < 2**bits keeps n·c² < 2**SUM_BITS
    magnitude = max(abs(x.qmax - x.zero_point), abs(x.qmin - x.zero_point))
    if magnitude.bit_length() > bits:
        x = _shifted(emit, x, magnitude.bit_length() - bits)
        magnitude = max(abs(x.qmax - x.zero_point), abs(x.qmin - x.zero_point))
    base = n * magnitude**2 + epsilon * n / x.scale**2  # the largest Σc² + E at m = 0
    if base >= 2**SUM_BITS:
        return f"ε/s² too large for an int64 sum of squares (ε={epsilon}, s={x.scale:g})"
    m = 0
    while 4 ** (m + 1) * base < 2**SUM_BITS:
        m += 1  # a finer root, as far as int64 allows
    e = round(epsilon * n * 4**m / x.scale**2)
    v_max = n * (magnitude << m) ** 2 + e
    g_scale = float(np.max(np.abs(gamma))) / (2**GAMMA_BITS - 1) or 1.0
    g_int = np.rint(gamma / g_scale).astype(np.int64)
    c = emit.centered(x, I64, "x")
    if m:
        c = emit.op("Mul", [c, _i64(emit, 2**m, "fine")], I64, "x_fine")
    acc = normalized_times_gamma(emit, c, e, v_max, FRACTION, g_int)
    unit = g_scale * math.sqrt(n) / 2**FRACTION
    y = emit.requantize(acc, to_dyadic(unit / out.scale), out)
    low._finish(graph, out, y, output.shape)
    return None


def instance_norm(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """InstanceNormalization of [N, 1, L] (torch's GroupNorm with one group, as PoolFormer
    exports it: Reshape → InstanceNorm → Reshape → γ, β): the integer LayerNorm of the last
    axis with the one channel's scale and bias."""
    dims = _static_dims(node.inputs[0])
    if dims is None or len(dims) != 3 or dims[1] != 1:
        return "normalizes more than one channel of a [N, 1, L] tensor"
    return layer_norm(low, node, emit, graph)


def lstm(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str:
    """An LSTM still here is one passes/recurrent.py did not unroll: say why."""
    return f"not unrolled: {unroll_refusal(node) or 'unknown'}"


def control_flow(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str:
    """If/Loop/Scan: their bodies are subgraphs, which the lowering does not enter."""
    return (
        "control flow: the integer lowering rewrites the main graph, not the bodies of "
        "If/Loop/Scan (unroll it in the export, or keep it float with --allow-float)"
    )


NORMS = {
    "Add": grn,  # lower/integer_grn.py (any other Add is lowered as an Add)
    "BatchNormalization": batch_norm,  # lower/integer_affine.py
    "LRN": lrn,  # lower/integer_lrn.py
    "LSTM": lstm,  # unrolled before quantization where it can be (passes/recurrent.py)
    "If": control_flow,
    "Loop": control_flow,
    "Scan": control_flow,
    "RMSNormalization": rms_norm,
    "Mul": rms_norm,
    "Div": rms_norm,
    "InstanceNormalization": instance_norm,
}
