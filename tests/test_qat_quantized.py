"""Fine-tuning a model that is already quantized: QAT in the student's own QDQ graph.

``onnxpress finetune`` takes ``onnxpress quantize``'s output or onnxruntime's QDQ output as the student: its
integer weights and scales start the QAT, so before training the module is the given model, and the
written model keeps every node and name (only values change). What QAT cannot train is refused by name.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")

import onnxpress  # noqa: E402
from onnxpress.bridge.qat import _private_bias_scales, prepare_qat  # noqa: E402
from onnxpress.cli import main  # noqa: E402
from onnxpress.errors import UnsupportedModelError  # noqa: E402
from onnxpress.prune import sqnr_db  # noqa: E402
from tests.graphs import make_model, rng, run  # noqa: E402
from tests.test_bridge_graphs import tiny_cnn  # noqa: E402


def wide_cnn(seed: int = 0, noise: float = 0.0) -> onnx.ModelProto:
    """The bridge's tiny CNN at 16 / 32 channels and 10 classes.

    Layers of 16+ channels, so that ``CompactQDQ`` stores their biases as int16 + Cast and their bias
    scales as Mul(s_x, s_w), as ``onnxpress quantize`` writes them. ``noise``: see ``tiny_cnn``.
    """
    return tiny_cnn(seed, noise, gain=1.5, widths=(16, 32), classes=10)


def ort_qdq(src, dst, feeds: list[dict], fmt: str = "QDQ") -> None:
    """onnxruntime's ``quantize_static`` with its defaults (one feed per call), in ``fmt`` (QDQ or QOperator)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat[fmt])


def data(n: int, seed: int) -> np.ndarray:
    return rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """teacher.onnx (float), ours.onnx (onnxpress quantize, compact storage), ort.onnx (onnxruntime QDQ of a
    perturbed copy: a compressed, quantized student), d.npz."""
    d = tmp_path_factory.mktemp("qat_quantized")
    paths = {k: d / f"{k}.onnx" for k in ("teacher", "ours", "ort")}
    onnx.save(wide_cnn(), str(paths["teacher"]))
    x = data(256, seed=1)
    paths["data"] = d / "d.npz"
    np.savez(paths["data"], input=x)
    onnxpress.quantize(paths["teacher"], paths["ours"], calib=str(paths["data"]), progress=False)


    # onnxruntime's defaults (int8 activations, per-tensor weights) on a perturbed copy of the teacher
    perturbed = d / "perturbed.onnx"
    onnx.save(wide_cnn(noise=0.3), str(perturbed))
    ort_qdq(perturbed, paths["ort"], [{"input": x[i : i + 1]} for i in range(64)])
    return paths


