"""KL threshold search: vectorised result against a slow per-candidate reference."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress.calibration.histogram import Histogram
from onnxpress.calibration.kl import TIE_TOLERANCE, kl_bin, kl_divergences, quantized_bins
from onnxpress.errors import CalibrationError


def reference_kl(hist: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """One candidate at a time, building P and Q literally as the TensorRT recipe describes."""
    h = np.asarray(hist, dtype=np.float64)
    n = int(np.flatnonzero(h)[-1]) + 1
    h = h[:n]
    cands, out = [], []
    for i in range(m, n + 1):
        p_counts = h[:i].copy()
        p_counts[i - 1] += h[i:].sum()  # outliers into the last kept bin
        window = (np.arange(i) * m) // i  # window of each bin
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], window])))
        window_sum = np.add.reduceat(h[:i], starts)  # Q is built from h without outliers
        window_nz = np.add.reduceat((p_counts > 0).astype(np.int64), starts)
        level = np.where(window_nz > 0, window_sum / np.maximum(window_nz, 1), 0.0)
        q_counts = np.where(p_counts > 0, level[window], 0.0)
        p = p_counts / p_counts.sum()
        support = p > 0
        if q_counts.sum() == 0 or np.any(q_counts[support] == 0):
            kl = np.inf
        else:
            q = q_counts / q_counts.sum()
            kl = float(np.sum(p[support] * np.log(p[support] / q[support])))
        cands.append(i)
        out.append(kl)
    return np.array(cands), np.array(out)


def reference_bin(hist: np.ndarray, m: int) -> int:
    cands, kl = reference_kl(hist, m)
    best = kl.min()
    for i, value in zip(cands, kl, strict=True):
        if value <= best + TIE_TOLERANCE:
            return int(i)
    raise AssertionError("unreachable")


def _assert_matches_reference(hist: np.ndarray, m: int) -> None:
    """Same candidates, the same finite divergences (to 1e-9), the same chosen bin as the slow reference."""
    cands, kl = kl_divergences(hist, m)
    ref_cands, ref_kl = reference_kl(hist, m)
    np.testing.assert_array_equal(cands, ref_cands)
    finite = np.isfinite(ref_kl)
    np.testing.assert_array_equal(np.isfinite(kl), finite)
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-9, atol=1e-12)
    assert kl_bin(hist, m) == reference_bin(hist, m)


def _samples(kind: str, n: int = 20000) -> np.ndarray:
    r = np.random.default_rng({"gaussian": 1, "laplace": 2, "relu": 3, "bimodal": 4, "outliers": 5}[kind])
    if kind == "gaussian":
        return r.standard_normal(n)
    if kind == "laplace":
        return r.laplace(0.0, 1.0, n)
    if kind == "relu":
        return np.maximum(r.standard_normal(n) * 2.0 + 0.3, 0.0)
    if kind == "bimodal":
        return np.concatenate([r.normal(-3.0, 0.5, n // 2), r.normal(4.0, 1.0, n - n // 2)])
    x = r.standard_normal(n)
    x[:5] = [40.0, -35.0, 60.0, 25.0, -50.0]  # rare large outliers
    return x


def _observed(kind: str) -> tuple[Histogram, np.ndarray, int]:
    """A 2048-bin histogram of ``_samples(kind)``, its magnitude counts and the 8-bit quantized bin count."""
    hist = Histogram.with_resolution(2048)
    hist.update(_samples(kind).astype(np.float32))
    return hist, hist.magnitude(), quantized_bins(8, nonnegative=hist.nonnegative)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "relu", "bimodal", "outliers"])
def test_vectorised_kl_matches_reference(kind: str) -> None:
    hist, mag, m = _observed(kind)
    assert m == (256 if kind == "relu" else 128)
    _assert_matches_reference(mag, m)
    threshold = min(kl_bin(mag, m) * hist.width, hist.amax)
    assert 0 < threshold <= hist.amax
    if kind == "outliers":
        assert threshold < 0.5 * hist.amax  # KL clips rare outliers


def test_outliers_into_empty_last_window_give_infinite_divergence() -> None:
    """h = mass in bins 0..7, a gap, one outlier far away; cutting in the gap has no Q support."""
    h = np.zeros(40)
    h[:8] = [50, 40, 30, 20, 10, 5, 3, 1]
    h[39] = 1
    cands, kl = kl_divergences(h, 4)
    ref_cands, ref_kl = reference_kl(h, 4)
    assert np.isinf(ref_kl).any()
    np.testing.assert_array_equal(np.isinf(kl), np.isinf(ref_kl))
    assert kl_bin(h, 4) == reference_bin(h, 4)


def test_histogram_narrower_than_quantized_bins_keeps_everything() -> None:
    h = np.zeros(300)
    h[:100] = 1
    assert kl_bin(h, 128) == 100


def test_empty_histogram_and_bad_bits_raise() -> None:
    with pytest.raises(CalibrationError, match="empty histogram"):
        kl_bin(np.zeros(10), 4)
    with pytest.raises(CalibrationError, match="bits"):
        quantized_bins(1, True)


@pytest.mark.parametrize("kind", ["gaussian", "relu", "outliers"])
def test_restricted_search_computes_only_allowed_candidates_and_matches_full(kind: str) -> None:
    hist, mag, m = _observed(kind)
    full_cands, full_kl = kl_divergences(mag, m)
    n = int(full_cands[-1])
    ref_cands, ref_kl = reference_kl(mag, m)
    for min_bins in (0, m, m + 1, (m + n) // 2, n - 1, n):
        cands, kl = kl_divergences(mag, m, min_bins=min_bins)
        keep = full_cands >= min_bins
        np.testing.assert_array_equal(cands, full_cands[keep])  # nothing below min_bins computed
        np.testing.assert_array_equal(kl, full_kl[keep])  # each divergence is independent of the others
        sel = ref_cands >= min_bins
        best = ref_kl[sel].min()
        expected = int(ref_cands[sel][np.flatnonzero(ref_kl[sel] <= best + TIE_TOLERANCE)[0]])
        assert kl_bin(mag, m, min_bins=min_bins) == expected
    # a cap above the last occupied bin searches every candidate
    cands, kl = kl_divergences(mag, m, min_bins=n + 5)
    np.testing.assert_array_equal(cands, full_cands)
    assert kl_bin(mag, m, min_bins=n + 5) == reference_bin(mag, m)


@pytest.mark.parametrize("m", [3, 5, 8])
def test_any_quantized_bin_count_matches_reference(m: int) -> None:
    """Window edges come from the cached table D[r, g] = ceil(g r / m) for any m."""
    h = np.random.default_rng(m).poisson(40.0 * np.exp(-np.arange(60) / 12.0)).astype(np.float64)
    h[45] = 0.0
    h[59] = 3.0
    _assert_matches_reference(h, m)


@pytest.mark.parametrize("m", [3, 128, 256, 1024])
def test_window_edges_from_the_table_equal_ceil_of_g_i_over_m(m: int) -> None:
    """Edges of consecutive candidates crossing several multiples of m (table up to m = 512, formula above)."""
    from onnxpress.calibration.kl import _edge_offsets, _edges

    assert (_edge_offsets(m) is None) == (m > 512)
    g = np.arange(m + 1, dtype=np.int64)
    for first, count in ((m, 1), (m, 3 * m + 5), (2 * m - 1, 2), (5 * m + 7, m)):
        i = np.arange(first, first + count, dtype=np.int64)
        out = np.empty((count, m + 1), dtype=np.int64)
        _edges(i, m, out, g)
        expected = -((-i[:, None] * g) // m)  # ceil(g i / m)
        np.testing.assert_array_equal(out, expected)


def test_large_quantized_bin_count_without_edge_table_matches_reference() -> None:
    """m = 1024 (10-bit unsigned grid) takes the formula path; same divergences and bin as the reference."""
    r = np.random.default_rng(7)
    h = r.poisson(30.0 * np.exp(-np.arange(1400) / 300.0)).astype(np.float64)
    h[1399] = 2.0
    _assert_matches_reference(h, 1024)
