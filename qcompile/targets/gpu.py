"""GPU target: ONNX Runtime's TensorRT and CUDA EPs.

TensorRT's explicit quantization wants S8 symmetric activations and weights, Q/DQ on the
inputs of Conv/Gemm/MatMul and on residual Add inputs; it fuses Conv+Relu itself, so
activations stay in the graph (a symmetric zero point cannot clamp them away).
"""

from __future__ import annotations

from qcompile.options import CompileOptions
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.fusion import FuseForQuantization
from qcompile.passes.smoothing import SmoothQuant
from qcompile.pipeline import Calibration, Pipeline
from qcompile.quantize.embeddings import QuantizeEmbeddings
from qcompile.quantize.qdq import InsertQDQ
from qcompile.quantize.qparams import QuantSpec
from qcompile.targets.cpu import finalize
from qcompile.targets.profile import COMPUTE_OPS, TargetProfile

PROFILE = TargetProfile(
    name="gpu",
    activation=QuantSpec(bits=8, signed=True, symmetric=True),
    weight=QuantSpec(bits=8, signed=True, symmetric=True, narrow=True),
    per_channel_weights=True,
    per_channel_matmul=True,
    compute_ops=COMPUTE_OPS,
    arith_ops=frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool"}),
    remove_clamping_activations=False,
    execution_providers=(
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ),
)


def pipeline(options: CompileOptions, profile: TargetProfile = PROFILE) -> Pipeline:
    return Pipeline(
        profile=profile,
        rewrite=[*canonicalize(), FuseForQuantization()],
        smooth=lambda groups, stats: [
            SmoothQuant(groups, stats, profile.activation, profile.weight, options.smooth_alpha)
        ],
        calibrate=Calibration(options.calib_method, options.percentile),
        quantize=lambda plan, qparams: [InsertQDQ(plan, qparams, profile), QuantizeEmbeddings()],
        lower=finalize(),  # the CPU clean-up phase serves unchanged
    )
