"""QuaRot-style rotation of RMSNorm residual streams: orthogonal, FP32-exact, refused where
the stream does not allow it, and worth decibels where the stream has outlier channels."""

import numpy as np
import onnx
import pytest
from conftest import corpus_model
from onnx import TensorProto, helper, numpy_helper
from test_smoothing import _assert_same_outputs, _run

import qcompile
from qcompile.ir import load_model
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.manager import run_phase
from qcompile.passes.rotation import RotateResidualStream, rotation_matrix
from tests.conftest import FAST

DIM, HIDDEN, VOCAB, SEQ = 64, 96, 200, 8


@pytest.mark.parametrize("d", [16, 48, 64, 96, 384])
def test_rotation_matrix_is_orthogonal_and_hadamard_where_d_is_a_power_of_two(d):
    q = rotation_matrix(d, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    if d & (d - 1) == 0:
        np.testing.assert_allclose(np.abs(q), 1 / np.sqrt(d), atol=1e-12)
    np.testing.assert_array_equal(q, rotation_matrix(d, seed=3))  # deterministic


def _rms_norm(nodes, inits, x: str, name: str, gamma: np.ndarray) -> str:
    """RMSNorm as torch exporters spell it: x · 1/√(mean(x²) + ε) · γ."""
    inits.append(numpy_helper.from_array(gamma, f"{name}_g"))
    nodes += [
        helper.make_node("Pow", [x, "two"], [f"{name}_sq"], name=f"{name}_pow"),
        helper.make_node(
            "ReduceMean", [f"{name}_sq"], [f"{name}_ms"], axes=[-1], keepdims=1, name=f"{name}_mean"
        ),
        helper.make_node("Add", [f"{name}_ms", "eps"], [f"{name}_mse"], name=f"{name}_eps"),
        helper.make_node("Sqrt", [f"{name}_mse"], [f"{name}_rms"], name=f"{name}_sqrt"),
        helper.make_node("Div", ["one", f"{name}_rms"], [f"{name}_inv"], name=f"{name}_div"),
        helper.make_node("Mul", [x, f"{name}_inv"], [f"{name}_n"], name=f"{name}_normalize"),
        helper.make_node("Mul", [f"{name}_g", f"{name}_n"], [f"{name}_out"], name=f"{name}_gamma"),
    ]
    return f"{name}_out"


def decoder(seed: int = 0, outliers: bool = True, final: str = "lm_head") -> onnx.ModelProto:
    """A LLaMA-like decoder without attention: embedding, two pre-RMSNorm blocks (a value/
    output projection pair and a SiLU-gated MLP, each added to the stream; one with
    biases), a final RMSNorm and an lm_head. `outliers`: a few stream channels 20x wider,
    as trained decoders have."""
    rng = np.random.default_rng(seed)

    def w(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    table = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    if outliers:
        table[:, [3, 40]] *= 20.0
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h0"], name="embed")]
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
    ]
    h = "h0"
    for layer in range(2):
        p = f"l{layer}"
        gamma = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
        n = _rms_norm(nodes, inits, h, f"{p}_attn_norm", gamma)
        inits += [numpy_helper.from_array(w(DIM, DIM), f"{p}_wv")]
        inits += [numpy_helper.from_array(w(DIM, DIM), f"{p}_wo")]
        inits += [numpy_helper.from_array(rng.standard_normal(DIM).astype(np.float32), f"{p}_bo")]
        nodes += [
            helper.make_node("MatMul", [n, f"{p}_wv"], [f"{p}_v"], name=f"{p}_v_proj"),
            helper.make_node("MatMul", [f"{p}_v", f"{p}_wo"], [f"{p}_o"], name=f"{p}_o_proj"),
            helper.make_node("Add", [f"{p}_o", f"{p}_bo"], [f"{p}_ob"], name=f"{p}_o_bias"),
            helper.make_node("Add", [h, f"{p}_ob"], [f"{p}_h1"], name=f"{p}_residual1"),
        ]
        h = f"{p}_h1"
        n = _rms_norm(nodes, inits, h, f"{p}_mlp_norm", gamma)
        inits += [numpy_helper.from_array(w(DIM, HIDDEN), f"{p}_wg")]
        inits += [numpy_helper.from_array(w(DIM, HIDDEN), f"{p}_wu")]
        inits += [numpy_helper.from_array(w(HIDDEN, DIM), f"{p}_wd")]
        nodes += [
            helper.make_node("MatMul", [n, f"{p}_wg"], [f"{p}_g"], name=f"{p}_gate_proj"),
            helper.make_node("MatMul", [n, f"{p}_wu"], [f"{p}_u"], name=f"{p}_up_proj"),
            helper.make_node("Sigmoid", [f"{p}_g"], [f"{p}_sig"], name=f"{p}_sigmoid"),
            helper.make_node("Mul", [f"{p}_g", f"{p}_sig"], [f"{p}_silu"], name=f"{p}_silu"),
            helper.make_node("Mul", [f"{p}_silu", f"{p}_u"], [f"{p}_gated"], name=f"{p}_gated"),
            helper.make_node("MatMul", [f"{p}_gated", f"{p}_wd"], [f"{p}_d"], name=f"{p}_down"),
            helper.make_node("Add", [f"{p}_d", h], [f"{p}_h2"], name=f"{p}_residual2"),
        ]
        h = f"{p}_h2"
    if final == "lm_head":
        n = _rms_norm(nodes, inits, h, "final_norm", np.ones(DIM, np.float32))
        inits.append(numpy_helper.from_array(w(DIM, VOCAB), "lm_head_w"))
        nodes.append(helper.make_node("MatMul", [n, "lm_head_w"], ["logits"], name="lm_head"))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, VOCAB])
    else:  # the stream itself is the output (a hidden-state export)
        nodes.append(helper.make_node("Identity", [h], ["hidden"], name="out"))
        out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, SEQ, DIM])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])
    graph = helper.make_graph(nodes, "decoder", [ids], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64)} for _ in range(n)]


