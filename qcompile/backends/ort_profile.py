"""Per-node kernel times from ONNX Runtime's profiler (its JSON trace format stays here)."""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile.backends import ort as ort_backend

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


# -- cost measured with ONNX Runtime's profiler ---------------------------------------------

# ORT's suffixes: fusion tokens, blocked-layout convolutions, DequantizeLinear copies
_SUFFIX = re.compile(r"((_token_\d+)|(_nchwc)|(/duplicated))+$")
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
    from qcompile.calibrate.runner import extra_outputs

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
