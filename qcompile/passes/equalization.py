"""Cross-layer equalization (Nagel et al., "Data-Free Quantization"), FP32 outputs unchanged.

For Conv1 → [Relu] → Conv2, scaling output channel i of Conv1 by 1/s_i and input channel
i of Conv2 by s_i leaves the result unchanged, because ReLU is positively homogeneous
(relu(x/s) = relu(x)/s for s > 0). With r1_i = max|W1[i]| and r2_i = max|W2[:, i]|,

    s_i = sqrt(r1_i / r2_i)   ⇒   r1_i / s_i = r2_i · s_i = sqrt(r1_i · r2_i)

equalizes the two layers' per-channel ranges. Per-channel weight quantization already
absorbs weight-range spread; what equalization buys here is the *activation* between
the layers: its channels are rescaled towards each other, so one per-tensor scale fits
them better. That is where depthwise-separable nets (MobileNet) lose accuracy.

Scales are clipped to [1/16, 16] (tiny channels would otherwise be blown up) and the
pass repeats over chains (pw → dw → pw) until the scales settle. ReLU6/Clip are not
homogeneous, so pairs joined by them are left alone; a Conv whose output has other
readers is left alone too.

HardSwish is not homogeneous either, but its canonical form (FuseForQuantization),
x · clip(x + 3, 0, 6) · 1/6, is a product of x and a gate, and only the gate is
nonlinear. With x' = x / s the gate is clip(s·x' + 3, 0, 6), a per-channel affine map
of x' followed by a clip; written as a 1×1 depthwise Conv (weights s, bias 3) it runs
as one integer kernel whose per-channel weights hold s exactly, and

    x' · clip(s·x' + 3, 0, 6) / 6 = hardswish(x) / s,

so Conv2's input channels take the factor s as with ReLU. This is where
PP-PicoDet/ESNet-style backbones lose their accuracy: a few stem channels with ranges
1/100 of the widest, per-tensor quantized to noise and then amplified by the
depthwise conv that reads them (measured: layout detector score SQNR 4 dB).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import add_initializer, const_array, scalar_const

logger = logging.getLogger(__name__)

HOMOGENEOUS = frozenset({"Relu"})  # f(x/s) = f(x)/s for s > 0
SCALE_LIMIT = 16.0
GATE_SUFFIX = "_hardswish_gate"


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


@dataclasses.dataclass
class HardSwishGate:
    """The canonical HardSwish after a Conv: `gate` is Add(x, 3) until the first
    rescaling turns it into a 1×1 depthwise Conv(x, s, 3); `next` reads x·gate·1/6."""

    gate: ir.Node
    next: ir.Node


def _scalar(value: ir.Value | None, expected: float) -> bool:
    got = scalar_const(value)
    return got is not None and abs(got - expected) < 1e-6


def _hardswish_gate(conv1: ir.Node) -> HardSwishGate | None:
    """Match y = conv1(...) read only by Add(y, 3) [or our gate Conv] → Clip(0, 6) → Mul(y, ·)
    → Mul(·, 1/6) → Conv (as its data input)."""
    y = conv1.outputs[0]
    uses = list(y.uses())
    if len(uses) != 2:
        return None
    by_type = {u.node.op_type: u for u in uses}
    mul_use = by_type.get("Mul")
    gate_use = by_type.get("Add") or by_type.get("Conv")
    if mul_use is None or gate_use is None:
        return None
    gate, mul = gate_use.node, mul_use.node
    if gate.op_type == "Add" and not _scalar(gate.inputs[1 - gate_use.idx], 3.0):
        return None
    if gate.op_type == "Conv" and not gate.name.endswith(GATE_SUFFIX):
        return None
    clip_uses = list(gate.outputs[0].uses())
    if len(clip_uses) != 1 or clip_uses[0].node.op_type != "Clip":
        return None
    clip = clip_uses[0].node
    if not (_scalar(clip.inputs[1], 0.0) and _scalar(clip.inputs[2], 6.0)):
        return None
    if [u.node for u in clip.outputs[0].uses()] != [mul]:
        return None
    after = list(mul.outputs[0].uses())
    if len(after) != 1 or after[0].node.op_type != "Mul" or mul.outputs[0].is_graph_output():
        return None
    sixth = after[0].node
    if not _scalar(sixth.inputs[1 - after[0].idx], 1 / 6):
        return None
    final = list(sixth.outputs[0].uses())
    if len(final) != 1 or final[0].idx != 0 or sixth.outputs[0].is_graph_output():
        return None
    return HardSwishGate(gate, final[0].node)


def equalizable_pairs(
    graph: ir.Graph, hardswish: bool
) -> list[tuple[ir.Node, ir.Node | HardSwishGate | None, ir.Node]]:
    pairs = []
    outputs = set(graph.outputs)
    for conv1 in graph:
        if conv1.op_type != "Conv" or const_array(conv1.inputs[1]) is None:
            continue
        y = conv1.outputs[0]
        uses = list(y.uses())
        if y in outputs or not uses:
            continue
        act, nxt = None, uses[0].node
        gate = _hardswish_gate(conv1) if hardswish else None
        if gate is not None:
            act, nxt = gate, gate.next
        elif len(uses) != 1:
            continue
        elif nxt.op_type in HOMOGENEOUS:
            act = nxt
            z = act.outputs[0]
            after = list(z.uses())
            if z in outputs or len(after) != 1:
                continue
            nxt = after[0].node
            if after[0].idx != 0:
                continue
        elif uses[0].idx != 0:
            continue
        if nxt.op_type != "Conv" or const_array(nxt.inputs[1]) is None:
            continue
        if any(_shared(v) for v in conv1.inputs[1:] if v is not None) or _shared(nxt.inputs[1]):
            continue
        pairs.append((conv1, act, nxt))
    return pairs


def _shared(value: ir.Value) -> bool:
    """A weight read by more than one node cannot be rescaled for one of them."""
    return len(list(value.uses())) > 1


def _ranges(conv1: ir.Node, conv2: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    w1, w2 = const_array(conv1.inputs[1]), const_array(conv2.inputs[1])
    channels = w1.shape[0]
    group2 = conv2.attributes.get_int("group", 1)
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    if group2 == 1:
        if w2.shape[1] != channels:
            return None
        r2 = np.abs(np.moveaxis(w2, 1, 0).reshape(channels, -1)).max(axis=1)
    elif group2 == channels and w2.shape[1] == 1 and w2.shape[0] % channels == 0:
        # depthwise (multiplier m): output channels i*m .. i*m+m-1 read input channel i
        m = w2.shape[0] // channels
        r2 = np.abs(w2.reshape(channels, m, -1)).max(axis=(1, 2))
    else:
        return None
    return r1.astype(np.float64), r2.astype(np.float64)


class CrossLayerEqualization(ir.passes.InPlacePass):
    """Equalize per-channel weight ranges of Conv → [Relu | HardSwish] → Conv pairs
    (HardSwish only with `hardswish=True`: its gate Conv costs time).

    Requires: constant Conv weights (and biases); folded BatchNorm (run after the
    default rewrites).
    Ensures: FP32 outputs unchanged up to float rounding.
    """

    def __init__(self, rounds: int = 4, hardswish: bool = False) -> None:
        super().__init__()
        self.rounds = rounds
        self.hardswish = hardswish
        self.equalized = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs = equalizable_pairs(model.graph, self.hardswish)
        modified = False
        for _ in range(self.rounds):
            worst = 1.0
            for conv1, act, conv2 in pairs:
                ranges = _ranges(conv1, conv2)
                if ranges is None:
                    continue
                r1, r2 = ranges
                ok = (r1 > 0) & (r2 > 0)
                s = np.ones_like(r1)
                s[ok] = np.sqrt(r1[ok] / r2[ok])
                s = np.clip(s, 1.0 / SCALE_LIMIT, SCALE_LIMIT)
                if np.allclose(s, 1.0, rtol=1e-3):
                    continue
                worst = max(worst, float(np.max(np.maximum(s, 1 / s))))
                self._apply(conv1, conv2, s)
                if isinstance(act, HardSwishGate):
                    act.gate = _rescale_gate(model.graph, conv1, act.gate, s)
                modified = True
            if worst < 1.01:
                break
        self.equalized = len(pairs) if modified else 0
        if modified:
            logger.info("cross-layer equalization: %d conv pairs", len(pairs))
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _apply(conv1: ir.Node, conv2: ir.Node, s: np.ndarray) -> None:
        w1 = const_array(conv1.inputs[1]).astype(np.float64)
        shape1 = (-1,) + (1,) * (w1.ndim - 1)
        _set(conv1.inputs[1], w1 / s.reshape(shape1))
        if len(conv1.inputs) > 2 and conv1.inputs[2] is not None:
            _set(conv1.inputs[2], const_array(conv1.inputs[2]).astype(np.float64) / s)
        w2 = const_array(conv2.inputs[1]).astype(np.float64)
        group2 = conv2.attributes.get_int("group", 1)
        if group2 == 1:
            shape2 = (1, -1) + (1,) * (w2.ndim - 2)
            _set(conv2.inputs[1], w2 * s.reshape(shape2))
        else:  # depthwise: scale each input channel's block of output channels
            m = w2.shape[0] // s.shape[0]
            per_out = np.repeat(s, m).reshape((-1,) + (1,) * (w2.ndim - 1))
            _set(conv2.inputs[1], w2 * per_out)


def _rescale_gate(graph: ir.Graph, conv1: ir.Node, gate: ir.Node, s: np.ndarray) -> ir.Node:
    """Conv1's output is now x / s: the gate must see s·(x / s) + 3 again."""
    if gate.op_type == "Conv":
        _set(
            gate.inputs[1],
            const_array(gate.inputs[1]).astype(np.float64)
            * s.reshape(const_array(gate.inputs[1]).shape),
        )
        return gate
    spatial = const_array(conv1.inputs[1]).ndim - 2
    channels = s.shape[0]
    weight = add_initializer(
        graph,
        f"{conv1.name}{GATE_SUFFIX}_w",
        s.reshape((channels, 1) + (1,) * spatial).astype(np.float32),
    )
    bias = add_initializer(graph, f"{conv1.name}{GATE_SUFFIX}_b", np.full(channels, 3, np.float32))
    y = conv1.outputs[0]
    conv = ir.Node(
        "",
        "Conv",
        [y, weight, bias],
        [ir.AttrInt64("group", channels), ir.AttrInt64s("kernel_shape", [1] * spatial)],
        name=f"{conv1.name}{GATE_SUFFIX}",
    )
    graph.insert_before(gate, conv)
    old = gate.outputs[0]
    ir.convenience.replace_all_uses_with(old, conv.outputs[0])
    graph.remove(gate, safe=True)
    conv.outputs[0].name = old.name
    conv.outputs[0].type, conv.outputs[0].shape = old.type, old.shape
    return conv
