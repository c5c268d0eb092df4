"""Log2 quantizer for post-Softmax activations (RepQ-ViT), on the integer-only target.

Attention probabilities are mostly tiny with a few large ones: a uniform quantizer spends
its levels on the large ones and flushes the rest to zero. A log2 quantizer keeps the
exponent, c = clamp(round(−log2 p), 0, K) with K = 2^bits − 1, and c = K meaning 0, so
p̂ = 2^(−c) (or 0). Attention·V then needs no multiplier: Σ_k p̂_k·(v_k − z) =
2^(−S)·Σ_k (v_k − z) << (S − c_k) with S = K − 1, an integer matrix product with powers
of two (a shift-add array on an FPGA; here a 16-entry lookup table and an int32 MatMul,
which ONNX can express exactly).

The codes are computed without a float log: c = #{k < K : p < 2^(−k−½)}, comparisons
against constant thresholds, so ONNX Runtime, TVM and the numpy reference agree bit for
bit (a float Log could differ by an ulp across runtimes and flip a rounding).

In the QDQ graph the pair is written out in standard ops (so ORT runs the simulation):
    codes = Cast<uint8>(ReduceSum(Cast<int32>(Less(Unsqueeze(p, -1), thresholds)), -1))
    p̂     = Where(Equal(codes, K), 0, Pow(2, −Cast<float>(codes)))
`log2_codes(value)` recognizes p̂ for the integer lowering by the Where node's name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

LOG2_BITS = (2, 3, 4)  # K ≤ 15 thresholds: the comparison tensor is K times the input
_SUFFIX = "_log2_dequantized"


def levels(bits: int) -> int:
    """K: codes 0..K−1 are 2^0..2^−(K−1); code K is zero."""
    return (1 << bits) - 1


def thresholds(bits: int) -> np.ndarray:
    """2^(−k−½) for k < K: p below the k-th threshold has a code above k."""
    k = np.arange(levels(bits), dtype=np.float64)
    return np.exp2(-k - 0.5).astype(np.float32)


def log2_quantize(p: np.ndarray, bits: int) -> np.ndarray:
    """The codes, in numpy (the same comparisons as the graph)."""
    p = np.asarray(p, np.float32)
    return (p[..., None] < thresholds(bits)).sum(axis=-1).astype(np.uint8)


def log2_dequantize(codes: np.ndarray, bits: int) -> np.ndarray:
    k = levels(bits)
    values = np.exp2(-codes.astype(np.float32))
    return np.where(codes == k, np.float32(0.0), values).astype(np.float32)


def power_table(bits: int) -> np.ndarray:
    """code → 2^(S − code) as int32 (S = K − 1), 0 for the zero code."""
    k = levels(bits)
    table = np.zeros(k + 1, np.int32)
    table[:k] = np.left_shift(1, (k - 1) - np.arange(k)).astype(np.int32)
    return table


def insert_log2_pair(
    graph: ir.Graph, value: ir.Value, bits: int, make_name, make_const
) -> tuple[ir.Value, ir.Value]:
    """Write codes and p̂ after `value`'s producer; returns (codes, p̂).

    make_name(base) returns an unused node/value name; make_const(base, array) an
    initializer."""
    base = value.name
    nodes: list[ir.Node] = []

    dims = list(value.shape) if value.shape is not None else None

    def op(op_type, inputs, dtype, suffix, extra_dim=None, **attrs) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs, name=make_name(f"{base}_{suffix}"))
        out = node.outputs[0]
        out.name = make_name(f"{base}_{suffix}_out")
        out.dtype = dtype
        if dims is not None:  # QONNX's tools want every shape
            out.shape = ir.Shape(dims if extra_dim is None else [*dims, extra_dim])
        nodes.append(node)
        return out

    I32, F32, U8 = ir.DataType.INT32, ir.DataType.FLOAT, ir.DataType.UINT8
    last = make_const(f"{base}_log2_axis", np.asarray([-1], np.int64))
    expanded = op("Unsqueeze", [value, last], F32, "log2_expand", extra_dim=1)
    below = op(
        "Less",
        [expanded, make_const(f"{base}_log2_thresholds", thresholds(bits))],
        ir.DataType.BOOL,
        "log2_below",
        extra_dim=levels(bits),
    )
    counted = op(
        "ReduceSum",
        [op("Cast", [below], I32, "log2_count", extra_dim=levels(bits), to=I32), last],
        I32,
        "log2_sum",
        keepdims=0,
    )
    codes = op("Cast", [counted], U8, "log2_codes", to=U8)
    exponent = op("Neg", [op("Cast", [codes], F32, "log2_float", to=F32)], F32, "log2_neg")
    power = op("Pow", [make_const(f"{base}_log2_two", np.float32(2.0)), exponent], F32, "log2_pow")
    zero_code = op(
        "Equal",
        [codes, make_const(f"{base}_log2_zero_code", np.asarray(levels(bits), np.uint8))],
        ir.DataType.BOOL,
        "log2_is_zero",
    )
    where = ir.node(
        "Where",
        [zero_code, make_const(f"{base}_log2_zero", np.float32(0.0)), power],
        name=make_name(f"{base}{_SUFFIX}"),
    )
    where.outputs[0].name = make_name(f"{base}{_SUFFIX}_out")
    where.outputs[0].dtype, where.outputs[0].shape = F32, value.shape
    nodes.append(where)
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(next(iter(graph)), nodes)
    return codes, where.outputs[0]


def integer_thresholds(bits: int, fraction_bits: int) -> np.ndarray:
    """The thresholds for probabilities held as integers r = p·2^F: for integer r,
    r < 2^(F−k−½) exactly when r < ⌈2^(F−k−½)⌉ (the power is irrational)."""
    k = np.arange(levels(bits), dtype=np.float64)
    return np.ceil(np.exp2(fraction_bits - k - 0.5)).astype(np.int64)


def codes_reading(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(codes, bits) when `value`'s only reader is the comparison chain that
    `insert_log2_pair` wrote after it (Unsqueeze → Less → Cast → ReduceSum → Cast<uint8>),
    so an integer kernel producing `value` can write the codes itself."""
    uses = list(value.uses())
    chain = ("Unsqueeze", "Less", "Cast", "ReduceSum", "Cast")
    if len(uses) != 1 or uses[0].idx != 0:
        return None
    node, thresholds_value = uses[0].node, None
    for i, op_type in enumerate(chain):
        if node.op_type != op_type:
            return None
        if op_type == "Less":
            thresholds_value = node.inputs[1]
        readers = list(node.outputs[0].uses())
        if i == len(chain) - 1:
            break
        if len(readers) != 1:
            return None
        node = readers[0].node
    codes = node.outputs[0]
    if codes.dtype != ir.DataType.UINT8 or thresholds_value is None:
        return None
    if thresholds_value.const_value is None:
        return None
    k = int(thresholds_value.const_value.numpy().size)
    bits = k.bit_length()
    if bits not in LOG2_BITS or levels(bits) != k:
        return None
    return codes, bits


def log2_codes(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(codes, bits) when `value` is the p̂ that `insert_log2_pair` wrote, else None."""
    where = value.producer() if value is not None else None
    if where is None or where.op_type != "Where" or _SUFFIX not in (where.name or ""):
        return None
    equal = where.inputs[0].producer() if where.inputs[0] is not None else None
    if equal is None or equal.op_type != "Equal" or equal.inputs[1].const_value is None:
        return None
    k = int(equal.inputs[1].const_value.numpy())
    bits = k.bit_length()
    if levels(bits) != k or bits not in LOG2_BITS:
        return None
    return equal.inputs[0], bits
