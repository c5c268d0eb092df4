"""Integer LRN (qcompile/lower/integer_lrn.py): AlexNet/GoogLeNet's cross-channel
normalization without a float island, ONNX Runtime = the numpy reference, output SQNR
at least the QDQ graph's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FAST, compile_integer_checked
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.errors import QCompileError


def _block(size: int, alpha: float, beta: float, bias: float, gain: float) -> onnx.ModelProto:
    """Conv → Relu → LRN → Conv, as AlexNet's first layers (gain scales the activations:
    AlexNet's reach the hundreds, where α = 1e-4 matters)."""
    rng = np.random.default_rng(0)
    w1 = (gain * rng.normal(0, 0.3, (7, 3, 3, 3))).astype(np.float32)
    w2 = rng.normal(0, 0.3, (4, 7, 1, 1)).astype(np.float32)
    node = helper.make_node
    nodes = [
        node("Conv", ["input", "w1"], ["a"], pads=[1] * 4),
        node("Relu", ["a"], ["r"]),
        node("LRN", ["r"], ["n"], name="lrn", size=size, alpha=alpha, beta=beta, bias=bias),
        node("Conv", ["n", "w2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lrn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"input": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(6)]


@pytest.mark.parametrize(
    "size, alpha, beta, bias, gain",
    [(5, 1e-4, 0.75, 1.0, 100.0), (3, 0.5, 0.75, 2.0, 1.0), (7, 0.2, 0.5, 1.0, 1.0),
     (5, 0.2, 1.0, 1.0, 1.0)],
    ids=["alexnet", "beta-3/4-strong", "beta-1/2-wide-window", "beta-1"],
)  # fmt: skip
def test_lrn_is_integer(size, alpha, beta, bias, gain):
    model = _block(size, alpha, beta, bias, gain)
    result = compile_integer_checked(model, _feeds(), min_db=25.0)
    assert "LRN" not in {n.op_type for n in result.model.graph}


def test_other_powers_are_refused_by_name():
    with pytest.raises(QCompileError, match=r"lrn \(LRN: β = 0.6"):
        qcompile.compile(_block(5, 0.2, 0.6, 1.0, 1.0), target="fpga", calibration=_feeds(),
                         **FAST)  # fmt: skip
