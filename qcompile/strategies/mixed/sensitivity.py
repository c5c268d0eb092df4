"""Per-layer sensitivity: one FP32 session with a switch per (layer, candidate)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.calibrate.observers import weight_qparams
from qcompile.driver.fanout import Fanout, SerialFanout, chunks, task_threads
from qcompile.driver.measure import branch_slice, concat_groups
from qcompile.ir.graph import add_initializer
from qcompile.numerics.qparams import QParams, fake_quantize
from qcompile.quantize.qdq import effective_qparams
from qcompile.quantize.quant_plan import QuantPlan
from qcompile.quantize.weight_only import Int4Spec, dequantize_int4, quantize_int4

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


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
        w_value = node.inputs[w_index] if w_index is not None else None
        w = w_value.const_value.numpy().astype(np.float32) if w_value is not None else None
        versions: list[tuple[str, list[ir.Node], list[ir.Value | None]]] = []
        for label, spec in candidates:
            flag = ir.Value(name=f"mp_flag_{index}_{label}", shape=ir.Shape([]))
            flag.dtype = ir.DataType.BOOL
            graph.inputs.append(flag)
            flags[(name, label)] = flag.name
            weight_only = isinstance(spec, Int4Spec)  # FP32 activations: only W changes
            inputs, body = list(node.inputs), []
            if spec is not None and w is not None:
                if weight_only:
                    w_q = dequantize_int4(quantize_int4(w, spec))
                else:
                    w_q = fake_quantize(w, weight_qparams(w, spec, use.axis)).astype(np.float32)
                if trace:  # same power, random direction
                    sigma = float(np.sqrt(np.mean(np.square(w_q - w))))
                    w_q = (w + sigma * rng.standard_normal(w.shape)).astype(np.float32)
                inputs[w_index] = add_initializer(graph, f"mp_w_{index}_{label}", w_q)
            for i, qp in activations.items() if not weight_only else ():
                made, inputs[i] = make(graph, node.inputs[i], qp, f"mp{index}_{i}_{label}")
                body.extend(made)
            versions.append((flag.name, body, inputs))
        _switch_node(graph, node, versions, index)
    return model, flags


def _switch_node(
    graph: ir.Graph,
    node: ir.Node,
    versions: Sequence[tuple[str, list[ir.Node], list[ir.Value | None]]],
    index: int,
) -> None:
    """Replace `node` by If(flag₁, version₁, If(flag₂, version₂, ... node)), each
    version the node on switched inputs. Whole nodes switch, so every path keeps constant
    weights: ONNX Runtime prepacks them and keeps its blocked-layout convolutions, where
    switching the weight tensor itself (a Where) left every Conv of the FP32 path on a
    runtime weight, several times slower than the FP32 model. Only the taken branch runs."""
    if not versions:
        return
    flags = {v.name: v for v in graph.inputs}
    branch = _branch([], list(node.inputs), node, f"mp{index}_fp32")
    for depth, (flag_name, body, inputs) in enumerate(reversed(versions)):
        tag = f"mp{index}_v{len(versions) - depth}"
        switch = ir.Node(
            "",
            "If",
            [flags[flag_name]],
            attributes=[
                ir.AttrGraph("then_branch", _branch(body, inputs, node, tag)),
                ir.AttrGraph("else_branch", branch),
            ],
            num_outputs=len(node.outputs),
            name=f"{tag}_if",
        )
        _outputs_like(switch, node, f"{tag}_sw")
        if depth < len(versions) - 1:
            branch = ir.Graph([], list(switch.outputs), nodes=[switch], name=f"{tag}_else")
    graph.insert_before(node, switch)
    for old, new in zip(node.outputs, switch.outputs, strict=True):
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name, new.name = f"{old.name}_switched", old.name  # graph outputs keep names
    graph.remove(node, safe=True)


def _branch(body: list[ir.Node], inputs: list[ir.Value | None], node: ir.Node, tag: str):
    """A subgraph computing `node` on `inputs` (outer-scope values), after `body`."""
    twin = ir.Node(
        node.domain,
        node.op_type,
        inputs,
        attributes=[_copy_attr(a) for a in node.attributes.values()],
        num_outputs=len(node.outputs),
        name=f"{tag}_{node.name}",
        version=node.version,
    )
    _outputs_like(twin, node, tag)
    return ir.Graph([], list(twin.outputs), nodes=[*body, twin], name=f"{tag}_branch")


def _outputs_like(new: ir.Node, node: ir.Node, tag: str) -> None:
    for mine, theirs in zip(new.outputs, node.outputs, strict=True):
        mine.name, mine.dtype, mine.shape = f"{tag}_{theirs.name}", theirs.dtype, theirs.shape


def _copy_attr(attr: ir.Attr) -> ir.Attr:
    return ir.Attr(attr.name, attr.type, attr.value, doc_string=attr.doc_string)


Branch = tuple[list[ir.Node], ir.Value]  # nodes computing a value from x, and that value


def _fake_quant_nodes(graph: ir.Graph, x: ir.Value, qp: QParams, base: str) -> Branch:
    scale = add_initializer(graph, f"{base}_scale", np.asarray(qp.scale, np.float32))
    zp = add_initializer(graph, f"{base}_zp", np.asarray(qp.zero_point))
    q = ir.node("QuantizeLinear", [x, scale, zp], name=f"{base}_q")
    q.outputs[0].name = f"{base}_q_out"
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{base}_dq")
    dq.outputs[0].name = f"{base}_dq_out"
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, x.shape
    return [q, dq], dq.outputs[0]


def _noise_nodes(graph: ir.Graph, x: ir.Value, qp: QParams, base: str) -> Branch:
    """x + N(0, s²/12): rounding noise's power at the quantizer's scale (clipping aside)."""
    sigma = float(np.sqrt(np.mean(np.square(qp.scale)) / 12.0))
    noise = ir.node("RandomNormalLike", [x], {"scale": sigma, "seed": 1.0}, name=f"{base}_n")
    noise.outputs[0].name = f"{base}_noise"
    noisy = ir.node("Add", [x, noise.outputs[0]], name=f"{base}_add")
    noisy.outputs[0].name = f"{base}_noisy"
    noisy.outputs[0].dtype, noisy.outputs[0].shape = ir.DataType.FLOAT, x.shape
    return [noise, noisy], noisy.outputs[0]


def sensitivities(
    model: ir.Model,
    flags: Mapping[tuple[str, str], str],
    feeds: Sequence[Feed],
    threads: int | None = None,
    deadline: float = math.inf,
    skip: Collection[tuple[str, str]] = frozenset(),
    fanout: Fanout | None = None,
) -> dict[tuple[str, str], float]:
    """Output noise/signal power per (layer, candidate), one run per flag and feed: the
    mean over the outputs (and the branches of concatenated ones), each part against its
    own signal. The candidates in `skip` are not measured (and not in the result).

    Past `deadline` (a `time.perf_counter()` value) the candidates not yet measured get
    UNMEASURED_NSR, as loud as the signal itself: the search then keeps those layers at
    their most precise choice instead of guessing.

    With a `fanout` of several workers the candidates are measured in contiguous chunks,
    one task each (every task runs the reference once more); the result is the serial
    run's (same runs, same order within a chunk, merged in the serial order)."""
    fanout = fanout or SerialFanout()
    todo = [(key, flag) for key, flag in flags.items() if key not in skip]
    names = list(flags.values())
    threads = task_threads(fanout, threads)
    parts = chunks(todo, fanout.workers(threads or 1)) if todo else [[]]
    if len(parts) == 1:  # no copy of the model: measure here
        return _measure(model, feeds, names, threads, deadline - time.perf_counter(), parts[0])
    model_bytes = ir.serde.serialize_model(model).SerializeToString()
    seconds_left = deadline - time.perf_counter()
    results = fanout.map(
        _measure, (model_bytes, feeds, names, threads, seconds_left), [(p,) for p in parts]
    )
    return {key: value for result in results for key, value in result.items()}


