"""The FPGA target's latency as mixed precision trades it: modelled, not measured.

ONNX Runtime's per-layer times on this machine say nothing about an FPGA, so with
`--latency-budget-ms` on the fpga target each layer's cost is its cycles in the target's
cost model (`targets/fpga_cost.py`) at `--fpga-clock-mhz`: a MAC layer's cycles shrink
with its weight bits (narrower multipliers, more of them in the same fabric), while the
other integer kernels — norms, Softmax, lookup tables, pools, requantizing adds
(`targets/fpga_kernels.py`) — and MAC layers without a constant weight (attention's
activation × activation MatMuls) cost the same whatever the weight bits: they are the
fixed part of the budget, which the search subtracts before choosing bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qcompile.errors import QCompileError
from qcompile.targets.fpga_cost import mac_cycles


def layer_latency(
    fpga_layers: Sequence[dict], layer_nodes: Sequence[str], macs_per_cycle: int, clock_mhz: float
) -> tuple[dict[str, Callable[[int], float]], float]:
    """(per searched layer: weight bits → its modelled ms, the ms of everything else),
    from the all-INT8 compile's report rows (`CompileReport.fpga_layers`)."""
    ms_per_cycle = 1e-3 / clock_mhz
    searched = set(layer_nodes)
    per_layer: dict[str, Callable[[int], float]] = {}
    fixed = 0.0
    for row in fpga_layers:
        if row["node"] in searched and row["macs"]:
            macs, a_bits = int(row["macs"]), int(row["activation_bits"])

            def ms(bits: int, macs=macs, a_bits=a_bits) -> float:
                return mac_cycles(macs, bits, a_bits, macs_per_cycle) * ms_per_cycle

            per_layer[row["node"]] = ms
        else:
            fixed += int(row["cycles"]) * ms_per_cycle
    return per_layer, fixed


def layer_budget(budget_ms: float, fixed_ms: float, clock_mhz: float, fastest_ms: float) -> float:
    """The part of `budget_ms` the searched layers may spend; refuses a budget that the
    fixed kernels, or every layer at its narrowest weights, already exceed."""
    if fixed_ms + fastest_ms > budget_ms:
        raise QCompileError(
            f"--latency-budget-ms {budget_ms:g} cannot be met on this FPGA model: at "
            f"{clock_mhz:g} MHz the integer kernels that weight bits do not change (norms, "
            f"Softmax, tables, activation MatMuls) take {fixed_ms:.4f} ms and the MAC layers "
            f"at their narrowest weights {fastest_ms:.4f} ms",
            hint="raise the budget, --fpga-clock-mhz or --fpga-macs-per-cycle",
        )
    return budget_ms - fixed_ms
