"""EqualizeCrossLayer: exact in float on onnxruntime, and the per-channel ranges really equalized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxpress.model_io import load_model, normalize_model
from onnxpress.passes.equalize import EqualizeCrossLayer, find_pairs, in_ranges, out_ranges
from onnxpress.pipeline import cleanup_passes, run_passes
from tests import graphs

MODELS = Path(__file__).resolve().parent.parent / "models"


def _skewed(r: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Weights whose channel ranges along ``axis`` span ~3 decades (the CLE-hostile case)."""
    w = r.standard_normal(shape)
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    return (w * np.exp(r.uniform(-3.5, 3.5, shape[axis])).reshape(scale_shape)).astype(np.float32)


def pw_dw_pw(act: str = "Relu", c: int = 8, seed: int = 0) -> onnx.ModelProto:
    """X[N,4,6,6] -> Conv1x1(4->c) -> act -> ConvDW3x3(c, group=c) -> act -> Conv1x1(c->5) -> Y."""
    r = graphs.rng(seed)
    inits = {
        "W1": _skewed(r, (c, 4, 1, 1), 0),
        "B1": r.standard_normal(c).astype(np.float32),
        "W2": _skewed(r, (c, 1, 3, 3), 0),
        "B2": r.standard_normal(c).astype(np.float32),
        "W3": _skewed(r, (5, c, 1, 1), 1),
        "B3": r.standard_normal(5).astype(np.float32),
    }
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], name="pw1")]
    if act == "Clip":
        inits["lo"], inits["hi"] = np.float32(0.0), np.float32(6.0)
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="clip1"))
    else:
        nodes.append(helper.make_node(act, ["c1"], ["a1"], name="act1"))
    nodes.append(helper.make_node("Conv", ["a1", "W2", "B2"], ["c2"], name="dw", group=c, pads=[1, 1, 1, 1]))
    if act == "Clip":
        nodes.append(helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"], name="clip2"))
    else:
        nodes.append(helper.make_node(act, ["c2"], ["a2"], name="act2"))
    nodes.append(helper.make_node("Conv", ["a2", "W3", "B3"], ["Y"], name="pw2"))
    return graphs.make_model(nodes, [("X", ["N", 4, 6, 6])], [("Y", ["N", 5, 6, 6])], inits)


def gemm_relu_gemm(trans_b: int) -> onnx.ModelProto:
    """X[N,6] -> Gemm(W1, B1, transB) -> Relu -> Gemm(W2, B2, transB) -> Y[N,3]."""
    r = graphs.rng(3)
    w1 = _skewed(r, (6, 10), 1)  # [K, N] with skewed output columns
    w2 = _skewed(r, (10, 3), 0)
    if trans_b:
        w1, w2 = w1.T.copy(), w2.T.copy()
    inits = {"W1": w1, "B1": r.standard_normal(10).astype(np.float32), "W2": w2, "B2": np.zeros(3, np.float32)}
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "B1"], ["g1"], transB=trans_b, name="fc1"),
        helper.make_node("Relu", ["g1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "W2", "B2"], ["Y"], transB=trans_b, name="fc2"),
    ]
    return graphs.make_model(nodes, [("X", ["N", 6])], [("Y", ["N", 3])], inits)


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-4) -> None:
    ya, yb = graphs.run(a, feeds)[0], graphs.run(b, feeds)[0]
    scale = float(np.max(np.abs(ya))) or 1.0
    np.testing.assert_allclose(yb, ya, atol=tol * scale, rtol=0)


