"""DropZeroInitialStates: recurrent layers' zero-by-construction initial states are left to ONNX's default."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxpress
from onnxpress.model_io import load_model, normalize_model
from onnxpress.passes.zero_states import DropZeroInitialStates
from onnxpress.pipeline import cleanup_passes, run_passes
from tests.graphs import make_model, rng, run

T, D, H = 5, 6, 4


def recurrent(op: str, state: str) -> onnx.ModelProto:
    """x[T, B, D] -> (state built by ``state``) -> op(x, W, R, B, '', h0[, c0]) -> Y, Y_h."""
    r = rng(3)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    inits = {"W": (r.standard_normal((1, gates * H, D)) * 0.4).astype(np.float32),
             "R": (r.standard_normal((1, gates * H, H)) * 0.4).astype(np.float32),
             "Bias": (r.standard_normal((1, 2 * gates * H)) * 0.1).astype(np.float32),
             "one": np.array([1], np.int64), "hidden": np.array([H], np.int64), "zero": np.array(0.0, np.float32),
             "two": np.array(2.0, np.float32), "b_index": np.array([1], np.int64),
             "layers": np.array([2], np.int64), "axis0": np.array([0], np.int64),
             "zeros_h": np.zeros((1, 3, H), np.float32)}
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "b_index"], ["batch"], axis=0),
             helper.make_node("Concat", ["one", "batch", "hidden"], ["state_shape"], axis=0)]
    if state == "expand":  # TorchScript's zeros: Expand(0.0, [1, B, H])
        nodes.append(helper.make_node("Expand", ["zero", "state_shape"], ["h0"]))
    elif state == "constant_of_shape":
        nodes.append(helper.make_node("ConstantOfShape", ["state_shape"], ["h0"]))
    elif state == "expand_slice":  # TorchScript's for stacked layers: zeros for both, sliced per layer
        nodes += [helper.make_node("Concat", ["layers", "batch", "hidden"], ["all_shape"], axis=0),
                  helper.make_node("Expand", ["zero", "all_shape"], ["all"]),
                  helper.make_node("Slice", ["all", "one", "layers", "axis0"], ["h0"])]
    elif state == "ones":
        nodes.append(helper.make_node("ConstantOfShape", ["state_shape"], ["h0"],
                                      value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])))
    elif state == "expand_two":
        nodes.append(helper.make_node("Expand", ["two", "state_shape"], ["h0"]))
    elif state == "constant":  # batch 3 only
        nodes.append(helper.make_node("Identity", ["zeros_h"], ["h0"]))
    else:
        raise ValueError(state)
    states = ["h0", "h0"] if op == "LSTM" else ["h0"]
    nodes.append(helper.make_node(op, ["x", "W", "R", "Bias", "", *states], ["Y", "Y_h"], hidden_size=H))
    inputs = [("x", [T, "batch", D])]
    return make_model(nodes, inputs, [("Y", [T, 1, "batch", H]), ("Y_h", [1, "batch", H])], inits)


def dropped(model: onnx.ModelProto):
    result = run_passes(model, [DropZeroInitialStates()])
    layer = next(n for n in result.model.graph.node if n.op_type in ("LSTM", "GRU", "RNN"))
    return result, [i for i in layer.input[5:7]]


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("state", ["expand", "constant_of_shape", "expand_slice", "constant"])
def test_zero_initial_states_are_left_out_and_the_outputs_are_the_same(op, state) -> None:
    model = recurrent(op, state)
    result, states = dropped(model)
    assert result.modified and all(s == "" for s in states)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == [op]  # the shape arithmetic that built the state died with it
    onnx.checker.check_model(result.model, full_check=True)
    x = rng(4).standard_normal((T, 3, D)).astype(np.float32)
    for got, want in zip(run(result.model, {"x": x}), run(model, {"x": x}), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("state", ["ones", "expand_two"])
def test_states_that_are_not_zero_stay(state) -> None:
    result, states = dropped(recurrent("GRU", state))
    assert not result.modified and states == ["h0"]


def test_a_state_fed_by_the_caller_stays() -> None:
    r = rng(5)
    inits = {"W": r.standard_normal((1, 3 * H, D)).astype(np.float32),
             "R": r.standard_normal((1, 3 * H, H)).astype(np.float32)}
    node = helper.make_node("GRU", ["x", "W", "R", "", "", "h0"], ["Y"], hidden_size=H)
    model = make_model([node], [("x", [T, 2, D]), ("h0", [1, 2, H])], [("Y", [T, 1, 2, H])], inits)
    result, states = dropped(model)
    assert not result.modified and states == ["h0"]


def test_a_zero_state_that_is_also_an_output_stays_an_output() -> None:
    model = recurrent("GRU", "expand")
    model.graph.output.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", H]))
    result, states = dropped(model)
    assert result.modified and states == [""]
    x = rng(6).standard_normal((T, 2, D)).astype(np.float32)
    got, want = run(result.model, {"x": x}), run(model, {"x": x})
    assert len(got) == 3 and not got[2].any()
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_reference_lstm_loses_its_zero_states_in_every_pipeline() -> None:
    """models/lstm.onnx: nn.LSTM without h0, whose zeros TorchScript builds from the input's shape."""
    source = normalize_model(load_model("models/lstm.onnx"))
    cleaned = run_passes(source, cleanup_passes()).model
    lstm = next(n for n in cleaned.graph.node if n.op_type == "LSTM")
    assert list(lstm.input[5:7]) == ["", ""]
    assert not {"Expand", "ConstantOfShape"} & {n.op_type for n in cleaned.graph.node}
    with np.load("models/digits32_test.npz") as data:
        x = data["input"][:16].astype(np.float32)
    np.testing.assert_array_equal(run(cleaned, {"input": x})[0], run(source, {"input": x})[0])
    quantized = onnxpress.quantize("models/lstm.onnx").model  # dynamic int8: onnxruntime's DynamicQuantizeLSTM
    layer = next(n for n in quantized.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert list(layer.input[5:7]) == ["", ""]
