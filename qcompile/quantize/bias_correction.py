"""Bias correction (Nagel et al., data-free quantization): undo the mean shift that
rounding the weights puts on each output channel.

With Ŵ = Q(W), a layer's output mean moves by E[ŷ] − E[y] = (Ŵ − W)·E[x]. Subtracting
that from the bias makes the quantized layer unbiased on the calibration data. E[x] is
the per-input-channel mean of the FP32 activation, from a calibration run
(`ChannelMeanObserver`); Ŵ is computed exactly as InsertQDQ will quantize the weight
(same spec, bit-width overrides and axis). The error it removes grows as weights get
coarser: per-tensor, 4-bit and power-of-two scales (the fpga target) far more than
per-channel INT8.

Biases that InsertQDQ quantizes to int32 (Conv, Gemm) are corrected before it runs, so
the int32 values carry the correction; a MatMul's bias lives in the float Add after it.
Nodes with no bias are left alone: adding one would cost a float op or break a fused
integer kernel.

This pass changes FP32 outputs by design (it corrects for a quantizer that comes next),
so it runs in the quantize phase, after the FP32 reference is taken.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.calibrate.observers import Observer, weight_qparams
from qcompile.ir.graph import const_array, matmul_bias
from qcompile.numerics.qparams import QuantSpec, fake_quantize
from qcompile.quantize.quant_plan import QuantPlan

CORRECTABLE_OPS = frozenset({"Conv", "Gemm", "MatMul"})


class ChannelMeanObserver(Observer):
    """Running per-channel mean along `axis` (memory: one float64 per channel)."""

    def __init__(self, name: str = "", axis: int = -1) -> None:
        super().__init__(name)
        self.axis = axis
        self.sums: np.ndarray | None = None
        self.rows = 0

    def observe(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        super().observe(x)
        if self.unbounded or x.size == 0 or x.ndim == 0:
            return
        moved = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])
        s = moved.sum(axis=0, dtype=np.float64)
        self.sums = s if self.sums is None else self.sums + s
        self.rows += moved.shape[0]

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.sums is None or self.rows == 0 else self.sums / self.rows


def correction_inputs(model: ir.Model, plan: QuantPlan) -> dict[str, int]:
    """Activation tensor -> channel axis, for every node bias correction can fix."""
    nodes = {n.name: n for n in model.graph}
    axes: dict[str, int] = {}
    for w in plan.weights:
        node = nodes.get(w.node)
        if node is None or node.op_type not in CORRECTABLE_OPS or _bias_slot(node, plan) is None:
            continue
        axes[node.inputs[0].name] = 1 if node.op_type == "Conv" else -1
    return axes


def _bias_slot(node: ir.Node, plan: QuantPlan) -> tuple[ir.Node, int] | None:
    if node.op_type in ("Conv", "Gemm"):
        bias = next((b for b in plan.biases if b.node == node.name), None)
        return (node, bias.input_index) if bias is not None else None
    w = const_array(node.inputs[1])
    return matmul_bias(node, w.shape[-1]) if w is not None and w.ndim == 2 else None


def output_shift(node: ir.Node, w: np.ndarray, w_hat: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(Ŵ − W)·E[x] per output channel: what quantizing the weight adds to E[y]."""
    dw = (w_hat.astype(np.float64) - w).astype(np.float64)
    if node.op_type == "Conv":
        # [M, C/g, kh, kw]: every kernel tap sees the same channel mean (borders aside)
        groups = node.attributes.get_int("group", 1)
        taps = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2)  # [M, C/g]
        per_group = mean.reshape(groups, -1)  # [g, C/g]
        m_per_group = dw.shape[0] // groups
        return np.einsum("gmc,gc->gm", taps.reshape(groups, m_per_group, -1), per_group).ravel()
    if node.op_type == "Gemm":
        rows = dw.T if node.attributes.get_int("transB", 0) else dw
        return (mean @ rows) * node.attributes.get_float("alpha", 1.0)
    return mean @ dw


class BiasCorrection(ir.passes.InPlacePass):
    """Subtract (Q(W) − W)·E[x] from the bias of every quantized Conv/Gemm/MatMul.

    Requires: the plan's weights still FP32 (runs before InsertQDQ); E[x] per channel.
    Ensures: on the calibration data, each corrected layer's quantized output has the
    FP32 output's mean (first order, FP32 inputs).
    """

    def __init__(
        self, plan: QuantPlan, means: Mapping[str, np.ndarray], weight_spec: QuantSpec
    ) -> None:
        super().__init__()
        self.plan = plan
        self.means = means
        self.weight_spec = weight_spec
        self.corrected: dict[str, float] = {}  # node -> max |shift| removed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        for use in self.plan.weights:
            node = nodes.get(use.node)
            if node is None or node.op_type not in CORRECTABLE_OPS:
                continue
            slot = _bias_slot(node, self.plan)
            mean = self.means.get(node.inputs[0].name)
            w = const_array(node.inputs[use.input_index])
            if slot is None or mean is None or w is None:
                continue
            owner, idx = slot
            value = owner.inputs[idx]
            bias = const_array(value)
            if bias is None or len(value.uses()) != 1 or value.is_graph_input():
                continue  # no constant bias, or a shared one that cannot take this correction
            w32 = w.astype(np.float32)
            spec = self.plan.weight_spec(use.node, self.weight_spec)
            w_hat = fake_quantize(w32.copy(), weight_qparams(w32, spec, use.axis))
            shift = output_shift(node, w32, w_hat, mean)
            if node.op_type == "Gemm":
                shift = shift / node.attributes.get_float("beta", 1.0)
            corrected = bias.astype(np.float64) - np.broadcast_to(shift, bias.shape[-1:])
            # in place, keeping the name: the plan names a MatMul's bias Add operand
            # (integer-only targets quantize it), so a renamed copy would go unquantized
            value.const_value = ir.tensor(corrected.astype(bias.dtype), name=value.name)
            self.corrected[node.name] = float(np.abs(shift).max(initial=0.0))
        return ir.passes.PassResult(model, bool(self.corrected))
