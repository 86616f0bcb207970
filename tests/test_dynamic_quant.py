"""Dynamic int8 (no calibration data): MatMul/Gemm layers with int8 weights, activations quantized at run time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxpress
from onnxpress.cli import main
from onnxpress.errors import CalibrationError, OnnxpressError
from onnxpress.passes.dynamic_quant import QuantizeDynamic
from onnxpress.passes.qdq import Selection, weight_qparams
from onnxpress.pipeline import run_passes
from tests.graphs import make_model, rng, run
from tests.test_qdq import residual_cnn, sqnr_db

MODELS = Path(__file__).resolve().parents[1] / "models"
K, N = 64, 48


def layers() -> onnx.ModelProto:
    """X[b, t, 64] -> MatMul(W1) -> Relu -> r; r -> Reshape[-1, 48] -> Gemm(W2ᵀ, transB, bias) -> Y1;
    r -> MatMul(W3) -> Y2 and r -> MatMul(W5) -> Y4 (r feeds two layers: one DynamicQuantizeLinear);
    X[..., :8] -> MatMul(W4[8, 4]) -> Y3 (K = 8 < 16: float)."""
    r = rng(11)
    init = {
        "W1": r.standard_normal((K, N)).astype(np.float32) / 8,
        "W2": r.standard_normal((N, N)).astype(np.float32) / 7,  # Gemm transB: [N_out, K]
        "B2": r.standard_normal(N).astype(np.float32),
        "W3": r.standard_normal((N, 16)).astype(np.float32) / 7,
        "W4": r.standard_normal((8, 4)).astype(np.float32),
        "W5": r.standard_normal((N, 24)).astype(np.float32) / 7,
        "shape": np.array([-1, N], np.int64),
        "starts": np.array([0], np.int64), "ends": np.array([8], np.int64), "axes": np.array([2], np.int64),
    }  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["r2"]),
        helper.make_node("Gemm", ["r2", "W2", "B2"], ["Y1"], name="fc", transB=1),
        helper.make_node("MatMul", ["r", "W3"], ["Y2"], name="side"),
        helper.make_node("MatMul", ["r", "W5"], ["Y4"], name="side_b"),
        helper.make_node("Slice", ["X", "starts", "ends", "axes"], ["s"]),
        helper.make_node("MatMul", ["s", "W4"], ["Y3"], name="shallow"),
    ]
    outputs = [("Y1", ["bt", N]), ("Y2", ["b", "t", 16]), ("Y3", ["b", "t", 4]), ("Y4", ["b", "t", 24])]
    return make_model(nodes, [("X", ["b", "t", K])], outputs, init)


def _fused_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]


def _bound(x: np.ndarray, w: np.ndarray, per_channel: bool) -> np.ndarray:
    """|y - y_float| <= sum_k |x_k| s_w/2 + |w_k| s_x/2 + s_x s_w/4 (rounding of x and of W, per output column)."""
    s_w = weight_qparams(w, 1 if per_channel else None).scale
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s_x = (hi - lo) / 255
    weight_part = np.abs(x.astype(np.float64)) @ np.broadcast_to(s_w / 2, w.shape)
    return weight_part + s_x / 2 * np.abs(w).sum(0) + w.shape[0] * s_x * s_w / 4


@pytest.mark.parametrize("per_channel", [True, False])
def test_layers_run_as_dynamic_integer_kernels_within_the_rounding_bound(tmp_path, per_channel):
    model = layers()
    x = rng(12).standard_normal((3, 5, K)).astype(np.float32)
    ref = run(model, {"X": x})
    dyn = QuantizeDynamic(per_channel=per_channel)
    out = run_passes(model, [dyn]).model
    onnx.checker.check_model(out, full_check=True)
    decided = {d.name: (d.quantized, d.reason) for d in dyn.decisions}
    assert decided == {"up": (True, ""), "fc": (True, ""), "side": (True, ""), "side_b": (True, ""),
                       "shallow": (False, "reduction depth 8 < 16: fp32 kernel is faster here")}  # fmt: skip
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 3  # X, r (read by two layers) and r's reshape, each once
    fused = _fused_ops(out, tmp_path)
    assert fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat") == 4
    assert "MatMulInteger" not in fused and "Gemm" not in fused  # no float Gemm on dequantized weights
    got = run(out, {"X": x})
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # each layer within the rounding bound of its own (already quantized) input; `up` measured alone
    got_h = _up_only(model, x, per_channel)
    assert np.all(np.abs(got_h - x @ inits["W1"]) <= _bound(x.reshape(-1, K), inits["W1"], per_channel).reshape(3, 5, N)
                  + 1e-5)  # fmt: skip
    h_q = np.maximum(got_h, 0)
    side = h_q.reshape(-1, N)
    assert np.all(np.abs(got[1].reshape(-1, 16) - side @ inits["W3"]) <= _bound(side, inits["W3"], per_channel) + 1e-5)
    w2 = inits["W2"].T  # Gemm transB: [K, N]
    assert np.all(np.abs(got[0] - (side @ w2 + inits["B2"])) <= _bound(side, w2, per_channel) + 1e-5)
    assert sqnr_db(got[0], ref[0]) > 30 and sqnr_db(got[1], ref[1]) > 30
    np.testing.assert_array_equal(got[2], ref[2])  # the shallow layer stayed float


def _up_only(model: onnx.ModelProto, x: np.ndarray, per_channel: bool) -> np.ndarray:
    """The dynamic `up` layer's output alone (the others excluded), as a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "t", N]))
    keep = Selection(frozenset({"fc", "side", "side_b", "shallow"}))
    out = run_passes(m, [QuantizeDynamic(per_channel=per_channel, exclude=keep)]).model
    return run(out, {"X": x})[-1]


