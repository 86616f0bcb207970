"""CorrectBias: after InsertQDQ, the corrected layer's mean output error shrinks (onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxpress.calibration.table import CalibrationTable
from onnxpress.passes.bias_correction import CorrectBias, bias_correction_inputs, quantized_weight
from onnxpress.passes.qdq import InsertQDQ
from onnxpress.pipeline import run_passes
from tests import graphs


def skewed_conv(group: int = 1, bias: bool = True) -> onnx.ModelProto:
    """X[N,8,10,10] -> Conv(W[8, 8/group, 3, 3], B?, group) -> Y: channel ranges span 2 decades.

    Per-tensor int8 on such a weight rounds the small channels coarsely, which shifts their mean.
    """
    r = graphs.rng(10)
    w = r.standard_normal((8, 8 // group, 3, 3)) * np.exp(r.uniform(-2.5, 2.0, 8))[:, None, None, None]
    inits = {"W": w.astype(np.float32)}
    inputs = ["X", "W"]
    if bias:
        inits["B"] = r.standard_normal(8).astype(np.float32)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["Y"], pads=[1, 1, 1, 1], group=group)
    return graphs.make_model([node], [("X", ["N", 8, 10, 10])], [("Y", ["N", 8, 10, 10])], inits)


def gemm_layer(trans_b: int) -> onnx.ModelProto:
    """X[N,32] -> Gemm(W, B, transB, alpha=0.5) -> Y[N,12]."""
    r = graphs.rng(11)
    w = r.standard_normal((12, 32)) * np.exp(r.uniform(-2.5, 2.0, 12))[:, None]
    w = w if trans_b else w.T
    inits = {"W": w.astype(np.float32), "B": r.standard_normal(12).astype(np.float32)}
    node = helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=trans_b, alpha=0.5)
    return graphs.make_model([node], [("X", ["N", 32])], [("Y", ["N", 12])], inits)


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Post-ReLU-like inputs: non-negative, a non-zero mean that differs per channel (same for every seed)."""
    shift = graphs.rng(99).uniform(0.2, 2.0, shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    r = graphs.rng(seed)
    return np.maximum(r.standard_normal(shape) + shift, 0.0).astype(np.float32)


def _channel_mean(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).mean(axis=1)


def _quantize(model: onnx.ModelProto, feeds: dict[str, np.ndarray], per_channel: bool) -> onnx.ModelProto:
    """Real InsertQDQ with min/max ranges of the input and output (measured on ``feeds``)."""
    y = graphs.run(model, feeds)[0]
    x = feeds["X"]
    table = CalibrationTable.from_ranges({"X": (float(x.min()), float(x.max())), "Y": (float(y.min()), float(y.max()))})
    return run_passes(model, [InsertQDQ(table, per_channel=per_channel, min_conv_depth=0)]).model  # quantize all convs


def _mean_error(ref: onnx.ModelProto, cand: onnx.ModelProto, x: np.ndarray, interior: bool = False):
    """(mean over channels of |E[y_q - y]|, mean squared error) on ``x``.

    ``interior`` drops the 1-pixel border of a 3x3 'same' conv, whose receptive field includes zero
    padding (the correction assumes every tap sees the channel mean).
    """
    d = graphs.run(cand, {"X": x})[0].astype(np.float64) - graphs.run(ref, {"X": x})[0]
    if interior:
        d = d[:, :, 1:-1, 1:-1]
    return float(np.mean(np.abs(_channel_mean(d)))), float(np.mean(d**2))


@pytest.mark.parametrize(("group", "bias"), [(1, True), (1, False), (2, True), (8, True)])
def test_conv_mean_output_error_shrinks_after_qdq(group, bias):
    model = skewed_conv(group, bias)
    calib, held_out = _data((64, 8, 10, 10), 1), _data((64, 8, 10, 10), 2)
    corrected = run_passes(model, [CorrectBias({"X": _channel_mean(calib)}, per_channel=False)])
    assert corrected.stats["correct_bias.corrected"] == 1
    plain_q = _quantize(model, {"X": calib}, per_channel=False)
    fixed_q = _quantize(corrected.model, {"X": calib}, per_channel=False)
    bias_before, mse_before = _mean_error(model, plain_q, held_out)
    bias_after, mse_after = _mean_error(model, fixed_q, held_out)
    assert bias_before > 0.02  # the test case really has a shift to correct
    assert bias_after < 0.5 * bias_before  # whole image: padded borders keep a residual
    assert mse_after < mse_before
    inner_before, _ = _mean_error(model, plain_q, held_out, interior=True)
    inner_after, _ = _mean_error(model, fixed_q, held_out, interior=True)
    assert inner_after < 0.1 * inner_before


@pytest.mark.parametrize(("group", "stride"), [(1, 1), (2, 2), (8, 1)])
def test_per_position_means_correct_the_padded_borders_too(group, stride):
    """With a [C,H,W] mean map the whole-image channel mean error (borders included) vanishes."""
    model = skewed_conv(group)
    model.graph.node[0].attribute.append(helper.make_attribute("strides", [stride, stride]))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    calib, held_out = _data((64, 8, 10, 10), 1), _data((64, 8, 10, 10), 2)
    corrected = run_passes(model, [CorrectBias({"X": calib.mean(axis=0)}, per_channel=False)])
    plain_q = _quantize(model, {"X": calib}, per_channel=False)
    fixed_q = _quantize(corrected.model, {"X": calib}, per_channel=False)
    bias_before, _ = _mean_error(model, plain_q, held_out)
    bias_after, _ = _mean_error(model, fixed_q, held_out)
    assert bias_after < 0.12 * bias_before


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_mean_output_error_shrinks(trans_b):
    model = gemm_layer(trans_b)
    calib, held_out = _data((256, 32), 3), _data((256, 32), 4)
    corrected = run_passes(model, [CorrectBias({"X": calib.mean(axis=0)}, per_channel=False)])
    bias_before, _ = _mean_error(model, _quantize(model, {"X": calib}, False), held_out)
    bias_after, _ = _mean_error(model, _quantize(corrected.model, {"X": calib}, False), held_out)
    assert bias_after < 0.2 * bias_before


def test_correction_is_exactly_the_expected_shift_on_the_float_graph():
    """Float model, weight-only view: E[Q(W)x + b'] equals E[W x + b] exactly for a Gemm."""
    model = gemm_layer(1)
    x = _data((100, 32), 5)
    g = gs.import_onnx(model)
    node = g.nodes[0]
    q = quantized_weight(node, node.inputs[1].values, per_channel=True)
    corrected = run_passes(model, [CorrectBias({"X": x.mean(axis=0)}, per_channel=True)]).model
    b_new = onnx.numpy_helper.to_array(next(i for i in corrected.graph.initializer if i.name == "B"))
    b_old = node.inputs[2].values
    y_ref = 0.5 * x.astype(np.float64) @ node.inputs[1].values.T.astype(np.float64) + b_old
    y_q = 0.5 * x.astype(np.float64) @ q.T.astype(np.float64) + b_new
    np.testing.assert_allclose(y_q.mean(axis=0), y_ref.mean(axis=0), atol=1e-5, rtol=0)


def test_matmul_add_and_declines():
    """X[N,16] -> MatMul(W) -> Add(b) -> Y; a second MatMul without bias Add is declined."""
    r = graphs.rng(12)
    inits = {"W": r.standard_normal((16, 8)).astype(np.float32), "b": np.zeros(8, np.float32),
             "W2": r.standard_normal((16, 8)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["Y"]),
             helper.make_node("MatMul", ["X", "W2"], ["Z"])]
    model = graphs.make_model(nodes, [("X", ["N", 16])], [("Y", ["N", 8]), ("Z", ["N", 8])], inits)
    assert bias_correction_inputs(gs.import_onnx(model)) == [("X", -1)]
    x = _data((50, 16), 6)
    result = run_passes(model, [CorrectBias({"X": x.mean(axis=0)}, per_channel=False)])
    assert result.stats["correct_bias.corrected"] == 1
    assert any("bias Add" in n for n in result.notes)
    b = onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "b"))
    w = inits["W"]
    q = quantized_weight(gs.import_onnx(model).nodes[0], w, per_channel=False)
    np.testing.assert_allclose(b, x.mean(axis=0).astype(np.float64) @ (w - q), atol=1e-6)


