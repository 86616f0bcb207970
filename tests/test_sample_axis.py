"""Sequence-first inputs (``[seq, batch, d]``, torch's RNN default): samples are counted, joined and cut on axis 1.

Before, every reader and the calibration runner took axis 0 as the sample axis. On a sequence-first model that
joined sequences end to end in time and cut them into ``batch_size``-step pieces: a running sum over time was
calibrated at a third of its range at the default batch size, and at another value at another batch size.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.calibration.collect import batch_major_tensors, fixed_batch_inputs
from onnxpress.calibration.readers import model_inputs, open_data, sample_axes

from . import graphs

D, H = 4, 6


def gru_cumsum(*, layout: int = 0, transpose: bool = False, dims=("seq", "batch", D), via_linear: bool = True):
    """x -> [Linear -> Relu] -> [Transpose] -> GRU -> Y[:, 0] -> CumSum over time -> y (a sequence-first model)."""
    r = graphs.rng(3)
    nodes, inits = [], {}
    src = "x"
    if via_linear:  # torch's Linear export: MatMul, then Add with the bias first, then the activation
        inits["W0"] = r.standard_normal((D, D)).astype(np.float32)
        inits["b0"] = r.standard_normal(D).astype(np.float32)
        nodes += [helper.make_node("MatMul", ["x", "W0"], ["m"]), helper.make_node("Add", ["b0", "m"], ["a"]),
                  helper.make_node("Relu", ["a"], ["r"])]
        src = "r"
    if transpose:
        nodes.append(helper.make_node("Transpose", [src], ["t"], perm=[1, 0, 2]))
        src = "t"
    inits["W"] = (r.standard_normal((1, 3 * H, D)) * 0.5).astype(np.float32)
    inits["R"] = (r.standard_normal((1, 3 * H, H)) * 0.5).astype(np.float32)
    inits["B"] = (r.standard_normal((1, 6 * H)) * 0.1).astype(np.float32)
    nodes.append(helper.make_node("GRU", [src, "W", "R", "B"], ["Y"], hidden_size=H, layout=layout))
    time_axis = 1 if layout else 0
    inits["one"] = np.array([1 + layout], np.int64)
    inits["axis"] = np.array(time_axis, np.int64)
    nodes += [helper.make_node("Squeeze", ["Y", "one"], ["s"]),  # drop num_directions
              helper.make_node("CumSum", ["s", "axis"], ["y"])]
    out_dims = ["seq", "batch", H] if not layout else ["batch", "seq", H]
    return graphs.make_model(nodes, [("x", list(dims))], [("y", out_dims)], inits, opset=17)


def test_sample_axes_from_the_rnn_layout_and_from_dimension_names():
    assert sample_axes(gru_cumsum()) == {"x": 1}
    assert sample_axes(gru_cumsum(dims=("T", "B2", D))) == {"x": 1}  # no batch name: the GRU says so
    # torch's batch_first=True export transposes a [B, S, D] input into a layout-0 GRU: that input keeps axis 0
    assert sample_axes(gru_cumsum(transpose=True, dims=("batch", "seq", D))) == {}
    assert sample_axes(gru_cumsum(layout=1, dims=("batch", "seq", D))) == {}
    # names alone, with no RNN: [seq, batch, d] (nn.MultiheadAttention's layout); axis 0 named as a batch wins
    for dims, want in [(["seq", "batch", D], {"X": 1}), (["T", "N", D], {"X": 1}), (["N", "C", 8], {}),
                       (["batch", "seq", D], {}), (["seq", D], {}), (["seq", "len", D], {})]:
        model = graphs.make_model([helper.make_node("Relu", ["X"], ["Y"])], [("X", dims)], [("Y", dims)])
        assert sample_axes(model) == want, dims
    # the shipped batch-first LSTM (Transpose into the node) and the CNNs keep axis 0
    for name in ("lstm", "mobilenet", "transformer"):
        assert sample_axes(onnx.load(f"models/{name}.onnx")) == {}


def test_a_trace_through_an_op_that_moves_axes_concludes_nothing():
    model = gru_cumsum(dims=("T", "B2", D))
    g = model.graph
    # a Reshape between the input and the GRU could put anything anywhere
    g.node.insert(0, helper.make_node("Reshape", ["x", "shape"], ["x2"]))
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, D], np.int64), "shape"))
    g.node[1].input[0] = "x2"
    onnx.checker.check_model(model)
    assert sample_axes(model) == {}


def test_readers_join_count_and_cut_sequences_on_the_batch_axis(tmp_path):
    model = gru_cumsum()
    assert [s.sample_axis for s in model_inputs(model)] == [1]
    r = graphs.rng(0)
    feeds = [{"x": r.standard_normal((7, n, D)).astype(np.float32)} for n in (1, 2, 3)]
    reader = open_data(feeds, model)
    assert reader.num_samples == 6  # not 21 time steps
    got = list(reader.batches(4))
    assert [b["x"].shape for b in got] == [(7, 4, D), (7, 2, D)]  # time intact, batches filled on axis 1
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got], axis=1),
                                  np.concatenate([f["x"] for f in feeds], axis=1))
    assert [b["x"].shape for b in open_data(feeds, model, max_samples=2).batches(64)] == [(7, 2, D)]
    # one .npz of sequence-first arrays, sliced on axis 1
    whole = np.concatenate([f["x"] for f in feeds], axis=1)
    np.savez(tmp_path / "d.npz", x=whole)
    reader = open_data(tmp_path / "d.npz", model)
    assert reader.num_samples == 6
    got = list(reader.batches(4))
    assert [b["x"].shape for b in got] == [(7, 4, D), (7, 2, D)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got], axis=1), whole)
    # a fixed batch on axis 1 runs as stored, and the runner knows it is fixed
    fixed = gru_cumsum(dims=("seq", 2, D))
    assert fixed_batch_inputs(fixed) == [("x", 2)]
    assert fixed_batch_inputs(model) == []


def test_calibration_of_a_running_sum_over_time_does_not_depend_on_the_batch_size():
    model = gru_cumsum()
    r = graphs.rng(1)
    feeds = [{"x": r.standard_normal((40, 1, D)).astype(np.float32)} for _ in range(9)]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    truth = max(float(np.abs(sess.run(None, f)[0]).max()) for f in feeds)  # each sequence on its own
    for method in ("minmax", "kl"):
        ranges = []
        for batch_size in (1, 4, 64):
            table = onnxpress.calibrate(model, feeds, method=method, batch_size=batch_size, tensors=["x", "s", "y"])
            ranges.append({k: (v.min, v.max) for k, v in table.ranges.items()})
            if method == "minmax":
                assert max(-table.ranges["y"].min, table.ranges["y"].max) == pytest.approx(truth, rel=1e-5)
        assert ranges[0] == ranges[1] == ranges[2], method
    # the activations hold the batch on axis 1: none is subsampled per axis-0 row (those are time steps)
    assert batch_major_tensors(model, ["x", "s", "y"]) == set()


def test_validate_and_max_samples_count_sequences(tmp_path):
    model = gru_cumsum()
    r = graphs.rng(2)
    feeds = [{"x": r.standard_normal((30, 2, D)).astype(np.float32)} for _ in range(3)]
    report = onnxpress.validate(model, model, feeds, latency=False)
    assert report.samples == 6
    report = onnxpress.validate(model, model, feeds, latency=False, max_samples=3)
    assert report.samples == 3


def test_a_model_input_with_a_fixed_mask_beside_a_sequence_first_input():
    """A second input on axis 0 (lengths per sequence, ``[batch]``) beside x on axis 1: joined in step."""
    model = gru_cumsum()
    g = model.graph
    g.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, ["batch", 1]))
    g.node.append(helper.make_node("Identity", ["w"], ["w_out"]))
    g.output.append(helper.make_tensor_value_info("w_out", TensorProto.FLOAT, ["batch", 1]))
    onnx.checker.check_model(model)
    assert sample_axes(model) == {"x": 1}
    r = graphs.rng(4)
    feeds = [{"x": r.standard_normal((5, n, D)).astype(np.float32), "w": np.full((n, 1), i, np.float32)}
             for i, n in enumerate((2, 3))]
    (batch,) = open_data(feeds, model).batches(8)
    assert batch["x"].shape == (5, 5, D) and batch["w"][:, 0].tolist() == [0, 0, 1, 1, 1]


def _gru_inits(r, d_in):
    return {"W": (r.standard_normal((1, 3 * H, d_in)) * 0.5).astype(np.float32),
            "R": (r.standard_normal((1, 3 * H, H)) * 0.5).astype(np.float32)}


def test_detection_through_an_embedding_and_a_sliced_initial_state_and_a_shared_name():
    """Token ids into an embedding, and a two-layer h0 that torch slices per layer: both found on axis 1."""
    r = graphs.rng(5)
    inits = {"table": r.standard_normal((11, D)).astype(np.float32), **_gru_inits(r, D),
             "s0": np.array([0], np.int64), "s1": np.array([1], np.int64)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Slice", ["h0", "s0", "s1", "s0"], ["h0_0"]),  # layer 0's state: axis 0 cut
             helper.make_node("GRU", ["e", "W", "R", "", "", "h0_0"], ["Y"], hidden_size=H)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", "M"]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, "M", H]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["M", "T"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 1, "M", H])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    # ids and h0 from the GRU; the unused mask shares the dimension name M (its axis 0 stays)
    assert sample_axes(model) == {"ids": 1, "h0": 1}
    assert fixed_batch_inputs(model) == []  # h0's fixed 2 is its layer axis, not a fixed batch
    # a Slice of the traced axis itself concludes nothing for h0 (M is then only shared by name)
    nodes[1] = helper.make_node("Slice", ["h0", "s0", "s1", "s1"], ["h0_0"])
    graph.ClearField("node")
    graph.node.extend(nodes)
    assert sample_axes(model) == {"ids": 1, "h0": 1}


def test_a_fixed_axis_0_keeps_the_samples_there_whatever_the_names():
    """A batch-1 point cloud ``[1, N, 3]`` (N points): its fixed axis 0 is the batch; N is not."""
    for dims, want in [([1, "N", 3], {}), ([1, "batch", 3], {}), (["seq", "N", 3], {"X": 1})]:
        model = graphs.make_model([helper.make_node("Relu", ["X"], ["Y"])], [("X", dims)], [("Y", dims)])
        assert sample_axes(model) == want, dims


def test_finetune_trains_a_sequence_first_student_on_sequences_and_writes_its_own_layout():
    """Its loop gathers and splits samples on axis 0: it now trains through a batch-first view (a Transpose in
    front, the outputs' batch axis moved to the front) and writes the weights back into the student's graph.
    Before, it counted time steps as samples; a GRU distilled from itself fell from exact to 14.4 dB."""
    pytest.importorskip("torch")
    from onnxpress.errors import UnsupportedModelError
    from onnxpress.finetune import batch_first_view

    teacher = gru_cumsum()
    view = batch_first_view(teacher)
    assert [d.dim_param or d.dim_value for d in view.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq", D]
    assert [d.dim_param or d.dim_value for d in view.graph.output[0].type.tensor_type.shape.dim] == ["batch", "seq", H]
    r = graphs.rng(11)
    x = r.standard_normal((9, 24, D)).astype(np.float32)  # 24 sequences of 9 steps
    run = lambda m, xs: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {m.graph.input[0].name: xs})[0]
    np.testing.assert_allclose(run(view, np.moveaxis(x, 1, 0)), np.moveaxis(run(teacher, x), 1, 0), rtol=1e-6)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for init in student.graph.initializer:
        if init.name == "W":  # a perturbed GRU input weight to pull back towards the teacher
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((w * 1.3).astype(np.float32), "W"))
    result = onnxpress.finetune(student, teacher, [{"x": x}], epochs=4, batch_size=4, val_fraction=0.25, seed=0)
    assert result.history.train_samples + result.history.val_samples == 24  # sequences, not 9 time steps
    assert result.metrics["sqnr_db_after"] > result.metrics["sqnr_db_before"] + 1
    shape = [d.dim_param or d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert shape == ["seq", "batch", D]  # the student's own layout and graph
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in student.graph.node]
    got = 10 * np.log10(np.sum(run(teacher, x) ** 2) / np.sum((run(teacher, x) - run(result.model, x)) ** 2))
    assert got == pytest.approx(result.metrics["sqnr_db_after"], abs=1e-3)
    with pytest.raises(UnsupportedModelError, match=r"input 'x' holds its samples on axis 1 .*QAT"):
        onnxpress.finetune(student, teacher, [{"x": x}], epochs=1, qat=True)


def test_validate_takes_a_candidate_fixed_on_the_batch_axis_at_that_batch():
    model = gru_cumsum()
    fixed = gru_cumsum(dims=("seq", 3, D))
    feeds = [{"x": graphs.rng(6).standard_normal((9, 6, D)).astype(np.float32)}]
    from onnxpress.errors import ValidationError

    with pytest.raises(ValidationError, match=r"fixes axis 1 to 3 .*--batch 3"):
        onnxpress.validate(model, fixed, feeds, latency=False, batch_size=4)
    report = onnxpress.validate(model, fixed, feeds, latency=False, batch_size=3)
    assert report.samples == 6 and report.outputs[0].max_abs_error == 0.0


def test_a_metric_gets_sequence_first_outputs_joined_on_their_batch_axis():
    from onnxpress.calibration.readers import output_sample_axes
    from onnxpress.optimize import _user_metric

    model = gru_cumsum()
    assert output_sample_axes(model) == [1]
    got = []
    parts = [[np.zeros((9, n, H), np.float32)] for n in (4, 2)]
    _user_metric(lambda outs, labels: got.append(outs[0].shape) or 1.0, parts, np.zeros(6), output_sample_axes(model))
    assert got == [(9, 6, H)]


def test_the_prune_scan_compares_sequence_first_outputs_of_batches_of_different_sizes():
    """Its reference outputs were joined on axis 0: [9, 4, H] and [9, 2, H] raised numpy's ValueError."""
    model = gru_cumsum()
    r = graphs.rng(7)
    feeds = [{"x": r.standard_normal((9, n, D)).astype(np.float32)} for n in (4, 2)]
    rows = onnxpress.sensitivity_scan(model, feeds, batch_size=4)
    assert isinstance(rows, list)


def test_macs_are_counted_per_sequence_as_for_the_batch_first_export():
    """The batch axis takes the per-sample size and ``seq`` is a dimension to size: before, ``seq`` was read as
    the batch and counting failed, asking for the size of ``batch``."""
    from onnxpress.calibration.readers import symbolic_sizes
    from onnxpress.passes.flops import count_macs, scoped_input_dims, symbolic_input_dims

    first, batch_first = gru_cumsum(), gru_cumsum(transpose=True, dims=("batch", "seq", D))
    assert symbolic_input_dims(first) == {"seq": ("x", 0)}
    feeds = [{"x": np.zeros((40, 3, D), np.float32)}]
    assert symbolic_sizes(first, feeds) == {"seq": 40}

    @scoped_input_dims
    def macs(model):
        from onnxpress.passes.flops import assume_input_dims

        assume_input_dims({"seq": 40})
        return sum(count_macs(model).values())

    assert macs(first) == macs(batch_first) > 0


def test_a_sample_axis_the_graph_does_not_tell_can_be_given(tmp_path):
    """Dimensions named L and M, no RNN: nothing to detect; ``samples_on`` / ``--sample-axis`` say it."""
    from onnxpress.calibration.readers import samples_on
    from onnxpress.cli import main
    from onnxpress.errors import ArgumentError

    r = graphs.rng(8)
    inits = {"c": np.array(0, np.int64), "one": np.ones(D, np.float32)}
    nodes = [helper.make_node("CumSum", ["X", "c"], ["s"]), helper.make_node("Mul", ["s", "one"], ["Y"])]
    model = graphs.make_model(nodes, [("X", ["L", "M", D])], [("Y", ["L", "M", D])], inits)
    assert sample_axes(model) == {}
    with samples_on({"X": 1}):
        assert sample_axes(model) == {"X": 1}
        assert [s.sample_axis for s in model_inputs(model)] == [1]
    assert sample_axes(gru_cumsum()) == {"x": 1}
    with samples_on({"x": 0}):  # 0 turns a detection off
        assert sample_axes(gru_cumsum()) == {}
    with samples_on({"Q": 1}), pytest.raises(ArgumentError, match=r"\['Q'\].*its inputs: \['X'\]"):
        sample_axes(model)
    with samples_on({"X": 3}), pytest.raises(ArgumentError, match="sample axis 3 of input 'X': it has rank 3"):
        sample_axes(model)
    with pytest.raises(ArgumentError, match="axes >= 0"), samples_on({"X": -1}):
        pass
    # a running sum over L: calibrated per sequence only when the axis is given
    feeds = [{"X": r.standard_normal((30, 1, D)).astype(np.float32)} for _ in range(4)]
    truth = max(float(np.abs(np.cumsum(f["X"], axis=0)).max()) for f in feeds)

    def amax(batch_size):
        table = onnxpress.calibrate(model, feeds, method="minmax", batch_size=batch_size, tensors=["s"])
        return max(-table.ranges["s"].min, table.ranges["s"].max)

    assert amax(64) != pytest.approx(truth, rel=1e-5)  # joined in time: 120 steps summed
    with samples_on({"X": 1}):
        assert amax(64) == pytest.approx(truth, rel=1e-5) and amax(2) == pytest.approx(truth, rel=1e-5)
    # the CLI flag, on every command
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", X=np.concatenate([f["X"] for f in feeds], axis=1))
    assert main(["calibrate", str(path), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "t.npz"),
                 "--method", "minmax", "--sample-axis", "X=1", "-q"]) == 0
    from onnxpress.calibration.table import CalibrationTable

    table = CalibrationTable.load(tmp_path / "t.npz")
    assert max(-table.ranges["s"].min, table.ranges["s"].max) == pytest.approx(truth, rel=1e-5)


