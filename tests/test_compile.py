"""End-to-end compile of the small models: validity, placement, accuracy, exact qparams."""

import builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import qcompile
from qcompile.backends.ort import optimized_op_counts
from qcompile.numerics.qparams import QuantSpec, range_to_qparams
from tests.conftest import FAST

U8 = QuantSpec(bits=8, signed=False, symmetric=False)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model: onnx.ModelProto, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


CASES = {
    # name: (builder, data, min output SQNR in dB measured at ~41/31/27; thresholds leave margin)
    "cnn": (builders.cnn, lambda: {"input": builders.images(40, seed=3)}, 35.0),
    "mlp": (builders.mlp, lambda: {"input": builders.features(64, seed=3)}, 25.0),
    "transformer": (
        builders.transformer_block,
        lambda: {"input": builders.token_embeddings(40, seed=3)},
        22.0,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("target", ["cpu", "gpu", "fpga"])
def test_compiles_to_valid_accurate_model(name, target):
    build, data, min_sqnr = CASES[name]
    result = qcompile.compile(build(), target=target, calibration=data(), **FAST)
    proto = qcompile.ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    feed = {"input": data()["input"][:4]}
    assert np.all(np.isfinite(_run(proto, feed)[0]))
    margin = 3.0 if target == "fpga" else 0.0  # power-of-two scales cost a few dB
    assert result.report.min_output_sqnr_db > min_sqnr - margin
    assert result.report.outputs[0].cosine > 0.99
    # The FPGA target is integer-only: each requantization is ~17 small nodes (about 1.5 KB
    # of graph per layer), which on these tiny test models weighs as much as their weights;
    # the transformer's integer LayerNorm and Softmax add about 60 nodes each (105 KB of
    # 138 KB FP32 here: its weights alone are 30 KB as int8).
    ratio = 0.8 if target == "fpga" else 0.6
    assert result.report.size_quantized_bytes < ratio * result.report.size_fp32_bytes
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_cpu_placement_fuses_into_integer_kernels():
    result = qcompile.compile(builders.cnn(), calibration={"input": builders.images(20)}, **FAST)
    assert result.report.quantized_ops["Conv"] == 7
    counts = optimized_op_counts(result.model)
    # every Conv ran as QLinearConv, the residual Add and Concat as integer kernels
    assert counts.get("QLinearConv") == 7 and "Conv" not in counts
    assert counts.get("QLinearAdd") == 1 and counts.get("QLinearConcat") == 1
    assert counts.get("QGemm") == 1
    # Relu/Clip folded into output quantizers with zero point 0 (u8)
    assert {n.op_type for n in result.model.graph} & {"Relu", "Clip"} == set()


def test_gpu_keeps_activations_and_uses_symmetric_int8():
    result = qcompile.compile(
        builders.cnn(), target="gpu", calibration={"input": builders.images(20)}, **FAST
    )
    proto = qcompile.ir.to_proto(result.model)
    assert any(n.op_type == "Relu" for n in proto.graph.node)
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = _inits(proto)[n.input[2]]
            assert zp.dtype == np.int8 and np.all(zp == 0)


def test_transformer_matmuls_quantized_on_cpu():
    result = qcompile.compile(
        builders.transformer_block(), calibration={"input": builders.token_embeddings(20)}, **FAST
    )
    # 6 linear + attention·V; QK^T feeds the float Softmax, so it stays float
    assert result.report.quantized_ops["MatMul"] == 7
    assert "no integer kernel" in result.report.skipped_nodes["qk_matmul"]
    counts = optimized_op_counts(result.model)
    assert counts.get("QLinearMatMul", 0) + counts.get("MatMulIntegerToFloat", 0) >= 6


def test_softmax_only_quantized_when_asked():
    build = builders.transformer_block
    data = {"input": builders.token_embeddings(10)}
    off = qcompile.compile(build(), calibration=data, **FAST)
    on = qcompile.compile(build(), calibration=data, quantize_softmax=True, **FAST)
    assert "Softmax" not in off.report.quantized_ops
    assert on.report.quantized_ops.get("Softmax") == 1


@pytest.mark.parametrize(("reduce_range", "qmax"), [("off", 127), ("on", 63)])
def test_qparams_equal_numpy_minmax_over_calibration_feeds(reduce_range, qmax):
    """Scales/zero points in the output equal an independent numpy computation; weights
    use 7 bits with --reduce-range (x86 without VNNI)."""
    model = builders.mlp()
    feeds = [{"input": builders.features(16, seed=s)} for s in range(10)]
    result = qcompile.compile(
        model,
        calibration=feeds,
        calib_method="minmax",
        holdout_every=5,
        reduce_range=reduce_range,
        **FAST,
    )
    out = qcompile.ir.to_proto(result.model)
    inits = _inits(out)
    calib = [f for i, f in enumerate(feeds) if (i + 1) % 5]  # feeds 4 and 9 are held out
    # graph input
    x = np.concatenate([f["input"] for f in calib])
    ref = range_to_qparams(x.min(), x.max(), U8)
    assert inits["input_scale"] == pytest.approx(float(ref.scale), rel=1e-6)
    assert int(inits["input_zero_point"]) == int(ref.zero_point)
    # an intermediate (fc1's Relu output), from the onnx reference evaluator, not ORT
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(relu.output[0], onnx.TensorProto.FLOAT, None)
    )
    evaluator = ReferenceEvaluator(probe)
    h = np.concatenate([evaluator.run([relu.output[0]], f)[0] for f in calib])
    ref = range_to_qparams(h.min(), h.max(), U8)
    assert inits[f"{relu.output[0]}_scale"] == pytest.approx(float(ref.scale), rel=1e-5)
    assert int(inits[f"{relu.output[0]}_zero_point"]) == 0
    # fc1 weights: symmetric per output column, max|W|/qmax; bias int32 at s_x*s_w
    w_name = next(n for n in model.graph.node if n.op_type == "MatMul").input[1]
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w_name))
    scale = np.abs(w).max(axis=0) / qmax
    np.testing.assert_allclose(inits[f"{w_name}_scale"], scale, rtol=1e-6)
    np.testing.assert_array_equal(
        inits[f"{w_name}_quantized"], np.clip(np.rint(w / scale), -qmax, qmax)
    )