def _structure(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def _initializers(model: onnx.ModelProto) -> dict[str, tuple[str, bytes]]:
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {name: (a.dtype.str, a.tobytes()) for name, a in arrays.items()}


def test_onnxpress_output_is_stored_compactly(files):
    """The premise of the tests below: biases int16 behind Cast, bias scales as Mul of the two scales."""
    ops = collections.Counter(n.op_type for n in onnx.load(str(files["ours"])).graph.node)
    assert ops["Cast"] >= 2 and ops["Mul"] >= 2, ops


def test_untrained_round_trip_writes_the_student_back_unchanged(files):
    """No epoch: the written model is the student, value for value and node for node."""
    student = onnx.load(str(files["ours"]))
    res = onnxpress.finetune(files["ours"], files["teacher"], str(files["data"]), epochs=0, threads=1)
    assert _structure(res.model) == _structure(student)
    assert _initializers(res.model) == _initializers(student)
    assert res.metrics["sqnr_db_before"] == res.metrics["sqnr_db_after"]
    assert res.mode == "qat in its own graph"


def test_module_starts_as_the_quantized_student(files):
    """Before training the QAT module computes the given QDQ model (onnxruntime, no optimisations)."""
    import torch

    x = data(32, seed=5)
    for key in ("ours", "ort"):
        student = onnx.load(str(files[key]))
        plan = prepare_qat(student, {"input": x})
        with torch.no_grad():
            got = plan.module(torch.from_numpy(x)).numpy()
        want = run(student, {"input": x})[0]
        assert sqnr_db(want, got) > 50, key  # equal up to a rare one-step rounding flip between the two runtimes
        assert len(plan.weights) == 3 and len(plan.biases) == 3, key


def test_qat_pulls_an_onnxruntime_qdq_student_to_its_teacher_in_place(files, tmp_path):
    """A perturbed model quantized by onnxruntime gets closer to the float teacher; nothing but values move."""
    student = onnx.load(str(files["ort"]))
    out = tmp_path / "tuned.onnx"
    res = onnxpress.finetune(files["ort"], files["teacher"], str(files["data"]), out, epochs=8, lr=1e-3,
                             distill="mse", batch_size=32, threads=1)  # fmt: skip
    tuned = onnx.load(str(out))
    onnx.checker.check_model(tuned, full_check=True)
    assert _structure(tuned) == _structure(student)
    held_out = data(200, seed=11)
    teacher = run(onnx.load(str(files["teacher"])), {"input": held_out})[0]
    before = sqnr_db(teacher, run(student, {"input": held_out})[0])
    after = sqnr_db(teacher, run(tuned, {"input": held_out})[0])
    assert after > before + 1.0, (before, after)
    assert res.history.best_epoch > 0


def test_bias_learned_past_int16_is_widened_not_wrapped(files):
    """A bias stored as int16 + Cast whose learned value needs more bits is written as int32."""
    import torch

    student = onnx.load(str(files["ours"]))
    x = data(16, seed=3)
    plan = prepare_qat(student, {"input": x})
    stored = {i.name: numpy_helper.to_array(i) for i in student.graph.initializer}
    bias = next(b for b in plan.biases if stored[b.q_name].dtype == np.int16)
    with torch.no_grad():
        param = plan.module.initializer(bias.float_name)
        param.mul_(1000.0)  # far past what int16 holds at this scale
        want = plan.module(torch.from_numpy(x)).numpy()
    out = plan.export()
    written = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}[bias.q_name]
    assert written.dtype == np.int32 and np.abs(written).max() > np.iinfo(np.int16).max
    onnx.checker.check_model(out, full_check=True)
    assert sqnr_db(want, run(out, {"input": x})[0]) > 40


