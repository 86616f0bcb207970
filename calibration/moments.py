"""Streaming input second moments ``C = E[x xᵀ]`` for data-aware low-rank splits.

A layer ``y = W x`` applied at many positions (rows of a Gemm, tokens of a MatMul, pixels of a
Conv) sees feature vectors ``x ∈ R^n``. The observers accumulate, over every position of every
batch::

    S += Xᵀ X   (float64, n × n),     count += rows(X)        ==>   C = S / count

so memory is ``n²`` whatever the number of samples, and two observers merge exactly by adding
``S`` and ``count`` (shards can be observed on different workers).

- :class:`SecondMomentObserver`: the features lie on one axis of the observed tensor (``-1`` for
  MatMul/Gemm inputs, ``0`` for ``Gemm(transA=1)``); every other axis indexes positions.
- :class:`PatchSecondMomentObserver`: the features of a Conv are its unfolded input patches
  (im2col): for each output pixel, the ``C_in · kh · kw`` values under the (dilated, strided,
  zero-padded) kernel, flattened in the weight's ``[C_in, kh, kw]`` order (1-D and 3-D alike)::

      x[N, C, H, W] --pad--> windows[N, Ho, Wo, C, kh, kw] --> X[N·Ho·Wo, C·kh·kw]

``update`` only accumulates; ``compute`` only divides. An observer that saw nothing raises
:class:`~onnxpress.errors.CalibrationError` instead of returning a made-up moment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnxpress.errors import CalibrationError

__all__ = ["PatchSecondMomentObserver", "SecondMomentObserver", "conv_pads", "conv_patches"]

_CHUNK_ROWS = 1 << 16  # rows per float64 XᵀX product: bounds the temporary copy to ~rows·n·8 bytes


def conv_pads(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    auto_pad: str = "NOTSET",
) -> tuple[int, ...]:
    """A conv's explicit pads for an input of this spatial shape: ``pads``, or what ``auto_pad`` gives.

    ONNX's rule: SAME_UPPER / SAME_LOWER pad so that ``out = ceil(in / stride)``, the odd one at the end for
    SAME_UPPER and at the start for SAME_LOWER (tf2onnx writes these); VALID pads nothing.
    """
    if auto_pad in ("NOTSET", ""):
        return tuple(int(p) for p in pads)
    if auto_pad == "VALID":
        return (0,) * (2 * len(spatial))
    totals = [max((-(-int(n) // int(s)) - 1) * int(s) + (int(k) - 1) * int(d) + 1 - int(n), 0)
              for n, k, s, d in zip(spatial, kernel, strides, dilations, strict=True)]
    small, large = [t // 2 for t in totals], [t - t // 2 for t in totals]
    return tuple(small + large) if auto_pad == "SAME_UPPER" else tuple(large + small)


def conv_patches(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    pick: Callable[[int], np.ndarray | None] | None = None,
    auto_pad: str = "NOTSET",
) -> np.ndarray:
    """The im2col patches of a conv input ``[N, C, *spatial]`` (1-, 2- or 3-D): ``[rows, C, prod(kernel)]``.

    One row per output position of each sample (``N · prod(out)`` rows, sample-major), or only the
    flat output positions ``pick(prod(out))`` of each sample (``None``: all). ``pads`` are ONNX's: the
    begins of every spatial axis, then their ends (or ``auto_pad``'s, :func:`conv_pads`). A dilated
    window is the dense window of span ``(k - 1) d + 1`` read every ``d`` values, and the strides step
    the window positions: both are views, so only the returned patches are copied.

    Raises:
        CalibrationError: the padded input is smaller than the kernel's span.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    nd = len(kernel)
    pads = conv_pads(x.shape[2:], kernel, strides, pads, dilations, auto_pad)
    x = np.pad(x, [(0, 0), (0, 0)] + [(int(pads[i]), int(pads[i + nd])) for i in range(nd)])
    span = tuple((int(k) - 1) * int(d) + 1 for k, d in zip(kernel, dilations, strict=True))
    if any(x.shape[2 + i] < span[i] for i in range(nd)):
        raise CalibrationError(f"conv input {x.shape} (padded) is smaller than the kernel's span {span}")
    v = sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))  # [N, C, *positions, *span]
    v = v[(slice(None), slice(None), *(slice(None, None, int(s)) for s in strides),
           *(slice(None, None, int(d)) for d in dilations))]  # [N, C, *out positions, *kernel]
    taps = int(np.prod(kernel))
    picked = pick(int(np.prod(v.shape[2 : 2 + nd]))) if pick is not None else None
    if picked is not None:  # adjacent index arrays keep their place: [N, C, R, *kernel]
        v = v[(slice(None), slice(None), *np.unravel_index(picked, v.shape[2 : 2 + nd]))]
        return v.transpose(0, 2, 1, *range(3, 3 + nd)).reshape(-1, x.shape[1], taps)
    return v.transpose(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)).reshape(-1, x.shape[1], taps)


