"""A numpy reference interpreter for quantized ONNX graphs, in exact integer arithmetic.

The integer-only graphs `integer.py` writes must give bit-identical results in ONNX
Runtime and here; tests assert equality, not closeness. The arithmetic kernels
(Quantize/DequantizeLinear, ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul,
Cast, Add/Sub/Mul, BitShift, Clip, ReduceSum) are written out below from the ONNX
specification, so a disagreement points at one of the two implementations rather than at
shared code. Integer convolutions and matrix products accumulate in float64, which is
exact while every partial sum stays below 2**53 (checked). Data-movement ops (Reshape,
Gather, MaxPool...) and any float island are delegated to onnx's own reference
implementation, one node at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx.utils
from onnx import helper, numpy_helper

from qcompile.profile import MS_STANDARD_OPS

Kernel = Callable[[onnx.NodeProto, list], list]
EXACT_LIMIT = 2.0**53


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _opt(inputs: list, i: int):
    return inputs[i] if i < len(inputs) else None


def _rne(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # IEEE round half to even, as ONNX QuantizeLinear specifies


def _per_axis(p: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    if p.ndim == 0 or p.size == 1:
        return p.reshape(())
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return p.reshape(shape)


def quantize_linear(node, inputs):
    x, scale = inputs[0], inputs[1]
    zp = _opt(inputs, 2)
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    axis = _attr(node, "axis", 1)
    zp = np.zeros((), dtype) if zp is None else zp
    s = _per_axis(scale, x, axis).astype(np.float32)
    q = _rne(x.astype(np.float32) / s) + _per_axis(zp, x, axis).astype(np.float32)
    info = np.iinfo(dtype)
    return [np.clip(q, info.min, info.max).astype(dtype)]


def dequantize_linear(node, inputs):
    x, scale = inputs[0], inputs[1]
    zp = _opt(inputs, 2)
    axis = _attr(node, "axis", 1)
    zp = np.zeros((), x.dtype) if zp is None else zp
    centered = x.astype(np.int64) - _per_axis(zp, x, axis).astype(np.int64)
    return [(centered.astype(np.float32) * _per_axis(scale, x, axis).astype(np.float32))]


def _exact_dot(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """a @ b for integer-valued float64 operands, checked to stay exact."""
    bound = float(np.max(np.abs(a), initial=0)) * float(np.max(np.abs(b), initial=0)) * k
    if bound >= EXACT_LIMIT:
        raise ValueError("integer product may exceed float64's exact range")
    return a @ b


def _conv_int(x: np.ndarray, w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """Integer convolution (inputs already centered), NCHW, groups, pads, strides, dilations."""
    spatial = x.ndim - 2
    kernel = list(w.shape[2:])
    strides = list(_attr(node, "strides", [1] * spatial))
    dilations = list(_attr(node, "dilations", [1] * spatial))
    group = int(_attr(node, "group", 1))
    pads = list(_attr(node, "pads", [0] * 2 * spatial))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * spatial
        for i in range(spatial):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            span = (kernel[i] - 1) * dilations[i] + 1
            total = max(0, (out - 1) * strides[i] + span - size)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0] * 2 * spatial
    padded = np.pad(
        x.astype(np.float64),
        [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)],
    )
    n, c = x.shape[:2]
    m = w.shape[0]
    cg, mg = c // group, m // group
    out_sizes = [
        (padded.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1
        for i in range(spatial)
    ]
    # gather windows: (n, c, *out, *kernel)
    windows = padded
    for i in range(spatial):
        idx = (
            np.arange(out_sizes[i])[:, None] * strides[i]
            + np.arange(kernel[i])[None, :] * dilations[i]
        )
        windows = np.take(windows, idx, axis=2 + 2 * i)  # axis → (out_i, k_i)
    # windows axes now: n, c, out0, k0, out1, k1, ... → n, out..., c, k...
    order = [0] + [2 + 2 * i for i in range(spatial)] + [1] + [3 + 2 * i for i in range(spatial)]
    windows = windows.transpose(order)
    k = cg * int(np.prod(kernel))
    out = np.empty((n, *out_sizes, m), np.float64)
    wf = w.astype(np.float64)
    for g in range(group):
        cols = windows[(Ellipsis, slice(g * cg, (g + 1) * cg)) + (slice(None),) * spatial]
        cols = cols.reshape(n, *out_sizes, k)
        wg = wf[g * mg : (g + 1) * mg].reshape(mg, k)
        out[..., g * mg : (g + 1) * mg] = _exact_dot(cols, wg.T, k)
    return np.moveaxis(out, -1, 1)


def conv_integer(node, inputs):
    x, w = inputs[0], inputs[1]
    x_zp, w_zp = _opt(inputs, 2), _opt(inputs, 3)
    xc = x.astype(np.int64) - (0 if x_zp is None else np.int64(x_zp.reshape(())))
    wc = w.astype(np.int64)
    if w_zp is not None:
        wc = wc - (
            w_zp.astype(np.int64).reshape(-1, *([1] * (w.ndim - 1)))
            if w_zp.size > 1
            else np.int64(w_zp.reshape(()))
        )
    return [_conv_int(xc, wc, node).astype(np.int32)]


def _matmul_int(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _exact_dot(a.astype(np.float64), b.astype(np.float64), a.shape[-1])


def matmul_integer(node, inputs):
    a, b = inputs[0], inputs[1]
    a_zp, b_zp = _opt(inputs, 2), _opt(inputs, 3)
    ac = a.astype(np.int64) - (0 if a_zp is None else a_zp.astype(np.int64))
    bc = b.astype(np.int64) - (0 if b_zp is None else b_zp.astype(np.int64))
    return [_matmul_int(ac, bc).astype(np.int32)]


def _requantize_float(acc: np.ndarray, multiplier: np.ndarray, y_zp: np.ndarray) -> np.ndarray:
    """QLinear* output stage: saturate(round_half_even(acc · multiplier) + y_zp)."""
    info = np.iinfo(y_zp.dtype)
    y = _rne(acc * multiplier) + y_zp.astype(np.float64)
    return np.clip(y, info.min, info.max).astype(y_zp.dtype)


def qlinear_conv(node, inputs):
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = inputs[:8]
    bias = _opt(inputs, 8)
    xc = x.astype(np.int64) - np.int64(x_zp.reshape(()))
    wc = w.astype(np.int64) - (
        w_zp.astype(np.int64).reshape(-1, *([1] * (w.ndim - 1)))
        if w_zp.size > 1
        else np.int64(w_zp.reshape(()))
    )
    acc = _conv_int(xc, wc, node)
    if bias is not None:
        acc = acc + bias.astype(np.float64).reshape(1, -1, *([1] * (x.ndim - 2)))
    ch = (1, -1, *([1] * (x.ndim - 2)))
    multiplier = (
        x_s.astype(np.float32).reshape(())
        * w_s.astype(np.float32).reshape(-1)
        / y_s.astype(np.float32)
    ).astype(np.float32)
    multiplier = multiplier.reshape(ch) if multiplier.size > 1 else multiplier.reshape(())
    return [_requantize_float(acc, multiplier.astype(np.float64), y_zp)]


def qlinear_matmul(node, inputs):
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = inputs[:8]
    ac = a.astype(np.int64) - a_zp.astype(np.int64)
    bc = b.astype(np.int64) - b_zp.astype(np.int64)
    acc = _matmul_int(ac, bc)
    multiplier = (a_s.astype(np.float32) * b_s.astype(np.float32) / y_s.astype(np.float32)).astype(
        np.float32
    )
    return [_requantize_float(acc, multiplier.astype(np.float64), y_zp)]


def cast(node, inputs):
    to = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
    x = inputs[0]
    if np.issubdtype(to, np.integer) and np.issubdtype(x.dtype, np.integer):
        # integer → integer casts wrap (two's complement), as in C and ONNX Runtime
        return [x.astype(to)]
    return [x.astype(to)]


def _binary(fn):
    def kernel(node, inputs):
        a, b = inputs
        with np.errstate(over="ignore"):
            return [fn(a, b).astype(np.result_type(a, b))]

    return kernel


def bit_shift(node, inputs):
    x, s = inputs
    direction = _attr(node, "direction")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction == "RIGHT":
        return [np.right_shift(x, s)]
    return [np.left_shift(x, s)]


def clip(node, inputs):
    x = inputs[0]
    lo, hi = _opt(inputs, 1), _opt(inputs, 2)
    out = x
    if lo is not None:
        out = np.maximum(out, lo.astype(x.dtype))
    if hi is not None:
        out = np.minimum(out, hi.astype(x.dtype))
    return [out.astype(x.dtype)]


def reduce_sum(node, inputs):
    x = inputs[0]
    axes = _opt(inputs, 1)
    keepdims = bool(_attr(node, "keepdims", 1))
    axes = None if axes is None or axes.size == 0 else tuple(int(a) for a in axes)
    if np.issubdtype(x.dtype, np.integer):
        return [np.sum(x.astype(np.int64), axis=axes, keepdims=keepdims).astype(x.dtype)]
    return [np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)]


KERNELS: dict[str, Kernel] = {
    "QuantizeLinear": quantize_linear,
    "DequantizeLinear": dequantize_linear,
    "ConvInteger": conv_integer,
    "MatMulInteger": matmul_integer,
    "QLinearConv": qlinear_conv,
    "QLinearMatMul": qlinear_matmul,
    "Cast": cast,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "BitShift": bit_shift,
    "Clip": clip,
    "ReduceSum": reduce_sum,
}


FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class ReferenceInterpreter:
    """Runs a (quantized) ONNX model node by node with the kernels above.

    Ops without a kernel here are delegated one node at a time: integer ones (data
    movement, lookup-table Gathers) to onnx's reference implementation; float islands
    (LayerNorm, Softmax left in float) by default to ONNX Runtime itself, because a float
    op's last-ulp rounding is the one thing two correct implementations may disagree on,
    and the point of this interpreter is to check the integer arithmetic around it.
    `float_islands="onnx"` runs them in onnx's reference too.
    """

    def __init__(self, model: onnx.ModelProto, *, float_islands: str = "onnxruntime") -> None:
        if float_islands not in ("onnxruntime", "onnx"):
            raise ValueError("float_islands must be 'onnxruntime' or 'onnx'")
        self.model = model
        self.graph = model.graph
        self.float_islands = float_islands
        self.constants = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self._delegates: dict[int, Callable] = {}
        # each intermediate is dropped after its last reader: a PP-OCR rec line kept
        # every int64 intermediate alive and grew one run past 15 GB
        outputs = {o.name for o in self.graph.output}
        last: dict[str, int] = {}
        for i, node in enumerate(self.graph.node):
            for name in [*node.input, *node.output]:
                last[name] = i
        self._dead_after: dict[int, list[str]] = {}
        for name, i in last.items():
            if name and name not in outputs and name not in self.constants:
                self._dead_after.setdefault(i, []).append(name)

    def delegated_ops(self) -> set[str]:
        return {n.op_type for n in self.graph.node if n.op_type not in KERNELS}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        env: dict[str, np.ndarray] = dict(self.constants)
        env.update({k: np.asarray(v) for k, v in feeds.items()})
        for i, node in enumerate(self.graph.node):
            inputs = [env[name] if name else None for name in node.input]
            while inputs and inputs[-1] is None:
                inputs.pop()
            if node.op_type == "Constant":
                outputs = [numpy_helper.to_array(_attr(node, "value"))]
            elif node.op_type in KERNELS and node.domain in ("", "ai.onnx"):
                outputs = KERNELS[node.op_type](node, inputs)
            else:
                outputs = self._delegate(i, node, inputs)(inputs)
            for name, value in zip(node.output, outputs, strict=False):
                if name:
                    env[name] = np.asarray(value)
            for name in self._dead_after.get(i, ()):
                env.pop(name, None)
        return [env[o.name] for o in self.graph.output]

    def _delegate(self, index: int, node: onnx.NodeProto, inputs: list) -> Callable:
        if index in self._delegates:
            return self._delegates[index]
        names = [f"i{k}" if name else "" for k, name in enumerate(node.input)]
        outs = [f"o{k}" for k in range(len(node.output))]
        # com.microsoft's Gelu/FastGelu are ONNX's Gelu (opset 20), which onnx's reference knows
        standard = MS_STANDARD_OPS.get((node.domain, node.op_type))
        ms_gelu = standard is not None
        op, extra = standard or (node.op_type, {})
        one = helper.make_node(op, names, outs, domain="" if ms_gelu else node.domain, **extra)
        one.attribute.extend(node.attribute)
        present = [x for x in inputs if x is not None]
        used = [n for n in names if n]
        graph = helper.make_graph(
            [one],
            "node",
            [
                helper.make_tensor_value_info(
                    n, helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape)
                )
                for n, x in zip(used, present, strict=False)
            ],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs],
        )
        opsets = [
            helper.make_opsetid(
                o.domain, max(o.version, 20) if ms_gelu and not o.domain else o.version
            )
            for o in self.model.opset_import
        ]
        model = helper.make_model(graph, opset_imports=opsets)
        is_float = any(x.dtype in FLOAT_DTYPES for x in present)
        if is_float and self.float_islands == "onnxruntime" and not ms_gelu:
            import onnxruntime as ort

            model.graph.ClearField("output")
            model.graph.output.extend([onnx.ValueInfoProto(name=o) for o in outs])
            sess = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )

            def run(args: Sequence) -> list:
                feed = dict(zip(used, [x for x in args if x is not None], strict=False))
                return sess.run(None, feed)
        else:
            from onnx.reference import ReferenceEvaluator

            evaluator = ReferenceEvaluator(model)

            def run(args: Sequence) -> list:
                feed = dict(zip(used, [x for x in args if x is not None], strict=False))
                return evaluator.run(None, feed)

        self._delegates[index] = run
        return run


def codes_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The integer part of an integer-only graph: its outputs are the codes the output
    DequantizeLinears read, without the float ops after them (a classifier's Softmax,
    which the plan leaves float at the graph output). Runtimes agree on these bit for
    bit; after a float op they may differ in the last ulp (`onnx.utils.Extractor` cuts
    the graph)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    codes: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if name in seen or node is None:
            continue
        seen.add(name)
        if node.op_type == "DequantizeLinear":
            if node.input[0] not in codes:
                codes.append(node.input[0])
        else:  # a float op after the integer region: look behind it
            stack.extend(i for i in node.input if i)
    inputs = [i.name for i in model.graph.input]
    return onnx.utils.Extractor(model).extract_model(inputs, sorted(codes))


def run_reference(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, float_islands: str = "onnxruntime"
) -> list[np.ndarray]:
    return ReferenceInterpreter(model, float_islands=float_islands).run(feeds)
