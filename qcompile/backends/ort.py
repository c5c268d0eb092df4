"""ONNX Runtime backend: sessions, calibration runners, benchmarking and fusion checks."""

from __future__ import annotations

import collections
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.errors import QCompileError
from qcompile.ir.io import EXTERNAL_DATA_THRESHOLD, model_nbytes

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
OptLevel = ort.GraphOptimizationLevel


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def session_options(
    threads: int | None = None,
    opt_level: OptLevel = OptLevel.ORT_ENABLE_ALL,
    optimized_model_path: str | None = None,
) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = opt_level
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle worker threads must not spin: with several sessions timed interleaved, one
        # session's spinning threads would steal the cores from the next one's run.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    return opts


def make_session(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    opt_level: OptLevel = OptLevel.ORT_ENABLE_ALL,
    optimized_model_path: str | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for an in-memory or on-disk model; large models go through a file."""
    opts = session_options(threads, opt_level, optimized_model_path)
    usable = [p for p in providers if p in available_providers()] or ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=usable)
    ir_model = model if isinstance(model, ir.Model) else None
    if ir_model is not None and model_nbytes(ir_model) > EXTERNAL_DATA_THRESHOLD:
        with tempfile.TemporaryDirectory(prefix="qcompile-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(ir_model, path, external_data="model.onnx.data")
            return ort.InferenceSession(str(path), opts, providers=usable)
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=usable)


def runner_factory(
    providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None
):
    """A calibration RunnerFactory backed by ORT."""

    def factory(model: ir.Model, outputs: Sequence[str]):
        _fill_missing_output_types(model, outputs)
        try:
            sess = make_session(model, providers=providers, threads=threads)
        except Exception as exc:
            raise QCompileError(
                f"ONNX Runtime cannot load the FP32 model: {exc}",
                hint="an op ORT does not implement, or a malformed graph; check the node named above",
            ) from exc
        names = list(outputs)

        def run(feed: Feed) -> dict[str, np.ndarray]:
            return dict(zip(names, sess.run(names, dict(feed)), strict=True))

        return run

    return factory


def _fill_missing_output_types(model: ir.Model, outputs: Sequence[str]) -> None:
    # ORT needs an element type on every graph output; values whose type inference could
    # not determine are float activations in practice (only float tensors are observed).
    for value in model.graph.outputs:
        if value.name in outputs and value.dtype is None:
            value.dtype = ir.DataType.FLOAT


def run(sess: ort.InferenceSession, feed: Feed) -> list[np.ndarray]:
    return sess.run(None, dict(feed))


def bench(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Feed,
    *,
    runs: int = 20,
    warmup: int = 3,
) -> dict[str, float]:
    """Median latency (ms) per session, with runs interleaved so drift hits all equally."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, dict(feed))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, dict(feed))
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def optimized_model(
    model: ir.Model | onnx.ModelProto,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = 1,
) -> onnx.ModelProto:
    """The graph ORT actually runs after its optimizations (fusions included), weights omitted."""
    with tempfile.TemporaryDirectory(prefix="qcompile-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(model, providers=providers, threads=threads, optimized_model_path=path)
        return onnx.load(path, load_external_data=False)


def optimized_op_counts(model: ir.Model | onnx.ModelProto, **kwargs) -> dict[str, int]:
    """Op types in the graph ORT actually runs (QLinearConv etc. show what it fused)."""
    return dict(collections.Counter(n.op_type for n in optimized_model(model, **kwargs).graph.node))


def float_islands(model: ir.Model | onnx.ModelProto) -> dict[str, int]:
    """Float ops that ORT runs between a DequantizeLinear and a QuantizeLinear.

    Each pays a dequantize and a quantize around float compute; many of them make an INT8
    model slower than FP32 (e.g. HardSwish in MobileNetV3: ORT has no integer kernel).
    """
    graph = optimized_model(model).graph
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = collections.defaultdict(list)
    for n in graph.node:
        for name in n.input:
            consumers[name].append(n)
    counts: collections.Counter[str] = collections.Counter()
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fed = any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)
        feeds = any(c.op_type == "QuantizeLinear" for o in n.output for c in consumers[o])
        if fed and feeds:
            counts[n.op_type] += 1
    return dict(counts)


def equivalence_verifier(feeds: Sequence[Feed], *, rtol: float = 1e-4, atol: float = 1e-5):
    """A pass verifier: outputs before and after a pass must match on `feeds`."""

    def verify(before: ir.Model, after: ir.Model, pass_name: str) -> None:
        onnx.checker.check_model(ir.to_proto(after), full_check=False)
        s0, s1 = make_session(before), make_session(after)
        for feed in feeds:
            for i, (a, b) in enumerate(zip(run(s0, feed), run(s1, feed), strict=True)):
                if not np.allclose(a, b, rtol=rtol, atol=atol):
                    err = float(np.max(np.abs(a.astype(np.float64) - b)))
                    raise QCompileError(
                        f"pass {pass_name} changed FP32 output {i} (max abs diff {err:.3g})",
                        hint="this is a compiler bug; disable the pass and report it",
                    )

    return verify
