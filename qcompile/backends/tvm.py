"""TVM backend (apache-tvm, Relax): pre-lowering, import, build for llvm/cuda, tuning,
running, export.

- `prepare`: our own pre-lowering passes: every dynamic input dim pinned (the Relax ONNX
  frontend cannot emit ops on unknown shapes: "emit_te only supports Tensor that has
  ShapeExpr shape"), constants folded, com.microsoft Gelu written as ONNX Gelu, and QDQ
  graphs lowered to integer-only ops (our LowerToIntegerOnly): the frontend imports a
  DequantizeLinear → Conv → QuantizeLinear chain as a float conv between a dequantize and
  a quantize, so without this a QDQ model would compute in float.
- `import_relax`: the Relax ONNX frontend, plus a ConvInteger converter it lacks (int32
  convolution of zero-point-centred integers, the ONNX definition), so integer-only
  graphs lower to integer compute.
- `build`: targets are dicts (`host_target()` detects the CPU, e.g. znver4 with
  AVX-512 VNNI; `cuda_target()`); GPU builds get dlight's default schedules; CPU builds
  can be tuned with MetaSchedule (`tune_trials`, a persistent database in `work_dir`, so
  a second build with the same work_dir reuses the records).
- `TVMRunner`: feeds in, numpy out, median latency; `export` writes model.so plus a
  runner script.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


def available() -> bool:
    try:
        import tvm  # noqa: F401
        from tvm.relax.frontend.onnx import from_onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    if not available():
        raise QCompileError(
            "the TVM backend needs apache-tvm", hint="pip install -e '.[tvm]' (apache-tvm)"
        )


def host_target(threads: int | None = None) -> dict:
    """The llvm target of this machine's CPU (its LLVM name enables e.g. AVX-512 VNNI)."""
    import tvm

    target = {
        "kind": "llvm",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        "mtriple": tvm.target.codegen.llvm_get_system_triple(),
    }
    # MetaSchedule needs the core count; it is also the thread count TVM plans for
    target["num-cores"] = threads or os.cpu_count() or 1
    return target


def cuda_target(arch: str = "sm_90") -> dict:
    """A CUDA target (sm_90: the H200 of the device machine); builds without a GPU."""
    return {"kind": "cuda", "arch": arch}


def cuda_available() -> bool:
    import tvm

    return bool(tvm.runtime.enabled("cuda")) and tvm.cuda(0).exist


# -- pre-lowering -------------------------------------------------------------------------


def prepare(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    integer_compute: bool = True,
) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """Pin shapes, fold constants, use standard ops, QDQ → integer ops (unless
    integer_compute=False); returns the proto and the shapes."""
    from qcompile.ir.io import load_model
    from qcompile.ir.shapes import infer_shapes, pin_input_shapes
    from qcompile.lower.ort_cpu import expand_matmul_integer_to_float
    from qcompile.passes.canonicalize import canonicalize
    from qcompile.passes.manager import run_phase

    model = load_model(model)  # a copy: the caller's graph or file is never touched
    expand_matmul_integer_to_float(model)  # ORT's CPU kernel back to standard Q/DQ
    if integer_compute:
        lower_qdq(model)
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    for value in model.graph.inputs:
        if value.name in shapes:
            continue
        dims = list(value.shape) if value.shape is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise QCompileError(
                "TVM needs static input shapes",
                tensor=value.name,
                hint=f"pin it, e.g. --input-shape {value.name}=1,3,224,224",
            )
        shapes[value.name] = [int(d) for d in dims]
    pin_input_shapes(model, {k: tuple(v) for k, v in shapes.items()})
    for node in model.graph:
        if (node.domain, node.op_type) == ("com.microsoft", "Gelu"):
            node.domain = ""  # the same function as ONNX Gelu (opset 20)
    if any(n.op_type == "Gelu" and n.domain == "" for n in model.graph):
        model.opset_imports[""] = max(model.opset_imports.get("", 17), 20)
    # with static shapes, Shape → Gather → Concat chains fold away and Constant nodes
    # (the frontend rejects value_ints) become initializers
    infer_shapes(model)
    model, _ = run_phase(model, "tvm-prepare", canonicalize())
    _fold_constant_of_shape(model)
    infer_shapes(model)
    return ir.to_proto(model), shapes