def _rotate(proto):
    model, _ = run_phase(load_model(proto), "rewrite", canonicalize())
    before = model.clone()
    p = RotateResidualStream()
    after, records = run_phase(model, "rotate", [p])
    return before, after, p, records


def test_rotation_folds_into_table_writers_and_norm_readers_keeping_fp32_outputs():
    before, after, p, records = _rotate(decoder())
    assert p.rotated == ["embed"] and records[0].modified
    # γ went into the readers' weights: every RMSNorm γ is now ones
    gammas = [n for n in after.graph if n.name.endswith("_gamma")]
    assert len(gammas) == 5
    for node in gammas:
        np.testing.assert_array_equal(node.inputs[0].const_value.numpy(), np.ones(DIM))
    # the stream's outlier channels are spread over all channels
    table = next(v for n in after.graph if n.name == "embed" for v in n.inputs[:1])
    width = np.abs(table.const_value.numpy()).max(axis=0)
    assert width.max() / np.median(width) < 2.0
    _assert_same_outputs(before, after, _feeds(3))


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        ("hidden_output", "graph output"),
        ("layer_norm", "LayerNormalization"),
        ("softmax_reader", "feeds more than linear layers"),
    ],
)
def test_rotation_is_refused_where_the_stream_does_not_allow_it(mutate, why):
    proto = decoder(final="hidden" if mutate == "hidden_output" else "lm_head")
    graph = proto.graph
    if mutate == "layer_norm":  # a LayerNorm reads the stream: mean subtraction
        graph.initializer.append(numpy_helper.from_array(np.ones(DIM, np.float32), "ln_g"))
        graph.node.append(
            helper.make_node("LayerNormalization", ["l1_h2", "ln_g"], ["ln"], name="extra_ln")
        )
        graph.output.append(helper.make_tensor_value_info("ln", TensorProto.FLOAT, None))
    if mutate == "softmax_reader":  # a normalized stream read by something not linear
        graph.node.append(helper.make_node("Softmax", ["l0_mlp_norm_out"], ["sm"], name="sm"))
        graph.output.append(helper.make_tensor_value_info("sm", TensorProto.FLOAT, None))
    before, after, p, records = _rotate(proto)
    assert p.rotated == [] and not records[0].modified
    assert why in p.refused["embed"]
    _assert_same_outputs(before, after, _feeds(1))


def test_rotation_buys_accuracy_on_a_stream_with_outlier_channels():
    proto = decoder()
    calibration, held_out = _feeds(8), _feeds(6, seed=1)

    def sqnr(**kw) -> float:
        result = qcompile.compile(proto, calibration=calibration, **kw, **FAST)
        a = np.concatenate([_run(proto, f)[0].ravel() for f in held_out]).astype(np.float64)
        b = np.concatenate([_run(result.model, f)[0].ravel() for f in held_out])
        return float(10 * np.log10(a @ a / np.sum((a - b) ** 2)))

    off, on = sqnr(rotate=False, smoothquant=False), sqnr(rotate=True, smoothquant=False)
    assert on > off + 3.0, (off, on)


FAMILIES = ("llama", "mistral", "qwen2")
EXPORTS = ("torchscript.opset17", "dynamo.opset18")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("export", EXPORTS)
def test_real_decoder_exports_rotate_and_stay_fp32_exact(family, export):
    """Random-init transformers exports (benchmarks/corpus_torch.py), both torch
    exporters: the whole compile with --rotate, checked after every pass; the rotated FP32
    graph against the user's model."""
    model, feeds = corpus_model(f"{family}.{export}")
    result = qcompile.compile(
        model,
        calibration=feeds,
        rotate=True,
        verify_passes=True,
        progress=False,
        bench_runs=0,
        speed_guard=False,
    )
    assert any("rotated" in note and "not" not in note for note in result.report.notes)
    for feed in feeds[:2]:
        for a, b in zip(_run(model, feed), _run(result.fp32_model, feed), strict=True):
            scale = max(float(np.abs(a).max()), 1.0)
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * scale)
