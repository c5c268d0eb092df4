"""Integer GRN (ConvNeXt-V2's Global Response Normalization; `ir/grn.py` reads the chain,
the plan quantizes only its input and output, `quantize/integer_scope.py`).

GRN(x) = x·(1 + γ·N) + β with G = ‖x‖₂ over the spatial axes and N = G/(mean_C G + ε),
per sample and channel. With c = q − z the input integers (real s·c) and n spatial
positions, G = s·sqrt(Σc²). Scaling Σc² by 4**m (m as large as int64 allows) makes the
integer square root 2**m times finer: g = isqrt(4**m·Σc²) ≈ 2**m·G/s, and

    N = g·C / (Σ_C g + E),   E = round(ε·C·2**m / s)

(s and 2**m cancel), computed as r = floor(g·C·2**F / max(Σ_C g + E, 1)) with F
fraction bits — both operands non-negative, as every integer division here (ONNX leaves
the rounding of negative quotients to the implementation). γ is quantized per tensor to
a power-of-two scale, Γ = round(γ·2**b) with |Γ| <= 2**11, so 1 + γ·N is exactly
K / 2**(F+b) with K = 2**(F+b) + Γ·r, and with β at the same unit, B = round(β·2**(F+b)/s),

    y / s_y = (c·K + B) · s / (2**(F+b) · s_y),

one dyadic requantization of an int64 accumulator (its multiplier narrowed so that the
product stays below 2**62). F is the largest that keeps c·K + B below 2**41, which
leaves the multiplier 20 bits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.ir.grn import GRN, grn_at
from qcompile.lower.integer_parts import _Emitter, _static_dims
from qcompile.lower.integer_reductions import _i64, _shifted, int_view, isqrt_each, same_integers
from qcompile.numerics.dyadic import to_dyadic

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly

I64 = ir.DataType.INT64
SUM_BITS = 61  # 4**m·Σc² stays below 2**SUM_BITS
GAMMA_BITS = 11  # |Γ| <= 2**GAMMA_BITS
ACC_BITS = 41  # c·K + B below 2**ACC_BITS: a 20-bit requantization multiplier
INPUT_BITS = 16  # a wider (residual-sum) input is shifted down to this many bits


def grn(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """The residual Add that ends a GRN chain as one integer kernel; any other Add is
    lowered as an Add. None when written, else why not."""
    chain = grn_at(node, same_integers(low))
    if chain is None:
        return low._add(node, emit, graph)
    return _integer_grn(low, chain, emit, graph)


def _axes(emit: _Emitter, op: str, x: ir.Value, axes: list[int], suffix: str) -> ir.Value:
    """op over `axes` (an input from opset 13 for ReduceSum/Unsqueeze/Squeeze)."""
    attrs = {"keepdims": 1} if op.startswith("Reduce") else {}
    if emit.graph.opset_imports.get("", 13) >= 13:
        return emit.op(op, [x, _i64(emit, axes, f"{suffix}_axes")], I64, suffix, attrs)
    return emit.op(op, [x], I64, suffix, {**attrs, "axes": axes})


def _integer_grn(low: LowerToIntegerOnly, chain: GRN, emit: _Emitter, graph: ir.Graph):
    x, out = int_view(low, chain.x), low._out_quant(chain.output, graph)
    if x is None or out is None:
        return "input or output not quantized"
    dims = _static_dims(chain.x)
    if dims is None or any(d <= 0 for d in dims[1:]):
        return "GRN needs its spatial size and channel count at compile time"
    n, channels = int(np.prod(dims[1:-1])), dims[-1]
    gamma, beta = chain.gamma.reshape(-1), chain.beta.reshape(-1)
    if gamma.size not in (1, channels) or beta.size not in (1, channels):
        return f"γ/β do not match {channels} channels"
    magnitude = max(abs(x.qmax - x.zero_point), abs(x.qmin - x.zero_point))
    if magnitude.bit_length() > INPUT_BITS:
        x = _shifted(emit, x, magnitude.bit_length() - INPUT_BITS)
        magnitude = max(abs(x.qmax - x.zero_point), abs(x.qmin - x.zero_point))
    s2_max = n * magnitude**2
    m = max(0, (SUM_BITS - s2_max.bit_length()) // 2)
    g_max = math.isqrt(s2_max << (2 * m)) + 1
    peak = float(np.max(np.abs(gamma)))
    b = GAMMA_BITS + channels.bit_length()  # γ ≈ 0 (GRN's init): its term is below 2**-11
    if peak > 0:
        b = min(b, math.floor(GAMMA_BITS - math.log2(peak)))
    if b < 0:
        return f"|γ| up to {peak:g} needs more than {GAMMA_BITS} integer bits"
    g_int = np.rint(np.broadcast_to(gamma, (channels,)) * 2.0**b).astype(np.int64)
    beta_units = np.broadcast_to(beta, (channels,)) / x.scale  # β in units of s
    f = min(62 - (g_max * channels).bit_length() - 1, 24)
    while f > 0 and _acc_max(magnitude, f, b, g_int, channels, beta_units) >= 2**ACC_BITS:
        f -= 1
    if f <= 0:
        return "γ, β or the input range leave no fraction bits for N in int64"
    b_int = np.rint(beta_units * 2.0 ** (f + b)).astype(np.int64)
    acc_max = _acc_max(magnitude, f, b, g_int, channels, beta_units)

    c = emit.centered(x, I64, "x")
    spatial = list(range(1, len(dims) - 1))
    s2 = _axes(emit, "ReduceSum", emit.op("Mul", [c, c], I64, "sq"), spatial, "sum_sq")
    v = emit.op("Mul", [s2, _i64(emit, 4**m, "fine")], I64, "sum_sq_fine")
    positive = emit.op("Max", [v, _i64(emit, 1, "one")], I64, "sum_sq_pos")
    root = isqrt_each(emit, positive, int((s2_max << (2 * m)) + 1).bit_length(), "root")
    # isqrt(max(v, 1)) is 1 for Σc² = 0: the Min(v, 1) factor makes that norm 0
    g = emit.op("Mul", [root, emit.op("Min", [v, _i64(emit, 1, "one")], I64, "nonzero")],
                I64, "norm")  # fmt: skip
    eps = round(chain.epsilon * channels * 2**m / x.scale)
    total = _axes(emit, "ReduceSum", g, [-1], "norm_sum")
    den = emit.op("Max", [emit.op("Add", [total, _i64(emit, eps, "eps")], I64, "norm_eps"),
                          _i64(emit, 1, "one")], I64, "norm_den")  # fmt: skip
    num = emit.op("Mul", [g, _i64(emit, channels * 2**f, "fraction")], I64, "ratio_num")
    r = emit.op("Div", [num, den], I64, "ratio")  # N·2**F, operands >= 0
    k = emit.op("Add", [emit.op("Mul", [r, emit.const("gamma_int", g_int)], I64, "gamma_n"),
                        _i64(emit, 2 ** (f + b), "unit")], I64, "factor")  # fmt: skip
    acc = emit.op("Add", [emit.op("Mul", [c, k], I64, "scaled"), emit.const("beta_int", b_int)],
                  I64, "acc")  # fmt: skip
    bits = min(31, 62 - int(acc_max).bit_length())
    d = to_dyadic(x.scale / (2.0 ** (f + b) * out.scale), max_multiplier_bits=bits)
    y = emit.requantize(acc, d, out)
    low._finish(graph, out, y, chain.output.shape)
    return None


def _acc_max(magnitude: int, f: int, b: int, g_int, channels: int, beta_units) -> int:
    """The largest |c·K + B|: K <= 2**(F+b) + |Γ|·C·2**F, B = β·2**(F+b)/s."""
    k_max = 2 ** (f + b) + int(np.max(np.abs(g_int))) * channels * 2**f
    return magnitude * k_max + int(np.ceil(np.max(np.abs(beta_units)) * 2.0 ** (f + b)))