def test_gemm_bias_is_int32_at_product_scale():
    model = builders.mlp()
    feeds = {"input": builders.features(64, seed=2)}
    result = qcompile.compile(model, calibration=feeds, **FAST)
    out = qcompile.ir.to_proto(result.model)
    inits = _inits(out)
    gemm = next(n for n in out.graph.node if n.name == "fc2")
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    bias_dq, w_dq, x_dq = dq[gemm.input[2]], dq[gemm.input[1]], dq[gemm.input[0]]
    q_bias = inits[bias_dq.input[0]]
    assert q_bias.dtype == np.int32
    np.testing.assert_allclose(
        inits[bias_dq.input[1]], inits[x_dq.input[1]] * inits[w_dq.input[1]], rtol=1e-6
    )
    orig = next(n for n in model.graph.node if n.op_type == "Gemm")
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == orig.input[2]))
    np.testing.assert_array_equal(q_bias, np.rint(b / inits[bias_dq.input[1]]).astype(np.int32))


def test_exclusion_by_name_op_and_regex():
    data = {"input": builders.images(10)}
    by_op = qcompile.compile(builders.cnn(), calibration=data, exclude=["op:Concat"], **FAST)
    assert "Concat" not in by_op.report.quantized_ops
    assert by_op.report.skipped_nodes["concat"] == "excluded by option"
    by_name = qcompile.compile(builders.cnn(), calibration=data, exclude=["stem_conv"], **FAST)
    assert by_name.report.quantized_ops["Conv"] == 6
    by_re = qcompile.compile(builders.cnn(), calibration=data, exclude=["re:branch_.*"], **FAST)
    assert by_re.report.quantized_ops["Conv"] == 4


def test_override_per_tensor_weights_and_method():
    data = {"input": builders.images(10)}
    result = qcompile.compile(
        builders.cnn(),
        calibration=data,
        overrides=["head_conv:per_channel=false,calib_method=minmax"],
        **FAST,
    )
    out = qcompile.ir.to_proto(result.model)
    conv = next(n for n in out.graph.node if n.name == "head_conv")
    w_dq = next(n for n in out.graph.node if n.output[0] == conv.input[1])
    assert _inits(out)[w_dq.input[1]].ndim == 0


