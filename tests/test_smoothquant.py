"""SmoothQuant: float outputs preserved within 1e-4 on onnxruntime; outliers really moved into W."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxpress.passes.smoothquant import SmoothQuant, smoothquant_targets
from onnxpress.pipeline import run_passes
from tests import graphs

MODELS = Path(__file__).resolve().parent.parent / "models"
K = 16


def ln_qkv(shared_gamma: bool = False) -> onnx.ModelProto:
    """X[N,T,16] -> LayerNorm(g, b) -> h -> {MatMul(Wq), MatMul(Wk), Gemm-free MatMul(Wv)+Add} -> Q,K,V.

    With ``shared_gamma`` a second LayerNorm on X uses the same gamma/beta and is a graph output.
    """
    r = graphs.rng(0)
    gamma = np.ones(K, np.float32)
    gamma[[2, 9]] = 40.0  # two outlier channels, as LayerNorm gammas in LLMs produce
    inits = {
        "g": gamma,
        "b": r.standard_normal(K).astype(np.float32),
        "Wq": r.standard_normal((K, 8)).astype(np.float32),
        "Wk": r.standard_normal((K, 8)).astype(np.float32),
        "Wv": r.standard_normal((K, 8)).astype(np.float32),
        "bv": r.standard_normal(8).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["X", "g", "b"], ["h"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "Wq"], ["Q"]),
        helper.make_node("MatMul", ["h", "Wk"], ["K"]),
        helper.make_node("MatMul", ["h", "Wv"], ["v0"]),
        helper.make_node("Add", ["v0", "bv"], ["V"]),
    ]
    outputs = [("Q", ["N", 5, 8]), ("K", ["N", 5, 8]), ("V", ["N", 5, 8])]
    if shared_gamma:
        nodes.append(helper.make_node("LayerNormalization", ["X", "g", "b"], ["H2"], axis=-1, epsilon=1e-5))
        outputs.append(("H2", ["N", 5, K]))
    return graphs.make_model(nodes, [("X", ["N", 5, K])], outputs, inits)


def mlp_chain(producer_gemm: bool) -> onnx.ModelProto:
    """X[N,6] -> (Gemm(W1,b1) | MatMul(W1)+Add(b1)) -> h[N,16] -> Gemm(W2, transB=1) -> Y[N,4]."""
    r = graphs.rng(1)
    w1 = r.standard_normal((6, K)).astype(np.float32)
    w1[:, 3] *= 30.0  # outlier output column -> outlier channel of h
    inits = {
        "W1": w1,
        "b1": r.standard_normal(K).astype(np.float32),
        "W2": r.standard_normal((4, K)).astype(np.float32),
    }
    if producer_gemm:
        nodes = [helper.make_node("Gemm", ["X", "W1", "b1"], ["h"])]
    else:
        nodes = [helper.make_node("MatMul", ["X", "W1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h"])]
    nodes.append(helper.make_node("Gemm", ["h", "W2"], ["Y"], transB=1))
    return graphs.make_model(nodes, [("X", ["N", 6])], [("Y", ["N", 4])], inits)


def _absmax(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Per-channel (last axis) max |value| of an intermediate tensor, measured on onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    v = graphs.run(probe, feeds)[-1]
    return np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)


def _assert_outputs_equal(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for ya, yb in zip(graphs.run(a, feeds), graphs.run(b, feeds), strict=True):
        np.testing.assert_allclose(yb, ya, atol=1e-4 * float(np.max(np.abs(ya))), rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_layernorm_qkv_is_exact_and_flattens_outliers(alpha):
    model = ln_qkv()
    before = model.SerializeToString()
    feeds = {"X": graphs.rng(2).standard_normal((3, 5, K)).astype(np.float32)}
    x_max = _absmax(model, "h", feeds)
    result = run_passes(model, [SmoothQuant({"h": x_max}, alpha=alpha)])
    assert model.SerializeToString() == before
    assert result.stats["smoothquant.smoothed"] == 1
    _assert_outputs_equal(model, result.model, feeds)
    # the smoothed activation is X / s with s_j = x_j^a / w_j^(1-a), w_j over Wq, Wk, Wv rows
    w_max = np.max([np.abs(onnx.numpy_helper.to_array(i)).max(axis=1)
                    for i in model.graph.initializer if i.name in ("Wq", "Wk", "Wv")], axis=0)
    s = x_max**alpha / w_max ** (1 - alpha)
    np.testing.assert_allclose(_absmax(result.model, "h", feeds), x_max / s, rtol=1e-4)
    if alpha >= 0.5:  # outlier channels shrink relative to the others
        after = x_max / s
        assert after.max() / np.median(after) < 0.5 * x_max.max() / np.median(x_max)


def test_shared_gamma_is_copied_not_changed_for_the_other_layernorm():
    model = ln_qkv(shared_gamma=True)
    feeds = {"X": graphs.rng(3).standard_normal((2, 5, K)).astype(np.float32)}
    result = run_passes(model, [SmoothQuant({"h": _absmax(model, "h", feeds)})])
    assert result.stats["smoothquant.smoothed"] == 1
    _assert_outputs_equal(model, result.model, feeds)  # H2 (the other LN) included


@pytest.mark.parametrize("producer_gemm", [True, False])
def test_gemm_and_matmul_add_producers_are_exact(producer_gemm):
    model = mlp_chain(producer_gemm)
    feeds = {"X": graphs.rng(4).standard_normal((9, 6)).astype(np.float32)}
    x_max = _absmax(model, "h", feeds)
    assert smoothquant_targets(gs.import_onnx(model)) == ["h"]
    result = run_passes(model, [SmoothQuant({"h": x_max}, alpha=0.5)])
    assert result.stats["smoothquant.smoothed"] == 1
    _assert_outputs_equal(model, result.model, feeds)
    after = _absmax(result.model, "h", feeds)
    assert after.max() / after.min() < x_max.max() / x_max.min()


def test_declines_gelu_producer_and_missing_statistics():
    """X -> Gelu -> g -> MatMul(W) -> Y: Gelu cannot absorb 1/s, so nothing changes."""
    r = graphs.rng(5)
    model = graphs.make_model(
        [helper.make_node("Gelu", ["X"], ["g"]), helper.make_node("MatMul", ["g", "W"], ["Y"])],
        [("X", ["N", K])], [("Y", ["N", 3])], {"W": r.standard_normal((K, 3)).astype(np.float32)}, opset=20,
    )
    result = run_passes(model, [SmoothQuant({"g": np.ones(K)})])
    assert not result.modified
    assert any("Gelu" in n for n in result.notes)
    result = run_passes(ln_qkv(), [SmoothQuant({})])
    assert result.stats["smoothquant.smoothed"] == 0
    assert any("no statistics" in n for n in result.notes)


def test_bad_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant({}, alpha=1.5)


def test_reference_transformer_stays_exact():
    path = MODELS / "transformer.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built yet")
    from onnxpress.model_io import load_model, normalize_model
    from onnxpress.pipeline import cleanup_passes

    model = run_passes(normalize_model(load_model(path)), cleanup_passes()).model
    names = smoothquant_targets(gs.import_onnx(model))
    assert len(names) == 4  # ln1 -> QKV and ln2 -> FFN in each of the two layers
    x = np.load(MODELS / "digits32_calib.npz")["input"][:8]
    stats = {n: _absmax(model, n, {"input": x}) for n in names}
    result = run_passes(model, [SmoothQuant(stats, alpha=0.5)])
    assert result.stats["smoothquant.smoothed"] == 4
    _assert_outputs_equal(model, result.model, {"input": x})


def test_public_smoothquant_streams_statistics_and_saves(tmp_path):
    import onnxpress.advanced as adv
    from onnxpress.errors import DataError

    model = ln_qkv()
    r = graphs.rng(7)
    feeds = [{"X": r.standard_normal((4, 5, K)).astype(np.float32)} for _ in range(3)]
    out = tmp_path / "smooth.onnx"
    result = adv.smoothquant(model, feeds, out, alpha=0.5, batch_size=5)
    assert out.exists() and result.stats["smoothquant.smoothed"] == 1
    x_all = np.concatenate([f["X"] for f in feeds])
    s_expected = SmoothQuant({}, alpha=0.5).scales(
        _absmax(model, "h", {"X": x_all}),
        np.max([np.abs(onnx.numpy_helper.to_array(i)).max(axis=1)
                for i in model.graph.initializer if i.name in ("Wq", "Wk", "Wv")], axis=0),
    )
    np.testing.assert_allclose(_absmax(result.model, "h", {"X": x_all}), _absmax(model, "h", {"X": x_all}) / s_expected,
                               rtol=1e-4)
    _assert_outputs_equal(model, onnx.load(str(out)), {"X": x_all})
    with pytest.raises(DataError):
        adv.smoothquant(model, [{"wrong": x_all}])


def test_quantize_smoothquant_flag():
    import onnxpress
    from onnxpress.errors import CalibrationError, OnnxpressError

    model = ln_qkv()
    r = graphs.rng(8)
    feeds = [{"X": r.standard_normal((8, 5, K)).astype(np.float32)} for _ in range(2)]
    x = r.standard_normal((16, 5, K)).astype(np.float32)
    result = onnxpress.quantize(model, calib=feeds, smoothquant=0.5, method="minmax")
    assert result.quantized
    for ya, yb in zip(graphs.run(model, {"X": x}), graphs.run(result.model, {"X": x}), strict=True):
        assert np.sum((ya - yb) ** 2) < 1e-2 * np.sum(ya**2)  # int8: within 20 dB of float
    with pytest.raises(CalibrationError, match=r"pass calib= / --calib instead of a table"):
        onnxpress.quantize(model, smoothquant=0.5, table=onnxpress.calibrate(model, feeds, method="minmax"))
    with pytest.raises(OnnxpressError, match="alpha"):
        onnxpress.quantize(model, calib=feeds, smoothquant=2.0)


@pytest.mark.parametrize("scalar_gamma", [False, True])
def test_layernorm_written_out_is_smoothed_through_its_gamma_and_beta(scalar_gamma):
    """Opset < 17 exports: ... / sqrt(var + eps) * gamma + beta, the output also read by a Shape (a reshape)."""
    r = graphs.rng(5)
    gamma = np.float32(1.5) if scalar_gamma else np.where(np.arange(K) == 4, 30.0, 1.0).astype(np.float32)
    inits = {"two": np.float32(2), "eps": np.float32(1e-5), "g": gamma, "b": r.standard_normal(K).astype(np.float32),
             "Wq": r.standard_normal((K, 8)).astype(np.float32), "Wk": r.standard_normal((K, 8)).astype(np.float32)}
    nodes = [
        helper.make_node("ReduceMean", ["X"], ["mu"], axes=[-1]), helper.make_node("Sub", ["X", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["p"]), helper.make_node("ReduceMean", ["p"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "g"], ["gn"]),
        helper.make_node("Add", ["gn", "b"], ["h"]), helper.make_node("Shape", ["h"], ["S"]),
        helper.make_node("MatMul", ["h", "Wq"], ["Q"]), helper.make_node("MatMul", ["h", "Wk"], ["Kt"]),
    ]  # fmt: skip
    model = graphs.make_model(nodes, [("X", ["N", 5, K])], [("Q", ["N", 5, 8]), ("Kt", ["N", 5, 8])], inits, opset=13)
    model.graph.output.append(helper.make_tensor_value_info("S", onnx.TensorProto.INT64, [3]))
    feeds = {"X": graphs.rng(6).standard_normal((3, 5, K)).astype(np.float32)}
    assert smoothquant_targets(gs.import_onnx(model)) == ["h"]
    x_max = _absmax(model, "h", feeds)
    result = run_passes(model, [SmoothQuant({"h": x_max}, alpha=0.5)])
    assert result.stats["smoothquant.smoothed"] == 1
    _assert_outputs_equal(model, result.model, feeds)
    after = _absmax(result.model, "h", feeds)
    assert after.max() / np.median(after) < x_max.max() / np.median(x_max) or scalar_gamma


def test_cli_says_how_many_activations_were_smoothed_and_why_none(tmp_path, capsys):
    from onnxpress.cli import main

    r = graphs.rng(9)
    np.savez(tmp_path / "d.npz", X=r.standard_normal((16, 5, K)).astype(np.float32))
    onnx.save(ln_qkv(), tmp_path / "ln.onnx")
    args = ["--calib", str(tmp_path / "d.npz"), "--smoothquant", "0.5", "-q"]
    assert main(["quantize", str(tmp_path / "ln.onnx"), "-o", str(tmp_path / "a.onnx"), *args]) == 0
    assert "SmoothQuant (alpha 0.5): 1 activation(s) smoothed" in capsys.readouterr().out
    model = ln_qkv()  # the same with h also a graph output: nothing can be smoothed
    model.graph.output.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["N", 5, K]))
    onnx.save(model, tmp_path / "out.onnx")
    assert main(["quantize", str(tmp_path / "out.onnx"), "-o", str(tmp_path / "b.onnx"), *args]) == 0
    text = capsys.readouterr().out
    assert "0 activation(s) smoothed; none could be (h: not smoothed (it is a graph output))" in text
