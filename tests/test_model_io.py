"""Model I/O: private copies, clear load errors, atomic checked saves, normalisation."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxpress.errors import ModelLoadError, OutputError, UnsupportedModelError
from onnxpress.model_io import default_opset, load_model, normalize_model, save_model
from tests import graphs


def test_load_returns_a_private_copy():
    model = graphs.gemm()
    loaded = load_model(model)
    loaded.graph.node[0].op_type = "MatMul"
    assert model.graph.node[0].op_type == "Gemm"


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"hello, this is text\n", "not a valid ONNX model"), (None, "not found")],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ModelLoadError, match="is a folder"):
        load_model(tmp_path)


def test_truncated_file(tmp_path):
    data = graphs.gemm().SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_external_data_round_trip_and_missing_data(tmp_path):
    model = graphs.gemm(k=64, n=64)
    out = save_model(model, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    again = load_model(out)
    np.testing.assert_array_equal(
        numpy_helper.to_array(again.graph.initializer[0]), numpy_helper.to_array(model.graph.initializer[0])
    )
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(ModelLoadError, match="external data file"):
        load_model(out)


def test_save_is_atomic_and_leaves_no_scratch(tmp_path):
    model = graphs.gemm()
    save_model(model, tmp_path / "a.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]
    broken = graphs.gemm()
    broken.graph.node[0].input[1] = "missing"
    with pytest.raises(ModelLoadError, match="onnx.checker"):
        save_model(broken, tmp_path / "b.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


def test_scratch_an_interrupted_run_left_is_named_and_kept(tmp_path, caplog):
    """SIGKILL cannot be caught: its .onnxpress-*/ stays. A later save names entries an hour old (never deletes
    them: another run may be writing), and says nothing of fresh ones or of a folder whose file is still growing."""
    old = tmp_path / ".onnxpress-abc123"
    old.mkdir()
    (old / "m.onnx").write_bytes(b"partial")
    growing = tmp_path / ".onnxpress-def456"
    growing.mkdir()
    (growing / "m.onnx").write_bytes(b"still being written")
    hour_ago = os.path.getmtime(old) - 3700
    for p in (old, old / "m.onnx", growing):
        os.utime(p, (hour_ago, hour_ago))
    with caplog.at_level("WARNING", logger="onnxpress.model_io"):
        save_model(graphs.gemm(), tmp_path / "a.onnx")
    (record,) = [r for r in caplog.records if "scratch" in r.getMessage()]
    assert "1 scratch entry an hour old or more" in record.getMessage() and ".onnxpress-abc123" in record.getMessage()
    assert "def456" not in record.getMessage()
    assert old.exists() and growing.exists()  # named, not removed
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxpress.model_io"):
        save_model(graphs.gemm(), tmp_path / "b.onnx")  # the next save names it again: it is still there
    assert len([r for r in caplog.records if "scratch" in r.getMessage()]) == 1


def test_unwritable_outputs(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save_model(graphs.gemm(), tmp_path / "nope" / "m.onnx")
    with pytest.raises(OutputError, match="is a folder"):
        save_model(graphs.gemm(), tmp_path)


def test_normalize_moves_constant_weights_and_upgrades_opset():
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "wv")
    nodes = [helper.make_node("Constant", [], ["W"], value=w), helper.make_node("MatMul", ["X", "W"], ["Y"])]
    model = graphs.make_model(nodes, [("X", [2, 4])], [("Y", [2, 4])], opset=11)
    norm = normalize_model(model, min_opset=13)
    assert [n.op_type for n in norm.graph.node] == ["MatMul"]
    assert [i.name for i in norm.graph.initializer] == ["W"]
    assert default_opset(norm) == 13
    onnx.checker.check_model(norm, full_check=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(graphs.run(norm, {"X": x})[0], x)
    assert default_opset(model) == 11  # the input is untouched


def _resize_model(op: str, opset: int, mode: str, scales, computed: bool = False) -> onnx.ModelProto:
    """X[1, 2, 6, 7] -> Upsample-9 / Resize-10 with constant scales (or scales computed as Identity(S))."""
    nodes = [helper.make_node(op, ["X", "s"], ["Y"], mode=mode)]
    inits = {"S" if computed else "s": np.array(scales, np.float32)}
    if computed:
        nodes.insert(0, helper.make_node("Identity", ["S"], ["s"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 2, 6, 7])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("op", "opset", "mode", "scales"), [
    ("Upsample", 9, "linear", [1, 1, 2, 2]), ("Upsample", 9, "linear", [1, 1, 2.5, 1.5]),
    ("Upsample", 9, "nearest", [1, 1, 2.5, 1.5]), ("Upsample", 9, "nearest", [1, 1, 3, 3]),
    ("Resize", 10, "linear", [1, 1, 0.6, 0.75]), ("Resize", 10, "linear", [1, 1, 2, 0.5]),
    ("Resize", 10, "nearest", [1, 1, 0.6, 0.75]), ("Resize", 10, "nearest", [1, 1, 2.5, 1.5]),
])
def test_upgrade_keeps_what_upsample_and_resize_10_compute(op, opset, mode, scales):
    """onnx's version converter gives the Resize it makes Resize-11's half_pixel grid; before opset 11 the grid was
    asymmetric (and nearest rounded down scaling up, up scaling down): the upgraded model computes the same."""
    model = _resize_model(op, opset, mode, scales)
    x = graphs.rng(0).standard_normal((1, 2, 6, 7)).astype(np.float32)
    norm = normalize_model(model, min_opset=13)
    assert default_opset(norm) == 13 and [n.op_type for n in norm.graph.node] == ["Resize"]
    np.testing.assert_array_equal(graphs.run(norm, {"X": x})[0], graphs.run(model, {"X": x})[0])
    plain = onnx.version_converter.convert_version(model, 13)  # what the converter alone gives: off for linear
    if mode == "linear":
        assert not np.allclose(graphs.run(plain, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-3)


@pytest.mark.parametrize(("scales", "computed", "message"), [
    ([1, 1, 2, 0.6], False, r"nearest Resize 'Y' \(scales \[1\.0, 1\.0, 2\.0, 0\.6"),
    ([1, 1, 2, 2], True, r"nearest Resize 'Y' \(computed scales\)"),
])
def test_an_upgrade_that_cannot_keep_a_nearest_resize_is_refused(scales, computed, message):
    from onnxpress.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=message + r".*re-export it with opset >= 13"):
        normalize_model(_resize_model("Resize", 10, "nearest", scales, computed), min_opset=13)


def test_computed_upsample_scales_are_scaling_up():
    """Upsample's scales are >= 1 by its spec: computed ones round down, as onnxruntime's Upsample-9 does."""
    model = _resize_model("Upsample", 9, "nearest", [1, 1, 2.5, 1.5], computed=True)
    x = graphs.rng(1).standard_normal((1, 2, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(graphs.run(normalize_model(model, min_opset=13), {"X": x})[0],
                                  graphs.run(model, {"X": x})[0])


def _old(op: str, opset: int, shape: list[int], inits: dict | None = None, outputs=("Y",), **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["X", *(inits or {})], list(outputs), **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(outputs[0], onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


_R = graphs.rng(4)
OLD_OPS = {  # ops whose attributes, inputs or meaning changed between their opset and 13
    "Hardmax-11 axis 1": _old("Hardmax", 11, [2, 3, 4], axis=1),
    "Hardmax-9 default axis": _old("Hardmax", 9, [2, 3, 4]),
    "Softmax-11 axis 1": _old("Softmax", 11, [2, 3, 4], axis=1),
    "LogSoftmax-9 default axis": _old("LogSoftmax", 9, [2, 3, 4]),
    "Clip-6": _old("Clip", 9, [2, 3, 4], min=-0.5, max=0.7),
    "Pad-2 reflect": _old("Pad", 9, [2, 3, 4], mode="reflect", pads=[0, 1, 2, 0, 0, 1]),
    "Slice-1": _old("Slice", 9, [2, 3, 4], starts=[1, -3], ends=[3, 100], axes=[1, 2]),
    "TopK-1": _old("TopK", 9, [2, 3, 4], outputs=("Y", "I"), k=2, axis=2),
    "Upsample-7 linear": _old("Upsample", 7, [2, 3, 4], mode="linear", scales=[1.0, 2.0, 1.5]),
    "Split-2": _old("Split", 9, [2, 3, 4], outputs=("Y", "Z"), axis=2, split=[1, 3]),
    "ReduceMean-1": _old("ReduceMean", 9, [2, 3, 4], axes=[1], keepdims=0),
    "AveragePool-7": _old("AveragePool", 9, [2, 3, 4], kernel_shape=[3], pads=[1, 1], count_include_pad=1),
    "Flatten-9": _old("Flatten", 9, [2, 3, 4], axis=2),
    "Gemm-9": _old("Gemm", 9, [2, 4], {"W": _R.standard_normal((5, 4)).astype(np.float32),
                                       "C": _R.standard_normal(5).astype(np.float32)}, transB=1, alpha=0.5, beta=2.0),
}


@pytest.mark.parametrize("name", sorted(OLD_OPS))
def test_upgrade_to_13_computes_what_the_old_opset_did(name):
    """Every output equal on onnxruntime before and after normalize_model's upgrade to opset 13."""
    model = OLD_OPS[name]
    x = graphs.rng(5).standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    feeds = {"X": x.astype(np.float32)}
    norm = normalize_model(model, min_opset=13)
    assert default_opset(norm) == 13
    for a, b in zip(graphs.run(model, feeds), graphs.run(norm, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantize_refuses_an_upgrade_that_changes_the_outputs(monkeypatch, tmp_path):
    """Should the version converter change what an old model computes (here: the Resize fix switched off),
    quantize compares the upgraded float model with the original on the first calibration samples and stops."""
    import onnxpress
    import onnxpress.model_io as mio
    from onnxpress.errors import UnsupportedModelError

    w = graphs.rng(6).standard_normal((8, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Upsample", ["X", "s"], ["u"], mode="linear"),
             helper.make_node("Conv", ["u", "W"], ["Y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 2, 6, 7])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", 8, 12, 14])],
                              [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s"),
                               numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 7
    data = tmp_path / "d.npz"
    np.savez(data, X=graphs.rng(7).standard_normal((16, 2, 6, 7)).astype(np.float32))
    onnxpress.quantize(model, calib=str(data))  # exact upgrade: quantized
    monkeypatch.setattr(mio, "_resize_as_before", lambda *args, **kwargs: None)
    with pytest.raises(UnsupportedModelError, match=r"upgrading the model from opset 9 to 13 .* changed its output 'Y' "
                                                     r"on the calibration data \(\d+\.\d dB SQNR .*re-export"):
        onnxpress.quantize(model, calib=str(data))


def test_symbolic_shape_inference_leaves_no_file_when_it_is_incomplete(tmp_path, monkeypatch):
    """onnxruntime's public ``infer_shapes`` saves sym_shape_infer_temp.onnx (+ external data) into the current
    folder when a shape stays unknown, here after an op it does not know; ours returns the partial model."""
    from onnx import TensorProto

    from onnxpress.model_io import symbolic_shape_inference

    nodes = [helper.make_node("Relu", ["X"], ["Y"]), helper.make_node("Foo", ["X"], ["h"], domain="custom.domain")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT, None)])  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("custom.domain", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    monkeypatch.chdir(tmp_path)
    inferred, complete = symbolic_shape_inference(model)
    assert not complete and list(tmp_path.iterdir()) == []
    shape = {o.name: o.type.tensor_type.shape for o in inferred.graph.output}["Y"]
    assert [d.dim_param or d.dim_value for d in shape.dim] == ["N", 4]  # what it inferred before, it kept


def test_quantizing_imports_no_torch_even_where_torch_is_installed():
    """onnxruntime.tools' __init__ imports torch when it is installed: 1.4 s of a 5 s quantize of the reference
    ResNet. The symbolic shape inference module is loaded on its own instead; its result is unchanged."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: nothing could import it")
    code = ("import sys, onnxpress\n"
            "onnxpress.quantize('models/transformer.onnx')\n"
            "onnxpress.quantize('models/resnet.onnx', calib='models/digits32_calib.npz', max_samples=32)\n"
            "assert 'onnxpress._ort_symbolic_shape_infer' in sys.modules\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('onnxruntime.tools')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_onnxruntime_errors_keep_the_reason_not_the_cpp_signature():
    """onnxruntime 1.30 refusing an IR-12 model: the reason sat behind 250 characters of C++ and was cut."""
    from onnxpress.runtime import make_session, ort_message

    raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:202 onnxruntime::Model::"
           "Model(onnx::ModelProto&&, const onnxruntime::PathString&, const onnxruntime::IOnnxRuntimeOpSchemaRegistry"
           "List*, const onnxruntime::logging::Logger&, const onnxruntime::ModelOptions&) Unsupported model IR "
           "version: 12, max supported IR version: 11")  # fmt: skip
    assert ort_message(RuntimeError(raw)) == (
        "[ONNXRuntimeError] : 1 : FAIL : Unsupported model IR version: 12, max supported IR version: 11"
    )
    plain = "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Failed to load model because protobuf parsing failed."
    assert ort_message(RuntimeError(plain)) == plain
    model = graphs.gemm()
    model.ir_version = 99  # past what any onnxruntime knows
    with pytest.raises(UnsupportedModelError, match=r"max supported IR version: \d+ \(onnxruntime .*: upgrade it"):
        make_session(model)


def _reshape_matmul() -> onnx.ModelProto:
    """X[N, 2, 8] -> Reshape([-1, 16]) -> MatMul(W[16, 4]) + b -> Y: a shape input onnxruntime must read at load."""
    r = np.random.default_rng(0)
    nodes = [helper.make_node("Reshape", ["X", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["Y"])]
    inits = [numpy_helper.from_array(np.array([-1, 16], np.int64), "shape"),
             numpy_helper.from_array(r.standard_normal((16, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(r.standard_normal(4).astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 2, 8])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_small_tensors_in_external_data_get_a_way_out(tmp_path, capsys) -> None:
    """Every tensor external (size_threshold=0): onnxruntime cannot read the shape; errors say to run cleanup,
    which writes a model that loads, and quantize's latency check times the cleaned original instead."""
    from onnxpress.cli import main
    from onnxpress.runtime import make_session

    src = tmp_path / "all.onnx"
    onnx.save(_reshape_matmul(), src, save_as_external_data=True, all_tensors_to_one_file=True, location="all.data",
              size_threshold=0)
    data = tmp_path / "calib.npz"
    np.savez(data, X=np.random.default_rng(1).standard_normal((8, 2, 8)).astype(np.float32))
    with pytest.raises(UnsupportedModelError, match="onnxpress cleanup MODEL -o FIXED.onnx"):
        make_session(str(src))
    assert main(["validate", str(src), str(src), "--data", str(data)]) == 2
    assert "onnxpress cleanup MODEL -o FIXED.onnx" in capsys.readouterr().err
    assert main(["cleanup", str(src), "-o", str(tmp_path / "fixed.onnx")]) == 0
    make_session(str(tmp_path / "fixed.onnx"))  # loads
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(data), "-q"]) == 0
    out = capsys.readouterr().out
    assert "the latency check times the original after onnxpress cleanup instead" in out and "latency " in out
    make_session(str(tmp_path / "q.onnx"))


def test_an_output_over_a_second_input_model_names_it(tmp_path):
    """The model worked on is "the input model"; another one read (a teacher, a candidate) is named as such."""
    from onnxpress.model_io import check_output_path

    for name in ("student.onnx", "teacher.onnx"):
        save_model(graphs.gemm(), tmp_path / name)
    with pytest.raises(OutputError, match=r"student\.onnx is the input model;"):
        check_output_path(tmp_path / "student.onnx", [tmp_path / "student.onnx", tmp_path / "teacher.onnx"])
    with pytest.raises(OutputError, match=r"teacher\.onnx is an input model \(teacher\.onnx, which the command "):
        check_output_path(tmp_path / "teacher.onnx", [tmp_path / "student.onnx", tmp_path / "teacher.onnx"])


def test_write_atomically_leaves_the_old_file_and_no_scratch_when_the_write_fails(tmp_path):
    """The report's PNGs and texts go through it: Ctrl-C during savefig left a 124-byte PNG."""
    from onnxpress.model_io import write_atomically

    out = tmp_path / "a.png"
    out.write_bytes(b"old")

    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(out, broken)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert write_atomically(out, lambda tmp: tmp.write_bytes(b"new")) == out and out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def _with_initializers_as_inputs(ir: int, opset: int) -> onnx.ModelProto:
    from onnx import TensorProto

    r = np.random.default_rng(5)
    w0, w1 = r.standard_normal((8, 16)).astype(np.float32), r.standard_normal((16, 4)).astype(np.float32)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
         helper.make_node("MatMul", ["h", "w1"], ["y"])], "g",
        [vi("x", TensorProto.FLOAT, ["N", 8]), vi("w0", TensorProto.FLOAT, [8, 16]),
         vi("w1", TensorProto.FLOAT, [16, 4])],
        [vi("y", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def test_initializers_listed_as_inputs_leave_the_inputs_and_ir3_models_go_through_every_command(tmp_path, caplog):
    """An IR-3 export (every initializer an input) failed exact prune and lowrank ("w0 in initializer but not in
    graph input"); an IR >= 4 overridable weight silently left the inputs of quantize's output."""
    import onnxpress

    old = _with_initializers_as_inputs(3, 7)
    norm = normalize_model(old)
    assert [i.name for i in norm.graph.input] == ["x"] and norm.ir_version >= 7
    onnx.checker.check_model(norm, full_check=True)
    x = {"x": np.random.default_rng(6).standard_normal((4, 8)).astype(np.float32)}
    want = graphs.run(old, x)[0]
    for res in (onnxpress.prune(old), onnxpress.lowrank(old, rank=4)):
        onnx.checker.check_model(res.model, full_check=True)
        assert [i.name for i in res.model.graph.input] == ["x"]
    np.testing.assert_allclose(graphs.run(onnxpress.prune(old).model, x)[0], want, rtol=1e-5, atol=1e-5)
    assert not [r for r in caplog.records if "also graph inputs" in r.getMessage()]  # IR 3 lists them all: no news
    normalize_model(_with_initializers_as_inputs(8, 13))
    assert [r for r in caplog.records if "2 initializer(s) are also graph inputs (w0, w1)" in r.getMessage()]


def test_a_weight_read_inside_an_if_branch_survives_two_rounds_of_passes_and_the_model_keeps_its_metadata():
    """graphsurgeon wrote the outer W into the branch as an initializer of the same name, which the next import
    refused as shadowed ('a subgraph reuses the outer tensor name'); doc_string and model_version were dropped."""
    import onnxpress
    from onnxpress.pipeline import cleanup_passes, run_passes

    r = np.random.default_rng(9)
    vi = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                             [vi("t", onnx.TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [],
                              [vi("e", onnx.TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["inp", "W"], ["x"]), helper.make_node("ReduceSum", ["inp"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
         helper.make_node("MatMul", ["y", "w1"], ["z"])],
        "g", [vi("inp", onnx.TensorProto.FLOAT, ["N", 16])], [vi("z", onnx.TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(r.standard_normal((16, 16)).astype(np.float32), "W"),
         numpy_helper.from_array(r.standard_normal((16, 10)).astype(np.float32), "w1"),
         numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], doc_string="mine", model_version=7)
    once = run_passes(model, cleanup_passes()).model
    twice = onnxpress.lowrank(once, rank=4).model  # splits w1, then imports its graph again: refused before
    assert (twice.doc_string, twice.model_version) == ("mine", 7)
    x = {"inp": r.standard_normal((3, 16)).astype(np.float32)}
    assert graphs.run(twice, x)[0].shape == (3, 10)  # a rank-4 split: not exact


def test_unnamed_nodes_are_named_after_their_first_output_and_excluded_by_it():
    """Layers are keyed ``node.name or node.output[0]`` (the search, recipes); exclude matches node names, so an
    optimize recipe excluding an unnamed Conv by its output 'a' was refused by its own quantize step."""
    import onnxpress

    model = graphs.conv_bn_relu()
    for node in model.graph.node:
        node.name = ""
    model.graph.node[1].name = model.graph.node[0].output[0]  # a taken name: the unnamed node gets a suffix
    out = normalize_model(model)
    names = [n.name for n in out.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names[0] == model.graph.node[0].output[0] + "_1" and names[2] == model.graph.node[2].output[0]
    assert [n.name for n in model.graph.node][0] == ""  # the given model is not modified

    conv_out = model.graph.node[0].output[0]
    model.graph.node[1].name = ""
    data = [{"X": graphs.rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)}]
    done = onnxpress.quantize(model, calib=data, exclude=[conv_out])
    assert [d.name for d in done.kept_float if d.op == "Conv"] == [conv_out]
    assert not [d for d in done.quantized if d.op == "Conv"]
