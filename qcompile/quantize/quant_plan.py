"""What a quantization plan holds: the nodes and tensors to quantize, weights and biases,
per-tensor methods and bit widths, and why other nodes stay float. `build_plan`
(qcompile.quantize.plan) decides it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import onnx_ir as ir

from qcompile.numerics.qparams import QuantSpec

NodeKind = Literal["compute", "arith", "passthrough"]
FLOAT_TYPES = frozenset({ir.DataType.FLOAT})


@dataclass(frozen=True)
class WeightUse:
    node: str
    input_index: int
    tensor: str
    axis: int | None  # output-channel axis for per-channel; None for per-tensor


@dataclass(frozen=True)
class BiasUse:
    node: str
    input_index: int
    tensor: str
    activation: str  # the input activation tensor whose scale multiplies the weight's
    weight: str


@dataclass
class QuantPlan:
    # node name -> kind, for nodes that get quantized
    nodes: dict[str, NodeKind] = field(default_factory=dict)
    # node name -> why it stays float (for nodes of supported-looking ops)
    skipped: dict[str, str] = field(default_factory=dict)
    # activation tensors to quantize -> the tensor whose qparams they use (themselves,
    # or the input of the data-movement chain they come from)
    tensors: dict[str, str] = field(default_factory=dict)
    # tensor -> names of quantized consumer nodes that read it through its DQ
    consumers: dict[str, list[str]] = field(default_factory=dict)
    weights: list[WeightUse] = field(default_factory=list)
    biases: list[BiasUse] = field(default_factory=list)
    # activation node name -> producer node name it is folded into
    fused_activations: dict[str, str] = field(default_factory=dict)
    # tensors whose every reader (float ones too) goes through the DQ: ORT fuses a
    # Conv/Gemm into an integer kernel only when a Q is its output's sole consumer
    rewire_all: set[str] = field(default_factory=set)
    # y -> (x, k): y = k·x is read through a DequantizeLinear of x's integers at scale k·s_x
    aliases: dict[str, tuple[str, float]] = field(default_factory=dict)
    alias_sources: set[str] = field(default_factory=set)
    # per-node overrides that apply to tensors (tensor -> (calib_method, percentile))
    tensor_methods: dict[str, tuple[str, float]] = field(default_factory=dict)
    # per-node bit-width overrides: weight node -> bits, activation tensor -> bits
    weight_bits: dict[str, int] = field(default_factory=dict)
    tensor_bits: dict[str, int] = field(default_factory=dict)
    # MatMuls that get INT4 block weights and FP32 activations instead (MatMulNBits)
    int4_nodes: set[str] = field(default_factory=set)
    # post-Softmax tensors with a log2 quantizer (fpga): tensor -> bits
    log2_tensors: dict[str, int] = field(default_factory=dict)

    def weight_spec(self, node: str, default: QuantSpec) -> QuantSpec:
        """The spec `node`'s weight is quantized with: the target's, or its bit override."""
        bits = self.weight_bits.get(node)
        return default if bits is None else dataclasses.replace(default, bits=bits)

    @property
    def calibrated_tensors(self) -> list[str]:
        """Tensors that need their own statistics (not inheriting another's)."""
        return sorted({src for t, src in self.tensors.items() if t not in self.aliases})
