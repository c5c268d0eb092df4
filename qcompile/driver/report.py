"""The compile report: what was quantized, how much accuracy it cost, size and speed.

Per-tensor SQNR comes in two forms: `local` is the error of quantizing the FP32 tensor
alone (the calibration choice), `accumulated` compares the quantized model's dequantized
tensor with FP32 (where errors pile up). Output SQNR/cosine and latency are measured on
the deployed model itself, never a simulation of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TensorReport:
    name: str
    scale: float
    zero_point: int
    sqnr_local_db: float
    sqnr_db: float


@dataclass
class OutputGroup:
    """A slice of an output that a Concat assembled from one branch (a detector's scores
    beside its boxes): its own SQNR, which the whole output's can hide."""

    source: str  # the tensor the Concat took this slice from
    axis: int
    start: int
    stop: int
    sqnr_db: float


@dataclass
class OutputReport:
    name: str
    sqnr_db: float
    cosine: float
    groups: list[OutputGroup] = field(default_factory=list)


# Bumped when a field changes meaning or goes away (docs/report.md lists the fields).
SCHEMA_VERSION = 2


def options_record(options: Any) -> dict[str, Any]:
    """The options a compile used, as plain JSON values (node patterns as strings)."""

    def plain(value: Any) -> Any:
        if callable(value) and not isinstance(value, type):
            return getattr(value, "__name__", "callable")
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if hasattr(value, "pattern") and len(vars(value)) == 1:  # NodeMatcher
            return value.pattern
        if hasattr(value, "__dataclass_fields__"):
            return {k: plain(v) for k, v in vars(value).items()}
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    return {k: plain(v) for k, v in vars(options).items()}


