"""count_macs / count_params against hand-computed counts and against the torch reference counter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxpress.errors import UnsupportedModelError
from onnxpress.passes.flops import count_macs, count_params, model_size_bytes
from tests import graphs
from tests.graphs import make_model

MODELS = Path(__file__).resolve().parent.parent / "models"
F32 = np.float32


def _mixed():
    """X[N,4,8,8] -> Conv(8, 3x3, group 2, stride 2) -> ConvTranspose(3, 2x2 s2) -> Flatten -> Gemm(transA=0) -> Y."""
    r = graphs.rng(0)
    inits = {
        "W": r.standard_normal((8, 2, 3, 3)).astype(F32),
        "B": r.standard_normal(8).astype(F32),
        "T": r.standard_normal((8, 3, 2, 2)).astype(F32),
        "G": r.standard_normal((3 * 8 * 8, 5)).astype(F32),
        "shape": np.array([7], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c"], group=2, strides=[2, 2], pads=[1, 1, 1, 1], name="gconv"),
        helper.make_node("ConvTranspose", ["c", "T"], ["t"], strides=[2, 2], name="up"),
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["Y"], name="fc"),
    ]
    return make_model(nodes, [("X", ["N", 4, 8, 8])], [("Y", ["N", 5])], inits)


def test_macs_by_hand():
    """gconv: 8 out x 4x4 x (4/2)*9; up: 8 in x 4x4 x 3*4; fc: 192*5."""
    macs = count_macs(_mixed())
    assert macs == {"gconv": 8 * 16 * 2 * 9, "up": 8 * 16 * 3 * 4, "fc": 192 * 5}
    assert count_macs(_mixed(), batch=4) == {k: 4 * v for k, v in macs.items()}


def test_batched_matmul_and_unnamed_nodes():
    """X[N,6,8] @ W[8,16] -> Y[N,6,16]: 6*16*8 MACs per sample; an unnamed node is keyed by its output."""
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [("X", ["N", 6, 8])],
        [("Y", ["N", 6, 16])],
        {"W": np.ones((8, 16), F32)},
    )
    assert count_macs(model) == {"Y": 6 * 16 * 8}
    assert count_macs(gs.import_onnx(model)) == {"Y": 6 * 16 * 8}


def test_params_each_initializer_once():
    """A weight shared by two Gemms is counted once (at its first reader); int64 shapes are not parameters."""
    model = make_model(
        [
            helper.make_node("Gemm", ["X", "W"], ["a"], name="g1"),
            helper.make_node("Gemm", ["a", "W", "B"], ["Y"], name="g2"),
        ],
        [("X", ["N", 4])],
        [("Y", ["N", 4])],
        {"W": np.ones((4, 4), F32), "B": np.ones(4, F32)},
    )
    assert count_params(model) == {"g1": 16, "g2": 4}
    assert count_params(_mixed()) == {"gconv": 8 * 2 * 9 + 8, "up": 96, "fc": 960}
    assert model_size_bytes(model) == model.ByteSize()


def test_unknown_shapes_are_a_clear_error():
    """Conv whose spatial size is symbolic: MACs cannot be counted; the error names the node."""
    r = graphs.rng(0)
    model = make_model(
        [helper.make_node("Conv", ["X", "W"], ["Y"], name="c")],
        [("X", ["N", 3, "H", "W"])],
        [("Y", ["N", 4, "H2", "W2"])],
        {"W": r.standard_normal((4, 3, 3, 3)).astype(F32)},
    )
    with pytest.raises(UnsupportedModelError, match="'c'"):
        count_macs(model)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "concat", "transformer", "lstm"])
def test_reference_models_match_the_torch_counter(name):
    """Conv/Linear/LSTM MACs of each exported reference model equal models.nets.count_macs on the torch module."""
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built yet")
    torch = pytest.importorskip("torch")
    from models.nets import NETS
    from models.nets import count_macs as torch_macs
    from onnxpress.model_io import load_model

    net = NETS[name]().eval()
    expected = torch_macs(net, torch.zeros(1, 1, 32, 32))
    got = sum(count_macs(load_model(path)).values())
    assert got == expected


@pytest.mark.parametrize(("op", "gates", "direction", "layout"), [
    ("LSTM", 4, "bidirectional", 0), ("LSTM", 4, "forward", 1), ("GRU", 3, "forward", 0), ("RNN", 1, "reverse", 0),
])  # fmt: skip
def test_recurrent_macs_by_hand(op, gates, direction, layout):
    """T steps x B sequences x D directions x G gates x H x (I + H): W x and R h at every step."""
    t, b, i, h = 12, 3, 16, 32
    d = 2 if direction == "bidirectional" else 1
    attrs = {"hidden_size": h, "direction": direction, **({"layout": 1} if layout else {})}
    node = helper.make_node(op, ["X", "W", "R"], ["", "Y_h"], name="rnn", **attrs)
    init = {"W": np.zeros((d, gates * h, i), np.float32), "R": np.zeros((d, gates * h, h), np.float32)}
    x_shape, h_shape = ([b, t, i], [b, d, h]) if layout else ([t, b, i], [d, b, h])
    model = make_model([node], [("X", x_shape)], [("Y_h", h_shape)], init)
    assert count_macs(model) == {"rnn": t * b * d * gates * h * (i + h)}


def test_quantized_lstm_counts_as_the_lstm_it_replaces():
    from onnxpress.passes.dynamic_quant import QuantizeLSTMDynamic
    from onnxpress.pipeline import run_passes
    from tests.test_lstm_quant import lstm_model

    model = lstm_model()
    quantized = run_passes(model, [QuantizeLSTMDynamic()]).model
    assert count_macs(quantized) == count_macs(model) == {"lstm": 12 * 3 * 2 * 4 * 32 * (16 + 32)}