def lstm_h0(dims=("T", "M")):
    """x[T, M, D], h0/c0[1, M, H] -> LSTM -> Squeeze -> s -> Mul -> y (anonymous dimensions: only the LSTM tells)."""
    r = graphs.rng(9)
    t, m = dims
    inits = {"W": (r.standard_normal((1, 4 * H, D)) * 0.5).astype(np.float32),
             "R": (r.standard_normal((1, 4 * H, H)) * 0.5).astype(np.float32),
             "one": np.array([1], np.int64), "g": np.full(H, 2.0, np.float32)}
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "", "", "h0", "c0"], ["Y"], hidden_size=H),
             helper.make_node("Squeeze", ["Y", "one"], ["s"]), helper.make_node("Mul", ["s", "g"], ["y"])]
    return graphs.make_model(nodes, [("x", [t, m, D]), ("h0", [1, m, H]), ("c0", [1, m, H])],
                             [("y", [t, m, H])], inits, opset=17)


def test_quantized_models_keep_their_sample_axes_and_validate_compares_past_the_lstm():
    """quantize's int8 LSTM is onnxruntime's DynamicQuantizeLSTM, and a QDQ model puts Q/DQ on the way: detection
    lost both (h0 then read as a fixed batch of 1), and --layers compared nothing after the contrib op."""
    model = lstm_h0()
    assert sample_axes(model) == {"x": 1, "h0": 1, "c0": 1}
    q = onnxpress.quantize(model).model  # no data: DynamicQuantizeLSTM
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in q.graph.node)
    assert sample_axes(q) == {"x": 1, "h0": 1, "c0": 1}
    r = graphs.rng(10)
    feeds = [{"x": r.standard_normal((6, 3, D)).astype(np.float32),
              "h0": r.standard_normal((1, 3, H)).astype(np.float32),
              "c0": r.standard_normal((1, 3, H)).astype(np.float32)}]
    del q.graph.value_info[:]  # as a model saved elsewhere may come: onnx's inference then stops at the contrib op
    report = onnxpress.validate(model, q, feeds, latency=False, layers=True)
    assert report.samples == 3 and report.layer_samples == 3
    assert {"Y", "s"} <= {t.name for t in report.layers}  # values after the contrib op, which onnx cannot type
    # a static QDQ model: x -> Q -> DQ -> MatMul(DQ(W)) -> ... -> GRU
    static = onnxpress.quantize(gru_cumsum(dims=("T", "B2", D)), calib=[{"x": np.ones((5, 2, D), np.float32)}]).model
    assert any(n.op_type == "DequantizeLinear" for n in static.graph.node)
    assert sample_axes(static) == {"x": 1}


