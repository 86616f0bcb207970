"""The driver owns side effects: load → normalise → passes → check → save.

Every command that rewrites a model goes through :func:`transform`, so loading, the never-modify-
the-input rule, atomic checked saving and error wrapping are written once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import onnx

from onnxpress.model_io import ModelSource, check_model, check_output_path, load_model, normalize_model, save_model
from onnxpress.passes.base import GraphPass
from onnxpress.pipeline import PipelineResult, run_passes

__all__ = ["TransformResult", "transform"]


@dataclasses.dataclass(frozen=True)
class TransformResult:
    """The rewritten model, where it was written (if asked), and what the passes reported."""

    model: onnx.ModelProto
    output: Path | None
    pipeline: PipelineResult

    @property
    def stats(self) -> dict[str, int]:
        """Counters of every pass, keyed ``"<pass>.<counter>"``."""
        return self.pipeline.stats


def transform(
    model: ModelSource,
    passes: Sequence[GraphPass],
    output: str | os.PathLike[str] | None = None,
    *,
    min_opset: int | None = 13,
    progress: bool = False,
) -> TransformResult:
    """Load ``model`` (a private copy), run ``passes``, check the result, and save it to ``output``.

    Raises:
        OutputError: ``output`` cannot be written or equals the input path (checked before work).
        ModelLoadError, UnsupportedModelError, PassError: as raised by loading or the passes.
    """
    if output is not None:
        check_output_path(output, [model])
    proto = normalize_model(load_model(model), min_opset=min_opset)
    result = run_passes(proto, passes, progress=progress)
    check_model(result.model, where="the rewritten model")
    written = save_model(result.model, output) if output is not None else None
    return TransformResult(result.model, written, result)
