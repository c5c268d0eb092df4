"""Integer LayerNorm, Softmax, isqrt and a runtime-sized GlobalAveragePool
(qcompile/lower/integer_reductions.py): exact where they claim to be, ORT = reference."""

from __future__ import annotations

import math

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import FAST

import qcompile
from qcompile.backends.reference import run_reference
from qcompile.lower.integer_parts import _Emitter, float_ops_between
from qcompile.lower.integer_reductions import isqrt


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _isqrt_model(bits: int) -> onnx.ModelProto:
    v = ir.Value(name="v", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["N", 1]))
    sink = ir.node("Identity", [v], name="sink")
    graph = ir.Graph([v], sink.outputs, nodes=[sink], opset_imports={"": 17}, name="isqrt")
    root = isqrt(_Emitter(graph, sink, "isqrt", set(), {}), v, bits)
    sink.replace_input_with(0, root)
    sink.outputs[0].name, sink.outputs[0].dtype = "root", ir.DataType.INT64
    return ir.to_proto(ir.Model(graph, ir_version=8))


def test_isqrt_is_floor_sqrt_for_every_magnitude():
    rng = np.random.default_rng(0)
    values = {1, 2, 3, 4, 8, 15, 16, 17, 2**62 - 1, 2**61, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1}
    for k in range(1, 62):  # around every power of two and every square near it
        values |= {2**k - 1, 2**k, 2**k + 1}
        r = math.isqrt(2**k)
        values |= {r * r - 1, r * r, r * r + 1, (r + 1) ** 2 - 1}
    values |= {int(x) for x in rng.integers(1, 2**62, 2000)}
    values |= {int(x) for x in rng.integers(1, 2**20, 2000)}
    v = np.array(sorted(x for x in values if 1 <= x < 2**62), np.int64).reshape(-1, 1)
    proto = _isqrt_model(62)
    got = _session(proto).run(None, {"v": v})[0].ravel()
    want = np.array([math.isqrt(int(x)) for x in v.ravel()], np.int64)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(run_reference(proto, {"v": v[:200]})[0].ravel(), want[:200])


@pytest.mark.parametrize("divide", [False, True])
def test_transformer_block_is_integer_from_input_to_output(divide):
    # LayerNorm on the int32 residual sum, Softmax and GELU all in integers (the first
    # LayerNorm reads the float model input, before the input quantizer): no island,
    # ORT = reference with ORT's QDQ fusions on, as accurate as the QDQ graph with those
    # ops in float; scores / √d (a Div, as MPNet and DeBERTa write it) as well as · 1/√d
    feeds = [{"input": builders.token_embeddings(4, seed=i)} for i in range(10)]
    result = qcompile.compile(
        builders.transformer_block(divide=divide), target="fpga", calibration=feeds, **FAST
    )
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    ops = result.report.integer_ops
    assert ops["LayerNormalization"] == 1 and ops["Softmax"] == 1 and ops["requantize"] >= 1
    assert ops["Gelu"] == 1  # x/√2 is still a Div when the GELU fusion reads it
    proto = ir.to_proto(result.model)
    sess = _session(proto)
    for feed in feeds[:3]:
        np.testing.assert_array_equal(sess.run(None, feed)[0], run_reference(proto, feed)[0])
    qdq = qcompile.compile(
        builders.transformer_block(divide=divide), target="fpga", calibration=feeds,
        disabled_passes=("LowerToIntegerOnly",), **FAST,
    )  # fmt: skip
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 1.0


