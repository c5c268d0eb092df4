"""What a target's pipeline is made of: phases of passes around the calibration stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.calibrate.observers import Observer, make_observer
from qcompile.numerics.qparams import QParams
from qcompile.options import CalibMethod
from qcompile.profile import TargetProfile
from qcompile.quantize.quant_plan import QuantPlan

QuantizePhase = Callable[[QuantPlan, Mapping[str, QParams]], list[ir.passes.PassBase]]
# smooth(groups, channel statistics) -> passes; statistics come from a calibration run
SmoothPhase = Callable[[Sequence[Any], Mapping[str, Any]], list[ir.passes.PassBase]]
# correct_bias(plan, per-channel input means) -> passes run before quantize (opt-in)
BiasPhase = Callable[[QuantPlan, Mapping[str, np.ndarray]], list[ir.passes.PassBase]]


@dataclass(frozen=True)
class Calibration:
    """The calibration stage's settings; per-tensor overrides come from the plan."""

    method: CalibMethod
    percentile: float

    def observer_for(self, plan: QuantPlan) -> Callable[[str], Observer]:
        def make(tensor: str) -> Observer:
            method, percentile = plan.tensor_methods.get(tensor, (self.method, self.percentile))
            return make_observer(method, tensor, percentile=percentile)  # type: ignore[arg-type]

        return make

    def key_for(self, plan: QuantPlan) -> Callable[[str], tuple[str, float]]:
        """What decides a tensor's observer, so statistics are reused only for the same."""
        return lambda t: plan.tensor_methods.get(t, (self.method, self.percentile))


@dataclass(frozen=True)
class Pipeline:
    profile: TargetProfile
    rewrite: list[ir.passes.PassBase]
    calibrate: Calibration
    quantize: QuantizePhase
    lower: list[ir.passes.PassBase]
    smooth: SmoothPhase | None = None  # runs between rewrite and calibration
    correct_bias: BiasPhase | None = None  # runs before quantize when asked
