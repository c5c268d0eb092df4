"""Operator-format and dynamically quantized models back to FP32 (`--already-quantized
requantize`).

ONNX Runtime's quantization tool writes three formats; users often have only that file.
QDQ models are handled by `DequantizeQDQ`. This module brings the other two to QDQ or
float form first:

- `OperatorsToQDQ`: QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat, QLinearAdd/Mul, the QLinear pools,
  QLinearSigmoid/LeakyRelu/Softmax and QLinearConcat become DequantizeLinear → float op →
  QuantizeLinear, with their constant integer weights and int32 biases dequantized to
  float (the values the integer kernel multiplied with); `DequantizeQDQ` then removes the
  activation pairs as for any QDQ model.
- `DynamicToFloat`: quantize_dynamic's chains, DynamicQuantizeLinear → ConvInteger /
  MatMulInteger → Cast → Mul(x_scale · w_scale), become Conv / MatMul on the float input
  with dequantized weights, and DynamicQuantizeLSTM becomes LSTM with its weights
  dequantized and laid out as LSTM wants them ([dirs, 4·hidden, input]).

Both are exact up to float rounding for the weights: what is lost is the input model's
own activation rounding, which the recompile replaces with its own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.errors import QCompileError
from qcompile.ir.graph import add_initializer

MS = "com.microsoft"


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _dequantized(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """(q − zp)·scale, with per-channel parameters along `axis`."""
    q = q.astype(np.float32)
    s = np.asarray(scale, np.float32)
    z = np.zeros_like(s) if zp is None else np.asarray(zp, np.float32)
    if s.ndim == 1 and s.size > 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q - z) * s).astype(np.float32)


class _Rewriter:
    def __init__(self, graph: ir.Graph, anchor: ir.Node) -> None:
        self.graph, self.anchor, self.base = graph, anchor, anchor.name or anchor.op_type

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, f"{self.base}_{suffix}", np.asarray(array))

    def node(self, op: str, inputs, suffix: str, domain: str = "", **attrs) -> ir.Value:
        n = ir.node(op, inputs, attributes=attrs, domain=domain, name=f"{self.base}_{suffix}")
        n.outputs[0].name = f"{self.base}_{suffix}_out"
        self.graph.insert_before(self.anchor, n)
        return n.outputs[0]

    def dq(self, x: ir.Value, scale: ir.Value, zp: ir.Value | None, suffix: str) -> ir.Value:
        inputs = [x, scale] + ([zp] if zp is not None else [])
        y = self.node("DequantizeLinear", inputs, suffix)
        y.dtype, y.shape = ir.DataType.FLOAT, x.shape
        return y

    def finish(self, y: ir.Value, scale: ir.Value | None, zp: ir.Value | None) -> None:
        """`y` (float) quantized with (scale, zp) replaces the anchor's output."""
        out = self.anchor.outputs[0]
        if scale is not None:
            inputs = [y, scale] + ([zp] if zp is not None else [])
            y = self.node("QuantizeLinear", inputs, "requantize")
            y.dtype = out.dtype
        y.shape = out.shape
        _take_over(self.graph, out, y)
        self.graph.remove(self.anchor, safe=True)


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    if old in graph.outputs:
        index = list(graph.outputs).index(old)
        name = old.name
        graph.outputs[index] = new
        old.replace_all_uses_with(new)
        old.name = f"{name}_replaced"
        new.name = name
        return
    old.replace_all_uses_with(new)


def _weight(rw: _Rewriter, q, scale, zp, axis: int, suffix: str) -> ir.Value:
    """A constant integer weight as float; a dynamic one through a DequantizeLinear."""
    qa, sa = _const(q), _const(scale)
    if qa is not None and sa is not None:
        return rw.const(suffix, _dequantized(qa, sa, _const(zp), axis))
    return rw.dq(q, scale, zp, suffix)


def _bias(rw: _Rewriter, bias, scale: np.ndarray | None, suffix: str) -> ir.Value | None:
    b = _const(bias)
    if bias is None or b is None or scale is None:
        return bias
    return rw.const(suffix, (b.astype(np.float64) * scale).astype(np.float32))


