"""onnxpress: make exported ONNX models smaller and faster, and prove how much accuracy they kept.

Public API (each function accepts a path or an ``onnx.ModelProto`` and never modifies it)::

    import onnxpress
    onnxpress.cleanup("model.onnx", "clean.onnx")       # fold constants and BatchNormalization
"""

from __future__ import annotations

from onnxpress.advanced import absorb_high_bias, codebook, correct_bias, equalize, smoothquant
from onnxpress.api import cleanup
from onnxpress.calibrate import calibrate
from onnxpress.calibration.readers import samples_on
from onnxpress.driver import TransformResult, transform
from onnxpress.errors import (
    ArgumentError,
    CalibrationError,
    DataError,
    ModelLoadError,
    OnnxpressError,
    OutputError,
    PassError,
    UnsupportedModelError,
    ValidationError,
)
from onnxpress.finetune import FinetuneResult, finetune
from onnxpress.lowrank import LowRankResult, lowrank
from onnxpress.model_io import load_model, normalize_model, save_model
from onnxpress.optimize import OptimizeResult, optimize
from onnxpress.pipeline import run_passes
from onnxpress.prune import PruneResult, prune, sensitivity_scan
from onnxpress.quantize import QuantizeResult, quantize
from onnxpress.validate import ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "CalibrationError",
    "DataError",
    "FinetuneResult",
    "LowRankResult",
    "ModelLoadError",
    "OnnxpressError",
    "OptimizeResult",
    "OutputError",
    "PassError",
    "PruneResult",
    "QuantizeResult",
    "TransformResult",
    "UnsupportedModelError",
    "ValidationReport",
    "ValidationError",
    "absorb_high_bias",
    "calibrate",
    "cleanup",
    "codebook",
    "correct_bias",
    "equalize",
    "finetune",
    "load_model",
    "lowrank",
    "normalize_model",
    "optimize",
    "prune",
    "quantize",
    "run_passes",
    "samples_on",
    "save_model",
    "sensitivity_scan",
    "smoothquant",
    "transform",
    "validate",
]
