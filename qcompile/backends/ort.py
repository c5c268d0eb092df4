"""ONNX Runtime backend: sessions, calibration runners, benchmarking and fusion checks."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.clocks import bound
from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
OptLevel = ort.GraphOptimizationLevel


@dataclasses.dataclass
class OrtClock:
    """Wall time spent inside ONNX Runtime: building sessions and running the model.

    Compile reports split their time with it, so "is compile time model execution or our
    own Python?" is a measured number rather than a guess.
    """

    session_seconds: float = 0.0
    run_seconds: float = 0.0
    sessions: int = 0
    runs: int = 0


_CLOCK: contextvars.ContextVar[OrtClock | None] = contextvars.ContextVar("ort_clock", default=None)


def clocked() -> contextlib.AbstractContextManager[OrtClock]:
    """Account every session built and run in this context (threads started inside included)."""
    return bound(_CLOCK, OrtClock())


class TimedSession(ort.InferenceSession):
    """An InferenceSession whose run() time is added to the active OrtClock."""

    clock: OrtClock | None = None

    def run(self, output_names, input_feed, run_options=None):
        t0 = time.perf_counter()
        try:
            return super().run(output_names, input_feed, run_options)
        finally:
            if self.clock is not None:
                self.clock.run_seconds += time.perf_counter() - t0
                self.clock.runs += 1


def _new_session(model: str | bytes, opts: ort.SessionOptions, usable: list[str]) -> TimedSession:
    clock = _CLOCK.get()
    t0 = time.perf_counter()
    sess = TimedSession(model, opts, providers=usable)
    sess.clock = clock
    if clock is not None:
        clock.session_seconds += time.perf_counter() - t0
        clock.sessions += 1
    return sess


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def session_options(
    threads: int | None = None,
    opt_level: OptLevel = OptLevel.ORT_ENABLE_ALL,
    optimized_model_path: str | None = None,
    qdq_fusions: bool = True,
    spinning: bool = True,
) -> ort.SessionOptions:
    """qdq_fusions=False runs a graph exactly as written: ORT's QDQ fusions rewrite
    DequantizeLinear → float op → QuantizeLinear islands into its own integer kernels,
    which round differently from the float ops an integer-only graph spells out.
    spinning=False stops idle worker threads from spinning after a run (always so when
    `threads` is given)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = opt_level
    opts.log_severity_level = 3
    if not qdq_fusions:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if threads or not spinning:
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
    qdq_fusions: bool = True,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession for an in-memory or on-disk model.

    In-memory models hand their weights to ORT as OrtValues over the arrays we already hold
    (`add_external_initializers`), so building a session neither copies the weights into a
    protobuf nor hits protobuf's 2 GB limit.
    """
    opts = session_options(threads, opt_level, optimized_model_path, qdq_fusions, spinning)
    usable = [p for p in providers if p in available_providers()] or ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return _new_session(str(model), opts, usable)
    if isinstance(model, onnx.ModelProto):
        return _new_session(model.SerializeToString(), opts, usable)
    with _weights_by_reference(model, opts) as keep_alive:
        sess = _new_session(ir.to_proto(model).SerializeToString(), opts, usable)
    sess.keep_alive = keep_alive  # ORT reads the weights from these arrays
    return sess


# numpy dtypes that an OrtValue can wrap without conversion.
_WRAPPABLE = frozenset(
    np.dtype(t)
    for t in (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16)
    + (np.int32, np.uint32, np.int64, np.uint64, np.bool_)
)
_BY_REFERENCE_MIN_BYTES = 1024


@contextlib.contextmanager
def _weights_by_reference(model: ir.Model, opts: ort.SessionOptions):
    """Swap large main-graph initializers for external-data placeholders while serializing,
    and register their arrays with the session options."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    names, values, arrays = [], [], []
    graph_inputs = set(model.graph.inputs)
    try:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < _BY_REFERENCE_MIN_BYTES:
                continue
            if value in graph_inputs or not value.uses():
                continue  # ORT drops unused initializers before it could replace them
            if isinstance(tensor, ir.ExternalTensor) and not tensor.valid():
                continue  # let ORT report the missing file as usual
            array = tensor.numpy()
            if array.dtype not in _WRAPPABLE or array.shape != tuple(tensor.shape.numpy()):
                continue  # packed types (int4, float8, bfloat16): serialize them as usual
            array = np.ascontiguousarray(array)
            placeholder = ir.ExternalTensor(
                "qcompile-in-memory",
                offset=0,
                length=array.nbytes,
                dtype=tensor.dtype,
                shape=tensor.shape,
                name=name,
            )
            swapped.append((value, tensor))
            value.const_value = placeholder
            names.append(name)
            arrays.append(array)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
        if names:
            opts.add_external_initializers(names, values)
        yield (arrays, values)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def runner_factory(
    providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None
):
    """A calibration RunnerFactory backed by ORT."""

    def factory(model: ir.Model, outputs: Sequence[str]):
        _fill_missing_output_types(model, outputs)
        try:
            # the observers use the cores between runs: spinning workers would slow them
            sess = make_session(model, providers=providers, threads=threads, spinning=False)
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
    """Median latency (ms) per session, with runs interleaved so drift hits all equally;
    the order alternates (A B, B A, ...) so no session always runs right after another
    (a fixed order gave identical models a steady 3-4% difference on sub-ms graphs)."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, dict(feed))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions.items())
    for i in range(runs):
        for name, sess in order if i % 2 == 0 else order[::-1]:
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
    return session_and_optimized_graph(model, providers=providers, threads=threads)[1]


def session_and_optimized_graph(
    model: ir.Model | onnx.ModelProto,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
) -> tuple[TimedSession, onnx.ModelProto]:
    """One session, plus the graph it runs: measuring and fusion checks share one build."""
    with tempfile.TemporaryDirectory(prefix="qcompile-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        sess = make_session(model, providers=providers, threads=threads, optimized_model_path=path)
        return sess, onnx.load(path, load_external_data=False)


def optimized_op_counts(model: ir.Model | onnx.ModelProto, **kwargs) -> dict[str, int]:
    """Op types in the graph ORT actually runs (QLinearConv etc. show what it fused)."""
    return op_counts(optimized_model(model, **kwargs))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def float_islands(model: ir.Model | onnx.ModelProto) -> dict[str, int]:
    """Float ops that ORT runs between a DequantizeLinear and a QuantizeLinear.

    Each pays a dequantize and a quantize around float compute; many of them make an INT8
    model slower than FP32 (e.g. HardSwish in MobileNetV3: ORT has no integer kernel).
    """
    return float_islands_in(optimized_model(model))


def float_islands_in(optimized: onnx.ModelProto) -> dict[str, int]:
    """float_islands() of a graph ORT already optimized."""
    graph = optimized.graph
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


@functools.cache
def u8s8_pairs_saturate() -> bool:
    """Does this machine's ORT CPU kernel for uint8 activations × int8 weights saturate?

    x86 without VNNI (AVX2 only) multiplies u8×s8 with `vpmaddubsw`, which adds adjacent
    products into an int16 with saturation: 2·255·127 = 64770 does not fit, so full-range
    int8 weights silently lose accuracy there (ORT's `reduce_range` exists for this). VNNI
    and Arm dot-product kernels accumulate in int32. Probed, not guessed from CPU flags:
    a MatMulInteger of all-255 activations by all-127 weights either is exact or not."""
    k = 64
    a = np.full((1, k), 255, np.uint8)
    b = np.full((k, 8), 127, np.int8)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [1, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 8])],
        [onnx.numpy_helper.from_array(b, "b")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = int(sess.run(None, {"a": a})[0][0, 0])
    return got != 255 * 127 * k
