"""Models too large for protobuf (>2 GiB): every step takes them, without temp files or whole-model serialisation.

A real one (``bench/large_model.py``: 2.25 GiB of weights) takes up to 3x its size in memory and up to a minute a
step; here the size limit is lowered so that the reference models take the same code path, which must give the
very same results as the ordinary one.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxpress
from onnxpress import model_io
from onnxpress.errors import ModelLoadError, UnsupportedModelError
from onnxpress.model_io import check_model, infer_shapes, is_large, load_model, model_bytes, split_large
from onnxpress.runtime import make_session
from tests.graphs import make_model, rng
from tests.test_qdq import MODELS

CALIB = MODELS / "digits32_calib.npz"


def _lower_the_limit(monkeypatch, weight_bytes: int) -> None:
    """Models of more than ``weight_bytes`` of weights count as too large, and protobuf's limit is simulated.

    Initializers of 1 KB or more are set aside. onnx's checker, shape inference and version converter and
    onnxruntime's session refuse a model (or its bytes) at that size, as they refuse one over 2 GiB, so every
    path that would serialise a large model whole fails here as it would there.
    """
    import onnxruntime as ort

    limit = 1_000_000 + weight_bytes
    monkeypatch.setattr(model_io, "_EXTERNAL_DATA_THRESHOLD", limit)
    monkeypatch.setattr(model_io, "_SET_ASIDE_BYTES", 1024)

    def whole(model: onnx.ModelProto) -> bool:  # large, and its big initializers still in it (not external)
        return model_io._approx_size(model) >= limit and any(
            model_io._tensor_bytes(t) >= 1024 for t in model.graph.initializer
        )

    def refusing(real, what):
        def call(model, *args, **kwargs):
            proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
            if isinstance(proto, onnx.ModelProto) and whole(proto):
                raise ValueError(f"{what}: model exceeds the (simulated) 2 GiB protobuf limit")
            return real(model, *args, **kwargs)

        return call

    monkeypatch.setattr(onnx.checker, "check_model", refusing(onnx.checker.check_model, "checker"))
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refusing(onnx.shape_inference.infer_shapes, "inference"))
    monkeypatch.setattr(ort, "InferenceSession", refusing(ort.InferenceSession, "onnxruntime"))
    monkeypatch.setattr(onnx.version_converter, "convert_version", refusing(onnx.version_converter.convert_version,
                                                                            "version converter"))


@pytest.fixture
def large(monkeypatch):
    """Call it on a model built beforehand: every model of more than 32 KB of weights is too large from then on."""
    return lambda: _lower_the_limit(monkeypatch, 32_768)


def _mlp() -> onnx.ModelProto:
    """X[N,64] -> MatMul(W1 64x128) -> Relu -> Reshape([-1,128]) -> Gemm(W2, b) -> Y[N,10]; 38 KB of weights."""
    r = rng(3)
    inits = {
        "W1": r.standard_normal((64, 128)).astype(np.float32) * 0.1,
        "shape": np.array([-1, 128], dtype=np.int64),
        "W2": r.standard_normal((10, 128)).astype(np.float32) * 0.1,
        "b": r.standard_normal(10).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "W2", "b"], ["Y"], transB=1),
    ]
    return make_model(nodes, [("X", ["N", 64])], [("Y", ["N", 10])], inits)


def test_split_sets_aside_only_the_big_initializers(large):
    model = _mlp()
    large()
    assert is_large(model)
    light, big = split_large(model)
    assert [t.name for t in big] == ["W1", "W2"]
    assert [t.name for t in light.graph.initializer] == ["shape", "b"]
    assert list(light.graph.node) == list(model.graph.node)
    assert light.opset_import == model.opset_import and light.ir_version == model.ir_version
    assert big == [model.graph.initializer[0], model.graph.initializer[2]]  # unchanged
    assert len(model.graph.initializer) == 4  # the model itself is untouched


def test_model_bytes_matches_the_serialised_size(large):
    model = _mlp()
    large()
    exact = model.ByteSize()  # still possible at this size
    # each set-aside tensor's header (name, dims, type: < 32 bytes) is not counted
    assert exact - 2 * 32 <= model_bytes(model) <= exact


def test_session_takes_big_initializers_from_memory(large, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _mlp()
    x = rng(4).standard_normal((5, 64)).astype(np.float32)
    want = make_session(model).run(None, {"X": x})[0]
    large()
    session = make_session(model)
    np.testing.assert_array_equal(session.run(None, {"X": x})[0], want)
    assert os.listdir(tmp_path) == []  # nothing written, not even the external-data name it refers to
    assert len(model.graph.initializer) == 4 and model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT


def test_check_and_shape_inference_see_big_initializers_as_typed_values(large):
    model, broken, wrong = _mlp(), _mlp(), _mlp()
    large()
    check_model(model)
    shaped = infer_shapes(model)
    assert [t.name for t in shaped.graph.initializer] == ["W1", "shape", "W2", "b"]  # order kept
    assert [i.name for i in shaped.graph.input] == ["X"]
    types = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
             for vi in shaped.graph.value_info}
    assert types["h"] == ["N", 128] and types["f"][1] == 128  # through the Reshape's (small) shape tensor
    light = infer_shapes(model, weights=False)
    assert [t.name for t in light.graph.initializer] == ["shape", "b"]
    assert list(light.graph.value_info) == list(shaped.graph.value_info)

    broken.graph.node[3].input[1] = "W3"  # no such value
    with pytest.raises(ModelLoadError, match="W3"):
        check_model(broken)
    wrong.graph.initializer[0].dims[0] = 32  # MatMul [N,64] x [32,128]: shape inference must object
    with pytest.raises(ModelLoadError):
        check_model(wrong)


def _quantized(src, out, **kwargs):
    calib = [{"input": np.load(CALIB)["input"][:64]}]
    return onnxpress.quantize(str(src), str(out), calib=calib, progress=False, **kwargs)


def _same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert list(a.graph.node) == list(b.graph.node)
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet", {}), ("resnet_opset11", {}), ("transformer", {}), ("transformer", {"weights": "int4"})],
)
def test_quantize_a_large_model_gives_the_ordinary_result(tmp_path, monkeypatch, name, kwargs):
    plain = _quantized(MODELS / f"{name}.onnx", tmp_path / "plain.onnx", **kwargs)
    _lower_the_limit(monkeypatch, 4096)  # every reference model is large
    out = tmp_path / "large" / "q.onnx"
    out.parent.mkdir()
    big = _quantized(MODELS / f"{name}.onnx", out, **kwargs)
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]  # written with external data, nothing else
    _same_model(load_model(out), load_model(tmp_path / "plain.onnx"))
    assert big.size_before == pytest.approx(plain.size_before, rel=1e-3)
    assert big.size_after == pytest.approx(plain.size_after, rel=1e-2)


def test_calibrate_a_large_model_gives_the_same_ranges(monkeypatch):
    data = [{"input": np.load(CALIB)["input"][:64]}]
    want = onnxpress.calibrate(str(MODELS / "mobilenet.onnx"), data, method="kl")
    _lower_the_limit(monkeypatch, 4096)
    model = load_model(MODELS / "mobilenet.onnx")
    got = onnxpress.calibrate(model, data, method="kl")
    assert got.ranges.keys() == want.ranges.keys()
    assert all((got.ranges[k].min, got.ranges[k].max) == (want.ranges[k].min, want.ranges[k].max) for k in want.ranges)
    assert len(model.graph.output) == 1  # the caller's model is not given the calibration outputs


def test_big_initializers_listed_as_inputs_too(large):
    """IR < 4 exports list every initializer as a graph input as well."""
    model = _mlp()
    model.graph.input.append(helper.make_tensor_value_info("W1", onnx.TensorProto.FLOAT, [64, 128]))
    large()
    check_model(model)
    assert [i.name for i in infer_shapes(model).graph.input] == ["X", "W1"]
    x = rng(5).standard_normal((2, 64)).astype(np.float32)
    assert make_session(model).run(None, {"X": x})[0].shape == (2, 10)


@pytest.mark.parametrize("step", ["lowrank", "prune"])
def test_lowrank_and_prune_a_large_model_give_the_ordinary_result(tmp_path, monkeypatch, step):
    def run(out):
        if step == "lowrank":
            return onnxpress.lowrank(str(MODELS / "transformer.onnx"), str(out), flops=0.5)
        return onnxpress.prune(str(MODELS / "resnet.onnx"), str(out), ratio=0.5)

    run(tmp_path / "plain.onnx")
    _lower_the_limit(monkeypatch, 4096)
    run(tmp_path / "large.onnx")
    assert (tmp_path / "large.onnx.data").is_file()  # the large path ran (its output has external data)
    _same_model(load_model(tmp_path / "large.onnx"), load_model(tmp_path / "plain.onnx"))


def test_optimize_refuses_a_large_model_clearly(tmp_path, monkeypatch):
    _lower_the_limit(monkeypatch, 4096)
    with pytest.raises(UnsupportedModelError, match="over protobuf's 2 GiB"):
        onnxpress.optimize(str(MODELS / "resnet.onnx"), str(tmp_path / "o.onnx"), calib=str(CALIB))
    assert os.listdir(tmp_path) == []


def test_calibrate_leaves_a_files_external_data_to_onnxruntime(tmp_path, monkeypatch):
    """A model file's external data is checked, not read by us: onnxruntime maps it (2.25 GiB: 7.4 -> 2.7 GB peak)."""
    from onnxpress.model_io import save_model

    data = [{"input": np.load(CALIB)["input"][:64]}]
    want = onnxpress.calibrate(str(MODELS / "resnet.onnx"), data, method="mse")
    (tmp_path / "m").mkdir()
    path = save_model(load_model(MODELS / "resnet.onnx"), tmp_path / "m" / "ext.onnx", external_data=True)
    assert (tmp_path / "m" / "ext.onnx.data").is_file()

    def no_reading(*args, **kwargs):
        raise AssertionError("external data read into the model")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_reading)
    monkeypatch.chdir(tmp_path)  # not the model's folder
    got = onnxpress.calibrate(str(path), data, method="mse")
    assert all((got.ranges[k].min, got.ranges[k].max) == (want.ranges[k].min, want.ranges[k].max) for k in want.ranges)
    assert sorted(os.listdir(tmp_path / "m")) == ["ext.onnx", "ext.onnx.data"]

    (tmp_path / "m" / "ext.onnx.data").write_bytes(b"\0" * 10)  # truncated: still a clear error, before any run
    with pytest.raises(ModelLoadError, match="truncated"):
        onnxpress.calibrate(str(path), data, method="mse")


