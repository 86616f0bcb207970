"""onnxpress.finetune and ``onnxpress finetune``: end to end on a tiny CNN (the kd_files fixture of conftest.py)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

import onnxpress  # noqa: E402
from onnxpress.cli import main  # noqa: E402
from onnxpress.errors import DataError, ModelLoadError, OnnxpressError  # noqa: E402
from tests.graphs import run  # noqa: E402
from tests.test_bridge_graphs import tiny_cnn, tiny_data  # noqa: E402


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_api_recovers_teacher_and_writes_a_valid_model(kd_files, tmp_path):
    before = {k: _digest(v) for k, v in kd_files.items()}
    out = tmp_path / "out.onnx"
    res = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), out,
                             labels=str(kd_files["data"]), epochs=6, lr=3e-3, batch_size=16, threads=1,
                             seed=0)  # fmt: skip
    assert {k: _digest(v) for k, v in kd_files.items()} == before  # inputs untouched
    assert res.output == out and out.exists() and res.mode == "float"
    assert res.export_max_diff <= 1e-4
    m = res.metrics
    assert m["sqnr_db_after"] > m["sqnr_db_before"] + 1.0
    assert m["accuracy_after"] >= m["accuracy_before"]
    assert m["teacher_accuracy"] == 1.0
    # the written model on onnxruntime is closer to the teacher than the student was
    x = tiny_data(40, seed=9)
    t = run(onnx.load(str(kd_files["teacher"])), {"input": x})[0]
    err = lambda z: float(np.mean((z - t) ** 2))  # noqa: E731
    student = onnx.load(str(kd_files["student"]))
    assert err(run(onnx.load(str(out)), {"input": x})[0]) < err(run(student, {"input": x})[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.onnx", "teacher.onnx", "student.onnx", "d.npz"])


def test_finetune_qat_writes_qdq_model(kd_files, tmp_path):
    out = tmp_path / "qat.onnx"
    res = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), out, epochs=2, lr=1e-3,
                             batch_size=16, threads=1, qat=True, val_fraction=0.0)  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert res.export_max_diff <= 1e-4
    assert res.mode == "qat"


def test_finetune_errors(kd_files, tmp_path):
    with pytest.raises(DataError, match="nothing to learn"):
        onnxpress.finetune(kd_files["student"], None, str(kd_files["data"]), epochs=1)
    with pytest.raises(ModelLoadError):
        onnxpress.finetune(tmp_path / "missing.onnx", kd_files["teacher"], str(kd_files["data"]), epochs=1)
    with pytest.raises(DataError):
        onnxpress.finetune(kd_files["student"], kd_files["teacher"], {"wrong": tiny_data(4)}, epochs=1)


def test_labels_outside_the_classes_and_a_teacher_with_other_inputs_are_refused(kd_files, tmp_path, capsys):
    """Both ended in a torch / onnxruntime traceback (exit 1); now one line that names the problem, exit 2."""
    classes = run(onnx.load(str(kd_files["teacher"])), {"input": tiny_data(1)})[0].shape[1]
    student, teacher, data = (str(kd_files[k]) for k in ("student", "teacher", "data"))
    labels = np.zeros(96, np.int64)
    labels[5] = classes
    with pytest.raises(DataError, match=rf"label {classes} \(sample 5\) is not a class of this model: .* "
                                        rf"labels run 0..{classes - 1}"):
        onnxpress.finetune(student, teacher, data, labels=labels, epochs=1)
    labels[5] = -1
    with pytest.raises(DataError, match=r"label -1 is negative \(sample 5\)"):
        onnxpress.finetune(student, teacher, data, labels=labels, epochs=1)
    other = onnx.load(str(kd_files["teacher"]))
    other.graph.input[0].name = "image"
    for n in other.graph.node:
        n.input[:] = ["image" if i == "input" else i for i in n.input]
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(DataError, match=r"the teacher's inputs \['image'\] differ from the student's \['input'\]"):
        onnxpress.finetune(student, str(tmp_path / "other.onnx"), data, epochs=1)
    assert main(["finetune", student, "--teacher", str(tmp_path / "other.onnx"), "--data", data, "-o",
                 str(tmp_path / "x.onnx"), "-q"]) == 2  # fmt: skip
    assert "differ from the student's" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_finetune(kd_files, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    rc = main(["finetune", str(kd_files["student"]), "--teacher", str(kd_files["teacher"]), "--data",
               str(kd_files["data"]), "--labels", str(kd_files["data"]), "-o", str(out), "--epochs", "2",
               "--threads", "1", "--augment-shift", "1", "-q"])  # fmt: skip
    assert rc == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "sqnr_db_after" in printed and "wrote" in printed
    rc = main(["finetune", str(kd_files["student"]), "--teacher", str(tmp_path / "nope.onnx"), "--data",
               str(kd_files["data"]), "-o", str(tmp_path / "x.onnx")])  # fmt: skip
    assert rc == 2
    assert "onnxpress: error:" in capsys.readouterr().err


def test_finetune_writeback_keeps_the_student_graph(kd_files):
    """exporter="writeback": same nodes and names as the student, new weights, equal to the module."""
    student = onnx.load(str(kd_files["student"]))
    res = onnxpress.finetune(student, kd_files["teacher"], str(kd_files["data"]), epochs=2, lr=3e-3, batch_size=16,
                             threads=1, exporter="writeback")  # fmt: skip
    assert [(n.op_type, n.name, list(n.input)) for n in res.model.graph.node] == [
        (n.op_type, n.name, list(n.input)) for n in student.graph.node
    ]
    assert res.export_max_diff <= 1e-4
    assert res.metrics["sqnr_db_after"] > res.metrics["sqnr_db_before"]


def test_finetune_augment_shift_is_deterministic_and_used(kd_files):
    """augment_shift trains on shifted copies: same seed -> same weights; shift 0 vs 1 -> different weights."""

    def weights(shift):
        res = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), epochs=1, lr=3e-3,
                                 batch_size=16, threads=1, exporter="writeback", augment_shift=shift)  # fmt: skip
        assert res.export_max_diff <= 1e-4
        return {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}

    a, b, plain = weights(1), weights(1), weights(0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], plain[k]) for k in a)


@pytest.mark.parametrize("flag, value", [("--augment-shift", "-1"), ("--lr", "0"), ("--val-fraction", "0.7"),
                                         ("--epochs", "-2"), ("--batch-size", "0")])  # fmt: skip
def test_cli_finetune_rejects_out_of_range_numbers(kd_files, tmp_path, capsys, flag, value):
    """A bad number is an argparse error (exit 2, names the flag), never a traceback from the config."""
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", str(kd_files["student"]), "--data", str(kd_files["data"]), "-o", str(tmp_path / "x.onnx"),
              flag, value])  # fmt: skip
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def _token_model(seed: int, noise: float = 0.0, per_token: bool = False) -> onnx.ModelProto:
    """ids [N, 6] int64 -> Gather(E [50, 8]) -> ReduceMean over tokens -> Gemm -> logits [N, 5].

    ``per_token``: Gather -> MatMul -> logits [N, 6, 50] (a language model's next-token scores).
    """
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(seed)
    e = r.standard_normal((50, 8)).astype(np.float32)
    w = r.standard_normal((8, 50 if per_token else 5)).astype(np.float32)
    e, w = e + noise * r.standard_normal(e.shape).astype(np.float32), w + noise * r.standard_normal(w.shape).astype(
        np.float32)  # fmt: skip
    if per_token:
        nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["logits"])]
        out_shape = ["N", 6, 50]
    else:
        nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]),
                 helper.make_node("ReduceMean", ["h", "axes"], ["m"], keepdims=0),
                 helper.make_node("MatMul", ["m", "W"], ["logits"])]  # fmt: skip
        out_shape = ["N", 5]
    inits = [numpy_helper.from_array(e, "E"), numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]  # fmt: skip
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)  # older runtimes load it


@pytest.mark.parametrize("exporter", ["writeback", "dynamo"])
def test_finetune_takes_token_ids(exporter):
    """A token model (int64 ids into an embedding): distillation brings the student's softmax to the teacher's."""
    ids = np.random.default_rng(3).integers(0, 50, (128, 6)).astype(np.int64)
    res = onnxpress.finetune(_token_model(0, noise=0.5), _token_model(0), {"ids": ids}, epochs=8, lr=3e-2,
                             batch_size=32, threads=1, exporter=exporter)  # fmt: skip
    m = res.metrics
    assert res.export_max_diff <= 1e-4
    assert m["kl_after"] < 0.25 * m["kl_before"]  # 0.168 -> 0.013 nats when written
    assert m["agreement_after"] > 0.5
    assert [i.type.tensor_type.elem_type for i in res.model.graph.input] == [onnx.TensorProto.INT64]


def test_finetune_token_data_errors():
    ids = np.random.default_rng(3).integers(0, 50, (32, 6))
    with pytest.raises(DataError, match="'ids' is float64 but the model takes int64"):
        onnxpress.finetune(_token_model(0, 0.5), _token_model(0), {"ids": ids.astype(np.float64)}, epochs=1)
    with pytest.raises(DataError, match="'input' is int64 but the model takes float"):
        onnxpress.finetune(tiny_cnn(noise=0.5), tiny_cnn(), {"input": np.zeros((8, 1, 8, 8), np.int64)}, epochs=1)
    lm = _token_model(0, 0.5, per_token=True)
    with pytest.raises(DataError, match="fine-tune it without labels"):
        onnxpress.finetune(lm, _token_model(0, per_token=True), {"ids": ids}, labels=np.zeros(32, np.int64), epochs=1)


def test_kl_nats():
    from onnxpress.finetune import kl_nats

    z = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert kl_nats(z, z) == pytest.approx(0.0, abs=1e-12)
    p = np.exp(2) / (np.exp(2) + 1)  # KL(softmax([2, 0]) || [1/2, 1/2]) = p log 2p + (1-p) log 2(1-p)
    want = 0.5 * (p * np.log(2 * p) + (1 - p) * np.log(2 * (1 - p)))
    assert kl_nats(z, np.zeros((2, 2))) == pytest.approx(want, rel=1e-12)


def test_finetune_of_the_lstm_reference_model_keeps_its_lstm():
    """exporter="auto" writes an LSTM student back into its own graph (torch.onnx would unroll it)."""
    from pathlib import Path

    teacher = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "lstm.onnx"))
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    w = next(i for i in student.graph.initializer if i.name == "lstm.weight_ih_l0")  # sliced into the LSTM's W
    r = np.random.default_rng(0)
    arr = onnx.numpy_helper.to_array(w)
    w.CopyFrom(onnx.numpy_helper.from_array(arr + 0.3 * r.standard_normal(arr.shape).astype(np.float32), w.name))
    x = np.load(Path(__file__).resolve().parents[1] / "models" / "digits32.npz")["calib_input"][:96]
    res = onnxpress.finetune(student, teacher, {"input": x}, epochs=3, lr=3e-3, batch_size=16, threads=1)
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in student.graph.node]
    assert res.export_max_diff <= 1e-4
    assert res.metrics["kl_after"] < res.metrics["kl_before"]


def test_finetune_refuses_students_it_cannot_train():
    """No trainable weights, or an output that is an index (ArgMax): one clear error each, not a torch crash."""
    from onnx import helper

    from onnxpress.errors import UnsupportedModelError
    from tests.graphs import make_model

    x = {"input": tiny_data(8)}
    no_weights = make_model([helper.make_node("Relu", ["input"], ["y"])], [("input", ["N", 1, 8, 8])],
                            [("y", ["N", 1, 8, 8])])  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="no trainable float weights"):
        onnxpress.finetune(no_weights, no_weights, x, epochs=1)
    index = tiny_cnn()
    logits = index.graph.output[0].name
    index.graph.node.extend([helper.make_node("ArgMax", [logits], ["cls"], axis=1),
                             helper.make_node("Cast", ["cls"], ["clsf"], to=onnx.TensorProto.FLOAT)])  # fmt: skip
    index.graph.output.pop()
    index.graph.output.append(helper.make_tensor_value_info("clsf", onnx.TensorProto.FLOAT, ["N", 1]))
    with pytest.raises(UnsupportedModelError, match="does not depend on its weights through differentiable ops"):
        onnxpress.finetune(index, index, x, epochs=1)


def test_a_fixed_batch_is_refused_with_the_export_fix(tmp_path):
    """A model exported with batch 1 and no dynamic axis failed in onnxruntime's teacher run ("Got: 64 Expected:
    1"); finetune and optimize --finetune now name the input and the re-export that fixes it."""
    from onnxpress.errors import UnsupportedModelError

    fixed = tiny_cnn()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    x = {"input": tiny_data(8)}
    for student, teacher in ((fixed, None), (tiny_cnn(), fixed)):
        with pytest.raises(UnsupportedModelError, match=r"input 'input' has a fixed batch of 1 \(axis 0\): export "
                                                        r"it with a dynamic batch axis, e\.g\. torch\.onnx\.export"):
            onnxpress.finetune(student, teacher, x, labels=np.zeros(8, np.int64), epochs=1)
    np.savez(tmp_path / "d.npz", input=tiny_data(8))
    with pytest.raises(UnsupportedModelError, match="model's input 'input' has a fixed batch of 1"):
        onnxpress.optimize(fixed, tmp_path / "o.onnx", calib=tmp_path / "d.npz", finetune=True)


def test_auto_export_falls_back_to_writeback(kd_files, monkeypatch, caplog):
    """exporter="auto": when torch.onnx cannot export the module, the trained weights go into the student graph."""
    from onnxpress.bridge import export as export_mod
    from onnxpress.errors import UnsupportedModelError

    def refuse(*args, **kwargs):
        raise UnsupportedModelError("torch.onnx.export (dynamo) failed: No ONNX function found for aten.sort.stable")

    monkeypatch.setattr(export_mod, "export_module", refuse)
    res = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), epochs=1, threads=1)
    student = onnx.load(str(kd_files["student"]))
    assert [n.name for n in res.model.graph.node] == [n.name for n in student.graph.node]
    assert res.export_max_diff <= 1e-4
    assert "writing the trained weights back" in caplog.text


