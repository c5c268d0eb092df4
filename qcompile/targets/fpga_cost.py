"""Per-layer cost model of the FPGA-like target, for the report.

Integer kernels that are not MAC layers (norms, Softmax, lookup tables, pools,
requantizing adds...) are costed by `fpga_kernels.py` in elementwise steps on the same
lanes; the rest of this docstring is about the MAC layers.

For each quantized Conv/Gemm/MatMul, per input sample:
- MACs from its shapes (output elements × reduction length);
- weight memory = weights × weight bits;
- bit operations (BOPs) = MACs × weight bits × activation bits;
- cycles = MACs / effective parallelism. A b_w × b_a multiplier in FPGA fabric costs
  about b_w·b_a LUTs, so a fixed budget that fits `macs_per_cycle` 8×8 MACs fits
  macs_per_cycle · 64 / (b_w·b_a) narrower ones: 4-bit weights double a layer's
  parallelism. This is the first-order model FINN's folding uses; it ignores memory
  bandwidth, pipeline fill and DSP packing, and says so in the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from qcompile.targets.fpga_kernels import KernelWork, kernel_work


@dataclass(frozen=True)
class LayerCost:
    node: str
    op_type: str
    macs: int
    weight_bits: int
    activation_bits: int
    weights: int
    weight_memory_bits: int
    bops: int
    cycles: int
    # integer kernels other than MACs (fpga_kernels.py): elementwise ops, table lookups,
    # int64 divisions (square-root Newton steps included), widest accumulator in bits
    ops: int = 0
    lookups: int = 0
    divisions: int = 0
    accumulator_bits: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in value.shape]
    return None if any(d is None for d in dims) else dims  # type: ignore[return-value]


def _per_sample_outputs(value: ir.Value, observed: Mapping[str, tuple]) -> int | None:
    """Output elements per sample: the static dims after the batch axis, or else the
    shape seen during calibration."""
    if value.shape is not None and len(value.shape) > 1:
        rest = list(value.shape)[1:]
        if all(isinstance(d, int) for d in rest):
            return int(np.prod(rest))
    if value.name in observed:
        shape = observed[value.name][1]
        return int(np.prod(shape[1:])) if len(shape) > 1 else None
    return None


_SIZE_PRESERVING = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
)


def _size_source(value: ir.Value, observed: Mapping[str, tuple]) -> ir.Value:
    """`value`, or the tensor a chain of size-preserving data movement made it from when
    only that one was observed (attention's output projection reads a Reshape)."""
    while value.name not in observed and (value.shape is None or not all(
        isinstance(d, int) for d in list(value.shape)[1:]
    )):  # fmt: skip
        producer = value.producer()
        if producer is None or producer.op_type not in _SIZE_PRESERVING or not producer.inputs:
            break
        value = producer.inputs[0]
    return value


def layer_macs(node: ir.Node, observed: Mapping[str, tuple] | None = None) -> int | None:
    """MACs per input sample (batch axis 0), from static or observed shapes."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    w_dims = _dims(w)
    outputs = _per_sample_outputs(node.outputs[0], observed or {})
    if outputs is None and w_dims is not None and len(w_dims) == 2:
        # a MatMul/Gemm output nobody observed (its bias Add's is): rows from the input
        inputs = _per_sample_outputs(_size_source(node.inputs[0], observed or {}), observed or {})
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        k, n = (w_dims[1], w_dims[0]) if transposed else (w_dims[0], w_dims[1])
        if node.op_type in ("MatMul", "Gemm") and inputs is not None and k:
            outputs = inputs // k * n
    if w_dims is None or outputs is None:
        return None
    if node.op_type == "Conv":
        # each output element reduces over C_in/group × kernel
        return outputs * int(np.prod(w_dims[1:]))
    if node.op_type == "ConvTranspose":
        # each input element meets C_out/group × kernel weights; per output element that
        # is C_in/group × kernel / stride (C_in/group for the kernel = stride upsampling)
        group = node.attributes.get_int("group", 1)
        strides = node.attributes.get_ints("strides", [1] * (len(w_dims) - 2))
        per_output = w_dims[0] // group * int(np.prod(w_dims[2:]))
        return outputs * per_output // max(int(np.prod(strides)), 1)
    if node.op_type == "Gemm":
        k = w_dims[1] if node.attributes.get_int("transB", 0) else w_dims[0]
        return outputs * k
    if node.op_type == "MatMul":
        return outputs * w_dims[-2] if len(w_dims) >= 2 else None
    return None


def _activation_matmul_macs(node: ir.Node, observed: Mapping[str, tuple]) -> int | None:
    """MACs per sample of a MatMul of two activations: output elements × the reduced K."""
    outputs = _per_sample_outputs(node.outputs[0], observed)
    a = node.inputs[0]
    k = a.shape[-1] if a.shape is not None and len(a.shape) else None
    if not isinstance(k, int) and a.name in observed:
        k = observed[a.name][1][-1]
    return outputs * int(k) if outputs is not None and isinstance(k, (int, np.integer)) else None


def layer_costs(
    model: ir.Model,
    nodes: dict[str, str],
    weight_bits: dict[str, int],
    activation_bits: dict[str, int],
    macs_per_cycle: int,
    observed: Mapping[str, tuple] | None = None,
    kernels: frozenset[str] = frozenset(),
) -> list[LayerCost]:
    """Costs of the quantized compute nodes (`nodes`: name → kind, as in the plan) and,
    for the `kernels` (node names: the integer-only plan's other nodes and the norms and
    Softmax it lowers), their integer work; `observed`: tensor → (dtype, shape) seen
    during calibration, for dynamic shapes."""
    costs = []
    for node in model.graph:
        if node.name in kernels and nodes.get(node.name) != "compute":
            work = kernel_work(node, observed or {})
            if work is not None and work.steps():
                costs.append(_kernel_cost(node, work, macs_per_cycle))
            continue
        if nodes.get(node.name) != "compute":
            continue
        macs = layer_macs(node, observed)
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if macs is None and node.op_type == "MatMul" and w is not None:
            macs = _activation_matmul_macs(node, observed or {})  # attention's Q·Kᵀ, P·V
        if macs is None or w is None:
            continue
        wb = weight_bits.get(node.name, 8)
        ab = activation_bits.get(node.name, 8)
        n_weights = int(w.const_value.size) if w.const_value is not None else 0
        costs.append(
            LayerCost(
                node=node.name,
                op_type=node.op_type,
                macs=int(macs),
                weight_bits=wb,
                activation_bits=ab,
                weights=n_weights,
                weight_memory_bits=n_weights * wb,
                bops=int(macs) * wb * ab,
                cycles=mac_cycles(int(macs), wb, ab, macs_per_cycle),
            )
        )
    return costs


def mac_cycles(macs: int, weight_bits: int, activation_bits: int, macs_per_cycle: int) -> int:
    """Cycles of a MAC layer: a budget of `macs_per_cycle` 8×8 multipliers fits
    macs_per_cycle·64/(b_w·b_a) narrower ones (see the module docstring)."""
    parallel = max(1.0, macs_per_cycle * 64.0 / (weight_bits * activation_bits))
    return int(math.ceil(macs / parallel))


def _kernel_cost(node: ir.Node, work: KernelWork, lanes: int) -> LayerCost:
    """A non-MAC integer kernel: its elementwise steps on `lanes` lanes a cycle."""
    return LayerCost(
        node=node.name,
        op_type=node.op_type,
        macs=0,
        weight_bits=0,
        activation_bits=8,
        weights=0,
        weight_memory_bits=0,
        bops=0,
        cycles=int(math.ceil(work.steps() / max(lanes, 1))),
        ops=work.ops,
        lookups=work.lookups,
        divisions=work.divisions,
        accumulator_bits=work.accumulator_bits,
    )
