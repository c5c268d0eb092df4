"""Per-layer cost model of the FPGA-like target, for the report.

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


def layer_macs(node: ir.Node, observed: Mapping[str, tuple] | None = None) -> int | None:
    """MACs per input sample (batch axis 0), from static or observed shapes."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    w_dims = _dims(w)
    outputs = _per_sample_outputs(node.outputs[0], observed or {})
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


def layer_costs(
    model: ir.Model,
    nodes: dict[str, str],
    weight_bits: dict[str, int],
    activation_bits: dict[str, int],
    macs_per_cycle: int,
    observed: Mapping[str, tuple] | None = None,
) -> list[LayerCost]:
    """Costs of the quantized compute nodes (`nodes`: name → kind, as in the plan);
    `observed`: tensor → (dtype, shape) seen during calibration, for dynamic shapes."""
    costs = []
    for node in model.graph:
        if nodes.get(node.name) != "compute":
            continue
        macs = layer_macs(node, observed)
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if macs is None or w is None or w.const_value is None:
            continue
        wb = weight_bits.get(node.name, 8)
        ab = activation_bits.get(node.name, 8)
        parallel = max(1.0, macs_per_cycle * 64.0 / (wb * ab))
        n_weights = int(w.const_value.size)
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
                cycles=int(math.ceil(macs / parallel)),
            )
        )
    return costs
