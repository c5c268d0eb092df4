"""SmoothQuant: migrate activation outliers into the weights, FP32 outputs unchanged.

Y = X·W = (X·diag(s)⁻¹)·(diag(s)·W), per input channel j: s_j = max|X_j|^α / max|W_j|^(1−α).
diag(s)⁻¹ is folded into the producer of X — a LayerNorm's or RMSNorm's γ (and β), or a
gated MLP's up projection (smoothing_producers.py) — and diag(s) into the rows of every
consumer's weight; consumers sharing X (Q/K/V, or the
two FFN inputs) share one s computed from their concatenated weights. When X also feeds
something else (BERT's post-LN residual), the LayerNorm is duplicated: the residual
keeps the original, the linear layers read the smoothed copy. Consumers behind a Reshape
that keeps the last axis (GPT-2's token-flattening Conv1D) count. Without a foldable
producer an explicit Mul is inserted (`--smooth-explicit`; auto: on targets that keep
float elementwise ops, in front of consumers wide enough that the Mul's cost vanishes): it
stays in the graph as a float elementwise op in front of the quantizer. (Folding it into a per-channel QuantizeLinear
(scale σ·s) with a per-tensor DequantizeLinear σ is exact, but ORT's per-axis
QuantizeLinear measured 6x slower than the Mul it saves on MiniLM, so we do not.)

Channel shift (Outlier Suppression+, the shift half of RepQ-ViT's reparameterization):
post-LayerNorm channels are not only of different widths but centred at different
places (β), and one per-tensor zero point cannot centre them all. With δ_j the middle of
channel j's range, X = X̃·diag(s) + δ: the LayerNorm writes X̃ = (X − δ)/s (β' = (β − δ)/s)
and every consumer adds δ·W back to its bias (a Gemm's C, or the constant of the Add
after a MatMul), so FP32 outputs stay the same. A group is shifted only when every
consumer has such a bias and the shifted product quantizes with less error.

α (and shift or not) is searched per group on calibration rows by the output error of
the quantized product (SmoothQuant's own recipe), unless fixed. Statistics come from the
calibration stage as a constructor argument, so the pass stays model → model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibrate.observers import Observer
from qcompile.ir.graph import add_initializer, const_array, matmul_bias
from qcompile.numerics.qparams import QuantSpec, fake_quantize, range_to_qparams
from qcompile.passes import smoothing_producers as producers

logger = logging.getLogger(__name__)

# α = 1 would be RepQ-ViT's scale reparameterization (s_j ∝ channel j's range, so
# per-tensor quantization of X/s is per-channel quantization of X). It is left out: the
# product-error search picked it for MiniLM's explicit groups and top-5 neighbour
# agreement fell 0.948 -> 0.939 (benchmarks/RESULTS.md of 2026-11-29 06:30 vs 03:38).
# Searched smoothing needs outlier channels: the widest channel's range at least this
# many times the median's. Without them the product-error search still finds α = 0.9
# cutting the sample rows' error 1.2-2.3x and the output loses 0.3-2 dB on other data
# (random-init GPT-2 and LLaMA exports, channel spread 1.3-2.1); MiniLM's groups, with
# spreads of 3.4-17, gain 2-19x.
MIN_OUTLIER_SPREAD = 3.0
# --smooth-explicit auto: the inserted Mul costs one float multiply per input element; a
# consumer writing at least this many output columns does as many MACs per element, so the
# Mul is at most 1/64 of its work. MiniLM's explicit groups (attention output, FFN2:
# 384 and 1536 columns) measured 1.47x -> 1.52x FP32 on the benchmark feed (noise level)
# and cosine 0.9963 -> 0.9979, top-5 neighbour agreement 0.939 -> 0.952.
EXPLICIT_MIN_COLUMNS = 64
SHAPE_ONLY = frozenset({"Shape", "Size"})  # readers that see X's shape, never its values
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SmoothGroup:
    activation: str  # the tensor X
    producer: str | None  # LayerNormalization to fold into; None: explicit Mul
    consumers: tuple[str, ...]  # MatMul/Gemm nodes reading X (input 0) with constant weights
    readers: tuple[str, ...] = ()  # nodes reading X itself: the consumers, or a Reshape


class ChannelObserver(Observer):
    """Per-channel min/max over the last axis, plus a bounded random sample of rows."""

    def __init__(self, name: str = "", max_rows: int = 512, seed: int = 0) -> None:
        super().__init__(name)
        self.cmin: np.ndarray | None = None
        self.cmax: np.ndarray | None = None
        self.rows: np.ndarray | None = None
        self.max_rows = max_rows
        self.seen_rows = 0
        self.rng = np.random.default_rng(seed)

    def observe(self, x: np.ndarray) -> None:
        super().observe(x)
        if self.unbounded or x.size == 0:
            return
        rows = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        self.cmin = lo if self.cmin is None else np.minimum(self.cmin, lo)
        self.cmax = hi if self.cmax is None else np.maximum(self.cmax, hi)
        if self.rows is None:
            self.rows = np.empty((self.max_rows, rows.shape[1]), np.float32)
        # reservoir sampling: a uniform sample of every row seen, in fixed memory
        for row in rows:
            if self.seen_rows < self.max_rows:
                self.rows[self.seen_rows] = row
            else:
                j = int(self.rng.integers(0, self.seen_rows + 1))
                if j < self.max_rows:
                    self.rows[j] = row
            self.seen_rows += 1

    @property
    def absmax(self) -> np.ndarray | None:
        if self.cmin is None or self.cmax is None:
            return None
        return np.maximum(np.abs(self.cmin), np.abs(self.cmax))

    @property
    def center(self) -> np.ndarray:
        """Middle of each channel's range: the shift δ that centres it on zero."""
        assert self.cmin is not None and self.cmax is not None
        return ((self.cmin.astype(np.float64) + self.cmax) / 2.0).astype(np.float32)

    @property
    def sample(self) -> np.ndarray:
        assert self.rows is not None
        return self.rows[: min(self.seen_rows, self.max_rows)]


