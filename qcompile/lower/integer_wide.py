"""Adds that read a Linear layer's int32 accumulator instead of its 8-bit requantization.

Requantizing a MatMul/Gemm/Conv accumulator to 8 bits before its bias Add, and the bias
Add's result again before a residual Add, rounds twice and cuts a transformer's outlier
channels on their way to the next LayerNorm (on MiniLM that alone took integer-only
cosine from 0.996 to 0.93). The plan leaves those Add inputs unquantized
(`quantize/wide_inputs.py`); here the Add becomes one exact integer sum:

    Σ_i (q_i − z_i)·M_i + round(c / S'),   M_i = round(s_i / S')   (int64)

over its terms: accumulators with per-channel scales s_i = s_x·s_w[c], 8-bit activations,
and constants c (a bias) rounded at the fine unit S' = 2**⌈log2 R⌉ / 2**53, where R bounds the
real sum (Σ_i bound_i·s_i + |c|, the accumulator bounds from the weights: Σ_k |w_kc|
times the input's largest code) so the int64 sum cannot overflow. One rounding shift
takes it to int32 at S = 2**⌈log2 R⌉ / 2**30 (powers of two, so power-of-two scales
multiply exactly and ties stay ties, as in the QDQ graph's float sum);
then either the Add's 8-bit output quantizer, or, when only LayerNormalization reads that
quantizer, the same range with 8 more fraction bits (a 16-bit residual stream in an int32
tensor: the integer LayerNorm reads up to 16 bits for n = 384 without overflowing its
int64 variance) — or, with no quantizer at all, the int32 sum itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import const_array
from qcompile.lower.integer_parts import (
    DQ,
    INT_RANGE,
    LUT_OPS,
    IntAct,
    IntConst,
    OutQuant,
    _Emitter,
    _is_graph_output,
    _take_over,
    int32_behind_dq,
)
from qcompile.numerics.dyadic import Dyadic, to_dyadic
from qcompile.profile import standard_op

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly

FINE_UNIT_BITS = 53  # the int64 sum spans R / 2**53 steps: far inside 2**62
INT32_BITS = 30  # the int32 sum spans R / 2**30 steps
EXTRA_BITS = 8  # fraction bits a LayerNorm-only reader gets beyond the 8-bit quantizer
TABLE_EXTRA_BITS = 4  # and a lookup table (GELU): up to 4096 entries


def _channel_shape(scale: np.ndarray, axis: int, rank: int | None) -> tuple[int, ...] | None:
    """Broadcast shape of a per-channel vector on `axis` of a rank-`rank` tensor."""
    if scale.ndim == 0:
        return ()
    if axis == -1 or (rank is not None and axis == rank - 1):
        return (scale.size,)
    if rank is None or not 0 <= axis < rank:
        return None
    return (scale.size,) + (1,) * (rank - 1 - axis)


def accumulator_bound(low: LowerToIntegerOnly, acc: ir.Value) -> np.ndarray | None:
    """Largest |value| per output channel of an integer Linear layer's accumulator (bias
    included), from its constant weights and its input's code range; None if unknown."""
    node = acc.producer()
    if node is None:
        return None
    if node.op_type == "Add":
        bias = next((const_array(v) for v in node.inputs if const_array(v) is not None), None)
        inner = next((v for v in node.inputs if const_array(v) is None), None)
        if bias is None or inner is None:
            return None
        inner_bound = accumulator_bound(low, inner)
        return None if inner_bound is None else inner_bound + np.abs(bias.astype(np.int64)).ravel()
    if node.op_type not in ("MatMulInteger", "ConvInteger"):
        return None
    x, w = node.inputs[0], const_array(node.inputs[1])
    x_zp = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    w_zp = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if w is None or x.dtype not in INT_RANGE:
        return None
    lo, hi = low._bounds.get(id(x), INT_RANGE[x.dtype])
    z = int(x_zp) if x_zp is not None and x_zp.size == 1 else 0
    x_max = max(abs(lo - z), abs(hi - z))
    w = w.astype(np.int64)
    if node.op_type == "MatMulInteger":  # w: [K, N], zero point per column
        centered = w - (w_zp.astype(np.int64) if w_zp is not None else 0)
        return np.abs(centered).sum(axis=0) * x_max
    zp = w_zp.astype(np.int64).reshape((-1,) + (1,) * (w.ndim - 1)) if w_zp is not None else 0
    return np.abs(w - zp).reshape(w.shape[0], -1).sum(axis=1) * x_max


