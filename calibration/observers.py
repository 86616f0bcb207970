"""Streaming observers: ``update(x)`` only accumulates, ``compute_range()`` only computes.

An observer sees every batch of one tensor and forgets it; its state has a fixed size. The range
rules, for a tensor whose finite values span ``[lo, hi]`` with ``amax = max(|lo|, |hi|)``:

    minmax      [lo, hi]
    percentile  T = p-th percentile of |x|        ->  [max(lo, -T), min(hi, T)]
    kl          T = argmin_i KL(P_i || Q_i) * w    ->  [max(lo, -T), min(hi, T)]   (see ``kl.py``;
                the zero bin is set to its neighbour's count first: ``flatten_zero_spike``)
    mse         T = argmin_i E|x - q_T(x)|^2       ->  [max(lo, -T), min(hi, T)]

so ``0 < T <= amax`` and a non-negative tensor keeps ``lo >= 0`` (a one-sided ``[0, T]`` grid with
``2**bits`` levels; a signed tensor gets ``2**(bits-1)`` levels per side). A constant tensor ``c``
gets ``[c, c]`` (quantizers widen ranges to include 0, giving ``[0, c]``); more generally, when a
threshold would cut off every value of a one-sided tensor the range falls back to ``[lo, hi]``.

No data, only NaN, any NaN or +-inf (attention masks), or a tensor that is zero everywhere raise
:class:`~onnxpress.errors.CalibrationError` from ``compute_range`` -- never a silent scale of 1.0;
:func:`onnxpress.calibrate` records such tensors in ``table.excluded`` with that message.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from onnxpress.calibration.histogram import (
    DEFAULT_BINS,
    Histogram,
    check_observed,
    check_percentile,
    mse_bin,
    percentile_bin,
)
from onnxpress.calibration.kl import flatten_zero_spike, kl_bin, quantized_bins
from onnxpress.calibration.table import TensorRange
from onnxpress.errors import CalibrationError

__all__ = [
    "METHODS",
    "HistogramObserver",
    "MinMaxObserver",
    "Observer",
    "make_observer",
    "range_from_histogram",
]

METHODS = ("minmax", "percentile", "kl", "mse")


@runtime_checkable
class Observer(Protocol):
    """Anything that accumulates batches of one tensor."""

    def update(self, x: np.ndarray) -> None:
        """Accumulate one batch (the array may be reused by the caller afterwards)."""


class MinMaxObserver:
    """Exact running min/max of the finite values, with counts of non-finite ones."""

    method = "minmax"

    def __init__(self, name: str = "tensor") -> None:
        self.name = name
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nan = 0
        self.posinf = 0
        self.neginf = 0

    def update(self, x: np.ndarray) -> None:
        """Accumulate the extremes of ``x``."""
        x = np.asarray(x)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            nan = int(np.isnan(x).sum())
            pos = int((x == np.inf).sum())
            neg = int((x == -np.inf).sum())
            self.nan, self.posinf, self.neginf = self.nan + nan, self.posinf + pos, self.neginf + neg
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        """The observer of both value sets."""
        out = MinMaxObserver(self.name)
        out.min, out.max = min(self.min, other.min), max(self.max, other.max)
        for attr in ("count", "nan", "posinf", "neginf"):
            setattr(out, attr, getattr(self, attr) + getattr(other, attr))
        return out

    def compute_range(self) -> TensorRange:
        """``[min, max]`` of the finite values.

        Raises:
            CalibrationError: see the module docstring.
        """
        amax = max(-self.min, self.max) if self.count else 0.0
        check_observed(self.name, self.count, self.nan, self.posinf, self.neginf, amax)
        return TensorRange(self.min, self.max, "minmax")


class HistogramObserver:
    """A :class:`Histogram` plus the rule that turns it into a range (``kl``, ``mse``, ...)."""

    def __init__(
        self,
        method: str = "kl",
        *,
        name: str = "tensor",
        bins: int = DEFAULT_BINS,
        bits: int = 8,
        percentile: float = 99.99,
        values_per_sample: int | None = None,
    ) -> None:
        """Args: see :func:`make_observer`."""
        if method not in METHODS:
            raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
        quantized_bins(bits, True)  # validates bits
        if method == "percentile":  # before any data is read, not after the run
            check_percentile(percentile)
        if method == "kl" and bins < 2**bits:
            raise CalibrationError(f"kl needs at least 2**bits = {2**bits} histogram bins, got {bins}")
        self.method = method
        self.name = name
        self.bits = bits
        self.percentile = percentile
        self.histogram = Histogram.with_resolution(bins, values_per_sample)

    def update(self, x: np.ndarray) -> None:
        """Add ``x`` to the histogram."""
        self.histogram.update(x)

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        """The observer of both value sets (exact)."""
        out = HistogramObserver(
            self.method,
            name=self.name,
            bins=self.histogram.size // 2,
            bits=self.bits,
            percentile=self.percentile,
            values_per_sample=self.histogram.values_per_sample,
        )
        out.histogram = self.histogram.merge(other.histogram)
        return out

    def compute_range(self, method: str | None = None) -> TensorRange:
        """The range chosen by ``method`` (default: this observer's own).

        Raises:
            CalibrationError: see the module docstring.
        """
        return range_from_histogram(
            self.histogram, method or self.method, bits=self.bits, percentile=self.percentile, name=self.name
        )


KL_MAX_CLIPPED_PERCENT = 0.1
"""The KL search only considers thresholds that clip at most this percentage of the values."""


def range_from_histogram(
    hist: Histogram, method: str, *, bits: int = 8, percentile: float = 99.99, name: str = "tensor"
) -> TensorRange:
    """Apply a range rule (module docstring) to a histogram.

    Raises:
        CalibrationError: unusable histogram or unknown method.
    """
    hist.check_usable(name)
    if method == "minmax":
        return TensorRange(hist.min, hist.max, "minmax")
    mag = hist.magnitude()
    signed = not hist.nonnegative
    if method == "kl":
        # Clip at most 0.1% of the values: on spiky or sparse histograms (discrete image inputs,
        # few samples) the plain KL search clipped 24% of a digits input and a sigmoid output to
        # a range 1e-4 wide; the cap keeps KL's choice among thresholds that clip only outliers.
        i = kl_bin(
            flatten_zero_spike(mag),
            quantized_bins(bits, not signed),
            min_bins=percentile_bin(mag, 100.0 - KL_MAX_CLIPPED_PERCENT),
        )
    elif method == "mse":
        i = mse_bin(mag, 2**bits, signed)
    elif method == "percentile":
        i = percentile_bin(mag, percentile)
    else:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    t = min(i * hist.width, hist.amax)
    lo, hi = max(hist.min, -t), min(hist.max, t)
    if lo > hi:  # the threshold cuts off every value (a constant-like one-sided tensor): keep all
        lo, hi = hist.min, hist.max
    return TensorRange(lo, hi, method)


def make_observer(
    method: str,
    name: str = "tensor",
    *,
    bins: int = DEFAULT_BINS,
    bits: int = 8,
    percentile: float = 99.99,
    values_per_sample: int | None = None,
) -> MinMaxObserver | HistogramObserver:
    """The observer for ``method``: a plain min/max tracker for ``minmax``, a histogram otherwise.

    Args:
        method: one of :data:`METHODS`.
        name: the tensor's name (used in error messages).
        bins: histogram resolution (a power of two).
        bits: quantization bit width the searches assume.
        percentile: for ``percentile``, the percentile of ``|x|`` kept.
        values_per_sample: histogram this many values of each sample (axis-0 slice) of more than
            twice as many (smaller ones whole), at positions set by the sample's shape and values;
            min/max stay exact (see :mod:`onnxpress.calibration.histogram`). ``None``: every value.

    Raises:
        CalibrationError: unknown method, bad ``bins``, ``bits`` or ``values_per_sample``.
    """
    if method == "minmax":
        return MinMaxObserver(name)
    return HistogramObserver(
        method, name=name, bins=bins, bits=bits, percentile=percentile, values_per_sample=values_per_sample
    )
