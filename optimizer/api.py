"""Public Python API functions that are not big enough for a module of their own."""

from __future__ import annotations

import os

from onnxpress.driver import TransformResult, transform
from onnxpress.model_io import ModelSource
from onnxpress.passes.fold import ShareTransposedConstants
from onnxpress.pipeline import cleanup_passes

__all__ = ["cleanup"]


def cleanup(
    model: ModelSource,
    output: str | os.PathLike[str] | None = None,
    *,
    progress: bool = False,
) -> TransformResult:
    """Fold constants (and ``Constant``-node weights) and BatchNormalization; exact in float.

    A folded constant that equals another one's transpose (a tied embedding's ``Transpose(W)``) is kept as
    that Transpose, so the file does not store the weight twice.

    Args:
        model: path or ModelProto (never modified).
        output: where to write the result (atomically, checked); ``None`` to only return it.
        progress: show a progress bar over the passes.
    """
    # No opset upgrade here: these passes work at any opset, and onnx's version converter can
    # change meaning (onnx's Scan-8 conformance case breaks when upgraded to Scan-9+).
    return transform(model, [*cleanup_passes(), ShareTransposedConstants()], output, min_opset=None, progress=progress)