def _measure(
    model: ir.Model | bytes,
    feeds: Sequence[Feed],
    flag_names: Sequence[str],
    threads: int | None,
    seconds_left: float,
    todo: Sequence[tuple[tuple[str, str], str]],
) -> dict[tuple[str, str], float]:
    """`sensitivities` for the (key, flag) pairs in `todo`, in this process."""
    deadline = time.perf_counter() + seconds_left
    if isinstance(model, bytes):
        model = ir.from_proto(onnx.load_from_string(model))
    sess = ort_backend.make_session(model, threads=threads)
    off = {name: np.array(False) for name in flag_names}
    reference = [sess.run(None, {**feed, **off}) for feed in feeds]
    parts = _output_parts(model)
    # each part of the reference outputs, in float64, once: every flag's run is compared
    reference = [[np.asarray(ref[i], np.float64)[part] for i, part in parts] for ref in reference]
    signal = _powers(parts, reference)
    result = {}
    for key, flag in todo:
        if time.perf_counter() > deadline:
            result[key] = UNMEASURED_NSR
            continue
        outs = [sess.run(None, {**feed, **off, flag: np.array(True)}) for feed in feeds]
        noise = _powers(parts, reference, outs)
        ratios = [n / s for n, s in zip(noise, signal, strict=True) if s > 0]
        result[key] = float(np.mean(ratios)) if ratios else 0.0
    return result


def _output_parts(model: ir.Model) -> list[tuple[int, tuple[slice, ...]]]:
    """What noise is measured on, each part weighted alike: every output, and the
    branches of an output a Concat assembled. Pooled over all outputs, the loudest (a
    detector's box coordinates or DFL logits) set every layer's sensitivity, and the
    search kept float what moved boxes while class scores lost their precision."""
    groups = concat_groups(model)
    parts: list[tuple[int, tuple[slice, ...]]] = []
    for i, out in enumerate(model.graph.outputs):
        for _, axis, start, stop in groups.get(out.name, []):
            parts.append((i, branch_slice(axis, start, stop)))
        if out.name not in groups:
            parts.append((i, ()))
    return parts


def _powers(parts, reference, outputs=None) -> list[float]:
    """Σ over feeds of each part's power: of the reference parts, or of reference − output."""
    total = [0.0] * len(parts)
    for f, ref in enumerate(reference):
        for k, (i, part) in enumerate(parts):
            x = ref[k] if outputs is None else ref[k] - np.asarray(outputs[f][i])[part]
            total[k] += float(np.sum(np.square(x)))
    return total


# noise/signal given to a candidate the time budget left unmeasured
UNMEASURED_NSR = 1.0
