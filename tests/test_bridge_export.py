"""Back to ONNX: the exported model equals the module on onnxruntime; QAT exports the PTQ graph shape."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxpress.bridge.convert import OnnxModule  # noqa: E402
from onnxpress.bridge.export import export_module, validate_against_module  # noqa: E402
from onnxpress.bridge.qat import prepare_qat  # noqa: E402
from onnxpress.calibration.table import CalibrationTable  # noqa: E402
from onnxpress.errors import ValidationError  # noqa: E402
from onnxpress.runtime import make_session  # noqa: E402
from tests.graphs import run  # noqa: E402
from tests.test_bridge_graphs import tiny_cnn, tiny_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _perturbed_module(model):
    mod = OnnxModule(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mod


@pytest.fixture(scope="module")
def exported():
    model = tiny_cnn()
    mod = _perturbed_module(model)
    return model, mod, export_module(mod, model, [tiny_data(4)])


def test_export_equals_module_on_onnxruntime(exported):
    """Changed weights, dynamic batch (3 and 17): onnxruntime output == module output within 1e-4."""
    model, mod, out = exported
    for n in (3, 17):
        x = tiny_data(n, seed=n)
        with torch.no_grad():
            want = mod(torch.from_numpy(x)).numpy()
        got = run(out, {"input": x})[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert np.abs(got - run(model, {"input": x})[0]).max() > 1e-3  # the new weights, not the old


def test_export_keeps_names_and_batch_is_dynamic(exported):
    model, _, out = exported
    assert [i.name for i in out.graph.input] == ["input"]
    assert [o.name for o in out.graph.output] == ["logits"]
    assert not out.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    names = {i.name for i in out.graph.initializer}
    assert {"c1.weight", "c2.weight", "fc.weight"} <= names
    onnx.checker.check_model(out, full_check=True)


def test_export_carries_no_trace_of_the_interpreter(exported):
    """torch.onnx's dynamo exporter tags every node with its Python stack and FX node (our interpreter's frames and
    file paths): dropped, they were most of what a re-export added to a small model's file."""
    _, _, out = exported
    keys = {p.key for n in out.graph.node for p in n.metadata_props}
    assert not {k for k in keys if k.startswith("pkg.torch.") or k == "namespace"}, keys
    assert "convert.py" not in out.SerializeToString().decode("latin-1")


def test_validate_against_module_raises_on_mismatch(exported):
    model, mod, out = exported
    feeds = {"input": tiny_data(4)}
    assert validate_against_module(out, mod, feeds) <= 1e-4
    with pytest.raises(ValidationError, match="logits"):
        validate_against_module(model, mod, feeds)  # the unperturbed model is not the module


def _table(model, x):
    names = ["input", "a1", "r1", "a2", "r2", "p", "f", "logits"]
    with_outputs = onnx.ModelProto()
    with_outputs.CopyFrom(model)
    for n in names[1:-1]:
        with_outputs.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    outs = dict(zip([o.name for o in with_outputs.graph.output], run(with_outputs, {"input": x}), strict=True))
    outs["input"] = x
    return CalibrationTable.from_ranges({n: (float(outs[n].min()), float(outs[n].max())) for n in names})


@pytest.fixture(scope="module")
def qat_plan():
    model = tiny_cnn(gain=4.0)
    x = tiny_data(64)
    return model, x, prepare_qat(model, {"input": x}, table=_table(model, x))


def test_qat_module_starts_equal_to_ptq(qat_plan):
    """Before training the QAT module computes exactly the PTQ QDQ graph (onnxruntime, no optimisations)."""
    _, x, plan = qat_plan
    with torch.no_grad():
        got = plan.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run(plan.ptq, {"input": x})[0], atol=1e-5, rtol=0)
    assert len(plan.weights) == 3 and len(plan.biases) >= 2