def test_inputs_on_different_axes_must_hold_as_many_samples():
    from onnxpress.calibration.readers import samples_on
    from onnxpress.errors import DataError

    model = lstm_h0()
    feeds = [{"x": np.zeros((6, 3, D), np.float32), "h0": np.zeros((1, 3, H), np.float32),
              "c0": np.zeros((1, 3, H), np.float32)}]
    assert open_data(feeds, model).num_samples == 3
    with samples_on({"x": 0}), pytest.raises(DataError, match=r"different numbers of samples.*x: axis 0, h0: axis 1"):
        list(open_data(feeds, model).batches(8))


def test_the_cli_refuses_one_input_given_two_sample_axes(tmp_path, capsys):
    from onnxpress.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(gru_cumsum(), path)
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2, D), np.float32))
    assert main(["calibrate", str(path), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "t.npz"),
                 "--sample-axis", "x=1", "--sample-axis", "x=0", "-q"]) == 2
    assert "--sample-axis x is given twice, as 1 and 0" in capsys.readouterr().err


def test_the_cli_refuses_an_unknown_sample_axis_name_also_where_no_data_is_read(tmp_path, capsys):
    """cleanup and a dynamic quantize read no data, and took --sample-axis Q=1 without a word."""
    from onnxpress.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(gru_cumsum(), path)
    before = set(tmp_path.iterdir())
    for command in (["cleanup"], ["quantize"]):
        out = tmp_path / f"{command[0]}.onnx"
        assert main([*command, str(path), "-o", str(out), "--sample-axis", "Q=1", "-q"]) == 2
        assert "sample axis given for ['Q'], which the model does not take as inputs; its inputs: ['x']" in \
            capsys.readouterr().err
        assert main([*command, str(path), "-o", str(out), "--sample-axis", "x=3", "-q"]) == 2
        assert "sample axis 3 of input 'x': it has rank 3" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before  # refused before anything was written
    assert main(["cleanup", str(path), "-o", str(tmp_path / "ok.onnx"), "--sample-axis", "x=1", "-q"]) == 0


