"""Targets are data: the NPU-like profile (qcompile/targets/npu.py, one registry line)
compiles the test models with nothing else in the compiler knowing its name."""

from __future__ import annotations

import builders
import numpy as np
import onnx_ir as ir
import pytest
from conftest import FAST

import qcompile
from qcompile.backends import ort as ort_backend
from qcompile.targets import REGISTRY, get_target

CASES = {
    "cnn": (builders.cnn, lambda: {"input": builders.images(20, seed=1)}, 25.0),
    "mobile_block": (
        builders.mobile_block,
        lambda: {"input": builders.images(20, 24, seed=3)},
        20.0,
    ),
    "mlp": (builders.mlp, lambda: {"input": builders.features(40, seed=1)}, 25.0),
    "transformer": (
        builders.transformer_block,
        lambda: [{"input": builders.token_embeddings(2, seed=i)} for i in range(8)],
        20.0,
    ),
}


def _quantizers(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("name", list(CASES))
def test_npu_profile_compiles_the_test_models(name):
    build, data, min_sqnr = CASES[name]
    result = qcompile.compile(build(), target="npu", calibration=data(), **FAST)
    assert result.report.target == "npu"
    assert result.report.min_output_sqnr_db > min_sqnr
    # symmetric S8 activations: every zero point is int8 zero; per-tensor weights: every
    # scale a scalar
    for node in _quantizers(result.model):
        zp = node.inputs[2].const_value.numpy() if len(node.inputs) > 2 else np.int8(0)
        scale = node.inputs[1].const_value.numpy()
        if zp.dtype == np.int32:  # bias
            continue
        assert zp.dtype == np.int8 and not zp.any(), node.name
        assert scale.size == 1, f"{node.name}: per-channel scale on a per-tensor target"
    feed = data()
    feed = feed[0] if isinstance(feed, list) else {k: v[:8] for k, v in feed.items()}
    assert ort_backend.make_session(result.model).run(None, feed)


def test_registry_is_the_only_place_a_target_is_named():
    assert set(REGISTRY) == {"cpu", "gpu", "fpga", "npu"}
    for name in REGISTRY:
        module = get_target(name)
        assert module.PROFILE.name == name
        assert callable(module.pipeline)


def test_capabilities_gate_options_by_profile_not_by_name():
    """The NPU profile allows 8 bits only and no INT4 weights: refused with the same
    errors the cpu target gives, from its profile's data."""
    with pytest.raises(qcompile.QCompileError, match="bit widths other than 8"):
        qcompile.compile(
            builders.mlp(), target="npu", calibration={"input": builders.features(8)},
            weight_bits=4, **FAST,
        )  # fmt: skip
    with pytest.raises(qcompile.QCompileError, match="INT4 weight-only"):
        qcompile.compile(
            builders.mlp(), target="npu", calibration={"input": builders.features(8)},
            int4_weights="op:MatMul", **FAST,
        )  # fmt: skip
