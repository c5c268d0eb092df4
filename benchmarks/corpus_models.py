"""Corpus models built here, small and seeded: control flow (If/Loop/Scan, branches that
read outer-scope values or end in Identity), a CNN+LSTM text recognizer with a wrong or
missing declared output shape, and pre-quantized models in each format ONNX Runtime's
quantization tool writes (QDQ, QOperator, dynamic) of a CNN and a CNN+LSTM.

The builders are plain functions returning a ModelProto, so tests use them too.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset=OPSET, name="m") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=opset)
    model.ir_version = 8
    return model


def _conv_stem(rng, x: str, cin: int, cout: int, prefix: str):
    """Conv → Relu: something worth quantizing before the control flow."""
    w = numpy_helper.from_array(_w(rng, cout, cin, 3, 3), f"{prefix}_w")
    b = numpy_helper.from_array(_w(rng, cout, scale=0.1), f"{prefix}_b")
    nodes = [
        helper.make_node(
            "Conv", [x, w.name, b.name], [f"{prefix}_c"], name=f"{prefix}_conv", pads=[1] * 4
        ),
        helper.make_node("Relu", [f"{prefix}_c"], [f"{prefix}_y"], name=f"{prefix}_relu"),
    ]
    return nodes, [w, b], f"{prefix}_y"


def if_identity(seed: int = 0, same_value: bool = False) -> onnx.ModelProto:
    """If whose branches end in Identity of outer-scope values (torch.cond-style exports);
    `same_value`: both branches return the same outer value."""
    rng = np.random.default_rng(seed)
    nodes, inits, y = _conv_stem(rng, "x", 3, 8, "stem")
    then_g = helper.make_graph(
        [helper.make_node("Identity", [y], ["then_out"], name="then_id")],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )  # fmt: skip
    else_nodes = [helper.make_node("Identity", [y], ["else_out"], name="else_id")]
    if not same_value:
        else_nodes = [helper.make_node("Neg", [y], ["neg"], name="else_neg"),
                      helper.make_node("Identity", ["neg"], ["else_out"], name="else_id")]  # fmt: skip
    else_g = helper.make_graph(
        else_nodes, "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)]
    )
    nodes += [
        helper.make_node("ReduceSum", [y], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="gt"),
        helper.make_node("If", ["positive"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Conv", ["branch", "head_w"], ["out"], name="head", pads=[1] * 4),
    ]  # fmt: skip
    inits += [numpy_helper.from_array(np.float32(0), "zero"),
              numpy_helper.from_array(_w(rng, 4, 8, 3, 3), "head_w")]  # fmt: skip
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 16, 16])],
        inits,
    )


def loop_and_scan(seed: int = 0) -> onnx.ModelProto:
    """A Loop adding an outer-scope MatMul result per iteration, then a Scan (cumulative
    sum over the sequence axis), between quantizable MatMuls."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(_w(rng, 16, 16), "w1")
    w2 = numpy_helper.from_array(_w(rng, 16, 8), "w2")
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "h"], ["acc_out"], name="loop_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)],
    )  # fmt: skip
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"], name="scan_add"),
         helper.make_node("Identity", ["s_out"], ["y_t"], name="scan_id")],
        "scan_body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [16])],
    )  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Loop", ["trips", "true", "h"], ["looped"], name="loop", body=body),
        helper.make_node("Scan", ["zeros", "looped"], ["final", "cumsum"], name="scan",
                         body=scan_body, num_scan_inputs=1),
        helper.make_node("MatMul", ["cumsum", "w2"], ["out"], name="mm2"),
    ]  # fmt: skip
    inits = [w1, w2,
             numpy_helper.from_array(np.int64(3), "trips"),
             numpy_helper.from_array(np.array(True), "true"),
             numpy_helper.from_array(np.zeros(16, np.float32), "zeros")]  # fmt: skip
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [6, 8])],
        inits,
    )


