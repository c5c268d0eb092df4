"""Calibration observers: one class per method, in the shape of PyTorch AO's observers.

An observer sees activation batches through `observe(x)` and produces quantization
parameters through `qparams(spec)`, which always ends in `range_to_qparams`. Histogram
observers keep a fixed number of bins over a symmetric range [-R, R] that grows by
doubling: doubling with a bin count divisible by 4 merges bins pairwise, so re-binning is
exact and memory never depends on the number of batches.

An observer that saw no data, or saw NaN/Inf, raises instead of guessing.
"""

from __future__ import annotations

import math

import numpy as np

from qcompile.errors import QCompileError
from qcompile.numerics.qparams import QParams, QuantSpec, range_to_qparams
from qcompile.options import CALIB_METHODS, CalibMethod

# What "auto" tries: the compile keeps whichever gives the best output SQNR on up to 16
# calibration feeds (qcompile.strategies.auto_method).
# Entropy is left out: it collapsed PP-OCR det/rec/cls in benchmarks/RESULTS.md.
AUTO_METHODS: tuple[str, ...] = ("mse", "percentile", "minmax")


# Values this large are masking sentinels (attention masks filled with finfo.min or -inf),
# not data: no 8-bit range can hold them and the real values next to them.
SENTINEL = 1e30
# A batch of at least twice this many values is histogrammed from every value in its tails
# plus a strided sample of at least this many for the body (HistogramObserver.observe):
# binning is ~1 ns a value and was half of the CNNs' compile time (COMPILE_TIME.md). On the
# zoo CNNs the resulting output SQNR moved less than leaving one calibration feed out does.
HISTOGRAM_SAMPLE = 1 << 16
# The tails counted exactly: beyond the |x| that held this fraction of the values seen so
# far, which covers where the MSE/percentile/KL searches clip at 4 to 8 bits.
TAIL_FRACTION = 1 / 128


