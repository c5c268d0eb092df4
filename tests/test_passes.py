"""Canonicalization keeps FP32 outputs, is idempotent, keeps user node names."""

import builders
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.ir import load_model
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.manager import pass_name, run_phase
from tests.conftest import FAST

MODELS = {
    "cnn": (builders.cnn, lambda: builders.images(4, seed=5)),
    "mlp": (builders.mlp, lambda: builders.features(4, seed=5)),
    "transformer": (builders.transformer_block, lambda: builders.token_embeddings(2, seed=5)),
}


def _outputs(model, feed):
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


@pytest.mark.parametrize("name", list(MODELS))
def test_canonicalize_keeps_fp32_outputs_and_is_idempotent(name):
    build, data = MODELS[name]
    proto = build()
    feed = {"input": data()}
    model, records = run_phase(load_model(proto), "rewrite", canonicalize())
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for a, b in zip(_outputs(proto, feed), _outputs(model, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    model, again = run_phase(model, "rewrite", canonicalize())
    changed = [r.name for r in again if r.modified and r.name not in ("TopologicalSortPass",)]
    assert changed == [], f"second run still modified: {changed}"
    assert [r.name for r in records] == [pass_name(p) for p in canonicalize()]
    assert all(r.seconds > 0 for r in records if r.modified)


def test_batchnorm_folded_and_names_kept():
    model, _ = run_phase(load_model(builders.cnn()), "rewrite", canonicalize())
    ops = [n.op_type for n in model.graph]
    assert "BatchNormalization" not in ops
    names = {n.name for n in model.graph if n.op_type == "Conv"}
    assert {
        "stem_conv",
        "res_conv1",
        "res_conv2",
        "branch_a",
        "branch_dw",
        "branch_pw",
        "head_conv",
    } == names


def test_verify_passes_option_runs_equivalence_checks():
    result = qcompile.compile(
        builders.cnn(), calibration={"input": builders.images(6)}, verify_passes=True, **FAST
    )
    assert any(p["name"] == "DefaultRewrites" and p["modified"] for p in result.report.passes)


def test_verifier_catches_a_broken_pass():
    from qcompile.backends.ort import equivalence_verifier
    from qcompile.errors import QCompileError

    class Sabotage(ir.passes.InPlacePass):
        def call(self, model):
            for node in model.graph:
                if node.op_type == "Relu":
                    node.op_type = "Sigmoid"
                    return ir.passes.PassResult(model, True)
            return ir.passes.PassResult(model, False)

    feeds = [{"input": builders.features(4)}]
    with pytest.raises(QCompileError, match="Sabotage"):
        run_phase(
            load_model(builders.mlp()), "rewrite", [Sabotage()], verify=equivalence_verifier(feeds)
        )


# -- hypothesis: random small graphs through canonicalize and compile -----------------

UNARY = ["Relu", "Sigmoid", "Identity", "Neg"]


@st.composite
def random_graph(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    width = draw(st.sampled_from([4, 8]))
    nodes, inits, cur = [], [], "x"
    live = ["x"]
    for names in range(1, draw(st.integers(1, 6)) + 1):
        kind = draw(
            st.sampled_from(["matmul", "gemm", "unary", "add", "mul_const", "add_residual"])
        )
        out = f"t{names}"
        if kind in ("matmul", "gemm"):
            w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{names}"))
            if kind == "gemm":
                inits.append(
                    numpy_helper.from_array(
                        rng.standard_normal(width).astype(np.float32), f"b{names}"
                    )
                )
                nodes.append(
                    helper.make_node(
                        "Gemm", [cur, f"w{names}", f"b{names}"], [out], name=f"n{names}"
                    )
                )
            else:
                nodes.append(
                    helper.make_node("MatMul", [cur, f"w{names}"], [out], name=f"n{names}")
                )
        elif kind == "unary":
            nodes.append(
                helper.make_node(draw(st.sampled_from(UNARY)), [cur], [out], name=f"n{names}")
            )
        elif kind == "mul_const":
            inits.append(
                numpy_helper.from_array(np.float32(draw(st.floats(0.5, 2.0))), f"c{names}")
            )
            nodes.append(helper.make_node("Mul", [cur, f"c{names}"], [out], name=f"n{names}"))
        elif kind == "add":
            inits.append(
                numpy_helper.from_array(np.zeros(width, np.float32), f"z{names}")
            )  # a no-op add
            nodes.append(helper.make_node("Add", [cur, f"z{names}"], [out], name=f"n{names}"))
        else:
            other = draw(st.sampled_from(live))
            nodes.append(helper.make_node("Add", [cur, other], [out], name=f"n{names}"))
        live.append(out)
        cur = out
    graph = helper.make_graph(
        nodes,
        "rand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [2, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, width


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graph())
def test_random_graphs_canonicalize_exactly_and_compile(case):
    proto, width = case
    feed = {"x": np.random.default_rng(0).standard_normal((2, width)).astype(np.float32)}
    model, _ = run_phase(load_model(proto), "rewrite", canonicalize())
    for a, b in zip(_outputs(proto, feed), _outputs(model, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    calib = [
        {"x": np.random.default_rng(i).standard_normal((2, width)).astype(np.float32)}
        for i in range(6)
    ]
    try:
        result = qcompile.compile(proto, calibration=calib, **FAST)
    except qcompile.QCompileError as err:
        assert "nothing in this model can be quantized" in str(err)
        return
    out = _outputs(result.model, feed)[0]
    assert np.all(np.isfinite(out))
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)


def test_default_rules_are_onnxscripts_defaults():
    """canonicalize.DEFAULT_RULES spells out onnxscript's private default rule list from
    its public names; a release that changes the defaults fails here, not silently."""
    import re

    from onnxscript import rewriter

    from qcompile.passes.canonicalize import DEFAULT_RULES

    def shape(rule) -> str:  # the pattern as text, anonymous value ids dropped
        return re.sub(r"anonymous:\d+", "v", str(rule._target_pattern))

    from onnxscript.rewriter.rules import common as rules

    from qcompile.passes.canonicalize import EXACT_ZERO_RULES

    theirs = list(rewriter._DEFAULT_REWRITE_RULES)  # read here only, to guard the copy
    # ours replace add_0 (both orders) and sub_0, at their places, by exact-zero versions
    replaced = [*rules.add_0_rule.commute(), rules.sub_0_rule]
    where = [i for i, r in enumerate(theirs) if shape(r) in {shape(x) for x in replaced}]
    assert len(where) == len(EXACT_ZERO_RULES) == 3
    for i, ours in zip(where, EXACT_ZERO_RULES, strict=True):
        theirs[i] = ours
    assert [shape(r) for r in DEFAULT_RULES] == [shape(r) for r in theirs]
    assert [r.name for r in DEFAULT_RULES] == [r.name for r in theirs]


def test_tiny_epsilons_survive_and_decomposed_layer_norms_fuse():
    # x + 1e-12 is not x (onnxscript's add_0 rule would drop BERT's ε): the decomposed
    # LayerNorm of an opset-14 export keeps its ε and fuses into LayerNormalization
    from qcompile.passes.fusion import FuseForQuantization

    proto = builders.decomposed_layernorm()
    eps = next(i for i in proto.graph.initializer if i.name.startswith("eps"))
    eps.CopyFrom(numpy_helper.from_array(np.float32(1e-12), eps.name))
    model, _ = run_phase(load_model(proto), "rewrite", [*canonicalize(), FuseForQuantization()])
    norms = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert len(norms) == 1
    assert norms[0].attributes.get_float("epsilon") == pytest.approx(1e-12)
    x = np.zeros((2, 32), np.float32)  # zero variance: ε keeps it finite
    assert np.isfinite(_outputs(model, {"input": x})[0]).all()


def test_weights_written_as_constant_of_shape_fold_whatever_their_size():
    # ONNX's light model-zoo exports write every weight as ConstantOfShape; onnxscript's
    # output-size limit (512² elements) left a ResNet-50's 256·256·3·3 weights unfolded,
    # so they were not quantized
    shape = np.array([256, 256, 3, 3], np.int64)
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.02])
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=value),
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "light",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256, 4, 4])],
        [numpy_helper.from_array(shape, "w_shape")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model, _ = run_phase(model, "canonicalize", canonicalize())
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight = conv.inputs[1].const_value
    assert weight is not None and weight.shape == tuple(shape)
    assert np.all(weight.numpy() == np.float32(0.02))
