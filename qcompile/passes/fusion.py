"""Fusions that put quantizers where integer kernels exist (onnxscript rewrite rules).

Exporters decompose activations (Paddle writes HardSwish as x·clip(x+3,0,6)/6, torch
writes GELU with Erf) and split
biases out of convolutions (Conv then Add of a per-channel constant). Each decomposition
costs an extra quantize/dequantize pair or a float op between integer kernels, so we fold
them back into the single ONNX op. Every rule is FP32-exact up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as rules

from qcompile.ir.graph import add_initializer, scalar_const
from qcompile.passes.fusion_gelu import GELU_RULES, _close
from qcompile.passes.naming import NamePreservingRewrite


def _fresh_name(value: ir.Value, suffix: str) -> str:
    """`{value}_{suffix}`, numbered when the graph has it already (two matches sharing a
    weight or bias): a name the rewriter has to rename is an initializer it never adds."""
    base = f"{value.name}_{suffix}"
    graph = value.graph
    taken = set(graph.initializers) if graph is not None else set()
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# -- HardSwish: one canonical form, (x · clip(x + 3, 0, 6)) · (1/6) -----------------------
# ORT has no integer HardSwish kernel. In this form every op has one: the Add runs as
# QLinearAdd whose output quantizer ([0, 6], zero point 0) does the Clip for free, the
# product as QLinearMul, and the scalar 1/6 is folded into the next dequantizer's scale
# (see InsertQDQ's scale aliases), so no float op is left between integer kernels.


def _hswish_div_after(op, x, three, zero, six, six_b):
    return op.Div(op.Mul(x, op.Clip(op.Add(x, three), zero, six)), six_b)


def _hswish_div_inside(op, x, three, zero, six, six_b):
    return op.Mul(x, op.Div(op.Clip(op.Add(x, three), zero, six), six_b))


def _hswish_check(context, x, three, zero, six, six_b, **_):
    return _close(three, 3.0) and _close(zero, 0.0) and _close(six, 6.0) and _close(six_b, 6.0)


def _hswish_op(op, x):
    return op.HardSwish(x)


def _hswish_from_hsigmoid(op, x):
    return op.Mul(x, op.HardSigmoid(x, _outputs=["hs"]))


def _hswish_from_hsigmoid_check(context, x, hs=None, **_):
    node = hs.producer() if hs is not None else None
    if node is None:
        return False
    alpha = node.attributes.get_float("alpha", 0.2)
    beta = node.attributes.get_float("beta", 0.5)
    return abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6


def _hswish_canonical(op, x, **_):
    def const(name: str, value: float) -> ir.Value:  # one set per HardSwish: names must be unique
        return op.initializer(ir.tensor(np.float32(value), name=f"{x.name}_hardswish_{name}"))

    three, zero, six, sixth = (
        const("three", 3),
        const("zero", 0),
        const("six", 6),
        const("sixth", 1 / 6),
    )
    return op.Mul(op.Mul(x, op.Clip(op.Add(x, three), zero, six)), sixth)


# -- A Where whose condition is an all-true constant, broadcast ------------------------------
# torch's dynamo exporter writes a ViT's (empty) attention mask as
# Where(Expand(all-true constant, shape), 0, −max): always the first branch. As
# Expand(first branch broadcast to the condition's shape, shape) the −max sentinel is gone
# and the mask is data movement of a constant, which integer graphs move as codes.


def _where_expanded_true(op, cond, shape, a, b):
    return op.Where(op.Expand(cond, shape), a, b)


def _where_expanded_true_check(context, cond, shape, a, b, **_):
    c = cond.const_value
    if c is None or c.dtype != ir.DataType.BOOL or not np.all(c.numpy()):
        return False
    rank = len(c.shape)
    return all(
        v.const_value is not None and v.const_value.size == 1 and len(v.const_value.shape) <= rank
        for v in (a, b)
    )


def _where_expanded_true_replace(op, cond, shape, a, b):
    # a's broadcast to the condition's shape keeps the output shape exact
    full = np.broadcast_to(a.const_value.numpy(), cond.const_value.shape).copy()
    return op.Expand(op.initializer(ir.tensor(full, name=_fresh_name(a, "where_true"))), shape)


# -- a scalar Mul after a linear layer and data movement: fold it into W and b -------------
# BERT exports scale queries and keys by d^-1/4 after splitting heads; folded into the
# projection, the float Mul between integer kernels disappears.


def _scaled_linear(op, x, w, b, shape, c):
    y = op.Add(op.MatMul(x, w), b)
    t = op.Transpose(
        op.Reshape(y, shape, _allow_other_attributes=True),
        _allow_other_attributes=True,
        _outputs=["t"],
    )
    return op.Mul(t, c)


def _scaled_linear_check(context, x, w, b, shape, c, t=None, **_):
    scale = scalar_const(c)
    if (
        scale is None
        or w.const_value is None
        or b.const_value is None
        or w.const_value.numpy().ndim != 2
    ):
        return False
    return b.const_value.numpy().ndim == 1


def _scaled_linear_replace(op, x, w, b, shape, c, t=None, **_):
    scale = np.float32(scalar_const(c))
    transpose = t.producer()
    reshape = transpose.inputs[0].producer()
    new_w = op.initializer(
        ir.tensor((w.const_value.numpy() * scale).astype(np.float32), name=_fresh_name(w, "scaled"))
    )
    new_b = op.initializer(
        ir.tensor((b.const_value.numpy() * scale).astype(np.float32), name=_fresh_name(b, "scaled"))
    )
    y = op.Add(op.MatMul(x, new_w), new_b)
    r = op.Reshape(y, shape, **dict(reshape.attributes.items()))
    return op.Transpose(r, **dict(transpose.attributes.items()))


# -- Conv followed by a per-channel constant Add: fold into the Conv's bias -----------


def _conv_add(op, x, w, b):
    return op.Add(op.Conv(x, w, _allow_other_attributes=True, _outputs=["conv_out"]), b)


def _conv_transpose_add(op, x, w, b):
    """Paddle writes ConvTranspose's bias as an Add after it (PP-OCR det's upsampling), which
    also keeps a BatchNormalization after that Add from folding into the ConvTranspose."""
    return op.Add(op.ConvTranspose(x, w, _allow_other_attributes=True, _outputs=["conv_out"]), b)


def _out_channels(conv: ir.Node, w: ir.Value) -> int:
    """Conv weights are [C_out, C_in/g, ...]; ConvTranspose's are [C_in, C_out/g, ...]."""
    if conv.op_type == "ConvTranspose":
        return w.const_value.shape[1] * conv.attributes.get_int("group", 1)
    return w.const_value.shape[0]


