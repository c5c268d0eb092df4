"""Integer forms of the ops that reduce over an axis: pools, LayerNormalization, Softmax.

Each takes the lowering pass (`lower/integer_only.py`, for its views of the QDQ graph), the
node, an emitter and the graph, and returns None when it wrote the integer form, or why
not. Only standard ONNX integer ops are emitted (ReduceSum/ReduceMax, Mul, Div on
non-negative operands, Min, BitShift, Gather...), so ONNX Runtime, TVM and the numpy
reference (`backends/reference.py`) compute the same integers; every division here has
non-negative operands, because ONNX leaves the rounding of negative integer quotients to
the implementation (ORT truncates, a floor-division backend would not).

LayerNormalization (derivation in `layer_norm`) and Softmax (in `softmax`) follow Kim et
al., "I-BERT: Integer-only BERT Quantization" (ICML 2021): integer mean and variance and
an integer square root for LayerNorm; for Softmax the split of exp into a power of two
and a remainder, with the remainder looked up in a table (as our other nonlinearities
are) instead of I-BERT's second-order polynomial, whose 0.3% error flipped one output
step in 6% of the probabilities of the attention test; the square root is Newton's iteration on integers from a
power-of-two start (`isqrt`), exact (floor(sqrt(v)) for every int64 v >= 1, tested).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import const_array
from qcompile.lower.integer_masks import masked_scores, wide_sum
from qcompile.lower.integer_parts import (
    IntAct,
    IntConst,
    OutQuant,
    _Emitter,
    _static_dims,
    _take_over,
)
from qcompile.lower.integer_pool import average_pool
from qcompile.numerics.dyadic import Dyadic, to_dyadic, to_dyadic_saturating
from qcompile.quantize.log2 import codes_reading, integer_thresholds, levels

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly

I64 = ir.DataType.INT64
U64 = ir.DataType.UINT64
ISQRT_STEPS = 7  # Newton steps from a start within 2x of the root: exact for int64 (tested)
GAMMA_BITS = 15  # LayerNorm's gamma as int16 magnitudes
FRACTION_BITS = 16  # the fixed-point fraction of Softmax's ratio and a runtime-sized mean
SOFTMAX_BITS = 31  # the fraction bits of e / Σe
EXP_DIGIT = 64  # EXP_STEPS = EXP_DIGIT²: the exp table as two digit tables
EXP_STEPS = 4096  # Softmax's exponent in steps of 1/4096 of a power of two (a table of 2**p)


def _last_axis(node: ir.Node, value: ir.Value, default: int) -> int | None:
    """The axis size when `node` reduces over the last axis only (-1 when dynamic)."""
    dims = _static_dims(value)
    if dims is None:
        return None
    axis = node.attributes.get_int("axis", default)
    if axis not in (-1, len(dims) - 1):
        return None
    return dims[-1]


def _real(low: LowerToIntegerOnly, value: ir.Value | None) -> np.ndarray | None:
    """A constant input's real values (float, or integers behind a DequantizeLinear)."""
    view = low._int_view(value)
    if isinstance(view, IntConst):
        axis = view.axis if view.axis is not None else 0
        shape = [1] * view.array.ndim
        if view.scale.ndim == 1 and view.array.ndim:
            shape[axis] = -1
        scale, zp = view.scale.reshape(shape or ()), view.zero_point.reshape(shape or ())
        return (view.array.astype(np.float64) - zp) * scale
    array = const_array(value)
    return None if array is None else array.astype(np.float64)


def _reduce(emit: _Emitter, op: str, x: ir.Value, suffix: str) -> ir.Value:
    """op over the last axis, kept (axes as an input from opset 18, ReduceSum from 13)."""
    opset = emit.graph.opset_imports.get("", 13)
    if op == "ReduceSum" or opset >= 18:
        axes = emit.const("last_axis", np.array([-1], np.int64))
        return emit.op(op, [x, axes], x.dtype, suffix, {"keepdims": 1})
    return emit.op(op, [x], x.dtype, suffix, {"axes": [-1], "keepdims": 1})


