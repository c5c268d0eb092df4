"""Mixed precision under a budget: per-layer sensitivity, measured cost, an ILP, a check.

Users state a budget ("at most 0.5% accuracy drop, as fast as possible"), not a scheme:

1. **Sensitivity** (HAWQ-style, measured rather than Hessian-estimated): the output
   noise-to-signal ratio when only layer l runs at candidate precision c. One session
   serves every layer: the FP32 graph gets, per (layer, candidate), a boolean input that
   switches the layer (an `If`) to a twin on fake-quantized inputs with the
   quantized-dequantized weight, so each measurement is one run with one flag on — no
   model rebuild or session per layer.
2. **Cost**, measured on the target: per-layer kernel time from ONNX Runtime's profiler
   on the all-INT8 and the FP32 model (CPU/GPU targets), or weight memory bits (FPGA).
3. **Solve** with scipy's MILP: one candidate per layer, minimize total cost subject to
   Σ sensitivity ≤ B (noise powers of independent layers add), or minimize Σ sensitivity
   subject to a cost budget.
4. **Verify** the compiled choice with the user's metric on their data and **repair**:
   while the budget is missed, halve B and solve again (each step keeps more layers
   precise). The Pareto front (predicted cost vs predicted noise over a sweep of B, and
   the verified points) goes to the report and, on request, a PNG.
"""

from qcompile.strategies.mixed.cache import MeasurementCache
from qcompile.strategies.mixed.metrics import (
    ARGMAX_METRICS,
    DropMetric,
    accuracy_drop,
    cosine_drop,
    near_tie_feeds,
    resolve_metric,
    top1_drop,
)
from qcompile.strategies.mixed.search import (
    Candidate,
    LayerOptions,
    SearchResult,
    pareto_sweep,
    save_pareto_png,
    search,
    solve,
    totals,
)
from qcompile.strategies.mixed.sensitivity import UNMEASURED_NSR, sensitivities, switch_model

__all__ = [
    "ARGMAX_METRICS",
    "Candidate",
    "DropMetric",
    "LayerOptions",
    "MeasurementCache",
    "SearchResult",
    "accuracy_drop",
    "cosine_drop",
    "near_tie_feeds",
    "pareto_sweep",
    "resolve_metric",
    "save_pareto_png",
    "search",
    "UNMEASURED_NSR",
    "sensitivities",
    "solve",
    "switch_model",
    "top1_drop",
    "totals",
]
