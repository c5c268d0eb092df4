"""Target profiles: frozen plain data describing what a target can run in integers.

A profile holds no behaviour; the pipeline file of each target reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qcompile.numerics.qparams import QuantSpec

# Ops whose weights are quantized and whose integer kernels do the real work.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops quantized on all their float inputs and outputs (integer kernels on most targets).
ARITH_OPS = frozenset(
    {
        "Add",
        "Mul",
        "AveragePool",
        "GlobalAveragePool",
        "Concat",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "LeakyRelu",
        "Softmax",
    }
)
# Data movement: quantized when their input is, sharing its scale, so pairs cancel.
PASSTHROUGH_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "MaxPool",
        "Resize",
        "Gather",
        "Split",
        "DepthToSpace",
        "SpaceToDepth",
    }
)
# Integer-only graphs also move constant Pads as codes: the padding becomes its code
# (the zero point for 0, lower/integer_select.py), and Expand/Tile (grouped-query
# attention repeats K and V heads) copy codes. The QDQ targets leave them out.
INTEGER_PASSTHROUGH_OPS = PASSTHROUGH_OPS | {"Pad", "Expand", "Tile"}
# Arithmetic only integer-only lowering gives an integer form (ORT's QDQ targets have no
# integer kernel for them, so the QDQ targets leave them float): PoolFormer's pool(x) − x,
# a BatchNormalization no linear layer absorbed (DenseNet's pre-activation BN), AlexNet's
# and GoogLeNet's LRN.
INTEGER_ARITH_OPS = frozenset({"Sub", "BatchNormalization", "LRN"})
# Elementwise ops with no integer kernel in ORT that integer-only lowering turns into
# 256-entry lookup tables (Sigmoid, HardSwish... are in ARITH_OPS already).
TABLE_OPS = frozenset({"Gelu", "FastGelu", "Tanh", "Erf", "Elu", "Softplus", "Exp", "HardSwish"})
# ORT contrib ops that are standard ONNX ops of a later opset, as (op, attributes) there:
# fusions write them for models below opset 20 (passes/fusion.py), integer lowering
# tabulates them and the reference interpreter evaluates them as the standard op.
MS_STANDARD_OPS: dict[tuple[str, str], tuple[str, dict[str, str]]] = {
    ("com.microsoft", "Gelu"): ("Gelu", {}),
    ("com.microsoft", "FastGelu"): ("Gelu", {"approximate": "tanh"}),
}


def standard_op(domain: str, op_type: str) -> tuple[str, dict[str, str]] | None:
    """The standard ONNX op (and attributes) a node computes: itself in ONNX's domain, the
    later-opset op for a contrib op in MS_STANDARD_OPS; None for any other domain."""
    if domain in ("", "ai.onnx"):
        return op_type, {}
    return MS_STANDARD_OPS.get((domain, op_type))


# Activations folded into the producer's output quantizer.
FUSIBLE_ACTIVATIONS = frozenset({"Relu", "Clip"})


@dataclass(frozen=True)
class TargetProfile:
    name: str
    activation: QuantSpec
    weight: QuantSpec
    per_channel_weights: bool
    # MatMul weights per output column; some EPs only take per-tensor B.
    per_channel_matmul: bool
    compute_ops: frozenset[str]
    arith_ops: frozenset[str]
    passthrough_ops: frozenset[str] = PASSTHROUGH_OPS
    fusible_activations: frozenset[str] = FUSIBLE_ACTIVATIONS
    # Drop Relu/Clip when the output quantizer's clamp reproduces it exactly (zp == qmin).
    remove_clamping_activations: bool = True
    accumulator_bits: int = 32
    # Lowered to integer-only arithmetic: quantize every op that has an integer form, not
    # only those inside integer chains (where ORT's float fallbacks make chains pay off).
    integer_only: bool = False
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    notes: tuple[str, ...] = field(default_factory=tuple)
    # -- capabilities: what the driver and strategies may ask of this target --------------
    # Bit widths its kernels take for weights and activations (options and per-node
    # overrides are checked against it).
    bit_widths: frozenset[int] = frozenset({8})
    # Block-wise INT4 weight-only MatMuls with float activations (ORT MatMulNBits).
    int4_weights: bool = False
    # A log2 quantizer on attention probabilities (needs shift arithmetic).
    log2_softmax: bool = False
    # Per-layer cost model the report carries: None, or "layer-cycles" (MACs, BOPs,
    # cycles of an FPGA-like MAC array: qcompile.targets.fpga_cost).
    cost_model: str | None = None
    # What mixed precision chooses per layer: "fp32-int8-int4" (float or INT8, INT4
    # weights where eligible; fastest under an accuracy budget) or "weight-bits" (a
    # weight bit width from bit_widths; smallest under an accuracy budget).
    mixed_precision: str = "fp32-int8-int4"
    # Where its compiled models run by default ("ort"; "tvm" and "qonnx" on request).
    default_backend: str = "ort"

    @property
    def quantizable_ops(self) -> frozenset[str]:
        return self.compute_ops | self.arith_ops | self.passthrough_ops

    def allows_bits(self, bits: int) -> bool:
        return bits in self.bit_widths


def integer_only_variant(profile: TargetProfile) -> TargetProfile:
    """The profile for integer-only lowering: every op with an integer form is quantized."""
    return dataclasses.replace(
        profile,
        arith_ops=profile.arith_ops | TABLE_OPS | INTEGER_ARITH_OPS,
        passthrough_ops=profile.passthrough_ops | INTEGER_PASSTHROUGH_OPS,
        integer_only=True,
    )
