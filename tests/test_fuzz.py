"""Fuzzed graphs: every pass's output passes the checker, loads in onnxruntime, and exact passes
preserve outputs within 1e-5 (hypothesis, fixed profile so CI is deterministic)."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings

import onnxpress
from tests import graphs
from tests.fuzz import cnn_models, sample_input

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(cnn_models())
def test_cleanup_is_exact_on_random_graphs(model):
    feed = sample_input(model)
    expected = graphs.run(model, feed)[0]
    result = onnxpress.cleanup(model).model
    onnx.checker.check_model(result, full_check=True)
    assert "BatchNormalization" not in {n.op_type for n in result.graph.node} or any(
        "kept" in note for note in onnxpress.cleanup(model).pipeline.notes
    )
    np.testing.assert_allclose(graphs.run(result, feed)[0], expected, atol=1e-5, rtol=1e-5)
