"""Typed errors of onnxpress.

Every error a user can cause (a bad model, bad data, an unsupported case, an unwritable path) is an
:class:`OnnxpressError`; the CLI prints its message as one line and exits with status 2. Anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "DataError",
    "DeviceError",
    "ModelLoadError",
    "OnnxpressError",
    "OutputError",
    "PassError",
    "UnsupportedModelError",
    "ValidationError",
]


class OnnxpressError(Exception):
    """Base class of every error onnxpress raises on purpose."""


class ModelLoadError(OnnxpressError):
    """The model file is missing, unreadable, not an ONNX model, or fails ``onnx.checker``."""


class UnsupportedModelError(OnnxpressError):
    """The model is valid ONNX but outside what onnxpress handles (opset, op, dtype)."""


class DataError(OnnxpressError):
    """Sample data does not fit the model: names, ranks, shapes, dtypes, NaN or no samples."""


class DeviceError(OnnxpressError):
    """The compute device asked for (``--device cuda``) is not a device or not present on this machine."""


class CalibrationError(OnnxpressError):
    """Calibration could not produce a range: no data, non-finite values, missing or stale table."""


class PassError(OnnxpressError):
    """A graph pass failed unexpectedly; the message names the passes that ran before it."""


class ValidationError(OnnxpressError):
    """A candidate model does not match its reference (names the output and how far off it is)."""


class OutputError(OnnxpressError):
    """An output path cannot be written (missing folder, no permission, equal to an input)."""