def test_missing_or_mismatched_means_are_declined():
    model = skewed_conv()
    result = run_passes(model, [CorrectBias({})])
    assert not result.modified and "no input mean" in result.notes[0]
    result = run_passes(model, [CorrectBias({"X": np.zeros(3)})])
    assert not result.modified and "has 3 channels" in result.notes[0]


def test_public_correct_bias_uses_streamed_means(tmp_path):
    """X -> Relu -> r -> Gemm(W, B) -> Y: the mean of r is streamed from three feeds in batches of 16."""
    import onnxpress.advanced as adv

    base = gemm_layer(1)
    nodes = [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("Gemm", ["r", "W", "B"], ["Y"], transB=1,
                                                                          alpha=0.5)]
    model = graphs.make_model(nodes, [("X", ["N", 32])], [("Y", ["N", 12])],
                              {i.name: onnx.numpy_helper.to_array(i) for i in base.graph.initializer})
    calib = _data((90, 32), 7) - 0.5
    feeds = [{"X": calib[i : i + 30]} for i in range(0, 90, 30)]
    result = adv.correct_bias(model, feeds, tmp_path / "bc.onnx", per_channel=False, batch_size=16)
    direct = run_passes(model, [CorrectBias({"r": np.maximum(calib, 0).mean(axis=0)}, per_channel=False)]).model
    b_api = onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "B"))
    b_direct = onnx.numpy_helper.to_array(next(i for i in direct.graph.initializer if i.name == "B"))
    assert result.stats["correct_bias.corrected"] == 1
    np.testing.assert_allclose(b_api, b_direct, rtol=0, atol=1e-6)
    assert (tmp_path / "bc.onnx").exists()


