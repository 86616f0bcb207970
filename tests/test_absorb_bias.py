"""AbsorbHighBias: exact on the data its floors were measured on (onnxruntime), declines what it cannot do."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxpress.passes.absorb_bias import AbsorbHighBias
from onnxpress.pipeline import run_passes
from tests import graphs


def conv_relu_conv(k2: int = 1, pads2: int = 0, hi: float | None = None, shift: float = 5.0) -> onnx.ModelProto:
    """X[N,4,6,6] -> Conv1 3x3 (B1 + shift) -> P -> Relu [-> Min(hi per channel)] -> Conv2 k2 x k2 -> Y.

    ``minima`` measures the per-channel minima of ``P`` (the pre-activation) on a copy with it as an output.
    """
    r = graphs.rng(3)
    inits = {
        "W1": (r.standard_normal((8, 4, 3, 3)) * 0.1).astype(np.float32),
        "B1": (r.standard_normal(8) * 0.3 + shift).astype(np.float32),
        "W2": (r.standard_normal((5, 8, k2, k2)) * 0.3).astype(np.float32),
        "B2": r.standard_normal(5).astype(np.float32),
    }
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["P"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["P"], ["R"])]
    act = "R"
    if hi is not None:
        inits["HI"] = (hi + r.uniform(0, 1, (8, 1, 1))).astype(np.float32)
        nodes.append(helper.make_node("Min", ["R", "HI"], ["M"]))
        act = "M"
    nodes.append(helper.make_node("Conv", [act, "W2", "B2"], ["Y"], pads=[pads2] * 4, name="conv2"))
    out = 6 + 2 * pads2 - k2 + 1
    return graphs.make_model(nodes, [("X", ["N", 4, 6, 6])], [("Y", ["N", 5, out, out])], inits)


def minima(model: onnx.ModelProto, x: np.ndarray, name: str = "P", axis: int = 1) -> np.ndarray:
    p = graphs.run(_with_output(model, name), {"X": x})[-1]
    return np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1).min(axis=1)


def absorb(model: onnx.ModelProto, floors: dict[str, np.ndarray]):
    return run_passes(model, [AbsorbHighBias(floors)])


@pytest.mark.parametrize("hi", [None, 6.0])
def test_conv_pair_is_exact_on_the_measured_data_and_the_activation_shrinks(hi: float | None) -> None:
    model = conv_relu_conv(hi=hi)
    x = graphs.rng(4).standard_normal((16, 4, 6, 6)).astype(np.float32)
    floor = minima(model, x)
    assert np.all(floor > 0)  # the shifted biases keep every channel on
    res = absorb(model, {"P": floor})
    assert res.stats["absorb_high_bias.layers"] == 1 and res.stats["absorb_high_bias.channels"] == 8
    onnx.checker.check_model(res.model, full_check=True)
    before, after = graphs.run(model, {"X": x})[0], graphs.run(res.model, {"X": x})[0]
    np.testing.assert_allclose(after, before, atol=1e-4, rtol=1e-5)
    # what the next quantizer sees: the activation, per channel, lower by the absorbed amount
    act = "M" if hi is not None else "R"
    probe = lambda m: graphs.run(_with_output(m, act), {"X": x})[-1]  # noqa: E731
    assert floor.max() < 6.0  # below every Min bound: each channel moves by its whole floor
    np.testing.assert_allclose(probe(model) - probe(res.model),
                               np.broadcast_to(floor.reshape(1, -1, 1, 1), probe(model).shape), atol=1e-4)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def test_padded_or_3x3_consumer_is_declined_with_a_reason() -> None:
    model = conv_relu_conv(k2=3, pads2=1)
    x = graphs.rng(4).standard_normal((4, 4, 6, 6)).astype(np.float32)
    res = absorb(model, {"P": minima(model, x)})
    assert res.stats["absorb_high_bias.layers"] == 0
    assert any("padded Conv" in n or "not 1x1" in n for n in res.notes), res.notes


def test_negative_floors_absorb_nothing() -> None:
    model = conv_relu_conv(shift=-5.0)
    res = absorb(model, {"P": np.full(8, -1.0)})
    assert res.stats["absorb_high_bias.layers"] == 0 and res.stats["absorb_high_bias.channels"] == 0


def mlp(kind: str, trans_b: int, seed: int) -> onnx.ModelProto:
    """X[N,6] -> Gemm|MatMul+Add (B1 + 2) -> P -> Relu -> Gemm(transB)|MatMul+Add -> Y[N,3]."""
    r = graphs.rng(seed)
    w1, w2 = r.standard_normal((6, 7)).astype(np.float32), r.standard_normal((7, 3)).astype(np.float32)
    inits = {"W1": w1, "B1": (r.standard_normal(7) + 2.0).astype(np.float32), "B2": r.standard_normal(3).astype(
        np.float32), "W2": w2.T.copy() if trans_b else w2}
    if kind == "gemm":
        nodes = [helper.make_node("Gemm", ["X", "W1", "B1"], ["P"]), helper.make_node("Relu", ["P"], ["R"]),
                 helper.make_node("Gemm", ["R", "W2", "B2"], ["Y"], transB=trans_b, alpha=0.7, beta=0.5)]
    else:
        inits["W2"] = w2
        nodes = [helper.make_node("MatMul", ["X", "W1"], ["m1"]), helper.make_node("Add", ["m1", "B1"], ["P"]),
                 helper.make_node("Relu", ["P"], ["R"]), helper.make_node("MatMul", ["R", "W2"], ["m2"]),
                 helper.make_node("Add", ["m2", "B2"], ["Y"])]
    return graphs.make_model(nodes, [("X", ["N", 6])], [("Y", ["N", 3])], inits)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["gemm", "matmul"]), trans_b=st.integers(0, 1), seed=st.integers(0, 10_000))
def test_gemm_and_matmul_pairs_are_exact(kind: str, trans_b: int, seed: int) -> None:
    model = mlp(kind, trans_b, seed)
    x = graphs.rng(seed + 1).standard_normal((32, 6)).astype(np.float32)
    floor = minima(model, x, axis=1)
    res = absorb(model, {"P": floor})
    assert res.stats["absorb_high_bias.channels"] == int(np.count_nonzero(floor > 0))
    np.testing.assert_allclose(graphs.run(res.model, {"X": x})[0], graphs.run(model, {"X": x})[0],
                               atol=1e-4, rtol=1e-5)


def test_input_model_is_not_modified() -> None:
    model = conv_relu_conv()
    before = model.SerializeToString()
    absorb(model, {"P": np.full(8, 0.5)})
    assert model.SerializeToString() == before
    assert gs.import_onnx(model).nodes  # still a whole graph


def test_api_with_data_measures_floors_and_is_exact_there(tmp_path) -> None:
    """``onnxpress.advanced.absorb_high_bias(model, data)``: minima on the data, exact on it, written checked."""
    from onnxpress.advanced import absorb_high_bias

    model = conv_relu_conv()
    x = graphs.rng(4).standard_normal((32, 4, 6, 6)).astype(np.float32)
    res = absorb_high_bias(model, [{"X": x}], tmp_path / "a.onnx")
    assert res.stats["absorb_high_bias.channels"] == 8
    np.testing.assert_allclose(graphs.run(onnx.load(tmp_path / "a.onnx"), {"X": x})[0],
                               graphs.run(model, {"X": x})[0], atol=1e-4, rtol=1e-5)


def test_api_without_data_uses_batchnorm_floors() -> None:
    """No data: floors β − 3|γ| from the BN before the Relu (folded afterwards); the output changes only
    where a pre-activation falls below its floor (~0.13% of Gaussian values)."""
    from onnxpress.advanced import absorb_high_bias

    r = graphs.rng(6)
    x = r.standard_normal((200, 4, 6, 6)).astype(np.float32)
    w1 = (r.standard_normal((8, 4, 1, 1)) * 0.5).astype(np.float32)
    c = np.einsum("oi,nihw->nohw", w1[:, :, 0, 0], x)
    inits = {"W1": w1, "gamma": r.uniform(0.5, 1.0, 8).astype(np.float32),
             "beta": r.uniform(2.0, 6.0, 8).astype(np.float32), "mean": c.mean(axis=(0, 2, 3)).astype(np.float32),
             "var": c.var(axis=(0, 2, 3)).astype(np.float32),
             "W2": r.standard_normal((5, 8, 1, 1)).astype(np.float32), "B2": r.standard_normal(5).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["X", "W1"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["a"]), helper.make_node("Conv", ["a", "W2", "B2"], ["Y"])]
    model = graphs.make_model(nodes, [("X", ["N", 4, 6, 6])], [("Y", ["N", 5, 6, 6])], inits)
    res = absorb_high_bias(model)
    assert res.stats["absorb_high_bias.channels"] == 8  # every β_c − 3|γ_c| > 0 here
    before, after = graphs.run(model, {"X": x})[0], graphs.run(res.model, {"X": x})[0]
    close = np.isclose(after, before, atol=1e-4, rtol=1e-5)
    # an output differs when any of its 8 inputs fell below its floor: 1 - (1 - Φ(-3))^8 ≈ 1.1% of outputs
    assert 0.98 < close.mean() < 1.0, close.mean()