def test_torch_export_errors_are_one_clean_line():
    from onnxpress.bridge.export import _torch_reason

    exc = RuntimeError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m of exporting\n- hint\n\n"
                       "## Exception summary\n\n<class 'DispatchError'>: No ONNX function found for aten.sort.stable\n"
                       "more")  # fmt: skip
    assert _torch_reason(exc) == ("Failed to convert. This is step 3/3 of exporting <class 'DispatchError'>: "
                                  "No ONNX function found for aten.sort.stable")  # fmt: skip


def test_qat_export_is_held_to_how_well_onnxruntime_follows_the_untrained_module(kd_files, monkeypatch):
    """The QAT floor is min(35 dB, the PTQ graph's own agreement with its module - 6 dB): a deep U-Net's
    untrained QDQ graph already differs from its fake-quant module by 28.5 dB of rounding flips."""
    from onnxpress.bridge import export as export_mod
    from onnxpress.finetune import QAT_FLIP_MARGIN_DB, QAT_MIN_SQNR_DB

    seen = {}
    real_validate, real_agreement = export_mod.validate_against_module, export_mod.module_agreement_db

    def agreement(*args, **kwargs):
        seen["baseline"] = real_agreement(*args, **kwargs)
        return 30.0  # as if flips had piled up

    def validate(*args, min_sqnr_db=None, **kwargs):
        seen["floor"] = min_sqnr_db
        return real_validate(*args, min_sqnr_db=min_sqnr_db, **kwargs)

    monkeypatch.setattr(export_mod, "module_agreement_db", agreement)
    monkeypatch.setattr(export_mod, "validate_against_module", validate)
    onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), epochs=1, qat=True,
                       val_fraction=0.0, threads=1)  # fmt: skip
    assert seen["floor"] == pytest.approx(30.0 - QAT_FLIP_MARGIN_DB)
    assert seen["baseline"] > QAT_MIN_SQNR_DB  # the tiny CNN itself follows its module closely