def test_shared_bias_scales_come_apart():
    """Two int32 biases reading one scale constant get one scale each (QAT learns s_x * s_w per bias)."""
    q = np.arange(4, dtype=np.int32)
    inits = [numpy_helper.from_array(q, "b0"), numpy_helper.from_array(q + 1, "b1"),
             numpy_helper.from_array(np.float32(0.5), "s")]  # fmt: skip
    nodes = [helper.make_node("DequantizeLinear", ["b0", "s"], ["y0"]),
             helper.make_node("DequantizeLinear", ["b1", "s"], ["y1"]),
             helper.make_node("Add", ["y0", "y1"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = _private_bias_scales(model)
    scales = [n.input[1] for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(set(scales)) == 2
    np.testing.assert_array_equal(run(out, {})[0], run(model, {})[0])
    assert [n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"] == ["s", "s"]  # input untouched


def test_what_qat_cannot_train_is_refused_by_name(files, tmp_path):
    x = data(16, seed=2)
    qop = tmp_path / "qop.onnx"  # onnxruntime's operator format: integer kernels, nothing to fake-quantize
    ort_qdq(files["teacher"], qop, [{"input": x[i : i + 1]} for i in range(len(x))], fmt="QOperator")
    with pytest.raises(UnsupportedModelError, match="QLinearConv"):
        onnxpress.finetune(qop, files["teacher"], str(files["data"]), epochs=1)

    w = numpy_helper.from_array(np.zeros((8, 4), np.int8).reshape(8, 4), "w_q")  # 4 blocks of 2 along axis 0
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s"], ["w"], axis=0, block_size=2),
             helper.make_node("MatMul", ["x", "w"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [w, numpy_helper.from_array(np.ones((4, 4), np.float32), "s")])  # fmt: skip
    blockwise = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(UnsupportedModelError, match="blockwise"):
        prepare_qat(blockwise, {"x": np.ones((2, 8), np.float32)})

    from onnxpress.calibration.table import CalibrationTable

    table = CalibrationTable.from_ranges({"input": (-1.0, 1.0)})
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        onnxpress.finetune(files["ours"], files["teacher"], str(files["data"]), epochs=1, qat=True, calibration=table)


def test_cli_fine_tunes_a_quantized_model(files, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    code = main(["finetune", str(files["ours"]), "--teacher", str(files["teacher"]), "--data", str(files["data"]),
                 "-o", str(out), "--epochs", "1", "--threads", "1", "-q"])  # fmt: skip
    assert code == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "qat in its own graph" in printed and "wrote" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.onnx"]


def test_a_quantized_scalar_stays_a_constant(tmp_path):
    """onnxruntime quantizes a Mul's scalar constant (attention's 1/sqrt(d)) like a weight: it is kept, not trained."""
    r = rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "c"], ["m"]),
             helper.make_node("MatMul", ["m", "w2"], ["y"])]  # fmt: skip
    weights = {"w": r.standard_normal((8, 16)).astype(np.float32), "c": np.float32(0.17),
               "w2": r.standard_normal((16, 4)).astype(np.float32)}  # fmt: skip
    teacher = make_model(nodes, [("x", ["n", 8])], [("y", ["n", 4])], weights, opset=17)
    src, student = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(teacher, str(src))
    x = r.standard_normal((64, 8)).astype(np.float32)
    ort_qdq(src, student, [{"x": x[i : i + 1]} for i in range(16)])
    inits = onnx.load(str(student)).graph.initializer
    scalars = [i.name for i in inits if not i.dims and i.data_type == TensorProto.INT8]
    assert any(name.startswith("c") for name in scalars), scalars  # the premise: the scalar was quantized
    res = onnxpress.finetune(student, src, {"x": x}, epochs=1, threads=1)
    assert _structure(res.model) == _structure(onnx.load(str(student)))


def test_float16_stored_gru_weights_are_kept_while_the_rest_trains(tmp_path):
    """``onnxpress quantize`` stores GRU weights as float16 + Cast (no integer kernel): QAT keeps them as they are."""
    r = rng(6)
    steps, features, hidden = 5, 32, 32  # W and R of 3072 values: above the storage threshold
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),  # [N, T, F] -> [T, N, F]
             helper.make_node("GRU", ["xt", "W", "R"], ["y"], hidden_size=hidden),
             helper.make_node("Squeeze", ["y", "axis1"], ["ys"]),
             helper.make_node("Transpose", ["ys"], ["h"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]  # fmt: skip
    weights = {"W": (r.standard_normal((1, 3 * hidden, features)) * 0.3).astype(np.float32),
               "R": (r.standard_normal((1, 3 * hidden, hidden)) * 0.3).astype(np.float32),
               "axis1": np.array([1], np.int64),
               "head": (r.standard_normal((hidden, 24)) * 0.5).astype(np.float32)}  # fmt: skip
    teacher = make_model(nodes, [("x", ["n", steps, features])], [("logits", ["n", steps, 24])], weights, opset=17)
    src, student = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(teacher, str(src))
    feeds = {"x": r.standard_normal((48, steps, features)).astype(np.float32)}
    onnxpress.quantize(src, student, calib=[feeds], progress=False)
    quantized = onnx.load(str(student))
    assert any(i.data_type == TensorProto.FLOAT16 for i in quantized.graph.initializer)  # the premise
    res = onnxpress.finetune(student, src, feeds, epochs=1, batch_size=8, threads=1)
    assert _structure(res.model) == _structure(quantized)
    narrow = {i.name: i.raw_data for i in quantized.graph.initializer if i.data_type == TensorProto.FLOAT16}
    assert {i.name: i.raw_data for i in res.model.graph.initializer if i.name in narrow} == narrow


def test_default_learning_rate_is_smaller_for_qat(files, monkeypatch):
    """A quantized student starts near its teacher: QAT's default lr is 1e-4, a float fine-tune's 1e-3."""
    from onnxpress.bridge import train
    from onnxpress.finetune import FLOAT_LR, QAT_LR

    seen = []
    config = train.FinetuneConfig

    def spy(**kw):
        seen.append(kw["lr"])
        return config(**kw)

    monkeypatch.setattr(train, "FinetuneConfig", spy)
    onnxpress.finetune(files["ours"], files["teacher"], str(files["data"]), epochs=0, threads=1)
    onnxpress.finetune(files["teacher"], files["teacher"], str(files["data"]), epochs=0, threads=1,
                       exporter="writeback")  # fmt: skip
    onnxpress.finetune(files["ours"], files["teacher"], str(files["data"]), epochs=0, threads=1, lr=3e-3)
    assert seen == [QAT_LR, FLOAT_LR, 3e-3]
    assert QAT_LR < FLOAT_LR


def test_qat_of_a_float_model_starts_from_what_quantize_ships(files):
    """``--qat`` on a float student: ``onnxpress quantize`` first, then that graph trains; untrained, it is that."""
    x = np.load(files["data"])["input"]
    shipped = onnxpress.quantize(files["teacher"], calib=[{"input": x}], progress=False).model
    res = onnxpress.finetune(files["teacher"], files["teacher"], str(files["data"]), epochs=0, qat=True, threads=1)
    assert res.mode == "qat"
    assert _structure(res.model) == _structure(shipped)
    assert _initializers(res.model) == _initializers(shipped)


def _recurrent_classifier(op: str, hidden: int = 32, features: int = 32, steps: int = 5) -> onnx.ModelProto:
    """x[N, T, F] -> Transpose -> LSTM/GRU -> Squeeze -> Transpose -> MatMul -> logits[N, T, 24]."""
    r = rng(6)
    gates = 4 if op == "LSTM" else 3
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),  # [N, T, F] -> [T, N, F]
             helper.make_node(op, ["xt", "W", "R"], ["y"], hidden_size=hidden),
             helper.make_node("Squeeze", ["y", "axis1"], ["ys"]),
             helper.make_node("Transpose", ["ys"], ["h"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]  # fmt: skip
    weights = {"W": (r.standard_normal((1, gates * hidden, features)) * 0.3).astype(np.float32),
               "R": (r.standard_normal((1, gates * hidden, hidden)) * 0.3).astype(np.float32),
               "axis1": np.array([1], np.int64),
               "head": (r.standard_normal((hidden, 24)) * 0.5).astype(np.float32)}  # fmt: skip
    return make_model(nodes, [("x", ["n", steps, features])], [("logits", ["n", steps, 24])], weights, opset=17)


def test_qat_of_a_float_lstm_model_keeps_the_lstm_float(tmp_path):
    """quantize makes an LSTM onnxruntime's DynamicQuantizeLSTM, which QAT cannot train: ``--qat`` keeps it float."""
    teacher = _recurrent_classifier("LSTM")
    src = tmp_path / "float.onnx"
    onnx.save(teacher, str(src))
    feeds = {"x": rng(2).standard_normal((48, 5, 32)).astype(np.float32)}
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnxpress.quantize(src, calib=[feeds]).model.graph.node}
    res = onnxpress.finetune(src, src, feeds, epochs=1, batch_size=8, qat=True, threads=1)
    ops = collections.Counter(n.op_type for n in res.model.graph.node)
    assert res.mode == "qat" and ops["LSTM"] == 1 and ops["DequantizeLinear"] >= 1, ops


def test_float_weights_behind_quantizelinear_train(tmp_path):
    """onnxruntime quantizes weights held in Constant nodes like activations (Q -> DQ of a float constant): those
    float weights train behind their fake-quant, and the model keeps its structure."""
    teacher = wide_cnn()
    g = teacher.graph
    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in g.initializer]
    del g.initializer[:]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    src, student = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(teacher, str(src))
    x = data(64, seed=1)
    ort_qdq(src, student, [{"input": x[i : i + 1]} for i in range(16)])
    before = onnx.load(str(student))
    assert not any(i.data_type == TensorProto.INT8 and len(i.dims) == 4 for i in before.graph.initializer)  # premise
    res = onnxpress.finetune(student, src, {"input": x}, epochs=2, lr=1e-3, val_fraction=0.0, threads=1)
    assert res.mode == "qat in its own graph"
    ops = lambda m: [n.op_type for n in m.graph.node if n.op_type != "Constant"]  # noqa: E731
    assert ops(res.model) == ops(before)  # the Constant nodes became initializers (as quantize does), nothing else
    held = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in before.graph.node if n.op_type == "Constant"}
    trained = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer if i.name in held}
    assert trained.keys() == held.keys()
    assert any(not np.array_equal(trained[k], held[k]) for k in ("c1.weight", "c2.weight", "fc.weight"))