def _intermediate(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return graphs.run(probe, feeds)[-1]


def _pair_ranges(model: onnx.ModelProto, clip: str = "skip") -> list[tuple[np.ndarray, np.ndarray]]:
    pairs, _ = find_pairs(gs.import_onnx(model), clip)
    return [(out_ranges(p.first), in_ranges(p.second)) for p in pairs]


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu"])
def test_pw_dw_pw_chain_is_exact_and_equalized(act):
    model = pw_dw_pw(act)
    before = model.SerializeToString()
    x = graphs.rng(1).standard_normal((3, 4, 6, 6)).astype(np.float32)
    result = run_passes(model, [EqualizeCrossLayer()])
    assert model.SerializeToString() == before  # input untouched
    assert result.stats["equalize_cross_layer.pairs"] == 2
    _assert_same(model, result.model, {"X": x})
    spread_before = [np.ptp(np.log(r1)) for r1, _ in _pair_ranges(model)]
    for (r1, r2), spread in zip(_pair_ranges(result.model), spread_before, strict=True):
        np.testing.assert_allclose(r1, r2, rtol=5e-3)  # converged: both sides of each pair match
        assert np.ptp(np.log(r1)) < spread - 1.0  # and the channel spread really shrank


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_pair_is_exact(trans_b):
    model = gemm_relu_gemm(trans_b)
    x = graphs.rng(2).standard_normal((7, 6)).astype(np.float32)
    result = run_passes(model, [EqualizeCrossLayer()])
    assert result.stats["equalize_cross_layer.pairs"] == 1
    _assert_same(model, result.model, {"X": x})
    (r1, r2), = _pair_ranges(result.model)
    np.testing.assert_allclose(r1, r2, rtol=1e-6)  # a single pair converges in one sweep


def test_clip_pairs_are_declined_by_default():
    model = pw_dw_pw("Clip")
    result = run_passes(model, [EqualizeCrossLayer()])
    assert result.stats["equalize_cross_layer.pairs"] == 0
    assert not result.modified
    assert any("Clip" in n for n in result.notes)


def test_clip_split_is_exact_and_rescales_bounds():
    """Clip(0,6) -> Relu -> Min(per-channel 6/s): exact, and the bounds differ per channel."""
    model = pw_dw_pw("Clip")
    x = (3 * graphs.rng(4).standard_normal((3, 4, 6, 6))).astype(np.float32)
    result = run_passes(model, [EqualizeCrossLayer(clip="split")])
    assert result.stats["equalize_cross_layer.clips_split"] == 2
    ops = [n.op_type for n in result.model.graph.node]
    assert "Clip" not in ops and ops.count("Min") == 2
    _assert_same(model, result.model, {"X": x})
    bounds = [i for i in result.model.graph.initializer if "min_bound" in i.name]
    assert bounds and all(np.ptp(onnx.numpy_helper.to_array(b)) > 0 for b in bounds)


def test_clip_split_clips_where_the_original_clips():
    """Large inputs saturate many units at 6: the rescaled per-channel bounds must saturate alike."""
    model = pw_dw_pw("Clip")
    x = (50 * graphs.rng(5).standard_normal((2, 4, 6, 6))).astype(np.float32)
    c1 = _intermediate(model, "c1", {"X": x})
    assert (c1 > 6).mean() > 0.2 and (c1 < 0).mean() > 0.2  # both bounds are exercised
    result = run_passes(model, [EqualizeCrossLayer(clip="split")])
    _assert_same(model, result.model, {"X": x})


def test_clip_relu_mode_equals_the_relu_network_exactly():
    """clip='relu' is lossy on purpose: it must equal the same network built with Relu, exactly."""
    model = pw_dw_pw("Clip")
    relu_net = pw_dw_pw("Relu")
    x = (3 * graphs.rng(10).standard_normal((3, 4, 6, 6))).astype(np.float32)
    result = run_passes(model, [EqualizeCrossLayer(clip="relu")])
    assert result.stats["equalize_cross_layer.clips_to_relu"] == 2
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Relu") == 2 and "Clip" not in ops and "Min" not in ops
    _assert_same(relu_net, result.model, {"X": x})
    assert not np.allclose(graphs.run(model, {"X": x})[0], graphs.run(relu_net, {"X": x})[0])  # it is lossy here


def test_declines_when_activation_has_two_consumers():
    """pw1 -> Relu -> a1 -> {dw, graph output}: rescaling would change the graph output a1."""
    model = pw_dw_pw("Relu")
    model.graph.output.append(helper.make_tensor_value_info("a1", onnx.TensorProto.FLOAT, None))
    result = run_passes(model, [EqualizeCrossLayer()])
    assert result.stats["equalize_cross_layer.pairs"] == 1  # only dw -> pw2 remains
    assert any("pw1" in n and "consumers" in n for n in result.notes)
    x = graphs.rng(6).standard_normal((2, 4, 6, 6)).astype(np.float32)
    for ya, yb in zip(graphs.run(model, {"X": x}), graphs.run(result.model, {"X": x}), strict=True):
        np.testing.assert_allclose(yb, ya, atol=1e-4 * float(np.max(np.abs(ya))), rtol=0)


def test_grouped_conv_in_the_middle_is_exact():
    """X -> Conv(4->8) -> Relu -> Conv(8->8, group=2) -> Relu -> Conv(8->3) -> Y."""
    r = graphs.rng(7)
    inits = {
        "W1": _skewed(r, (8, 4, 3, 3), 0),
        "W2": _skewed(r, (8, 4, 3, 3), 0),
        "W3": _skewed(r, (3, 8, 1, 1), 1),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "W2"], ["c2"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("Conv", ["a2", "W3"], ["Y"]),
    ]
    model = graphs.make_model(nodes, [("X", ["N", 4, 5, 5])], [("Y", ["N", 3, 5, 5])], inits)
    result = run_passes(model, [EqualizeCrossLayer()])
    assert result.stats["equalize_cross_layer.pairs"] == 2
    _assert_same(model, result.model, {"X": r.standard_normal((2, 4, 5, 5)).astype(np.float32)})


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="clip"):
        EqualizeCrossLayer(clip="rescale")
    with pytest.raises(ValueError, match="strength"):
        EqualizeCrossLayer(strength=1.5)