def _weight_rows(node: ir.Node) -> np.ndarray | None:
    """The consumer's weight as [K_in, N_out] (rows = input channels)."""
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        return w.T if node.attributes.get_int("transB", 0) else w
    return w


def _linear_readers(out: ir.Value) -> tuple[list[ir.Node], list[ir.Node]]:
    """(consumers, readers): MatMul/Gemm nodes reading X as their data input, directly or
    through a Reshape that keeps the last axis (GPT-2's Conv1D flattens tokens before its
    Gemm), and the nodes that read X itself (the consumers, or those Reshapes)."""
    consumers: list[ir.Node] = []
    readers: list[ir.Node] = []

    def linear(use) -> bool:
        return (
            use.node.op_type in ("MatMul", "Gemm")
            and use.idx == 0
            and _weight_rows(use.node) is not None
        )

    channels = out.shape[-1] if out.shape is not None and out.shape.rank() else None
    for use in out.uses():
        if linear(use):
            consumers.append(use.node)
            readers.append(use.node)
        elif use.node.op_type == "Reshape" and use.idx == 0 and isinstance(channels, int):
            flat = use.node.outputs[0]
            after = list(flat.uses())
            last = flat.shape[-1] if flat.shape is not None and flat.shape.rank() else None
            if (
                after
                and last == channels
                and not flat.is_graph_output()
                and all(map(linear, after))
            ):
                consumers += [u.node for u in after]
                readers.append(use.node)
    return consumers, readers


def _other_readers(x: ir.Value, readers: set[str]) -> bool:
    """Whether X is read by anything but `readers` (names) that needs its values: then a
    foldable producer gets a smoothed twin (a gated product is not foldable at all)."""
    return x.is_graph_output() or any(
        u.node.name not in readers and u.node.op_type not in SHAPE_ONLY for u in x.uses()
    )


