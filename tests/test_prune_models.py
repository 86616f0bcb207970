"""Pruning on the reference models: zeroed channel groups are removed exactly (hypothesis), and the
lossy pass gives valid, smaller models. Skipped for models not built yet (``models/*.onnx``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxpress.model_io import load_model, normalize_model
from onnxpress.passes.channel_groups import analyze_channels
from onnxpress.passes.flops import count_macs
from onnxpress.passes.prune_channels import PruneChannels
from onnxpress.pipeline import run_passes
from tests import graphs
from tests.test_prune_channels import check_zero_pruning

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["resnet", "mobilenet", "concat", "transformer", "resnet_opset11", "resnet_constants"]


def _load(name: str):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built yet")
    return normalize_model(load_model(path))


def _inputs(n: int = 3, seed: int = 0) -> np.ndarray:
    data = MODELS / "digits32_test.npz"
    if data.exists():
        return np.load(data)["input"][:n].astype(np.float32)
    return graphs.rng(seed).standard_normal((n, 1, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), fraction=st.sampled_from([0.1, 0.3, 0.6]))
def test_zeroed_groups_are_removed_exactly(name, seed, fraction):
    model = _load(name)
    r = np.random.default_rng(seed)
    n_units, zeroed = check_zero_pruning(
        model, lambda free: [u for u in free if r.random() < fraction], _inputs(), "input"
    )
    assert n_units == 0 or zeroed > 0


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "concat"])
def test_cnn_groups_are_all_understood(name):
    """In the reference CNNs only the classifier (a graph output) is frozen."""
    analysis = analyze_channels(gs.import_onnx(_load(name)))
    frozen = [g for g in analysis.groups() if g.is_frozen]
    assert len(frozen) == 1 and all("graph output" in why for why in frozen[0].frozen)


def test_transformer_ffn_hidden_channels_are_prunable():
    """The two 512-wide FFN hidden layers are free; attention projections freeze at the head Reshape/LayerNorm."""
    analysis = analyze_channels(gs.import_onnx(_load("transformer")))
    frozen = analysis.frozen_units()
    free = sorted(sum(u not in frozen for u in g.units) for g in analysis.groups())
    assert free[-2:] == [512, 512] and sum(free) == 1024


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "concat"])
def test_half_the_channels_quarter_the_macs(name):
    """Global 50% with multiple 8: MACs drop to <= 0.35x (about 0.25x: both sides of a conv shrink)."""
    model = _load(name)
    result = run_passes(model, [PruneChannels(0.5, multiple=8)])
    before, after = sum(count_macs(model).values()), sum(count_macs(result.model).values())
    assert after <= 0.35 * before
    out = graphs.run(result.model, {"input": _inputs()})[0]
    assert out.shape == (3, 10) and np.isfinite(out).all()
