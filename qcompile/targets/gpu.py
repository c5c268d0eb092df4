"""GPU target: ONNX Runtime's TensorRT and CUDA EPs.

TensorRT's explicit quantization wants S8 symmetric activations and weights, Q/DQ on the
inputs of Conv/Gemm/MatMul and on residual Add inputs; it fuses Conv+Relu itself, so
activations stay in the graph (a symmetric zero point cannot clamp them away).
"""

from __future__ import annotations

from qcompile.numerics.qparams import QuantSpec
from qcompile.options import CompileOptions
from qcompile.profile import COMPUTE_OPS, TargetProfile
from qcompile.targets import cpu
from qcompile.targets.pipeline import Pipeline

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
    int4_weights=True,
)


def pipeline(options: CompileOptions, profile: TargetProfile = PROFILE) -> Pipeline:
    # The CPU target's phases serve unchanged; the profile is what differs.
    return cpu.pipeline(options, profile)
