"""PadInputChannels: an int8 input Conv of 1-3 channels reads its input padded to 4 zero channels, exactly."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.passes.pad_input_channels import WIDTH, PadInputChannels
from onnxpress.pipeline import run_passes
from onnxpress.runtime import make_session

MODELS = Path(__file__).resolve().parents[1] / "models"
CALIB = str(MODELS / "digits32_calib.npz")


class _Off:
    """Stands in for the pass: quantize's graph as it was before it."""

    name = "pad_input_channels"

    def requires(self, graph):
        """Nothing."""

    def __call__(self, graph):
        from onnxpress.passes.base import PassResult

        return PassResult(graph, False)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model).run(None, {"input": x})[0]


def test_the_residual_cnns_int8_stem_reads_four_channels_with_the_same_outputs(monkeypatch, tmp_path):
    """The reference ResNet's 1-channel stem is int8 (a residual Add reads it): padded, bit-identical logits, and
    onnxruntime runs it as a QLinearConv on the 4-channel input."""
    import onnxpress

    mod = importlib.import_module("onnxpress.quantize")
    padded = onnxpress.quantize(str(MODELS / "resnet.onnx"), calib=CALIB, progress=False).model
    monkeypatch.setattr(mod, "PadInputChannels", _Off)
    plain = onnxpress.quantize(str(MODELS / "resnet.onnx"), calib=CALIB, progress=False).model
    assert [n.op_type for n in plain.graph.node].count("Pad") == 0
    pads = [n for n in padded.graph.node if n.op_type == "Pad"]
    assert len(pads) == 1 and pads[0].input[0] == "input"
    inits = {i.name: numpy_helper.to_array(i) for i in padded.graph.initializer}
    four = [w for w in inits.values() if w.dtype == np.int8 and w.ndim == 4 and w.shape[1] == WIDTH]
    assert len(four) == 1 and not four[0][:, 1:].any() and four[0][:, 0].any()
    x = np.load(CALIB)["input"][:32]
    np.testing.assert_array_equal(_outputs(padded, x), _outputs(plain, x))
    # onnxruntime's own graph: the Conv on the padded input is an integer kernel
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(padded.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "opt.onnx")
    pad_out = next(n.output[0] for n in optimized.graph.node if n.op_type == "Pad")
    q_out = next(n.output[0] for n in optimized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pad_out)
    assert [n.op_type for n in optimized.graph.node if q_out in n.input] == ["QLinearConv"]


def test_float_stems_are_left_float():
    """MobileNet's and the Inception CNN's stems stay float in quantize (faster there): nothing is padded."""
    import onnxpress

    for name in ("mobilenet", "concat"):
        model = onnxpress.quantize(str(MODELS / f"{name}.onnx"), calib=CALIB, progress=False).model
        assert "Pad" not in {n.op_type for n in model.graph.node}, name


def _qdq_conv(channels: int, *, weight_zero_point: int = 0, shared_q: bool = False) -> onnx.ModelProto:
    """input[N, C, 6, 6] -> Q -> DQ -> Conv(DQ(int8 W[3, C, 3, 3])) (-> also Identity of the Q output)."""
    rng = np.random.default_rng(channels)
    w = rng.integers(-127, 128, (3, channels, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
        numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(3, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.full(3, weight_zero_point, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 6, 6])]
    if shared_q:
        nodes.append(helper.make_node("Identity", ["xq"], ["xq_copy"]))
        outputs.append(helper.make_tensor_value_info("xq_copy", TensorProto.UINT8, [None, channels, 6, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         [None, channels, 6, 6])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_narrow_input_convs_are_padded_exactly(channels):
    model = _qdq_conv(channels)
    res = run_passes(model, [PadInputChannels()])
    assert res.stats["pad_input_channels.convs"] == 1
    onnx.checker.check_model(res.model)
    x = np.random.default_rng(0).normal(size=(2, channels, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(res.model, x), _outputs(model, x))


@pytest.mark.parametrize(("model", "why"), [
    (_qdq_conv(4), "already 4 channels"),
    (_qdq_conv(1, weight_zero_point=1), "a non-zero weight zero point: padded zeros would not dequantize to 0"),
    (_qdq_conv(1, shared_q=True), "the quantized input has another reader, which wants it unpadded"),
])  # fmt: skip
def test_other_convs_are_left_alone(model, why):
    res = run_passes(model, [PadInputChannels()])
    assert res.stats["pad_input_channels.convs"] == 0, why
    assert "Pad" not in {n.op_type for n in res.model.graph.node}, why


def test_cli_quantize_says_it_padded_the_stem(tmp_path, capsys):
    """The quantize command names the padded stem (the only rewrite the op table does not show)."""
    from onnxpress.cli import main

    out = tmp_path / "q.onnx"
    assert main(["quantize", str(MODELS / "resnet.onnx"), "-o", str(out), "--calib", CALIB, "-q"]) == 0
    said = capsys.readouterr().out
    assert "padded the input of 1 int8 input conv(s) to 4 channels" in said
    assert [n.op_type for n in onnx.load(out).graph.node].count("Pad") == 1
