"""Fusion rules: op types after the rewrite, FP32-equal outputs, checker, idempotence."""

import collections

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.ir import load_model
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.fusion import DivideByConstant, FuseForQuantization
from qcompile.passes.manager import run_phase
from tests.conftest import FAST


def _run(model, feed):
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feed
    )


def _fused(proto):
    model, _ = run_phase(load_model(proto), "rewrite", [*canonicalize(), FuseForQuantization()])
    return model


def test_hardswish_and_conv_bias_fusion():
    proto = builders.mobile_block()
    model = _fused(proto)
    ops = collections.Counter(n.op_type for n in model.graph)
    # x·clip(x+3,0,6)/6 became (x·clip(x+3,0,6))·(1/6): no Div; the SE keeps its HardSigmoid
    assert ops["Div"] == 0 and ops["Clip"] == 2 and ops["HardSigmoid"] == 1
    # every Conv absorbed its bias Add; 2 HardSwish Adds and the residual Add remain
    assert ops["Conv"] == 5 and ops["Add"] == 3 and ops["Mul"] == 5
    assert all(len(n.inputs) == 3 for n in model.graph if n.op_type == "Conv")
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feed = {"input": builders.images(2, size=24, seed=3)}
    for a, b in zip(_run(proto, feed), _run(model, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    names = {n.name for n in model.graph if n.op_type == "Conv"}
    assert {"stem", "dw", "se_reduce", "se_expand", "project"} == names


def test_fusion_is_idempotent():
    model = _fused(builders.mobile_block())
    _, records = run_phase(model, "again", [FuseForQuantization()])
    assert records[0].modified is False


def test_hardswish_op_is_expanded_to_integer_friendly_form():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("HardSwish", ["x"], ["y"], name="hs")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = _fused(proto)
    assert sorted(n.op_type for n in model.graph) == ["Add", "Clip", "Mul", "Mul"]
    feed = {"x": np.linspace(-5, 5, 32, dtype=np.float32).reshape(4, 8)}
    np.testing.assert_allclose(_run(model, feed)[0], _run(proto, feed)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_mobile_block_quantizes_accurately(target):
    data = {"input": builders.images(30, size=24, seed=4)}
    result = qcompile.compile(builders.mobile_block(), target=target, calibration=data, **FAST)
    assert result.report.quantized_ops["Conv"] == 5
    assert result.report.min_output_sqnr_db > 25


def test_decomposed_layernorm_and_matmul_add_fuse():
    proto = builders.decomposed_layernorm()
    model = _fused(proto)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops == {"LayerNormalization": 1, "Gemm": 1}, ops
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feed = {"input": builders.features(8, dim=32, seed=2)}
    np.testing.assert_allclose(_run(model, feed)[0], _run(proto, feed)[0], rtol=1e-4, atol=1e-4)
    result = qcompile.compile(proto, calibration={"input": builders.features(40, dim=32)}, **FAST)
    assert result.report.quantized_ops == {"Gemm": 1}
    assert result.report.min_output_sqnr_db > 18  # measured 21.6 dB


def test_hardswish_runs_on_integer_kernels_with_the_scale_folded():
    """No float op is left for HardSwish: QLinearAdd (its quantizer clamps to [0, 6]) and
    QLinearMul, and the 1/6 lives in the next dequantizer's scale."""
    from qcompile.backends.ort import float_islands, optimized_op_counts

    data = {"input": builders.images(30, size=24, seed=4)}
    result = qcompile.compile(builders.mobile_block(), calibration=data, **FAST)
    plan = result.plan
    assert len(plan.aliases) == 2 and all(abs(k - 1 / 6) < 1e-7 for _, k in plan.aliases.values())
    proto = ir.to_proto(result.model)
    assert not any(n.op_type in ("Clip", "Div", "HardSwish") for n in proto.graph.node)
    counts = optimized_op_counts(result.model)
    assert counts.get("QLinearAdd", 0) >= 2 and counts.get("QLinearMul", 0) >= 2
    assert "Mul" not in float_islands(result.model)
    # an alias's dequantizer scale is exactly 1/6 of its source's
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for alias, (source, k) in plan.aliases.items():
        assert inits[f"{alias}_scale"] == pytest.approx(inits[f"{source}_scale"] * k, rel=1e-6)
    assert result.report.min_output_sqnr_db > 25


def _gelu_graph(form: str, opset: int) -> onnx.ModelProto:
    """x → MatMul → GELU written out with Erf in one exporter's association."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    consts = {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5, "three": 3.0}
    consts |= {"c": 0.044715, "k": np.sqrt(2.0 / np.pi)}
    inits = [numpy_helper.from_array(np.float32(v), k) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype("f"), "w"))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["f"])]
    if form.startswith("tanh"):  # GPT-2's gelu_new: √(2/π)·(x + 0.044715·x³) into tanh
        nodes += [
            helper.make_node("Pow", ["f", "three"], ["cube"]),
            helper.make_node("Mul", ["cube", "c"], ["cc"]),
            helper.make_node("Add", ["f", "cc"], ["inner"]),
            helper.make_node("Mul", ["inner", "k"], ["d"]),
            helper.make_node("Tanh", ["d"], ["e"]),
        ]
    else:
        nodes += [
            helper.make_node("Div", ["f", "sqrt2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
        ]
    nodes.append(helper.make_node("Add", ["e", "one"], ["a"]))
    form = form.removeprefix("tanh_")
    if form == "half_last":  # torchscript: (x * (1 + erf)) * 0.5
        nodes += [helper.make_node("Mul", ["f", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]  # fmt: skip
    elif form == "half_first":  # (x * 0.5) * (1 + erf)
        nodes += [helper.make_node("Mul", ["f", "half"], ["m"]), helper.make_node("Mul", ["m", "a"], ["y"])]  # fmt: skip
    else:  # dynamo: x * (0.5 * (1 + erf))
        nodes += [helper.make_node("Mul", ["half", "a"], ["m"]), helper.make_node("Mul", ["f", "m"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(
    "form",
    [
        "half_last",
        "half_first",
        "half_inner",
        "tanh_half_first",
        "tanh_half_last",
        "tanh_half_inner",
    ],
)
@pytest.mark.parametrize("opset", [18, 20])
def test_gelu_fuses_in_every_exporter_association(form, opset):
    proto = _gelu_graph(form, opset)
    model = _fused(proto)
    tanh = form.startswith("tanh")
    op = ("FastGelu" if tanh else "Gelu") if opset < 20 else "Gelu"
    gelus = [n for n in model.graph if n.op_type == op]
    assert len(gelus) == 1 and not any(n.op_type in ("Erf", "Tanh") for n in model.graph)
    assert gelus[0].domain == ("com.microsoft" if opset < 20 else "")
    if opset >= 20:
        assert gelus[0].attributes.get_string("approximate", "none") == ("tanh" if tanh else "none")
    feed = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(model, feed)[0], _run(proto, feed)[0], rtol=1e-5, atol=1e-5)


def test_all_true_mask_where_becomes_a_moved_constant():
    """Where(Expand(all-true, [N, 1, 6, 6]), 0, −max) + scores, as torch's dynamo
    exporter writes a ViT's attention mask: no Where and no sentinel left, same values."""
    from onnx import TensorProto, helper

    inits = [
        numpy_helper.from_array(np.ones((1, 1, 6, 1), bool), "all_true"),
        numpy_helper.from_array(np.array([1, 6, 6], np.int64), "tail"),
        numpy_helper.from_array(np.float32(0.0), "zero"),
        numpy_helper.from_array(np.float32(np.finfo(np.float32).min), "lowest"),
    ]
    nodes = [
        helper.make_node("Shape", ["scores"], ["batch"], start=0, end=1),
        helper.make_node("Concat", ["batch", "tail"], ["shape"], axis=0),
        helper.make_node("Expand", ["all_true", "shape"], ["cond"]),
        helper.make_node("Where", ["cond", "zero", "lowest"], ["mask"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mask",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = _fused(proto)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["Where"] == 0 and ops["Expand"] == 1
    feed = {"scores": np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype("f")}
    np.testing.assert_array_equal(_run(model, feed)[0], _run(proto, feed)[0])


@pytest.mark.parametrize("opset", [18, 20])
def test_tanh_gelu_is_an_integer_table(opset):
    """MatMul → tanh-GELU → MatMul for fpga: the fused FastGelu (contrib, below opset 20)
    or Gelu(approximate=tanh) becomes a lookup table, ORT = reference."""
    from onnx import TensorProto, helper

    from qcompile.backends.reference import run_reference

    proto = _gelu_graph("tanh_half_first", opset)
    w2 = numpy_helper.from_array(np.random.default_rng(2).standard_normal((8, 4)).astype("f"), "w2")
    proto.graph.initializer.append(w2)
    proto.graph.node.append(helper.make_node("MatMul", ["y", "w2"], ["z"]))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4]))
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(6)]
    result = qcompile.compile(proto, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert not any("Gelu" in n.op_type for n in result.model.graph)
    q = ir.to_proto(result.model)
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, feeds[0])[0], run_reference(q, feeds[0])[0])
    assert result.report.min_output_sqnr_db > 20.0


def _divided(proto):
    model, _ = run_phase(_fused(proto), "rewrite", [DivideByConstant()])
    return model


def test_division_by_a_scalar_constant_becomes_a_multiplication():
    # x / 4 → x · 0.25 (exact), x / 3 → x · (1/3) (one rounding); a tensor or zero
    # divisor is left alone
    def graph(divisor: np.ndarray) -> onnx.ModelProto:
        nodes = [helper.make_node("Div", ["x", "c"], ["y"], name="scale")]
        g = helper.make_graph(
            nodes, "div", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
            [numpy_helper.from_array(divisor, "c")],
        )  # fmt: skip
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    feed = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    for divisor, exact in ((4.0, True), (3.0, False)):
        proto = graph(np.float32(divisor))
        model, _ = _divided(proto), None
        assert [(n.op_type, n.name) for n in model.graph] == [("Mul", "scale")]
        got, want = _run(model, feed)[0], _run(proto, feed)[0]
        if exact:
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, want, rtol=2e-7)
    shared = graph(np.float32(8.0))  # two Divs by one constant: one reciprocal
    shared.graph.node.append(helper.make_node("Div", ["y", "c"], ["z"], name="again"))
    shared.graph.output[0].name = "z"
    model, _ = _divided(shared), None
    assert [n.op_type for n in model.graph] == ["Mul", "Mul"] and len(model.graph.initializers) == 1
    np.testing.assert_array_equal(_run(model, feed)[0], _run(shared, feed)[0])
    for divisor in (np.float32(0.0), np.array([1, 2, 3, 4], np.float32)):
        model, _ = _divided(graph(divisor)), None
        assert [n.op_type for n in model.graph] == ["Div"]