@dataclass
class CompileReport:
    target: str
    input_model: str | None = None
    schema_version: int = SCHEMA_VERSION
    # every CompileOptions field as used (after a strategy's choices)
    options: dict[str, Any] = field(default_factory=dict)
    output_model: str | None = None
    calib_method: str = ""
    # --calib-method auto: output SQNR (dB) of each method tried on calibration feeds
    calib_method_scores: dict[str, float] = field(default_factory=dict)
    calib_batches: int = 0
    holdout_batches: int = 0
    holdout_is_calibration: bool = False
    calib_seconds: float = 0.0
    calib_model_seconds: float = 0.0
    # statistics came from an earlier variant of the same job (a strategy's), not a run
    calibration_reused: bool = False
    compile_seconds: float = 0.0
    ort_run_seconds: float = 0.0  # inside ONNX Runtime running a model (calibration, measuring)
    ort_session_seconds: float = 0.0  # inside ONNX Runtime building sessions
    observer_seconds: float = 0.0  # inside calibration observers (every calibration run)
    passes: list[dict[str, Any]] = field(default_factory=list)
    quantized_ops: dict[str, int] = field(default_factory=dict)
    skipped_nodes: dict[str, str] = field(default_factory=dict)
    removed_activations: list[str] = field(default_factory=list)
    ort_ops: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorReport] = field(default_factory=list)
    outputs: list[OutputReport] = field(default_factory=list)
    size_fp32_bytes: int = 0
    size_quantized_bytes: int = 0
    latency_fp32_ms: float | None = None
    latency_quantized_ms: float | None = None
    bench_threads: int | None = None
    notes: list[str] = field(default_factory=list)
    integer_only: bool = False
    integer_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes lowered
    float_islands: list[dict[str, str]] = field(default_factory=list)  # node, op_type, reason
    # FPGA target: per-layer cost model (qcompile.targets.fpga_cost)
    fpga_layers: list[dict[str, Any]] = field(default_factory=list)
    fpga_macs_per_cycle: int | None = None
    fpga_clock_mhz: float | None = None
    # --pass-effects: output SQNR without each accuracy pass, and what the pass gained
    pass_effects: list[dict[str, Any]] = field(default_factory=list)
    # mixed precision: the search, its per-layer choices and the Pareto front
    mixed_precision: dict[str, Any] | None = None
    # INT4 weight-only MatMuls: MatMulNBits' accuracy_level, how it was chosen, and
    # the measured latency and output SQNR of each level
    int4: dict[str, Any] | None = None
    # leave-one-feed-out estimate of how much the result depends on the calibration set
    # (qcompile.driver.confidence)
    calibration_confidence: dict[str, Any] = field(default_factory=dict)
    # the speed guard: applied or why not, variants measured, nodes left float and why
    speed_guard: dict[str, Any] | None = None

    @property
    def qcompile_seconds(self) -> float:
        """Compile time outside ONNX Runtime and the observers: import, passes, parameter
        search, QDQ insertion, checker, report."""
        return (
            self.compile_seconds
            - self.ort_run_seconds
            - self.ort_session_seconds
            - self.observer_seconds
        )

    @property
    def speedup(self) -> float | None:
        if self.latency_fp32_ms and self.latency_quantized_ms:
            return self.latency_fp32_ms / self.latency_quantized_ms
        return None

    @property
    def fpga_weight_memory_bits(self) -> int:
        return sum(layer["weight_memory_bits"] for layer in self.fpga_layers)

    @property
    def fpga_latency_ms(self) -> float | None:
        if not self.fpga_layers or not self.fpga_clock_mhz:
            return None
        return sum(layer["cycles"] for layer in self.fpga_layers) / (self.fpga_clock_mhz * 1e3)

    @property
    def min_output_sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=math.inf)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["speedup"] = self.speedup
        data["fpga_weight_memory_bits"] = self.fpga_weight_memory_bits
        data["fpga_latency_ms"] = self.fpga_latency_ms
        return _finite(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def print(self, console=None, *, max_tensors: int = 25) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console(stderr=True)
        summary = Table(title=f"qcompile → {self.target}", show_header=False)
        summary.add_column("what")
        summary.add_column("value")
        summary.add_row(
            "quantized ops",
            ", ".join(f"{k}×{v}" for k, v in sorted(self.quantized_ops.items())) or "none",
        )
        summary.add_row(
            "calibration",
            f"{self.calib_method}, {self.calib_batches} feeds, {self.calib_seconds:.2f}s "
            f"({self.calib_model_seconds:.2f}s in the model)"
            + (
                " (chosen by --calib-method auto; output SQNR per method: "
                + ", ".join(f"{m} {v:.1f} dB" for m, v in self.calib_method_scores.items())
                + ")"
                if self.calib_method_scores
                else ""
            ),
        )
        summary.add_row(
            "held-out feeds",
            f"{self.holdout_batches}"
            + (" (reused calibration data)" if self.holdout_is_calibration else ""),
        )
        if self.calibration_confidence.get("verdict"):
            summary.add_row("calibration confidence", self.calibration_confidence["verdict"])
        for out in self.outputs:
            summary.add_row(
                f"output {out.name}", f"SQNR {out.sqnr_db:.1f} dB, cosine {out.cosine:.5f}"
            )
            for g in out.groups:
                summary.add_row(
                    f"  [{g.start}:{g.stop}] on axis {g.axis}",
                    f"SQNR {g.sqnr_db:.1f} dB (from {g.source})",
                )
        summary.add_row("size", f"{_mb(self.size_fp32_bytes)} → {_mb(self.size_quantized_bytes)}")
        if self.speedup is not None:
            summary.add_row(
                "latency (median)",
                f"{self.latency_fp32_ms:.2f} ms → {self.latency_quantized_ms:.2f} ms "
                f"({self.speedup:.2f}×, {self.bench_threads} threads)",
            )
        guard = self.speed_guard
        if guard is not None:
            summary.add_row(
                "speed guard",
                guard["decision"] + (" (cached decision)" if guard["cache_hit"] else "")
                if guard["applied"]
                else f"not applied: {guard['reason']}",
            )
        summary.add_row(
            "compile time",
            f"{self.compile_seconds:.2f}s: {self.ort_run_seconds:.2f}s running the model and "
            f"{self.ort_session_seconds:.2f}s building sessions in ONNX Runtime, "
            f"{self.observer_seconds:.2f}s in calibration observers, "
            f"{self.qcompile_seconds:.2f}s in the rest of qcompile",
        )
        for effect in self.pass_effects:
            summary.add_row(
                f"pass {effect['pass']}",
                f"{effect['sqnr_db_gain']:+.2f} dB output SQNR "
                f"({effect['sqnr_db_without']:.1f} dB without it)",
            )
        if self.integer_only:
            summary.add_row(
                "integer-only",
                ", ".join(f"{k}×{v}" for k, v in sorted(self.integer_ops.items())) or "nothing",
            )
            summary.add_row(
                "float islands",
                ", ".join(f"{i['node']} ({i['op_type']})" for i in self.float_islands) or "none",
            )
        for note in self.notes:
            summary.add_row("note", note)
        console.print(summary)
        if self.fpga_layers:
            table = Table(
                title=f"FPGA cost model ({self.fpga_macs_per_cycle} 8x8 MACs/cycle at "
                f"{self.fpga_clock_mhz:g} MHz; first-order: no memory bandwidth or fill)"
            )
            cols = ("layer", "op", "MACs", "ops/lookups/div", "w bits", "a bits", "weight kbit")
            for col in (*cols, "cycles"):
                table.add_column(col)
            for layer in self.fpga_layers:
                other = [layer.get(k, 0) for k in ("ops", "lookups", "divisions")]
                table.add_row(
                    layer["node"],
                    layer["op_type"],
                    f"{layer['macs']:,}",
                    "/".join(f"{x:,}" for x in other) if any(other) else "",
                    str(layer["weight_bits"]),
                    str(layer["activation_bits"]),
                    f"{layer['weight_memory_bits'] / 1e3:.1f}",
                    f"{layer['cycles']:,}",
                )
            table.add_row(
                "total",
                "",
                f"{sum(x['macs'] for x in self.fpga_layers):,}",
                "",
                "",
                "",
                f"{self.fpga_weight_memory_bits / 1e3:.1f}",
                f"{sum(x['cycles'] for x in self.fpga_layers):,} ({self.fpga_latency_ms:.3f} ms)",
            )
            console.print(table)
        if self.mixed_precision:
            mp = self.mixed_precision
            table = Table(
                title=f"mixed precision: {mp['metric']} drop {mp['verified_drop']:.4f} "
                f"(budget {mp['max_accuracy_drop']}, {'met' if mp['budget_met'] else 'MISSED'}), "
                f"objective {mp['objective']}, search {mp['search_seconds']:.1f}s"
            )
            for col in ("layer", "op", "choice", "sensitivity dB per candidate", "cost"):
                table.add_column(col)
            for layer in mp["layers"]:
                cands = layer["candidates"]
                table.add_row(
                    layer["node"],
                    layer["op_type"],
                    layer["choice"],
                    ", ".join(
                        f"{k} {v['nsr_db']:.0f}" for k, v in cands.items() if v["nsr_db"] > -290
                    ),
                    f"{cands[layer['choice']]['cost']:.4g}",
                )
            console.print(table)
        if self.tensors:
            table = Table(title="worst quantized tensors (accumulated SQNR)")
            for col in ("tensor", "scale", "zp", "local dB", "accum. dB"):
                table.add_column(col)
            for t in sorted(self.tensors, key=lambda t: t.sqnr_db)[:max_tensors]:
                table.add_row(
                    t.name,
                    f"{t.scale:.3g}",
                    str(t.zero_point),
                    f"{t.sqnr_local_db:.1f}",
                    f"{t.sqnr_db:.1f}",
                )
            console.print(table)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