def test_int4_gptq_gives_way_by_default_when_its_moments_would_not_fit(tmp_path, monkeypatch):
    import sys

    src = MODELS / "transformer.onnx"
    _quantized(src, tmp_path / "rtn.onnx", weights="int4", int4_method="rtn")
    monkeypatch.setattr(sys.modules["onnxpress.quantize"], "GPTQ_MEMORY_BYTES", 1 << 16)  # it needs 4.9 MiB
    default = _quantized(src, tmp_path / "default.onnx", weights="int4")
    assert any("GPTQ's input moments would take" in n for n in default.notes)
    _same_model(load_model(tmp_path / "default.onnx"), load_model(tmp_path / "rtn.onnx"))
    forced = _quantized(src, tmp_path / "forced.onnx", weights="int4", int4_method="gptq")
    assert not any("would take" in n for n in forced.notes)
    assert forced.stats["quantize_weights_int4.weights_int4_gptq"] > 0


def test_validate_leaves_model_files_external_data_to_onnxruntime(tmp_path, monkeypatch):
    from onnxpress.model_io import save_model
    from onnxpress.validate import validate

    test = str(MODELS / "digits32_test.npz")
    ext = save_model(load_model(MODELS / "resnet.onnx"), tmp_path / "ext.onnx", external_data=True)
    want = validate(str(MODELS / "resnet.onnx"), str(MODELS / "mobilenet.onnx"), test, latency=False)

    def no_reading(*args, **kwargs):
        raise AssertionError("external data read into the model")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_reading)
    got = validate(str(ext), str(MODELS / "mobilenet.onnx"), test, latency=False)
    assert [o.sqnr_db for o in got.outputs] == [o.sqnr_db for o in want.outputs]