def _image_model(noise: float = 0.0) -> onnx.ModelProto:
    """A denoiser / segmenter head: X [N, 1, 8, 8] -> Conv 3x3 (4) -> Relu -> Conv 1x1 (3) -> Y [N, 3, 8, 8]."""
    from onnx import helper

    from tests.graphs import make_model

    r = np.random.default_rng(7)
    w1 = r.standard_normal((4, 1, 3, 3)).astype(np.float32)
    w2 = r.standard_normal((3, 4, 1, 1)).astype(np.float32)
    w1 += noise * r.standard_normal(w1.shape).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]  # fmt: skip
    return make_model(nodes, [("input", ["N", 1, 8, 8])], [("y", ["N", 3, 8, 8])], {"w1": w1, "w2": w2})


def test_mse_distillation_and_segmentation_by_a_class_axis():
    """distill="mse" regresses a [N, C, H, W] output (no softmax metrics); kl over class_axis=1 for class maps."""
    x = {"input": tiny_data(96)}
    dense = onnxpress.finetune(_image_model(0.5), _image_model(), x, epochs=4, lr=1e-2, batch_size=16, threads=1,
                               distill="mse")  # fmt: skip
    assert dense.metrics["sqnr_db_after"] > dense.metrics["sqnr_db_before"] + 3
    assert "kl_after" not in dense.metrics and "agreement_after" not in dense.metrics
    seg = onnxpress.finetune(_image_model(0.5), _image_model(), x, epochs=4, lr=1e-2, batch_size=16, threads=1,
                             class_axis=1)  # fmt: skip
    assert seg.metrics["kl_after"] < seg.metrics["kl_before"]
    assert 0 <= seg.metrics["agreement_after"] <= 1
    with pytest.raises(OnnxpressError, match="finetune: distill must be kl or mse"):
        onnxpress.finetune(_image_model(0.5), _image_model(), x, distill="l1")