def _scale_product(a, b) -> np.ndarray | None:
    sa, sb = _const(a), _const(b)
    return None if sa is None or sb is None else np.asarray(sa, np.float64) * sb


def _inputs(node: ir.Node, n: int) -> list[ir.Value | None]:
    return [node.inputs[i] if i < len(node.inputs) else None for i in range(n)]


def _qlinear_conv(rw: _Rewriter, node: ir.Node) -> None:
    x, xs, xz, w, ws, wz, ys, yz, b = _inputs(node, 9)
    wf = _weight(rw, w, ws, wz, 0, "weight")
    bf = _bias(rw, b, _scale_product(xs, ws), "bias")
    conv = rw.node("Conv", [rw.dq(x, xs, xz, "input"), wf] + ([bf] if bf else []), "conv",
                   **{k: v for k, v in node.attributes.items()})  # fmt: skip
    rw.finish(conv, ys, yz)


def _qlinear_matmul(rw: _Rewriter, node: ir.Node) -> None:
    a, as_, az, b, bs, bz, ys, yz = _inputs(node, 8)
    bf = _weight(rw, b, bs, bz, -1, "weight")
    rw.finish(rw.node("MatMul", [rw.dq(a, as_, az, "input"), bf], "matmul"), ys, yz)


def _matmul_integer_to_float(rw: _Rewriter, node: ir.Node) -> None:
    """ORT's kernel for a QDQ MatMul with a float output (qcompile's cpu target writes it
    with the Linear layer's bias folded in): float output, so no requantization."""
    a, bq, as_, bs, az, bz, bias = _inputs(node, 7)
    bf = _weight(rw, bq, bs, bz, -1, "weight")
    y = rw.node("MatMul", [rw.dq(a, as_, az, "input"), bf], "matmul")
    if bias is not None:
        y = rw.node("Add", [y, bias], "bias")
    rw.finish(y, None, None)


def _qgemm(rw: _Rewriter, node: ir.Node) -> None:
    a, as_, az, b, bs, bz, c, ys, yz = _inputs(node, 9)
    trans_b = node.attributes.get_int("transB", 0)
    alpha = node.attributes.get_float("alpha", 1.0)
    bf = _weight(rw, b, bs, bz, 0 if trans_b else -1, "weight")
    scale = _scale_product(as_, bs)
    cf = _bias(rw, c, None if scale is None else scale * alpha, "bias")
    attrs = {k: v for k, v in node.attributes.items() if k in ("alpha", "transA", "transB")}
    gemm = rw.node("Gemm", [rw.dq(a, as_, az, "input"), bf] + ([cf] if cf else []), "gemm", **attrs)
    rw.finish(gemm, ys, yz)


def _qlinear_binary(op: str):
    def lower(rw: _Rewriter, node: ir.Node) -> None:
        a, as_, az, b, bs, bz, ys, yz = _inputs(node, 8)
        y = rw.node(op, [rw.dq(a, as_, az, "a"), rw.dq(b, bs, bz, "b")], op.lower())
        rw.finish(y, ys, yz)

    return lower


def _qlinear_unary(op: str, keep: tuple[str, ...] = ()):
    def lower(rw: _Rewriter, node: ir.Node) -> None:
        x, xs, xz, ys, yz = _inputs(node, 5)
        if node.attributes.get_int("channels_last", 0):
            raise QCompileError(
                f"cannot requantize {node.op_type} with channels_last", node=node.name
            )
        attrs = {k: v for k, v in node.attributes.items() if k in keep}
        rw.finish(rw.node(op, [rw.dq(x, xs, xz, "input")], op.lower(), **attrs), ys, yz)

    return lower


def _qlinear_concat(rw: _Rewriter, node: ir.Node) -> None:
    ys, yz, *rest = node.inputs
    parts = [
        rw.dq(rest[i], rest[i + 1], rest[i + 2], f"in{i // 3}") for i in range(0, len(rest), 3)
    ]
    rw.finish(rw.node("Concat", parts, "concat", axis=node.attributes.get_int("axis")), ys, yz)


POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")
OPERATORS = {
    ("", "QLinearConv"): _qlinear_conv,
    ("", "QLinearMatMul"): _qlinear_matmul,
    (MS, "QGemm"): _qgemm,
    (MS, "MatMulIntegerToFloat"): _matmul_integer_to_float,
    (MS, "QLinearAdd"): _qlinear_binary("Add"),
    (MS, "QLinearMul"): _qlinear_binary("Mul"),
    (MS, "QLinearGlobalAveragePool"): _qlinear_unary("GlobalAveragePool"),
    (MS, "QLinearAveragePool"): _qlinear_unary("AveragePool", POOL_ATTRS),
    (MS, "QLinearSigmoid"): _qlinear_unary("Sigmoid"),
    (MS, "QLinearLeakyRelu"): _qlinear_unary("LeakyRelu", ("alpha",)),
    (MS, "QLinearSoftmax"): _qlinear_unary("Softmax", ("axis",)),
    (MS, "QLinearConcat"): _qlinear_concat,
}


class OperatorsToQDQ(ir.passes.InPlacePass):
    """QLinear*/QGemm operator-format nodes → DequantizeLinear → float op → QuantizeLinear."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in list(graph):
            lower = OPERATORS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
            if lower is not None:
                lower(_Rewriter(graph, node), node)
                modified = True
        while modified and float_movement(graph):
            pass
        return ir.passes.PassResult(model, modified)


class DynamicToFloat(ir.passes.InPlacePass):
    """quantize_dynamic's integer chains and DynamicQuantizeLSTM → float ops."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in list(graph):
            if node.graph is None:
                continue
            if node.op_type in ("ConvInteger", "MatMulInteger"):
                modified |= self._integer_chain(graph, node)
            elif node.op_type == "DynamicQuantizeLSTM" and node.domain == MS:
                self._lstm(graph, node)
                modified = True
        if modified:
            for node in reversed(list(graph)):
                if node.op_type in ("DynamicQuantizeLinear", "Mul") and not any(
                    v.uses() or v in graph.outputs for v in node.outputs
                ):
                    graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _integer_chain(graph: ir.Graph, node: ir.Node) -> bool:
        x_q, w_q, _, w_zp = _inputs(node, 4)
        dynamic = x_q.producer() if x_q is not None else None
        uses = node.outputs[0].uses()
        cast = uses[0].node if len(uses) == 1 else None
        mul_uses = cast.outputs[0].uses() if cast is not None and cast.op_type == "Cast" else []
        mul = mul_uses[0].node if len(mul_uses) == 1 else None
        if (
            dynamic is None
            or dynamic.op_type != "DynamicQuantizeLinear"
            or mul is None
            or mul.op_type != "Mul"
        ):
            raise QCompileError(
                f"cannot requantize {node.op_type}: not the DynamicQuantizeLinear → "
                f"{node.op_type} → Cast → Mul chain quantize_dynamic writes",
                node=node.name,
            )
        product = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
        maker = product.producer()
        if maker is None or maker.op_type != "Mul":
            raise QCompileError(
                f"cannot requantize {node.op_type}: no scale product", node=node.name
            )
        x_scale = dynamic.outputs[1]
        w_scale = maker.inputs[1] if maker.inputs[0] is x_scale else maker.inputs[0]
        wq, ws = _const(w_q), _const(w_scale)
        if wq is None or ws is None:
            raise QCompileError(
                f"cannot requantize {node.op_type}: its weight is not constant", node=node.name
            )
        axis = 0 if node.op_type == "ConvInteger" else -1
        rw = _Rewriter(graph, mul)
        w = rw.const("weight_float", _dequantized(wq, ws, _const(w_zp), axis))
        op = "Conv" if node.op_type == "ConvInteger" else "MatMul"
        attrs = {k: v for k, v in node.attributes.items()} if op == "Conv" else {}
        y = rw.node(op, [dynamic.inputs[0], w], op.lower(), **attrs)
        y.dtype = ir.DataType.FLOAT
        rw.finish(y, None, None)
        graph.remove([cast, node], safe=True)
        return True

    @staticmethod
    def _lstm(graph: ir.Graph, node: ir.Node) -> None:
        x, w, r, b, seq, h0, c0, p, ws, wz, rs, rz = _inputs(node, 12)
        arrays = [_const(v) for v in (w, ws, r, rs)]
        if any(a is None for a in arrays):
            raise QCompileError(
                "cannot requantize DynamicQuantizeLSTM: weights not constant", node=node.name
            )
        rw = _Rewriter(graph, node)
        # [dirs, input, 4·hidden], scales per direction ([dirs]) or per direction and
        # column ([dirs, 4·hidden]) -> LSTM's [dirs, 4·hidden, input]
        w_f = _lstm_weight(arrays[0], arrays[1], _const(wz))
        r_f = _lstm_weight(arrays[2], arrays[3], _const(rz))
        inputs = [
            x,
            rw.const("W", np.ascontiguousarray(w_f)),
            rw.const("R", np.ascontiguousarray(r_f)),
            b,
            seq,
            h0,
            c0,
            p,
        ]
        while inputs and inputs[-1] is None:
            inputs.pop()
        lstm = ir.node("LSTM", inputs, attributes=dict(node.attributes.items()), name=node.name,
                       num_outputs=len(node.outputs))  # fmt: skip
        graph.insert_before(node, lstm)
        for old, new in zip(node.outputs, lstm.outputs, strict=True):
            new.dtype, new.shape = old.dtype, old.shape
            _take_over(graph, old, new)
        graph.remove(node, safe=True)


