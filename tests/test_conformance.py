"""Peer conformance: the ONNX project's own backend node tests for the quantized ops,
run against our numpy reference interpreter (qcompile/quantize/reference.py).

The cases ship inside the onnx package (onnx.backend.test.case.node). Cases for number
formats qcompile never emits (float8, 2/4-bit, 16-bit, blocked quantization) are
skipped with their reason; everything else must match ONNX's expected outputs exactly
for integers and within the case's own tolerance for floats.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from qcompile.backends.reference import run_reference

OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "BitShift",
)
UNSUPPORTED = (
    "e4m3",
    "e5m2",
    "e8m0",
    "float4",
    "int4",
    "uint4",
    "int2",
    "uint2",
    "int16",
    "uint16",
    "blocked",
    "float8",
)


@functools.cache
def _cases() -> dict[str, object]:
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    return {
        c.name: c
        for c in cases
        if any(n.op_type in OPS for n in c.model.graph.node) and len(c.model.graph.node) == 1
    }


def _names() -> list[str]:
    return sorted(_cases())


@pytest.mark.parametrize("name", _names())
def test_onnx_backend_case_matches_reference(name):
    case = _cases()[name]
    if any(tag in name for tag in UNSUPPORTED):
        pytest.skip("number format qcompile never emits (float8, sub-byte, 16-bit or blocked)")
    graph = case.model.graph
    assert case.data_sets, name
    for inputs, outputs in case.data_sets:
        feed = {v.name: x for v, x in zip(graph.input, inputs, strict=True)}
        got = run_reference(case.model, feed)
        for want, have in zip(outputs, got, strict=True):
            assert have.shape == want.shape, name
            if np.issubdtype(want.dtype, np.integer):
                np.testing.assert_array_equal(have, want, err_msg=name)
            else:
                np.testing.assert_allclose(have, want, rtol=case.rtol, atol=case.atol, err_msg=name)


def test_every_op_has_cases():
    ops = {n.op_type for c in _cases().values() for n in c.model.graph.node}
    assert set(OPS) <= ops