def find_smooth_groups(model: ir.Model, *, explicit: str = "off") -> list[SmoothGroup]:
    """Linear layers' inputs to smooth: those with a foldable producer, and with
    `explicit` "on" every other one, with "auto" those whose consumers are wide enough
    (EXPLICIT_MIN_COLUMNS) for an inserted Mul not to matter."""
    groups = []
    for node in model.graph:
        for out in node.outputs:
            consumers, readers = _linear_readers(out)
            if not consumers:
                continue
            names = {r.name for r in readers}
            folds = producers.foldable(node, out, _other_readers(out, names))
            columns = sum(_weight_rows(c).shape[1] for c in consumers)
            if (
                folds
                or explicit == "on"
                or (explicit == "auto" and columns >= EXPLICIT_MIN_COLUMNS)
            ):
                groups.append(
                    SmoothGroup(
                        out.name,
                        node.name if folds else None,
                        tuple(c.name for c in consumers),
                        tuple(r.name for r in readers),
                    )
                )
    return groups


def smoothing_scales(absmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    w_max = np.max(np.abs(np.concatenate(weights, axis=1)), axis=1)
    a = np.maximum(absmax.astype(np.float64), 1e-5)
    w = np.maximum(w_max.astype(np.float64), 1e-5)
    s = a**alpha / w ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def quantized_product_error(
    rows: np.ndarray,
    w: np.ndarray,
    ref: np.ndarray,
    s: np.ndarray,
    act_spec: QuantSpec,
    weight_spec: QuantSpec,
) -> float:
    """‖X·W − Q(X/s)·Q(s·W)‖² on sample rows (per-tensor activations, per-column weights).

    `w` holds the consumers' weights side by side and `ref` = X·W, both computed once per
    group rather than once per candidate alpha.
    """
    xs = rows / s
    qx = fake_quantize(xs, range_to_qparams(float(xs.min()), float(xs.max()), act_spec))
    ws = w * s[:, None]
    bound = np.abs(ws).max(axis=0)
    qw = fake_quantize(ws, range_to_qparams(-bound, bound, weight_spec, axis=1))
    return float(np.sum((ref - qx @ qw) ** 2))


class SmoothQuant(ir.passes.InPlacePass):
    """Fold per-channel smoothing scales (and shifts) into LayerNorm or an explicit Mul,
    the scales into the consumers' weights and the shifts into their biases.

    Requires: channel statistics for every group's activation.
    Ensures: FP32 outputs unchanged up to float rounding.
    """

    def __init__(
        self,
        groups: Sequence[SmoothGroup],
        stats: Mapping[str, ChannelObserver],
        act_spec: QuantSpec,
        weight_spec: QuantSpec,
        alpha: float | None = None,
        shift: bool = False,
    ) -> None:
        super().__init__()
        self.groups = list(groups)
        self.stats = stats
        self.act_spec = act_spec
        self.weight_spec = weight_spec
        self.specs = (act_spec, weight_spec)
        self.alpha = alpha
        self.shift = shift
        self.chosen: dict[str, float] = {}  # activation -> alpha used
        self.shifted: set[str] = set()  # activations whose channels were centred

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        modified = False
        for group in self.groups:
            obs = self.stats.get(group.activation)
            if obs is None or obs.absmax is None or obs.unbounded:
                continue
            consumers = [nodes[c] for c in group.consumers]
            weights = [_weight_rows(c) for c in consumers]
            slots = [_bias_slot(c) for c in consumers]
            can_shift = (
                self.shift
                and group.producer is not None
                and nodes[group.producer].op_type == "LayerNormalization"
                and None not in slots
            )
            spread = float(obs.absmax.max() / max(float(np.median(obs.absmax)), 1e-12))
            if self.alpha is None and spread < MIN_OUTLIER_SPREAD and not can_shift:
                self.chosen[group.activation] = 0.0
                continue
            alpha, s, delta = self._choose(obs, weights, can_shift)
            self.chosen[group.activation] = alpha
            if alpha == 0.0 and delta is None:
                continue  # leaving X alone was best
            smoothed = self._smoothed_input(graph, nodes, group, s, delta)
            for consumer, w, slot in zip(consumers, weights, slots, strict=True):
                if delta is not None:
                    _add_to_bias(
                        graph, consumer, slot, (delta.astype(np.float64) @ w).astype(np.float32)
                    )
                self._scale_weight(graph, consumer, s)
            for reader in group.readers or group.consumers:
                nodes[reader].replace_input_with(0, smoothed)
            if delta is not None:
                self.shifted.add(group.activation)
            modified = True
        if modified:
            graph.sort()
        return ir.passes.PassResult(model, modified)

    def _choose(
        self, obs: ChannelObserver, weights: list[np.ndarray], can_shift: bool
    ) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(α, s, δ or None) with the least quantized-product error on the sample rows;
        doing nothing is a candidate too, so the pass never makes a group worse."""
        w = np.concatenate(weights, axis=1).astype(np.float32)
        alphas = ALPHA_GRID if self.alpha is None else (self.alpha,)
        shifts: list[np.ndarray | None] = [None, obs.center] if can_shift else [None]
        best = None
        for delta in shifts:
            rows = obs.sample if delta is None else obs.sample - delta
            width = obs.absmax if delta is None else (obs.cmax - obs.cmin) / 2.0
            ref = rows @ w
            candidates = [(a, smoothing_scales(width, weights, a)) for a in alphas]
            if self.alpha is None:  # leaving X as it is (α = 0 below means that)
                candidates.insert(0, (0.0, np.ones_like(width, dtype=np.float32)))
            for alpha, s in candidates:
                err = quantized_product_error(rows, w, ref, s, *self.specs)
                if best is None or err < best[0]:
                    best = (err, alpha, s, delta)
        return best[1], best[2], best[3]

    def _smoothed_input(
        self,
        graph: ir.Graph,
        nodes: dict[str, ir.Node],
        group: SmoothGroup,
        s: np.ndarray,
        delta: np.ndarray | None,
    ) -> ir.Value:
        x = next(out for n in graph for out in n.outputs if out.name == group.activation)
        inv = (1.0 / s).astype(np.float32)
        if group.producer is None:
            scale = add_initializer(graph, f"{x.name}_smooth_inv_scale", inv)
            mul = ir.node("Mul", [x, scale], name=f"{x.name}_smooth")
            mul.outputs[0].name = f"{x.name}_smoothed"
            mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
            graph.insert_after(x.producer(), mul)
            return mul.outputs[0]
        twin = _other_readers(x, set(group.readers or group.consumers))
        return producers.fold_inverse_scale(graph, nodes[group.producer], x, inv, delta, twin)

    def _scale_weight(self, graph: ir.Graph, node: ir.Node, s: np.ndarray) -> None:
        w = const_array(node.inputs[1]).astype(np.float32)
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            scaled = w * s[None, :]
        else:
            scaled = w * s[:, None]
        node.replace_input_with(
            1, add_initializer(graph, f"{node.inputs[1].name}_smoothed", scaled)
        )


def _bias_slot(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where the consumer's bias lives: (node, input index) of a Gemm's C, or of the
    constant operand of the Add that alone reads a MatMul's output; None if it has none."""
    if node.op_type == "Gemm":
        if node.attributes.get_float("beta", 1.0) == 0.0:
            return None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return (node, 2) if c is None or const_array(c) is not None else None
    return matmul_bias(node, _weight_rows(node).shape[1])


def _add_to_bias(graph: ir.Graph, node: ir.Node, slot: tuple[ir.Node, int], dw: np.ndarray) -> None:
    """bias += δ·W (scaled by α/β for a Gemm: Y = α·A·B + β·C)."""
    owner, idx = slot
    if owner.op_type == "Gemm":
        alpha = owner.attributes.get_float("alpha", 1.0)
        beta = owner.attributes.get_float("beta", 1.0)
        dw = dw * np.float32(alpha / beta)
    old = const_array(owner.inputs[idx]) if idx < len(owner.inputs) else None
    bias = dw if old is None else (old.astype(np.float32) + dw).astype(old.dtype)
    name = owner.inputs[idx].name if old is not None else f"{node.name}_bias"
    if idx >= len(owner.inputs):
        owner.resize_inputs(idx + 1)
    owner.replace_input_with(idx, add_initializer(graph, f"{name}_shifted", bias))