def lower_qdq(model: ir.Model) -> int:
    """Lower a QDQ graph's DQ → op → Q chains to integer ops in place; returns how many
    ops became integer (0 for FP32 or already integer-only graphs). Ops with no integer
    form stay float between their quantizers, as in `--integer-only`."""
    from qcompile.lower.integer_only import LowerToIntegerOnly

    if not any(n.op_type == "DequantizeLinear" for n in model.graph):
        return 0
    model.graph.sort()
    lowering = LowerToIntegerOnly()
    lowering(model)
    count = sum(lowering.lowered.values())
    if count:
        logger.info("TVM: %d QDQ ops lowered to integer ops (%s)", count, dict(lowering.lowered))
    return count


def _fold_constant_of_shape(model: ir.Model) -> None:
    """ConstantOfShape of a constant shape → an initializer (the frontend's converter
    fails on scalar results, e.g. BERT's attention-mask fill value)."""
    from qcompile.ir.graph import add_initializer

    graph = model.graph
    for node in list(graph):
        if node.op_type != "ConstantOfShape" or node.inputs[0].const_value is None:
            continue
        shape = [int(d) for d in node.inputs[0].const_value.numpy().reshape(-1)]
        attr = node.attributes.get("value")
        fill = attr.value.numpy().reshape(()) if attr is not None else np.float32(0)
        array = np.full(shape, fill, dtype=fill.dtype)
        value = add_initializer(graph, f"{node.outputs[0].name}_folded", array)
        node.outputs[0].replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)


def _register_conv_integer() -> None:
    """Teach the Relax ONNX frontend ConvInteger: int32 conv of centred integers."""
    import tvm.relax.frontend.onnx.onnx_frontend as frontend
    from tvm import relax

    if getattr(frontend, "_qcompile_conv_integer", False):
        return

    class ConvInteger(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            x = relax.op.astype(inputs[0], "int32")
            w = relax.op.astype(inputs[1], "int32")
            if len(inputs) > 2 and inputs[2] is not None:
                x = relax.op.subtract(x, relax.op.astype(inputs[2], "int32"))
            if len(inputs) > 3 and inputs[3] is not None:
                w_zp = bb.normalize(relax.op.astype(inputs[3], "int32"))
                if len(w_zp.struct_info.shape) == 1:  # per output channel
                    w_zp = relax.op.reshape(w_zp, [-1, 1, 1, 1])
                w = relax.op.subtract(w, w_zp)
            if attr.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise tvm_error("ConvInteger with auto_pad")
            return relax.op.nn.conv2d(
                x,
                w,
                strides=attr.get("strides", 1),
                padding=attr.get("pads", 0),
                dilation=attr.get("dilations", 1),
                groups=attr.get("group", 1),
                out_dtype="int32",
            )

    original = frontend._get_convert_map

    def convert_map():
        table = original()
        table["ConvInteger"] = ConvInteger
        return table

    frontend._get_convert_map = convert_map
    frontend._qcompile_conv_integer = True


def tvm_error(what: str) -> Exception:
    return QCompileError(f"the TVM backend does not lower {what}")


def import_relax(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]):
    """The Relax IRModule of a prepared model (weights as constants)."""
    _require()
    from tvm.relax.frontend.onnx import from_onnx

    _register_conv_integer()
    dtypes = {
        v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        for v in proto.graph.input
    }
    try:
        return from_onnx(proto, shape_dict=dict(shapes), dtype_dict=dtypes)
    except Exception as exc:  # the frontend's messages name the op; ours add the way out
        raise QCompileError(
            f"TVM's ONNX frontend cannot import this model: {str(exc).splitlines()[0][:300]}",
            hint="keep the op FP32 with --exclude or run it with ONNX Runtime",
        ) from exc


# -- build ---------------------------------------------------------------------------------


def build(
    mod,
    target: Mapping | str,
    *,
    tune_trials: int = 0,
    work_dir: str | os.PathLike | None = None,
):
    """A Relax VM executable for `target`; MetaSchedule-tuned when tune_trials > 0."""
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(dict(target) if isinstance(target, Mapping) else target)
    if tvm_target.kind.name == "cuda":
        from tvm.s_tir import dlight as dl

        with tvm_target:
            mod = tvm.ir.transform.Sequential(
                [
                    relax.transform.LegalizeOps(),
                    dl.ApplyDefaultSchedule(
                        dl.gpu.Matmul(),
                        dl.gpu.GEMV(),
                        dl.gpu.Reduction(),
                        dl.gpu.GeneralReduction(),
                        dl.gpu.Fallback(),
                    ),
                ]
            )(mod)
        return tvm.compile(mod, target=tvm_target)
    if tune_trials > 0:
        work_dir = str(work_dir or Path.home() / ".cache" / "qcompile" / "tvm-tuning")
        os.makedirs(work_dir, exist_ok=True)
        mod = _tune(relax.transform.LegalizeOps()(mod), tvm_target, work_dir, tune_trials)
    else:
        # dlight's CPU reduction rule (parallel + vectorized). Its GEMV rule is left out:
        # on PP-OCR det's squeeze-excite 1×1 convolutions (96 → 384 channels on a 1×1 map)
        # it made LLVM's code generation run for over 25 minutes instead of 3 s. dlight has
        # no CPU rule for convolutions or matrix products; those stay plain loops until tuned.
        from tvm.s_tir import dlight as dl

        with tvm_target:
            mod = tvm.ir.transform.Sequential(
                [relax.transform.LegalizeOps(), dl.ApplyDefaultSchedule(dl.cpu.Reduction())]
            )(mod)
    return tvm.compile(mod, target=tvm_target)


