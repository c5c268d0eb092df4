"""QONNX export: the quantized graph as float ops around QONNX `Quant` nodes.

QONNX (the format of FINN and Brevitas) writes quantization as one custom op,
`Quant(x, scale, zeropt, bitwidth; signed, narrow, rounding_mode)` in the domain
`qonnx.custom_op.general`, which carries the bit width that ONNX's QuantizeLinear cannot
(2-7 bit tensors live in int8 there). The export starts from the QDQ graph (before
integer-only lowering) and turns
- each activation QuantizeLinear [→ narrowing Clip] → DequantizeLinear into one Quant;
- each constant integer weight behind a DequantizeLinear into its float value followed by
  a Quant with the weight's bit width and per-channel scale (so FINN sees the integer
  weights' range);
- int32 biases into their exact float values (QONNX keeps biases in float);
- ORT's contrib Gelu/FastGelu (our fusions write them below opset 20) into the standard
  ops they compute, Erf or Tanh form: QONNX's tools know only ONNX's domain and theirs.
Every other op stays as it is. `qonnx`'s executor runs the result node by node;
tests/test_qonnx.py compares it with our models.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import QCompileError
from qcompile.ir.graph import const_array, required_source_quantizer

QONNX_DOMAIN = "qonnx.custom_op.general"


def _dq_params(dq: ir.Node) -> tuple[np.ndarray, np.ndarray, int]:
    scale = const_array(dq.inputs[1])
    zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if scale is None:
        raise QCompileError("a DequantizeLinear has a run-time scale", node=dq.name)
    zp = np.zeros(scale.shape, np.int64) if zp is None else zp
    return scale, zp, dq.attributes.get_int("axis", 1)


def _bits_of(q_int: ir.Value, dtype: np.dtype) -> tuple[int, bool, bool]:
    """(bit width, signed, narrow) of an integer tensor: its type, or a narrowing Clip."""
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    node = q_int.producer()
    if node is not None and node.op_type == "Clip":
        if len(node.inputs) > 1 and const_array(node.inputs[1]) is not None:
            lo = int(const_array(node.inputs[1]))
        if len(node.inputs) > 2 and const_array(node.inputs[2]) is not None:
            hi = int(const_array(node.inputs[2]))
    return _range_bits(lo, hi)


def _range_bits(lo: int, hi: int) -> tuple[int, bool, bool]:
    signed = lo < 0
    if signed:
        bits = max(int(np.ceil(np.log2(max(hi + 1, -lo)))) + 1, 2)
        narrow = lo == -(2 ** (bits - 1)) + 1
    else:
        bits, narrow = max(int(np.ceil(np.log2(hi + 1))), 1), False
    return bits, signed, narrow


def _constant_bits(q: np.ndarray) -> tuple[int, bool, bool]:
    """Bit width of quantized constants: symmetric weights reach ±qmax in some channel."""
    if np.dtype(q.dtype) == np.dtype(np.uint8):
        return 8, False, False
    peak = int(np.abs(q.astype(np.int64)).max(initial=1))
    bits = max(2, int(np.ceil(np.log2(peak + 1))) + 1)
    return bits, True, int(q.min(initial=0)) > -(2 ** (bits - 1))


def _broadcast_shape(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if param.ndim == 0 or rank == 0:
        return param
    shape = [1] * rank
    shape[axis % rank] = -1
    return param.reshape(shape)


def to_qonnx(
    qdq_model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> onnx.ModelProto:
    """A QONNX ModelProto from a QDQ model (the model itself is not modified).

    QONNX's tools want every shape static: dynamic input dims are pinned from
    `input_shapes` or else to 1.
    """
    model = qdq_model.clone()
    graph = model.graph
    for value in graph.inputs:
        dims = None if value.shape is None else list(value.shape)
        if input_shapes and value.name in input_shapes:
            value.shape = ir.Shape(input_shapes[value.name])
        elif dims is not None and not all(isinstance(d, int) for d in dims):
            value.shape = ir.Shape([d if isinstance(d, int) else 1 for d in dims])
    counter = 0

    def fresh(base: str) -> str:
        nonlocal counter
        counter += 1
        return f"{base}_qonnx{counter}"

    def constant(base: str, array: np.ndarray) -> ir.Value:
        name = fresh(base)
        value = ir.Value(name=name, shape=ir.Shape(array.shape))
        value.dtype = ir.DataType.from_numpy(array.dtype)
        value.const_value = ir.tensor(array, name=name)
        graph.register_initializer(value)
        return value

    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        src = dq.inputs[0]
        scale, zp, axis = _dq_params(dq)
        out = dq.outputs[0]
        rank = len(out.shape) if out.shape is not None else scale.ndim
        q_array = const_array(src)
        if q_array is not None:  # a constant: weight, bias or quantized operand
            real = (q_array.astype(np.float64) - _broadcast_shape(zp, q_array.ndim, axis)) * (
                _broadcast_shape(scale.astype(np.float64), q_array.ndim, axis)
            )
            real_value = constant(src.name, real.astype(np.float32))
            if q_array.dtype == np.int32:  # bias: exact in float
                out.replace_all_uses_with(real_value)
                graph.remove(dq, safe=True)
                continue
            bits, signed, narrow = _constant_bits(q_array)
            inputs = [real_value, scale, zp]
            x = real_value
        else:
            q = required_source_quantizer(
                dq, "export QONNX from qcompile's QDQ graph (before integer-only lowering)"
            )
            q_scale, q_zp, _ = _dq_params(q)
            bits, signed, narrow = _bits_of(
                src, const_array(q.inputs[2]).dtype if len(q.inputs) > 2 else np.uint8
            )
            if not np.array_equal(q_zp, zp):
                raise QCompileError("dequantizer and quantizer zero points differ", node=dq.name)
            x = q.inputs[0]
            inputs = [x, q_scale, q_zp]
            if not np.array_equal(q_scale, scale):  # a scale alias: quantize, then rescale
                ratio = (scale.astype(np.float64) / q_scale.astype(np.float64)).astype(np.float32)
                inputs.append(ratio)
        quant_scale = _broadcast_shape(np.asarray(inputs[1], np.float32), rank, axis)
        quant_zp = _broadcast_shape(np.asarray(inputs[2]).astype(np.float32), rank, axis)
        quant = ir.node(
            "Quant",
            [
                x,
                constant(f"{out.name}_scale", quant_scale),
                constant(f"{out.name}_zeropt", quant_zp),
                constant(f"{out.name}_bitwidth", np.asarray(float(bits), np.float32)),
            ],
            attributes={
                "signed": int(signed),
                "narrow": int(narrow),
                "rounding_mode": "ROUND",
            },
            domain=QONNX_DOMAIN,
            name=fresh(f"{dq.name}_Quant"),
        )
        quant.outputs[0].name = fresh(f"{out.name}_quant")
        quant.outputs[0].dtype, quant.outputs[0].shape = ir.DataType.FLOAT, out.shape
        graph.insert_before(dq, quant)
        result = quant.outputs[0]
        if len(inputs) == 4:
            mul = ir.node(
                "Mul", [result, constant(f"{out.name}_alias", inputs[3])], name=fresh("alias")
            )
            mul.outputs[0].name = fresh(f"{out.name}_rescaled")
            mul.outputs[0].dtype, mul.outputs[0].shape = ir.DataType.FLOAT, out.shape
            graph.insert_before(dq, mul)
            result = mul.outputs[0]
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        if q_array is None:
            # Shape readers of the integer tensor read the float tensor instead
            for use in list(src.uses()):
                if use.node.op_type in ("Shape", "Size"):
                    use.node.replace_input_with(use.idx, x)
        graph.remove(dq, safe=True)
    for node in [n for n in reversed(list(graph)) if n.op_type in ("QuantizeLinear", "Clip")]:
        if all(not v.uses() for v in node.outputs) and not any(
            v in graph.outputs for v in node.outputs
        ):
            graph.remove(node, safe=True)
    _write_out_contrib_gelu(graph, constant)
    if not any(n.domain == "com.microsoft" for n in graph):
        model.opset_imports.pop("com.microsoft", None)
    graph.sort()
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]  # QONNX infers its own (Quant included)
    proto.opset_import.append(onnx.helper.make_opsetid(QONNX_DOMAIN, 1))
    return proto


def _write_out_contrib_gelu(graph: ir.Graph, constant) -> None:
    """com.microsoft Gelu → x·½·(1 + erf(x/√2)); FastGelu(x[, bias]) → the tanh form
    x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as ORT's kernels compute them."""

    def op(kind: str, inputs: list[ir.Value], anchor: ir.Node) -> ir.Value:
        node = ir.node(kind, inputs, name=f"{anchor.name}_{kind}_{len(graph)}")
        node.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(anchor, node)
        return node.outputs[0]

    def c(base: str, v: float) -> ir.Value:
        return constant(base, np.asarray(v, np.float32))

    for node in [n for n in graph if n.domain == "com.microsoft"]:
        if node.op_type not in ("Gelu", "FastGelu"):
            continue
        x = node.inputs[0]
        if node.op_type == "FastGelu" and len(node.inputs) > 1 and node.inputs[1] is not None:
            x = op("Add", [x, node.inputs[1]], node)
        if node.op_type == "Gelu":
            inner = op("Erf", [op("Mul", [x, c("inv_sqrt2", 2**-0.5)], node)], node)
        else:
            cube = op("Mul", [op("Mul", [x, x], node), x], node)
            poly = op("Add", [x, op("Mul", [cube, c("gelu_k", 0.044715)], node)], node)
            inner = op("Tanh", [op("Mul", [poly, c("gelu_c", np.sqrt(2 / np.pi))], node)], node)
        half_x = op("Mul", [x, c("half", 0.5)], node)
        y = op("Mul", [half_x, op("Add", [inner, c("one", 1.0)], node)], node)
        y.shape = node.outputs[0].shape
        node.outputs[0].replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(node, safe=True)


def qonnx_available() -> bool:
    try:
        import qonnx  # noqa: F401
    except ImportError:
        return False
    return True


def execute(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a QONNX model with the qonnx package's own executor (after its shape inference)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    wrapped = ModelWrapper(model).transform(InferShapes())
    outputs = execute_onnx(wrapped, dict(feed))
    return [outputs[o.name] for o in wrapped.graph.output]
