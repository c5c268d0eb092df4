"""Attention's masked scores and the wide sums integer Softmax and norms read: what the
lowering recognises in front of a Softmax (moved out of `integer_reductions.py`, which
computes the kernels)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from qcompile.ir.graph import const_array
from qcompile.lower.integer_parts import IntAct, int32_behind_dq

if TYPE_CHECKING:
    from qcompile.lower.integer_only import LowerToIntegerOnly


def wide_sum(low: LowerToIntegerOnly, value: ir.Value | None) -> IntAct | None:
    """An int32 activation behind its DequantizeLinear (scalar scale): a residual sum kept
    in int32 (`_add_to_float`, with its bounds) or an accumulator an activation×activation
    MatMul returned (attention scores; bounded by int32)."""
    found = int32_behind_dq(value)
    if found is None or found[1].ndim != 0:
        return None
    src, scale, _ = found
    bounds = low._bounds.get(id(src), (-(2**31), 2**31 - 1))
    return IntAct(src, float(scale), 0, *bounds)


MASK_SENTINEL = -1e4  # a masking constant at or below this: its exp is 0 in float32


def masked_scores(low: LowerToIntegerOnly, value: ir.Value | None, depth: int = 2):
    """(scores, [(condition, negated), ...], [bias, ...]) when `value`, read only by the
    Softmax (or by the next masking), is attention's masking of quantized scores by a
    constant sentinel <= MASK_SENTINEL: Where(c, scores, sentinel) / Where(c, sentinel,
    scores), or scores + M with M = Where(c, 0, sentinel) / Where(c, sentinel, 0) (BERT
    exports) or M = Where(c, B, sentinel) with B computed from shapes alone (T5's relative
    position bias: added to the scores in their integer unit), or one inside the other
    (GPT-Neo: a causal Where, then the padding mask added). The positions that count are
    where every condition holds (negated: where it does not)."""
    node = value.producer() if value is not None else None
    if node is None or len(value.uses()) != 1 or node.op_type not in ("Where", "Add"):
        return None
    if node.op_type == "Add":
        for scores_at in (0, 1):
            other = node.inputs[1 - scores_at]
            mask, biases = _sentinel_select(other, zero_other=True), []
            if mask is None and (found := _sentinel_bias(other)) is not None:
                mask, biases = found[:2], [found[2]]
            if mask is None:
                continue
            view = low._int_view(node.inputs[scores_at]) or wide_sum(low, node.inputs[scores_at])
            if view is not None:
                return view, [mask], biases
            inner = masked_scores(low, node.inputs[scores_at], depth - 1) if depth > 1 else None
            if inner is not None:
                return inner[0], [*inner[1], mask], [*inner[2], *biases]
        return None
    for scores_at in (1, 2):
        view = low._int_view(node.inputs[scores_at]) or wide_sum(low, node.inputs[scores_at])
        mask = _sentinel_select(value, zero_other=False, keep_at=scores_at)
        if view is not None and mask is not None:
            return view, [mask], []
    return None


def _sentinel_bias(value: ir.Value | None):
    """(condition, negated, B) when `value` = Where(c, B, sentinel) / Where(c, sentinel, B)
    with B a float tensor computed from constants and shapes alone (no model data), or a
    constant."""
    where = value.producer() if value is not None else None
    if where is None or where.op_type != "Where" or where.inputs[0] is None:
        return None
    for sentinel_at in (1, 2):
        bias = where.inputs[3 - sentinel_at]
        if not _is_sentinel(const_array(where.inputs[sentinel_at])):
            continue
        if bias is not None and _from_shapes(bias):
            return where.inputs[0], sentinel_at == 1, bias
    return None


def _is_sentinel(array) -> bool:
    """A scalar constant at or below MASK_SENTINEL."""
    return array is not None and array.size == 1 and float(array.ravel()[0]) <= MASK_SENTINEL


def _from_shapes(value: ir.Value, depth: int = 64) -> bool:
    """Computed from constants and tensor shapes alone (as `quantize/integer_scope.py`)."""
    node = value.producer()
    if value.const_value is not None:
        return True
    if node is None or depth == 0:
        return False
    if node.op_type in ("Shape", "Size"):
        return True
    return all(v is None or _from_shapes(v, depth - 1) for v in node.inputs)


def _sentinel_select(value: ir.Value | None, *, zero_other: bool, keep_at: int = 0):
    """(condition, negated) when `value` = Where(c, x, y) with a sentinel constant on one
    side (and 0, or the branch `keep_at`, on the other)."""
    where = value.producer() if value is not None else None
    if where is None or where.op_type != "Where" or where.inputs[0] is None:
        return None
    if where.inputs[0].dtype != ir.DataType.BOOL:
        return None
    branches = [const_array(v) for v in where.inputs[1:3]]
    for sentinel_at in (1, 2):
        other = 3 - sentinel_at
        if not _is_sentinel(branches[sentinel_at - 1]):
            continue
        if zero_other:
            kept = branches[other - 1]
            if kept is None or kept.size != 1 or float(kept.ravel()[0]) != 0.0:
                continue
        elif other != keep_at:
            continue
        return where.inputs[0], sentinel_at == 1  # sentinel where c holds: keep where not
    return None
