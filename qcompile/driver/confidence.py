"""How much the compiled result depends on the calibration set: leave one feed out.

A few calibration feeds decide every activation range; when one feed alone widens many
of them (an image brighter than the rest, a longer sentence), another set of the same
size would give other scales and another model. Recalibrating once per left-out feed
would cost a compile per feed, so the estimate reads what the observers already saw:

1. Per tensor and per feed, the range that feed reached (kept by `Observer`). The range
   without feed k is the union of the others; its shrink 1 − width₋ₖ/width says how much
   that one feed set the tensor's range.
2. The most influential feed k* (the largest summed shrink) is left out for real: every
   activation's clipping range, read by the compile's own method, is narrowed by the
   same factors at each end, the model is quantized again, and its worst output SQNR on
   the held-out feeds is compared with the compiled model's, measured the same way.

The estimate narrows ranges as min/max would; MSE- or percentile-clipped ranges move
less when an extreme feed goes, so it errs on the side of warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile.backends import ort as ort_backend
from qcompile.calibrate.runner import CalibrationStats
from qcompile.data.feeds import Feed
from qcompile.driver.measure import accumulate, sqnr
from qcompile.numerics.qparams import QParams, range_to_qparams

SET_BY_ONE_FEED = 0.10  # a range that shrinks by more than this without one feed
SENSITIVE_DB = 1.0  # leaving the most influential feed out moves the worst output this much
# Above this output SQNR both models are indistinguishable from FP32 for users (8-bit
# tensors alone sit near 40-50 dB): a move there is not a warning.
HIGH_SQNR_DB = 40.0
CONFIDENCE_FEEDS = 4  # held-out feeds the two SQNRs are measured on
WORST_LISTED = 5


def _feed_ranges(obs, batches: int) -> np.ndarray | None:
    """The observer's (min, max) per calibration feed, when it saw each feed once."""
    ranges = np.asarray(getattr(obs, "feed_ranges", ()), np.float64)
    if ranges.ndim != 2 or len(ranges) < 2 or len(ranges) != batches:
        return None
    return ranges


def _span(ranges: np.ndarray) -> tuple[float, float]:
    """The [lo, hi] these feeds reach, widened to include 0 (as every range is)."""
    return min(0.0, ranges[:, 0].min()), max(0.0, ranges[:, 1].max())


def _width(span: tuple[float, float]) -> float:
    return span[1] - span[0]


def range_shrinks(stats: CalibrationStats) -> dict[str, np.ndarray]:
    """Per calibrated tensor with two or more feeds: the relative shrink of its range
    [min, max] when each feed is left out (0: another feed reaches as far)."""
    shrinks: dict[str, np.ndarray] = {}
    for name, obs in stats.observers.items():
        ranges = _feed_ranges(obs, stats.batches)
        if ranges is None:
            continue
        width = _width(_span(ranges))
        if width == 0.0:
            continue
        loo = [_width(_span(np.delete(ranges, k, axis=0))) for k in range(len(ranges))]
        shrinks[name] = 1.0 - np.asarray(loo) / width
    return shrinks


def without_feed(
    qparams: Mapping[str, QParams], stats: CalibrationStats, feed: int
) -> dict[str, QParams]:
    """Activation parameters as if calibration feed `feed` had not been seen: each
    per-tensor clipping range narrowed by that tensor's own leave-one-out factors."""
    out = dict(qparams)
    for name, q in qparams.items():
        ranges = _feed_ranges(stats.observers.get(name), stats.batches)
        if q.per_channel or ranges is None:
            continue
        full_lo, full_hi = _span(ranges)
        rest_lo, rest_hi = _span(np.delete(ranges, feed, axis=0))
        scale, zero = float(q.scale), float(q.zero_point)
        lo, hi = scale * (q.spec.qmin - zero), scale * (q.spec.qmax - zero)
        lo *= rest_lo / full_lo if full_lo < 0 else 1.0
        hi *= rest_hi / full_hi if full_hi > 0 else 1.0
        out[name] = range_to_qparams(lo, hi, q.spec)
    return out


