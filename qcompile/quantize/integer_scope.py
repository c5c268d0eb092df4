"""What an integer-only plan leaves unquantized although it could quantize it.

- Chains of float ops that integer-only lowering computes as one kernel (RMSNorm,
  ConvNeXt-V2's GRN): the plan
  quantizes such a chain's input and output only. Quantizing its steps (h², the mean, the
  reciprocal root) to 8 bits each, as a plan of separate ops would, loses most of the
  precision, and the integer kernel (`lower/integer_norms.py`) needs the chain whole.
- Arithmetic on values computed from tensor shapes alone (rotary position angles from
  the sequence length: Range → Cast → Mul by the inverse frequencies → Cos/Sin): it
  does not depend on the model's data, so it runs like a model input's preprocessing,
  and its results are quantized where quantized ops read them. Quantizing the angles
  themselves (up to the sequence length in radians) to 8 bits would scramble the
  cos/sin tables. `lower/integer_parts.float_ops_between` does not count such ops as
  inside the integer region, for the same reason.

It also names the ops that are no plan nodes but that the lowering computes from codes
(`LOWERED_WHEN_QUANTIZED`): the plan quantizes what they read and write.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from qcompile.ir.grn import grn_at
from qcompile.ir.norms import rms_norm_at

RMS_CHAIN = "inside an RMSNorm, which integer-only lowering computes as one kernel"
GRN_CHAIN = "inside a GRN (ConvNeXt-V2), which integer-only lowering computes as one kernel"
SHAPE_ONLY = "computed from tensor shapes alone (not the model's data): left float"


def shape_only_values(nodes: Sequence[ir.Node]) -> set[int]:
    """ids of the values computed from constants and tensor shapes alone (`nodes` in
    topological order)."""
    found: set[int] = set()
    for node in nodes:
        dimensions = node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx")
        if dimensions or all(
            v is None or v.const_value is not None or id(v) in found for v in node.inputs
        ):
            found.update(id(v) for v in node.outputs)
    return found


def left_unquantized(nodes: Sequence[ir.Node]) -> dict[str, str]:
    """Node name → why an integer-only plan leaves it unquantized."""
    inside: dict[str, str] = {}
    shaped = shape_only_values(nodes)
    for node in nodes:
        norm = rms_norm_at(node)
        grn = grn_at(node) if norm is None else None
        if norm is not None:
            inside.update((n.name or "", RMS_CHAIN) for n in norm.nodes)
        elif grn is not None:
            inside.update((n.name or "", GRN_CHAIN) for n in grn.nodes)
        elif any(v is not None and v.const_value is None for v in node.inputs) and all(
            v is None or v.const_value is not None or id(v) in shaped for v in node.inputs
        ):
            inside[node.name or ""] = SHAPE_ONLY
    return inside


# Not plan nodes, but integer-only lowering gives them integer forms when their input and
# output are quantized (lower/integer_reductions.py): movement after them moves integers.
# ReduceMean: global pooling as torch's dynamo exporter writes it, ReduceMean → Reshape → Gemm.
LOWERED_WHEN_QUANTIZED = frozenset(
    {"LayerNormalization", "RMSNormalization", "InstanceNormalization", "Softmax", "ReduceMean"}
)


def read_by_lowered(value: ir.Value) -> bool:
    """An op the integer-only lowering computes from codes reads `value`."""
    return any(u.node.op_type in LOWERED_WHEN_QUANTIZED for u in value.uses())


def read_as_codes(value: ir.Value) -> bool:
    """A lowered op needs `value` as codes and no plan node quantizes it: a ReduceMean
    pooling a SiLU (MobileViT, EfficientNet), a norm reading a MatMul. Not a sum (Add) a
    norm or Softmax reads: those kernels read its int32 sum directly (8 bits there,
    measured on the corpus, cost gpt2 0.7 dB, dinov2 1.1 dB, ViT 2.1 dB)."""
    producer = value.producer()
    summed = producer is not None and producer.op_type in ("Add", "Sub")
    return any(
        u.node.op_type == "ReduceMean"
        or (not summed and u.node.op_type in LOWERED_WHEN_QUANTIZED - {"Softmax"})
        for u in value.uses()
    )


def rewired_for_kernels(nodes: Sequence[ir.Node], graph_outputs: set[str]) -> list[ir.Value]:
    """Values the integer-only plan quantizes for every reader: outputs of such ops that
    another one reads (SegFormer's patch-embedding LayerNorm feeding the block's first
    LayerNorm: no plan node quantizes them, yet both kernels work on codes), and a GRN's
    input, which its chain reads through the same quantizer as its residual Add. A
    ReduceMean's too (ConvNeXt's and BEiT's pooled features before their LayerNorm): 8-bit
    codes there cost ConvNeXt 0.9 dB against a float LayerNorm reading the float mean, but
    the integer LayerNorm has no path that reads a mean's int32 sum, so without them the
    pair stayed a float island."""
    found = []
    for node in nodes:
        grn = grn_at(node)
        if grn is not None:
            found.append(grn.x)
        elif node.op_type in LOWERED_WHEN_QUANTIZED:
            found += [v for v in node.outputs[:1] if read_by_lowered(v)]
    return [v for v in found if v.name not in graph_outputs]
