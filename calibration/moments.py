"""Streaming input second moments ``C = E[x xᵀ]`` for data-aware low-rank splits.

A layer ``y = W x`` applied at many positions (rows of a Gemm, tokens of a MatMul, pixels of a
Conv) sees feature vectors ``x ∈ R^n``. The observers accumulate, over every position of every
batch::

    S += Xᵀ X   (float64, n × n),     count += rows(X)        ==>   C = S / count

so memory is ``n²`` whatever the number of samples, and two observers merge exactly by adding
``S`` and ``count`` (shards can be observed on different workers).

- :class:`SecondMomentObserver`: the features lie on one axis of the observed tensor (``-1`` for
  MatMul/Gemm inputs, ``0`` for ``Gemm(transA=1)``); every other axis indexes positions.
- :class:`PatchSecondMomentObserver`: the features of a 2-D Conv are its unfolded input patches
  (im2col): for each output pixel, the ``C_in · kh · kw`` values under the (dilated, strided,
  zero-padded) kernel, flattened in the weight's ``[C_in, kh, kw]`` order::

      x[N, C, H, W] --pad--> windows[N, Ho, Wo, C, kh, kw] --> X[N·Ho·Wo, C·kh·kw]

``update`` only accumulates; ``compute`` only divides. An observer that saw nothing raises
:class:`~onnxpress.errors.CalibrationError` instead of returning a made-up moment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnxpress.errors import CalibrationError

__all__ = ["PatchSecondMomentObserver", "SecondMomentObserver", "conv_patches"]

_CHUNK_ROWS = 1 << 16  # rows per float64 XᵀX product: bounds the temporary copy to ~rows·n·8 bytes


def conv_patches(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    pick: Callable[[int], np.ndarray | None] | None = None,
) -> np.ndarray:
    """The im2col patches of a conv input ``[N, C, *spatial]`` (1-, 2- or 3-D): ``[rows, C, prod(kernel)]``.

    One row per output position of each sample (``N · prod(out)`` rows, sample-major), or only the
    flat output positions ``pick(prod(out))`` of each sample (``None``: all). ``pads`` are ONNX's: the begins of every
    spatial axis, then their ends. A dilated window is the dense window of span ``(k - 1) d + 1``
    read every ``d`` values, and the strides step the window positions: both are views, so only the
    returned patches are copied.

    Raises:
        CalibrationError: the padded input is smaller than the kernel's span.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    nd = len(kernel)
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
    """``E[p pᵀ]`` over the im2col patches ``p`` of a 2-D Conv input ``[N, C, H, W]``.

    Args:
        kernel: ``(kh, kw)``.
        strides: ``(sh, sw)``; default 1.
        pads: ``(top, left, bottom, right)`` as in ONNX; default 0.
        dilations: ``(dh, dw)``; default 1.
        name: what the observer watches, for error messages.
    """

    def __init__(
        self,
        kernel: Sequence[int],
        strides: Sequence[int] | None = None,
        pads: Sequence[int] | None = None,
        dilations: Sequence[int] | None = None,
        *,
        name: str = "tensor",
    ) -> None:
        super().__init__(axis=-1, name=name)
        if len(kernel) != 2:
            raise CalibrationError(f"{name}: patch moments are implemented for 2-D convs only (kernel {tuple(kernel)})")
        self.kernel = tuple(int(k) for k in kernel)
        self.strides = tuple(int(s) for s in (strides or (1, 1)))
        self.pads = tuple(int(p) for p in (pads or (0, 0, 0, 0)))
        self.dilations = tuple(int(d) for d in (dilations or (1, 1)))

    def update(self, x: np.ndarray) -> None:
        """Unfold ``x`` [N, C, H, W] into patches and add their outer products (a few samples at a time)."""
        x = np.asarray(x)
        if x.ndim != 4:
            raise CalibrationError(f"{self.name}: expected a [N, C, H, W] conv input, got shape {x.shape}")
        per_sample = self._patch_rows(x[:1]).shape[0] * x.shape[1] * self.kernel[0] * self.kernel[1]
        step = max(1, (_CHUNK_ROWS * 64) // max(per_sample, 1))
        for start in range(0, x.shape[0], step):
            self._add(self._patch_rows(x[start : start + step]))

    def _patch_rows(self, x: np.ndarray) -> np.ndarray:
        try:
            p = conv_patches(x, self.kernel, self.strides, self.pads, self.dilations)
        except CalibrationError as exc:
            raise CalibrationError(f"{self.name}: {exc}") from None
        return p.reshape(p.shape[0], -1)