def test_channel_stats_observer_rejects_empty_and_non_finite():
    from onnxpress.advanced import ChannelStatsObserver
    from onnxpress.errors import CalibrationError

    obs = ChannelStatsObserver(1, name="x")
    with pytest.raises(CalibrationError, match="no values"):
        obs.mean()
    obs.update(np.ones((2, 3, 4), np.float32))
    np.testing.assert_array_equal(obs.mean(), np.ones(3))
    with pytest.raises(CalibrationError, match="NaN"):
        obs.update(np.full((1, 3, 4), np.nan, np.float32))


def test_channel_stats_observer_keeps_a_position_map_until_the_shape_changes():
    from onnxpress.advanced import ChannelStatsObserver

    x = _data((6, 3, 4, 5), 8)
    obs = ChannelStatsObserver(1, spatial=True, name="x")
    obs.update(x[:2])
    obs.update(x[2:])
    np.testing.assert_allclose(obs.mean_map(), x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(obs.mean(), _channel_mean(x.astype(np.float64)), rtol=1e-12)
    obs.update(x[:, :, :2])  # a different spatial size: the map is no longer meaningful
    assert obs.mean_map() is None


def test_only_the_layers_the_qdq_pass_quantizes_are_corrected():
    """quantize(bias_correction=True, exclude=["shallow"]): the conv left float must not be corrected."""
    import onnxpress

    r = graphs.rng(13)
    inits = {"W1": (r.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32), "B1": np.zeros(8, np.float32),
             "W2": skewed_conv().graph.initializer[0]}
    inits["W2"] = onnx.numpy_helper.to_array(inits["W2"])
    inits["B2"] = np.zeros(8, np.float32)
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="shallow"),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "W2", "B2"], ["Y"], pads=[1, 1, 1, 1], name="deep")]
    model = graphs.make_model(nodes, [("X", ["N", 1, 10, 10])], [("Y", ["N", 8, 10, 10])], inits)
    feeds = [{"X": _data((32, 1, 10, 10), 14)}]
    result = onnxpress.quantize(model, calib=feeds, per_channel=False, method="minmax", bias_correction=True,
                                exclude=["shallow"])
    assert {d.name for d in result.quantized if d.op == "Conv"} == {"deep"}
    b1 = [i for i in result.model.graph.initializer if i.name.startswith("B1")]
    assert b1 and np.all(onnx.numpy_helper.to_array(b1[0]) == 0)  # the float conv's bias is untouched
    b2 = [i for i in result.model.graph.initializer if i.name.startswith("B2")]
    assert b2 and np.any(onnx.numpy_helper.to_array(b2[0]) != 0)  # int32 bias of the quantized conv moved
    direct = run_passes(model, [CorrectBias({"a1": np.ones((8, 10, 10))}, layers={"deep"})])
    assert any("shallow" in n and "left float" in n for n in direct.notes)
