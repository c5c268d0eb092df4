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
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding

from qcompile.passes.naming import NamePreservingRewrite

# Quantize/Dequantize on constants are already-quantized weights: folding them would
# silently turn an INT8 model back into FP32.
_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _should_fold(node: ir.Node) -> bool | None:
    return False if node.op_type in _NEVER_FOLD else None


class FoldConstants(_constant_folding.FoldConstantsPass):
    """onnxscript's constant folding, sparing Q/DQ of pre-quantized weights."""

    def __init__(self) -> None:
        super().__init__(
            shape_inference=True,
            input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            should_fold=_should_fold,
        )


class DefaultRewrites(NamePreservingRewrite):
    """onnxscript's default, FP32-exact rewrite rules (includes Conv+BatchNorm folding)."""

    def __init__(self) -> None:
        super().__init__(rewriter._DEFAULT_REWRITE_RULES)


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
        common_passes.IdentityEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        LiftConstants(),
        common_passes.DeduplicateInitializersPass(),
        # e.g. BERT exports recompute the same attention-mask Where in every layer
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    ]
