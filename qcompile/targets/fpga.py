"""FPGA-like target: integer-only dataflow with arbitrary bit widths (QONNX/FINN style).

- activations and weights signed symmetric, 2-8 bits each (`weight_bits`,
  `activation_bits`, and per node through overrides), stored in int8;
- power-of-two scales by default, so every requantization is a shift (multiplier 1);
- the graph is always lowered to integer-only arithmetic (`LowerToIntegerOnly`);
- `qcompile.backends.qonnx` exports it as QONNX (Quant nodes with bit widths) and
  `qcompile.targets.fpga_cost` estimates per-layer cost for the report.
"""

from __future__ import annotations

import dataclasses

from qcompile.numerics.qparams import QuantSpec
from qcompile.options import CompileOptions
from qcompile.profile import (
    ARITH_OPS,
    COMPUTE_OPS,
    INTEGER_ARITH_OPS,
    INTEGER_PASSTHROUGH_OPS,
    TABLE_OPS,
    TargetProfile,
)
from qcompile.quantize.qdq import InsertQDQ
from qcompile.targets import cpu
from qcompile.targets.pipeline import Calibration, Pipeline

PROFILE = TargetProfile(
    name="fpga",
    activation=QuantSpec(bits=8, signed=True, symmetric=True, scale_kind="pow2"),
    weight=QuantSpec(bits=8, signed=True, symmetric=True, narrow=True, scale_kind="pow2"),
    per_channel_weights=True,
    per_channel_matmul=True,
    # ConvTranspose: integer form for kernel = stride (lower/integer_upsample.py); other
    # shapes are refused by the lowering, naming the node
    compute_ops=COMPUTE_OPS,
    # elementwise ops become lookup tables, so they are quantized too
    arith_ops=(ARITH_OPS - {"Softmax"}) | TABLE_OPS | INTEGER_ARITH_OPS,
    remove_clamping_activations=False,
    integer_only=True,
    passthrough_ops=INTEGER_PASSTHROUGH_OPS,
    bit_widths=frozenset(range(2, 9)),
    log2_softmax=True,
    cost_model="layer-cycles",
    mixed_precision="weight-bits",
    default_backend="qonnx",
)


def profile_for(options: CompileOptions, base: TargetProfile = PROFILE) -> TargetProfile:
    """The profile with the options' default bit widths and scale form."""
    kind = "pow2" if options.pow2_scales else "float"
    return dataclasses.replace(
        base,
        activation=dataclasses.replace(
            base.activation, bits=options.activation_bits, scale_kind=kind
        ),
        weight=dataclasses.replace(base.weight, bits=options.weight_bits, scale_kind=kind),
    )


def pipeline(options: CompileOptions, profile: TargetProfile | None = None) -> Pipeline:
    profile = profile or profile_for(options)
    integer = dataclasses.replace(options, integer_only=True)
    return Pipeline(
        profile=profile,
        rewrite=cpu.rewrite(integer),
        calibrate=Calibration(options.calib_method, options.percentile),
        correct_bias=cpu.correct_bias(profile),
        quantize=lambda plan, qparams: [InsertQDQ(plan, qparams, profile)],
        lower=cpu.lower(integer, profile),
    )