def test_codebook_weights_fine_tune_in_their_storage(tmp_path, files):
    """A codebook model rebuilds its weights from 4-bit indices (BitShift, GatherElements): its levels fine-tune and
    are written back into the same graph, not re-exported as float weights (6.8x the file on the ResNet)."""
    from onnxpress.finetune import stored_weights

    student = tmp_path / "cb.onnx"
    onnxpress.quantize(files["teacher"], student, codebook=4, progress=False)
    model = onnx.load(str(student))
    assert "BitShift" in {n.op_type for n in model.graph.node} and stored_weights(model)
    assert not stored_weights(onnx.load(str(files["teacher"])))
    res = onnxpress.finetune(student, files["teacher"], str(files["data"]), epochs=2, lr=1e-3, val_fraction=0.0,
                             threads=1)  # fmt: skip
    assert res.mode == "float" and res.export_max_diff <= 1e-4
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in model.graph.node]
    assert res.model.ByteSize() <= model.ByteSize() * 1.01


def _mlp(k: int = 96, hidden: int = 64, classes: int = 10, noise: float = 0.0) -> onnx.ModelProto:
    """x[N, k] -> MatMul -> Relu -> MatMul -> logits: the first weight for int4 (K = 96 pads a 64-block).

    ``noise`` perturbs every weight by ``noise·std(W)`` (a compressed student).
    """
    r = rng(8)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"])]  # fmt: skip
    weights = {"w1": (r.standard_normal((k, hidden)) * 0.2).astype(np.float32),
               "w2": (r.standard_normal((hidden, classes)) * 0.3).astype(np.float32)}  # fmt: skip
    if noise:
        pr = rng(108)
        weights = {n: (w + noise * w.std() * pr.standard_normal(w.shape)).astype(np.float32)
                   for n, w in weights.items()}
    return make_model(nodes, [("x", ["n", k])], [("logits", ["n", classes])], weights, opset=17)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_int4_matmulnbits_student_round_trips_and_trains(tmp_path, method):
    """``onnxpress quantize --weights int4`` (MatMulNBits, signed block scales, a padded last block) of a perturbed
    copy of the teacher: the QAT module is the student, an untrained export writes it back byte for byte, and a
    few epochs bring it closer to the float teacher on held-out inputs."""
    import torch

    teacher = _mlp()
    x = rng(1).standard_normal((256, 96)).astype(np.float32)
    student = onnxpress.quantize(_mlp(noise=0.3), calib=[{"x": x}], weights="int4", int4_method=method,
                                 progress=False).model  # fmt: skip
    packed = collections.Counter(n.op_type for n in student.graph.node)["MatMulNBits"]
    assert packed >= 1  # the premise (the small second weight may stay float)
    plan = prepare_qat(student, {"x": x})
    assert len(plan.packed) == packed
    # trained: the twins' float weights and scales and the student's own float weights, never the code bounds
    student_floats = {i.name for i in student.graph.initializer if i.data_type == TensorProto.FLOAT}
    twins = {n for p in plan.packed for n in (p.float_name, p.scale)}
    twins |= {n for w in plan.weights for n in (w.float_name, w.scale)} | {b.float_name for b in plan.biases}
    assert {name for name, _ in plan.module.named_onnx_parameters()} <= twins | set(plan.ties) | student_floats
    with torch.no_grad():
        got = plan.module(torch.from_numpy(x[:32])).numpy()
    np.testing.assert_allclose(got, run(student, {"x": x[:32]})[0], atol=1e-4, rtol=0)
    assert _initializers(plan.export()) == _initializers(student)
    src = tmp_path / "float.onnx"
    onnx.save(teacher, str(src))
    res = onnxpress.finetune(student, src, {"x": x}, epochs=30, lr=3e-3, distill="mse", batch_size=32, threads=1)
    assert res.mode == "qat in its own graph" and _structure(res.model) == _structure(student)
    held_out = rng(5).standard_normal((256, 96)).astype(np.float32)
    want = run(teacher, {"x": held_out})[0]
    before, after = (sqnr_db(want, run(m, {"x": held_out})[0]) for m in (student, res.model))
    assert after > before + 2.0, (before, after)  # a float fine-tune of the float student: 7.6 -> 12.6 dB