def _conv_add_check(context, x, w, b, conv_out=None, **_):
    if w.const_value is None or b.const_value is None or len(conv_out.uses()) != 1:
        return False
    cout = _out_channels(conv_out.producer(), w)
    bias = b.const_value.numpy()
    rank = len(w.const_value.shape)
    if bias.ndim > rank:
        return False
    # broadcastable as (1, C, 1, ...): one value per output channel
    squeezed = bias.reshape(-1)
    if bias.ndim == rank:
        return bias.shape[0] == 1 and bias.shape[1] == cout and int(np.prod(bias.shape)) == cout
    if bias.ndim == rank - 1:
        return bias.shape[0] == cout and int(np.prod(bias.shape)) == cout
    return squeezed.size == 1


def _conv_add_replace(op, x, w, b, conv_out=None, **_):
    conv = conv_out.producer()
    cout = _out_channels(conv, w)
    bias = np.broadcast_to(b.const_value.numpy().reshape(-1), (cout,)).astype(np.float32)
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        bias = bias + conv.inputs[2].const_value.numpy().astype(np.float32)
    new_b = op.initializer(ir.tensor(bias, name=_fresh_name(w, "fused_bias")))
    build = op.ConvTranspose if conv.op_type == "ConvTranspose" else op.Conv
    return build(x, w, new_b, **{k: v for k, v in conv.attributes.items()})


def _conv_no_bias_or_const_bias(context, x, w, b, conv_out=None, **_):
    conv = conv_out.producer() if conv_out is not None else None
    if conv is None:
        return False
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].const_value is None:
        return False
    return _conv_add_check(context, x, w, b, conv_out=conv_out)


# -- LayerNormalization from its decomposition, and MatMul + bias -> Gemm --------------------
# The same rules as onnxscript's LayerNorm fusion and MatMul+Add->Gemm (whose modules are
# private), written against its public pattern API, with what we need on top: ReduceMean's
# `axes` as an attribute (opset 17, what we upgrade to) and Gemm only for a constant bias.

_LAYER_NORM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})


