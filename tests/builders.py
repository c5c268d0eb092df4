"""Small FP32 models for tests and the bundled example, built with onnx.helper.

Weights are seeded and He-scaled so activations have realistic ranges; each builder
also has a matching calibration-data generator (structured, not white noise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Builder:
    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def uid(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.uid(prefix)
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        name = name or self.uid(op_type.lower())
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        group: int = 1,
        bn: bool = True,
        name: str | None = None,
    ) -> str:
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(
            np.float32
        )
        inputs = [x, self.const("W", w)]
        if not bn:
            inputs.append(self.const("B", self.rng.standard_normal(cout).astype(np.float32) * 0.1))
        y = self.op(
            "Conv",
            inputs,
            name=name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=group,
        )
        if bn:
            y = self.op(
                "BatchNormalization",
                [
                    y,
                    self.const(
                        "gamma", 1 + 0.2 * self.rng.standard_normal(cout).astype(np.float32)
                    ),
                    self.const("beta", 0.1 * self.rng.standard_normal(cout).astype(np.float32)),
                    self.const("mean", 0.1 * self.rng.standard_normal(cout).astype(np.float32)),
                    self.const("var", (1 + 0.3 * self.rng.random(cout)).astype(np.float32)),
                ],
                epsilon=1e-5,
            )
        return y

    def linear(
        self, x: str, din: int, dout: int, name: str | None = None, gemm: bool = False
    ) -> str:
        w = (self.rng.standard_normal((din, dout)) * np.sqrt(2.0 / din)).astype(np.float32)
        b = (0.05 * self.rng.standard_normal(dout)).astype(np.float32)
        if gemm:
            return self.op(
                "Gemm", [x, self.const("W", w.T.copy()), self.const("B", b)], name=name, transB=1
            )
        y = self.op("MatMul", [x, self.const("W", w)], name=name)
        return self.op("Add", [y, self.const("B", b)])

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qcompile-models"
        )
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def cnn(seed: int = 0, size: int = 32, classes: int = 10, width: int = 1) -> onnx.ModelProto:
    """Conv/BN/ReLU stem, MaxPool, residual block, concat branch, GAP, Gemm head.

    `width` multiplies the channel counts (16/32 at width 1).
    """
    b = _Builder("cnn", seed)
    c, c2 = 16 * width, 32 * width
    x = b.op("Relu", [b.conv("input", 3, c, name="stem_conv")])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    # Residual block.
    r = b.op("Relu", [b.conv(x, c, c, name="res_conv1")])
    r = b.conv(r, c, c, name="res_conv2")
    x = b.op("Relu", [b.op("Add", [x, r], name="res_add")])
    # Two branches concatenated (one depthwise).
    a = b.op("Relu", [b.conv(x, c, c, stride=2, name="branch_a")])
    d = b.op(
        "Clip",
        [
            b.conv(x, c, c, stride=2, group=c, name="branch_dw"),
            b.const("lo", np.float32(0)),
            b.const("hi", np.float32(6)),
        ],
    )
    d = b.op("Relu", [b.conv(d, c, c, k=1, name="branch_pw")])
    x = b.op("Concat", [a, d], axis=1, name="concat")
    x = b.op("Relu", [b.conv(x, c2, c2, bn=False, name="head_conv")])
    x = b.op("GlobalAveragePool", [x], name="gap")
    x = b.op("Flatten", [x], axis=1)
    logits = b.op(
        "Gemm",
        [
            x,
            b.const("fc_w", (b.rng.standard_normal((classes, c2)) * 0.3).astype(np.float32)),
            b.const("fc_b", np.zeros(classes, np.float32)),
        ],
        name="fc",
        transB=1,
    )
    b.nodes[-1].output[0] = "logits"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    del logits
    return b.model([inp], [out])


def mobile_block(seed: int = 0, size: int = 24) -> onnx.ModelProto:
    """MobileNetV3-style block as Paddle exports it: bias-free Conv + Add, decomposed
    HardSwish (x·clip(x+3,0,6)/6), depthwise conv, squeeze-excite with HardSigmoid."""
    b = _Builder("mobile_block", seed)

    def conv_add(
        x: str, cin: int, cout: int, k: int, group: int = 1, name: str | None = None
    ) -> str:
        w = (
            b.rng.standard_normal((cout, cin // group, k, k))
            * np.sqrt(2.0 / (cin // group * k * k))
        ).astype(np.float32)
        y = b.op(
            "Conv",
            [x, b.const("W", w)],
            name=name,
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
            group=group,
        )
        bias = (0.1 * b.rng.standard_normal((1, cout, 1, 1))).astype(np.float32)
        return b.op("Add", [y, b.const("bias", bias)])

    def hardswish(x: str) -> str:
        c = b.op(
            "Clip",
            [
                b.op("Add", [x, b.const("three", np.float32(3))]),
                b.const("zero", np.float32(0)),
                b.const("six", np.float32(6)),
            ],
        )
        return b.op("Div", [b.op("Mul", [x, c]), b.const("six_d", np.float32(6))])

    x = hardswish(conv_add("input", 3, 16, 3, name="stem"))
    d = hardswish(conv_add(x, 16, 16, 3, group=16, name="dw"))
    se = b.op("GlobalAveragePool", [d])
    se = b.op("Relu", [conv_add(se, 16, 8, 1, name="se_reduce")])
    se = b.op("HardSigmoid", [conv_add(se, 8, 16, 1, name="se_expand")], alpha=0.2, beta=0.5)
    y = b.op("Mul", [d, se], name="se_scale")
    y = conv_add(y, 16, 16, 1, name="project")
    b.op("Add", [y, x], name="residual")
    b.nodes[-1].output[0] = "output"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16, size, size])
    return b.model([inp], [out])


def decomposed_layernorm(seed: int = 0, dim: int = 32) -> onnx.ModelProto:
    """LayerNorm written out (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add), as older exporters emit
    it, feeding a 2-D MatMul + bias Add (which fuses to Gemm)."""
    b = _Builder("decomposed_layernorm", seed)
    mean = b.op("ReduceMean", ["input"], axes=[-1], keepdims=1)
    d = b.op("Sub", ["input", mean])
    var = b.op(
        "ReduceMean", [b.op("Pow", [d, b.const("two", np.float32(2.0))])], axes=[-1], keepdims=1
    )
    std = b.op("Sqrt", [b.op("Add", [var, b.const("eps", np.float32(1e-5))])])
    y = b.op("Div", [d, std])
    gamma = (1 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32)
    y = b.op(
        "Add",
        [
            b.op("Mul", [y, b.const("gamma", gamma)]),
            b.const("beta", np.full(dim, 0.05, np.float32)),
        ],
    )
    b.linear(y, dim, dim, name="proj")
    b.nodes[-1].output[0] = "output"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dim])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", dim])
    return b.model([inp], [out])


def decoder(seed: int = 0, size: int = 16, width: int = 8, up_kernel: int = 2) -> onnx.ModelProto:
    """Detector-style decoder: strided Conv, ConvTranspose upsampling (kernel 2 = stride,
    or an overlapping kernel 3 with padding), Resize, AveragePool, Sigmoid head; covers
    the ops the CNN does not."""
    b = _Builder("decoder", seed)
    x = b.op("Relu", [b.conv("input", 3, width, stride=2, name="down")])
    k = up_kernel
    w = (b.rng.standard_normal((width, width, k, k)) * np.sqrt(2.0 / (width * 4))).astype(
        np.float32
    )
    overlap = {} if k == 2 else {"pads": [1, 1, 1, 1], "output_padding": [1, 1]}
    up = b.op(
        "ConvTranspose",
        [x, b.const("Wt", w), b.const("bt", np.zeros(width, np.float32))],
        name="up",
        kernel_shape=[k, k],
        strides=[2, 2],
        **overlap,
    )
    up = b.op("Relu", [up])
    small = b.op("AveragePool", [x], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    big = b.op(
        "Resize",
        [small, "", b.const("scales", np.array([1, 1, 4, 4], np.float32))],
        name="resize",
        mode="nearest",
    )
    y = b.op("Add", [up, big], name="merge")
    y = b.op("Sigmoid", [b.conv(y, width, 1, k=1, bn=False, name="head")], name="prob")
    b.nodes[-1].output[0] = "output"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, size, size])
    return b.model([inp], [out])


def mlp(seed: int = 0, din: int = 64, hidden: int = 128, dout: int = 16) -> onnx.ModelProto:
    b = _Builder("mlp", seed)
    x = b.op("Relu", [b.linear("input", din, hidden, name="fc1")])
    x = b.op("Relu", [b.linear(x, hidden, hidden, name="fc2", gemm=True)])
    b.linear(x, hidden, dout, name="fc3")
    b.nodes[-1].output[0] = "output"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", din])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", dout])
    return b.model([inp], [out])


def transformer_block(
    seed: int = 0, dim: int = 64, heads: int = 4, ffn: int = 128, divide: bool = False
) -> onnx.ModelProto:
    """Pre-LN encoder block: LayerNorm, multi-head attention with Softmax, GELU FFN,
    residuals. `divide`: scores / √d (as MPNet and DeBERTa write it) instead of · 1/√d."""
    b = _Builder("transformer_block", seed)
    hd = dim // heads

    def layer_norm(x: str, name: str) -> str:
        g = (1 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32)
        beta = (0.05 * b.rng.standard_normal(dim)).astype(np.float32)
        return b.op(
            "LayerNormalization",
            [x, b.const("ln_g", g), b.const("ln_b", beta)],
            name=name,
            axis=-1,
            epsilon=1e-5,
        )

    def heads_split(x: str) -> str:
        r = b.op("Reshape", [x, b.const("shape", np.array([0, 0, heads, hd], np.int64))])
        return b.op("Transpose", [r], perm=[0, 2, 1, 3])

    h = layer_norm("input", "ln1")
    q = heads_split(b.linear(h, dim, dim, name="q_proj"))
    k = heads_split(b.linear(h, dim, dim, name="k_proj"))
    v = heads_split(b.linear(h, dim, dim, name="v_proj"))
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [q, kt], name="qk_matmul")
    if divide:
        scores = b.op("Div", [scores, b.const("sqrt_d", np.float32(np.sqrt(hd)))])
    else:
        scores = b.op("Mul", [scores, b.const("inv_sqrt_d", np.float32(1.0 / np.sqrt(hd)))])
    probs = b.op("Softmax", [scores], axis=-1, name="softmax")
    ctx = b.op("MatMul", [probs, v], name="av_matmul")
    ctx = b.op("Transpose", [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.const("shape", np.array([0, 0, dim], np.int64))])
    attn = b.linear(ctx, dim, dim, name="out_proj")
    x = b.op("Add", ["input", attn], name="residual1")
    h = layer_norm(x, "ln2")
    f = b.linear(h, dim, ffn, name="ffn1")
    # GELU written out with Erf, as exporters emit it.
    e = b.op("Erf", [b.op("Div", [f, b.const("sqrt2", np.float32(np.sqrt(2.0)))])])
    g = b.op(
        "Mul",
        [
            b.op("Mul", [f, b.op("Add", [e, b.const("one", np.float32(1.0))])]),
            b.const("half", np.float32(0.5)),
        ],
    )
    f = b.linear(g, ffn, dim, name="ffn2")
    b.op("Add", [x, f], name="residual2")
    b.nodes[-1].output[0] = "output"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "S", dim])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "S", dim])
    return b.model([inp], [out])


def rms_block(seed: int = 0, dim: int = 32, style: str = "torchscript") -> onnx.ModelProto:
    """A residual sum normalized by RMSNorm, then a linear layer. `style` is how the norm
    is written: "torchscript" (Pow, ReduceMean axes attribute, Div(1, Sqrt), a no-op Cast
    before γ; opset 17), "dynamo" (Mul h·h, ReduceMean axes input, Reciprocal, γ first;
    opset 18) or "op"
    (ONNX's RMSNormalization, opset 23)."""
    b = _Builder("rms_block", seed)
    a = b.linear("input", dim, dim, name="embed")
    h = b.op("Add", [a, b.linear(a, dim, dim, name="attn_out")], name="residual")
    gamma = b.const("gamma", (1 + 0.3 * b.rng.standard_normal(dim)).astype(np.float32))
    eps = b.const("eps", np.float32(1e-6))
    if style == "op":
        y = b.op("RMSNormalization", [h, gamma], name="norm", axis=-1, epsilon=1e-6)
    elif style == "torchscript":
        sq = b.op("Pow", [h, b.const("two", np.float32(2.0))])
        var = b.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        root = b.op("Sqrt", [b.op("Add", [var, eps])])
        factor = b.op("Div", [b.const("one", np.float32(1.0)), root])
        y = b.op("Cast", [b.op("Mul", [h, factor], name="norm")], to=TensorProto.FLOAT)
        y = b.op("Mul", [gamma, y])
    else:
        sq = b.op("Mul", [h, h])
        var = b.op("ReduceMean", [sq, b.const("axes", np.array([-1], np.int64))], keepdims=1)
        factor = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [eps, var])])])
        y = b.op("Mul", [gamma, b.op("Mul", [factor, h], name="norm")])
    b.op("MatMul", [y, b.const("W", b.rng.standard_normal((dim, dim)) / np.sqrt(dim))])
    b.nodes[-1].output[0] = "output"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "S", dim])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "S", dim])
    if style == "torchscript":
        return b.model([inp], [out])
    graph = helper.make_graph(b.nodes, b.name, [inp], [out], b.inits)
    opset = 23 if style == "op" else 18
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if style == "op" else 8
    onnx.checker.check_model(model, full_check=True)
    return model