def _i64(emit: _Emitter, value: int | list[int], suffix: str) -> ir.Value:
    return emit.const(suffix, np.asarray(value, np.int64))


def isqrt(emit: _Emitter, v: ir.Value, bits: int) -> ir.Value:
    """floor(sqrt(v)) for int64 v in [1, 2**bits), in integer ops.

    Start: x0 = 2**ceil(L/2) with L = bit length of v (a count of the powers of two <= v),
    so sqrt(v) < x0 <= 2·sqrt(v). Newton's step x ← floor((x + floor(v/x)) / 2) never goes
    below floor(sqrt(v)) (AM-GM, then flooring an integer bound), and from above it
    converges quadratically: relative error 1 → 1/4 → 1/40 → 3e-4 → 5e-8 → 1e-15, below
    one unit for any 32-bit root after six steps; Min keeps x once it has arrived (the
    step would go back up by one when v + 1 is a square)."""
    powers = emit.const("pow2", np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64)))
    ge = emit.op("GreaterOrEqual", [v, powers], ir.DataType.BOOL, "ge_pow2")
    length = _reduce(emit, "ReduceSum", emit.cast(ge, I64, "ge_count"), "bit_length")
    half = emit.op("Div", [emit.op("Add", [length, _i64(emit, 1, "one")], I64, "len1"),
                           _i64(emit, 2, "two")], I64, "half_length")  # fmt: skip
    table = np.left_shift(np.int64(1), np.arange(bits // 2 + 2, dtype=np.int64))
    x = emit.op("Gather", [emit.const("root_start", table), half], I64, "x0", {"axis": 0})
    two = _i64(emit, 2, "two")
    for step in range(ISQRT_STEPS):
        quotient = emit.op("Div", [v, x], I64, f"v_over_x{step}")
        mean = emit.op("Div", [emit.op("Add", [x, quotient], I64, f"sum{step}"), two], I64,
                       f"newton{step}")  # fmt: skip
        x = emit.op("Min", [x, mean], I64, f"x{step + 1}")
    return x


def isqrt_each(emit: _Emitter, v: ir.Value, bits: int, suffix: str) -> ir.Value:
    """floor(sqrt(v)) of every element (`isqrt` compares along a trailing axis of its own:
    v gets one and gives it back). Axes as inputs from opset 13, attributes before."""
    if emit.graph.opset_imports.get("", 13) >= 13:
        axis = _i64(emit, [-1], f"{suffix}_axis")
        trailing = emit.op("Unsqueeze", [v, axis], I64, f"{suffix}_in")
        return emit.op("Squeeze", [isqrt(emit, trailing, bits), axis], I64, suffix)
    trailing = emit.op("Unsqueeze", [v], I64, f"{suffix}_in", {"axes": [-1]})
    return emit.op("Squeeze", [isqrt(emit, trailing, bits)], I64, suffix, {"axes": [-1]})


def _signed_div(emit: _Emitter, num: ir.Value, den: ir.Value, suffix: str) -> ir.Value:
    """trunc(num / den) for den > 0, dividing magnitudes only (see the module docstring)."""
    magnitude = emit.op("Div", [emit.op("Abs", [num], I64, f"{suffix}_abs"), den], I64, suffix)
    sign = emit.op("Sign", [num], I64, f"{suffix}_sign")
    return emit.op("Mul", [magnitude, sign], I64, f"{suffix}_signed")


def _after_nan_guard(low: LowerToIntegerOnly, probs: ir.Value, graph: ir.Graph):
    """The quantizer after Where(IsNaN(p), 0, p), the guard exporters put after a Softmax
    whose rows may be fully masked with −inf: integer probabilities are never NaN (such a
    row gives zeros, what the guard returns), so the guard goes."""
    guarded = _nan_guarded(probs)
    return None if guarded is None else low._out_quant(guarded, graph)


def _log2_after(probs: ir.Value) -> tuple[ir.Value, int] | None:
    """(codes, bits) of a log2 quantizer reading the probabilities (or their NaN guard)."""
    found = codes_reading(probs)
    guarded = _nan_guarded(probs) if found is None else None
    return found if guarded is None else codes_reading(guarded)


def _write_log2_codes(low, emit: _Emitter, graph: ir.Graph, ratio: ir.Value, codes, bits):
    """c = #{k : p < 2^(−k−½)} on r = p·2^31 (the comparisons log2.py writes in float)."""
    axis = emit.const("log2_axis", np.array([-1], np.int64))
    expanded = emit.op("Unsqueeze", [ratio, axis], I64, "log2_expand")
    limits = emit.const("log2_thresholds", integer_thresholds(bits, SOFTMAX_BITS))
    below = emit.op("Less", [expanded, limits], ir.DataType.BOOL, "log2_below")
    count = emit.op("ReduceSum", [emit.cast(below, ir.DataType.INT32, "log2_count"), axis],
                    ir.DataType.INT32, "log2_sum", {"keepdims": 0})  # fmt: skip
    new_codes = emit.cast(count, ir.DataType.UINT8, "log2_codes")
    new_codes.shape = codes.shape
    low._bounds[id(new_codes)] = (0, levels(bits))
    _take_over(graph, codes, new_codes)


def _nan_guarded(probs: ir.Value) -> ir.Value | None:
    """The output of Where(IsNaN(p), 0, p) when that guard alone reads p."""
    uses = {u.node.op_type: u.node for u in probs.uses()}
    if len(uses) != 2 or set(uses) != {"IsNaN", "Where"}:
        return None
    isnan, where = uses["IsNaN"], uses["Where"]
    zero = const_array(where.inputs[1])
    if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs:
        return None
    if zero is None or zero.size != 1 or float(zero.ravel()[0]) != 0.0:
        return None
    return where.outputs[0]


def _shifted(emit: _Emitter, x: IntAct, excess: int) -> IntAct:
    """x / 2**excess rounded half to even, at scale · 2**excess (fewer bits, same range)."""
    magnitude = max(abs(x.qmin - x.zero_point), abs(x.qmax - x.zero_point))
    lo, hi = -((magnitude >> excess) + 1), (magnitude >> excess) + 1
    narrow = OutQuant(x.value, x.scale * 2**excess, 0, lo, hi, ir.DataType.INT32)
    centered = emit.centered(x, I64, "wide")
    value = emit.requantize(centered, Dyadic(np.int64(1), np.asarray(excess, np.int64)), narrow)
    return IntAct(value, x.scale * 2**excess, 0, lo, hi)


def _narrowed_for_variance(emit: _Emitter, x: IntAct, n: int) -> IntAct:
    """x with few enough bits that Σd² fits int64 (n·(2n·2**b)² < 2**61): a residual
    sum (up to 31 bits) is shifted right, rounding half to even, by what is too many.
    That keeps 11 (n = 4096) to 16 (n = 384) bits of the residual stream where the QDQ
    graph's LayerNorm input had 8."""
    bits = int((61 - math.log2(n) - 2 * math.log2(2 * n)) // 2)
    magnitude = max(abs(x.qmin - x.zero_point), abs(x.qmax - x.zero_point))
    excess = max(0, magnitude.bit_length() - bits)
    return _shifted(emit, x, excess) if excess else x


def _variance_bounds(x: IntAct, n: int, epsilon: float) -> tuple[int, int, int]:
    """(largest |d|, E, largest V + E) of a LayerNorm (see `layer_norm`). Past
    (span·2**16)², isqrt(V + E) > |d|·2**15 and every t truncates to 0 (the output is β):
    capping E there is exact (inputs whose scale vanishes next to √ε, as a random-init
    MobileViT's, had E beyond int64)."""
    span = n * (x.qmax - x.qmin)
    eps = min(round(epsilon * n**3 / x.scale**2), (span << 16) ** 2)
    return span, eps, n * span**2 + eps


def normalized_times_gamma(
    emit: _Emitter, d: ir.Value, eps: int, v_max: int, k: int, g_int: np.ndarray
) -> ir.Value:
    """trunc(d·2**k / isqrt(max(Σd² + eps, 1))) · G over the last axis, in int64: the core
    the integer LayerNorm and RMSNorm share (d the deviations or the values themselves)."""
    v = _reduce(emit, "ReduceSum", emit.op("Mul", [d, d], I64, "dev_sq"), "dev_sq_sum")
    v = emit.op("Max", [emit.op("Add", [v, _i64(emit, eps, "eps")], I64, "var_eps"),
                        _i64(emit, 1, "one")], I64, "var_pos")  # fmt: skip
    root = isqrt(emit, v, int(v_max).bit_length())
    shifted = emit.op("Mul", [d, _i64(emit, 2**k, "fraction")], I64, "dev_fixed")
    t = _signed_div(emit, shifted, root, "normalized")
    return emit.op("Mul", [t, emit.const("gamma_int", g_int)], I64, "scaled_norm")


def layer_norm(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """LayerNormalization over the last axis in integers.

    With q the input integers (real (q − z)·s_x), n the axis size and d = n·(q − z) −
    Σ(q − z) = n·(x − μ)/s_x, the variance is s_x²·V/n³ with V = Σd², so

        (x − μ) / sqrt(var + ε) = d·sqrt(n) / sqrt(V + E),   E = round(ε·n³ / s_x²).

    t = trunc(d·2**K / isqrt(V + E)) is that value / sqrt(n) with K fraction bits
    (|t| <= 2**K); gamma is quantized per tensor to G = round(γ / s_γ) (int16), beta to
    B = round(β / u) at the accumulator's unit u = s_γ·sqrt(n)/2**K, and the int32
    accumulator t·G + B requantizes by the dyadic u / s_y like a Conv's. K is the largest
    (<= 15) that keeps the accumulator in int32 for this beta. V fits int64 for n up to
    about 16k with 8-bit inputs (checked)."""
    x = low._int_view(node.inputs[0]) or wide_sum(low, node.inputs[0])
    out = low._out_quant(node.outputs[0], graph)
    if not isinstance(x, IntAct) or out is None or len(node.outputs) != 1:
        return "input or output not quantized (or mean/inv-std outputs used)"
    n = _last_axis(node, node.inputs[0], -1)
    if n is None or n <= 0:
        return "normalizes over more than the last axis, or its size is unknown"
    x = _narrowed_for_variance(emit, x, n)
    gamma = _real(low, node.inputs[1])
    beta = _real(low, node.inputs[2]) if len(node.inputs) > 2 else np.zeros(1)
    if gamma is None or beta is None:
        return "scale or bias is not a constant"
    gamma, beta = np.broadcast_to(gamma, (n,)), np.broadcast_to(beta, (n,))
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    span, eps, v_max = _variance_bounds(x, n, epsilon)
    if v_max >= 2**62:  # ε dominates a wide input's variance: fewer input bits suffice
        x = _shifted(emit, x, math.ceil((v_max.bit_length() - 61) / 2))
        span, eps, v_max = _variance_bounds(x, n, epsilon)
    if v_max >= 2**62:
        return f"variance of {n} values exceeds int64 (axis too long for 8-bit inputs)"
    g_scale = float(np.max(np.abs(gamma))) / (2**GAMMA_BITS - 1) or 1.0
    g_int = np.rint(gamma / g_scale).astype(np.int64)
    for k in range(15, 5, -1):
        unit = g_scale * math.sqrt(n) / 2**k
        b_int = np.rint(beta / unit)
        if (2**k + 1) * (2**GAMMA_BITS - 1) + np.max(np.abs(b_int)) < 2**31:
            break
    else:
        return "beta too large next to gamma for an int32 accumulator"
    centered = emit.centered(x, I64, "x")
    total = _reduce(emit, "ReduceSum", centered, "sum")
    scaled = emit.op("Mul", [centered, _i64(emit, n, "n")], I64, "n_x")
    d = emit.op("Sub", [scaled, total], I64, "deviation")
    acc = normalized_times_gamma(emit, d, eps, v_max, k, g_int)
    acc = emit.op("Add", [acc, emit.const("beta_int", b_int.astype(np.int64))], I64, "acc")
    span_out = out.qmax - out.qmin + 1  # a vanishing output scale saturates exactly
    y = emit.requantize(acc, to_dyadic_saturating(unit / out.scale, span_out), out)
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


def softmax(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """Softmax over the last axis in integers: exp as a power of two split into a shift and
    a table, in the spirit of I-BERT's i-exp (which fits a polynomial where we look up).

    Softmax ignores the zero point and any common shift, so with q the input integers at
    scale s, exp(s·(q − max q)) = 2**(r/Q) with r = round((q − max q)·s·Q/ln 2) <= 0 (a
    dyadic requantization; its rounding moves the exponent by at most ln2/(2Q), 8.5e-5
    relative for Q = 4096). Writing r = −z·Q + p with z = floor(−r/Q) and p in (−Q, 0]:
    2**(r/Q) = 2**−z · 2**(p/Q), the second factor T[p] = round(2**30 · 2**(p/Q)) looked
    up digit by digit (two 64-entry tables, Q = 64²). e = T[p] >> z (< 2**31: room for 2**16 of them in the sum and for
    e·2**31), and the output is round(e·2**31 / Σe) (<= 2**31) requantized by 2**-31 / s_y;
    a floor there at 2**-16 had flipped one output step in 3% of an attention test's
    probabilities. An int32 input (attention scores from their MatMul) works alike."""
    x, keep = low._int_view(node.inputs[0]) or wide_sum(low, node.inputs[0]), None
    biases = []
    if x is None and (masked := masked_scores(low, node.inputs[0])) is not None:
        x, conditions, biases = masked
        for condition, negated in conditions:  # kept where every mask keeps
            if negated:
                condition = emit.op("Not", [condition], ir.DataType.BOOL, "keep")
            keep = (
                condition
                if keep is None
                else emit.op("And", [keep, condition], ir.DataType.BOOL, "keep_all")
            )
    out = low._out_quant(node.outputs[0], graph) or _after_nan_guard(low, node.outputs[0], graph)
    log2 = None if out is not None else _log2_after(node.outputs[0])
    if not isinstance(x, IntAct) or (out is None and log2 is None):
        return "input or output not quantized"
    opset = graph.opset_imports.get("", 13)
    n = _last_axis(node, node.inputs[0], -1 if opset >= 13 else 1)
    if n is None:
        return "normalizes over another axis than the last"
    if n > 2**16:
        return f"axis of {n} values overflows the int64 sum"
    wide = emit.cast(x.value, I64, "x64")
    unit = emit.const("bias_unit", np.asarray(1.0 / x.scale, np.float32)) if biases else None
    for bias in biases:  # a bias from shapes alone (T5's): rounded to the scores' unit
        scaled = emit.op("Round", [emit.op("Mul", [bias, unit], ir.DataType.FLOAT, "bias_units")],
                         ir.DataType.FLOAT, "bias_rounded")  # fmt: skip
        wide = emit.op("Add", [wide, emit.cast(scaled, I64, "bias64")], I64, "scores_biased")
    kept = wide
    if keep is not None:  # the row maximum of the kept scores only
        floor = _i64(emit, -(2**40), "masked_low")
        kept = emit.op("Where", [keep, wide, floor], I64, "kept_scores")
    rel = emit.op("Sub", [wide, _reduce(emit, "ReduceMax", kept, "max")], I64, "minus_max")
    exponent = OutQuant(x.value, 1.0, 0, -(2**62), 0, I64)  # r: only its integers matter
    # a factor of 64·Q or more sends every score below the row maximum to 2**-64 or less,
    # which the shift below makes 0 — as the real factor would (huge logits: onnx's light
    # SqueezeNet, whose scores step by ~1e7): capping it there is exact
    factor = min(x.scale * EXP_STEPS / math.log(2), 64.0 * EXP_STEPS)
    r = emit.requantize(rel, to_dyadic(factor), exponent)
    z = emit.op("Div", [emit.op("Neg", [r], I64, "neg"), _i64(emit, EXP_STEPS, "steps")], I64,
                "halvings")  # fmt: skip
    index = emit.op("Add", [r, emit.op("Mul", [z, _i64(emit, EXP_STEPS, "steps")], I64, "whole")],
                    I64, "fraction_index")  # fmt: skip
    index = emit.op("Add", [index, _i64(emit, EXP_STEPS - 1, "last")], I64, "table_index")
    # 2**((index − Q + 1)/Q) as two 64-entry tables (high and low digits of the index,
    # multiplied and rounded back to 30 bits): 512 bytes instead of a 16 KB table
    high = emit.op("Div", [index, _i64(emit, EXP_DIGIT, "digit")], I64, "index_high")
    low_digit = emit.op("Sub", [index, emit.op("Mul", [high, _i64(emit, EXP_DIGIT, "digit")], I64,
                                         "high_part")], I64, "index_low")  # fmt: skip
    digits = np.arange(EXP_DIGIT)
    tables = {
        "high": np.rint(2.0**30 * np.exp2((digits * EXP_DIGIT - EXP_STEPS) / EXP_STEPS)),
        "low": np.rint(2.0**30 * np.exp2((digits + 1) / EXP_STEPS)),
    }
    parts = [
        emit.cast(emit.op("Gather", [emit.const(f"exp2_{k}", t.astype(np.int32)), i],
                          ir.DataType.INT32, f"exp2_{k}_part", {"axis": 0}), I64)
        for (k, t), i in zip(tables.items(), (high, low_digit), strict=True)
    ]  # fmt: skip
    product = emit.op("Add", [emit.op("Mul", parts, I64, "exp2_product"),
                              _i64(emit, 2**29, "half_unit")], I64, "exp2_rounding")  # fmt: skip
    mantissa = emit.op("Div", [product, _i64(emit, 2**30, "unit")], I64, "exp2_fraction")
    halvings = emit.cast(emit.op("Min", [z, _i64(emit, 63, "max_shift")], I64, "z_max"), U64)
    e = emit.op("BitShift", [emit.cast(mantissa, U64, "mantissa_u"), halvings], U64, "exp",
                {"direction": "RIGHT"})  # fmt: skip
    e = emit.cast(e, I64, "exp64")
    if keep is not None:  # masked scores: exp(−3.4e38 − max) is 0; a fully masked row sums
        # to 0 and gives zeros (float gives the uniform distribution over the sentinels)
        e = emit.op("Where", [keep, e, _i64(emit, 0, "zero")], I64, "exp_kept")
    total = _reduce(emit, "ReduceSum", e, "exp_sum")
    if keep is not None:
        total = emit.op("Max", [total, _i64(emit, 1, "one")], I64, "exp_sum_pos")
    num = emit.op("Mul", [e, _i64(emit, 2**SOFTMAX_BITS, "fraction")], I64, "exp_fixed")
    half = emit.op("Div", [total, _i64(emit, 2, "two")], I64, "half_sum")
    num = emit.op("Add", [num, half], I64, "exp_rounded")
    ratio = emit.op("Div", [num, total], I64, "ratio")
    if log2 is not None:  # log2 codes straight from the fixed-point ratio (quantize/log2.py)
        _write_log2_codes(low, emit, graph, ratio, *log2)
        return None
    y = emit.requantize(ratio, to_dyadic(2.0**-SOFTMAX_BITS / out.scale), out)
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


def global_average_pool(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph):
    """The mean over the spatial axes (see `_mean`)."""
    dims = _static_dims(node.inputs[0])
    if dims is None or len(dims) < 3:
        return "rank unknown at compile time"
    return _mean(low, node, emit, graph, list(range(2, len(dims))), keepdims=True)


def reduce_mean(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph):
    """ReduceMean with constant axes (global pooling as shufflenet/mnasnet write it, a
    decomposed LayerNorm's mean) as `_mean`."""
    dims = _static_dims(node.inputs[0])
    if dims is None:
        return "rank unknown at compile time"
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        if axes is None:
            return "axes not constant"
        axes = [int(a) for a in axes.ravel()]
    else:
        axes = list(node.attributes.get_ints("axes", []))
    if not axes:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            return "an empty-axes no-op"
        axes = list(range(len(dims)))
    axes = sorted(a % len(dims) for a in axes)
    return _mean(low, node, emit, graph, axes, bool(node.attributes.get_int("keepdims", 1)))


def _mean(low, node: ir.Node, emit: _Emitter, graph: ir.Graph, axes: list[int], keepdims: bool):
    """Mean over `axes`: an integer sum with a dyadic 1/count, or, when a reduced axis is
    only sized at run time, the sum divided by the count read from the tensor's shape
    (FRACTION_BITS fraction bits, magnitudes divided) and then requantized."""
    x = low._int_view(node.inputs[0]) or wide_sum(low, node.inputs[0])  # or a residual sum
    out = low._out_quant(node.outputs[0], graph)
    if not isinstance(x, IntAct) or out is None:
        return "input or output not quantized"
    dims = _static_dims(node.inputs[0])
    sizes = [dims[a] for a in axes]
    acc_type = I64 if x.value.dtype == ir.DataType.INT32 else ir.DataType.INT32
    axes_value = emit.const("axes", np.asarray(axes, np.int64))
    keep = {"keepdims": int(keepdims)}
    if min(sizes) > 0:
        count = int(np.prod(sizes))
        centered = emit.centered(x, acc_type, "x")
        acc = emit.op("ReduceSum", [centered, axes_value], acc_type, "sum", keep)
        y = emit.requantize(acc, to_dyadic(x.scale / (out.scale * count)), out)
    else:
        centered = emit.centered(x, I64, "x")
        acc = emit.op("ReduceSum", [centered, axes_value], I64, "sum", keep)
        shape = emit.op("Shape", [x.value], I64, "shape")
        reduced = emit.op("Gather", [shape, axes_value], I64, "reduced_dims", {"axis": 0})
        count = emit.op("ReduceProd", [reduced], I64, "count", {"keepdims": 0})
        fixed = emit.op("Mul", [acc, _i64(emit, 2**FRACTION_BITS, "fraction")], I64, "sum_fixed")
        mean = _signed_div(emit, fixed, count, "mean")
        y = emit.requantize(mean, to_dyadic(x.scale / (out.scale * 2**FRACTION_BITS)), out)
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


def int_view(low: LowerToIntegerOnly, value: ir.Value | None) -> IntAct | None:
    view = low._int_view(value) or wide_sum(low, value)
    return view if isinstance(view, IntAct) else None


def same_integers(low: LowerToIntegerOnly):
    """Whether two inputs read the same integers (h reaches the chain through separate
    DequantizeLinears of one quantized tensor)."""

    def same(a: ir.Value, b: ir.Value) -> bool:
        if a is b:
            return True
        va, vb = int_view(low, a), int_view(low, b)
        return va is not None and vb is not None and (va.value, va.scale, va.zero_point) == (
            vb.value, vb.scale, vb.zero_point)  # fmt: skip

    return same


REDUCTIONS = {
    "GlobalAveragePool": global_average_pool,
    "AveragePool": average_pool,  # lower/integer_pool.py
    "ReduceMean": reduce_mean,
    "LayerNormalization": layer_norm,
    "Softmax": softmax,
}