class LayerNormFusion(pattern.RewriteRuleClassBase):
    """(x − mean)/sqrt(var + ε)·γ over the last axis -> LayerNormalization (opset 18:
    ReduceMean's axes as an input)."""

    def pattern(self, op, x, scale, epsilon):
        return self._normalized(op, x, lambda v: op.ReduceMean(v, [-1], keepdims=1), scale, epsilon)

    @staticmethod
    def _normalized(op, x, mean_of, scale, epsilon):
        deviation = op.Sub(x, mean_of(x))
        squared = pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, 2)])
        std_dev = op.Sqrt(op.Add(mean_of(squared), epsilon))
        normalized = pattern.OrValue(
            [op.Mul(deviation, op.Reciprocal(std_dev)), op.Div(deviation, std_dev)]
        )
        return op.Mul(normalized, scale)

    def check(self, context, x, epsilon, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype not in _LAYER_NORM_TYPES:
            return result.fail("Input is not a float type.", x)
        self._stash_type = x.dtype
        eps = scalar_const(epsilon)
        if eps is None:
            return result.fail("Epsilon is not a constant scalar.", epsilon)
        self._epsilon = eps
        return result

    def rewrite(self, op, x, scale, epsilon, **_):
        return op.LayerNormalization(
            x, scale, axis=-1, epsilon=self._epsilon, stash_type=self._stash_type
        )


class LayerNormAxesAttributeFusion(LayerNormFusion):
    """The same with ReduceMean's `axes` as an attribute (opset <= 17 exports)."""

    def pattern(self, op, x, scale, epsilon):
        return self._normalized(
            op, x, lambda v: op.ReduceMean(v, axes=[-1], keepdims=1), scale, epsilon
        )


class LayerNormDefaultKeepdimsFusion(LayerNormFusion):
    """The same with `keepdims` left at its default (1), as Paddle2ONNX exports it."""

    def pattern(self, op, x, scale, epsilon):
        return self._normalized(op, x, lambda v: op.ReduceMean(v, axes=[-1]), scale, epsilon)

    def check(self, context, x, epsilon, **kw) -> pattern.MatchResult:
        result = super().check(context, x, epsilon, **kw)
        for use in x.uses():  # the pattern ignores other attributes: keepdims=0 is not ours
            if use.node.op_type == "ReduceMean" and use.node.attributes.get_int("keepdims", 1) != 1:
                return pattern.MatchResult().fail("ReduceMean drops the axis", x)
        return result


class LayerNormBiasFusion(pattern.RewriteRuleClassBase):
    """LayerNormalization followed by Add of a bias -> LayerNormalization with that bias."""

    def pattern(self, op, x, scale, bias):
        return op.LayerNormalization(x, scale, _outputs=["normalized"]) + bias

    def rewrite(self, op, x, scale, bias, normalized):
        node = normalized.producer()
        return op.LayerNormalization(x, scale, bias, _outputs=len(node.outputs), **node.attributes)


class MatMulBiasToGemm(pattern.RewriteRuleClassBase):
    """Rank-2 MatMul + constant 1-D bias -> Gemm. A dynamic addend (an attention mask, a
    residual) must stay an Add, or the bias quantization breaks."""

    def pattern(self, op, input_a, input_b, input_c):
        return op.Add(op.MatMul(input_a, input_b), input_c)

    def check(self, context, input_a, input_b, input_c=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not (_has_rank(input_a, 2) and _has_rank(input_b, 2)):
            return result.fail("Rank of input_a and input_b must be 2")
        if input_c is None or input_c.const_value is None or len(input_c.const_value.shape) != 1:
            return result.fail("the addend is not a constant 1-D bias", input_c)
        return result

    def rewrite(self, op, input_a, input_b, input_c):
        return op.Gemm(input_a, input_b, input_c)


def _has_rank(value: ir.Value | None, rank: int) -> bool:
    return value is not None and value.shape is not None and value.shape.rank() == rank


RULES = rewriter.RewriteRuleSet(
    [
        # onnxscript's own rules, adapted below: decomposed LayerNorm -> LayerNormalization,
        # rank-2 MatMul + constant bias -> Gemm (one QGemm kernel with its int32 bias).
        LayerNormAxesAttributeFusion.rule(),
        LayerNormDefaultKeepdimsFusion.rule(),
        LayerNormFusion.rule(),
        LayerNormBiasFusion.rule(),
        MatMulBiasToGemm.rule(),
        pattern.RewriteRule(
            _hswish_div_after, _hswish_canonical, _hswish_check, name="HardSwishDivAfter"
        ),
        pattern.RewriteRule(
            _hswish_div_inside, _hswish_canonical, _hswish_check, name="HardSwishDivInside"
        ),
        pattern.RewriteRule(_hswish_op, _hswish_canonical, name="HardSwishOp"),
        pattern.RewriteRule(
            _where_expanded_true,
            _where_expanded_true_replace,
            _where_expanded_true_check,
            name="WhereOfExpandedTrue",
        ),
        pattern.RewriteRule(
            _hswish_from_hsigmoid,
            _hswish_canonical,
            _hswish_from_hsigmoid_check,
            name="HardSwishFromHardSigmoid",
        ),
        pattern.RewriteRule(
            _conv_add, _conv_add_replace, _conv_no_bias_or_const_bias, name="ConvBiasAdd"
        ),
        pattern.RewriteRule(
            _conv_transpose_add,
            _conv_add_replace,
            _conv_no_bias_or_const_bias,
            name="ConvTransposeBiasAdd",
        ),
        # a BatchNormalization the bias Add kept apart folds once the Add is gone
        rules.fuse_batchnorm_into_conv_transpose_rule,
        pattern.RewriteRule(
            _scaled_linear, _scaled_linear_replace, _scaled_linear_check, name="ScaleIntoLinear"
        ),
        *GELU_RULES,
    ],
    commute=True,
)


class DivideByConstant(ir.passes.InPlacePass):
    """x / c → x · (1/c) for a scalar float constant c (attention's 1/√d as MPNet,
    DeBERTa and MobileViT write it): a Mul by a positive scalar is what the plan folds
    into a dequantizer's scale, and integer-only graphs have no Div of codes. Exact when c
    is a power of two (the usual √d = 4, 8), else within one float rounding. Integer-only
    pipelines run it after FuseForQuantization, whose patterns read the Divs exporters
    write (GELU's x/√2, HardSwish's /6); the QDQ targets keep float Divs as they are. The
    node is changed in place (a rewrite rule would rename it: Div and Mul differ in op
    type)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified, made, divisors = False, {}, []  # one reciprocal per divisor
        for node in model.graph:
            c = node.inputs[1] if node.op_type == "Div" and len(node.inputs) == 2 else None
            if c is not None and id(c) in made:
                node.op_type = "Mul"
                node.replace_input_with(1, made[id(c)])
                continue
            k = c.const_value.numpy() if c is not None and c.const_value is not None else None
            if k is None or k.size != 1 or k.dtype not in (np.float32, np.float64):
                continue
            with np.errstate(divide="ignore", over="ignore"):
                reciprocal = (1.0 / k).astype(k.dtype)
            if not np.isfinite(reciprocal).all():
                continue
            value = add_initializer(model.graph, f"{c.name}_reciprocal", reciprocal)
            made[id(c)] = value
            node.op_type = "Mul"
            node.replace_input_with(1, value)
            modified = True
            divisors.append(c)
        for c in divisors:  # an initializer only the Divs read goes with them
            if (
                not c.uses()
                and c.is_initializer()
                and not (c.is_graph_input() or c.is_graph_output())
            ):
                model.graph.initializers.pop(c.name)
        return ir.passes.PassResult(model, modified)


class SumAsAdds(ir.passes.InPlacePass):
    """Sum(a, b, …) → Add(Add(a, b), …): ONNX's Sum is defined for float types only, so
    an integer-only graph adds codes with Add (Caffe2-era ResNets and ShuffleNets in onnx's
    model data sum their residuals this way). Integer-only pipelines run it; the float
    results are equal for two inputs, within float rounding for more."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in [n for n in model.graph if n.op_type == "Sum" and n.domain in ("", "ai.onnx")]:
            inputs = list(node.inputs)
            if len(inputs) < 2 or any(v is None for v in inputs):
                continue
            acc, made = inputs[0], []
            for i, operand in enumerate(inputs[1:-1]):
                step = ir.node("Add", [acc, operand], name=f"{node.name}_add{i}")
                step.outputs[0].name = f"{node.outputs[0].name}_partial{i}"
                step.outputs[0].dtype, step.outputs[0].shape = node.outputs[0].dtype, None
                made.append(step)
                acc = step.outputs[0]
            model.graph.insert_before(node, made)
            node.op_type = "Add"  # the last Add keeps the node's name and output
            node.resize_inputs(2)
            node.replace_input_with(0, acc)
            node.replace_input_with(1, inputs[-1])
            modified = True
        return ir.passes.PassResult(model, modified)


class FuseForQuantization(NamePreservingRewrite):
    """Fold decomposed LayerNorm/HardSwish/GELU, split-out biases and scales into single ops."""

    def __init__(self) -> None:
        super().__init__(RULES)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:  # the replaced subgraphs leave their constants behind
            common_passes.RemoveUnusedNodesPass()(model)
        return result
