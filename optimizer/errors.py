"""Typed errors of onnxpress.

Every error a user can cause (a bad model, bad data, an unsupported case, an unwritable path) is an
:class:`OnnxpressError`; the CLI prints its message as one line and exits with status 2. Anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CalibrationError",
    "check_argument_types",
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


class ArgumentError(OnnxpressError, ValueError):
    """An argument of the Python API is out of its range or conflicts with another (``lowrank(rank=0)``).

    Also a ``ValueError``, what Python code expects of a bad value (and what these raised before they were typed).
    """


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


def check_argument_types(
    where: str,
    *,
    flags: dict[str, object] | None = None,
    counts: dict[str, object] | None = None,
    numbers: dict[str, object] | None = None,
) -> None:
    """Refuse API arguments of the wrong type before they reach numpy or are read as true or false.

    ``per_channel="no"`` was taken as True (a non-empty string), ``max_samples=2.5`` ended in a TypeError from
    deep inside a reader. The CLI's parsers already give the right types; this guards the Python API.

    Args:
        where: the function, for the message (``"quantize"``).
        flags: arguments that must be ``True``, ``False`` or ``None``.
        counts: arguments that must be an ``int`` (not a bool) >= 1, or ``None``.
        numbers: arguments that must be an ``int`` or ``float`` (not a bool), or ``None``.

    Raises:
        OnnxpressError: naming the first argument of the wrong type and its value.
    """
    import numbers as kinds

    import numpy as np

    truth = (bool, np.bool_)
    for name, value in (flags or {}).items():
        if value is not None and not isinstance(value, truth):
            raise OnnxpressError(f"{where}: {name} must be True or False, got {value!r}")
    for name, value in (counts or {}).items():  # numpy integers are integers
        if value is not None and (isinstance(value, truth) or not isinstance(value, kinds.Integral) or value < 1):
            raise OnnxpressError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    for name, value in (numbers or {}).items():
        if value is not None and (isinstance(value, truth) or not isinstance(value, kinds.Real)):
            raise OnnxpressError(f"{where}: {name} must be a number, got {value!r}")
