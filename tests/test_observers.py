import numpy as np
import pytest

from qcompile.calibrate.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
    read_as,
    weight_qparams,
)
from qcompile.errors import QCompileError
from qcompile.numerics.qparams import QuantSpec, fake_quantize, range_to_qparams

U8 = QuantSpec(bits=8, signed=False, symmetric=False)
S8 = QuantSpec(bits=8, signed=True, symmetric=True)


def batches(seed=0, n=10, heavy=False):
    """Batches whose range grows (forcing re-binning); heavy=True gives Student-t tails."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        if heavy:
            x = rng.standard_t(2.5, (8, 256)).astype(np.float32) * (1 + i / 3)
        else:
            x = rng.standard_normal((8, 256)).astype(np.float32) * (1 + i / 3)
        yield x


def test_minmax_matches_numpy():
    obs = MinMaxObserver("t")
    data = list(batches())
    for x in data:
        obs.observe(x)
    allx = np.concatenate([x.ravel() for x in data])
    qp = obs.qparams(U8)
    ref = range_to_qparams(allx.min(), allx.max(), U8)
    assert float(qp.scale) == float(ref.scale) and int(qp.zero_point) == int(ref.zero_point)


def test_histogram_streaming_equals_one_shot():
    """Doubling the range re-bins exactly: streaming equals histogramming all data at once."""
    data = list(batches(heavy=True))
    streamed = HistogramObserver("t", bins=4096)
    for x in data:
        streamed.observe(x)
    allx = np.concatenate([x.ravel() for x in data])
    expect, _ = np.histogram(allx, bins=4096, range=(-streamed.radius, streamed.radius))
    # ties at bin edges may land one bin apart after merging; totals and shape must agree
    assert streamed.hist.sum() == allx.size
    assert np.abs(streamed.hist - expect).sum() <= 0.001 * allx.size


def _large_batches(n=6, size=1 << 20, seed=1, one_sided=False):
    """Large heavy-tailed batches (sampled by the observer) with a few far outliers each."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x = rng.standard_t(3.0, size).astype(np.float32)
        x[rng.integers(0, size, 5)] = rng.uniform(30.0, 60.0, 5).astype(np.float32)
        yield np.maximum(x, 0.0) if one_sided else x


@pytest.mark.parametrize("one_sided", [False, True])
def test_large_tensors_count_tails_exactly_and_sample_the_body(one_sided):
    """Above HISTOGRAM_SAMPLE values a batch's body comes from a weighted strided sample,
    its tails from every value: the tails equal the full histogram's, the totals agree."""
    from qcompile.calibrate import observers

    data = list(_large_batches(one_sided=one_sided))
    assert data[0].size >= 4 * observers.HISTOGRAM_SAMPLE
    sampled = HistogramObserver("t", bins=4096)
    for x in data:
        sampled.observe(x)
    full = HistogramObserver("t", bins=4096)
    try:
        saved, observers.HISTOGRAM_SAMPLE = observers.HISTOGRAM_SAMPLE, 1 << 40
        for x in data:
            full.observe(x)
    finally:
        observers.HISTOGRAM_SAMPLE = saved
    assert sampled.radius == full.radius
    total = sum(x.size for x in data)
    assert sampled.hist.sum() + sampled.zeros == pytest.approx(total, rel=1e-6)
    assert full.hist.sum() + full.zeros == total
    # in the tails every value is counted, the outliers included
    fold_s, fold_f = sampled.abs_hist(), full.abs_hist()
    tail_mass = 0.5 * observers.TAIL_FRACTION * total
    tail_start = int(np.searchsorted(-np.cumsum(fold_f[::-1])[::-1], -tail_mass))
    np.testing.assert_array_equal(fold_s[tail_start:], fold_f[tail_start:])
    far = int(np.ceil(25.0 / (sampled.radius / fold_s.size)))  # bin of |x| = 25
    far_values = sum(int((np.abs(x) >= far * sampled.radius / fold_s.size).sum()) for x in data)
    assert far_values >= len(data) * 5 and fold_s[far:].sum() == far_values
    # the sampled body has the full body's shape (relative L1 error, bins merged by 4)
    coarse = tail_start - tail_start % 4
    assert coarse >= 16
    body_s = fold_s[:coarse].reshape(-1, 4).sum(axis=1)
    body_f = fold_f[:coarse].reshape(-1, 4).sum(axis=1)
    assert np.abs(body_s - body_f).sum() < 0.01 * body_f.sum()
    # and the method that reads the histogram chooses (almost) the same range
    spec = S8 if not one_sided else U8
    got = read_as(sampled, "mse").clip_range(spec)
    want = read_as(full, "mse").clip_range(spec)
    assert got == pytest.approx(want, rel=0.02)


def test_histogram_memory_is_fixed():
    obs = HistogramObserver("t", bins=1024)
    for x in batches(n=50, heavy=True):
        obs.observe(x)
    assert obs.hist.shape == (1024,)


def test_percentile_matches_numpy_within_a_bin():
    data = list(batches(heavy=True))
    obs = PercentileObserver("t", percentile=99.0)
    for x in data:
        obs.observe(x)
    allx = np.concatenate([x.ravel() for x in data])
    lo, hi = obs.clip_range(S8)
    ref = np.percentile(np.abs(allx), 99.0)
    assert abs(hi - ref) <= 2 * obs.bin_width
    assert lo == -hi
    lo_a, hi_a = obs.clip_range(U8)
    assert abs(hi_a - np.percentile(allx, 99.0)) <= 2 * obs.bin_width
    assert abs(lo_a - np.percentile(allx, 1.0)) <= 2 * obs.bin_width


