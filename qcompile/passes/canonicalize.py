"""Canonicalization: the FP32 clean-up every target runs before calibration.

Built from onnx-ir's common passes and onnxscript's optimizer pieces rather than by hand:
function inlining, Constant nodes lifted to initializers, constant folding, onnxscript's
default rewrite rules (no-op/identity removal, Conv+BatchNorm and Pad+Conv folding,
Relu/Clip merging, slice collapsing), common-subexpression elimination, dead-code
elimination and a topological sort.
Every pass here keeps FP32 outputs identical up to float rounding.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as rules

from qcompile.passes.naming import NamePreservingRewrite

# Quantize/Dequantize on constants are already-quantized weights: folding them would
# silently turn an INT8 model back into FP32.
_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _weight_of_shape(node: ir.Node) -> bool:
    """A ConstantOfShape with a constant shape that a layer reads as its weight (ONNX's
    "light" model-zoo exports write every weight so)."""
    weight_of = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"}
    return (
        node.op_type == "ConstantOfShape"
        and node.inputs[0].const_value is not None
        and any(u.node.op_type in weight_of and u.idx >= 1 for u in node.outputs[0].uses())
    )


def _should_fold(node: ir.Node) -> bool | None:
    if node.op_type in _NEVER_FOLD:
        return False
    # weights written as ConstantOfShape are folded, or nothing would find them to quantize;
    # other ConstantOfShape nodes (masks, zeros for a Where) are left as onnxscript leaves them
    return True if _weight_of_shape(node) else None


class FoldConstants(ir.passes.InPlacePass):
    """onnxscript's constant folding (its public `fold_constants`, default size limits),
    sparing Q/DQ of pre-quantized weights; then weights written as ConstantOfShape
    whatever their size (onnxscript's output-size limit, 512² elements, applies even
    where `should_fold` says yes: a ResNet-50's 256·256·3·3 weights stayed unfolded)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = optimizer.fold_constants(
            model, onnx_shape_inference=True, should_fold=_should_fold
        )
        if not any(_weight_of_shape(n) for n in model.graph):
            return ir.passes.PassResult(model, bool(result.modified))
        weights = optimizer.fold_constants(
            model,
            output_size_limit=2**40,  # no limit: they are the model's weights
            should_fold=lambda node: _weight_of_shape(node) or False,
        )
        return ir.passes.PassResult(model, bool(result.modified or weights.modified))


def _add(op, x, c):
    return op.Add(x, c)


def _sub(op, x, c):
    return op.Sub(x, c)


def _exactly_zero(context, x, c, **_) -> bool:
    """c is a scalar 0 that broadcasts x to no larger shape: x ± c is x."""
    k = c.const_value
    if k is None or k.size != 1 or float(k.numpy().reshape(())) != 0.0:
        return False
    return len(k.shape) == 0 or (x.shape is not None and len(k.shape) <= len(x.shape))


def _identity(op, x, **_):
    return op.Identity(x)


# onnxscript's add_0/sub_0 rules match x ± c for |c| <= 1e-8 (its constant patterns' abs_tol),
# so they delete BERT's LayerNorm ε = 1e-12, which changes a zero-variance row's output to
# NaN and leaves a decomposed LayerNorm the LayerNorm fusion no longer recognizes (opset
# < 17 exports). Ours remove exact zeros only.
EXACT_ZERO_RULES = (
    *pattern.RewriteRule(_add, _identity, _exactly_zero).commute(),
    pattern.RewriteRule(_sub, _identity, _exactly_zero),
)