def test_int4_with_zero_points_round_trips():
    """onnxruntime's asymmetric layout: uint4 codes with packed uint8 zero points, and a bias input."""
    import torch

    from onnxpress.passes.weight_only import _pack, _pack_zero_points, quantize_blocks_asym

    r = rng(3)
    w = (r.standard_normal((64, 24)) + 0.5).astype(np.float32)  # [K, N], off-centre: the zero points matter
    q, scale, zero = quantize_blocks_asym(w, 32)
    b, scales = _pack(q, scale, 32)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S"),
             numpy_helper.from_array(_pack_zero_points(zero), "Z"),
             numpy_helper.from_array(r.standard_normal(24).astype(np.float32), "bias")]  # fmt: skip
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z", "", "bias"], ["y"], domain="com.microsoft",
                            K=64, N=24, bits=4, block_size=32)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])], inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    x = r.standard_normal((8, 64)).astype(np.float32)
    plan = prepare_qat(model, {"x": x})
    with torch.no_grad():
        got = plan.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run(model, {"x": x})[0], atol=1e-4, rtol=0)
    assert _initializers(plan.export()) == _initializers(model)
    with_g_idx = onnx.ModelProto()
    with_g_idx.CopyFrom(model)
    with_g_idx.graph.node[0].input[4] = "g"
    with_g_idx.graph.initializer.append(numpy_helper.from_array(np.zeros(64, np.int32), "g"))
    with pytest.raises(UnsupportedModelError, match="g_idx"):
        prepare_qat(with_g_idx, {"x": x})


