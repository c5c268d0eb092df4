"""The one mapping between command-line flags and `CompileOptions` fields.

Every option flag names its field; argparse gets no defaults of its own (a flag not
given leaves the field's default), so the dataclass is the only place a default lives.
docs/options.md is generated from FLAGS (`python -m qcompile.cli.flags`), and a test
checks it is current.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qcompile.options import CALIB_METHODS, CompileOptions

OPTION_FIELDS = {f.name: f for f in dataclasses.fields(CompileOptions)}


def fraction(text: str) -> float:
    """'0.5%' -> 0.005; '0.005' -> 0.005."""
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from exc


@dataclass(frozen=True)
class Flag:
    flag: str
    field: str  # the CompileOptions field it sets
    help: str
    # "value": --flag VALUE; "on"/"off": a switch setting the field True/False;
    # "append": repeatable, the values collected into a tuple
    kind: str = "value"
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    # "model": compile and inspect; "compile": compile only
    scope: str = "model"
    # CLI text -> field value, for the few that differ (e.g. "none" -> None)
    convert: Callable[[Any], Any] | None = None
    # "value" flags that may also be given bare: the value that means
    bare: str | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kwargs: dict[str, Any] = {"dest": self.field, "default": argparse.SUPPRESS}
        default = OPTION_FIELDS[self.field].default
        text = self.help
        if self.kind in ("on", "off"):
            kwargs["action"] = "store_true"
        else:
            if self.kind == "append":
                kwargs["action"] = "append"
            else:
                kwargs["type"] = self.type
                if default not in (None, dataclasses.MISSING) and not isinstance(default, tuple):
                    text += f" (default: {default})"
            if self.bare is not None:
                kwargs["nargs"], kwargs["const"] = "?", self.bare
            if self.choices:
                kwargs["choices"] = self.choices
            if self.metavar:
                kwargs["metavar"] = self.metavar
        parser.add_argument(self.flag, help=text.replace("%", "%%"), **kwargs)

    def value(self, given: Any) -> Any:
        if self.kind == "on":
            return True
        if self.kind == "off":
            return False
        if self.kind == "append":
            given = tuple(given)
        return self.convert(given) if self.convert else given


def _input_shapes(given: tuple[str, ...]):
    from qcompile.ir.shapes import parse_input_shapes

    return tuple((k, tuple(v)) for k, v in parse_input_shapes(list(given)).items())


FLAGS: tuple[Flag, ...] = (
    # what gets quantized (compile and inspect)
    Flag("--input-shape", "input_shapes", "pin a dynamic input shape (repeatable)", "append",
         metavar="NAME=D0,D1,...", convert=_input_shapes),
    Flag("--exclude", "exclude", "keep matching nodes FP32: node name, op:TYPE or re:REGEX "
         "(repeatable)", "append", metavar="PATTERN"),
    Flag("--override", "overrides", "per-node settings: exclude, per_channel, calib_method, "
         "percentile, weight_bits, activation_bits (repeatable)", "append",
         metavar="PATTERN:key=value,..."),
    Flag("--per-tensor", "per_channel", "per-tensor weights instead of per-channel", "off"),
    Flag("--reduce-range", "reduce_range", "cpu target: 7-bit weights for x86 without VNNI, "
         "whose uint8×int8 kernels saturate full-range weights (auto: probe this machine)",
         choices=("auto", "on", "off")),
    Flag("--quantize-softmax", "quantize_softmax", "also quantize Softmax", "on"),
    Flag("--integer-only", "integer_only", "lower to integer-only arithmetic between input "
         "quantizer and output dequantizer (always on for --target fpga)", "on"),
    Flag("--allow-float", "allow_float", "ops that may stay float islands in an integer-only "
         "graph (repeatable; default: none)", "append",
         metavar="PATTERN"),
    Flag("--weight-bits", "weight_bits", "FPGA target: weight bits (2-8)", type=int),
    Flag("--activation-bits", "activation_bits", "FPGA target: activation bits (2-8)", type=int),
    Flag("--float-scales", "pow2_scales", "FPGA target: float scales (dyadic requantization) "
         "instead of powers of two", "off"),
    Flag("--softmax-log2", "softmax_log2_bits", "FPGA target: log2 quantizer (2-4 bits) on "
         "Softmax outputs feeding a MatMul", type=int, metavar="BITS"),
    Flag("--fpga-macs-per-cycle", "fpga_macs_per_cycle", "FPGA cost model: 8x8-bit MACs per "
         "cycle (narrower ones fit more)", type=int),
    Flag("--fpga-clock-mhz", "fpga_clock_mhz", "FPGA cost model clock", type=float),
    Flag("--already-quantized", "already_quantized", "when the input is already quantized: "
         "stop, return it unchanged, or dequantize its QDQ pairs and compile again",
         choices=("error", "keep", "requantize")),
    Flag("--no-smoothquant", "smoothquant", "disable SmoothQuant on LayerNorm-fed linear "
         "layers", "off"),
    Flag("--smooth-alpha", "smooth_alpha", "fix SmoothQuant's alpha (default: searched per "
         "layer)", type=float),
    Flag("--smooth-explicit", "smooth_explicit", "also smooth inputs without a foldable "
         "producer (GELU -> FFN2), inserting a float Mul (auto: unless integer-only, where "
         "the consumer has >= 64 output columns; bare flag: on)", choices=("auto", "on", "off"),
         bare="on"),
    Flag("--smooth-shift", "smooth_shift", "also centre LayerNorm-fed channels (OS+/RepQ-ViT "
         "shift, folded into β and biases)", "on"),
    Flag("--rotate", "rotate", "rotate RMSNorm residual streams (LLaMA-like decoders) by a "
         "randomized Hadamard matrix folded into the weights (QuaRot, FP32-exact): spreads "
         "outlier channels before quantization", "on"),
    Flag("--equalize-hardswish", "equalize_hardswish", "cross-layer equalization across "
         "HardSwish via a 1x1 depthwise gate Conv per pair (costs time; auto: compile again "
         "with it when the worst output SQNR is below 25 dB, keep it if it gains 1 dB)",
         choices=("auto", "on", "off")),
    Flag("--bias-correction", "bias_correction", "correct each biased layer's output mean for "
         "weight rounding (one more calibration run; helps most with per-tensor, 4-bit or "
         "power-of-two weights)", "on"),
    Flag("--disable-pass", "disabled_passes", "leave a pass out (names from `qcompile "
         "passes`; repeatable)", "append", metavar="NAME"),
    Flag("--token-mask", "token_mask", "input marking real tokens; padding is not calibrated "
         "on", metavar="INPUT|auto|none", convert=lambda v: None if v == "none" else v),
    # calibration, measurement and searches (compile only)
    Flag("--calib-method", "calib_method", "activation ranges; auto tries mse, percentile "
         "and minmax on the one calibration run, and CLE on/off, and keeps the best output "
         "SQNR", choices=CALIB_METHODS, scope="compile"),
    Flag("--percentile", "percentile", "percentile of |x| for --calib-method percentile",
         type=float, scope="compile"),
    Flag("--no-calib-confidence", "calib_confidence", "skip the report's calibration "
         "confidence (the most influential calibration feed left out: one more quantize "
         "and three sessions)", "off", scope="compile"),
    Flag("--calib-batch-size", "calib_batch_size", "samples per feed for dynamic batch",
         type=int, scope="compile"),
    Flag("--max-calib-batches", "max_calib_batches", "calibrate on at most this many feeds",
         type=int, scope="compile"),
    Flag("--holdout-every", "holdout_every", "every n-th calibration feed is held out for "
         "the report", type=int, scope="compile"),
    Flag("--seed", "seed", "seed for --calib random", type=int, scope="compile"),
    Flag("--verify-passes", "verify_passes", "check FP32 equivalence after each pass", "on",
         scope="compile"),
    Flag("--pass-effects", "pass_effects", "recompile without each accuracy pass and report "
         "the SQNR it bought", "on", scope="compile"),
    Flag("--bench-runs", "bench_runs", "latency runs in the report (0: skip)", type=int,
         scope="compile"),
    Flag("--no-speed-guard", "speed_guard", "ship the quantized model even where it runs "
         "slower than FP32 (default: slower nodes stay float, or FP32 is returned)", "off",
         scope="compile"),
    Flag("--time-budget", "time_budget_s", "seconds for the searches (auto, mixed precision, "
         "the speed guard): each returns the best model found when it is spent", type=float,
         metavar="SECONDS", scope="compile"),
    Flag("--threads", "threads", "ONNX Runtime threads (default: all cores)", type=int,
         scope="compile"),
    Flag("--fanout", "fanout", "where the searches' accuracy runs go (mixed precision's "
         "sensitivities, --calib-method auto's candidates): serial (here) or ray (Ray "
         "tasks; pip install 'qcompile[ray]'); timing stays here", choices=("serial", "ray"),
         scope="compile"),
    Flag("--ray-address", "ray_address", "--fanout ray: the Ray cluster to use (default: "
         "a local Ray started on the fly, or the one this process already joined)",
         metavar="ADDRESS", scope="compile"),
    Flag("--int4-weights", "int4_weights", "MatMuls (node name, op:TYPE or re:REGEX; "
         "repeatable) that get block-wise INT4 weights with FP32 activations (ORT "
         "MatMulNBits) instead of INT8: smaller; compute per --int4-accuracy-level", "append", metavar="PATTERN",
         scope="compile"),
    Flag("--int4-accuracy-level", "int4_accuracy_level", "MatMulNBits compute: 0 (FP32), 4 "
         "(int8 activations per block); default: the faster of both at ≤ 1 dB output SQNR "
         "cost, measured", type=int, choices=None, metavar="LEVEL", scope="compile"),
    Flag("--max-accuracy-drop", "max_accuracy_drop", "mixed precision: largest accepted "
         "drop of --metric, e.g. 0.5% or 0.005; the fastest (fpga: smallest) per-layer "
         "choice that meets it", type=fraction, metavar="DROP", scope="compile"),
    Flag("--metric", "metric", "mixed precision: what the budget limits: cosine (first "
         "output vs FP32), top1 (share of arg-max answers that change) or accuracy (top-1 "
         "accuracy against --labels)", choices=("cosine", "top1", "accuracy"),
         scope="compile"),
    Flag("--labels", "labels", "--metric accuracy: one class per verification sample, in "
         "order (.npy, or text with one integer per line)", metavar="LABELS",
         scope="compile"),
    Flag("--size-budget", "size_budget_mb", "mixed precision: weight size budget", type=float,
         metavar="MB", scope="compile"),
    Flag("--latency-budget", "latency_budget_ms", "mixed precision: summed layer-time budget "
         "(fpga: cycles of the cost model at --fpga-clock-mhz, integer kernels included)",
         type=float, metavar="MS", scope="compile"),
    Flag("--mixed-verify-feeds", "mixed_verify_feeds", "mixed precision: feeds a choice is "
         "verified on", type=int, scope="compile"),
    Flag("--sensitivity", "sensitivity", "mixed precision: per-layer sensitivity from each "
         "candidate's real quantization error (measured) or HAWQ-V2's Hessian trace × error "
         "power (trace)", choices=("measured", "trace"), scope="compile"),
    Flag("--pareto", "pareto_png", "mixed precision: write the cost/noise Pareto plot",
         metavar="PNG", scope="compile"),
    Flag("--cache-dir", "cache_dir", "keep calibration statistics, mixed precision's "
         "measured sensitivities and costs, and the speed guard's decisions here, keyed by "
         "content (graph, data, settings, versions); a rerun reuses them (a shared "
         "directory works)", metavar="DIR", scope="compile"),
)  # fmt: skip

# Fields set otherwise: `progress` by --quiet and whether stderr is a terminal.
NOT_FLAGS = frozenset({"progress"})


def add_flags(parser: argparse.ArgumentParser, scope: str) -> None:
    for flag in FLAGS:
        if scope == "compile" or flag.scope == "model":
            flag.add_to(parser)


def options_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The CompileOptions fields the user set on the command line (and only those)."""
    given = vars(args)
    return {f.field: f.value(given[f.field]) for f in FLAGS if f.field in given}


def markdown_table() -> str:
    """docs/options.md's table: flag, field, default, meaning."""
    rows = ["| flag | `CompileOptions` field | default | meaning |", "|---|---|---|---|"]
    for f in FLAGS:
        field = OPTION_FIELDS[f.field]
        default = field.default
        if default is dataclasses.MISSING:
            default = field.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple):
            default = ", ".join(getattr(d, "pattern", str(d)) for d in default) or "()"
        switch = {"on": " (switch: True)", "off": " (switch: False)"}.get(f.kind, "")
        rows.append(f"| `{f.flag}` | `{f.field}`{switch} | `{default}` | {f.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
