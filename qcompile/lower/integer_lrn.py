"""Integer LRN (local response normalization across channels: AlexNet, ZFNet, GoogLeNet in
onnx's model data).

LRN(x)_c = x_c / (bias + α/size · Σ_{i ∈ window(c)} x_i²)^β, the window running from
c − ⌊(size−1)/2⌋ to c + ⌈(size−1)/2⌉ within the channels. With c = q − z the input
integers (real s·c) and S = Σ_window c² (an integer window sum: zero-padded channel
slices added up), the denominator is D = bias + k·S with k = α·s²/size. Held as
D_P = round(bias·2**P) + round(S·k·2**P) (P fraction bits; k·2**P a dyadic multiplier
narrowed to keep S·m in int64),

    D^β·2**P = D_P                                  for β = 1,
             = r₂ = isqrt(D_P·2**P)                  for β = ½,
             = r₂·r₄ / 2**P, r₄ = isqrt(r₂·2**P)     for β = ¾ (√D·⁴√D),

with the integer square root of `integer_reductions.isqrt_each` (floors: each root is at most
one unit of 2**−P low). The quotient t = trunc(c·2**(T+P) / (D^β·2**P)) is c/D^β with T
fraction bits (magnitudes divided, sign put back: ONNX leaves negative quotients' rounding
to the runtime), and y/s_y = t·s/(2**T·s_y) is one dyadic requantization. Other β (a
general power needs exp/log) are refused by name; AlexNet-family models all use ¾.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import onnx_ir as ir

from qcompile.lower.integer_parts import _Emitter, _static_dims
from qcompile.lower.integer_reductions import _i64, _shifted, _signed_div, int_view, isqrt_each
from qcompile.numerics.dyadic import to_dyadic

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly

I64 = ir.DataType.INT64
POWERS = (0.5, 0.75, 1.0)  # β with an integer form (square roots)
INPUT_BITS = 16  # a wider input is shifted down to this many bits
MAX_FRACTION = 30  # P and T


def lrn(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """LRN across the channels of an NC... tensor; None when written, else why not."""
    x, out = int_view(low, node.inputs[0]), low._out_quant(node.outputs[0], graph)
    if x is None or out is None:
        return "input or output not quantized"
    size = node.attributes.get_int("size", 0)
    alpha = node.attributes.get_float("alpha", 1e-4)
    beta = node.attributes.get_float("beta", 0.75)
    bias = node.attributes.get_float("bias", 1.0)
    if not any(math.isclose(beta, p) for p in POWERS):
        return f"β = {beta:g}: the integer form covers β = 0.5, 0.75 and 1 (square roots)"
    if size < 1 or bias <= 0 or alpha < 0:
        return "size < 1, bias <= 0 or α < 0"
    dims = _static_dims(node.inputs[0])
    if dims is None or len(dims) < 3 or dims[1] <= 0:
        return "the channel count is unknown at compile time"
    magnitude = max(abs(x.qmax - x.zero_point), abs(x.qmin - x.zero_point))
    if magnitude.bit_length() > INPUT_BITS:
        x = _shifted(emit, x, magnitude.bit_length() - INPUT_BITS)
        magnitude = max(abs(x.qmax - x.zero_point), abs(x.qmin - x.zero_point))
    s_max = size * magnitude**2
    k = alpha * x.scale**2 / size
    d_max = bias + k * s_max
    p = min(MAX_FRACTION, math.floor((60 - math.log2(d_max)) / 2))
    if bias * 2.0**p < 2:
        return "bias too small for the fixed-point denominator"

    c = emit.centered(x, I64, "x")
    window = _window_sum(emit, emit.op("Mul", [c, c], I64, "sq"), dims, size)
    d = _i64(emit, round(bias * 2.0**p), "bias_fixed")
    if k > 0:
        term = to_dyadic(k * 2.0**p, max_multiplier_bits=min(31, 61 - s_max.bit_length()))
        scaled = emit.op("Mul", [window, _i64(emit, int(term.multiplier), "k_multiplier")], I64,
                         "k_scaled")  # fmt: skip
        shift = int(term.shift)
        if shift > 0:  # round half up: every operand is non-negative
            half = emit.op("Add", [scaled, _i64(emit, 1 << (shift - 1), "k_half")], I64, "k_round")
            scaled = emit.op("Div", [half, _i64(emit, 1 << shift, "k_unit")], I64, "k_term")
        elif shift < 0:
            scaled = emit.op("Mul", [scaled, _i64(emit, 1 << -shift, "k_unit")], I64, "k_term")
        d = emit.op("Add", [scaled, d], I64, "denominator")
    d_fixed_max = round(bias * 2.0**p) + math.ceil(k * 2.0**p * s_max) + 1
    den, den_min = d, round(bias * 2.0**p)
    if beta != 1.0:
        d_fine = emit.op("Mul", [d, _i64(emit, 2**p, "unit")], I64, "d_fine")
        root2 = isqrt_each(emit, d_fine, (d_fixed_max << p).bit_length() + 1, "sqrt_d")
        den, den_min = root2, math.isqrt(den_min << p)
        if math.isclose(beta, 0.75):
            fine = emit.op("Mul", [root2, _i64(emit, 2**p, "unit")], I64, "sqrt_fine")
            r2_max = math.isqrt(d_fixed_max << p) + 1 << p
            root4 = isqrt_each(emit, fine, r2_max.bit_length() + 1, "fourth_root_d")
            product = emit.op("Mul", [root2, root4], I64, "d_three_quarters")
            den = emit.op("Div", [product, _i64(emit, 2**p, "unit")], I64, "den")
            den_min = den_min * math.isqrt(den_min << p) >> p
    den_min = max(den_min, 1)
    t = min(MAX_FRACTION, 61 - p - magnitude.bit_length())
    num = emit.op("Mul", [c, _i64(emit, 2 ** (t + p), "fraction")], I64, "numerator")
    quotient = _signed_div(emit, num, den, "normalized")  # c/D^β · 2**T
    q_max = (magnitude << (t + p)) // den_min + 1
    bits = min(31, 61 - q_max.bit_length())
    if bits < 12:
        return "the normalized range leaves the requantization under 12 bits"
    y = emit.requantize(
        quotient, to_dyadic(x.scale / (2.0**t * out.scale), max_multiplier_bits=bits), out
    )
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


def _window_sum(emit: _Emitter, sq: ir.Value, dims: list[int], size: int) -> ir.Value:
    """Σ over the channel window of each channel: the channels zero-padded by
    ⌊(size−1)/2⌋ before and ⌈(size−1)/2⌉ after, then `size` shifted slices added."""
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    rank, channels = len(dims), dims[1]
    pads = [0] * (2 * rank)
    pads[1], pads[rank + 1] = before, after
    padded = emit.op("Pad", [sq, _i64(emit, pads, "window_pads")], I64, "window_padded")
    total = None
    axis = _i64(emit, [1], "channel_axis")
    for i in range(size):
        part = emit.op(
            "Slice",
            [padded, _i64(emit, [i], f"from{i}"), _i64(emit, [i + channels], f"to{i}"), axis],
            I64,
            f"window{i}",
        )
        total = part if total is None else emit.op("Add", [total, part], I64, f"window_sum{i}")
    return total
