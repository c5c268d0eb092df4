"""The search of mixed precision: candidates per layer, the ILP, verify and repair, the
Pareto front."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qcompile.errors import QCompileError
from qcompile.strategies.mixed.metrics import DropMetric

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str  # "fp32", "int8", "int4w" (INT4 weights, FP32 activations), fpga: "w6"...
    cost: float  # ms (latency: measured, fpga-latency: modelled) or bits (size objective)
    nsr: float  # output noise / signal power when only this layer is at this precision
    weight_bits: int | None = None  # FPGA: bits for this layer's weights; None: FP32/INT8


@dataclasses.dataclass
class LayerOptions:
    node: str
    op_type: str
    candidates: list[Candidate]


@dataclasses.dataclass
class SearchResult:
    choice: dict[str, str]  # node -> chosen label
    predicted_nsr: float
    predicted_cost: float
    verified_drop: float
    met: bool
    budget_nsr: float
    layers: list[LayerOptions]
    pareto: list[tuple[float, float]]  # (predicted cost, predicted nsr) over a sweep of B
    verified: list[tuple[float, float, float]]  # (predicted cost, nsr, measured drop)
    seconds: float
    objective: str


# -- metrics -------------------------------------------------------------------------------


# -- the ILP -------------------------------------------------------------------------------


def solve(
    layers: Sequence[LayerOptions],
    *,
    nsr_budget: float | None = None,
    cost_budget: float | None = None,
) -> dict[str, str] | None:
    """One candidate per layer: min Σ cost s.t. Σ nsr ≤ nsr_budget, or min Σ nsr s.t.
    Σ cost ≤ cost_budget. None when infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = [(i, j) for i, layer in enumerate(layers) for j in range(len(layer.candidates))]
    n = len(index)
    cost = np.array([layers[i].candidates[j].cost for i, j in index])
    nsr = np.array([layers[i].candidates[j].nsr for i, j in index])
    one_hot = np.zeros((len(layers), n))
    for k, (i, _) in enumerate(index):
        one_hot[i, k] = 1.0
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    if nsr_budget is not None:
        objective = cost
        constraints.append(LinearConstraint(nsr[None, :], -np.inf, nsr_budget))
    else:
        objective = nsr
        constraints.append(LinearConstraint(cost[None, :], -np.inf, cost_budget))
    res = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if not res.success or res.x is None:
        return None
    chosen = {}
    for k, (i, j) in enumerate(index):
        if res.x[k] > 0.5:
            chosen[layers[i].node] = layers[i].candidates[j].label
    return chosen


def totals(layers: Sequence[LayerOptions], choice: Mapping[str, str]) -> tuple[float, float]:
    cost = nsr = 0.0
    for layer in layers:
        c = next(c for c in layer.candidates if c.label == choice[layer.node])
        cost += c.cost
        nsr += c.nsr
    return cost, nsr


def pareto_sweep(layers: Sequence[LayerOptions], points: int = 16) -> list[tuple[float, float]]:
    """Predicted (cost, nsr) of the ILP optimum over a geometric sweep of NSR budgets."""
    top = sum(max(c.nsr for c in layer.candidates) for layer in layers)
    if top <= 0:
        return []
    front = []
    for budget in np.geomspace(top * 1e-4, top, points):
        choice = solve(layers, nsr_budget=float(budget))
        if choice is not None:
            front.append(totals(layers, choice))
    return sorted(set(front))


def save_pareto_png(result: SearchResult, path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    if result.pareto:
        c, n = zip(*result.pareto, strict=True)
        ax.plot(c, 10 * np.log10(np.maximum(n, 1e-12)), "o-", ms=3, label="ILP optimum (predicted)")
    for c, n, drop in result.verified:
        ax.scatter([c], [10 * np.log10(max(n, 1e-12))], color="tab:red", zorder=3)
        ax.annotate(f"drop {drop:.3%}", (c, 10 * np.log10(max(n, 1e-12))), fontsize=7)
    unit = {
        "latency": "ms (measured per-layer kernel time)",
        "fpga-latency": "ms (FPGA cost model: cycles at the clock)",
    }.get(result.objective, "weight bits")
    ax.set_xlabel(f"predicted cost: {unit}")
    ax.set_ylabel("predicted output noise (dB, NSR)")
    ax.set_title(title or "mixed precision: cost vs noise", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the search ----------------------------------------------------------------------------


def search(
    *,
    layers: list[LayerOptions],
    compile_choice: Callable[[dict[str, str]], list[list[np.ndarray]]],
    fp32_outputs: list[list[np.ndarray]],
    metric: DropMetric,
    max_drop: float | None,
    cost_budget: float | None,
    initial_nsr_budget: float,
    objective: str,
    max_steps: int = 8,
    deadline: float = math.inf,
) -> SearchResult:
    """ILP + verify + repair. `compile_choice(choice)` compiles a choice and returns its
    outputs on the verification feeds. Anytime: past `deadline` (a `time.perf_counter()`
    value) no further step starts, and the best verified choice so far is returned."""
    start = time.perf_counter()
    verified: list[tuple[float, float, float]] = []
    pareto = pareto_sweep(layers)
    best = None
    budget = initial_nsr_budget
    for step in range(max_steps):
        choice = (
            solve(layers, cost_budget=cost_budget)
            if max_drop is None
            else solve(layers, nsr_budget=budget)
        )
        if choice is None:
            break
        cost, nsr = totals(layers, choice)
        drop = metric(fp32_outputs, compile_choice(choice))
        verified.append((cost, nsr, drop))
        logger.info(
            "mixed precision step %d: budget %.3g, cost %.4g, drop %.4f", step, budget, cost, drop
        )
        met = max_drop is None or drop <= max_drop
        if met:
            best = (choice, cost, nsr, drop, True)
            break
        if best is None or drop < best[3]:
            best = (choice, cost, nsr, drop, False)
        if max_drop is None:
            break
        if time.perf_counter() > deadline:
            logger.info("mixed precision: time budget spent after %d verified steps", step + 1)
            break
        budget = min(budget, nsr) / 2.0  # repair: every step keeps more layers precise
    if best is None:
        raise QCompileError(
            "no mixed-precision choice fits the budget",
            hint="raise --max-accuracy-drop or the cost budget",
        )
    choice, cost, nsr, drop, met = best
    return SearchResult(
        choice=choice,
        predicted_nsr=nsr,
        predicted_cost=cost,
        verified_drop=drop,
        met=met,
        budget_nsr=budget,
        layers=layers,
        pareto=pareto,
        verified=verified,
        seconds=time.perf_counter() - start,
        objective=objective,
    )