def test_explicit_int4_gptq_runs_in_rounds_when_its_moments_would_not_fit(tmp_path, monkeypatch):
    import sys

    from tests.test_qdq import sqnr_db

    src = MODELS / "transformer.onnx"
    x = {"input": np.load(MODELS / "digits32_test.npz")["input"][:200]}
    ref = make_session(str(src)).run(None, x)[0]
    once = _quantized(src, tmp_path / "once.onnx", weights="int4", int4_method="gptq")
    monkeypatch.setattr(sys.modules["onnxpress.quantize"], "GPTQ_MEMORY_BYTES", 1 << 20)  # it needs 4.9 MiB
    rounds = _quantized(src, tmp_path / "rounds.onnx", weights="int4", int4_method="gptq")
    note = [n for n in rounds.notes if "rounds of layers" in n]
    assert note and int(note[0].split(" in ")[1].split()[0]) >= 5
    for key in ("weights_int4", "weights_int4_gptq", "weights_int8", "constants_int8"):
        assert rounds.stats[f"quantize_weights_int4.{key}"] == once.stats[f"quantize_weights_int4.{key}"], key
    assert [d.quantized for d in rounds.quantized + rounds.kept_float] == [
        d.quantized for d in once.quantized + once.kept_float
    ]
    got = [sqnr_db(make_session(str(tmp_path / f"{name}.onnx")).run(None, x)[0], ref) for name in ("once", "rounds")]
    # each round's moments come from the model with the earlier rounds 4-bit: as faithful, not the same codes
    assert got[1] > got[0] - 1.0 and got[1] > 35.0, got


