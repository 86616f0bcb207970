"""EqualizeActivations: exact through Relu, exact for the quantized model through ReLU6, and worth it on data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxpress
from onnxpress.errors import CalibrationError, OnnxpressError
from onnxpress.passes.equalize import EqualizeCrossLayer
from onnxpress.passes.equalize_activations import EqualizeActivations, activation_pairs
from onnxpress.pipeline import run_passes
from tests import graphs
from tests.test_equalize import _assert_same, _intermediate, pw_dw_pw

MODELS = Path(__file__).resolve().parent.parent / "models"


def _absmax(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel max |x| (axis 1) of every pair's activation, as calibration would measure it."""
    pairs, _ = activation_pairs(gs.import_onnx(model))
    out = {}
    for p in pairs:
        name = p.second.inputs[0].name
        v = _intermediate(model, name, feeds)
        out[name] = np.abs(np.moveaxis(v, 1, 0).reshape(v.shape[1], -1)).max(axis=1)
    return out


def _channel_max(v: np.ndarray) -> np.ndarray:
    return np.moveaxis(v, 1, 0).reshape(v.shape[1], -1).max(axis=1)


def test_relu_chain_is_exact_and_stretches_channels_to_one_range():
    model = pw_dw_pw("Relu")
    before = model.SerializeToString()
    x = graphs.rng(1).standard_normal((3, 4, 6, 6)).astype(np.float32)
    absmax = _absmax(model, {"X": x})
    result = run_passes(model, [EqualizeActivations(absmax)])
    assert model.SerializeToString() == before  # input untouched
    assert result.stats["equalize_activations.pairs"] == 2
    _assert_same(model, result.model, {"X": x})
    # pw1 -> dw: the depthwise conv reads one channel per output, so alpha is 1: every channel ends at the max
    a1 = _channel_max(_intermediate(result.model, "a1", {"X": x}))
    dead = _channel_max(_intermediate(model, "a1", {"X": x})) == 0  # a channel that is always 0 stays as it is
    assert dead.sum() == 1 and np.all(a1[dead] == 0)
    np.testing.assert_allclose(a1[~dead], a1.max(), rtol=1e-4)
    # dw -> pw2 mixes channels: alpha 0.5 halves the log-spread of the channel maxima
    a2_before, a2_after = (_channel_max(_intermediate(m, "a2", {"X": x})) for m in (model, result.model))
    live = a2_before > 0
    np.testing.assert_allclose(np.ptp(np.log(a2_after[live])), 0.5 * np.ptp(np.log(a2_before[live])), rtol=1e-3)
    assert np.isclose(a2_after.max(), a2_before.max(), rtol=1e-5)  # the largest channel keeps its range


def test_relu6_is_exact_on_the_calibration_data_and_for_the_quantized_model_beyond_it():
    """Clip(0, 6) keeps its bound: on the data it was measured on the outputs are unchanged; beyond it, the
    activation is the exactly equalized one clipped at 6, which the int8 grid (range within [0, 6]) clips anyway."""
    model = pw_dw_pw("Clip")
    x = (0.5 * graphs.rng(4).standard_normal((4, 4, 6, 6))).astype(np.float32)  # channel maxima 1.75 ... 6
    absmax = _absmax(model, {"X": x})
    assert max(float(v.max()) for v in absmax.values()) == pytest.approx(6.0)  # some units saturate at 6
    eq = EqualizeActivations(absmax)
    result = run_passes(model, [eq])
    assert result.stats["equalize_activations.pairs"] == 2
    assert [n.op_type for n in result.model.graph.node].count("Clip") == 2  # no Min/Max nodes added
    _assert_same(model, result.model, {"X": x})

    big = (30 * graphs.rng(5).standard_normal((2, 4, 6, 6))).astype(np.float32)  # far beyond the calibration data
    pairs, _ = activation_pairs(gs.import_onnx(model))
    s = eq.scales(pairs[0])
    assert s is not None and np.all(s <= 1.0) and s.max() == 1.0
    c1 = _intermediate(model, "c1", {"X": big})  # pw1's output before the clip
    exact = np.minimum(np.maximum(c1 / s.reshape(1, -1, 1, 1), 0.0), 6.0 / s.reshape(1, -1, 1, 1))
    ours = _intermediate(result.model, "a1", {"X": big})
    np.testing.assert_allclose(ours, np.minimum(exact, 6.0), rtol=1e-5, atol=1e-5)
    assert np.any(exact > 6.0)  # the case where the float models differ is exercised