class Observer:
    """Running min/max plus the bookkeeping shared by all methods."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        # Set when the tensor held NaN, ±Inf or masking sentinels: it cannot be quantized.
        self.unbounded = False
        # (min, max) of each batch observed: what leaving one feed out would change
        # (qcompile.driver.confidence)
        self.feed_ranges: list[tuple[float, float]] = []

    def observe(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0 or self.unbounded:
            return
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (math.isfinite(lo) and math.isfinite(hi)) or max(-lo, hi) >= SENTINEL:
            self.unbounded = True
            return
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += x.size
        self.feed_ranges.append((lo, hi))

    def _check_seen(self) -> None:
        if self.unbounded:
            raise QCompileError(
                "this tensor held NaN, Inf or masking sentinels during calibration",
                tensor=self.name,
                hint="keep its producer/consumers FP32 (qcompile does this by itself) or fix the overflow",
            )
        if self.count == 0:
            raise QCompileError(
                "the observer saw no data, so no range can be computed",
                tensor=self.name,
                hint="give calibration data that reaches this tensor",
            )

    def clip_range(self, spec: QuantSpec) -> tuple[float, float]:
        """The clipping range [lo, hi] this method chooses."""
        raise NotImplementedError

    def qparams(self, spec: QuantSpec) -> QParams:
        self._check_seen()
        lo, hi = self.clip_range(spec)
        return range_to_qparams(lo, hi, spec)


class MinMaxObserver(Observer):
    """The full observed range: fast, outlier-sensitive."""

    def clip_range(self, spec: QuantSpec) -> tuple[float, float]:
        return self.min, self.max


class HistogramObserver(Observer):
    """Streaming histogram over [-R, R] with `bins` bins; R doubles when data exceeds it."""

    def __init__(self, name: str = "", bins: int = 4096) -> None:
        super().__init__(name)
        if bins % 4:
            raise ValueError("bins must be divisible by 4 for exact re-binning")
        self.bins = bins
        self.radius = 0.0
        self.hist = np.zeros(bins, dtype=np.float64)
        # Exact zeros (ReLU outputs, padding) are kept out of the histogram: zero is always
        # exactly representable, and a spike there would dominate KL and MSE searches.
        self.zeros = 0.0

    def observe(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        super().observe(x)
        if self.unbounded:
            return
        peak = max(abs(self.min), abs(self.max))
        if self.radius == 0.0:
            self.radius = peak if peak > 0 else 1.0
        while peak > self.radius:
            self._double()
        flat = x.astype(np.float32, copy=False).ravel()
        stride = flat.size // HISTOGRAM_SAMPLE
        tail = self._tail_bins() if stride >= 2 else None
        if tail is None:
            counts, zeros = self._bin(flat)
        else:
            # Large tensor: the tails (where the clipping searches decide) from every value,
            # the body from a strided sample scaled to the body's true count.
            edge = np.float32(tail * self.bin_width)
            in_tails = flat >= edge
            if self.min < 0.0:  # one-sided data (ReLU outputs) skips the second pass
                in_tails |= flat < -edge
            tails = flat[in_tails]
            counts, zeros = self._bin(flat[::stride])
            half = self.bins // 2
            counts[: half - tail] = 0.0
            counts[half + tail :] = 0.0
            sampled = counts.sum() + zeros
            weight = (flat.size - tails.size) / sampled if sampled else 0.0
            counts *= weight
            zeros *= weight
            counts += self._bin(tails)[0]
        self.zeros += zeros
        self.hist += counts

    def _bin(self, flat: np.ndarray) -> tuple[np.ndarray, float]:
        """Counts of `flat` per bin (exact zeros left out) and the number of exact zeros."""
        # np.histogram's uniform-bin path, without its checks: index arithmetic + bincount;
        # exact zeros are binned too and then moved out of the histogram (no masked copy).
        # radius >= peak, so positions lie in [0, bins]; the one value that can land on
        # `bins` (x == R) is folded into the last bin instead of clipping every position.
        scale = self.bins / (2.0 * self.radius)
        if scale < 1e30:  # positions x·scale stay finite in float32
            pos = np.multiply(flat, np.float32(scale))
            pos += np.float32(self.bins // 2)
        else:  # ranges below ~1e-27 (vanishing activations): x·scale in float64
            pos = flat.astype(np.float64) * scale + self.bins // 2
        counts = np.bincount(pos.astype(np.intp), minlength=self.bins + 1).astype(np.float64)
        counts[self.bins - 1] += counts[self.bins :].sum()
        counts = counts[: self.bins]
        # +0.0 has all bits clear: counting nonzero int32 words is ~5x faster than floats
        # (-0.0 stays in the histogram's zero bin, where it changes nothing)
        zeros = flat.size - int(np.count_nonzero(flat.view(np.int32)))
        counts[self.bins // 2] -= zeros
        return counts, float(zeros)

    def _tail_bins(self) -> int | None:
        """Half-width, in bins, of the body to sample: beyond it lay TAIL_FRACTION of the
        values seen so far. None before any data (the first large batch is binned in full)."""
        folded = self.abs_hist()
        total = folded.sum()
        if total <= 0:
            return None
        beyond = np.cumsum(folded[::-1])[::-1]  # beyond[k]: values with |x| in bins >= k
        return max(int(np.searchsorted(-beyond, -total * TAIL_FRACTION)), 1)

    def _double(self) -> None:
        # Old bins cover the middle half of the new range; adjacent pairs merge exactly.
        merged = self.hist.reshape(-1, 2).sum(axis=1)
        quarter = self.bins // 4
        new = np.zeros_like(self.hist)
        new[quarter : quarter + merged.size] = merged
        self.hist = new
        self.radius *= 2.0

    @property
    def bin_width(self) -> float:
        return 2.0 * self.radius / self.bins

    @property
    def centers(self) -> np.ndarray:
        w = self.bin_width
        return -self.radius + w * (np.arange(self.bins) + 0.5)

    def abs_hist(self) -> np.ndarray:
        """Histogram of |x| with bins/2 bins over [0, R] (exact fold of the signed one)."""
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1]

    def _one_sided(self) -> bool:
        return self.min >= 0.0


class PercentileObserver(HistogramObserver):
    """Clip at the p-th percentile (and 100−p for the low end); p≈99.99."""

    def __init__(self, name: str = "", bins: int = 4096, percentile: float = 99.99) -> None:
        super().__init__(name, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def clip_range(self, spec: QuantSpec) -> tuple[float, float]:
        q = self.percentile / 100.0
        if spec.symmetric or self._one_sided():
            hist = self.abs_hist()
            hist[0] += self.zeros
            t = _quantile(hist, self.radius, q)
            t = min(t, max(abs(self.min), abs(self.max)))
            return (0.0, t) if self._one_sided() else (-t, t)
        hist = self.hist.copy()
        hist[self.bins // 2] += self.zeros
        cdf = np.cumsum(hist) / hist.sum()
        edges = -self.radius + self.bin_width * np.arange(1, self.bins + 1)
        hi = float(edges[np.searchsorted(cdf, q)])
        lo_idx = np.searchsorted(cdf, 1.0 - q)
        lo = float(edges[lo_idx] - self.bin_width)
        return max(lo, self.min), min(hi, self.max)


def _quantile(abs_hist: np.ndarray, radius: float, q: float) -> float:
    cdf = np.cumsum(abs_hist) / max(abs_hist.sum(), 1.0)
    idx = int(np.searchsorted(cdf, q))
    width = radius / abs_hist.size
    return float(min(idx + 1, abs_hist.size) * width)


class EntropyObserver(HistogramObserver):
    """TensorRT's KL calibration: the threshold T minimizing KL(P‖Q) of |x|'s histogram."""

    def __init__(self, name: str = "", bins: int = 4096, max_candidates: int = 512) -> None:
        super().__init__(name, bins)
        self.max_candidates = max_candidates

    def clip_range(self, spec: QuantSpec) -> tuple[float, float]:
        one_sided = self._one_sided()
        levels = (spec.qmax - spec.qmin + 1) if one_sided else (spec.qmax - spec.qmin + 1) // 2
        hist = self.abs_hist()
        t = _kl_threshold(hist, self.radius / hist.size, levels, self.max_candidates)
        t = min(t, max(abs(self.min), abs(self.max)))
        if one_sided:
            return 0.0, t
        if spec.symmetric:
            return -t, t
        return max(-t, self.min), min(t, self.max)


def _kl_threshold(hist: np.ndarray, width: float, levels: int, max_candidates: int) -> float:
    nbins = hist.size
    nonzero = np.nonzero(hist)[0]
    if nonzero.size == 0:
        return width
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return last * width  # fewer occupied bins than levels: no clipping needed
    step = max(1, (last - levels) // max_candidates)
    best_t, best_kl = last, math.inf
    for i in range(levels, last + 1, step):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        # Quantize the first i bins into `levels` groups, spread back over non-empty bins.
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        group_sum = np.bincount(groups, weights=hist[:i], minlength=levels)
        group_nz = np.bincount(groups, weights=(hist[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(hist[:i] > 0, group_sum[groups] / np.maximum(group_nz[groups], 1.0), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_t = kl, i
    return min(best_t, nbins) * width


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return math.inf
    q = q / qs
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class MSEObserver(HistogramObserver):
    """The range minimizing expected squared quantization error over the histogram."""

    def __init__(self, name: str = "", bins: int = 4096, grid: int = 100) -> None:
        super().__init__(name, bins)
        self.grid = grid

    def clip_range(self, spec: QuantSpec) -> tuple[float, float]:
        centers, counts = self.centers, self.hist
        mask = counts > 0
        centers, counts = centers[mask], counts[mask]
        full_lo, full_hi = min(self.min, 0.0), max(self.max, 0.0)
        # All candidate ranges are scored at once: (candidates x bins) in one numpy pass.
        f = np.linspace(1.0 / self.grid, 1.0, self.grid)
        errors = _expected_sq_errors(centers, counts, full_lo * f, full_hi * f, spec)
        best = int(np.argmin(errors))
        lo, hi = full_lo * f[best], full_hi * f[best]
        if not spec.symmetric and full_lo < 0.0 < full_hi:
            # Coordinate refinement of each end for asymmetric ranges.
            g = np.linspace(0.5, 1.5, 41)
            best_err = errors[best]
            for _ in range(2):
                los = np.maximum(lo * g, full_lo)
                errs = _expected_sq_errors(centers, counts, los, np.full_like(los, hi), spec)
                if errs.min() < best_err:
                    best_err, lo = errs.min(), los[int(np.argmin(errs))]
                his = np.minimum(hi * g, full_hi)
                errs = _expected_sq_errors(centers, counts, np.full_like(his, lo), his, spec)
                if errs.min() < best_err:
                    best_err, hi = errs.min(), his[int(np.argmin(errs))]
        return float(lo), float(hi)


def _expected_sq_errors(
    centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """Histogram-weighted squared quantization error for each candidate range [lo_i, hi_i]."""
    qp = range_to_qparams(lo, hi, spec, axis=0)
    scale = qp.scale.astype(np.float64)[:, None]
    zp = qp.zero_point.astype(np.float64)[:, None]
    q = np.clip(np.rint(centers[None, :] / scale) + zp, spec.qmin, spec.qmax)
    err = centers[None, :] - (q - zp) * scale
    return (err * err) @ counts


def make_observer(method: CalibMethod, name: str, *, percentile: float = 99.99) -> Observer:
    """The observer for a calibration method name ("auto" collects a histogram that every
    method can read: see `read_as`)."""
    if method == "minmax":
        return MinMaxObserver(name)
    if method == "percentile":
        return PercentileObserver(name, percentile=percentile)
    if method == "entropy":
        return EntropyObserver(name)
    if method in ("mse", "auto"):
        return MSEObserver(name)
    raise QCompileError(
        f"unknown calibration method '{method}'", hint=f"choose one of {', '.join(CALIB_METHODS)}"
    )


def read_as(observer: Observer, method: CalibMethod, percentile: float = 99.99) -> Observer:
    """The same statistics read by another method: histogram observers share one state
    (range, histogram, zero count), so one calibration run serves every method."""
    if not isinstance(observer, HistogramObserver):
        raise TypeError(f"{type(observer).__name__} keeps no histogram to read as {method}")
    other = make_observer(method, observer.name, percentile=percentile)
    for key in vars(observer).keys() & vars(other).keys() - {"name"}:
        setattr(other, key, getattr(observer, key))
    return other


def weight_qparams(w: np.ndarray, spec: QuantSpec, axis: int | None) -> QParams:
    """Symmetric weight parameters from max|W| per output channel (`axis`) or per tensor."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        return range_to_qparams(float(w.min(initial=0.0)), float(w.max(initial=0.0)), spec)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    lo = moved.min(axis=1, initial=0.0)
    hi = moved.max(axis=1, initial=0.0)
    return range_to_qparams(lo, hi, spec, axis=axis)