@pytest.mark.parametrize("kind", ["float16", "float16-int4", "dynamic"])
def test_float16_and_dynamic_quantize_of_a_large_model_give_the_ordinary_result(tmp_path, monkeypatch, kind):
    """A float16 export (upcast inside) and the no-data dynamic path take the large-model path unchanged; a
    large float16 export with int4 weights keeps computing in float16 by default (no float32 copy)."""
    from tests.test_precision import _half_export

    if kind.startswith("float16"):
        src = tmp_path / "half.onnx"
        name = "resnet" if kind == "float16" else "transformer"
        onnx.save(_half_export(MODELS / f"{name}.onnx"), src)
        kwargs = {"calib": [{"input": np.load(CALIB)["input"][:64].astype(np.float16)}]}
        kwargs.update({"weights": "int4"} if kind == "float16-int4" else {})
    else:
        src, kwargs = MODELS / "transformer.onnx", {}
    plain = onnxpress.quantize(str(src), str(tmp_path / "plain.onnx"),
                               **kwargs, **({"keep_float16": True} if kind == "float16-int4" else {}))
    _lower_the_limit(monkeypatch, 4096)
    out = tmp_path / "large" / "q.onnx"
    out.parent.mkdir()
    big = onnxpress.quantize(str(src), str(out), **kwargs)
    _same_model(load_model(out), load_model(tmp_path / "plain.onnx"))
    assert big.notes == plain.notes and [d.name for d in big.quantized] == [d.name for d in plain.quantized]