# -- calibration data --------------------------------------------------------------------


def voice_activity(seed: int = 0, frame: int = 64, hidden: int = 32) -> onnx.ModelProto:
    """A Silero-VAD-shaped model: an If on the sample-rate input picks one of two branches
    (each a MatMul + Relu), then an LSTM over the frames and a Gemm + Sigmoid head.

    Inputs: x [batch, steps, frame] float, sr [] int64 (16000 or 8000).
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name
        )

    def branch(name: str, weight: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["x", weight], [f"{name}_mm"], name=f"{name}_matmul"),
                helper.make_node("Relu", [f"{name}_mm"], [f"{name}_out"], name=f"{name}_relu"),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        )

    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="is_16k"),
        helper.make_node(
            "If",
            ["is16k"],
            ["features"],
            name="rate_branch",
            then_branch=branch("wide", "w16k"),
            else_branch=branch("narrow", "w8k"),
        ),
        helper.make_node("Transpose", ["features"], ["time_major"], perm=[1, 0, 2], name="tm"),
        helper.make_node(
            "LSTM",
            ["time_major", "lstm_w", "lstm_r", "lstm_b"],
            ["", "h_last"],
            hidden_size=hidden,
            name="lstm",
        ),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["h"], name="squeeze"),
        helper.make_node("Gemm", ["h", "head_w", "head_b"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["speech"], name="prob"),
    ]
    inits = [
        numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
        init("w16k", frame, hidden),
        init("w8k", frame, hidden),
        init("lstm_w", 1, 4 * hidden, hidden),
        init("lstm_r", 1, 4 * hidden, hidden),
        numpy_helper.from_array(np.zeros((1, 8 * hidden), np.float32), "lstm_b"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        init("head_w", hidden, 1),
        numpy_helper.from_array(np.zeros(1, np.float32), "head_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "voice_activity",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "steps", frame]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth, image-like NCHW data in ImageNet-normalized units (not white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        for c in range(3):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
            base = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
            blob = np.exp(
                -((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2) / rng.uniform(0.01, 0.1)
            )
            out[i, c] = 0.8 * base + 1.5 * blob + 0.1 * rng.standard_normal((size, size))
    return out


def features(count: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(0, 0.5, dim)).astype(np.float32)
    return rng.standard_normal((count, dim)).astype(np.float32) * scales


def token_embeddings(count: int, seq: int = 16, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Embedding-like inputs with a few outlier channels, as real transformers have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, seq, dim)).astype(np.float32)
    x[:, :, :2] *= 6.0
    return x


def write_examples(folder: Path) -> None:
    """The bundled example: big enough (96x96, 64-128 channels) that INT8 pays off on a CPU,
    small enough to commit; calibration images stored as float16 to keep the file small."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(cnn(size=96, width=4), folder / "cnn.onnx")
    np.savez_compressed(
        folder / "cnn_calib.npz", input=images(20, size=96, seed=1).astype(np.float16)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="write the bundled example model and data")
    parser.add_argument(
        "folder",
        nargs="?",
        default=str(Path(__file__).resolve().parent.parent / "qcompile" / "examples"),
    )
    write_examples(Path(parser.parse_args().folder))


if __name__ == "__main__":
    main()