def test_partial_strength_is_exact_and_applies_the_converged_scales_to_a_power():
    """strength=b: every pair ends at S^b of the full equalization's S (0: unchanged, 0.5: log-halfway)."""
    model = pw_dw_pw("Relu")
    x = graphs.rng(1).standard_normal((3, 4, 6, 6)).astype(np.float32)
    full, half, none = (run_passes(model, [EqualizeCrossLayer(strength=b)]).model for b in (1.0, 0.5, 0.0))
    _assert_same(model, half, {"X": x})
    w0, wf, wh, wn = ({i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
                      for m in (model, full, half, none))
    for name in w0:
        np.testing.assert_allclose(wn[name], w0[name], rtol=1e-6)
    # pw1's output channel c was multiplied by 1/S_c (full) and 1/S_c^0.5 (half): the log ratios halve
    r0 = np.abs(w0["W1"]).max(axis=(1, 2, 3))
    ratio_full = np.log(np.abs(wf["W1"]).max(axis=(1, 2, 3)) / r0)
    ratio_half = np.log(np.abs(wh["W1"]).max(axis=(1, 2, 3)) / r0)
    np.testing.assert_allclose(ratio_half, ratio_full / 2, atol=1e-5)
    assert np.max(np.abs(ratio_full)) > 0.5  # the full scales are far from 1: the check has teeth


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "concat"])
@pytest.mark.parametrize("clip", ["skip", "split"])
def test_reference_cnns_stay_exact(name, clip):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built yet")
    model = run_passes(normalize_model(load_model(path)), cleanup_passes()).model
    result = run_passes(model, [EqualizeCrossLayer(clip=clip)])
    if name == "mobilenet" and clip == "split":
        assert result.stats["equalize_cross_layer.pairs"] >= 12  # every pw/dw pair of the six blocks
    x = np.load(MODELS / "digits32_test.npz")["input"][:16] if (MODELS / "digits32_test.npz").exists() else (
        graphs.rng(8).standard_normal((16, 1, 32, 32)).astype(np.float32)
    )
    _assert_same(model, result.model, {"input": x})


