"""Mergeable histogram: exact growth and merge, split independence, percentile and MSE searches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxpress.calibration.histogram import Histogram, mse_bin, percentile_bin
from onnxpress.errors import CalibrationError

BINS = 64  # small resolution keeps the property tests fast; the rules do not depend on it

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, st.integers(0, 60), elements=finite)


def observe(*chunks: np.ndarray) -> Histogram:
    h = Histogram.with_resolution(BINS)
    for c in chunks:
        h.update(c)
    return h


def same(a: Histogram, b: Histogram) -> None:
    assert a.exp == b.exp
    np.testing.assert_array_equal(a.magnitude(), b.magnitude())
    if a.counts is not None or b.counts is not None:
        np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.min, a.max, a.count) == (b.min, b.max, b.count)


@settings(deadline=None, max_examples=60, database=None)
@given(arrays, arrays)
def test_merge_commutes_and_equals_observing_the_concatenation(x: np.ndarray, y: np.ndarray) -> None:
    a, b = observe(x), observe(y)
    same(a.merge(b), b.merge(a))
    same(a.merge(b), observe(np.concatenate([x, y])))


@settings(deadline=None, max_examples=60, database=None)
@given(arrays, st.lists(st.integers(0, 60), max_size=4), st.randoms(use_true_random=False))
def test_result_does_not_depend_on_batch_split_or_order(x: np.ndarray, cuts: list[int], rnd) -> None:
    pieces = np.split(x, sorted(c % (x.size + 1) for c in cuts))
    shuffled = list(pieces)
    rnd.shuffle(shuffled)
    same(observe(x), observe(*shuffled))


@settings(deadline=None, max_examples=40, database=None)
@given(hnp.arrays(np.float32, st.integers(1, 60), elements=finite))
def test_bins_match_numpy_floor_and_width_rule(x: np.ndarray) -> None:
    h = observe(x)
    amax = float(np.abs(x).max())
    if amax == 0:
        assert h.exp is None and h.magnitude()[0] == x.size
        return
    w = h.width
    assert amax < 2 * BINS * w and amax >= BINS * w  # the largest magnitude spans > BINS bins
    expected = np.bincount((np.floor(x.astype(np.float64) / w) + 2 * BINS).astype(int), minlength=4 * BINS)
    np.testing.assert_array_equal(h.counts, expected)
    assert h.occupied() >= BINS


def test_growth_coarsens_exactly() -> None:
    r = np.random.default_rng(0)
    small, large = r.standard_normal(1000).astype(np.float32), (100 * r.standard_normal(10)).astype(np.float32)
    grown = observe(small, large)
    direct = Histogram.with_resolution(BINS)
    direct.update(large)  # fixes the final width first
    direct.update(small)
    same(grown, direct)


def test_non_finite_values_are_counted_not_binned() -> None:
    h = observe(np.array([1.0, np.nan, np.inf, -np.inf, -np.inf, -2.0], dtype=np.float32))
    assert (h.nan, h.posinf, h.neginf, h.count) == (1, 1, 2, 2)
    assert (h.min, h.max) == (-2.0, 1.0)
    with pytest.raises(CalibrationError, match="infinite values"):
        h.check_usable("mask")


def test_zeros_before_first_nonzero_land_in_bin_zero() -> None:
    h = observe(np.zeros(5, np.float32), np.array([0.0, 3.0], np.float32))
    assert h.magnitude()[0] == 6 and h.count == 7


def test_bins_must_be_power_of_two() -> None:
    with pytest.raises(CalibrationError, match="power of two"):
        Histogram.with_resolution(1000)
    with pytest.raises(CalibrationError, match="cannot merge"):
        Histogram.with_resolution(64).merge(Histogram.with_resolution(128))


def brute_mse(mag: np.ndarray, levels: int, signed: bool) -> int:
    n = int(np.flatnonzero(mag)[-1]) + 1
    best, best_i = math.inf, 0
    for i in range(1, n + 1):
        step = (2 if signed else 1) * i / (levels - 1)
        err = 0.0
        for k in range(n):
            c = k + 0.5
            err += mag[k] * (step**2 / 12 if c <= i else (c - i) ** 2)
        if err < best * (1 - 1e-12):
            best, best_i = err, i
    return best_i


@pytest.mark.parametrize("signed", [True, False])
def test_mse_matches_brute_force(signed: bool) -> None:
    r = np.random.default_rng(1)
    mag = np.bincount(np.minimum(np.abs(r.laplace(0, 8, 3000)).astype(int), 149), minlength=150)
    mag[149] = 2  # a far tail
    assert mse_bin(mag, 16, signed) == brute_mse(mag, 16, signed)


def test_percentile_bin() -> None:
    mag = np.array([10, 0, 80, 9, 1])
    assert percentile_bin(mag, 90.0) == 3
    assert percentile_bin(mag, 99.0) == 4
    assert percentile_bin(mag, 100.0) == 5
    with pytest.raises(CalibrationError, match="percentile"):
        percentile_bin(mag, 0.0)


@pytest.mark.parametrize("value", [7.4244e-40, -1.4e-45, 3e38, -3e38])
def test_extreme_float32_values_are_binned_exactly(value: float) -> None:
    """Subnormals (width 2**-140) and huge values (width 2**121) take the float64 path."""
    x = np.array([value, value / 2], dtype=np.float32)
    h = observe(x)
    expected = np.floor(x.astype(np.float64) / h.width).astype(np.int64) + 2 * BINS
    np.testing.assert_array_equal(np.flatnonzero(h.counts), np.unique(expected))
    assert h.count == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_nonnegative_batches_counted_in_lanes_match_floor_rule(dtype: type) -> None:
    """Batches past the lane threshold (ReLU-like, mostly zeros, > one offset period) bin exactly."""
    r = np.random.default_rng(11)
    x = np.maximum(r.standard_normal(150_001) - 0.8, 0.0).astype(dtype)  # ~79% zeros, odd length
    x[7] = -0.0
    hist = Histogram.with_resolution(BINS)
    hist.update(x)
    w = hist.width
    expected = np.bincount((np.floor(x.astype(np.float64) / w) + 2 * BINS).astype(int), minlength=4 * BINS)
    np.testing.assert_array_equal(hist.counts, expected)
    pieces = Histogram.with_resolution(BINS)
    for part in np.array_split(x, [1000, 20_000, 90_000]):  # below and above the lane threshold
        pieces.update(part)
    np.testing.assert_array_equal(pieces.counts, hist.counts)
    y = np.concatenate([x, -x[:70_000]]).astype(dtype)  # signed, several blocks: the plain path
    signed = Histogram.with_resolution(BINS)
    signed.update(y)
    expected = np.bincount((np.floor(y.astype(np.float64) / w) + 2 * BINS).astype(int), minlength=4 * BINS)
    np.testing.assert_array_equal(signed.counts, expected)


# ----------------------------------------------------------------- per-sample subsample
def sampled(*chunks: np.ndarray, k: int = 16) -> Histogram:
    h = Histogram.with_resolution(BINS, values_per_sample=k)
    for c in chunks:
        h.update(c)
    return h


def test_subsample_is_a_function_of_each_sample_alone() -> None:
    """Batches of 1, 7 and 64 samples, in any order, give the same counts; min/max/count stay exact."""
    r = np.random.default_rng(3)
    x = r.laplace(0, 1, (64, 3, 40)).astype(np.float32)  # 120 values per sample, 16 binned
    whole = sampled(x)
    for size in (1, 7, 64):
        order = r.permutation(len(x))
        same(whole, sampled(*(x[order[i : i + size]] for i in range(0, len(x), size))))
    assert int(whole.counts.sum()) == 64 * 16
    assert (whole.min, whole.max, whole.count) == (float(x.min()), float(x.max()), x.size)
    assert whole.amax == float(np.abs(x).max())


def test_subsample_positions_vary_between_samples_and_cover_every_position() -> None:
    from onnxpress.calibration.histogram import sample_positions

    r = np.random.default_rng(4)
    rows = r.standard_normal((400, 50)).astype(np.float32)
    pos = sample_positions(rows, 5)
    within = pos - np.arange(0, rows.size, 50)[:, None]
    assert within.min() >= 0 and within.max() < 50
    assert all(len(set(p)) == 5 for p in within)  # distinct positions in each sample
    assert len({tuple(p) for p in within}) > 10  # the phase differs between samples
    hits = np.bincount(within.ravel(), minlength=50)
    assert hits.min() > 0 and hits.max() < 4 * hits.mean()  # no position is never or always binned
    again = sample_positions(rows[::-1].copy(), 5)
    np.testing.assert_array_equal(np.take(rows[::-1], again), np.take(rows, pos)[::-1])


@settings(deadline=None, max_examples=40, database=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(0, 12), st.integers(1, 40)), elements=finite),
    hnp.arrays(np.float32, st.tuples(st.integers(0, 12), st.integers(1, 40)), elements=finite),
)
def test_subsampled_merge_commutes_and_equals_observing_the_concatenation(x: np.ndarray, y: np.ndarray) -> None:
    y = np.resize(y, (y.shape[0], x.shape[1]))  # same sample shape
    a, b = sampled(x, k=8), sampled(y, k=8)
    same(a.merge(b), b.merge(a))
    same(a.merge(b), sampled(np.concatenate([x, y]), k=8))


def test_exact_mode_and_small_samples_bin_every_value() -> None:
    x = np.random.default_rng(5).standard_normal((10, 16)).astype(np.float32)
    for k in (None, 8, 16, 1000):  # samples of at most 2 k values are binned whole
        h = sampled(x, k=k)
        same(h, observe(x.ravel()))
    assert int(sampled(x, k=4).counts.sum()) == 40
    one_d = sampled(x.ravel(), k=4)  # 1-d: one value per sample
    same(one_d, observe(x.ravel()))


def test_subsample_keeps_non_finite_counts_exact() -> None:
    x = np.random.default_rng(6).standard_normal((4, 30)).astype(np.float32)
    x[1, 3], x[2, 7], x[3, 0] = np.nan, np.inf, -np.inf
    h = sampled(x, k=5)
    assert (h.nan, h.posinf, h.neginf, h.count) == (1, 1, 1, 117)
    assert int(h.counts.sum()) <= 20


def test_subsample_settings_are_checked() -> None:
    for bad in (0, -3, True):
        with pytest.raises(CalibrationError, match="values_per_sample"):
            Histogram.with_resolution(64, values_per_sample=bad)
    with pytest.raises(CalibrationError, match="same setting"):
        Histogram.with_resolution(64, values_per_sample=8).merge(Histogram.with_resolution(64))


def test_float64_values_near_the_smallest_subnormal_bin_exactly():
    """max|x| ~ 1e-320 (float64 subnormals): 2**-exp overflows a float, so binning scales by the exponent."""
    h = Histogram.with_resolution()
    h.update(np.array([[5e-324, -1e-320, 0.0, 3e-321]]))
    assert h.count == 4 and h.amax == 1e-320
    mag = h.magnitude()
    assert h.width == 5e-324  # the smallest subnormal
    # 0 -> bin 0, 5e-324 (one width) -> 1, 3e-321 -> floor(607.2) = 607, -1e-320 = -2024 widths -> signed bin
    # -2024, magnitude bin 2023 (a negative bin j holds |x| in [(-j-1) w, -j w])
    assert np.flatnonzero(mag).tolist() == [0, 1, 607, 2023] and mag.sum() == 4