def test_auto_method_keeps_the_best_scoring_method():
    """auto scores mse, percentile and minmax on the calibration feeds and keeps the best;
    the result is the model that method compiles to on its own."""
    model = builders.cnn()
    feeds = [{"input": builders.images(4, seed=s)} for s in range(6)]
    auto = qcompile.compile(model, calibration=feeds, calib_method="auto", **FAST)
    scores = auto.report.calib_method_scores
    assert set(scores) == {"mse", "percentile", "minmax"}
    assert auto.report.calib_method == max(scores, key=scores.get)
    assert len(set(scores.values())) > 1  # the methods differ here, so the choice matters
    alone = qcompile.compile(
        model,
        calibration=feeds,
        calib_method=auto.report.calib_method,
        disabled_passes=auto.options.disabled_passes,  # auto's CLE choice
        **FAST,
    )
    a, b = _inits(qcompile.ir.to_proto(auto.model)), _inits(qcompile.ir.to_proto(alone.model))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_auto_also_chooses_cross_layer_equalization(tmp_path):
    """auto compiles with and without CLE and keeps the better calibration-feed score; the
    written model is the kept one, and equals compiling with those settings directly."""
    model = builders.cnn()
    feeds = [{"input": builders.images(4, seed=s)} for s in range(6)]
    out = tmp_path / "auto.onnx"
    auto = qcompile.compile(model, calibration=feeds, calib_method="auto", output=out, **FAST)
    note = next(n for n in auto.report.notes if n.startswith("cross-layer equalization"))
    kept = "kept" in note
    ran = {p["name"] for p in auto.report.passes if p["modified"]}
    assert ("CrossLayerEqualization" in ran) == kept
    direct = qcompile.compile(
        model,
        calibration=feeds,
        calib_method=auto.report.calib_method,
        disabled_passes=() if kept else ("CrossLayerEqualization",),
        **FAST,
    )
    a, b = _inits(onnx.load(out)), _inits(qcompile.ir.to_proto(direct.model))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_report_has_tensor_and_output_metrics(cnn_path, cnn_calib, tmp_path):
    result = qcompile.compile(
        cnn_path,
        calibration=cnn_calib,
        progress=False,
        bench_runs=3,
        speed_guard=False,  # a guarded tiny CNN may come back FP32, with no tensors
        output=tmp_path / "q.onnx",
    )
    report = result.report
    assert report.tensors and all(t.sqnr_db > 15 for t in report.tensors)
    assert report.latency_fp32_ms > 0 and report.latency_quantized_ms > 0
    assert report.calib_batches >= 1 and report.holdout_batches >= 1
    # the compile-time split: ORT, observers and the rest are measured, not inferred
    assert report.ort_run_seconds > 0 and report.observer_seconds > 0
    assert 0 < report.qcompile_seconds < report.compile_seconds
    assert (tmp_path / "q.onnx").exists()
    data = report.to_dict()
    assert data["speedup"] > 0 and data["outputs"][0]["name"] == "logits"


def _detector_head(seed: int = 0) -> onnx.ModelProto:
    """A YOLO-style output: box coordinates (hundreds of pixels) and sigmoid class scores
    concatenated per anchor, then transposed to (N, 4 + 3, anchors)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w_box = numpy_helper.from_array(rng.normal(0, 20, (8, 4)).astype(np.float32), "w_box")
    w_cls = numpy_helper.from_array(rng.normal(0, 1, (8, 3)).astype(np.float32), "w_cls")
    nodes = [
        helper.make_node("MatMul", ["x", "w_box"], ["box"], name="box"),
        helper.make_node("MatMul", ["x", "w_cls"], ["logit"], name="cls"),
        helper.make_node("Sigmoid", ["logit"], ["score"], name="sig"),
        helper.make_node("Concat", ["box", "score"], ["cat"], axis=2, name="cat"),
        helper.make_node("Transpose", ["cat"], ["out"], perm=[0, 2, 1], name="t"),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 7, 16])],
        [w_box, w_cls],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_report_splits_a_concatenated_output_into_its_branches():
    rng = np.random.default_rng(1)
    calib = {"x": rng.normal(0, 1, (32, 16, 8)).astype(np.float32)}
    result = qcompile.compile(_detector_head(), calibration=calib, **FAST)
    (out,) = result.report.outputs
    groups = {(g.source, g.axis, g.start, g.stop): g.sqnr_db for g in out.groups}
    assert set(groups) == {("box", 1, 0, 4), ("score", 1, 4, 7)}
    # the whole output's SQNR is the boxes': the scores' own number differs from it
    assert out.sqnr_db == pytest.approx(groups[("box", 1, 0, 4)], abs=0.5)
    assert abs(groups[("score", 1, 4, 7)] - out.sqnr_db) > 1.0
    assert result.report.to_dict()["outputs"][0]["groups"][1]["source"] == "score"


def test_attention_mask_sentinels_keep_their_nodes_float():
    """Exported BERTs add finfo.min where the mask is 0: that Add must stay FP32."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 8)) / 3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"], name="qk"),
            helper.make_node("Equal", ["mask", "zero"], ["is_pad"], name="eq"),
            helper.make_node("Where", ["is_pad", "neg", "zerof"], ["bias"], name="where"),
            helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask_add"),
            helper.make_node("Relu", ["masked"], ["probs"], name="relu"),
            helper.make_node("MatMul", ["probs", "w"], ["y"], name="av"),
        ],
        "masked",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "neg"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zerof"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [
        {
            "x": rng.standard_normal((4, 8)).astype(np.float32),
            "mask": (rng.random((4, 8)) > 0.3).astype(np.int64),
        }
        for _ in range(6)
    ]
    result = qcompile.compile(model, calibration=feeds, **FAST)
    assert "mask_add" not in result.plan.nodes
    assert "Inf/NaN or mask sentinels" in result.report.skipped_nodes["mask_add"]
    assert result.report.quantized_ops.get("MatMul") == 2
    assert result.report.min_output_sqnr_db > 25
    assert "relu" not in result.plan.fused_activations  # its producer stayed float