def test_an_onnxruntime_failure_on_a_batch_suggests_the_flag_where_the_axis_may_be_missed():
    from onnxpress.errors import DataError, ValidationError

    inits = {"shape": np.array([3, 1, D], np.int64)}  # a traced export's fixed Reshape
    nodes = [helper.make_node("Reshape", ["X", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["Y"])]
    feeds = [{"X": np.ones((3, 1, D), np.float32)} for _ in range(2)]
    for dims, hinted in [(["L", "M", D], True), (["batch", "seq", D], False)]:
        model = graphs.make_model(nodes, [("X", dims)], [("Y", [3, 1, D])], inits)
        with pytest.raises(DataError, match="rejected a calibration batch") as info:
            onnxpress.calibrate(model, feeds, method="minmax")
        assert ("--sample-axis X=1" in str(info.value)) == hinted
        with pytest.raises(ValidationError, match="failed to run the reference") as info:
            onnxpress.validate(model, model, feeds, latency=False)
        assert ("--sample-axis X=1" in str(info.value)) == hinted


def test_finetune_names_feeds_of_different_lengths_instead_of_numpys_error():
    """Batch-first or sequence-first, feeds of 20 and 15 steps raised numpy's concatenate ValueError."""
    pytest.importorskip("torch")
    from onnxpress.errors import DataError

    r = graphs.rng(12)
    for model, shape in [(gru_cumsum(), lambda t: (t, 3, D)),
                         (gru_cumsum(transpose=True, dims=("batch", "seq", D)), lambda t: (3, t, D))]:
        feeds = [{"x": r.standard_normal(shape(t)).astype(np.float32)} for t in (20, 15)]
        with pytest.raises(DataError, match=r"input 'x': .*differ beyond the sample axis .*pad or crop"):
            onnxpress.finetune(model, model, feeds, epochs=1)


def test_finetune_counts_labels_against_sequences_under_max_samples_and_names_a_failing_teacher():
    pytest.importorskip("torch")
    from onnxpress.errors import DataError

    r = graphs.rng(13)
    inits = {"one": np.array([0], np.int64), "w": r.standard_normal((H, 3)).astype(np.float32)}
    model = gru_cumsum()
    g = model.graph  # a classifier head on the last step: y[seq, batch, H] -> logits[batch, 3]
    g.node.extend([helper.make_node("Gather", ["y", "last"], ["h"], axis=0),
                   helper.make_node("MatMul", ["h", "w"], ["logits"])])
    g.initializer.extend([numpy_helper.from_array(np.array(-1, np.int64), "last"),
                          numpy_helper.from_array(inits["w"], "w")])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]))
    onnx.checker.check_model(model)
    x = r.standard_normal((9, 12, D)).astype(np.float32)
    labels = np.arange(12) % 3
    # 12 labels for 12 sequences; under max_samples the reader counted the view's axis 0 (9 time steps) before
    result = onnxpress.finetune(model, None, [{"x": x}], labels=labels, max_samples=8, epochs=1, val_fraction=0.25)
    assert result.history.train_samples + result.history.val_samples == 8
    broken = onnx.ModelProto()
    broken.CopyFrom(gru_cumsum())
    broken.graph.node.append(helper.make_node("Reshape", ["y", "fixed"], ["bad"]))
    broken.graph.initializer.append(numpy_helper.from_array(np.array([7, -1], np.int64), "fixed"))
    del broken.graph.output[:]
    broken.graph.output.append(helper.make_tensor_value_info("bad", TensorProto.FLOAT, [7, "rest"]))
    with pytest.raises(DataError, match=r"onnxruntime failed to run the teacher on samples 0\.\.11"):
        onnxpress.finetune(gru_cumsum(), broken, [{"x": x}], epochs=1)