class SecondMomentObserver:
    """Accumulates ``Σ x xᵀ`` over the feature axis ``axis`` of every observed array.

    Args:
        axis: the feature axis (``-1`` for MatMul/Gemm inputs, ``0`` for ``Gemm(transA=1)``).
        name: what the observer watches, for error messages.
    """

    def __init__(self, axis: int = -1, *, name: str = "tensor") -> None:
        self.axis = int(axis)
        self.name = name
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Add the outer products of the feature vectors of ``x`` (any leading/trailing axes)."""
        x = np.asarray(x)
        if x.ndim == 0:
            raise CalibrationError(f"{self.name}: cannot take a feature second moment of a scalar")
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])
        self._add(rows)

    def _add(self, rows: np.ndarray) -> None:
        if not np.all(np.isfinite(rows)):
            raise CalibrationError(f"{self.name}: observed values contain NaN or inf")
        n = rows.shape[1]
        if self.sum is None:
            self.sum = np.zeros((n, n), np.float64)
        elif self.sum.shape[0] != n:
            raise CalibrationError(f"{self.name}: feature size changed from {self.sum.shape[0]} to {n} between batches")
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            chunk = rows[start : start + _CHUNK_ROWS].astype(np.float64)
            self.sum += chunk.T @ chunk
        self.count += rows.shape[0]

    def merge(self, other: SecondMomentObserver) -> None:
        """Add another observer's accumulators (exact: sums and counts add)."""
        if other.sum is None:
            return
        if self.sum is None:
            self.sum = other.sum.copy()
        elif self.sum.shape != other.sum.shape:
            raise CalibrationError(
                f"{self.name}: cannot merge moments of shapes {self.sum.shape} and {other.sum.shape}"
            )
        else:
            self.sum += other.sum
        self.count += other.count

    def compute(self) -> np.ndarray:
        """``E[x xᵀ]`` (float64, symmetric).

        Raises:
            CalibrationError: nothing was observed.
        """
        if self.sum is None or self.count == 0:
            raise CalibrationError(f"{self.name}: no data observed; run calibration with at least one sample")
        return self.sum / self.count


class PatchSecondMomentObserver(SecondMomentObserver):
    """``E[p pᵀ]`` over the im2col patches ``p`` of a Conv input ``[N, C, *spatial]`` (1-, 2- or 3-D).

    Args:
        kernel: the kernel's spatial shape, e.g. ``(kh, kw)``.
        strides: per spatial axis; default 1.
        pads: ONNX's pads, e.g. ``(top, left, bottom, right)``; default 0.
        dilations: per spatial axis; default 1.
        auto_pad: ONNX's auto_pad (SAME_UPPER / SAME_LOWER / VALID set the pads from each batch's shape).
        name: what the observer watches, for error messages.
    """

    def __init__(
        self,
        kernel: Sequence[int],
        strides: Sequence[int] | None = None,
        pads: Sequence[int] | None = None,
        dilations: Sequence[int] | None = None,
        *,
        auto_pad: str = "NOTSET",
        name: str = "tensor",
    ) -> None:
        super().__init__(axis=-1, name=name)
        nd = len(kernel)
        self.kernel = tuple(int(k) for k in kernel)
        self.strides = tuple(int(s) for s in (strides or (1,) * nd))
        self.pads = tuple(int(p) for p in (pads or (0,) * (2 * nd)))
        self.dilations = tuple(int(d) for d in (dilations or (1,) * nd))
        self.auto_pad = auto_pad

    def update(self, x: np.ndarray) -> None:
        """Unfold ``x`` [N, C, *spatial] into patches and add their outer products (a few samples at a time)."""
        x = np.asarray(x)
        if x.ndim != 2 + len(self.kernel):
            raise CalibrationError(f"{self.name}: expected a conv input of rank {2 + len(self.kernel)} "
                                   f"[N, C, *spatial], got shape {x.shape}")
        per_sample = self._patch_rows(x[:1]).shape[0] * x.shape[1] * int(np.prod(self.kernel))
        step = max(1, (_CHUNK_ROWS * 64) // max(per_sample, 1))
        for start in range(0, x.shape[0], step):
            self._add(self._patch_rows(x[start : start + step]))

    def _patch_rows(self, x: np.ndarray) -> np.ndarray:
        try:
            p = conv_patches(x, self.kernel, self.strides, self.pads, self.dilations, auto_pad=self.auto_pad)
        except CalibrationError as exc:
            raise CalibrationError(f"{self.name}: {exc}") from None
        return p.reshape(p.shape[0], -1)
