"""float16 exports: computed in float32 inside with their float16 interface kept, and quantized that way."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.precision import store_float16, upcast_float16
from tests import graphs
from tests.conformance import sqnr_db

MODELS = Path(__file__).resolve().parents[1] / "models"
F16 = TensorProto.FLOAT16


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def awkward_fp16() -> onnx.ModelProto:
    """A float16 graph with every place a dtype hides.

    X[2,3] -> MatMul(W) -> h; ConstantOfShape(value fp16 0.5) -> c; Add(h, c) -> Y (output, also read below);
    If(sum(X) > 0; then: Mul(Y, X) reading both from the outer scope; else: Cast(X, to=float16)) -> Z (output);
    Cast(Y, to=float) -> Yf (float32 output); Constant(fp16) * X -> P; X is an output too (passed through).
    """
    r = graphs.rng(0)
    then_g = helper.make_graph([helper.make_node("Mul", ["Y", "X"], ["t"])], "then", [], [_vi("t", F16, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Cast", ["X"], ["e"], to=F16)], "else", [], [_vi("e", F16, [2, 3])])
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h"]),
        helper.make_node("ConstantOfShape", ["shape"], ["c"],
                         value=numpy_helper.from_array(np.array([0.5], np.float16))),
        helper.make_node("Add", ["h", "c"], ["Y"]),
        helper.make_node("ReduceSum", ["X"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["Z"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Cast", ["Y"], ["Yf"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.full((3,), 1.5, np.float16))),
        helper.make_node("Mul", ["X", "k"], ["P"]),
    ]
    g = helper.make_graph(
        nodes, "g", [_vi("X", F16, [2, 3])],
        [_vi("Y", F16, [2, 3]), _vi("Z", F16, [2, 3]), _vi("Yf", TensorProto.FLOAT, [2, 3]), _vi("P", F16, [2, 3]),
         _vi("X", F16, [2, 3])],
        [numpy_helper.from_array(r.standard_normal((3, 3)).astype(np.float16), "W"),
         numpy_helper.from_array(np.array([2, 3], np.int64), "shape"),
         numpy_helper.from_array(np.array(0, np.float16), "zero")],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _expected(m: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph of :func:`awkward_fp16` in float64 numpy."""
    w = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    x = x.astype(np.float64)
    y = x @ w + 0.5
    return {"Y": y, "Z": y * x if x.sum() > 0 else x, "Yf": y, "P": 1.5 * x, "X": x}