@pytest.mark.parametrize("spread", [0.5, 3.0, 15.0, 1e6])
def test_integer_softmax_tracks_the_float_one(spread):
    # attention scores (an int32 accumulator) of four spreads: the integer softmax is
    # within one output step of the QDQ graph's float Softmax of the same scores (1e6:
    # one score step moves exp by far more than 2**-64, a factor past int32's dyadic)
    rng = np.random.default_rng(1)
    x = rng.normal(0, spread, (32, 24, 16)).astype(np.float32) / 4
    feeds = [{"x": x[i : i + 4]} for i in range(0, 32, 4)]
    result = qcompile.compile(_attention_model(24), target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == [] and result.report.integer_ops["Softmax"] == 1
    qdq = qcompile.compile(
        _attention_model(24), target="fpga", calibration=feeds,
        disabled_passes=("LowerToIntegerOnly",), **FAST,
    )  # fmt: skip
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")  # float Softmax
    float_softmax = ort.InferenceSession(
        ir.to_proto(qdq.model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    proto = ir.to_proto(result.model)
    got = _session(proto).run(None, {"x": x})[1]  # the probabilities, dequantized
    want = float_softmax.run(None, {"x": x})[1]
    step = float(np.min(np.diff(np.unique(want))))  # the probabilities' quantization step
    assert np.max(np.abs(got - want)) <= step * 1.01
    assert np.mean(got != want) < 0.01  # and nearly always the same integers
    np.testing.assert_array_equal(got, run_reference(proto, {"x": x})[1])


def _attention_model(tokens: int, dim: int = 16) -> onnx.ModelProto:
    """softmax(x·xᵀ)·x (activation × activation MatMuls on both sides, as in attention),
    and the probabilities themselves through an identity MatMul (exact in integers)."""
    from onnx import TensorProto, helper, numpy_helper

    eye = numpy_helper.from_array(np.eye(tokens, dtype=np.float32), "eye")
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="keys"),
        helper.make_node("MatMul", ["x", "xt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "x"], ["y"], name="context"),
        helper.make_node("MatMul", ["probs", "eye"], ["probs_out"], name="probs_copy"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", tokens, dim])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", tokens, dim])
    probs = helper.make_tensor_value_info("probs_out", TensorProto.FLOAT, ["B", tokens, tokens])
    graph = helper.make_graph(nodes, "attention", [x], [y, probs], initializer=[eye])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_global_average_pool_of_a_runtime_size_divides_at_run_time():
    model = builders.cnn(size=32)
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "S"  # spatial size known only at run time
    feeds = [{"input": builders.images(4, 32, seed=i)} for i in range(6)]
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.integer_ops["GlobalAveragePool"] == 1
    assert float_ops_between(result.model.graph) == []
    proto = ir.to_proto(result.model)
    assert any(n.op_type == "ReduceProd" for n in proto.graph.node)  # the count, at run time
    sess = _session(proto)
    for size in (32, 40):  # another size than calibrated: the divisor follows it
        feed = {"input": builders.images(2, size, seed=9)}
        np.testing.assert_array_equal(sess.run(None, feed)[0], run_reference(proto, feed)[0])


def _reduce_mean_model(opset: int, reshape: bool = False) -> onnx.ModelProto:
    """Conv → ReduceMean over H, W without keepdims (shufflenet's global pool) → MatMul;
    `reshape`: keepdims and a Reshape to [N, C] in between (torch's dynamo exporter)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "fc")
    inits = [w, fc]
    keep = int(reshape)
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
        mean = helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=keep, name="pool")
    else:
        mean = helper.make_node(
            "ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=keep, name="pool"
        )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        mean,
    ]
    if reshape:
        inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
        nodes.append(helper.make_node("Reshape", ["m", "flat"], ["m2"], name="flatten"))
    nodes.append(
        helper.make_node("MatMul", ["m2" if reshape else "m", "fc"], ["logits"], name="fc")
    )
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(nodes, "reduce_mean", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, reshape", [(17, False), (18, False), (18, True)])
def test_reduce_mean_as_global_pooling_is_integer(opset, reshape):
    feeds = [{"input": builders.images(4, 16, seed=i)} for i in range(6)]
    model = _reduce_mean_model(opset, reshape)
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.integer_ops["ReduceMean"] == 1 and result.report.float_islands == []
    proto = ir.to_proto(result.model)
    sess = _session(proto)
    for size in (16, 20):  # sized at run time: the divisor follows the input
        feed = {"input": builders.images(2, size, seed=7)}
        np.testing.assert_array_equal(sess.run(None, feed)[0], run_reference(proto, feed)[0])
    qdq = qcompile.compile(
        model, target="fpga", calibration=feeds, disabled_passes=("LowerToIntegerOnly",), **FAST
    )
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 1.0


def _masked_attention_with_class_token(
    tokens: int = 12, dim: int = 16, causal: bool | str = False
) -> onnx.ModelProto:
    """A ViT/BERT-like head: a constant class token Expanded to the batch and concatenated
    with projected tokens, attention scores masked by Where(mask, scores, −3.4e38) (the
    plan keeps the mask float: the Softmax reads it into its integer form). `causal`:
    GPT-Neo's form instead, a constant causal Where, then the padding mask added as
    Where(mask, 0, −3.4e38); "bias": T5's, a position bias computed from the sequence
    length added through Where(mask, bias, −3.4e38)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (dim, dim)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 1, (1, 1, dim)).astype(np.float32), "cls"),
        numpy_helper.from_array(np.array([1, dim], np.int64), "cls_tail"),
        numpy_helper.from_array(np.array([-3.4e38], np.float32), "sentinel"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Shape", ["x"], ["x_shape"], end=1, name="batch"),
        helper.make_node("Concat", ["x_shape", "cls_tail"], ["cls_shape"], axis=0),
        helper.make_node("Expand", ["cls", "cls_shape"], ["cls_b"], name="cls_expand"),
        helper.make_node("Concat", ["cls_b", "h"], ["seq"], axis=1, name="with_cls"),
        helper.make_node("Transpose", ["seq"], ["seq_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["seq", "seq_t"], ["scores"], name="scores"),
        helper.make_node("Where", ["mask", "scores", "sentinel"], ["masked"], name="mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
    ]
    if causal == "bias":  # T5: scores + Where(mask, B, sentinel), B from shapes alone
        inits += [
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(0, np.int64), "start"),
            numpy_helper.from_array(np.array(1, np.int64), "step"),
            numpy_helper.from_array(np.float32(0.25), "slope"),
        ]
        nodes[-2:-1] = [
            helper.make_node("Shape", ["seq"], ["seq_shape"]),
            helper.make_node("Gather", ["seq_shape", "axis1"], ["n1"], axis=0),
            helper.make_node("Squeeze", ["n1"], ["n"]),
            helper.make_node("Range", ["start", "n", "step"], ["positions"]),
            helper.make_node("Cast", ["positions"], ["pos_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["pos_f", "slope"], ["bias"]),
            helper.make_node("Where", ["mask", "bias", "sentinel"], ["biased"], name="pad"),
            helper.make_node("Add", ["scores", "biased"], ["masked"], name="mask"),
        ]
    elif causal:
        lower = np.tril(np.ones((tokens + 1, tokens + 1), bool))
        inits += [
            numpy_helper.from_array(lower, "causal"),
            numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        ]
        nodes[-2:-1] = [
            helper.make_node("Where", ["causal", "scores", "sentinel"], ["c"], name="causal"),
            helper.make_node("Where", ["mask", "zero", "sentinel"], ["additive"], name="pad"),
            helper.make_node("Add", ["c", "additive"], ["masked"], name="mask"),
        ]
    nodes += [
        helper.make_node("MatMul", ["probs", "seq"], ["y"], name="context"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", tokens, dim])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 1, tokens + 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", tokens + 1, dim])
    graph = helper.make_graph(nodes, "masked", [x, mask], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "causal", [False, True, "bias"], ids=["padding-mask", "causal-then-padding", "t5-bias"]
)
def test_mask_where_and_class_token_expand_are_integer(causal):
    def feed(seed: int) -> dict:
        r = np.random.default_rng(seed)
        keep = np.arange(13)[None, None, :] < r.integers(6, 14, (4, 1, 1))  # padded tails
        return {"x": r.normal(0, 1, (4, 12, 16)).astype(np.float32), "mask": keep}

    feeds = [feed(i) for i in range(8)]
    model = _masked_attention_with_class_token(causal=causal)
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    ops = result.report.integer_ops  # the mask Where is read into the integer Softmax
    assert ops["Softmax"] == 1 and ops["Expand"] == 1
    proto = ir.to_proto(result.model)
    sess = _session(proto)
    for f in (feed(20), feed(21)):
        np.testing.assert_array_equal(sess.run(None, f)[0], run_reference(proto, f)[0])
    qdq = qcompile.compile(
        model, target="fpga", calibration=feeds, disabled_passes=("LowerToIntegerOnly",), **FAST
    )
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 1.0


def _pool_mixer(norm: bool) -> onnx.ModelProto:
    """PoolFormer's token mixer: Conv → [GroupNorm(1) as Reshape → InstanceNorm → Reshape
    → · γ + β per channel] → AveragePool(3, pads 1, count_include_pad=0) − x → Conv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0, 1, -1], np.int64), "grouped"),
        numpy_helper.from_array(np.array([0, 8, 12, 12], np.int64), "back"),
        numpy_helper.from_array(np.ones(1, np.float32), "one"),
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 1, 1)).astype(np.float32), "beta"),
    ]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv")]
    x = "c"
    if norm:
        nodes += [
            helper.make_node("Reshape", ["c", "grouped"], ["g"]),
            helper.make_node("InstanceNormalization", ["g", "one", "zero"], ["gn"], name="norm"),
            helper.make_node("Reshape", ["gn", "back"], ["r"]),
            helper.make_node("Mul", ["r", "gamma"], ["rg"]),  # GroupNorm's per-channel affine
            helper.make_node("Add", ["rg", "beta"], ["n"]),
        ]
        x = "n"
    nodes += [
        helper.make_node(
            "AveragePool",
            [x],
            ["p"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=0,
            name="pool",
        ),  # fmt: skip
        helper.make_node("Sub", ["p", x], ["mixed"], name="mix"),
        helper.make_node("Conv", ["mixed", "w2"], ["output"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "pool_mixer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 12, 12])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("norm", [False, True])
def test_poolformer_mixer_is_integer(norm):
    # AveragePool excluding padding divides each border window by its own count, the Sub
    # is an integer difference, GroupNorm(1)'s InstanceNorm the integer LayerNorm
    rng = np.random.default_rng(1)
    feeds = [{"input": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)} for _ in range(6)]
    model = _pool_mixer(norm)
    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    ops = result.report.integer_ops
    assert ops["AveragePool"] == 1 and ops["Sub"] == 1
    assert ops.get("InstanceNormalization", 0) == int(norm)
    proto = ir.to_proto(result.model)
    np.testing.assert_array_equal(_session(proto).run(None, feeds[0])[0],
                                  run_reference(proto, feeds[0])[0])  # fmt: skip
    qdq = qcompile.compile(
        model, target="fpga", calibration=feeds, disabled_passes=("LowerToIntegerOnly",), **FAST
    )
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - 1.0
