"""Typed compile options. The CLI, the Python API and config files all map onto these.

Invalid combinations are rejected in `__post_init__` with a QCompileError, not explained
in prose somewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from qcompile.errors import QCompileError

CalibMethod = Literal["minmax", "percentile", "entropy", "mse", "auto"]
CALIB_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse", "auto")


def _check_method(method: str | None, what: str) -> None:
    if method is not None and method not in CALIB_METHODS:
        raise QCompileError(
            f"unknown calibration method '{method}' in {what}",
            hint=f"choose one of {', '.join(CALIB_METHODS)}",
        )


def _check_bits(bits: int | None, what: str) -> None:
    if bits is not None and not 2 <= bits <= 8:
        raise QCompileError(f"{what} must be in 2..8, got {bits}")


def _check_percentile(p: float | None) -> None:
    if p is not None and not 50.0 < p <= 100.0:
        raise QCompileError(f"percentile must be in (50, 100], got {p}")


@dataclass(frozen=True)
class NodeMatcher:
    """Selects nodes by exact name, by op type ('op:Conv') or by regex ('re:^head/.*')."""

    pattern: str

    def __post_init__(self) -> None:
        if not self.pattern:
            raise QCompileError("empty node pattern", hint="use a node name, op:TYPE or re:REGEX")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as exc:
                raise QCompileError(f"bad regex in node pattern '{self.pattern}': {exc}") from exc

    def matches(self, node_name: str, op_type: str) -> bool:
        if self.pattern.startswith("op:"):
            return op_type == self.pattern[3:]
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], node_name) is not None
        return node_name == self.pattern


@dataclass(frozen=True)
class NodeOverride:
    """Per-node settings; the last override that matches a node wins."""

    match: NodeMatcher
    exclude: bool = False
    per_channel: bool | None = None
    calib_method: CalibMethod | None = None
    percentile: float | None = None
    weight_bits: int | None = None  # FPGA target: this node's weights
    activation_bits: int | None = None  # FPGA target: this node's output

    def __post_init__(self) -> None:
        _check_method(self.calib_method, f"override '{self.match.pattern}'")
        _check_percentile(self.percentile)
        _check_bits(self.weight_bits, f"override '{self.match.pattern}': weight_bits")
        _check_bits(self.activation_bits, f"override '{self.match.pattern}': activation_bits")

    @classmethod
    def parse(cls, text: str) -> NodeOverride:
        """Parse 'PATTERN:key=value,...' (keys: exclude, per_channel, calib_method, percentile,
        weight_bits, activation_bits)."""
        pattern, sep, settings = text.rpartition(":")
        if not sep or not pattern or "=" not in settings:
            raise QCompileError(
                f"bad override '{text}'",
                hint="write PATTERN:key=value[,key=value], e.g. 're:head.*:calib_method=minmax'",
            )
        kwargs: dict[str, object] = {}
        for item in settings.split(","):
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if key in ("exclude", "per_channel"):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise QCompileError(f"override '{text}': {key} must be true or false")
                kwargs[key] = value.lower() in ("true", "1")
            elif key == "calib_method":
                kwargs[key] = value
            elif key in ("weight_bits", "activation_bits"):
                try:
                    kwargs[key] = int(value)
                except ValueError as exc:
                    raise QCompileError(f"override '{text}': {key} must be an integer") from exc
            elif key == "percentile":
                try:
                    kwargs[key] = float(value)
                except ValueError as exc:
                    raise QCompileError(f"override '{text}': percentile must be a number") from exc
            else:
                raise QCompileError(
                    f"override '{text}': unknown key '{key}'",
                    hint="keys are exclude, per_channel, calib_method, percentile, weight_bits, "
                    "activation_bits",
                )
        return cls(match=NodeMatcher(pattern), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CompileOptions:
    calib_method: CalibMethod = "mse"
    percentile: float = 99.99
    per_channel: bool = True
    quantize_softmax: bool = False
    # cpu target: 7-bit weights, for x86 CPUs without VNNI whose uint8×int8 kernels
    # saturate int16 pair sums with full-range weights ("auto": probe this machine's ORT)
    reduce_range: str = "auto"
    # SmoothQuant on linear layers fed by a LayerNorm (α searched per group when None);
    # smooth_explicit also smooths inputs with no foldable producer via an inserted Mul
    # ("auto": where the target keeps float elementwise ops, i.e. not integer-only, and
    # the consumers are wide enough that the Mul costs nothing measurable);
    # smooth_shift also centres each channel (folded into β and the consumers' biases);
    # off by default: on MiniLM it moved top-5 agreement 0.935 -> 0.928 (noise level).
    smoothquant: bool = True
    smooth_alpha: float | None = None
    smooth_explicit: str = "auto"
    smooth_shift: bool = False
    # QuaRot-style rotation of RMSNorm residual streams (LLaMA-like decoders), folded into
    # the embedding and linear weights: FP32-exact, spreads outlier channels before
    # quantization; off by default until measured on a trained model that ships in a wheel
    rotate: bool = False
    # cross-layer equalization across HardSwish (a 1×1 depthwise gate Conv per pair, which
    # costs time): "auto" compiles again with it when the worst output SQNR is poor
    equalize_hardswish: str = "auto"
    # estimate how much the result depends on the calibration set (leave one feed out)
    calib_confidence: bool = True
    # subtract (Q(W) − W)·E[x] from Conv/Gemm/MatMul biases (one more calibration run)
    bias_correction: bool = False
    # pass names (as `qcompile passes` lists them) to leave out of the pipeline
    disabled_passes: tuple[str, ...] = ()
    exclude: tuple[NodeMatcher, ...] = ()
    # cpu/gpu: MatMuls with a constant 2-D weight that get block-wise INT4 weights and
    # keep FP32 activations (ORT MatMulNBits) instead of INT8
    int4_weights: tuple[NodeMatcher, ...] = ()
    # MatMulNBits' accuracy_level: 0 (FP32 compute), 4 (int8 compute); None: measured
    int4_accuracy_level: int | None = None
    overrides: tuple[NodeOverride, ...] = ()
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Samples per feed when a calibration array is stacked along a dynamic batch axis.
    # Input marking real tokens ([batch, seq], 1 = token); "auto" picks an integer input
    # named like attention_mask; None observes every position, padding included.
    token_mask: str | None = "auto"
    calib_batch_size: int = 8
    max_calib_batches: int | None = None
    # Every n-th calibration feed is held out for the report (and not calibrated on).
    holdout_every: int = 5
    verify_passes: bool = False
    # Recompile without each accuracy pass (CLE, SmoothQuant, fusions) and report the
    # output SQNR each one bought.
    pass_effects: bool = False
    # An input model that is already quantized: "error" (stop and say so), "keep" (return
    # it unchanged), "requantize" (dequantize its QDQ pairs, then compile as FP32)
    already_quantized: str = "error"
    # Integer-only lowering (always on for the FPGA target): only integer ops between the
    # input quantizer and the output dequantizer. Float islands must be allowed by name,
    # op:TYPE or re:REGEX (none by default: LayerNorm, Softmax, GELU... have integer forms,
    # and an op without one is refused by name rather than left float silently).
    integer_only: bool = False
    allow_float: tuple[NodeMatcher, ...] = ()
    # FPGA target: default bit widths (per node: overrides) and scale form
    weight_bits: int = 8
    activation_bits: int = 8
    pow2_scales: bool = True
    # FPGA target: Softmax outputs read by a MatMul (attention probabilities) get a log2
    # quantizer of this many bits (2-4), so attention·V is a shift-add (RepQ-ViT)
    softmax_log2_bits: int | None = None
    # FPGA cost model: 8x8-bit MACs per cycle the fabric budget fits, and its clock
    fpga_macs_per_cycle: int = 256
    fpga_clock_mhz: float = 200.0
    # Mixed precision (qcompile.strategies.mixed): an accuracy budget (0.005 = 0.5% drop of
    # `metric`: "cosine", "top1" (agreement with FP32's arg-max), "accuracy" (against
    # `labels`: one class per verification sample, in order; an array or a .npy path) or
    # a callable(fp32_outs, quant_outs) -> drop) with the least latency (cpu/gpu) or
    # weight memory (fpga); or a size/latency budget with the least output noise.
    # Verified on up to mixed_verify_feeds calibration (or verification) feeds.
    max_accuracy_drop: float | None = None
    metric: Any = "cosine"
    labels: Any = None
    size_budget_mb: float | None = None
    latency_budget_ms: float | None = None
    mixed_verify_feeds: int = 24
    pareto_png: str | None = None
    # mixed precision: a folder that keeps each search's measurements (sensitivities and
    # per-layer costs), keyed by model, quantization and data, so a rerun (another
    # budget, another metric) skips them
    cache_dir: str | None = None
    # mixed precision: "measured" (each candidate's real quantization error, the default)
    # or "trace" (HAWQ-V2: Gauss-Newton trace × quantization noise power, for comparison)
    sensitivity: str = "measured"
    bench_runs: int = 20
    # Never slower than FP32 (qcompile.strategies.speed_guard): measure the compiled model
    # against FP32 on the target's provider; nodes that run slower quantized stay float,
    # and the FP32 model is returned when no quantized variant is faster.
    speed_guard: bool = True
    # Wall-clock seconds for the searches (auto, mixed precision, the speed guard): each
    # stops when it is spent and returns the best model found so far.
    time_budget_s: float | None = None
    threads: int | None = None
    # Where the searches' independent accuracy runs go (qcompile.driver.fanout): "serial"
    # (here) or "ray" (Ray tasks on a local Ray started on the fly, or on `ray_address`).
    # Timing always stays in this process.
    fanout: str = "serial"
    ray_address: str | None = None
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_method(self.calib_method, "--calib-method")
        _check_percentile(self.percentile)
        if self.calib_batch_size < 1:
            raise QCompileError("calib_batch_size must be >= 1")
        if self.max_calib_batches is not None and self.max_calib_batches < 1:
            raise QCompileError("max_calib_batches must be >= 1")
        if self.holdout_every < 2:
            raise QCompileError("holdout_every must be >= 2 (at least every other feed calibrates)")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise QCompileError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.int4_accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise QCompileError(
                f"int4_accuracy_level must be 0-4, got {self.int4_accuracy_level}",
                hint="0: FP32 compute, 4: int8 compute; leave it unset to measure both",
            )
        if self.smooth_explicit not in ("auto", "on", "off"):
            raise QCompileError(
                f"smooth_explicit must be auto, on or off, got {self.smooth_explicit!r}"
            )
        if self.reduce_range not in ("auto", "on", "off"):
            raise QCompileError(f"reduce_range must be auto, on or off, got {self.reduce_range!r}")
        if self.already_quantized not in ("error", "keep", "requantize"):
            raise QCompileError(
                f"already_quantized must be error, keep or requantize, got {self.already_quantized!r}"
            )
        _check_bits(self.weight_bits, "weight_bits")
        _check_bits(self.activation_bits, "activation_bits")
        if self.softmax_log2_bits is not None and self.softmax_log2_bits not in (2, 3, 4):
            raise QCompileError(
                f"softmax_log2_bits must be 2, 3 or 4, got {self.softmax_log2_bits}",
                hint="4 bits keep probabilities down to 2^-14; more would need more thresholds",
            )
        if self.fpga_macs_per_cycle < 1 or self.fpga_clock_mhz <= 0:
            raise QCompileError("fpga_macs_per_cycle and fpga_clock_mhz must be positive")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop < 1.0:
            raise QCompileError(
                f"max_accuracy_drop must be a fraction in [0, 1), got {self.max_accuracy_drop}",
                hint="0.5% is 0.005 (the CLI also takes '0.5%')",
            )
        if self.max_accuracy_drop is not None and (self.size_budget_mb or self.latency_budget_ms):
            raise QCompileError("give an accuracy budget or a size/latency budget, not both")
        if not callable(self.metric) and self.metric not in ("cosine", "top1", "accuracy"):
            raise QCompileError(
                f"unknown metric '{self.metric}'", hint="use cosine, top1 or accuracy"
            )
        if (self.metric == "accuracy") != (self.labels is not None):
            raise QCompileError(
                "metric 'accuracy' and labels go together",
                hint="--metric accuracy needs --labels LABELS.npy; labels are only read "
                "by --metric accuracy",
            )
        if self.sensitivity not in ("measured", "trace"):
            raise QCompileError(
                f"unknown sensitivity '{self.sensitivity}'", hint="use measured or trace"
            )
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise QCompileError(f"time budget must be positive, got {self.time_budget_s} s")
        if self.bench_runs < 0:
            raise QCompileError("bench_runs must be >= 0")
        if self.fanout not in ("serial", "ray"):
            raise QCompileError(f"fanout must be 'serial' or 'ray', got {self.fanout!r}")
        if self.threads is not None and self.threads < 1:
            raise QCompileError("threads must be >= 1")

    def override_for(self, node_name: str, op_type: str) -> NodeOverride | None:
        found = None
        for override in self.overrides:
            if override.match.matches(node_name, op_type):
                found = override
        return found

    def float_allowed(self, node_name: str, op_type: str) -> bool:
        """May this node stay a float island in an integer-only graph?"""
        return self.is_excluded(node_name, op_type) or any(
            m.matches(node_name, op_type) for m in self.allow_float
        )

    def wants_int4(self, node_name: str, op_type: str) -> bool:
        return any(m.matches(node_name, op_type) for m in self.int4_weights)

    def is_excluded(self, node_name: str, op_type: str) -> bool:
        if any(m.matches(node_name, op_type) for m in self.exclude):
            return True
        override = self.override_for(node_name, op_type)
        return bool(override and override.exclude)


assert set(get_args(CalibMethod)) == set(CALIB_METHODS)

__all__ = ["CompileOptions", "NodeMatcher", "NodeOverride"]
