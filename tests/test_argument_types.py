"""The Python API refuses arguments of the wrong type by name (the CLI's parsers already type them)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxpress
from onnxpress.errors import OnnxpressError, check_argument_types
from tests.test_qdq import feeds_for, residual_cnn


@pytest.mark.parametrize(("call", "match"), [
    # a non-empty string was read as True; a float count or a string size failed deep inside numpy
    (lambda m, x: onnxpress.quantize(m, calib=[x], per_channel="no"), r"quantize: per_channel must be True or False"),
    (lambda m, x: onnxpress.quantize(m, calib=[x], max_samples=2.5), r"quantize: max_samples must be an integer >= 1"),
    (lambda m, x: onnxpress.quantize(m, calib=[x], batch_size="8"), r"quantize: batch_size must be an integer >= 1"),
    (lambda m, x: onnxpress.quantize(m, calib=[x], smoothquant=True), r"quantize: smoothquant must be a number"),
    (lambda m, x: onnxpress.calibrate(m, [x], bits=8.0), r"calibrate: bits must be an integer >= 1, got 8\.0"),
    (lambda m, x: onnxpress.prune(m, calib=[x], ratio=0.5, compensate=1), r"prune: compensate must be True or False"),
    (lambda m, x: onnxpress.lowrank(m, rank=2, joint="yes"), r"lowrank: joint must be True or False"),
    (lambda m, x: onnxpress.lowrank(m, rank="4"), r"lowrank: rank must be an integer, got '4'"),
    (lambda m, x: onnxpress.prune(m, ratio="0.5"), r"prune: ratio must be a number, got '0\.5'"),  # TypeError at '>'
])
def test_wrong_types_are_named(call, match):
    model = residual_cnn()
    with pytest.raises(OnnxpressError, match=match):
        call(model, feeds_for(model))


def test_numpy_scalars_are_the_types_they_hold():
    check_argument_types("f", flags={"a": np.bool_(True)}, counts={"n": np.int64(3)}, numbers={"x": np.float32(0.5)})
    with pytest.raises(OnnxpressError, match=r"f: n must be an integer >= 1, got np\.float64\(3\.0\)"):
        check_argument_types("f", counts={"n": np.float64(3)})
    model = residual_cnn()
    assert onnxpress.quantize(model, calib=[feeds_for(model)], max_samples=np.int64(8)).quantized


@pytest.mark.parametrize(("call", "match"), [
    # values out of range: a plain ValueError escaped the API before (the CLI checks these itself)
    (lambda m, x: onnxpress.lowrank(m), r"give exactly one of rank=, energy= or flops="),
    (lambda m, x: onnxpress.lowrank(m, rank=0), r"rank must be >= 1, got 0"),
    (lambda m, x: onnxpress.lowrank(m, flops=1.5), r"flops must be a fraction in \(0, 1\], got 1\.5"),
    (lambda m, x: onnxpress.lowrank(m, energy=2), r"energy must be in \(0, 1\], got 2"),
    (lambda m, x: onnxpress.prune(m, ratio=1.0), r"pruning ratio must be in \[0, 1\), got 1\.0"),
    (lambda m, x: onnxpress.prune(m, ratio=0.5, criterion="xx"), r"unknown criterion 'xx'"),
    (lambda m, x: onnxpress.equalize(m, clip="bad"), r"clip must be 'skip', 'split' or 'relu', not 'bad'"),
    (lambda m, x: onnxpress.finetune(m, m, [x], exporter="xx"), r"exporter must be auto, dynamo, torchscript"),
])
def test_values_out_of_range_are_typed_errors_and_still_value_errors(call, match):
    from onnxpress.errors import ArgumentError

    model = residual_cnn()
    with pytest.raises(ArgumentError, match=match) as info:
        call(model, feeds_for(model))
    assert isinstance(info.value, OnnxpressError) and isinstance(info.value, ValueError)