# --- inputs without a sample axis -------------------------------------------------------------------------------


def waveform(dim="T") -> onnx.ModelProto:
    """x[T] -> Unsqueeze[1, 1, T] -> Conv1d(8 taps) -> ReduceMax over time -> y[1, 4]: a model for one waveform."""
    r = graphs.rng(11)
    inits = {"axes": np.array([0, 1], np.int64), "W": (r.standard_normal((4, 1, 8)) * 0.5).astype(np.float32),
             "time": np.array([2], np.int64)}
    nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["u"]), helper.make_node("Conv", ["u", "W"], ["c"]),
             helper.make_node("ReduceMax", ["c", "time"], ["y"], keepdims=0)]
    return graphs.make_model(nodes, [("x", [dim])], [("y", [1, 4])], inits, opset=18)


def test_a_rank_one_input_whose_dimension_is_no_batch_has_no_sample_axis():
    assert sample_axes(waveform()) == {"x": None}
    assert sample_axes(waveform(64)) == {"x": None}  # a fixed vector: one sample, not 64 of them
    for batch in ("batch", "N", "bs"):  # named like a batch: a batch of scalars
        assert sample_axes(waveform(batch)) == {}
    two = [("x", ["batch", 5]), ("lengths", ["batch"]), ("t", [8]), ("z", [8, 5])]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _ in two]
    model = graphs.make_model(nodes, two, [(f"{n}_out", s) for n, s in two])
    assert sample_axes(model) == {}  # lengths shares x's batch, t the fixed batch of z
    one = [("ids", ["S"]), ("mask", ["S"])]
    model = graphs.make_model([helper.make_node("Add", ["ids", "mask"], ["y"])], one, [("y", ["S"])])
    assert sample_axes(model) == {"ids": None, "mask": None}
    assert [s.sample_axis for s in model_inputs(model)] == [None, None]
    with onnxpress.samples_on({"x": 0}):  # the user says it is a batch after all
        assert sample_axes(waveform()) == {}
    image = graphs.conv_bn_relu()  # X[N, 3, 8, 8]
    name = image.graph.input[0].name
    with onnxpress.samples_on({name: None}):
        assert sample_axes(image) == {name: None}