@pytest.mark.parametrize("sign", [1.0, -1.0])  # both branches of the If
def test_upcast_keeps_the_interface_and_computes_in_float32(sign):
    model = awkward_fp16()
    before = model.SerializeToString()
    up, info = upcast_float16(model)
    assert model.SerializeToString() == before  # the input model is not modified
    onnx.checker.check_model(up, full_check=True)
    assert info.inputs == ("X",) and info.outputs == ("Y", "Z", "P")  # Yf is float32, X passes through
    assert info.tensors == 4  # W, zero, ConstantOfShape's value, Constant's value
    types = {v.name: v.type.tensor_type.elem_type for v in [*up.graph.input, *up.graph.output]}
    assert types == {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    inferred = onnx.shape_inference.infer_shapes(up, strict_mode=True)
    inner = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert inner["h"] == inner["c"] == inner["s"] == TensorProto.FLOAT  # the graph computes in float32
    x = (sign * np.abs(graphs.rng(1).standard_normal((2, 3)))).astype(np.float16)
    names = [o.name for o in up.graph.output]
    got = dict(zip(names, graphs.run(up, {"X": x}), strict=True))
    orig = dict(zip(names, graphs.run(model, {"X": x}), strict=True))
    for name, want in _expected(model, x).items():
        assert got[name].dtype == orig[name].dtype
        # float32 inside rounds once at the float16 output; the float16 graph rounds at every step
        np.testing.assert_allclose(got[name].astype(np.float64), want, rtol=2e-3, atol=2e-3)
        err_up = np.abs(got[name].astype(np.float64) - want).max()
        assert err_up <= np.abs(orig[name].astype(np.float64) - want).max() + 1e-12


def test_upcast_of_a_float32_model_changes_nothing_that_runs():
    model = graphs.gemm()
    up, info = upcast_float16(model)
    assert info.inputs == info.outputs == () and info.tensors == 0
    assert up.SerializeToString() == model.SerializeToString()


def test_store_float16_is_exact_and_leaves_scales_and_rounding_values_alone():
    r = graphs.rng(2)
    exact = r.standard_normal((8, 8)).astype(np.float16).astype(np.float32)
    inexact = (exact + np.float32(1e-4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["X", "A"], ["a"]),
        helper.make_node("MatMul", ["a", "B"], ["b"]),
        helper.make_node("QuantizeLinear", ["b", "s1", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s1", "z"], ["d"]),
        helper.make_node("FusedMatMul", ["d", "C"], ["Y"], domain="com.microsoft", alpha=1.0),
    ]
    inits = {"A": exact, "B": inexact, "C": exact.T.copy(), "s1": np.float32(0.05), "z": np.uint8(128)}
    graph = helper.make_graph(nodes, "g", [_vi("X", TensorProto.FLOAT, [4, 8])], [_vi("Y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    x = graphs.rng(3).standard_normal((4, 8)).astype(np.float32)
    want = graphs.run(model, {"X": x})[0]
    # A only: B would round, s1 is a Q/DQ scale, C is read by an op outside the standard domain
    assert store_float16(model, min_elements=1) == 1
    onnx.checker.check_model(model)
    kinds = {i.name: i.data_type for i in model.graph.initializer}
    assert kinds["B"] == kinds["C"] == kinds["s1"] == TensorProto.FLOAT and F16 in kinds.values() and "A" not in kinds
    np.testing.assert_array_equal(graphs.run(model, {"X": x})[0], want)  # bit-identical


def _half_export(src: Path) -> onnx.ModelProto:
    """``src`` with its float initializers and float input/output in float16 (what ``model.half()`` exports)."""
    m = onnx.load(src)
    for i, init in enumerate(m.graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                                    init.name))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.elem_type = F16
    del m.graph.value_info[:]
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_quantize_a_float16_export(tmp_path, name):
    """A reference CNN in float16: int8 inside, float16 outside, and the same int8/float choice per node as its
    float32 original (mobilenet's shallow stem stays float behind the input's Cast too)."""
    half = _half_export(MODELS / f"{name}.onnx")
    src = tmp_path / "half.onnx"
    onnx.save(half, src)
    with np.load(MODELS / "digits32_calib.npz") as d:
        np.savez(tmp_path / "calib.npz", input=d["input"][:64].astype(np.float16))
        np.savez(tmp_path / "calib32.npz", input=d["input"][:64])
    with np.load(MODELS / "digits32_test.npz") as d:
        x = d["input"][:128].astype(np.float16)
    out = tmp_path / "q.onnx"
    result = onnxpress.quantize(src, out, calib=tmp_path / "calib.npz")
    assert any(n.startswith("float16: the model computes in float16") for n in result.notes)
    full = onnxpress.quantize(MODELS / f"{name}.onnx", calib=tmp_path / "calib32.npz")
    decided = sorted((d.name, d.quantized, d.reason) for d in [*result.quantized, *result.kept_float])
    assert decided == sorted((d.name, d.quantized, d.reason) for d in [*full.quantized, *full.kept_float])
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert [v.type.tensor_type.elem_type for v in [*q.graph.input, *q.graph.output]] == [F16, F16]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == sum(d.op == "Conv" for d in result.quantized) >= 9
    got = session.run(None, {"input": x})[0]
    want = graphs.run(half, {"input": x})[0]
    assert got.dtype == np.float16
    assert sqnr_db(got.astype(np.float32), want.astype(np.float32)) >= 33.0  # 35-44 dB on the whole test split
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert out.stat().st_size <= 0.55 * src.stat().st_size  # int8 weights against float16 ones: ~0.50
    # validate --layers compares the float16 export's tensors with the quantized model's float32 ones
    layers = onnxpress.validate(src, out, [{"input": x[:16]}], latency=False, layers=True).layers
    assert len(layers) >= 9 and all(math.isfinite(t.sqnr_db) or t.sqnr_db == math.inf for t in layers)


def test_int4_can_keep_a_float16_export_in_float16(tmp_path):
    """keep_float16: MatMulNBits with float16 scales on the float16 activations, no float32 weight copy; by
    default (a small model) the export is computed in float32 inside instead, which runs faster on CPU."""
    half = _half_export(MODELS / "transformer.onnx")
    with np.load(MODELS / "digits32_calib.npz") as d:
        calib = [{"input": d["input"][:128].astype(np.float16)}]
    with np.load(MODELS / "digits32_test.npz") as d:
        x = d["input"][:128].astype(np.float16)
    want = graphs.run(half, {"input": x})[0].astype(np.float32)
    kept = onnxpress.quantize(half, calib=calib, weights="int4", keep_float16=True)
    assert any("keeps doing so: 4-bit weights with float16 scales" in n for n in kept.notes)
    nbits = [n for n in kept.model.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name: i for i in kept.model.graph.initializer}
    assert len(nbits) == 12 and all(inits[n.input[2]].data_type == F16 for n in nbits)  # float16 scales
    assert not [i for i in kept.model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
                and min(i.dims) > 16]  # no float32 copy of a weight matrix  # fmt: skip
    onnx.checker.check_model(kept.model, full_check=True)
    got = graphs.run(kept.model, {"input": x})[0]
    assert got.dtype == np.float16 and sqnr_db(got.astype(np.float32), want) >= 35.0  # 39.8 dB on the test split
    default = onnxpress.quantize(half, calib=calib, weights="int4")
    assert any("quantized in float32 inside" in n for n in default.notes)
    assert sqnr_db(graphs.run(default.model, {"input": x})[0].astype(np.float32), want) >= 35.0
    with pytest.raises(onnxpress.OnnxpressError, match=r"keep_float16 \(--keep-float16\) is for int4 weight-only"):
        onnxpress.quantize(half, calib=calib, keep_float16=True)


def test_int4_gptq_rounds_on_a_kept_float16_export(monkeypatch):
    """GPTQ in rounds measures each round on the model with the earlier rounds already MatMulNBits: shape
    inference leaves those outputs untyped, and the calibration outputs must say float16, not float32."""
    import sys

    monkeypatch.setattr(sys.modules["onnxpress.quantize"], "GPTQ_MEMORY_BYTES", 1 << 20)  # it needs 5 MiB at once
    half = _half_export(MODELS / "transformer.onnx")
    with np.load(MODELS / "digits32_calib.npz") as d:
        calib = [{"input": d["input"][:64].astype(np.float16)}]
    with np.load(MODELS / "digits32_test.npz") as d:
        x = d["input"][:128].astype(np.float16)
    result = onnxpress.quantize(half, calib=calib, weights="int4", keep_float16=True, int4_method="gptq")
    assert any(n.startswith("gptq: int4 GPTQ ran in 5 rounds") for n in result.notes)
    want = graphs.run(half, {"input": x})[0].astype(np.float32)
    assert sqnr_db(graphs.run(result.model, {"input": x})[0].astype(np.float32), want) >= 35.0  # 40.6 measured
