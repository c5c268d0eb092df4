"""FPGA-like target (placeholder until integer-only lowering lands).

Power-of-two scales so requantization is a shift; symmetric S8 everywhere. Arbitrary
2-8 bit widths, QONNX export and the cost model come with the integer-only issue; until
then this target produces a QDQ model with power-of-two scales that ORT runs.
"""

from __future__ import annotations

from qcompile.options import CompileOptions
from qcompile.pipeline import Calibration, Pipeline
from qcompile.quantize.qdq import InsertQDQ
from qcompile.quantize.qparams import QuantSpec
from qcompile.targets import cpu
from qcompile.targets.profile import COMPUTE_OPS, TargetProfile

PROFILE = TargetProfile(
    name="fpga",
    activation=QuantSpec(bits=8, signed=True, symmetric=True, scale_kind="pow2"),
    weight=QuantSpec(bits=8, signed=True, symmetric=True, narrow=True, scale_kind="pow2"),
    per_channel_weights=True,
    per_channel_matmul=True,
    compute_ops=COMPUTE_OPS,
    arith_ops=frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool"}),
    remove_clamping_activations=False,
    notes=("placeholder: bit widths below 8 and QONNX export arrive with integer-only lowering",),
)


def pipeline(options: CompileOptions, profile: TargetProfile = PROFILE) -> Pipeline:
    # No SmoothQuant and no int8 embedding side path: integer-only lowering comes later.
    return Pipeline(
        profile=profile,
        rewrite=cpu.rewrite(),
        calibrate=Calibration(options.calib_method, options.percentile),
        quantize=lambda plan, qparams: [InsertQDQ(plan, qparams, profile)],
        lower=cpu.finalize(),
    )
