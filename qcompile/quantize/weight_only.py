"""INT4 weight-only MatMul: block-wise 4-bit weights, FP32 activations (ORT MatMulNBits).

Its weights take 4 bits plus a scale and zero point per block of `block_size` along K
— about a sixth of FP32. How it computes is MatMulNBits' `accuracy_level`: 0 (unset)
dequantizes to FP32 and runs at FP32 speed (a 512×384×1536 product on a VNNI machine:
2.95 ms vs FP32 2.87 ms and INT8 QDQ 1.03 ms), 4 quantizes the activations per block to
int8 and runs integer dot products. `strategies/int4_level.py` picks the level by
measurement.

The packing is ORT's own (`quantize_matmul_4bits`, what onnxruntime.quantization's
MatMulNBitsQuantizer calls), so the weights we simulate in the sensitivity session are
the ones the deployed kernel reads: `dequantize_int4` unpacks that layout.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.errors import QCompileError
from qcompile.ir.graph import add_initializer

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class Int4Spec:
    """Block-wise asymmetric 4-bit weights along K (MatMulNBits' layout)."""

    block_size: int = 32

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QCompileError(
                f"int4 block size must be a power of two >= 16, got {self.block_size}"
            )


@dataclasses.dataclass(frozen=True)
class Int4Weight:
    packed: np.ndarray  # uint8 [N, k_blocks, block_size / 2]: two 4-bit values a byte
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray  # uint8 [N, ceil(k_blocks / 2)]: two 4-bit values a byte
    k: int
    n: int
    block_size: int

    @property
    def bits(self) -> int:
        """Storage of this weight, scales and zero points included."""
        return 8 * (self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes)


def quantize_int4(w: np.ndarray, spec: Int4Spec = Int4Spec()) -> Int4Weight:
    """A [K, N] float weight in MatMulNBits' block layout, packed by ORT's kernel."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    block = spec.block_size
    k_blocks = (k + block - 1) // block
    padded = np.zeros((k_blocks * block, n), np.float32)
    padded[:k] = w
    packed = np.zeros((n, k_blocks, block // 2), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, (k_blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, padded, scales, zero_points, block, n, k_blocks * block, False)
    return Int4Weight(packed, scales, zero_points, k, n, block)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Low nibble first, as MatMulNBits reads them."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int32)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def dequantize_int4(q: Int4Weight) -> np.ndarray:
    """The [K, N] float weight the kernel computes with."""
    values = _nibbles(q.packed)  # [N, k_blocks, block]
    k_blocks = q.scales.shape[1]
    zero = _nibbles(q.zero_points)[:, :k_blocks]
    w = (values - zero[:, :, None]).astype(np.float32) * q.scales[:, :, None]
    return np.ascontiguousarray(w.reshape(q.n, -1)[:, : q.k].T)


def int4_eligible(node: ir.Node) -> bool:
    """A MatMul whose second input is a constant 2-D float weight."""
    if node.op_type != "MatMul" or len(node.inputs) != 2 or node.inputs[1] is None:
        return False
    weight = node.inputs[1].const_value
    return weight is not None and len(weight.shape) == 2 and weight.dtype == ir.DataType.FLOAT


ACCURACY_LEVELS = (0, 4)  # FP32 compute; int8 compute (activations quantized per block)


def set_accuracy_level(model: ir.Model, level: int) -> int:
    """Set every MatMulNBits' accuracy_level (0: FP32 compute, 4: int8); returns how many."""
    count = 0
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
            count += 1
    return count


class Int4WeightOnly(ir.passes.InPlacePass):
    """MatMul(x, W) → com.microsoft MatMulNBits(x, W_int4, scales, zero_points) on the
    named nodes (which the plan kept out of INT8: their activations stay FP32).

    Precondition: each named node is a MatMul with a constant 2-D float weight.
    Postcondition: those nodes are MatMulNBits under the same name; unused FP32 weights
    are left for the finalize phase's dead-code removal."""

    def __init__(self, nodes: frozenset[str], spec: Int4Spec = Int4Spec()):
        super().__init__()
        self.nodes = nodes
        self.spec = spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.name not in self.nodes:
                continue
            if not int4_eligible(node):
                raise QCompileError(
                    "INT4 weights need a MatMul with a constant 2-D float weight",
                    node=node.name,
                    hint=f"{node.op_type} cannot run as MatMulNBits; leave it out of "
                    "--int4-weights",
                )
            w = node.inputs[1].const_value.numpy().astype(np.float32)
            q = quantize_int4(w, self.spec)
            base = node.inputs[1].name
            inputs = [
                node.inputs[0],
                add_initializer(graph, f"{base}_int4", q.packed),
                add_initializer(graph, f"{base}_int4_scales", q.scales.reshape(-1)),
                add_initializer(graph, f"{base}_int4_zero_points", q.zero_points.reshape(-1)),
            ]
            nbits = ir.node(
                "MatMulNBits",
                inputs,
                attributes={"K": q.k, "N": q.n, "bits": 4, "block_size": q.block_size},
                domain=MS_DOMAIN,
                name=node.name,
            )
            output = node.outputs[0]
            name, output.name, node.name = output.name, f"{output.name}_fp32", f"{node.name}_fp32"
            nbits.outputs[0].name, nbits.outputs[0].dtype = name, output.dtype
            nbits.outputs[0].shape = output.shape
            graph.insert_before(node, nbits)
            ir.convenience.replace_all_uses_with(output, nbits.outputs[0])
            if output in graph.outputs:
                graph.outputs[graph.outputs.index(output)] = nbits.outputs[0]
            graph.remove(node, safe=True)
            modified = True
        if modified and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified)
