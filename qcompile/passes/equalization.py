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
pass repeats over chains (pw → dw → pw) until the scales settle. ReLU6/Clip and
HardSwish are not homogeneous, so pairs joined by them are left alone; a Conv whose
output has other readers is left alone too.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import const_array

logger = logging.getLogger(__name__)

HOMOGENEOUS = frozenset({"Relu"})  # f(x/s) = f(x)/s for s > 0
SCALE_LIMIT = 16.0


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


def _equalizable_pairs(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node | None, ir.Node]]:
    pairs = []
    outputs = set(graph.outputs)
    for conv1 in graph:
        if conv1.op_type != "Conv" or const_array(conv1.inputs[1]) is None:
            continue
        y = conv1.outputs[0]
        uses = list(y.uses())
        if y in outputs or len(uses) != 1:
            continue
        act, nxt = None, uses[0].node
        if nxt.op_type in HOMOGENEOUS:
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
    """Equalize per-channel weight ranges of Conv → [Relu] → Conv pairs.

    Requires: constant Conv weights (and biases); folded BatchNorm (run after the
    default rewrites).
    Ensures: FP32 outputs unchanged up to float rounding.
    """

    def __init__(self, rounds: int = 4) -> None:
        super().__init__()
        self.rounds = rounds
        self.equalized = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs = _equalizable_pairs(model.graph)
        modified = False
        for _ in range(self.rounds):
            worst = 1.0
            for conv1, _act, conv2 in pairs:
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