def test_waveforms_are_fed_whole_and_counted_one_each():
    """Four waveforms of 16000 and 12000 values went in as runs of 64 values, counted as 56000 samples."""
    r = graphs.rng(12)
    feeds = [{"x": r.standard_normal(n).astype(np.float32)} for n in (16000, 12000, 16000, 12000)]
    reader = open_data(feeds, waveform())
    assert reader.num_samples == 4
    assert [b["x"].shape for b in reader.batches(64)] == [(16000,), (12000,), (16000,), (12000,)]
    assert [b["x"].shape for b in open_data(feeds, waveform(), max_samples=3).batches(64)] == [(16000,), (12000,),
                                                                                              (16000,)]
    table = onnxpress.calibrate(waveform(), feeds, method="minmax", tensors=["c"])
    assert table.meta["samples"] == 4
    sess = ort.InferenceSession(waveform().SerializeToString(), providers=["CPUExecutionProvider"])
    assert max(float(sess.run(None, f)[0].max()) for f in feeds) == pytest.approx(table.ranges["c"].max, rel=1e-6)
    assert batch_major_tensors(waveform(), ["x", "c"]) == set()  # no tensor holds samples on an axis
    assert fixed_batch_inputs(waveform()) == [("x", None)]


def test_an_npz_stacks_the_samples_of_an_input_without_a_sample_axis_on_a_new_axis(tmp_path):
    from onnxpress.errors import DataError

    x = graphs.rng(13).standard_normal((20, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    reader = open_data(tmp_path / "d.npz", waveform(64), max_samples=5)
    assert reader.total_samples == 20 and reader.num_samples == 5
    out = [b["x"] for b in reader.batches(64)]
    assert [a.shape for a in out] == [(64,)] * 5
    np.testing.assert_array_equal(np.stack(out), x[:5])
    np.savez(tmp_path / "one.npz", x=x[0])  # the input's own shape: one sample, fed as it is
    one = open_data(tmp_path / "one.npz", waveform(64))
    (only,) = list(one.batches(64))
    assert one.total_samples == 1 and only["x"].shape == (64,)
    np.testing.assert_array_equal(only["x"], x[0])
    np.savez(tmp_path / "deep.npz", x=x[None])
    with pytest.raises(DataError, match=r"'x' has no sample axis .* stacked on a new axis 0 \(rank 2\)"):
        open_data(tmp_path / "deep.npz", waveform(64))
    np.savez(tmp_path / "bad.npz", x=x[:, :32])
    with pytest.raises(DataError, match="axis 0 must be 64"):
        open_data(tmp_path / "bad.npz", waveform(64))


def test_the_cli_takes_none_for_a_model_exported_for_one_image(tmp_path):
    """x[3, 8, 8] with no batch axis: its fixed axis 0 read as 3 samples per feed; --sample-axis x=none says so."""
    from onnxpress.calibration.table import CalibrationTable
    from onnxpress.cli import main

    model = graphs.conv_bn_relu()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a batch of 1 ...
    nodes = [helper.make_node("Unsqueeze", ["img", "zero"], [model.graph.input[0].name]), *model.graph.node]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [3, 8, 8])],
                              list(model.graph.output),
                              [*model.graph.initializer, numpy_helper.from_array(np.array([0], np.int64), "zero")])
    single = helper.make_model(graph, opset_imports=list(model.opset_import))  # ... of an image fed without one
    single.ir_version = 8
    onnx.save(single, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", img=graphs.rng(14).standard_normal((10, 3, 8, 8)).astype(np.float32))
    out = str(tmp_path / "t.npz")
    with pytest.raises(onnxpress.OnnxpressError, match="rank 3"):
        onnxpress.calibrate(single, str(tmp_path / "d.npz"))  # read as samples on axis 0 of [3, 8, 8]
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "-o", out,
                 "--method", "minmax", "--sample-axis", "img=none", "-q"]) == 0
    assert CalibrationTable.load(out).meta["samples"] == 10


def test_finetune_refuses_an_input_without_a_sample_axis_by_name():
    from onnxpress.errors import UnsupportedModelError
    from onnxpress.finetune import check_dynamic_batch

    with pytest.raises(UnsupportedModelError, match=r"input 'x' has no sample axis .* dynamic_axes=\{'x'"):
        check_dynamic_batch(waveform(), "student", sequence_first=True)


def test_finetune_refuses_a_scalar_input_saying_what_to_do():
    from onnx import TensorProto, helper

    from onnxpress.errors import UnsupportedModelError
    from onnxpress.finetune import check_dynamic_batch

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "t"], ["y"])], "s",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match=r"input 't' is a scalar \(rank 0\).*make it a constant"):
        check_dynamic_batch(model, "student", sequence_first=True)