# onnxscript's default rewrite rules (`onnxscript.rewriter.rewrite` without rules), spelled
# out from its public rule names in its order: the default list itself is private.
# tests/test_passes.py checks this list against onnxscript's, so a release that changes
# its defaults fails a test instead of changing our graphs silently; positions 2-4 are
# EXACT_ZERO_RULES in place of add_0_rule (both orders) and sub_0_rule.
DEFAULT_RULES: tuple[pattern.RewriteRule, ...] = (
    *rules.mul_by_1_rule.commute(),
    *EXACT_ZERO_RULES,
    rules.div_by_1_rule,
    rules.dropout_zero_rule,
    rules.dropout_inference_rule,
    rules.two_reshapes_matmul_reshape_rule,
    rules.one_reshape_matmul_reshape_rule,
    rules.cast_constant_of_shape_rule,
    rules.cast_constant_of_shape_without_value_rule,
    rules.collapse_slice_rule,
    rules.collapse_slice2_rule,
    rules.materialize_reshape_shape_rule,
    rules.min_min_rule,
    rules.max_max_rule,
    rules.min_max_rule,
    rules.max_min_rule,
    rules.successive_clip_relu_rule,
    rules.successive_relu_clip_rule,
    rules.successive_relu_rule,
    rules.successive_clip_rule,
    rules.cast_cast_rule,
    rules.no_op_cast_rule,
    rules.no_op_expand_rule,
    rules.flatten_to_reshape_rule,
    rules.reshape_reshape_rule,
    rules.slice_split_rule,
    rules.no_op_transpose_rule,
    rules.transpose_transpose_rule,
    rules.unsqueeze_unsqueeze_rule,
    rules.squeeze_reshape_1d_rule,
    rules.no_op_dynamic_scatter_nd_rule,
    rules.no_op_static_scatter_nd_rule,
    rules.normalize_pad_format_conv_rule,
    rules.normalize_pad_format_conv_integer_rule,
    rules.fuse_pad_into_conv_rule,
    rules.fuse_pad_into_conv_integer_rule,
    rules.fuse_batchnorm_into_conv_rule,
    rules.fuse_batchnorm_into_conv_transpose_rule,
    rules.fuse_batchnorm_into_gemm_rule,
    rules.remove_optional_bias_from_conv_rule,
    rules.remove_optional_bias_from_conv_transpose_rule,
    rules.remove_optional_bias_from_qlinear_conv_rule,
    rules.remove_optional_bias_from_gemm_rule,
)


class DefaultRewrites(NamePreservingRewrite):
    """onnxscript's default, FP32-exact rewrite rules (includes Conv+BatchNorm folding)."""

    def __init__(self) -> None:
        super().__init__(pattern.RewriteRuleSet(list(DEFAULT_RULES)))


class EliminateIdentity(common_passes.IdentityEliminationPass):
    """onnx-ir's Identity elimination, keeping an Identity that is the only way a value
    from another graph (the outer scope of an If/Loop/Scan branch) or a value that is
    already some graph's output becomes this graph's output: eliminating it would make
    one value the output of two graphs (both branches of an If returning the same outer
    value, as torch exports write them)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        x = node.inputs[0] if node.op_type == "Identity" and node.inputs else None
        if x is not None and node.outputs[0].is_graph_output():
            producer = x.producer()
            outer = producer is None or producer.graph is not node.graph
            if x.is_graph_output() or (outer and not (x.is_graph_input() or x.is_initializer())):
                return False
        return super()._try_eliminate_identity_node(node)


class LiftConstants(common_passes.LiftConstantsToInitializersPass):
    """Constant nodes become initializers, so weights are found in one place."""

    def __init__(self) -> None:
        super().__init__(lift_all_constants=True, size_limit=0)


def canonicalize() -> list[ir.passes.PassBase]:
    """The canonicalization phase, in order."""
    return [
        common_passes.InlinePass(),
        LiftConstants(),
        FoldConstants(),
        DefaultRewrites(),
        EliminateIdentity(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        LiftConstants(),
        common_passes.DeduplicateInitializersPass(),
        # e.g. BERT exports recompute the same attention-mask Where in every layer
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
        # plans, exclusions and the speed guard name nodes: every node gets a unique name
        common_passes.NameFixPass(),
    ]