def test_embedding_tables_become_int8_rows():
    """A BERT-like embedding Gather is stored int8 and dequantized after gathering."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((1000, 32)).astype(np.float32) * rng.uniform(
        0.1, 2, (1000, 1)
    ).astype(np.float32)
    w = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed", axis=0),
            helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj"),
        ],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 32])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"ids": rng.integers(0, 1000, (4, 8)).astype(np.int64)} for _ in range(6)]
    result = qcompile.compile(model, calibration=feeds, **FAST)
    proto = qcompile.ir.to_proto(result.model)
    inits = _inits(proto)
    assert inits["table_quantized"].dtype == np.int8 and "table" not in inits
    np.testing.assert_allclose(inits["table_row_scale"], np.abs(table).max(axis=1) / 127, rtol=1e-6)
    assert result.report.size_quantized_bytes < 0.35 * result.report.size_fp32_bytes
    assert result.report.min_output_sqnr_db > 30
    # the gathered rows equal numpy's int8 dequantization exactly
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, None)
    )
    ids = feeds[0]["ids"]
    got = _run(probe, {"ids": ids})[1]
    expect = (
        inits["table_quantized"][ids].astype(np.float32) * inits["table_row_scale"][ids][..., None]
    )
    np.testing.assert_array_equal(got, expect)


def test_gpu_target_says_where_it_was_measured():
    import onnxruntime as ort

    result = qcompile.compile(
        builders.mlp(), target="gpu", calibration={"input": builders.features(32)}, **FAST
    )
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT EP present: measured on it")
    assert any("TensorrtExecutionProvider is not available" in n for n in result.report.notes)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_decoder_ops_quantize_and_run(target):
    """ConvTranspose, Resize (shares its input's scale), AveragePool and Add quantize; ORT runs it."""
    data = {"input": builders.images(24, size=16, seed=7)}
    result = qcompile.compile(builders.decoder(), target=target, calibration=data, **FAST)
    ops = result.report.quantized_ops
    assert ops["ConvTranspose"] == 1 and ops["Conv"] == 2 and ops["Add"] == 1
    assert ops.get("Resize") == 1 and ops.get("AveragePool") == 1
    proto = qcompile.ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert result.report.min_output_sqnr_db > 25
    if target == "cpu":
        inits = _inits(proto)
        scales = {
            n.input[0]: inits[n.input[1]] for n in proto.graph.node if n.op_type == "QuantizeLinear"
        }
        resize = next(n for n in proto.graph.node if n.op_type == "Resize")
        resize_in = next(n for n in proto.graph.node if n.output[0] == resize.input[0]).input[0]
        pool_out = next(n for n in proto.graph.node if n.name == "pool").output[0]
        # data movement shares its input's parameters, so ORT can drop the Q/DQ pair
        assert (
            scales[resize.output[0]]
            == scales[pool_out]
            == inits[next(n for n in proto.graph.node if n.output[0] == resize.input[0]).input[1]]
        )
        assert resize_in


def test_report_fields_are_documented_and_record_the_options():
    """docs/report.md lists every field of the JSON report; the report carries its schema
    version and the options the compile used."""
    import json
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "report.md").read_text()
    result = qcompile.compile(
        builders.mlp(), calibration={"input": builders.features(20)}, exclude="fc2", **FAST
    )
    data = json.loads(result.report.to_json())
    missing = [k for k in data if f"`{k}`" not in doc]
    assert not missing, f"report fields not in docs/report.md: {missing}"
    assert data["schema_version"] == 2
    assert data["options"]["exclude"] == ["fc2"] and data["options"]["calib_method"] == "mse"
