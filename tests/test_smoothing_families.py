"""SmoothQuant beyond post-LN BERT: pre-LN (ViT, GPT-2), RMSNorm and gated MLPs (LLaMA),
FP32-exact on hand-built blocks and, when the model corpus is cached, on real exports."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import corpus_model
from onnx import TensorProto, helper, numpy_helper
from test_smoothing import _assert_same_outputs, _run, _smooth

import qcompile

DIM, HIDDEN = 32, 48


def _outlier_gamma(rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
    gamma[[3, 17]] = 20.0  # the outlier channels trained transformers have
    return gamma


def _w(rng, rows, cols):
    return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


def gpt2_block(seed: int = 0) -> onnx.ModelProto:
    """GPT-2's pre-LN attention input: LayerNorm → Reshape(tokens, C) → Gemm (Conv1D), and
    a Shape reading the LayerNorm output (as torch exports for the view sizes)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1, name="ln_1"),
        helper.make_node("Reshape", ["h", "flat"], ["h2"], name="view"),
        helper.make_node("Gemm", ["h2", "w_attn", "b_attn"], ["qkv"], name="c_attn"),
        helper.make_node("Shape", ["h"], ["h_shape"], name="shape"),
    ]
    inits = [
        numpy_helper.from_array(_outlier_gamma(rng), "g"),
        numpy_helper.from_array(rng.standard_normal(DIM).astype(np.float32) * 0.1, "b"),
        numpy_helper.from_array(np.array([-1, DIM], np.int64), "flat"),
        numpy_helper.from_array(_w(rng, DIM, 3 * DIM), "w_attn"),
        numpy_helper.from_array(rng.standard_normal(3 * DIM).astype(np.float32), "b_attn"),
    ]
    graph = helper.make_graph(
        nodes,
        "gpt2_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, DIM])],
        [
            helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [16, 3 * DIM]),
            helper.make_tensor_value_info("h_shape", TensorProto.INT64, [3]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def llama_mlp(seed: int = 0) -> onnx.ModelProto:
    """LLaMA's MLP as exporters write it: RMSNorm spelled out (x · 1/√(mean(x²)+ε) · γ),
    gate and up projections, SiLU(gate) ⊙ up, down projection."""
    rng = np.random.default_rng(seed)
    up = _w(rng, DIM, HIDDEN)
    up[:, [5, 40]] *= 25.0  # outlier channels in the product the down projection reads
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1, name="mean"),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
        helper.make_node("Reciprocal", ["rms"], ["inv"], name="recip"),
        helper.make_node("Mul", ["x", "inv"], ["normed"], name="normalize"),
        helper.make_node("Mul", ["gamma", "normed"], ["h"], name="rms_gamma"),
        helper.make_node("MatMul", ["h", "w_gate"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "w_up"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["gated"], name="gated"),
        helper.make_node("MatMul", ["gated", "w_down"], ["y"], name="down_proj"),
    ]
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(_outlier_gamma(rng), "gamma"),
        numpy_helper.from_array(_w(rng, DIM, HIDDEN), "w_gate"),
        numpy_helper.from_array(up, "w_up"),
        numpy_helper.from_array(_w(rng, HIDDEN, DIM), "w_down"),
    ]
    graph = helper.make_graph(
        nodes,
        "llama_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, DIM])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int = 4):
    return [
        {"x": np.random.default_rng(i).standard_normal((2, 8, DIM)).astype(np.float32)}
        for i in range(n)
    ]


def test_gpt2_smoothing_reaches_the_gemm_behind_a_reshape_and_folds_in_place():
    before, after, groups, p, records = _smooth(gpt2_block(), _feeds(), alpha=0.5)
    assert [(g.consumers, g.readers) for g in groups] == [(("c_attn",), ("view",))]
    assert records[0].modified
    # the Shape reader sees only the shape: no LayerNorm twin is needed
    assert sum(n.op_type == "LayerNormalization" for n in after.graph) == 1
    _assert_same_outputs(before, after, _feeds())


def test_llama_smoothing_folds_into_rms_gamma_and_the_up_projection():
    before, after, groups, p, records = _smooth(llama_mlp(), _feeds(), shift=False)
    by_activation = {g.activation: g for g in groups}
    assert by_activation["h"].producer == "rms_gamma"
    assert set(by_activation["h"].consumers) == {"gate_proj", "up_proj"}
    assert by_activation["gated"].producer == "gated"
    assert by_activation["gated"].consumers == ("down_proj",)
    # searched α (outliers present): both groups smoothed, no Mul inserted
    assert p.chosen["h"] > 0 and p.chosen["gated"] > 0
    assert [n.op_type for n in after.graph].count("Mul") == 4
    _assert_same_outputs(before, after, _feeds())


def test_smoothing_skips_groups_without_outlier_channels():
    """Random-init exports have no outlier channels; the search would still pick α = 0.9
    for a few percent of sample error and lose output SQNR on other data."""
    proto = llama_mlp()
    for init in proto.graph.initializer:
        if init.name == "gamma":
            init.CopyFrom(numpy_helper.from_array(np.ones(DIM, np.float32), "gamma"))
        if init.name == "w_up":
            w = _w(np.random.default_rng(9), DIM, HIDDEN)
            init.CopyFrom(numpy_helper.from_array(w, "w_up"))
    _, after, groups, p, records = _smooth(proto, _feeds(), shift=False)
    assert len(groups) == 2 and not records[0].modified
    assert p.chosen == {"h": 0.0, "gated": 0.0}


def test_smoothing_the_llama_mlp_gains_accuracy():
    calibration = _feeds(8)
    fast = {"progress": False, "bench_runs": 0, "speed_guard": False}
    on = qcompile.compile(llama_mlp(), calibration=calibration, **fast)
    off = qcompile.compile(llama_mlp(), calibration=calibration, smoothquant=False, **fast)
    assert on.report.outputs[0].sqnr_db > off.report.outputs[0].sqnr_db + 3.0


FAMILIES = ("vit", "gpt2", "llama", "distilbert")
EXPORTS = ("torchscript.opset17", "dynamo.opset18")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("export", EXPORTS)
def test_real_transformer_exports_stay_fp32_exact_after_smoothing(family, export):
    """Random-init exports from transformers (benchmarks/corpus_torch.py), both torch
    exporters: smoothed at a fixed α (their channels have no outliers, so a searched α
    would leave them alone), checked after every pass, and the smoothed FP32 graph run
    against the user's model."""
    model, feeds = corpus_model(f"{family}.{export}")
    result = qcompile.compile(
        model,
        calibration=feeds,
        smooth_alpha=0.5,
        verify_passes=True,
        progress=False,
        bench_runs=0,
        speed_guard=False,
    )
    smooth = [p for p in result.report.passes if p["name"] == "SmoothQuant"]
    assert smooth and smooth[0]["modified"]
    for feed in feeds[:2]:
        for a, b in zip(_run(model, feed), _run(result.fp32_model, feed), strict=True):
            scale = max(float(np.abs(a).max()), 1.0)
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * scale)
    assert isinstance(result.model, ir.Model)