def test_qat_export_after_training_equals_module(qat_plan, tmp_path):
    """After LSQ steps (weights and scales move) the written QDQ graph equals the QAT module."""
    model, x, plan = qat_plan
    mod = plan.module
    teacher = torch.from_numpy(run(model, {"input": x})[0])
    scale_before = {n: mod.initializer(w.scale).detach().clone() for n, w in enumerate(plan.weights)}
    opt = torch.optim.Adam(mod.parameters(), lr=2e-3)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(mod(torch.from_numpy(x)), teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [not torch.equal(mod.initializer(w.scale), scale_before[n]) for n, w in enumerate(plan.weights)]
    assert all(moved)
    out = plan.export(mod)
    assert collections.Counter(n.op_type for n in out.graph.node) == collections.Counter(
        n.op_type for n in plan.ptq.graph.node
    )
    with torch.no_grad():
        want = mod(torch.from_numpy(x)).numpy()
    got = run(out, {"input": x})[0]
    # identical math; a value on a rounding tie may land one step apart, so bound by the output scale
    assert np.abs(got - want).max() <= 1e-4
    # integer kernels: onnxruntime's optimiser turns the QDQ Convs into QLinearConv
    optimized = tmp_path / "opt.onnx"
    make_session(out, optimized_model_path=str(optimized))
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["QLinearConv"] == 2, ops


def test_qat_export_writes_back_layers_left_float():
    """With no range for ``input`` the first Conv stays float in PTQ; its trained weights still reach the export."""
    model = tiny_cnn(gain=4.0)
    x = tiny_data(64)
    full = _table(model, x)
    table = CalibrationTable.from_ranges({n: (r.min, r.max) for n, r in full.ranges.items() if n != "input"})
    plan = prepare_qat(model, {"input": x}, table=table)
    assert "c1.weight" in plan.module.param_names  # float, trainable, not behind Q/DQ
    with torch.no_grad():
        plan.module.initializer("c1.weight").mul_(1.1)
    out = plan.export()
    written = next(onnx.numpy_helper.to_array(i) for i in out.graph.initializer if i.name == "c1.weight")
    np.testing.assert_array_equal(written, plan.module.initializer("c1.weight").detach().numpy())
    with torch.no_grad():
        want = plan.module(torch.from_numpy(x)).numpy()
    assert np.abs(run(out, {"input": x})[0] - want).max() <= 1e-4


def test_qat_scales_after_clip_stay_inside_the_clip_range(tmp_path):
    """Relu -> Clip(0, 0.5): a learned scale pushed too far is capped, so onnxruntime still fuses QLinearConv."""
    model = tiny_cnn(gain=4.0)
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Clip"
            node.input.extend(["clip_lo", "clip_hi"])
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.float32(0), "clip_lo"),
                                    onnx.numpy_helper.from_array(np.float32(0.5), "clip_hi")])  # fmt: skip
    x = tiny_data(64)
    # onnxpress quantize drops a Clip that its Q makes redundant; a QDQ model that keeps it (InsertQDQ alone,
    # onnxruntime's output) trains in its own graph
    from onnxpress.passes.qdq import InsertQDQ
    from onnxpress.pipeline import run_passes

    student = run_passes(model, [InsertQDQ(_table(model, x), activations="uint8")]).model
    assert "Clip" in {n.op_type for n in student.graph.node}
    plan = prepare_qat(student, {"input": x})
    assert plan.caps, "no Clip-capped scale found"
    for name, cap in plan.caps.items():
        with torch.no_grad():
            plan.module.initializer(name).fill_(cap * 3)  # as if LSQ had grown it
    out = plan.export()
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    for name, cap in plan.caps.items():
        assert float(inits[name]) <= cap
    with torch.no_grad():
        want = plan.module(torch.from_numpy(x)).numpy()
    assert np.abs(run(out, {"input": x})[0] - want).max() <= 1e-4
    optimized = tmp_path / "opt.onnx"
    make_session(out, optimized_model_path=str(optimized))
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["QLinearConv"] == 2 and ops["Clip"] == 0, ops


def test_dynamo_export_of_a_model_whose_output_name_torch_also_generates():
    """X -> Conv -> Relu -> Reshape -> "relu": torch.onnx also names the Relu's own output "relu".

    With ``output_names=["relu"]`` torch 2.13 wrote two values named "relu" (a cycle that onnx-graphsurgeon
    refused; pytorch/pytorch#158094): a dynamo-exported separator could not be fine-tuned with the default
    exporter. The export is now a valid model equal to the module.
    """
    from onnx import helper

    from tests.graphs import make_model

    w = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["relu"])]  # fmt: skip
    model = make_model(nodes, [("X", ["N", 1, 6, 6])], [("relu", ["N", 144])], {"W": w, "shape": np.array([-1, 144])})
    mod = _perturbed_module(model)
    out = export_module(mod, model, [tiny_data(4)[:, :, :6, :6]])
    onnx.checker.check_model(out)
    names = collections.Counter(o for n in out.graph.node for o in n.output)
    assert max(names.values()) == 1 and [o.name for o in out.graph.output] == ["relu"]
    x = tiny_data(3, seed=5)[:, :, :6, :6]
    assert validate_against_module(out, mod, {"X": x}) <= 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_layer_norm_exports_with_either_exporter(exporter):
    """LayerNormalization's normalized shape comes from its scale: a traced one exported as a Gather that
    the torchscript exporter refused (every transformer failed with --exporter torchscript)."""
    from onnx import helper

    from tests.graphs import make_model, rng

    r = rng(7)
    inits = {"W": r.standard_normal((6, 6)).astype(np.float32), "g": r.uniform(0.5, 1.5, 6).astype(np.float32),
             "b": r.standard_normal(6).astype(np.float32)}  # fmt: skip
    nodes = [helper.make_node("MatMul", ["X", "W"], ["a"]),
             helper.make_node("LayerNormalization", ["a", "g", "b"], ["Y"], axis=-1, epsilon=1e-5)]  # fmt: skip
    model = make_model(nodes, [("X", ["N", 4, 6])], [("Y", ["N", 4, 6])], inits)
    module = OnnxModule(model)
    x = r.standard_normal((3, 4, 6)).astype(np.float32)
    exported = export_module(module, model, [x[:2]], exporter=exporter)
    onnx.checker.check_model(exported, full_check=True)
    assert validate_against_module(exported, module, {"X": x}) <= 1e-5


def test_what_torch_writes_to_stderr_during_an_export_stays_out_of_the_terminal(monkeypatch, capfd, caplog) -> None:
    """torch's C++ side prints IR to fd 2 when an export fails: the user sees our one line, -vv the dump."""
    import logging
    import os

    import torch

    from onnxpress.errors import UnsupportedModelError

    model = tiny_cnn()
    module = OnnxModule(model)

    def failing_export(*args, **kwargs):
        os.write(2, b"graph(%input : Float(2, 1, 8, 8)):\n  %1 : Float = onnx::Conv(%input)\n")
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    failed = pytest.raises(UnsupportedModelError, match="torch.onnx.export \\(torchscript\\) failed: Unsupported")
    with caplog.at_level(logging.DEBUG, logger="onnxpress.bridge.export"), failed:
        export_module(module, model, [tiny_data()[0][:2]], exporter="torchscript")
    assert "onnx::Conv" not in capfd.readouterr().err
    assert "onnx::Conv" in caplog.text  # kept for -vv
    os.write(2, b"after\n")  # fd 2 is the terminal again
    assert capfd.readouterr().err == "after\n"
