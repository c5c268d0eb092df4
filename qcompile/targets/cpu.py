"""CPU target: ONNX Runtime's CPU EP (x86 with VNNI, Arm with dot-product).

U8 asymmetric activations with S8 symmetric per-channel weights is ORT's fast path on x86:
QDQ placed so the EP fuses QLinearConv, QGemm, QLinearMatMul/MatMulIntegerToFloat,
QLinearAdd, QLinearConcat and the pooling kernels.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.backends import ort as ort_backend
from qcompile.lower.integer_only import LowerToIntegerOnly
from qcompile.lower.ort_cpu import FuseMatMulIntegerToFloat
from qcompile.numerics.qparams import QuantSpec
from qcompile.options import CompileOptions
from qcompile.passes.attention import DecomposeAttention
from qcompile.passes.batchnorm_linear import FoldBatchNormIntoLinear
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.equalization import CrossLayerEqualization
from qcompile.passes.fusion import DivideByConstant, FuseForQuantization, SumAsAdds
from qcompile.passes.recurrent import UnrollLSTM
from qcompile.passes.rotation import RotateResidualStream
from qcompile.passes.smoothing import SmoothQuant
from qcompile.passes.static_dims import FoldStaticShapeReads
from qcompile.profile import (
    ARITH_OPS,
    COMPUTE_OPS,
    TargetProfile,
    integer_only_variant,
)
from qcompile.quantize.bias_correction import BiasCorrection
from qcompile.quantize.embeddings import QuantizeEmbeddings
from qcompile.quantize.qdq import InsertQDQ
from qcompile.quantize.weight_only import Int4WeightOnly
from qcompile.targets.pipeline import BiasPhase, Calibration, Pipeline, QuantizePhase, SmoothPhase

PROFILE = TargetProfile(
    name="cpu",
    activation=QuantSpec(bits=8, signed=False, symmetric=False),
    weight=QuantSpec(bits=8, signed=True, symmetric=True, narrow=True),
    per_channel_weights=True,
    per_channel_matmul=True,
    compute_ops=COMPUTE_OPS,
    # HardSwish has no integer kernel in ORT; our fusions rewrite it to x·HardSigmoid(x).
    arith_ops=ARITH_OPS - {"HardSwish"},
    execution_providers=("CPUExecutionProvider",),
    int4_weights=True,
)


def rewrite(options: CompileOptions) -> list[ir.passes.PassBase]:
    """FP32 clean-up, fusions that put quantizers where integer kernels exist (and
    BatchNorms next to linear layers folded into them), then
    cross-layer equalization of Conv → Relu → Conv chains (after BatchNorm folding), and of
    Conv → HardSwish → Conv ones where --equalize-hardswish asks (strategies/equalization);
    with --rotate, RMSNorm residual streams rotated first (passes/rotation.py); integer-only
    graphs also fold shape reads of static dims (passes/static_dims.py), write ONNX's fused
    Attention out as MatMul/Softmax (passes/attention.py), unroll LSTMs of a static
    sequence length (passes/recurrent.py), turn divisions by a scalar
    constant into multiplications and Sums into Adds (ONNX's Sum takes floats only)."""
    hardswish = options.equalize_hardswish == "on"
    rotate = [RotateResidualStream(options.seed)] if options.rotate else []
    return [
        *canonicalize(),
        *(
            [FoldStaticShapeReads(), DecomposeAttention(), UnrollLSTM()]
            if options.integer_only
            else []
        ),
        FuseForQuantization(),
        FoldBatchNormIntoLinear(),
        *([DivideByConstant(), SumAsAdds()] if options.integer_only else []),  # no Div, Sum
        *rotate,
        CrossLayerEqualization(hardswish=hardswish),
    ]


def smooth(profile: TargetProfile, options: CompileOptions) -> SmoothPhase:
    return lambda groups, stats: [
        SmoothQuant(
            groups,
            stats,
            profile.activation,
            profile.weight,
            options.smooth_alpha,
            shift=options.smooth_shift,
        )
    ]


def correct_bias(profile: TargetProfile) -> BiasPhase:
    """--bias-correction: fold (Q(W) − W)·E[x] out of the biases before QDQ insertion,
    so the int32 biases InsertQDQ writes carry the correction."""
    return lambda plan, means: [BiasCorrection(plan, means, profile.weight)]


def quantize(profile: TargetProfile, options: CompileOptions) -> QuantizePhase:
    """Q/DQ pairs from the plan, int8 embedding tables, and INT4 weight-only MatMuls
    (MatMulNBits) on the nodes --int4-weights names (the plan left them FP32). Integer-only
    graphs keep the tables the plan quantized: their row-scale dequantization is a float
    Mul inside the integer region (Gemma's scaled embeddings then stayed float)."""

    def phase(plan, qparams) -> list[ir.passes.PassBase]:
        passes: list[ir.passes.PassBase] = [InsertQDQ(plan, qparams, profile)]
        if not options.integer_only:
            passes.append(QuantizeEmbeddings())
        if options.int4_weights:
            passes.append(Int4WeightOnly(frozenset(plan.int4_nodes)))
        return passes

    return phase


def finalize() -> list[ir.passes.PassBase]:
    """Clean-up after quantization: dead float weights go, order is topological."""
    return [common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass()]


def lower(options: CompileOptions, profile: TargetProfile) -> list[ir.passes.PassBase]:
    """The QDQ graph with float-output MatMuls written as ORT's CPU kernel (bias folded
    in), or lowered to integer-only arithmetic (--integer-only)."""
    if options.integer_only:
        return [*finalize(), LowerToIntegerOnly(keep_float=options.is_excluded)]
    if profile.execution_providers[0] == "CPUExecutionProvider":
        return [FuseMatMulIntegerToFloat(), *finalize()]
    return finalize()


def reduced_range(profile: TargetProfile, options: CompileOptions) -> TargetProfile:
    """7-bit weights where uint8 activations meet int8 weights on a CPU whose kernels
    add u8×s8 products pairwise into int16 (x86 without VNNI): 2·255·63 fits, 2·255·127
    saturates. `--reduce-range auto` asks this machine's ONNX Runtime."""
    if profile.activation.signed or not profile.weight.signed or profile.weight.bits < 8:
        return profile
    if profile.execution_providers[0] != "CPUExecutionProvider":
        return profile
    wanted = options.reduce_range
    if wanted == "off" or (wanted == "auto" and not ort_backend.u8s8_pairs_saturate()):
        return profile
    why = "asked for" if wanted == "on" else "this machine's int8 kernels saturate u8×s8 pairs"
    return dataclasses.replace(
        profile,
        weight=dataclasses.replace(profile.weight, bits=7),
        notes=(
            *profile.notes,
            f"weights use 7 bits (--reduce-range: {why}; x86 without VNNI); "
            "--reduce-range off for VNNI or Arm deployment",
        ),
    )


def pipeline(options: CompileOptions, profile: TargetProfile = PROFILE) -> Pipeline:
    profile = reduced_range(profile, options)
    if options.integer_only:
        profile = integer_only_variant(profile)
    return Pipeline(
        profile=profile,
        rewrite=rewrite(options),
        smooth=smooth(profile, options),
        calibrate=Calibration(options.calib_method, options.percentile),
        correct_bias=correct_bias(profile),
        quantize=quantize(profile, options),
        lower=lower(options, profile),
    )