def _tied_lm(noise: float = 0.0) -> onnx.ModelProto:
    """ids[N, 8] -> Gather(table[256, 64]) -> MatMul(64x64) -> Relu -> MatMul(Transpose(table)) -> logits (tied)."""
    r = rng(3)
    table = (r.standard_normal((256, 64)) * 0.5).astype(np.float32)
    w1 = (r.standard_normal((64, 64)) * 0.2).astype(np.float32)
    if noise:
        pr = rng(103)
        table = (table + noise * table.std() * pr.standard_normal(table.shape)).astype(np.float32)
        w1 = (w1 + noise * w1.std() * pr.standard_normal(w1.shape)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
             helper.make_node("MatMul", ["r", "tt"], ["logits"])]  # fmt: skip
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 8, 256])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w1, "w1")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_tied_int4_token_table_trains_as_one_weight(tmp_path):
    """``quantize --weights int4`` ties the token table to the 4-bit output layer (GatherBlockQuantized reads the
    head's packed weight): QAT gathers rows of the head's trained weight, so the two stay one; the untrained export
    is byte-identical and training pulls a perturbed student toward its teacher on held-out tokens."""
    import torch

    ids = rng(0).integers(0, 256, (256, 8)).astype(np.int64)
    student = onnxpress.quantize(_tied_lm(noise=0.3), calib=[{"ids": ids}], weights="int4", progress=False).model
    ops = collections.Counter(n.op_type for n in student.graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 2  # the premise: a tied 4-bit table
    plan = prepare_qat(student, {"ids": ids[:16]})
    with torch.no_grad():
        got = plan.module(torch.from_numpy(ids[:16])).numpy()
    np.testing.assert_allclose(got, run(student, {"ids": ids[:16]})[0], atol=1e-4, rtol=0)
    assert _initializers(plan.export()) == _initializers(student)
    teacher = tmp_path / "lm.onnx"
    onnx.save(_tied_lm(), str(teacher))
    res = onnxpress.finetune(student, teacher, {"ids": ids}, epochs=20, lr=3e-3, distill="mse", batch_size=32,
                             threads=1)  # fmt: skip
    assert _structure(res.model) == _structure(student)
    held_out = rng(9).integers(0, 256, (64, 8)).astype(np.int64)
    want = run(_tied_lm(), {"ids": held_out})[0]
    before, after = (sqnr_db(want, run(m, {"ids": held_out})[0]) for m in (student, res.model))
    assert after > before + 1.0, (before, after)


def test_an_untied_4bit_table_is_refused():
    """A GatherBlockQuantized that does not read a MatMulNBits weight has no trainable twin here."""
    ids = rng(0).integers(0, 256, (64, 8)).astype(np.int64)
    student = onnxpress.quantize(_tied_lm(), calib=[{"ids": ids}], weights="int4", progress=False).model
    for node in student.graph.node:
        if node.op_type == "GatherBlockQuantized":
            node.input[2] = "w1_scales"  # another layer's scales: no longer the head's weight
    with pytest.raises(UnsupportedModelError, match="table of its own"):
        prepare_qat(student, {"ids": ids})


def test_qat_metrics_are_those_of_the_files_on_onnxruntime():
    """The fake-quant module follows onnxruntime with optimisations off; with them on (how the file runs), an int4
    student's DequantizeLinear + MatMul run fused and read otherwise (a small attention model: the module's 47.55 dB
    was 45.07 in the written file). finetune's before / after are now the student's and the written model's own."""
    from onnxpress.runtime import make_session

    x = rng(3).standard_normal((256, 96)).astype(np.float32)
    teacher = _mlp()
    student = onnxpress.quantize(_mlp(noise=0.3), calib=[{"x": x}], weights="int4", int4_method="rtn",
                                 progress=False).model  # fmt: skip
    res = onnxpress.finetune(student, teacher, {"x": x}, epochs=1, threads=1)
    want = make_session(teacher).run(None, {"x": x})[0]
    for key, model in (("sqnr_db_before", student), ("sqnr_db_after", res.model)):
        assert res.metrics[key] == pytest.approx(sqnr_db(want, make_session(model).run(None, {"x": x})[0]), abs=1e-9)