@settings(max_examples=25, deadline=None)
@given(
    g1=st.sampled_from([1, 2, 4]),
    g2=st.sampled_from([1, 2, 4, 8]),
    k=st.sampled_from([1, 3]),
    act=st.sampled_from(["Relu", "LeakyRelu"]),
    seed=st.integers(0, 2**16),
)
def test_grouped_conv_pairs_are_exact(g1, g2, k, act, seed):
    """Conv(groups g1) -> act -> Conv(groups g2, k x k): exact in float for every grouping (8 channels)."""
    r = graphs.rng(seed)
    c = 8
    inits = {
        "W1": (r.standard_normal((c, 4 // g1 if g1 <= 4 else 1, 1, 1))
               * np.exp(r.uniform(-2, 2, c)).reshape(-1, 1, 1, 1)).astype(np.float32),
        "B1": r.standard_normal(c).astype(np.float32),
        "W2": r.standard_normal((6 if g2 == 1 else 8, c // g2, k, k)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], name="first", group=g1),
        helper.make_node(act, ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "W2"], ["Y"], name="second", group=g2, pads=[k // 2] * 4),
    ]
    out_c = inits["W2"].shape[0]
    model = graphs.make_model(nodes, [("X", ["N", 4, 5, 5])], [("Y", ["N", out_c, 5, 5])], inits)
    x = r.standard_normal((2, 4, 5, 5)).astype(np.float32)
    result = run_passes(model, [EqualizeActivations(_absmax(model, {"X": x}))])
    assert result.stats["equalize_activations.pairs"] == 1
    _assert_same(model, result.model, {"X": x})


def test_declines_with_a_reason():
    model = pw_dw_pw("Clip")
    g = gs.import_onnx(model)
    for node in g.nodes:
        if node.op == "Clip":
            node.inputs[1] = gs.Constant(f"{node.name}_lo", np.array(-1.0, np.float32))
    shifted = gs.export_onnx(g)
    result = run_passes(shifted, [EqualizeActivations({})])
    assert not result.modified and result.stats["equalize_activations.pairs"] == 0
    assert any("has lower bound -1, not a Clip(0, hi)" in n for n in result.notes)
    relu = pw_dw_pw("Relu")
    result = run_passes(relu, [EqualizeActivations({})])  # no statistics
    assert not result.modified
    assert sum("no calibration statistics" in n for n in result.notes) == 2


def test_quantize_gains_on_the_depthwise_cnn():
    """MobileNet's ReLU6 channels span 0.75-6: stretched, the uint8 grid serves each; >= +1 dB on held-out digits
    (measured 38.08 -> 39.47 dB), with the same kernels and within 1% of the file size."""
    test = np.load(MODELS / "digits32_test.npz")["input"]
    ref = graphs.run(onnx.load(MODELS / "mobilenet.onnx"), {"input": test})[0]

    def sqnr(model: onnx.ModelProto) -> float:
        y = graphs.run(model, {"input": test})[0].astype(np.float64)
        return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((y - ref) ** 2)))

    calib = str(MODELS / "digits32_calib.npz")
    plain = onnxpress.quantize(str(MODELS / "mobilenet.onnx"), calib=calib)
    stretched = onnxpress.quantize(str(MODELS / "mobilenet.onnx"), calib=calib, equalize="activations")
    assert stretched.stats["equalize_activations.pairs"] == 11  # the float stem -> first depthwise pair is left be
    assert any("node_Conv_220 -> Clip -> node_Conv_222: not equalized (its activation gets no calibrated int8 range"
               in n for n in stretched.notes)
    assert sqnr(stretched.model) >= sqnr(plain.model) + 1.0
    # the same kernels (Cast nodes only widen int16-stored biases: a stretched channel's bias may need int32)
    ops = [sorted(n.op_type for n in m.graph.node if n.op_type != "Cast") for m in (plain.model, stretched.model)]
    assert ops[0] == ops[1]
    sizes = [len(m.SerializeToString()) for m in (plain.model, stretched.model)]
    assert abs(sizes[1] / sizes[0] - 1) < 0.01


def test_quantize_refuses_what_it_cannot_do():
    src = str(MODELS / "mobilenet.onnx")
    calib = str(MODELS / "digits32_calib.npz")
    with pytest.raises(OnnxpressError, match="per-channel weight scales"):
        onnxpress.quantize(src, calib=calib, equalize="activations", per_channel=False)
    with pytest.raises(OnnxpressError, match="weight-only"):
        onnxpress.quantize(src, calib=calib, equalize="activations", codebook=4)
    with pytest.raises(CalibrationError, match="ranges on calibration data: pass calib"):
        onnxpress.quantize(src, equalize="activations")


def test_cli_says_how_many_pairs_it_equalized(tmp_path, capsys, caplog):
    from onnxpress.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(pw_dw_pw("Clip", c=16), str(src))
    np.savez(tmp_path / "calib.npz", X=(0.5 * graphs.rng(3).standard_normal((32, 4, 6, 6))).astype(np.float32))
    argv = ["quantize", str(src), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--equalize", "activations"]
    assert main(argv) == 0 and out.exists()
    # pw1 and the depthwise conv are shallow convs at the input (kept float): only dw -> pw2's activation is int8
    assert "activation-range equalization: 1 layer pair(s) equalized" in capsys.readouterr().out
    caplog.clear()
    assert main([*argv, "-v"]) == 0  # -v lists the pass's notes; the few-samples warning goes to the log, once
    assert "measured on 32 calibration sample(s)" not in capsys.readouterr().out
    assert caplog.text.count("measured on 32 calibration sample(s)") == 1
    onnx.save(graphs.gemm(), str(src))  # one layer: no pair
    np.savez(tmp_path / "calib.npz", X=graphs.rng(3).standard_normal((8, 8)).astype(np.float32))
    assert main(argv) == 0
    assert "0 layer pair(s) equalized; the model has no two Conv (or Gemm) layers" in capsys.readouterr().out
    assert main([*argv, "--per-tensor"]) == 2
    assert "per-channel weight scales" in capsys.readouterr().err


def test_optimize_keeps_the_equalized_variant_only_when_it_measures_better_on_enough_data():
    """The chosen int8 candidate rebuilt with equalize="activations": same kernels, recipe says so, kept iff closer
    on held-out data; not tried when the candidates are compared on fewer calibration samples than
    EQUALIZE_MIN_SAMPLES (there it would measure closer whatever it clips elsewhere)."""
    from onnxpress.optimize import EQUALIZE_MIN_SAMPLES, _Evaluator, _with_equalized_activations, same_kernels
    from onnxpress.recipe import apply_recipe, prepare
    from onnxpress.search import Candidate

    m0 = prepare(onnx.load(MODELS / "mobilenet.onnx"))
    calib = str(MODELS / "digits32_calib.npz")
    held_out = [{"input": np.load(MODELS / "digits32_test.npz")["input"][:128]}]
    ev = _Evaluator(m0, m0.ByteSize(), calib, held_out, None, False)
    recipe = {"version": 1, "steps": [{"pass": "quantize", "method": "mse", "max_samples": 256}]}
    chosen = Candidate(picks=(0,), est_cost=0.0, est_sqnr=0.0, recipe=recipe, feasible=True, note="uniform int8")
    built = apply_recipe(m0, recipe, calib, prepared=True)
    ev.measure_fidelity(chosen, built)
    got, model = _with_equalized_activations(chosen, built, ev, held_out=True, calib_samples=500)
    assert got.recipe["steps"][0]["equalize"] == "activations" and got.note.endswith("+ equalized activations")
    assert got.sqnr_db > chosen.sqnr_db + 0.5
    assert same_kernels(model, built)
    assert apply_recipe(m0, got.recipe, calib, prepared=True).SerializeToString() == model.SerializeToString()
    worse = Candidate(picks=(0,), est_cost=0.0, est_sqnr=0.0, recipe=recipe, feasible=True, sqnr_db=1e9)
    assert _with_equalized_activations(worse, built, ev, held_out=True, calib_samples=500)[0] is worse
    assert ev.declined[-1].note.endswith("+ equalized activations (not kept: measured no closer)")  # listed
    few = _with_equalized_activations(chosen, built, ev, held_out=False, calib_samples=EQUALIZE_MIN_SAMPLES - 1)
    assert few[0] is chosen and few[1] is built


def _gemm_chain() -> onnx.ModelProto:
    """X[N,24] -> Gemm(g1) -> Clip(0,6) -> Gemm(g2) -> Relu -> Gemm(g3) -> Y[N,10]; g1's channels span 2 decades."""
    r = graphs.rng(7)
    spread = 10 ** np.linspace(-1.5, 0.5, 32)
    inits = {"W1": (r.standard_normal((32, 24)) / 5 * spread[:, None]).astype(np.float32),
             "B1": (0.1 * r.standard_normal(32)).astype(np.float32), "lo": np.float32(0.0), "hi": np.float32(6.0),
             "W2": (r.standard_normal((32, 32)) / 6).astype(np.float32), "B2": np.zeros(32, np.float32),
             "W3": (r.standard_normal((10, 32)) / 6).astype(np.float32), "B3": np.zeros(10, np.float32)}
    nodes = [helper.make_node("Gemm", ["X", "W1", "B1"], ["g1"], name="g1", transB=1),
             helper.make_node("Clip", ["g1", "lo", "hi"], ["a1"], name="clip"),
             helper.make_node("Gemm", ["a1", "W2", "B2"], ["g2"], name="g2", transB=1),
             helper.make_node("Relu", ["g2"], ["a2"], name="relu"),
             helper.make_node("Gemm", ["a2", "W3", "B3"], ["Y"], name="g3", transB=1)]
    return graphs.make_model(nodes, [("X", ["N", 24])], [("Y", ["N", 10])], inits)


def test_a_layer_pair_next_to_an_int4_layer_is_left_be():
    """g2 as a 4-bit MatMulNBits layer reads a1 in float: no int8 grid clips a1, so g1 -> Clip -> g2 is declined
    (only g2 -> Relu -> g3 is stretched), and without calib the refusal comes first, before the no-data default
    would choose dynamic activations for this Conv-free model."""
    model = _gemm_chain()
    calib = [{"X": graphs.rng(8).standard_normal((256, 24)).astype(np.float32)}]
    res = onnxpress.quantize(model, calib=calib, int4_layers=["g2"], equalize="activations")
    # g2 -> Relu -> g3 is still stretched: g3 (int8) quantizes a2, and g2's 4-bit blocks lie within one output
    # channel each, so scaling its output channels is free there too
    assert res.stats["equalize_activations.pairs"] == 1
    assert any("g1 -> Clip -> g2: not equalized (its activation gets no calibrated int8 range" in n for n in res.notes)
    with pytest.raises(CalibrationError, match=r"stretches each activation's channels by their ranges on calibration"):
        onnxpress.quantize(model, equalize="activations")


def test_a_min_bound_that_broadcasts_over_width_is_scaled_exactly():
    """Relu -> Min(x, bound[W]) between two convs: the bound becomes [C, 1, W] (it was refused with a numpy error)."""
    c, w = 8, 6
    r = graphs.rng(9)

    def chain(bound: np.ndarray) -> onnx.ModelProto:
        inits = {"W1": r.standard_normal((c, 3, 3, 3)).astype(np.float32), "W2": r.standard_normal((4, c, 3, 3))
                 .astype(np.float32), "bound": bound.astype(np.float32)}
        nodes = [helper.make_node("Conv", ["X", "W1"], ["c1"], name="conv1", pads=[1] * 4),
                 helper.make_node("Relu", ["c1"], ["r1"]),
                 helper.make_node("Min", ["r1", "bound"], ["a1"], name="min"),
                 helper.make_node("Conv", ["a1", "W2"], ["Y"], name="conv2", pads=[1] * 4)]
        return graphs.make_model(nodes, [("X", ["N", 3, 5, w])], [("Y", ["N", 4, 5, w])], inits)

    x = r.standard_normal((4, 3, 5, w)).astype(np.float32)
    model = chain(np.linspace(1.0, 2.0, w))  # [W]: one bound per column
    result = run_passes(model, [EqualizeActivations(_absmax(model, {"X": x}))])
    assert result.stats["equalize_activations.pairs"] == 1
    _assert_same(model, result.model, {"X": x})
    for eq in (EqualizeCrossLayer(clip="split"), EqualizeActivations(_absmax(model, {"X": x}))):  # shared code
        _assert_same(model, run_passes(model, [eq]).model, {"X": x})


def test_few_calibration_samples_warn_and_per_tensor_overrides_are_refused(caplog):
    src, calib = str(MODELS / "mobilenet.onnx"), str(MODELS / "digits32_calib.npz")
    with caplog.at_level("WARNING"):
        res = onnxpress.quantize(src, calib=calib, equalize="activations", max_samples=16)
    # its own prefix: the CLI prints the pass's "equalize_activations: " notes and leaves warnings to the log
    assert any(n.startswith("equalize_activations warning: measured on 16 calibration sample(s): with fewer than 128")
               for n in res.notes)
    assert "give more samples" in caplog.text
    weight = next(i.name for i in onnx.load(src).graph.initializer if i.name.endswith("weight"))
    with pytest.raises(OnnxpressError, match=r"overrides make .* per tensor"):
        onnxpress.quantize(src, calib=calib, equalize="activations", overrides={weight: {"per_channel": False}})


def test_the_report_says_its_histograms_are_not_in_the_equalized_models_units(tmp_path):
    """optimize --recipe with an equalizing quantize step: report.json marks each histogram row rescaled (the PNG's
    title says so too), since the written model's ranges are those of the stretched tensors."""
    import json

    from onnxpress.cli import main

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "steps": [{"pass": "quantize", "equalize": "activations",
                                                           "max_samples": 128}]}))
    data = str(MODELS / "digits32_calib.npz")
    assert main(["optimize", str(MODELS / "mobilenet.onnx"), "-o", str(tmp_path / "m.onnx"), "--calib", data,
                 "--recipe", str(recipe), "--report", str(tmp_path / "rep"), "-q"]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["histograms"]
    assert rows and all(r["rescaled_in_written_model"] for r in rows)