def test_cli_feature_distillation(kd_files, tmp_path, capsys):
    """--feature S=T adds an MSE term on a named intermediate value; a malformed pair is a one-line error."""
    hidden = next(n.output[0] for n in onnx.load(str(kd_files["student"])).graph.node if n.op_type == "Relu")
    out = tmp_path / "f.onnx"
    common = ["finetune", str(kd_files["student"]), "--teacher", str(kd_files["teacher"]), "--data",
              str(kd_files["data"]), "--epochs", "1", "--threads", "1", "-q"]  # fmt: skip
    assert main([*common, "-o", str(out), "--feature", f"{hidden}={hidden}", "--feature-weight", "0.5"]) == 0
    assert out.exists()
    assert main([*common, "-o", str(tmp_path / "g.onnx"), "--feature", "no-equals-sign"]) == 2
    assert "--feature takes STUDENT=TEACHER" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "plain.onnx")]) == 0
    weights = lambda p: [onnx.numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer]  # noqa: E731
    assert any(not np.array_equal(a, b) for a, b in zip(weights(out), weights(tmp_path / "plain.onnx"), strict=True))


def test_api_features_are_used_by_default_as_on_the_cli(kd_files):
    """features= in the API once defaulted to weight 0: the pairs were dropped unread (an unknown name passed, and
    the weights came out as without them). Now weight 1, as --feature; an explicit 0 is refused."""
    from onnxpress.errors import UnsupportedModelError

    student, teacher, data = (str(kd_files[k]) for k in ("student", "teacher", "data"))
    hidden = next(n.output[0] for n in onnx.load(student).graph.node if n.op_type == "Relu")
    with pytest.raises(UnsupportedModelError, match="the teacher has no value named 'no_such_value'"):
        onnxpress.finetune(student, teacher, data, epochs=1, threads=1, features={"no_such_value": "no_such_value"})
    with pytest.raises(OnnxpressError, match="feature_weight 0 drops every features pair"):
        onnxpress.finetune(student, teacher, data, epochs=1, threads=1, features={hidden: hidden}, feature_weight=0)
    plain = onnxpress.finetune(student, teacher, data, epochs=1, threads=1)
    paired = onnxpress.finetune(student, teacher, data, epochs=1, threads=1, features={hidden: hidden})
    weights = lambda m: [onnx.numpy_helper.to_array(i) for i in m.graph.initializer]  # noqa: E731
    assert any(not np.array_equal(a, b) for a, b in zip(weights(paired.model), weights(plain.model), strict=True))


