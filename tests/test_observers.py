"""Observers: update accumulates, compute_range computes; documented ranges and errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxpress.calibration.observers import HistogramObserver, MinMaxObserver, Observer, make_observer
from onnxpress.errors import CalibrationError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
METHODS = ["minmax", "percentile", "kl", "mse"]


@settings(deadline=None, max_examples=40, database=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 300), elements=finite),
    st.sampled_from(METHODS),
)
def test_threshold_is_positive_and_at_most_amax(x: np.ndarray, method: str) -> None:
    obs = make_observer(method, bins=256)
    obs.update(x)
    amax = float(np.abs(x).max())
    if amax == 0:
        with pytest.raises(CalibrationError, match="zero on every sample"):
            obs.compute_range()
        return
    r = obs.compute_range()
    assert 0 < r.amax <= amax
    assert x.min() <= r.min <= r.max <= x.max()
    assert r.method == method


@pytest.mark.parametrize("method", METHODS)
def test_range_does_not_depend_on_batch_split(method: str) -> None:
    x = np.random.default_rng(0).laplace(0, 1, (40, 50)).astype(np.float32)
    whole, pieces = make_observer(method), make_observer(method)
    whole.update(x)
    for part in np.array_split(x[::-1], 7):
        pieces.update(part)
    assert whole.compute_range() == pieces.compute_range()


@pytest.mark.parametrize("method", ["percentile", "kl", "mse"])
def test_nonnegative_tensor_keeps_a_one_sided_range(method: str) -> None:
    x = np.maximum(np.random.default_rng(1).standard_normal(5000), 0).astype(np.float32)
    obs = make_observer(method)
    obs.update(x)
    r = obs.compute_range()
    assert r.min == 0.0 and 0 < r.max <= x.max()


def test_kl_clips_a_long_tail_that_minmax_keeps() -> None:
    x = np.random.default_rng(2).standard_normal(20000).astype(np.float32)
    x[0] = 50.0
    kl, mm = make_observer("kl"), make_observer("minmax")
    kl.update(x)
    mm.update(x)
    assert mm.compute_range().max == 50.0
    assert kl.compute_range().amax < 10.0


def test_minmax_is_exact() -> None:
    obs = MinMaxObserver()
    obs.update(np.array([[1.5, -2.25]], np.float32))
    obs.update(np.array([7.0, np.nan], np.float32)[:1])
    r = obs.compute_range()
    assert (r.min, r.max) == (-2.25, 7.0)


def test_constant_tensor_has_a_documented_range() -> None:
    for method in METHODS:
        obs = make_observer(method)
        obs.update(np.full((3, 4), 2.5, np.float32))
        r = obs.compute_range()
        assert (r.min, r.max) == (2.5, 2.5), method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([], "never observed"),
        ([np.full(4, np.nan, np.float32)], "only NaN"),
        ([np.array([1.0, np.nan], np.float32)], "NaN values"),
        ([np.array([0.0, -np.inf, 3.0], np.float32)], "infinite values"),
        ([np.zeros((2, 3), np.float32)], "zero on every sample"),
    ],
)
def test_unusable_tensors_raise_instead_of_a_default_scale(method: str, batches: list, message: str) -> None:
    obs = make_observer(method, "t")
    for b in batches:
        obs.update(b)
    with pytest.raises(CalibrationError, match=message):
        obs.compute_range()


def test_merge_equals_one_observer() -> None:
    r = np.random.default_rng(3)
    a, b = r.standard_normal(1000).astype(np.float32), (3 * r.standard_normal(500)).astype(np.float32)
    for method in METHODS:
        one, left, right = make_observer(method), make_observer(method), make_observer(method)
        one.update(np.concatenate([a, b]))
        left.update(a)
        right.update(b)
        assert left.merge(right).compute_range() == one.compute_range()


def test_bad_settings_raise() -> None:
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        make_observer("entropy")
    with pytest.raises(CalibrationError, match="bits"):
        HistogramObserver("kl", bits=1)
    with pytest.raises(CalibrationError, match="at least 2\\*\\*bits"):
        HistogramObserver("kl", bins=128)


def test_observers_satisfy_the_protocol() -> None:
    assert isinstance(MinMaxObserver(), Observer)
    assert isinstance(HistogramObserver(), Observer)


def test_kl_is_not_captured_by_the_zero_spike_of_relu_outputs() -> None:
    """Half the values exactly 0: without flattening bin 0 the search clips to ~0.3 of amax."""
    r = np.random.default_rng(4)
    x = np.maximum(r.standard_normal(200_000), 0).astype(np.float32)
    obs = make_observer("kl")
    obs.update(x)
    t = obs.compute_range().max
    assert 0.5 * x.max() < t <= x.max()
    assert np.mean(x > t) < 1e-3


@pytest.mark.parametrize("method", ["kl", "mse", "percentile"])
def test_subsampling_observer_keeps_exact_extremes_and_split_independence(method: str) -> None:
    x = np.random.default_rng(12).laplace(0, 1, (30, 8, 40)).astype(np.float32)  # 320 values per sample
    whole, pieces = make_observer(method, values_per_sample=64), make_observer(method, values_per_sample=64)
    whole.update(x)
    for part in np.array_split(x[::-1], 4):
        pieces.update(part)
    assert whole.compute_range() == pieces.compute_range()
    assert whole.histogram.values_per_sample == 64 and int(whole.histogram.magnitude().sum()) == 30 * 64
    assert (whole.histogram.min, whole.histogram.max) == (float(x.min()), float(x.max()))
    assert whole.merge(pieces).histogram.values_per_sample == 64
    r = whole.compute_range()
    assert float(x.min()) <= r.min < r.max <= float(x.max())
