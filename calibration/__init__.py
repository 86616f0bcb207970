"""Calibration: data readers, streaming observers, mergeable histograms and calibration tables."""

from __future__ import annotations

from onnxpress.calibration.table import CalibrationTable, TensorRange

__all__ = ["CalibrationTable", "TensorRange"]