def test_excluded_and_unsupported_layers_stay_float():
    nodes = [helper.make_node("Gemm", ["X", "W"], ["a"], name="ta", transA=1),
             helper.make_node("MatMul", ["a", "V"], ["Y"], name="kept")]
    model = make_model(nodes, [("X", [32, "n"])], [("Y", ["n", 20])],
                       {"W": rng(1).standard_normal((32, 24)).astype(np.float32),
                        "V": rng(2).standard_normal((24, 20)).astype(np.float32)})  # fmt: skip
    dyn = QuantizeDynamic(exclude=Selection(frozenset({"kept"})))
    result = run_passes(model, [dyn])
    assert [(d.name, d.quantized, d.reason) for d in dyn.decisions] == [
        ("ta", False, "Gemm with transA or alpha/beta other than 1"), ("kept", False, "excluded by name")]
    assert not result.modified


def test_quantize_without_data_goes_dynamic_on_a_transformer(tmp_path, capsys):
    """The reference transformer with no calibration data: dynamic int8, as onnxruntime's quantize_dynamic
    (41.48 dB per channel there, the same kernels: DynamicQuantizeMatMul / MatMulIntegerToFloat, and QAttention)."""
    src = MODELS / "transformer.onnx"
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "no calibration data: activations are quantized at run time" in text
    assert "int8 weights, dynamic activations (14 MatMul/Gemm layers)" in text
    with np.load(MODELS / "digits32_test.npz") as d:
        x = d["input"]
    ref, got = run(onnx.load(src), {"input": x})[0], run(onnx.load(out), {"input": x})[0]
    assert sqnr_db(got, ref) >= 40.0  # 41.7 dB measured
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.995
    assert out.stat().st_size <= 0.27 * src.stat().st_size
    fused = _fused_ops(onnx.load(out), tmp_path)
    # 8 integer MatMuls; the attention blocks' query/key/value projections run inside 2 QAttention
    assert fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat") == 8
    assert fused.count("QAttention") == 2


def test_without_data_a_model_with_convolutions_still_asks_for_it():
    match = r"activations='dynamic' / --activations dynamic \(no data; MatMul/Gemm and LSTM layers only"
    with pytest.raises(CalibrationError, match=match):
        onnxpress.quantize(residual_cnn())


def test_dynamic_refuses_options_that_need_data():
    model = layers()
    with pytest.raises(OnnxpressError, match="takes no calibration data"):
        onnxpress.quantize(model, activations="dynamic", calib=[{"X": np.zeros((1, 2, K), np.float32)}])
    with pytest.raises(OnnxpressError, match="is for int8 weights"):
        onnxpress.quantize(model, activations="dynamic", weights="int4")
    with pytest.raises(OnnxpressError, match="has no calibration data for method='auto', equalize, smoothquant"):
        onnxpress.quantize(model, activations="dynamic", smoothquant=0.5)
    conv = onnxpress.quantize(residual_cnn(), activations="dynamic")  # asked for: convolutions stay float
    assert {d.op for d in conv.quantized} <= {"MatMul", "Gemm"}


def test_without_data_a_model_with_nothing_to_quantize_says_so(tmp_path, capsys):
    """No MatMul/Gemm and no data: the CLI says that no layer was quantized (and writes the model as it was)."""
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["X"], ["Y"])], [("X", ["N", 4])], [("Y", ["N", 4])]), src)
    assert main(["quantize", str(src), "-o", str(out), "-q"]) == 0
    assert "int8 weights, dynamic activations (0 MatMul/Gemm layers)" in capsys.readouterr().out
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Relu"]