def crnn(seed: int = 0, declared: str = "wrong", opset: int = 12) -> onnx.ModelProto:
    """A CNN + LSTM text recognizer: conv features, a Reshape whose target the graph
    computes at run time from the feature map's shape, an LSTM over the width and a
    classifier, output [T, 1, C]. `declared`: "right" ([T, 1, C] symbolic), "wrong"
    ([1, seqlen], as some exporters write) or "none" (a type with no shape)."""
    rng = np.random.default_rng(seed)
    nodes, inits, y = _conv_stem(rng, "x", 1, 8, "c1")
    more, w, y2 = _conv_stem(rng, y, 8, 8, "c2")
    nodes += more
    inits += w
    hidden, classes = 16, 12
    nodes += [
        # [N, C, H, W] -> [W, N, C*H], target shape computed from Shape(feature map)
        helper.make_node("Transpose", [y2], ["t"], name="to_whnc", perm=[3, 0, 1, 2]),
        helper.make_node("Shape", ["t"], ["t_shape"], name="shape"),
        helper.make_node("Gather", ["t_shape", "idx01"], ["wn"], name="take_wn", axis=0),
        helper.make_node("Concat", ["wn", "minus1"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["t", "target"], ["seq"], name="to_seq"),
        helper.make_node("LSTM", ["seq", "lstm_w", "lstm_r", "lstm_b"], ["lstm_y"], name="lstm",
                         hidden_size=hidden),
        helper.make_node("Squeeze", ["lstm_y", "axis1"], ["feat"], name="squeeze")
        if opset >= 13
        else helper.make_node("Squeeze", ["lstm_y"], ["feat"], name="squeeze", axes=[1]),
        helper.make_node("MatMul", ["feat", "cls_w"], ["logits"], name="classifier"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]  # fmt: skip
    feat_dim = 8 * 8
    inits += [
        numpy_helper.from_array(np.array([0, 1], np.int64), "idx01"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(_w(rng, 1, 4 * hidden, feat_dim, scale=0.1), "lstm_w"),
        numpy_helper.from_array(_w(rng, 1, 4 * hidden, hidden, scale=0.1), "lstm_r"),
        numpy_helper.from_array(_w(rng, 1, 8 * hidden, scale=0.1), "lstm_b"),
        numpy_helper.from_array(_w(rng, hidden, classes), "cls_w"),
    ]
    if declared == "right":
        out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["T", "N", classes])
    elif declared == "wrong":
        out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, "seqlen"])
    else:
        out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)
        out.type.tensor_type.ClearField("shape")
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, "W"])],
        [out],
        inits,
        opset=[helper.make_opsetid("", opset)],
    )


def crnn_feeds(count: int = 10, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 1, 8, 24)).astype(np.float32)} for _ in range(count)]


def cnn(seed: int = 0) -> onnx.ModelProto:
    """A small classifier CNN (two convs, pooling, a Gemm head)."""
    rng = np.random.default_rng(seed)
    nodes, inits, y = _conv_stem(rng, "x", 3, 8, "c1")
    more, w, y2 = _conv_stem(rng, y, 8, 16, "c2")
    nodes += more + [
        helper.make_node("GlobalAveragePool", [y2], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inits += w + [numpy_helper.from_array(_w(rng, 10, 16), "fc_w"),
                  numpy_helper.from_array(_w(rng, 10, scale=0.1), "fc_b")]  # fmt: skip
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )


def cnn_feeds(count: int = 10, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


@functools.cache
def prequantized(kind: str, base: str) -> onnx.ModelProto:
    """`base` ("cnn" or "crnn") quantized by ONNX Runtime's tool: kind "qdq" and "qoperator"
    (quantize_static), "dynamic" (quantize_dynamic)."""
    from onnxruntime import quantization as q

    model = cnn() if base == "cnn" else crnn(declared="right", opset=13)
    feeds = cnn_feeds() if base == "cnn" else crnn_feeds()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        if kind == "dynamic":
            q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8)
        else:
            fmt = q.QuantFormat.QDQ if kind == "qdq" else q.QuantFormat.QOperator
            q.quantize_static(str(src), str(dst), _Reader(feeds), quant_format=fmt,
                              per_channel=False, weight_type=q.QuantType.QInt8)  # fmt: skip
        return onnx.load(str(dst))


def built_models() -> list:
    from benchmarks.corpus import CorpusModel, calibration_feeds

    def fixed(feeds):
        return lambda model: feeds

    entries = [
        CorpusModel("if_branches_end_in_identity", "built/control-flow", if_identity,
                    lambda m: calibration_feeds(m, [])),
        CorpusModel("if_branches_return_one_outer_value", "built/control-flow",
                    functools.partial(if_identity, same_value=True),
                    lambda m: calibration_feeds(m, [])),
        CorpusModel("loop_and_scan", "built/control-flow", loop_and_scan,
                    lambda m: calibration_feeds(m, [])),
        CorpusModel("crnn_declared_shape_right", "built/crnn",
                    functools.partial(crnn, declared="right"), fixed(crnn_feeds())),
        CorpusModel("crnn_declared_shape_wrong", "built/crnn",
                    functools.partial(crnn, declared="wrong"), fixed(crnn_feeds())),
        CorpusModel("crnn_declared_without_shape", "built/crnn",
                    functools.partial(crnn, declared="none"), fixed(crnn_feeds())),
    ]  # fmt: skip
    for base, feeds in (("cnn", cnn_feeds()), ("crnn", crnn_feeds())):
        for kind in ("qdq", "qoperator", "dynamic"):
            entries.append(
                CorpusModel(
                    f"{base}_{kind}_quantized",
                    "built/prequantized",
                    functools.partial(prequantized, kind, base),
                    fixed(feeds),
                    options={"already_quantized": "requantize"},
                )
            )
    return entries
