"""NPU-like target: the integer datapath of typical edge accelerators.

Symmetric S8 activations (zero point 0, so no zero-point correction terms in the MAC
array) and per-tensor S8 weights (one requantization multiplier per layer). Data
movement and the CPU target's arithmetic ops are quantized; the graph stays QDQ, so
ONNX Runtime's CPU EP checks it, and an NPU toolchain reads its scales.
"""

from __future__ import annotations

from qcompile.numerics.qparams import QuantSpec
from qcompile.options import CompileOptions
from qcompile.profile import ARITH_OPS, COMPUTE_OPS, TargetProfile
from qcompile.targets import cpu
from qcompile.targets.pipeline import Pipeline

PROFILE = TargetProfile(
    name="npu",
    activation=QuantSpec(bits=8, signed=True, symmetric=True),
    weight=QuantSpec(bits=8, signed=True, symmetric=True, narrow=True),
    per_channel_weights=False,
    per_channel_matmul=False,
    compute_ops=COMPUTE_OPS - {"ConvTranspose"},
    arith_ops=ARITH_OPS - {"HardSwish", "Softmax"},
    remove_clamping_activations=False,
)


def pipeline(options: CompileOptions, profile: TargetProfile = PROFILE) -> Pipeline:
    # The CPU target's phases serve unchanged; the profile is what differs.
    return cpu.pipeline(options, profile)