@pytest.mark.parametrize("reader", ["flatten", "reshape", "gemm", "gemm_t", "matmul"])
def test_batchnorm_next_to_a_linear_layer_folds_into_it(reader):
    # LeViT: MatMul → Flatten/Reshape to [N·L, C] → BN, and BN → Linear on pooled features
    from qcompile.passes.batchnorm_linear import FoldBatchNormIntoLinear

    rng = np.random.default_rng(0)

    def init(name, *shape, low=None):
        a = rng.uniform(0.5, 1.5, shape) if low else rng.standard_normal(shape)
        return numpy_helper.from_array(a.astype(np.float32), name)

    inits = [init("w", 8, 6), init("g", 6), init("b", 6), init("m", 6), init("v", 6, low=True)]
    inits.append(numpy_helper.from_array(np.array([-1, 6], np.int64), "rows"))
    bn = helper.make_node("BatchNormalization", ["f", "g", "b", "m", "v"], ["y"], epsilon=1e-5)
    if reader in ("flatten", "reshape"):  # x [N, L, 8]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])
        flat = (helper.make_node("Flatten", ["h"], ["f"], axis=2) if reader == "flatten"
                else helper.make_node("Reshape", ["h", "rows"], ["f"]))  # fmt: skip
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), flat, bn]
        shape = (2, 5, 8)
    else:  # x [N, 6] → BN → linear with W [6, 8] (Gemm transB: [8, 6])
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])
        inits[0] = init("w", 8, 6) if reader == "gemm_t" else init("w", 6, 8)
        inits.append(init("c", 8))
        bn.input[0] = "x"
        bn.output[0] = "f"
        if reader == "matmul":
            linear = helper.make_node("MatMul", ["f", "w"], ["y"])
        else:
            linear = helper.make_node("Gemm", ["f", "w", "c"], ["y"], beta=0.5,
                                      transB=int(reader == "gemm_t"))  # fmt: skip
        nodes = [bn, linear]
        shape = (3, 6)
    nodes.append(helper.make_node("Relu", ["y"], ["out"]))  # not a graph output: foldable
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "bn", [x], [y], inits)
    proto = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    model, _ = run_phase(_fused(proto), "rewrite", [FoldBatchNormIntoLinear()])
    assert "BatchNormalization" not in {n.op_type for n in model.graph}
    feed = {"x": rng.standard_normal(shape).astype(np.float32)}
    np.testing.assert_allclose(_run(model, feed)[0], _run(proto, feed)[0], rtol=1e-4, atol=1e-5)