TUNED_OPS = ("conv2d", "matmul", "dense")  # substrings of MetaSchedule task names
TRIALS_PER_TASK = 16


def _tune(mod, target, work_dir: str, trials: int):
    """MetaSchedule over the heaviest convolution/matrix-product tasks, records in
    work_dir's database, applied.

    The budget goes to the tasks with the most FLOPs (× occurrences), TRIALS_PER_TASK
    each: MetaSchedule's own scheduler hands its first round to tasks in extraction
    order, num_trials_per_iter at a time, so a few dozen trials would reach one task,
    not necessarily a heavy one."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:  # XGBoost is optional: without it, candidates are drawn at random
        cost_model = "random"
    tasks = [
        t
        for t in ms.relax_integration.extract_tasks(mod, target, params={})
        if any(op in t.task_name for op in TUNED_OPS)
    ]
    tasks.sort(key=lambda t: -estimate_tir_flops(t.dispatched[0]) * t.weight)
    chosen = tasks[: max(1, trials // TRIALS_PER_TASK)]
    logger.info("TVM tuning %d of %d compute tasks", len(chosen), len(tasks))
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=chosen, work_dir=work_dir, seed=0
    )
    database = ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=work_dir,
        max_trials_global=trials,
        max_trials_per_task=TRIALS_PER_TASK,
        num_trials_per_iter=TRIALS_PER_TASK,
        cost_model=cost_model,
    )
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase(work_dir)(mod)


# -- run and export -----------------------------------------------------------------------


class TVMRunner:
    """Run an executable on a device with numpy feeds (inputs in graph order)."""

    def __init__(self, executable, input_names: Sequence[str], device: str = "cpu") -> None:
        import tvm
        from tvm import relax

        self.device = tvm.cpu() if device == "cpu" else tvm.cuda(0)
        self.vm = relax.VirtualMachine(executable, self.device)
        self.input_names = list(input_names)

    def run(self, feed: Feed) -> list[np.ndarray]:
        import tvm

        args = [
            tvm.runtime.tensor(np.ascontiguousarray(feed[n]), self.device) for n in self.input_names
        ]
        out = self.vm["main"](*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return [o.numpy() for o in outs]

    def bench(self, feed: Feed, runs: int = 20, warmup: int = 3) -> float:
        """Median latency in ms."""
        for _ in range(warmup):
            self.run(feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.run(feed)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


RUNNER = '''"""Run the TVM-compiled model: python run.py feed.npz (one array per input)."""
import sys

import numpy as np
import tvm
from tvm import relax

INPUTS = {inputs!r}
lib = tvm.runtime.load_module(__file__.rsplit("/", 1)[0] + "/model.so")
vm = relax.VirtualMachine(lib, tvm.cpu())
feed = np.load(sys.argv[1])
out = vm["main"](*[tvm.runtime.tensor(feed[name]) for name in INPUTS])
outs = out if not hasattr(out, "numpy") else [out]
for i, o in enumerate(outs):
    print(f"output {{i}}: shape {{o.numpy().shape}}")
'''


def export(executable, out_dir: str | os.PathLike, input_names: Sequence[str]) -> Path:
    """model.so (compiled library with the weights) and run.py beside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(out / "model.so"))
    (out / "run.py").write_text(RUNNER.format(inputs=list(input_names)))
    return out


def compile_model(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    *,
    target: Mapping | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tune_trials: int = 0,
    work_dir: str | os.PathLike | None = None,
    integer_compute: bool = True,
):
    """prepare → import → build; returns (executable, input names, Relax module)."""
    proto, shapes = prepare(model, input_shapes, integer_compute=integer_compute)
    mod = import_relax(proto, shapes)
    executable = build(mod, target or host_target(), tune_trials=tune_trials, work_dir=work_dir)
    return executable, [v.name for v in proto.graph.input], mod
