"""GELU written out by exporters, folded back into one op (rules for `passes/fusion.py`).

torch writes GELU with Erf (x·½·(1 + erf(x/√2))) or, for GPT-2's gelu_new and Gemma's
gelu_pytorch_tanh, with Tanh (x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³)))), each in the
association its exporter prefers. The fused op is ONNX's Gelu from opset 20, ORT's contrib
Gelu/FastGelu below it; integer-only lowering tabulates either. FP32-exact up to float
rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qcompile.ir.graph import scalar_const


def _close(value: ir.Value | None, expected: float) -> bool:
    got = scalar_const(value)
    return got is not None and abs(got - expected) <= 1e-6 * max(1.0, abs(expected))


def _opset(context) -> int:
    model = context.model if hasattr(context, "model") else None
    return model.opset_imports.get("", 0) if model is not None else 0


# -- GELU written out with Erf: 0.5 * x * (1 + erf(x / sqrt(2))) ---------------------------


def _gelu_erf(op, x, sqrt2, one, half):
    return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, sqrt2)), one)), half)


def _gelu_erf_half_first(op, x, sqrt2, one, half):
    return op.Mul(op.Mul(x, half), op.Add(op.Erf(op.Div(x, sqrt2)), one))


def _gelu_erf_half_inner(op, x, sqrt2, one, half):
    # torch.onnx's dynamo exporter: x * (0.5 * (1 + erf(x / sqrt(2))))
    return op.Mul(x, op.Mul(half, op.Add(op.Erf(op.Div(x, sqrt2)), one)))


def _gelu_constants(sqrt2, one, half) -> bool:
    return _close(sqrt2, float(np.sqrt(2.0))) and _close(one, 1.0) and _close(half, 0.5)


def _gelu_onnx_check(context, x, sqrt2, one, half, **_):
    return _opset(context) >= 20 and _gelu_constants(sqrt2, one, half)


def _gelu_contrib_check(context, x, sqrt2, one, half, **_):
    return _opset(context) < 20 and _gelu_constants(sqrt2, one, half)


# GELU's tanh approximation (GPT-2's gelu_new), as both torch exporters write it:
# (x · ½) · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))


def _gelu_tanh(op, x, three, c, k, one, half):
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), c)), k)
    return op.Mul(op.Mul(x, half), op.Add(op.Tanh(inner), one))


def _gelu_tanh_half_last(op, x, three, c, k, one, half):
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), c)), k)
    return op.Mul(op.Mul(x, op.Add(op.Tanh(inner), one)), half)


def _gelu_tanh_half_inner(op, x, three, c, k, one, half):
    # torch.onnx's dynamo exporter (Gemma's gelu_pytorch_tanh): x · (½ · (1 + tanh(...)))
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), c)), k)
    return op.Mul(x, op.Mul(half, op.Add(op.Tanh(inner), one)))


def _gelu_tanh_constants(three, c, k, one, half) -> bool:
    return (
        _close(three, 3.0)
        and _close(c, 0.044715)
        and _close(k, float(np.sqrt(2.0 / np.pi)))
        and _close(one, 1.0)
        and _close(half, 0.5)
    )


def _gelu_tanh_onnx_check(context, x, three, c, k, one, half, **_):
    return _opset(context) >= 20 and _gelu_tanh_constants(three, c, k, one, half)


def _gelu_tanh_contrib_check(context, x, three, c, k, one, half, **_):
    return _opset(context) < 20 and _gelu_tanh_constants(three, c, k, one, half)


def _gelu_tanh_onnx(op, x, **_):
    return op.Gelu(x, approximate="tanh")


def _gelu_tanh_contrib(op, x, **_):
    # ORT's contrib FastGelu is the same tanh formula (CPU and CUDA EPs)
    return op.FastGelu(x, _domain="com.microsoft")


def _gelu_onnx(op, x, **_):
    return op.Gelu(x)


def _gelu_contrib(op, x, **_):
    # ONNX Gelu exists from opset 20; before that, ORT's contrib Gelu (CPU and CUDA EPs).
    return op.Gelu(x, _domain="com.microsoft")


# (rule family, the forms exporters write, the replacements by opset)
_FAMILIES = (
    (
        "Gelu",
        ((_gelu_erf, "Erf"), (_gelu_erf_half_first, "ErfHalfFirst"),
         (_gelu_erf_half_inner, "ErfHalfInner")),
        ((_gelu_onnx, _gelu_onnx_check, ""), (_gelu_contrib, _gelu_contrib_check, "Contrib")),
    ),
    (
        "GeluTanh",
        ((_gelu_tanh, ""), (_gelu_tanh_half_last, "HalfLast"),
         (_gelu_tanh_half_inner, "HalfInner")),
        ((_gelu_tanh_onnx, _gelu_tanh_onnx_check, ""),
         (_gelu_tanh_contrib, _gelu_tanh_contrib_check, "Contrib")),
    ),
)  # fmt: skip
GELU_RULES: list[pattern.RewriteRule] = [
    pattern.RewriteRule(form, replace, check, name=f"{family}{label}{suffix}")
    for family, forms, replacements in _FAMILIES
    for form, label in forms
    for replace, check, suffix in replacements
]