def test_gated_fold_into_a_transposed_gemm_with_a_scalar_bias_keeps_outputs():
    """The up projection as a Gemm (transB = 1, a scalar C): 1/s scales its weight rows
    and turns the bias into a per-channel vector."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Gemm", ["x", "w_gate"], ["gate"], name="gate_proj"),
        helper.make_node("Gemm", ["x", "w_up", "c_up"], ["up"], transB=1, name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["up", "silu"], ["gated"], name="gated"),
        helper.make_node("MatMul", ["gated", "w_down"], ["y"], name="down_proj"),
    ]
    inits = [
        numpy_helper.from_array(_w(rng, DIM, HIDDEN), "w_gate"),
        numpy_helper.from_array(_w(rng, HIDDEN, DIM), "w_up"),  # [out, in]: transB
        numpy_helper.from_array(np.array(0.3, np.float32), "c_up"),
        numpy_helper.from_array(_w(rng, HIDDEN, DIM), "w_down"),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_glu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, DIM])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((16, DIM)).astype(np.float32)}
        for i in range(4)
    ]
    before, after, groups, p, records = _smooth(proto, feeds, alpha=0.5, shift=False)
    assert [g.producer for g in groups] == ["gated"] and records[0].modified
    _assert_same_outputs(before, after, feeds)