def _lstm_weight(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None) -> np.ndarray:
    shape = (-1, 1, 1) if scale.ndim == 1 else (scale.shape[0], 1, scale.shape[1])
    s = np.asarray(scale, np.float32).reshape(shape)
    z = np.zeros_like(s) if zp is None else np.asarray(zp, np.float32).reshape(shape)
    return ((q.astype(np.float32) - z) * s).transpose(0, 2, 1).astype(np.float32)


# ops that move integers without arithmetic: a DequantizeLinear after them can move before
MOVEMENT = frozenset(
    {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Slice", "Gather",
     "Split", "DepthToSpace", "SpaceToDepth", "Identity", "Resize"}
)  # fmt: skip


def _same_params(a: ir.Node, b: ir.Node) -> bool:
    def params(n: ir.Node):
        return [None if v is None else _const(v) for v in list(n.inputs[1:3]) + [None]][:2]

    return all(
        (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
        for x, y in zip(params(a), params(b), strict=True)
    )


def float_movement(graph: ir.Graph) -> bool:
    """DequantizeLinear after integer data movement (Flatten between two QLinear ops) moves
    before it, so the movement runs on floats and every DequantizeLinear reads a
    QuantizeLinear. Exact for per-tensor parameters, which such chains carry."""
    modified = False
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
            continue
        mover = dq.inputs[0].producer()
        if mover is None or mover.op_type not in MOVEMENT:
            continue
        others = [u.node for u in dq.inputs[0].uses() if u.node is not dq]
        twins = [n for n in others if n.op_type == "DequantizeLinear" and _same_params(n, dq)]
        if any(n.op_type not in ("Shape", "Size") and n not in twins for n in others):
            continue  # another reader wants the integers
        scale = _const(dq.inputs[1])
        if scale is None or scale.size != 1:
            continue
        rw = _Rewriter(graph, mover)
        moved = rw.dq(
            mover.inputs[0], dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None, "float"
        )
        mover.replace_input_with(0, moved)
        # a new type object: a clone of the model may share the old one
        mover.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        for done in (dq, *twins):
            _take_over(graph, done.outputs[0], mover.outputs[0])
            graph.remove(done, safe=True)
        modified = True
    return modified
