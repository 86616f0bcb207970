"""Pruning on fuzzed CNN graphs (tests/fuzz.py): zeroed units go exactly; the lossy pass stays valid."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxpress.passes.prune_channels import PruneChannels
from onnxpress.pipeline import run_passes
from tests import graphs
from tests.fuzz import cnn_models, sample_input
from tests.test_prune_channels import check_zero_pruning

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(cnn_models(), st.integers(0, 2**16))
def test_zeroed_units_go_exactly_on_random_graphs(model, seed):
    r = np.random.default_rng(seed)
    check_zero_pruning(model, lambda free: [u for u in free if r.random() < 0.5], sample_input(model)["X"])


@FUZZ
@given(cnn_models(), st.sampled_from([0.3, 0.6]), st.sampled_from([1, 2]))
def test_lossy_pruning_gives_valid_models(model, ratio, multiple):
    result = run_passes(model, [PruneChannels(ratio, multiple=multiple)])
    onnx.checker.check_model(result.model, full_check=True)
    feed = sample_input(model)
    out = graphs.run(result.model, feed)[0]
    assert out.shape == graphs.run(model, feed)[0].shape and np.isfinite(out).all()
