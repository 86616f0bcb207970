"""bn_stats: a BatchNorm's β, γ give the means after it (analytic bias correction) and floors (absorption)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxpress.passes.bias_correction import CorrectBias, quantized_weight
from onnxpress.passes.bn_stats import activation_means, preactivation_floors, rectified_mean
from onnxpress.pipeline import run_passes
from tests import graphs

C = 6


def bn_act_conv(act: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X[N,6,5,5] -> BatchNorm(γ, β, μ, σ²) -> Relu|Clip(0, 6)|none -> Conv 3x3 (channel ranges over 2 decades) -> Y.

    Returns the model and its BN parameters (the data tests draw X from N(μ, σ²) per channel).
    """
    r = graphs.rng(21)
    p = {"gamma": r.uniform(0.5, 2.0, C) * r.choice([-1, 1], C), "beta": r.normal(0.5, 1.5, C),
         "mean": r.normal(0, 1, C), "var": r.uniform(0.5, 2.0, C)}
    w = r.standard_normal((4, C, 3, 3)) * np.exp(r.uniform(-2.5, 2.0, 4))[:, None, None, None]
    inits = {k: v.astype(np.float32) for k, v in p.items()} | {"W": w.astype(np.float32),
                                                                "B": r.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("BatchNormalization", ["X", "gamma", "beta", "mean", "var"], ["bn"], epsilon=0.0)]
    x = "bn"
    if act == "relu":
        nodes.append(helper.make_node("Relu", ["bn"], ["a"]))
        x = "a"
    elif act == "clip":
        inits |= {"lo": np.array(0.0, np.float32), "hi": np.array(1.5, np.float32)}
        nodes.append(helper.make_node("Clip", ["bn", "lo", "hi"], ["a"]))
        x = "a"
    nodes.append(helper.make_node("Conv", [x, "W", "B"], ["Y"], pads=[1, 1, 1, 1], name="conv"))
    model = graphs.make_model(nodes, [("X", ["N", C, 5, 5])], [("Y", ["N", 4, 5, 5])], inits)
    return model, p


def data(p: dict[str, np.ndarray], n: int = 4000) -> np.ndarray:
    r = graphs.rng(22)
    return (p["mean"][None, :, None, None] + np.sqrt(p["var"])[None, :, None, None]
            * r.standard_normal((n, C, 5, 5))).astype(np.float32)


def test_rectified_mean_matches_monte_carlo() -> None:
    m, s = np.array([-2.0, -0.3, 0.0, 0.7, 3.0, 1.0]), np.array([1.0, 0.5, 2.0, 1.5, 0.2, 0.0])
    z = m[:, None] + s[:, None] * graphs.rng(5).standard_normal((6, 400_000))
    np.testing.assert_allclose(rectified_mean(m, s), np.maximum(z, 0).mean(axis=1), atol=5e-3)


@pytest.mark.parametrize("act", ["none", "relu", "clip"])
def test_activation_means_match_the_measured_means(act: str) -> None:
    model, p = bn_act_conv(act)
    name = "bn" if act == "none" else "a"
    means = activation_means(gs.import_onnx(model))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    measured = graphs.run(probe, {"X": data(p)})[-1].mean(axis=(0, 2, 3))
    np.testing.assert_allclose(means[name], measured, atol=0.03)


def test_floors_are_beta_minus_k_abs_gamma() -> None:
    model, p = bn_act_conv("relu")
    floors = preactivation_floors(gs.import_onnx(model), k=3.0)
    np.testing.assert_allclose(floors["bn"], p["beta"] - 3 * np.abs(p["gamma"]), rtol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        preactivation_floors(gs.import_onnx(model), k=0)


@pytest.mark.parametrize("act", ["relu", "clip"])
def test_analytic_bias_correction_cuts_the_mean_output_error_without_data(act: str) -> None:
    """Per-tensor int8 weights shift the conv's mean output; the BN-derived E[x] cancels most of it."""
    model, p = bn_act_conv(act)
    means = activation_means(gs.import_onnx(model))
    corrected = run_passes(model, [CorrectBias(means, per_channel=False)]).model
    init = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    assert np.array_equal(init(corrected)["W"], init(model)["W"])  # the bias moves, the weights do not
    assert not np.allclose(init(corrected)["B"], init(model)["B"])

    def rounded(m: onnx.ModelProto) -> onnx.ModelProto:  # what InsertQDQ's per-tensor int8 weights compute
        g = gs.import_onnx(m)
        conv = next(n for n in g.nodes if n.op == "Conv")
        conv.inputs[1] = gs.Constant("Wq", quantized_weight(conv, conv.inputs[1].values, per_channel=False))
        return gs.export_onnx(g.cleanup())

    x = data(p, 2000)
    ref = graphs.run(model, {"X": x})[0]
    plain = np.abs((graphs.run(rounded(model), {"X": x})[0] - ref).mean(axis=(0, 2, 3)))
    fixed = np.abs((graphs.run(rounded(corrected), {"X": x})[0] - ref).mean(axis=(0, 2, 3)))
    assert fixed.sum() < 0.3 * plain.sum(), (plain, fixed)