def _worst(sums: Mapping[int, list[float]]) -> float:
    values = [sqnr(s) for s in sums.values()]  # NaN: float32 sums overflowed (huge outputs)
    return min((v for v in values if not np.isnan(v)), default=float("inf"))


def measure_sqnr(
    fp32: object, compiled: object, left_out: object, feeds: Sequence[Feed]
) -> tuple[list[float], float, float]:
    """Each session run once per feed: the compiled model's worst output SQNR per feed
    and pooled over the feeds (as the report's outputs), and the left-out model's pooled."""
    per_feed: list[float] = []
    pooled: dict[int, list[float]] = {}
    pooled_left: dict[int, list[float]] = {}
    for feed in feeds:
        ref, got, alt = (s.run(None, dict(feed)) for s in (fp32, compiled, left_out))
        this: dict[int, list[float]] = {}
        for i, (a, b, c) in enumerate(zip(ref, got, alt, strict=True)):
            if np.issubdtype(np.asarray(a).dtype, np.floating):
                for sums, q in ((this, b), (pooled, b), (pooled_left, c)):
                    accumulate(sums.setdefault(i, [0.0] * 5), a, q)
        per_feed.append(float(_worst(this)))
    return per_feed, _worst(pooled), _worst(pooled_left)


def calibration_confidence(
    stats: CalibrationStats,
    qparams: Mapping[str, QParams],
    fp32_model: ir.Model,
    quantize: Callable[[dict[str, QParams]], ir.Model],
    threads: int | None,
) -> dict:
    """The report's `calibration_confidence` (see the module docstring)."""
    feeds = stats.holdout[:CONFIDENCE_FEEDS]
    record: dict = {"calibration_feeds": stats.batches, "measured_on_feeds": len(feeds)}
    shrinks = {t: s for t, s in range_shrinks(stats).items() if t in qparams}
    if stats.batches < 2 or not shrinks or not feeds:
        record["verdict"] = (
            "no estimate: one calibration feed (give several, so that leaving one out "
            "can be measured)"
            if stats.batches < 2
            else "no estimate: no activation range or held-out feed to measure"
        )
        return record
    names = sorted(shrinks)
    matrix = np.stack([shrinks[t] for t in names])  # tensors × feeds
    worst = matrix.max(axis=1)
    feed = int(np.argmax(matrix.sum(axis=0)))
    set_by = int((matrix[:, feed] > SET_BY_ONE_FEED).sum())
    order = np.argsort(-worst)[:WORST_LISTED]
    record.update(
        ranges_set_by_one_feed=float((worst > SET_BY_ONE_FEED).mean()),
        most_influential_feed=feed,
        ranges_it_widens=set_by,
        tensors=len(names),
        worst_ranges=[
            {
                "tensor": names[i],
                "shrink_without_feed": float(worst[i]),
                "feed": int(np.argmax(matrix[i])),
            }
            for i in order
            if worst[i] > 0
        ],
    )
    make = ort_backend.make_session
    fp32 = make(fp32_model, threads=threads)
    compiled = make(quantize(dict(qparams)), threads=threads)
    left_out = make(quantize(without_feed(qparams, stats, feed)), threads=threads)
    per_feed, base, moved = measure_sqnr(fp32, compiled, left_out, feeds)
    delta = moved - base
    record.update(
        worst_output_sqnr_db=base,
        without_feed_sqnr_db=moved,
        delta_db=delta if np.isfinite(delta) else 0.0,
        per_feed_sqnr_db=per_feed,
    )
    sensitive = (
        bool(np.isfinite(delta)) and abs(delta) >= SENSITIVE_DB and min(base, moved) < HIGH_SQNR_DB
    )
    record["verdict"] = (
        f"{'sensitive' if sensitive else 'stable'}: leaving out calibration feed {feed}, "
        f"which alone sets {set_by} of {len(names)} activation ranges (>10%), moves the "
        f"worst output SQNR {base:.1f} -> {moved:.1f} dB"
        + (": more calibration data would likely change the result" if sensitive else "")
    )
    return record
