"""Fuzzed graphs (tests/fuzz.py): every pass's output passes the checker and runs in onnxruntime;
exact passes preserve outputs (cleanup 1e-5, full-rank lowrank 1e-4); quantize stays within its
bound. A fixed hypothesis profile (derandomized, 40 examples) keeps CI deterministic.

Zero-channel pruning is exact on these graphs in tests/test_prune_fuzz.py (not repeated here).
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxpress
from onnxpress.passes.low_rank import SplitLowRank
from onnxpress.pipeline import cleanup_passes
from tests import graphs
from tests.conformance import sqnr_db
from tests.fuzz import cnn_models, sample_input

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

QUANT_SQNR_DB = 25.0
"""Output SQNR floor of int8 QDQ (default method) on the calibration samples themselves.

One rounding to 8 bits is ~40-50 dB on a bell-shaped tensor; a random graph chains up to ~8 quantized
tensors (each adds its noise), and 16 samples give coarse ranges. Measured minimum over this profile:
32.2 dB. On held-out samples the floor does not hold (values outside the calibrated range clip: 8.8 dB
seen with 16 calibration samples), so the property is stated on the calibration data.
"""


def _full_rank(model: onnx.ModelProto) -> onnxpress.TransformResult:
    """Every Gemm/MatMul/Conv split at full rank (the public API skips splits that save nothing)."""
    return onnxpress.transform(model, [*cleanup_passes(), SplitLowRank(rank=1 << 30, only_if_cheaper=False)])


def _valid(result: onnx.ModelProto, model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    onnx.checker.check_model(result, full_check=True)
    out = graphs.run(result, feed)[0]
    assert out.shape == graphs.run(model, feed)[0].shape and np.isfinite(out).all()
    return out


@FUZZ
@given(cnn_models())
def test_cleanup_is_exact_on_random_graphs(model):
    feed = sample_input(model)
    expected = graphs.run(model, feed)[0]
    result = onnxpress.cleanup(model)
    out = _valid(result.model, model, feed)
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node} or any(
        "kept" in note for note in result.pipeline.notes
    )
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@FUZZ
@given(cnn_models())
def test_lowrank_at_full_rank_is_exact_on_random_graphs(model):
    feed = sample_input(model)
    expected = graphs.run(model, feed)[0]
    result = _full_rank(model)
    assert result.stats["split_low_rank.layers_split"] >= 1  # the Gemm/MatMul head at least
    out = _valid(result.model, model, feed)
    np.testing.assert_allclose(out, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=1e-4)


@FUZZ
@given(cnn_models())
def test_quantize_stays_within_its_bound_on_random_graphs(model):
    calib = sample_input(model, batch=16, seed=1)
    expected = graphs.run(model, calib)[0]
    result = onnxpress.quantize(model, calib=[calib])
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    out = _valid(result.model, model, calib)
    assert sqnr_db(out, expected) >= QUANT_SQNR_DB


LOSSY = {
    "prune 0.5": lambda m: onnxpress.prune(m, ratio=0.5).model,
    "lowrank energy 0.5": lambda m: onnxpress.lowrank(m, energy=0.5).model,
    "lowrank rank 1": lambda m: onnxpress.lowrank(m, rank=1).model,
    "quantize minmax per-tensor int8": lambda m: onnxpress.quantize(
        m, calib=[sample_input(m, batch=8, seed=1)], method="minmax", per_channel=False, activations="int8"
    ).model,
}


@FUZZ
@given(cnn_models(), st.sampled_from(sorted(LOSSY)))
def test_lossy_passes_give_valid_models_on_random_graphs(model, which):
    _valid(LOSSY[which](model), model, sample_input(model))


def test_kl_range_covers_a_sigmoid_output_on_16_samples():
    """X[N,8] -> Sigmoid -> Y, 16 samples: Y spans [0.09, 0.88]; KL returned (0.08907, 0.08911) before the clip cap."""
    model = graphs.make_model([helper.make_node("Sigmoid", ["X"], ["Y"])], [("X", ["N", 8])], [("Y", ["N", 8])])
    x = graphs.rng(0).standard_normal((16, 8)).astype(np.float32)
    y = 1.0 / (1.0 + np.exp(-x))
    r = onnxpress.calibrate(model, [{"X": x}], method="kl", tensors=["Y"])["Y"]
    assert r.max - r.min >= 0.5 * (y.max() - y.min())


MUTATED_COMMANDS = {
    "cleanup": lambda p, feed: onnxpress.cleanup(p).model,
    "quantize": lambda p, feed: onnxpress.quantize(p, calib=[feed]).model,
    "prune": lambda p, feed: onnxpress.prune(p, ratio=0.5).model,
    "validate": lambda p, feed: onnxpress.validate(p, p, [feed], latency=False),
    "lowrank": lambda p, feed: onnxpress.lowrank(p, rank=2).model,
}


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=3),
       st.sampled_from(sorted(MUTATED_COMMANDS)))
def test_byte_mutated_models_give_a_result_or_our_error(tmp_path_factory, flips, which):
    """1-3 random bytes of a valid model overwritten: each command succeeds or raises our typed error."""
    from tests.test_hostile import _good_data, two_convs

    data = bytearray(two_convs().SerializeToString())
    for where, byte in flips:
        data[where % len(data)] = byte
    path = tmp_path_factory.mktemp("mut") / "model.onnx"
    path.write_bytes(bytes(data))
    try:
        result = MUTATED_COMMANDS[which](path, {"X": _good_data()})
    except onnxpress.OnnxpressError:
        return
    if isinstance(result, onnx.ModelProto):
        onnx.checker.check_model(result, full_check=True)
    assert path.read_bytes() == bytes(data)  # the input is never modified