def _table_rows(low: LowerToIntegerOnly, value: ir.Value):
    """(rows, scale, bound) for Gather(DQ(int8 table, per-column scale), ids): the rows
    looked up in the integer table (an embedding quantized per column)."""
    gather = value.producer()
    if gather is None or gather.op_type != "Gather" or gather.attributes.get_int("axis", 0):
        return None
    table = low._int_view(gather.inputs[0])
    if not isinstance(table, IntConst) or table.array.ndim != 2 or table.axis not in (1, None):
        return None
    if np.any(table.zero_point != 0):
        return None
    ids = gather.inputs[1]

    def rows(emit: _Emitter) -> ir.Value:
        out = emit.op("Gather", [table.value, ids], table.value.dtype, "rows", {"axis": 0})
        out.shape = value.shape
        return out

    scale = table.scale.astype(np.float64).reshape(-1)
    bound = np.abs(table.array.astype(np.int64)).max(axis=0)
    if scale.size == 1:
        return rows, scale.reshape(()), np.asarray(bound.max())
    return rows, scale, bound


def wide_accumulator(low: LowerToIntegerOnly, value: ir.Value | None):
    """(make, scale, bound) broadcastable to `value`, for integers that `make(emit)`
    returns: a run-time int32 tensor behind its DequantizeLinear (a Linear layer's
    accumulator, an earlier wide sum) or rows of a per-column quantized table."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Gather":
        return _table_rows(low, value)
    found = int32_behind_dq(value)
    if found is None or found[1].ndim > 1:
        return None
    src, scale, axis = found
    rank = len(value.shape) if value.shape is not None else None
    shape = _channel_shape(scale, axis, rank)
    if shape is None:
        return None
    if id(src) in low._bounds:
        lo, hi = low._bounds[id(src)]
        bound = np.asarray(max(abs(lo), abs(hi)), np.int64)
    else:
        bound = accumulator_bound(low, src)
        bound = np.asarray(2**31, np.int64) if bound is None else bound
        if bound.size not in (1, scale.size):
            return None
    scale, bound = scale.astype(np.float64).reshape(shape), bound.reshape(shape or bound.shape)
    return (lambda emit: src), scale, bound


def _fine_reader_bits(node: ir.Node) -> int | None:
    """Extra fraction bits `node` takes on its first input: a LayerNorm 8 (16-bit input),
    a lookup table 4 (a 4096-entry table instead of 256: GELU's input is a Linear
    layer's output, whose 8-bit rounding the table would otherwise carry)."""
    if node.op_type == "LayerNormalization":
        return EXTRA_BITS
    standard = standard_op(node.domain, node.op_type) is not None
    if standard and node.op_type in LUT_OPS and len(node.outputs) == 1:
        return TABLE_EXTRA_BITS
    return None


def _fine_readers(graph: ir.Graph, out: OutQuant) -> tuple[list[ir.Node], int] | None:
    """(the DequantizeLinears of `out`, extra bits) when LayerNorms alone or lookup
    tables alone read them, at input 0."""
    if _is_graph_output(out.replace, graph):
        return None
    dqs = [u.node for u in out.replace.uses()]
    if not dqs or any(d.op_type != DQ for d in dqs):
        return None
    bits = set()
    for d in dqs:
        uses = list(d.outputs[0].uses())
        if _is_graph_output(d.outputs[0], graph) or not uses or any(u.idx for u in uses):
            return None
        bits |= {_fine_reader_bits(u.node) for u in uses}
    return (dqs, bits.pop()) if len(bits) == 1 and None not in bits else None


def add_wide(low: LowerToIntegerOnly, node: ir.Node, emit: _Emitter, graph: ir.Graph):
    """The Add as one exact integer sum of accumulators, activations and constants."""
    I64, I32 = ir.DataType.INT64, ir.DataType.INT32
    terms: list[tuple[ir.Value, np.ndarray, np.ndarray]] = []
    constant = np.zeros(())
    for i, v in enumerate(node.inputs):
        wide = wide_accumulator(low, v)
        view = None if wide is not None else low._int_view(v)
        if wide is not None:
            make, scale, bound = wide
            terms.append((emit.cast(make(emit), I64, f"in{i}_64"), scale, bound))
        elif isinstance(view, IntAct):
            bound = np.asarray(
                max(abs(view.qmin - view.zero_point), abs(view.qmax - view.zero_point))
            )
            centered = emit.centered(view, I64, f"in{i}")
            terms.append((centered, np.asarray(view.scale, np.float64), bound))
        elif isinstance(view, IntConst) and view.scale.ndim == 0:
            real = (view.array.astype(np.float64) - float(view.zero_point)) * float(view.scale)
            constant = constant + real
        elif const_array(v) is not None and np.issubdtype(const_array(v).dtype, np.floating):
            constant = constant + const_array(v).astype(np.float64)
        else:
            return f"input {i} is neither quantized, an accumulator nor a constant"
    if not terms:
        return "no run-time input"
    reach = sum(np.asarray(b * s, np.float64) for _, s, b in terms) + np.abs(constant)
    r = float(np.max(reach))
    if not np.isfinite(r) or r <= 0:
        return "no bound on the sum"
    # powers of two: with power-of-two scales every M_i is exact and the sum's ties stay
    # ties, so the integers round like the QDQ graph's float sum (qonnx agrees)
    top = math.ceil(math.log2(r))
    fine = 2.0 ** (top - FINE_UNIT_BITS)
    total = None
    for k, (value, scale, _) in enumerate(terms):
        m = np.rint(scale / fine).astype(np.int64)
        t = emit.op("Mul", [value, emit.const(f"m{k}", m)], I64, f"term{k}")
        total = t if total is None else emit.op("Add", [total, t], I64, f"sum{k}")
    if np.any(constant != 0):
        c = np.rint(constant / fine).astype(np.int64)
        total = emit.op("Add", [total, emit.const("constant", c)], I64, "with_constant")
    unit = 2.0 ** (top - INT32_BITS)
    lim = 2**31 - 1
    as32 = OutQuant(node.outputs[0], unit, 0, -lim, lim, I32)
    shift = np.asarray(FINE_UNIT_BITS - INT32_BITS, np.int64)
    sum32 = emit.requantize(total, Dyadic(np.int64(1), shift), as32)
    sum32.shape = node.outputs[0].shape
    bound = int(np.ceil(r / unit)) + 1
    low._bounds[id(sum32)] = (-bound, bound)
    out = low._out_quant(node.outputs[0], graph)
    if out is None:  # read by float ops (or a LayerNorm the plan left unquantized)
        _dequantized(emit, graph, node.outputs[0], sum32, unit)
        return None
    fine = _fine_readers(graph, out)
    if fine is not None:  # LayerNorm or tables only: the quantizer's range, more bits
        readers, extra = fine
        step = out.scale / 2**extra
        lo, hi = ((q - out.zero_point) * 2**extra for q in (out.qmin, out.qmax))
        wide_out = OutQuant(out.replace, step, 0, lo, hi, I32)
        y = emit.requantize(sum32, to_dyadic(unit / step), wide_out)
        y.shape = node.outputs[0].shape
        low._bounds[id(y)] = (lo, hi)
        for dq in readers:
            _dequantized(emit, graph, dq.outputs[0], y, step)
        return None
    y = emit.requantize(sum32, to_dyadic(unit / out.scale), out)
    low._finish(graph, out, y, node.outputs[0].shape)
    return None


def _dequantized(
    emit: _Emitter, graph: ir.Graph, old: ir.Value, ints: ir.Value, scale: float
) -> None:
    """`old`'s readers read DequantizeLinear(ints, scale) instead."""
    s = emit.const("sum_scale", np.float32(scale))
    y = emit.op(DQ, [ints, s, emit.const("sum_zp", np.int32(0))], ir.DataType.FLOAT, "dequantized")
    y.shape = old.shape
    _take_over(graph, old, y)
