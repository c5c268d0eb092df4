"""Work of the integer kernels that are not multiply-accumulate layers, for the FPGA cost
model (`fpga_cost.py`): elementwise integer operations, table lookups, int64 divisions
(Newton steps of the integer square root included) and the widest accumulator, per input
sample, counted from the integer forms `qcompile/lower/` writes:

- a dyadic requantization is 3 operations (multiply, rounding add, shift);
- Add/Sub: two rescaling multiplies, the add, a requantization; Mul: multiply, requantization;
  Concat: a requantization per element;
- lookup-table ops (Sigmoid, GELU, Tanh, ...): one lookup and an index offset per element;
- pools and ReduceMean: one add per input element, a requantization per output;
  MaxPool: one comparison per window element;
- LayerNorm (RMSNorm, InstanceNorm of one channel): per element centre, deviation, square,
  accumulate, fixed-point scale, one division by the row's root, γ, β and a
  requantization; per row an integer square root (`ISQRT_STEPS` divisions after a
  bit-length count over 62 powers of two);
- Softmax: per element the max comparison, subtraction, exponent requantization, shift and
  fraction split, two lookups (the two-digit exp table), the row sum and one division;
- ConvNeXt-V2's GRN: per element square, accumulate, the c·K product, the β add and a
  requantization; per sample and channel a square root and one division;
- BatchNormalization as a per-channel affine: centre, multiply, add, requantization;
- LRN (β = ¾): per element centre, square, `size` window adds, the denominator's
  multiply-add, two integer square roots and one division, sign and requantization;
- linear Resize: two taps, two multiplies and an add per output element and resized axis.

A b-bit divider in fabric is a chain of b add/subtract steps, so one int64 division costs
`DIVIDE_STEPS` elementwise operations; lanes for elementwise work are the MAC budget's
(first-order, like the MAC model: no memory bandwidth or pipeline fill).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.ir.grn import grn_at
from qcompile.ir.norms import rms_norm_at
from qcompile.lower.integer_parts import LUT_OPS

REQUANT = 3
ISQRT_STEPS = 7  # as lower/integer_reductions.isqrt
DIVIDE_STEPS = 64


@dataclass(frozen=True)
class KernelWork:
    ops: int
    lookups: int
    divisions: int
    accumulator_bits: int

    def steps(self) -> int:
        """Elementwise-lane steps: lookups count one, divisions `DIVIDE_STEPS`."""
        return self.ops + self.lookups + DIVIDE_STEPS * self.divisions


def _elements(value: ir.Value, observed) -> int | None:
    """Elements per sample (after the batch axis), from static or observed shapes."""
    dims = list(value.shape) if value.shape is not None else None
    if dims and all(isinstance(d, int) for d in dims[1:]):
        return int(np.prod(dims[1:])) if len(dims) > 1 else 1
    if value.name in observed:
        shape = observed[value.name][1]
        return int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return None


def _last_axis(value: ir.Value, observed) -> int | None:
    dims = list(value.shape) if value.shape is not None else None
    if dims and isinstance(dims[-1], int):
        return dims[-1]
    return observed[value.name][1][-1] if value.name in observed else None


def _norm(e: int, n: int, per_element: int) -> KernelWork:
    rows = max(e // max(n, 1), 1)
    return KernelWork(per_element * e + 62 * rows, 0, e + ISQRT_STEPS * rows, 64)


def kernel_work(node: ir.Node, observed) -> KernelWork | None:
    """The integer work of `node` as lowered, per input sample (None: not a kernel here,
    or shapes unknown)."""
    op = node.op_type
    out = node.outputs[0] if node.outputs else None
    e = _elements(out, observed) if out is not None else None
    if e is None:
        return None
    if op == "Add" and grn_at(node) is not None:
        channels = _last_axis(out, observed) or 1
        per_channel = 62 + ISQRT_STEPS + 1
        return KernelWork(8 * e + per_channel * channels, 0, (ISQRT_STEPS + 1) * channels, 64)
    if op in ("Mul", "Div") and rms_norm_at(node) is not None:
        return _norm(e, _last_axis(out, observed) or 1, 8 + REQUANT)
    if op in ("LayerNormalization", "RMSNormalization", "InstanceNormalization"):
        return _norm(e, _last_axis(out, observed) or 1, 7 + REQUANT + (op != "RMSNormalization"))
    if op == "Softmax":
        return KernelWork((9 + REQUANT) * e, 2 * e, e, 64)
    if op in ("Add", "Sub"):
        return KernelWork((3 + REQUANT) * e, 0, 0, 64)
    if op == "Mul":
        return KernelWork((1 + REQUANT) * e, 0, 0, 64)
    if op == "Concat":
        return KernelWork(REQUANT * e, 0, 0, 64)
    if op == "BatchNormalization":
        return KernelWork((3 + REQUANT) * e, 0, 0, 64)
    if op == "LRN":
        size = node.attributes.get_int("size", 1)
        per_element = 2 + size + 2 + 2 * 62 + 4 + REQUANT
        return KernelWork(per_element * e, 0, (2 * ISQRT_STEPS + 1) * e, 64)
    if op in LUT_OPS:  # the lowering's own list of table ops
        return KernelWork(e, e, 0, 16)
    if op in ("AveragePool", "GlobalAveragePool", "ReduceMean", "MaxPool"):
        e_in = _elements(node.inputs[0], observed)
        if e_in is None:
            return None
        if op == "MaxPool":
            window = int(np.prod(node.attributes.get_ints("kernel_shape", [1])))
            return KernelWork(window * e, 0, 0, 8)
        return KernelWork(e_in + REQUANT * e, 0, 0, 32)
    if op == "Resize" and node.attributes.get_string("mode", "nearest") == "linear":
        return KernelWork((3 * 2 + REQUANT) * e, 0, 0, 64)
    return None
