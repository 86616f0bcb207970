"""LSTM layers as onnxruntime's DynamicQuantizeLSTM: int8 weights, input and hidden state quantized at run time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxpress
from onnxpress.passes.dynamic_quant import QuantizeLSTMDynamic
from onnxpress.passes.qdq import Selection
from onnxpress.pipeline import run_passes
from tests.graphs import make_model, rng, run
from tests.test_dynamic_quant import _fused_ops
from tests.test_qdq import sqnr_db

MODELS = Path(__file__).resolve().parents[1] / "models"
T, B, F, H = 12, 3, 16, 32  # steps, batch, input features, hidden size


def lstm_model(direction: str = "bidirectional", *, extras: bool = False, clip: float | None = None,
               layout: int = 0, row_spread: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """X[T, B, F] -> LSTM(H) -> Y, Y_h, Y_c. ``extras``: bias, sequence lengths, initial h/c and peepholes.
    ``row_spread``: gate rows' magnitudes spread log-uniformly over that factor (per-channel's case)."""
    d = 2 if direction == "bidirectional" else 1
    r = rng(seed)
    spread = np.exp(r.uniform(0, np.log(row_spread), (d, 4 * H, 1))).astype(np.float32)
    init = {"W": (r.standard_normal((d, 4 * H, F)) * 0.25 * spread).astype(np.float32),
            "R": (r.standard_normal((d, 4 * H, H)) * 0.15 * spread).astype(np.float32)}  # fmt: skip
    inputs = ["X", "W", "R"]
    if extras:
        init |= {"Bias": (r.standard_normal((d, 8 * H)) * 0.1).astype(np.float32),
                 "lens": np.array([T, T - 3, 5][:B], np.int32),
                 "h0": (r.standard_normal((d, B, H)) * 0.5).astype(np.float32),
                 "c0": (r.standard_normal((d, B, H)) * 0.5).astype(np.float32),
                 "P": (r.standard_normal((d, 3 * H)) * 0.1).astype(np.float32)}  # fmt: skip
        inputs += ["Bias", "lens", "h0", "c0", "P"]
    attrs = {"hidden_size": H, "direction": direction}
    if clip is not None:
        attrs["clip"] = clip
    if layout:
        attrs["layout"] = layout
    x_shape = [B, T, F] if layout else [T, B, F]
    y_shape = [B, T, d, H] if layout else [T, d, B, H]
    state = [B, d, H] if layout else [d, B, H]
    node = helper.make_node("LSTM", inputs, ["Y", "Y_h", "Y_c"], name="lstm", **attrs)
    return make_model([node], [("X", x_shape)], [("Y", y_shape), ("Y_h", state), ("Y_c", state)], init)


def _x(layout: int = 0, seed: int = 1) -> np.ndarray:
    return rng(seed).standard_normal([B, T, F] if layout else [T, B, F]).astype(np.float32)


def _rebuilt_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """W and R as DynamicQuantizeLSTM reads them: (dequantized in LSTM's [D, 4H, K] layout, scales)."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    out = {}
    for name, q_at, s_at, z_at in (("W", 1, 8, 9), ("R", 2, 10, 11)):
        q, s, z = consts[node.input[q_at]], consts[node.input[s_at]], consts[node.input[z_at]]
        assert q.dtype == np.int8 and not z.any()
        per_row = s[:, None, :] if s.ndim == 2 else s[:, None, None]
        out[name] = ((q.astype(np.float32) * per_row).transpose(0, 2, 1), s)
    return out


@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_are_symmetric_int8_on_their_channel_grid(per_channel):
    model = lstm_model()
    out = run_passes(model, [QuantizeLSTMDynamic(per_channel=per_channel)]).model
    onnx.checker.check_model(out, full_check=True)
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, (rebuilt, scale) in _rebuilt_weights(out).items():
        w = consts[name]
        amax = np.abs(w).max(axis=2) if per_channel else np.abs(w).max(axis=(1, 2))
        np.testing.assert_allclose(scale, amax / 127, rtol=1e-6)
        step = scale[:, :, None] if per_channel else scale[:, None, None]
        assert np.all(np.abs(rebuilt - w) <= step / 2 * (1 + 1e-5))


def _dequantized_lstm(model: onnx.ModelProto, out: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with W and R replaced by the int8 model's dequantized weights (float LSTM, no weight error)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rebuilt = _rebuilt_weights(out)
    for init in m.graph.initializer:
        if init.name in rebuilt:
            init.CopyFrom(numpy_helper.from_array(rebuilt[init.name][0], init.name))
    return m


@pytest.mark.parametrize(("direction", "extras", "clip"), [
    ("forward", False, None), ("reverse", True, None), ("bidirectional", True, None), ("bidirectional", False, 0.8),
])  # fmt: skip
def test_outputs_match_the_float_lstm(tmp_path, direction, extras, clip):
    """Against the float LSTM on the same (dequantized) weights only the run-time rounding of x and h is left:
    39.2-44.3 dB measured here, where two gates swapped in that reference read 5.9-9.7 dB. Against the original
    weights 37.1-41.8 dB."""
    model = lstm_model(direction, extras=extras, clip=clip)
    out = run_passes(model, [QuantizeLSTMDynamic()]).model
    assert "DynamicQuantizeLSTM" in _fused_ops(out, tmp_path)
    x = _x()
    got = run(out, {"X": x})
    same_weights = run(_dequantized_lstm(model, out), {"X": x})
    ref = run(model, {"X": x})
    for g, s, r in zip(got, same_weights, ref, strict=True):
        assert sqnr_db(s, g) >= 37
        assert sqnr_db(r, g) >= 35
    if extras:  # past a sequence's length the outputs stay zero, as in the float op
        assert not got[0][T - 3 :, :, 1].any() and not ref[0][T - 3 :, :, 1].any()


def test_per_channel_scales_beat_one_per_direction_when_gate_rows_differ():
    model = lstm_model(row_spread=30.0, seed=3)
    x = _x(seed=4)
    ref = run(model, {"X": x})[0]
    per = {pc: run(run_passes(model, [QuantizeLSTMDynamic(per_channel=pc)]).model, {"X": x})[0] for pc in (True, False)}
    assert sqnr_db(ref, per[True]) >= sqnr_db(ref, per[False]) + 3


def test_lstms_it_cannot_take_stay_float_with_a_reason():
    batch_first = lstm_model(layout=1)
    lstm = QuantizeLSTMDynamic()
    assert not run_passes(batch_first, [lstm]).modified
    assert [(d.quantized, d.reason) for d in lstm.decisions] == [
        (False, "layout=1 (batch first): onnxruntime runs no LSTM with it, float or int8")]
    lstm = QuantizeLSTMDynamic(exclude=Selection(op_types=frozenset({"LSTM"})))
    assert not run_passes(lstm_model(), [lstm]).modified
    assert lstm.decisions[0].reason == "excluded op type LSTM"
    # W fed at run time
    node = helper.make_node("LSTM", ["X", "Wx", "R"], ["Y"], hidden_size=H)
    fed = make_model([node], [("X", [T, B, F]), ("Wx", [1, 4 * H, F])], [("Y", [T, 1, B, H])],
                     {"R": np.zeros((1, 4 * H, H), np.float32)})  # fmt: skip
    lstm = QuantizeLSTMDynamic()
    assert not run_passes(fed, [lstm]).modified
    assert lstm.decisions[0].reason == "W is not a constant"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / "digits32_test.npz") as test:
        return test["input"], test["labels"]


@pytest.mark.parametrize("calib", [False, True])
def test_quantize_takes_the_reference_lstm_on_real_data(tmp_path, digits, calib, capsys):
    """The trained RowLSTM (98.9% on the digits test split): no data, dynamic; with data, static int8 around it.
    Measured 48.3 / 49.7 dB logit SQNR, 0.265x size; the bound leaves 3 dB."""
    x, labels = digits
    out = tmp_path / "q.onnx"
    data = MODELS / "digits32_calib.npz" if calib else None
    result = onnxpress.quantize(MODELS / "lstm.onnx", out, calib=data, max_samples=128)
    assert [(d.op, d.quantized) for d in result.quantized if d.op == "LSTM"] == [("LSTM", True)]
    model = onnx.load(out)
    (node,) = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert consts[node.input[3]].dtype == np.float32  # the bias is not stored int8 (onnxruntime keeps it too)
    fused = _fused_ops(model, tmp_path)
    assert "DynamicQuantizeLSTM" in fused and "LSTM" not in fused
    ref = run(onnx.load(MODELS / "lstm.onnx"), {"input": x})[0]
    got = run(model, {"input": x})[0]
    assert sqnr_db(ref, got) >= 45
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.995
    assert np.mean(got.argmax(1) == labels) >= 0.985
    assert result.size_ratio <= 0.27


def test_an_excluded_lstm_keeps_its_float_weights(tmp_path):
    result = onnxpress.quantize(MODELS / "lstm.onnx", tmp_path / "q.onnx", exclude=["op:LSTM"])
    model = result.model
    (node,) = [n for n in model.graph.node if n.op_type == "LSTM"]
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert consts[node.input[1]].dtype == np.float32 and consts[node.input[2]].dtype == np.float32
    assert [d.reason for d in result.kept_float if d.op == "LSTM"] == ["excluded op type LSTM"]


def test_cli_names_the_lstm(tmp_path, capsys):
    from onnxpress.cli import main

    assert main(["quantize", str(MODELS / "lstm.onnx"), "-o", str(tmp_path / "q.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "1 LSTM as onnxruntime's DynamicQuantizeLSTM" in printed
    assert "LSTM          1      0" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]



@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_gru_and_rnn_weights_are_stored_float16_behind_a_cast_onnxruntime_folds(tmp_path, op):
    """No integer kernel: int8 + DequantizeLinear ran at every call; float16 + Cast is folded at load (half the
    bytes, float speed). A weight beyond float16's range stays float32."""
    from onnxpress.passes.weight_only import StoreConstantsInt8

    gates = 3 if op == "GRU" else 1
    r = rng(7)
    w = (r.standard_normal((1, gates * H, F)) * 0.3).astype(np.float32)
    big = (r.standard_normal((1, gates * H, H)) * 0.3).astype(np.float32)
    big[0, 0, 0] = 1e5  # beyond float16
    node = helper.make_node(op, ["X", "W", "R"], ["Y"], hidden_size=H, name="rec")
    model = make_model([node], [("X", [T, B, F])], [("Y", [T, 1, B, H])], {"W": w, "R": big})
    result = run_passes(model, [StoreConstantsInt8(min_size=16)])
    assert result.stats["store_constants_int8.constants_float16"] == 1
    assert result.stats["store_constants_int8.constants_int8"] == 0
    out = result.model
    consts = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    (rec,) = [n for n in out.graph.node if n.op_type == op]
    (cast,) = [n for n in out.graph.node if n.op_type == "Cast"]
    assert cast.output[0] == rec.input[1] and consts[cast.input[0]].dtype == np.float16
    assert consts[rec.input[2]].dtype == np.float32  # the out-of-range R
    assert not {"DequantizeLinear", "Cast"} & set(_fused_ops(out, tmp_path))  # folded when the session loads
    x = _x(seed=8)
    ref, got = run(model, {"X": x})[0], run(out, {"X": x})[0]
    assert sqnr_db(ref, got) >= 65  # float16 rounding of W alone: 71.2-71.7 dB measured


def test_macs_are_counted_through_a_quantized_lstm(tmp_path, monkeypatch):
    """Shape inference knows no DynamicQuantizeLSTM: the classifier after it had no shapes (optimize failed on the
    reference LSTM), and onnxruntime's symbolic inference left a scratch file in the current folder."""
    from onnxpress.passes.flops import count_macs

    monkeypatch.chdir(tmp_path)
    original = onnx.load(MODELS / "lstm.onnx")
    quantized = onnxpress.quantize(original, exclude=["op:Gemm", "op:MatMul"]).model
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in quantized.graph.node)
    macs = count_macs(quantized)
    mean = macs.pop(next(k for k in macs if k.endswith("_as_matmul")))  # the mean over time (passes/leading_mean.py)
    assert mean == 32 * 256  # 32 steps of 256 features, as a product by a 1/32 row
    assert sum(macs.values()) == sum(count_macs(original).values()) == 5_245_440
    assert list(tmp_path.iterdir()) == []