@pytest.mark.parametrize(("extra", "match"), [
    # settings this run would not read: each wrote the same bytes as a run without it
    (["--hard-weight", "5"], r"--hard-weight weighs the label term: add --labels"),
    (["--distill", "mse", "--temperature", "9"], r"--temperature softens the kl term, and --distill mse reads none"),
    (["--val-fraction", "0", "--patience", "1"], r"--patience stops on the validation split"),
    (["--feature-weight", "2"], r"--feature-weight weighs the --feature pairs: add one"),
    (["--qat", "--exporter", "torchscript"], r"exporter='torchscript' \(--exporter\) sets how a float model goes back"),
    (["--calibration", "t.npz"], r"calibration \(--calibration\) is the table of the quantize step of qat=True"),
    (["--labels", "d.npz", "--hard-weight", "0", "--soft-weight", "0"], r"every loss term has weight 0"),
    # values that ended in tracebacks from numpy, torch or the loss
    (["--seed", "99999999999999999999"], r"seed must be an integer in 0\.\.2\*\*63-1"),
    (["--class-axis", "5"], r"class_axis \(--class-axis\) 5 is not a class axis of the first output \(rank 2"),
    (["--class-axis", "0"], r"axis 0 holds the samples\): give one of 1, -1"),
    (["--threads", "100000"], r"threads \(--threads\) 100000 is more than this machine's \d+ cores"),
])
def test_cli_finetune_refuses_settings_it_would_not_read_or_could_not_take(kd_files, tmp_path, capsys, monkeypatch,
                                                                          extra, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.npz").write_bytes(b"")  # a --calibration path; refused before it is read
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["finetune", "student.onnx", "--teacher", "teacher.onnx", "--data", "d.npz", "-o", "o.onnx", "-q",
               "--epochs", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and re.search(match, err[0]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_finetune_refuses_a_teacher_of_other_shapes_and_an_output_over_the_calibration_table(kd_files, tmp_path,
                                                                                              capsys):
    from tests.test_bridge_graphs import tiny_cnn

    other = tiny_cnn(gain=4.0)
    other.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16  # a teacher of 16x16 images
    with pytest.raises(DataError, match=r"the teacher's input input: float32\[.*16.*\] does not take the student's"):
        onnxpress.finetune(kd_files["student"], other, str(kd_files["data"]), epochs=1)
    table = tmp_path / "table.npz"
    onnxpress.calibrate(kd_files["student"], str(kd_files["data"])).save(table)
    before = table.read_bytes()
    assert main(["finetune", str(kd_files["student"]), "--teacher", str(kd_files["teacher"]), "--data",
                 str(kd_files["data"]), "--qat", "--calibration", str(table), "-o", str(table), "-q"]) == 2
    assert "is an input file (it would be overwritten)" in capsys.readouterr().err and table.read_bytes() == before


def test_labels_of_another_count_than_the_data_are_refused_not_cut(kd_files):
    labels = np.load(kd_files["data"])["labels"]
    with pytest.raises(DataError, match=r"192 labels for 96 samples"):
        onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), labels=np.tile(labels, 2),
                           epochs=0)
    with pytest.raises(DataError, match=r"192 labels for 96 samples"):  # also when max_samples reads fewer
        onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), labels=np.tile(labels, 2),
                           epochs=0, max_samples=32)
    res = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), labels=labels[:32],
                             epochs=0, max_samples=32)  # one per sample read: taken
    assert "accuracy_after" in res.metrics