def _brute_force_mse(x, spec, grid=400):
    best = (np.inf, None)
    lo0, hi0 = min(x.min(), 0), max(x.max(), 0)
    for f in np.linspace(0.01, 1, grid):
        qp = range_to_qparams(lo0 * f, hi0 * f, spec)
        err = np.mean((x - fake_quantize(x, qp)) ** 2)
        best = min(best, (err, f), key=lambda t: t[0])
    return best[0]


@pytest.mark.parametrize("spec", [U8, S8])
def test_mse_observer_is_near_the_brute_force_optimum(spec):
    data = list(batches(heavy=True))
    obs = MSEObserver("t")
    for x in data:
        obs.observe(x)
    allx = np.concatenate([x.ravel() for x in data])
    qp = obs.qparams(spec)
    err = np.mean((allx - fake_quantize(allx, qp)) ** 2)
    best = _brute_force_mse(allx, spec)
    assert err <= best * 1.10
    mm = range_to_qparams(allx.min(), allx.max(), spec)
    assert err <= np.mean((allx - fake_quantize(allx, mm)) ** 2)


def test_mse_observer_clips_laplace_tails_at_4_bits():
    rng = np.random.default_rng(1)
    x = rng.laplace(0, 1, 50000).astype(np.float32)
    obs = MSEObserver("t")
    obs.observe(x)
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    lo, hi = obs.clip_range(spec)
    assert hi < 0.6 * np.abs(x).max()
    qp = obs.qparams(spec)
    mm = range_to_qparams(x.min(), x.max(), spec)
    err, err_mm = (np.mean((x - fake_quantize(x, q)) ** 2) for q in (qp, mm))
    assert err < 0.5 * err_mm


def test_entropy_clips_outliers_but_not_the_bulk():
    data = list(batches(heavy=True))
    obs = EntropyObserver("t")
    for x in data:
        obs.observe(x)
    allx = np.concatenate([x.ravel() for x in data])
    lo, hi = obs.clip_range(S8)
    assert hi < np.abs(allx).max() * 0.5  # outliers clipped
    assert hi > np.percentile(np.abs(allx), 99.0)  # bulk kept


def test_entropy_on_relu_data_is_not_dominated_by_zeros():
    rng = np.random.default_rng(0)
    obs = EntropyObserver("t")
    for _ in range(5):
        obs.observe(np.maximum(rng.standard_normal(10000), 0).astype(np.float32))
    _, hi = obs.clip_range(U8)
    assert hi > 2.5  # the positive half of N(0,1) reaches ~4; no collapse toward 0


def test_observer_without_data_raises_naming_tensor():
    obs = make_observer("percentile", "conv1_out")
    with pytest.raises(QCompileError, match="conv1_out"):
        obs.qparams(U8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.finfo(np.float32).max])
@pytest.mark.parametrize("cls", [MinMaxObserver, EntropyObserver])
def test_nonfinite_or_sentinel_marks_unbounded_and_qparams_name_tensor(cls, bad):
    obs = cls("bad_tensor")
    obs.observe(np.array([1.0, 2.0], np.float32))
    obs.observe(np.array([1.0, bad], np.float32))
    assert obs.unbounded
    with pytest.raises(QCompileError, match="bad_tensor"):
        obs.qparams(U8)


def test_weight_qparams_per_channel_is_max_abs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow=True)
    qp = weight_qparams(w, spec, axis=0)
    expect = np.abs(w).reshape(4, -1).max(axis=1) / 127
    np.testing.assert_allclose(qp.scale, expect, rtol=1e-6)
    np.testing.assert_array_equal(qp.zero_point, 0)


@pytest.mark.parametrize("method", ["mse", "percentile", "entropy", "minmax"])
def test_read_as_equals_observing_with_that_method(method):
    """`--calib-method auto` reads one histogram as every method: same ranges as running
    each method's own observer on the same batches."""
    shared, own = make_observer("auto", "t"), make_observer(method, "t")
    for x in batches(heavy=True):
        shared.observe(x)
        own.observe(x)
    for spec in (U8, S8):
        assert read_as(shared, method).clip_range(spec) == own.clip_range(spec)


def test_read_as_needs_a_histogram():
    with pytest.raises(TypeError, match="no histogram"):
        read_as(MinMaxObserver("t"), "mse")


def test_vanishing_activations_are_binned():
    """Random-init exports can carry activations around 1e-37; the histogram's scale then
    overflows float32 and used to produce negative bin indices."""
    from qcompile.calibrate.observers import HistogramObserver, make_observer
    from qcompile.numerics.qparams import QuantSpec

    x = (np.random.default_rng(0).standard_normal(4096) * 1e-37).astype(np.float32)
    for method in ("mse", "percentile", "minmax"):
        obs = make_observer(method, "tiny")
        obs.observe(x)
        if isinstance(obs, HistogramObserver):
            assert obs.hist.sum() + obs.zeros == x.size
        qp = obs.qparams(QuantSpec(bits=8, signed=False, symmetric=False))
        assert np.all(np.isfinite(qp.scale)) and np.all(qp.scale > 0)