def test_public_equalize_writes_an_exact_model(tmp_path):
    import onnxpress.advanced as adv

    model = pw_dw_pw("Clip")
    out = tmp_path / "cle.onnx"
    result = adv.equalize(model, out, clip="split")
    assert result.stats["equalize_cross_layer.pairs"] == 2
    x = graphs.rng(9).standard_normal((2, 4, 6, 6)).astype(np.float32)
    _assert_same(model, onnx.load(str(out)), {"X": x})


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - out) ** 2)))


def test_quantize_flags_equalize_and_bias_correction_help_per_tensor_int8(tmp_path):
    """onnxpress.quantize(..., equalize=, bias_correction=) on the skewed pw->dw->pw chain, per-tensor weights."""
    import onnxpress
    from onnxpress.cli import main

    model = pw_dw_pw("Relu", c=16)
    r = graphs.rng(11)
    feeds = [{"X": r.standard_normal((16, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    x = r.standard_normal((32, 4, 6, 6)).astype(np.float32)
    ref = graphs.run(model, {"X": x})[0]
    common = {"calib": feeds, "per_channel": False, "method": "minmax"}
    plain = onnxpress.quantize(model, bias_correction=False, **common).model
    both = onnxpress.quantize(model, equalize="split", bias_correction=True, **common).model
    assert _sqnr(ref, graphs.run(both, {"X": x})[0]) > _sqnr(ref, graphs.run(plain, {"X": x})[0]) + 6.0
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    np.savez(tmp_path / "calib.npz", X=np.concatenate([f["X"] for f in feeds]))
    argv = ["quantize", str(src), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--per-tensor", "-q"]
    assert main([*argv, "--equalize", "--bias-correction", "--method", "minmax"]) == 0 and out.exists()
    assert main([*argv[:4], "--bias-correction"]) == 2  # no --calib: one-line error, exit 2


def test_split_mobilenet_quantizes_each_relu6_once_and_keeps_every_qlinearconv(tmp_path):
    """Mobilenet after CLE(split), quantized per tensor: each Relu -> Min(c) pair is rounded on the Min's grid
    (the Relu's Q has the Min output's scale and zero point), every quantized Conv is a QLinearConv in
    onnxruntime's optimised graph, and the stem and first depthwise stay float as without CLE."""
    import onnxpress
    from onnxpress.runtime import make_session

    path, calib = MODELS / "mobilenet.onnx", MODELS / "digits32_calib.npz"
    if not (path.exists() and calib.exists()):
        pytest.skip("reference mobilenet or its calibration data not built yet")
    model = run_passes(normalize_model(load_model(path)), cleanup_passes()).model
    split = run_passes(model, [EqualizeCrossLayer(clip="split")]).model
    res = onnxpress.quantize(split, calib=str(calib), per_channel=False, max_samples=64, bias_correction=False)
    q = res.model
    quantized_convs = [d for d in res.quantized if d.op == "Conv"]
    assert len([d for d in res.kept_float if d.op == "Conv"]) == 2  # stem + first depthwise
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    q_of = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    producer = {o: n for n in q.graph.node for o in n.output}
    pairs = 0
    for n in q.graph.node:
        if n.op_type != "Min":
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or n.output[0] not in q_of:
            continue
        q_relu = producer[dq.input[0]]
        q_min = q_of[n.output[0]]
        assert consts[q_relu.input[1]] == consts[q_min.input[1]]
        assert consts[q_relu.input[2]] == consts[q_min.input[2]]
        pairs += 1
    assert pairs == len(quantized_convs) - 1  # every quantized conv but the last (no Min after it)
    assert res.stats["insert_qdq.bound_grids_shared"] == pairs
    opt = tmp_path / "opt.onnx"
    make_session(q, optimized_model_path=str(opt))
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ops.count("QLinearConv") == len(quantized_convs)
