"""onnxpress.quantize and ``onnxpress quantize``: end to end on tiny graphs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxpress
from onnxpress.cli import main
from onnxpress.errors import CalibrationError, OnnxpressError
from tests.graphs import make_model, rng, run
from tests.test_qdq import MODELS, feeds_for, minmax_table, optimized_ops, residual_cnn, sqnr_db


def constant_weight_cnn(opset: int = 11) -> onnx.ModelProto:
    """X[N,4,8,8] -> Conv(Constant W, B) -> BN -> Relu -> Conv(Constant W2) -> Relu -> GAP -> Y[N,16,1,1].

    Four input channels: a 3-channel input conv would stay float (a speed rule), and this model wants both
    convs quantized.
    """
    r = rng(11)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    nodes = [
        const("W", (r.standard_normal((32, 4, 3, 3)) * 0.3).astype(np.float32)),
        const("B", r.standard_normal(32).astype(np.float32)),
        const("gamma", r.uniform(0.5, 1.5, 32).astype(np.float32)),
        const("beta", r.standard_normal(32).astype(np.float32)),
        const("mean", r.standard_normal(32).astype(np.float32) * 0.1),
        const("var", r.uniform(0.5, 2.0, 32).astype(np.float32)),
        const("W2", (r.standard_normal((16, 32, 3, 3)) * 0.1).astype(np.float32)),
        helper.make_node("Conv", ["X", "W", "B"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", 4, 8, 8])], [("Y", ["N", 16, 1, 1])], opset=opset)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quantize_with_table_writes_checked_model(tmp_path: Path) -> None:
    """Table in, model out: result lists quantized/float nodes, size shrinks, output loads in ORT."""
    model = residual_cnn()
    x = feeds_for(model)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    before = digest(src)
    out = tmp_path / "q.onnx"
    res = onnxpress.quantize(src, out, table=minmax_table(model, x))
    assert res.output == out and out.is_file() and digest(src) == before
    assert {d.op for d in res.quantized} >= {"Conv", "Add", "Gemm", "MaxPool", "GlobalAveragePool", "Flatten"}
    assert not res.kept_float
    assert sqnr_db(run(model, x)[0], run(onnx.load(out), x)[0]) > 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx"]


def test_quantize_calibrates_from_feeds(tmp_path: Path) -> None:
    """With calib= (a list of feed dicts) quantize calibrates itself; all methods give a working model."""
    model = residual_cnn()
    x = feeds_for(model, n=32)
    feeds = [{"X": x["X"][i : i + 8]} for i in range(0, 32, 8)]
    for method in ("minmax", "kl"):
        res = onnxpress.quantize(model, calib=feeds, method=method)
        assert res.table is not None and all(r.method == method for r in res.table.ranges.values())
        assert sqnr_db(run(model, x)[0], run(res.model, x)[0]) > 20


def test_opset11_constant_weights(tmp_path: Path) -> None:
    """An opset-11 model with weights in Constant nodes: upgraded, weights quantized, integer kernels."""
    model = constant_weight_cnn()
    x = feeds_for(model)
    res = onnxpress.quantize(model, table=minmax_table(model, x))
    assert onnxpress.model_io.default_opset(res.model) >= 13
    assert not any(n.op_type == "Constant" for n in res.model.graph.node)
    int8 = [i for i in res.model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8) == 2  # both conv weights
    assert res.size_after < 0.5 * res.size_before
    assert sqnr_db(run(model, x)[0], run(res.model, x)[0]) > 30
    assert optimized_ops(res.model, tmp_path).count("QLinearConv") == 2


def test_exclude_and_report(tmp_path: Path) -> None:
    """--exclude by op type keeps those nodes float and says why."""
    model = residual_cnn()
    x = feeds_for(model)
    res = onnxpress.quantize(model, table=minmax_table(model, x), exclude=["op:Gemm", "conv2"])
    why = {d.name: d.reason for d in res.kept_float}
    assert "excluded op type Gemm" in why["fc"] and "excluded by name" in why["conv2"]


def test_exclude_names_that_match_no_node_are_refused() -> None:
    """A typo in a name would quantize the layer meant to stay float; op types and patterns may match nothing."""
    model = residual_cnn()
    table = minmax_table(model, feeds_for(model))
    with pytest.raises(OnnxpressError, match=r"exclude \['conv9'\] matches no node of the model; its node names"):
        onnxpress.quantize(model, table=table, exclude=["conv9", "conv2"])
    res = onnxpress.quantize(model, table=table, exclude=["op:LSTM", "re:^nothing_", "conv2"])
    assert {d.name for d in res.kept_float} == {"conv2"}


def test_options_the_weights_would_ignore_are_refused() -> None:
    model = residual_cnn()
    with pytest.raises(OnnxpressError, match="codebook=4 replaces the linear weights"):
        onnxpress.quantize(model, weights="int4", codebook=4)
    with pytest.raises(OnnxpressError, match=r"per_channel=False \(--per-tensor\) is for int8 weights"):
        onnxpress.quantize(model, weights="int4", per_channel=False)
    w4a8 = r"weights='int4' with activations='int8' \(--weights int4 --activations int8\) "
    for kwargs, message in (({"per_channel": False}, "takes one scale per output channel: drop per_channel"),
                            ({"block_size": 32}, "takes one scale per output channel, not blocks: drop block_size"),
                            ({"int4_method": "rtn"}, "rounds its 4-bit codes as int8 weights are rounded: use "
                                                     "int8_method")):
        with pytest.raises(OnnxpressError, match=w4a8 + message):
            onnxpress.quantize(model, weights="int4", activations="int8", **kwargs)
    # no layer gets int4 weights, so a block size would change nothing
    for kwargs in ({}, {"codebook": 4}):
        with pytest.raises(OnnxpressError, match=r"block_size=32 \(--block-size\) sets the scale blocks of int4"):
            onnxpress.quantize(model, block_size=32, **kwargs)


def test_a_table_of_another_model_is_refused(tmp_path: Path) -> None:
    """Exports share tensor names (X, r, Y): the check is on the table's tensors the model lacks."""
    other = constant_weight_cnn()
    table = minmax_table(other, feeds_for(other))
    model = residual_cnn()
    assert set(table.ranges) & {o for n in model.graph.node for o in n.output}  # some names do overlap
    with pytest.raises(CalibrationError, match=r"the calibration table does not fit this model: \d+ of its"):
        onnxpress.quantize(model, table=table)
    own = minmax_table(model, feeds_for(model))
    own.ranges["left_over"] = own.ranges["X"]  # one tensor the model lacks (an edited export): a note
    res = onnxpress.quantize(model, table=own)
    assert any("1 of the table's" in n and "left_over" in n for n in res.notes)


def test_non_finite_tensor_is_excluded_and_reported() -> None:
    """A -inf mask added before Softmax: calibration excludes it, Softmax stays float, reason reported."""
    r = rng(12)
    mask = np.zeros((4, 4), np.float32)
    mask[np.triu_indices(4, 1)] = -np.inf
    inits = {"Wq": r.standard_normal((8, 8)).astype(np.float32), "mask": mask}
    nodes = [
        helper.make_node("MatMul", ["X", "Wq"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "qt"], ["s"], name="scores"),
        helper.make_node("Add", ["s", "mask"], ["sm"], name="masked"),
        helper.make_node("Softmax", ["sm"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "q"], ["Y"], name="pv"),
    ]
    model = make_model(nodes, [("X", ["N", 4, 8])], [("Y", ["N", 4, 8])], inits)
    x = feeds_for(model, n=8)
    res = onnxpress.quantize(model, calib=[x], method="minmax")
    assert "sm" in res.excluded_tensors
    why = {d.name: d.reason for d in res.kept_float}
    assert "softmax" in why and "'sm'" in why["softmax"]
    ref, out = run(model, x)[0], run(res.model, x)[0]
    assert np.all(np.isfinite(out)) and sqnr_db(ref, out) > 20


def test_a_table_that_leaves_every_layer_without_a_range_is_refused() -> None:
    """One +inf pixel reaches every layer: the model written would be the float one under a new name."""
    from onnxpress.calibration.table import CalibrationTable

    model = residual_cnn()
    table = minmax_table(model, feeds_for(model))
    empty = CalibrationTable({}, {n: "n holds 3 NaN values next to 10 finite ones; left out" for n in table.ranges})
    with pytest.raises(CalibrationError, match=r"no layer was quantized: \d+ of \d+ read a tensor the calibration "
                                               r"has no range for \(\w+: tensor '\w+' has no usable range \(n holds 3"):
        onnxpress.quantize(model, table=empty)
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    res = onnxpress.quantize(model, table=table, exclude=layers)  # every layer float on purpose: taken
    assert not res.quantized and res.kept_float


def test_a_table_that_would_not_fit_the_int8_model_is_refused() -> None:
    """Ranges measured before a float rewrite, or searched for 4-bit values, would clip the int8 model."""
    model = residual_cnn()
    x = feeds_for(model)
    table = onnxpress.calibrate(model, [x], method="mse")
    for kwargs in ({"equalize": "split"}, {"equalize": "activations", "calib": [x]},
                   {"smoothquant": 0.5, "calib": [x]}):
        with pytest.raises(CalibrationError, match=r"rescales activations the table's ranges were measured on"):
            onnxpress.quantize(model, table=table, **kwargs)
    four = onnxpress.calibrate(model, [x], method="mse", bits=4)
    with pytest.raises(CalibrationError, match=r"mse ranges were searched for 4-bit values \(calibrate --bits 4\)"):
        onnxpress.quantize(model, table=four)
    assert onnxpress.quantize(model, table=four, method="minmax").quantized  # minmax reads no bit width


def two_dense_layers() -> onnx.ModelProto:
    """X[N,256] -> MatMul fc1 (256x256) -> Relu -> MatMul fc2 (256x128) -> Y: two int4/codebook-eligible layers."""
    r = rng(21)
    inits = {"W1": (r.standard_normal((256, 256)) * 0.1).astype(np.float32),
             "W2": (r.standard_normal((256, 128)) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["Y"], name="fc2")]
    return make_model(nodes, [("X", ["N", 256])], [("Y", ["N", 128])], inits)


@pytest.mark.parametrize("exclude", [["fc1"], ["re:^fc1$"]])
def test_weight_only_paths_keep_what_exclude_names_float(exclude) -> None:
    """int4 and codebook weights honour node names and re: patterns (int4 dropped op:/re:, codebook all of them)."""
    model = two_dense_layers()
    for kwargs, new_op in (({"weights": "int4"}, "MatMulNBits"), ({"codebook": 4}, "BitShift")):
        res = onnxpress.quantize(model, exclude=exclude, **kwargs)
        assert [d.name for d in res.quantized] == ["fc2"], kwargs
        assert [d.name for d in res.kept_float] == ["fc1"] and "excluded" in res.kept_float[0].reason
        ops = [n.op_type for n in res.model.graph.node]
        assert "MatMul" in ops and new_op in ops  # fc1 still a float MatMul on its float weight
        assert any(i.name == "W1" and i.data_type == onnx.TensorProto.FLOAT for i in res.model.graph.initializer)
    res = onnxpress.quantize(model, weights="int4", exclude=["op:MatMul"])
    assert not res.quantized


def test_weight_only_refuses_what_it_would_not_read() -> None:
    model = two_dense_layers()
    table = minmax_table(model, feeds_for(model))
    for kwargs, named in (({"codebook": 4, "per_channel": False}, r"per_channel=False \(--per-tensor\)"),
                          ({"codebook": 4, "activations": "int8"}, r"activations='int8' \(--activations\)"),
                          ({"codebook": 4, "table": table}, r"table \(--table\)"),
                          ({"weights": "int4", "table": table, "quantize_ops": ["Softmax"]},
                           r"table \(--table\), quantize_ops \(--quantize-ops\) would not apply: drop them")):
        with pytest.raises(OnnxpressError, match=r"is weight-only \(no QDQ; activations stay float\), so " + named):
            onnxpress.quantize(model, **kwargs)
    x = feeds_for(model)
    with pytest.raises(OnnxpressError, match=r"layers \['fc1'\] are in int4_layers \(--int4-layers\) and kept float "
                                             r"by exclude \(--exclude; fc1: excluded op type MatMul\)"):
        onnxpress.quantize(model, calib=[x], int4_layers=["fc1"], exclude=["op:MatMul"])


def test_int4_weight_only() -> None:
    """weights='int4': MatMul/Gemm become MatMulNBits, no calibration needed, size drops below 0.2x."""
    r = rng(13)
    inits = {
        "W": r.standard_normal((128, 256)).astype(np.float32),
        "W2": r.standard_normal((256, 64)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "W2"], ["Y"], name="b"),
    ]
    model = make_model(nodes, [("X", ["N", 128])], [("Y", ["N", 64])], inits)
    res = onnxpress.quantize(model, weights="int4", block_size=64)
    assert [n.op_type for n in res.model.graph.node] == ["MatMulNBits", "MatMulNBits"]
    assert {d.name for d in res.quantized} == {"a", "b"} and res.table is None
    assert res.size_ratio < 0.2
    x = feeds_for(model)
    assert sqnr_db(run(model, x)[0], run(res.model, x)[0]) > 10


def test_errors_are_typed() -> None:
    """No data, bad options and bad overrides raise our errors with what to do."""
    model = residual_cnn()
    with pytest.raises(CalibrationError, match="calib="):
        onnxpress.quantize(model)
    with pytest.raises(OnnxpressError, match="weights must be one of"):
        onnxpress.quantize(model, weights="int2")
    with pytest.raises(OnnxpressError, match="activations must be one of"):
        onnxpress.quantize(model, activations="fp8")
    with pytest.raises(OnnxpressError, match="bad override"):
        onnxpress.quantize(model, table=minmax_table(model, feeds_for(model)), overrides={"X": {"dtype": "int16"}})
    with pytest.raises(OnnxpressError, match=r"overrides name tensors the model does not have: \['nope'\]"):
        onnxpress.quantize(model, table=minmax_table(model, feeds_for(model)), overrides={"nope": {"dtype": "float"}})
    table = minmax_table(model, feeds_for(model))
    for bad in ((5.0, 1.0), (1.0, 1.0), (float("nan"), 1.0), (float("-inf"), float("inf")), ("a", 1)):
        with pytest.raises(OnnxpressError, match=r"bad override for tensor 'X': override range must be"):
            onnxpress.quantize(model, table=table, overrides={"X": {"range": bad}})
    with pytest.raises(OnnxpressError, match="invalid exclude pattern"):
        onnxpress.quantize(model, exclude=["re:("])
    with pytest.raises(OnnxpressError, match="block_size"):
        onnxpress.quantize(model, weights="int4", block_size=10)


def test_method_override_from_histograms() -> None:
    """A per-tensor method override recomputes that tensor's range from the kept histogram."""
    model = residual_cnn()
    x = feeds_for(model, n=32)
    res = onnxpress.quantize(model, calib=[x], method="kl", overrides={"r1": {"method": "minmax"}})
    assert res.table.ranges["r1"].method == "minmax"
    assert res.table.ranges["c2"].method == "kl"
    assert res.table.ranges["r1"].max == pytest.approx(float(minmax_table(model, x)["r1"].max), rel=1e-6)


def test_cli_override_reaches_the_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--override TENSOR:KEY=VALUE: the same model as overrides= in the API; bad settings are usage errors."""
    model = residual_cnn()
    src, out, data = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    x = feeds_for(model, n=16)["X"]
    np.savez(data, X=x)
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "--method", "kl", "-q",
                 "--override", "r1:method=minmax", "--override", "c2:dtype=float", "--override", "mp:range=0:4"]) == 0
    want = onnxpress.quantize(model, calib=data, method="kl",
                              overrides={"r1": {"method": "minmax"}, "c2": {"dtype": "float"}, "mp": {"range": (0, 4)}})
    assert onnx.load(out).SerializeToString() == want.model.SerializeToString()
    assert want.table.ranges["r1"].method == "minmax"
    plain = onnxpress.quantize(model, calib=data, method="kl")
    assert plain.model.SerializeToString() != want.model.SerializeToString()  # the overrides changed the model
    capsys.readouterr()
    for bad in ("r1", "r1:bits=4", "mp:range=4", "w:per_channel=maybe"):
        with pytest.raises(SystemExit):
            main(["quantize", str(src), "-o", str(out), "--calib", str(data), "--override", bad])
        assert "--override" in capsys.readouterr().err


def test_cli_quantize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command prints quantized/float counts and sizes; errors print one line and exit 2."""
    model = residual_cnn()
    src, out, data = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(data, X=feeds_for(model, n=16)["X"])
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "--method", "minmax", "-q",
                 "--exclude", "fc"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "Conv" in text and "float  fc (Gemm): excluded by name" in text and "MB ->" in text
    assert out.is_file()
    assert main(["quantize", str(src), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "calib" in capsys.readouterr().err
    assert main(["quantize", str(src), "-o", str(src), "--calib", str(data)]) == 2


@pytest.mark.parametrize("name", ["resnet_opset11", "resnet_constants"])
def test_reference_variants_quantize_to_integer_kernels(name: str, tmp_path: Path) -> None:
    """The opset-11 and Constant-weight exports of the residual CNN: every Conv an integer kernel."""
    src = MODELS / f"{name}.onnx"
    if not src.exists():
        pytest.skip(f"models/{name}.onnx not built yet")
    calib = {"input": np.load(MODELS / "digits32_calib.npz")["input"][:64]}
    res = onnxpress.quantize(src, tmp_path / "q.onnx", calib=[calib])
    n_conv = sum(1 for n in onnx.load(src).graph.node if n.op_type == "Conv")
    opt = optimized_ops(res.model, tmp_path)
    assert n_conv == 9 and opt.count("QLinearConv") == n_conv
    assert "QLinearGlobalAveragePool" in opt  # the ReduceMean head, as a pool (passes/global_pool.py)
    test = np.load(MODELS / "digits32_test.npz")["input"][:200]
    assert sqnr_db(run(onnx.load(src), {"input": test})[0], run(res.model, {"input": test})[0]) > 30
    assert res.size_ratio < 0.3


def test_int8_mode_stores_large_leftover_constants_int8() -> None:
    """A positional-embedding-like constant that no quantized node takes is stored int8 (error <= s/2)."""
    r = rng(15)
    pos = (r.standard_normal((1, 64, 32)) * 0.05).astype(np.float32)
    inits = {"W": r.standard_normal((16, 32)).astype(np.float32), "pos": pos}
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h"], name="embed"),
        helper.make_node("Add", ["h", "pos"], ["e"], name="add_pos"),
        helper.make_node("Tanh", ["e"], ["Y"]),
    ]
    model = make_model(nodes, [("X", ["N", 64, 16])], [("Y", ["N", 64, 32])], inits)
    x = feeds_for(model)
    res = onnxpress.quantize(model, table=minmax_table(model, x))
    assert res.stats["store_constants_int8.constants_int8"] == 1
    dq = next(n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("pos"))
    inits_q = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    back = inits_q[dq.input[0]].astype(np.float32) * inits_q[dq.input[1]]
    assert np.abs(back - pos).max() <= np.abs(pos).max() / 127 / 2 * (1 + 1e-5)
    assert "W" not in {i.name for i in res.model.graph.initializer}  # the MatMul weight went through InsertQDQ
    kept = onnxpress.quantize(model, table=minmax_table(model, x), constants_int8_min_size=None)
    assert "pos" in {i.name for i in kept.model.graph.initializer}


def two_matmuls() -> onnx.ModelProto:
    """X[N,128] -> MatMul(W[128,256], "a") -> Relu -> MatMul(W2[256,64], "b") -> Y[N,64]."""
    r = rng(17)
    inits = {
        "W": (r.standard_normal((128, 256)) * 0.1).astype(np.float32),
        "W2": (r.standard_normal((256, 64)) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h"], name="a"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["Y"], name="b"),
    ]
    return make_model(nodes, [("X", ["N", 128])], [("Y", ["N", 64])], inits)


def _packed(model: onnx.ModelProto) -> list[bytes]:
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]).tobytes() for n in model.graph.node if n.op_type == "MatMulNBits"]


def test_int4_layers_mix_with_int8() -> None:
    """int4_layers=["a"]: a runs MatMulNBits with the same 4-bit weights as uniform int4, b gets int8 QDQ."""
    model = two_matmuls()
    before = model.SerializeToString()
    x = {"X": rng(3).standard_normal((64, 128)).astype(np.float32)}
    mixed = onnxpress.quantize(model, calib=[x], int4_layers=["a"], block_size=64)
    int8 = onnxpress.quantize(model, calib=[x])
    int4 = onnxpress.quantize(model, calib=[x], weights="int4", exclude=["b"], block_size=64)
    assert model.SerializeToString() == before
    ops = [n.op_type for n in mixed.model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 1 and "QuantizeLinear" in ops
    b = next(n for n in mixed.model.graph.node if n.op_type == "MatMul")
    producers = {o: n.op_type for n in mixed.model.graph.node for o in n.output}
    assert [producers.get(i) for i in b.input] == ["DequantizeLinear", "DequantizeLinear"]  # b is int8 QDQ
    assert _packed(mixed.model) == _packed(int4.model)  # the same GPTQ rounding of a
    assert {d.name for d in mixed.quantized} >= {"a", "b"}
    assert mixed.stats["quantize_weights_int4.weights_int4"] == 1
    assert mixed.size_after < 0.7 * int8.size_after
    ref, got = run(model, x)[0], run(mixed.model, x)[0]
    # measured 26.2 dB: int4 on a dominates (a alone at int4, b float: 26.4; int8 everywhere: 37.1)
    assert sqnr_db(ref, got) > sqnr_db(ref, run(int4.model, x)[0]) - 1.0 > 24


def test_cli_int4_layers(tmp_path: Path, capsys) -> None:
    """--int4-layers a: a becomes MatMulNBits, b int8 QDQ; an unknown layer name exits 2 naming the valid ones."""
    src = tmp_path / "m.onnx"
    onnx.save(two_matmuls(), src)
    np.savez(tmp_path / "calib.npz", X=rng(3).standard_normal((64, 128)).astype(np.float32))
    out = tmp_path / "q.onnx"
    args = ["quantize", str(src), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "-q"]
    assert main([*args, "--int4-layers", "a"]) == 0
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulNBits") == 1 and "QuantizeLinear" in ops
    assert main([*args, "--int4-layers", "nope"]) == 2
    assert "not MatMul/Gemm layers" in capsys.readouterr().err


def test_int4_layers_errors() -> None:
    """int4_layers names MatMul/Gemm layers of an int8 model; anything else is a typed error."""
    model = two_matmuls()
    x = {"X": rng(3).standard_normal((16, 128)).astype(np.float32)}
    with pytest.raises(OnnxpressError, match="not MatMul/Gemm layers.*choose among"):
        onnxpress.quantize(model, calib=[x], int4_layers=["relu"])
    with pytest.raises(OnnxpressError, match="weights='int8'"):
        onnxpress.quantize(model, calib=[x], weights="int4", int4_layers=["a"])
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="a")]
    fed = make_model(nodes, [("X", ["N", 128]), ("W", [128, 256])], [("Y", ["N", 256])])
    feeds = {**x, "W": np.ones((128, 256), np.float32)}
    with pytest.raises(OnnxpressError, match="cannot take 4-bit weights: a .weight is not a constant"):
        onnxpress.quantize(fed, calib=[feeds], int4_layers=["a"])


def test_bias_correction_is_on_by_default_with_calibration_data() -> None:
    """Default int8 quantize corrects biases on the calibration data: on the concat reference model the
    test-split logit SQNR rises by several dB (measured +5.3); a table alone or ``bias_correction=False``
    leaves every bias as rounded from the float model."""
    src = MODELS / "concat.onnx"
    calib = [{"input": np.load(MODELS / "digits32_calib.npz")["input"][:128]}]
    test = {"input": np.load(MODELS / "digits32_test.npz")["input"][:200]}
    ref = run(onnx.load(src), test)[0]
    # rounded to nearest on both sides: GPTQ rounding (the default with data) already takes most of the
    # weights' mean shift, and a table alone has no data for it
    plain = onnxpress.quantize(src, calib=calib, bias_correction=False, int8_method="rtn")
    default = onnxpress.quantize(src, calib=calib, int8_method="rtn")
    from_table = onnxpress.quantize(src, table=plain.table)
    gain = sqnr_db(ref, run(default.model, test)[0]) - sqnr_db(ref, run(plain.model, test)[0])
    assert gain > 2.0, gain
    assert from_table.model.SerializeToString() == plain.model.SerializeToString()
    assert default.model.SerializeToString() != plain.model.SerializeToString()


def test_cli_no_bias_correction(tmp_path: Path) -> None:
    """``--no-bias-correction`` writes what ``bias_correction=False`` builds, byte for byte."""
    model = residual_cnn()
    src, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    x = feeds_for(model, n=16)["X"]
    np.savez(data, X=x)
    assert main(["quantize", str(src), "-o", str(tmp_path / "a.onnx"), "--calib", str(data), "-q",
                 "--no-bias-correction"]) == 0  # fmt: skip
    plain = onnxpress.quantize(src, calib=[{"X": x}], bias_correction=False)
    assert (tmp_path / "a.onnx").read_bytes() == plain.model.SerializeToString()


def bn_between_convs(x: np.ndarray) -> onnx.ModelProto:
    """X[N,4,8,8] -> Conv1 -> BatchNorm (running stats = Conv1's on ``x``) -> Relu -> Conv2 (skewed ranges) -> Y."""
    r = rng(31)
    w1 = (r.standard_normal((6, 4, 3, 3)) * 0.4).astype(np.float32)
    w2 = r.standard_normal((5, 6, 3, 3)) * np.exp(r.uniform(-2.5, 2.0, 5))[:, None, None, None]
    conv1 = make_model([helper.make_node("Conv", ["X", "W1"], ["c"], pads=[1, 1, 1, 1])],
                       [("X", ["N", 4, 8, 8])], [("c", ["N", 6, 8, 8])], {"W1": w1})
    c = run(conv1, {"X": x})[0]
    inits = {"W1": w1, "W2": w2.astype(np.float32), "B2": r.standard_normal(5).astype(np.float32),
             "gamma": r.uniform(0.5, 2.0, 6).astype(np.float32), "beta": r.normal(0.3, 1.0, 6).astype(np.float32),
             "mean": c.mean(axis=(0, 2, 3)).astype(np.float32), "var": c.var(axis=(0, 2, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["X", "W1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["a"]),
             helper.make_node("Conv", ["a", "W2", "B2"], ["Y"], pads=[1, 1, 1, 1], name="conv2")]
    return make_model(nodes, [("X", ["N", 4, 8, 8])], [("Y", ["N", 5, 8, 8])], inits)


def test_table_only_quantize_corrects_biases_from_batchnorm_statistics() -> None:
    """No calibration data, a BN before the layer: the default corrects its bias analytically (β, γ give
    E[x]); the mean output error of per-tensor int8 falls well below the uncorrected model's."""
    x = rng(32).standard_normal((400, 4, 8, 8)).astype(np.float32)
    model = bn_between_convs(x)
    table = onnxpress.calibrate(model, [{"X": x[:64]}], method="minmax")
    ref = run(model, {"X": x})[0]
    plain = onnxpress.quantize(model, table=table, per_channel=False, bias_correction=False).model
    fixed = onnxpress.quantize(model, table=table, per_channel=False).model
    err = lambda m: np.abs((run(m, {"X": x})[0] - ref).mean(axis=(0, 2, 3))).sum()  # noqa: E731
    assert err(fixed) < 0.5 * err(plain), (err(fixed), err(plain))
    with pytest.raises(CalibrationError, match="BatchNorm"):
        onnxpress.quantize(residual_cnn(), table=minmax_table(residual_cnn(), feeds_for(residual_cnn())),
                           bias_correction=True)


def test_codebook_with_calibration_data_picks_indices_against_the_output_error() -> None:
    """``codebook=4`` with calib chooses indices from each layer's input moments: the same codebook bytes,
    closer logits than nearest-centroid indices on the residual CNN."""
    model = residual_cnn()
    x = feeds_for(model, n=64)
    ref = run(model, x)[0]
    nearest = onnxpress.quantize(model, codebook=4).model
    fed = onnxpress.quantize(model, codebook=4, calib=[x]).model
    assert sqnr_db(ref, run(fed, x)[0]) > sqnr_db(ref, run(nearest, x)[0]) + 1.0
    assert abs(fed.ByteSize() - nearest.ByteSize()) < 64


def test_bias_correction_with_non_int8_weights_is_refused_with_or_without_data() -> None:
    model = residual_cnn()
    for calib in (None, [feeds_for(model)]):
        with pytest.raises(OnnxpressError, match="bias correction is for int8 weights"):
            onnxpress.quantize(model, calib=calib, weights="int4", bias_correction=True)
        with pytest.raises(OnnxpressError, match="bias correction is for int8 weights"):
            onnxpress.quantize(model, calib=calib, codebook=4, bias_correction=True)


def test_cli_groups_nodes_left_float_by_op_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Five excluded convs: one line naming three and counting the rest; -v prints a line per node."""
    from onnxpress.commands.quantize import print_kept_float
    from onnxpress.passes.qdq import NodeDecision

    decisions = [NodeDecision(f"c{i}", "Conv", False, "excluded by name") for i in range(5)]
    decisions.append(NodeDecision("fc", "Gemm", False, "excluded by op type"))
    print_kept_float(decisions)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["float  5 x Conv: excluded by name: c0, c1, c2, ... (2 more; -v lists them)",
                     "float  fc (Gemm): excluded by op type"]  # fmt: skip
    print_kept_float(decisions, verbose=True)
    assert capsys.readouterr().out.splitlines()[:2] == ["float  c0 (Conv): excluded by name",
                                                        "float  c1 (Conv): excluded by name"]  # fmt: skip


def test_float16_model_is_quantized_with_its_float16_interface(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A float16 export had nothing quantized and was written back unchanged, then was refused; now it is
    quantized in float32 inside (onnxpress.precision), takes and gives float16, and the CLI says so."""
    r = rng(41)
    w = numpy_helper.from_array(r.standard_normal((64, 32)).astype(np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")], "half",
                              [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT16, ["n", 64])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT16, ["n", 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = r.standard_normal((16, 64)).astype(np.float16)
    result = onnxpress.quantize(model, calib=[{"X": x}])
    assert [d.op for d in result.quantized] == ["MatMul"]
    assert [v.type.tensor_type.elem_type for v in [*result.model.graph.input, *result.model.graph.output]] == [
        onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT16]
    want = run(model, {"X": x})[0].astype(np.float32)
    got = run(result.model, {"X": x})[0]
    assert got.dtype == np.float16 and sqnr_db(got.astype(np.float32), want) >= 30.0
    src = tmp_path / "half.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "d.npz", X=x)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "d.npz")]) == 0
    out = capsys.readouterr().out
    assert "the model computes in float16 (1 layers): quantized in float32 inside" in out
    assert "its float16 inputs and outputs stay float16 (X, Y)" in out


def test_cli_says_a_quantized_convtranspose_runs_in_float(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onnxruntime's CPU provider has no integer ConvTranspose: the CLI says its int8 weights are storage only."""
    w = rng(71).standard_normal((8, 8, 2, 2)).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["X", "W"], ["t"], strides=[2, 2]),
             helper.make_node("Relu", ["t"], ["Y"])]
    model = make_model(nodes, [("X", ["N", 8, 4, 4])], [("Y", ["N", 8, 8, 8])], {"W": w})
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, path)
    np.savez(data, X=rng(72).standard_normal((16, 8, 4, 4)).astype(np.float32))
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(data)]) == 0
    assert "1 ConvTranspose quantized for storage" in capsys.readouterr().out


def test_codebook_layers_mix_codebook_weights_into_an_int8_model(tmp_path: Path, capsys) -> None:
    """codebook_layers: the named conv keeps a float kernel on 4-bit codebook weights (at most 16 levels per output
    channel), the others are int8 QDQ as before; a recipe step with the field builds the same bytes; bad names
    and a layer both excluded and listed are refused."""
    from onnxpress.recipe import apply_recipe

    model = residual_cnn()
    data = tmp_path / "d.npz"
    np.savez(data, X=rng(5).standard_normal((16, 3, 8, 8)).astype(np.float32))
    mixed = onnxpress.quantize(model, calib=str(data), codebook_layers=["conv2"], max_samples=256)
    assert mixed.stats["codebook_weights.weights"] == 1
    conv2 = next(n for n in mixed.model.graph.node if n.name == "conv2")
    producer = {o: n for n in mixed.model.graph.node for o in n.output}
    assert producer[conv2.input[1]].op_type != "DequantizeLinear"  # rebuilt from codes, not an int8 weight
    probe = onnx.ModelProto()
    probe.CopyFrom(mixed.model)
    probe.graph.output.append(helper.make_tensor_value_info(conv2.input[1], onnx.TensorProto.FLOAT, None))
    w = run(probe, {"X": np.zeros((1, 3, 8, 8), np.float32)})[-1]
    assert max(np.unique(w[c]).size for c in range(w.shape[0])) <= 16
    conv1 = {d.name: d for d in mixed.quantized}["conv1"]
    assert conv1.quantized and {d.name: d.reason for d in mixed.quantized}["conv2"] == "4-bit codebook weights"
    # its 576 weights: 288 B of codes, 16 levels and 8 channel scales (int8: 576 B); on so small a layer the
    # rebuild's nodes cost more than that saves, which optimize's size search measures per layer
    assert mixed.stats["codebook_weights.bytes_after"] == 288 + 4 * (16 + 8) < 576
    ref = run(model, {"X": rng(6).standard_normal((8, 3, 8, 8)).astype(np.float32)})[0]
    out = run(mixed.model, {"X": rng(6).standard_normal((8, 3, 8, 8)).astype(np.float32)})[0]
    assert sqnr_db(ref, out) > 20
    recipe = {"version": 1, "steps": [{"pass": "quantize", "codebook_layers": ["conv2"], "bias_correction": True,
                                       "int8_method": "auto"}]}
    assert apply_recipe(model, recipe, str(data)).SerializeToString() == mixed.model.SerializeToString()
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "--codebook-layers", "conv2", "-q",
                 "--no-latency-check", "--max-samples", "256"]) == 0
    assert out.read_bytes() == mixed.model.SerializeToString()
    assert "1 layer(s) as 4-bit codebook weights on float kernels" in capsys.readouterr().out
    with pytest.raises(OnnxpressError, match=r"codebook_layers \['nope'\] are not layers of the model"):
        onnxpress.quantize(model, calib=str(data), codebook_layers=["nope"])
    with pytest.raises(OnnxpressError, match=r"are in codebook_layers \(--codebook-layers\) and kept float by exclude"):
        onnxpress.quantize(model, calib=str(data), codebook_layers=["conv2"], exclude=["conv2"])
    with pytest.raises(OnnxpressError, match="codebook_layers mixes codebook layers into an int8 QDQ model"):
        onnxpress.quantize(model, calib=str(data), codebook_layers=["conv2"], weights="int4")


def test_int4_on_a_model_without_matmul_or_gemm_is_refused(tmp_path: Path) -> None:
    """int4 weight-only takes MatMul/Gemm layers only: on a CNN it quantized nothing and wrote the model back at
    1.000x; now refused. Dynamic int8 (as the no-data default does) writes it as it was, with a note saying why."""
    from onnxpress.errors import UnsupportedModelError

    out = tmp_path / "q.onnx"
    from tests.graphs import conv_bn_relu

    with pytest.raises(UnsupportedModelError, match=r"weight-only for MatMul/Gemm .* none \(1 x Conv\); quantize it "
                                                     r"int8 \(the default\) instead"):
        onnxpress.quantize(conv_bn_relu(), out, weights="int4")
    assert not out.exists()
    dynamic = onnxpress.quantize(conv_bn_relu(), activations="dynamic")  # written as it was, and said so
    assert any(n.startswith("dynamic: no layer was quantized: dynamic int8 takes MatMul/Gemm and LSTM layers only, "
                            "and this model's 1 convolution(s) need calibration data") for n in dynamic.notes)


def test_fidelity_line_warns_when_the_outputs_drift(capsys: pytest.CaptureFixture[str]) -> None:
    """SQNR over the float outputs and top-1 agreement of 2-D logits; a warning below 20 dB; outputs of other
    shapes or integer types are left out."""
    from onnxpress.commands.quantize import _fidelity_line

    logits = rng(3).standard_normal((40, 10)).astype(np.float32)
    ids = np.arange(40)
    _fidelity_line([logits, ids], [logits + 0.01 * logits.std(), ids + 1])
    text = capsys.readouterr().out
    assert text.startswith("fidelity 40.0 dB SQNR over the float outputs, top-1 agreement ") and "warning" not in text
    _fidelity_line([logits], [logits + 0.3 * rng(4).standard_normal(logits.shape).astype(np.float32)])
    text = capsys.readouterr().out
    assert re.match(r"fidelity 10\.\d dB", text) and "warning: below 20 dB" in text
    _fidelity_line([logits], [logits[:5]])
    assert capsys.readouterr().out == ""


def test_cli_checks_the_written_models_latency(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """After writing, the CLI times both models on the first calibration batch and warns when it got slower."""
    from onnxpress import runtime
    from onnxpress.commands import quantize as command

    src, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "q.onnx"
    onnx.save(residual_cnn(), src)
    np.savez(data, X=rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32))
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "-q"]) == 0
    printed = capsys.readouterr().out.splitlines()
    line = next(x for x in printed if x.startswith("latency "))
    assert "x the original (first calibration batch of 8, 10 interleaved runs each" in line
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "--max-samples", "5", "-q"]) == 0
    assert "(first calibration batch of 5," in capsys.readouterr().out  # within --max-samples
    fidelity = next(x for x in printed if x.startswith("fidelity "))
    assert re.fullmatch(r"fidelity \d+\.\d dB SQNR over the float outputs, top-1 agreement 100\.0% on that batch "
                        r"\(onnxpress validate .*\)", fidelity), fidelity
    assert float(fidelity.split()[1]) > 25 and not any(x.startswith("warning: below") for x in printed)
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "-q", "--no-latency-check"]) == 0
    assert "latency" not in capsys.readouterr().out
    timings = [[1.0] * 3, [1.5] * 3, [0.4] * 3]  # original, quantized, cleaned float (when timed)
    monkeypatch.setattr(runtime, "time_interleaved", lambda sessions, feed, rounds, warmup: timings[: len(sessions)])
    assert command.latency_check(str(src), str(out), str(data)) == pytest.approx(1.5)
    text = capsys.readouterr().out
    assert "latency 1.50x the original" in text and "warning: the quantized model ran slower than the original" in text
    # a PRelu that cleanup rewrites: the float model it writes is timed too, and named when it ran faster
    prelu = make_model([helper.make_node("PRelu", ["X", "s"], ["Y"])], [("X", ["N", 3, 8, 8])],
                       [("Y", ["N", 3, 8, 8])], {"s": np.full((3, 1, 1), 0.2, np.float32)})  # fmt: skip
    onnx.save(prelu, src)
    timings[1] = [0.5] * 3
    assert command.latency_check(str(src), str(out), str(data)) == pytest.approx(0.5)
    assert "the float model that onnxpress cleanup writes (exact rewrites, no quantization) ran 0.40x here, faster " \
           "than the quantized one" in capsys.readouterr().out
    monkeypatch.setattr(command, "LATENCY_CHECK_MAX_BYTES", 10)
    assert command.latency_check(str(src), str(out), str(data)) is None  # too large to time: skipped


def test_a_model_input_without_a_batch_axis_is_quantized():
    """x[8] @ W[8, 16] (a vector-matrix MatMul): GPTQ's input moments took every input as [samples, ...] and
    crashed on the rank-1 tensor; one vector is one row."""
    r = rng(11)
    inits = {"W": r.standard_normal((8, 16)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [("x", [8])], [("y", [16])], inits)
    x = r.standard_normal(8).astype(np.float32)
    res = onnxpress.quantize(model, calib=[{"x": x}])
    assert "QuantizeLinear" in {n.op_type for n in res.model.graph.node}
    assert sqnr_db(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) > 30


def test_an_override_that_changes_nothing_is_named() -> None:
    """An override on a tensor that stays float (the graph output) has no effect: a note names it."""
    model = residual_cnn()
    x = feeds_for(model, n=16)
    plain = onnxpress.quantize(model, calib=[x])
    res = onnxpress.quantize(model, calib=[x], overrides={"Y": {"range": (-1.0, 1.0)}, "r1": {"range": (0.0, 4.0)}})
    idle = [n for n in res.notes if n.startswith("override: ")]
    assert len(idle) == 1 and "'Y'" in idle[0] and "'r1'" not in idle[0], res.notes
    assert res.model.SerializeToString() != plain.model.SerializeToString()  # r1's range took effect
    # asking for float where the tensor is float anyway is what was asked: no note
    kept = onnxpress.quantize(model, calib=[x], overrides={"Y": {"dtype": "float"}})
    assert not [n for n in kept.notes if n.startswith("override: ")]


@pytest.mark.parametrize(("override", "match"), [
    ({"W1": {"dtype": "float"}}, r"'W1' is a weight and takes per_channel only, not dtype \(to keep its layer float"),
    ({"W1": {"range": (-1.0, 1.0), "method": "kl"}}, r"'W1' is a weight and takes per_channel only, not range, method"),
    ({"r1": {"per_channel": False}}, r"'r1' is an activation \(one scale per tensor\) and takes dtype, range and "
                                     r"method, not per_channel"),
])
def test_override_keys_the_tensor_does_not_take_are_refused(override, match) -> None:
    """They changed no byte of the model (a weight's scale comes from its values; an activation has one scale)."""
    model = residual_cnn()
    with pytest.raises(OnnxpressError, match=r"overrides \(--override\) that would change nothing: " + match):
        onnxpress.quantize(model, calib=[feeds_for(model)], overrides=override)


def test_method_and_overrides_where_nothing_is_calibrated_are_refused() -> None:
    """int4 weight-only, dynamic activations, no data: a named method or an override would do nothing."""
    model, cnn = two_matmuls(), residual_cnn()
    x = feeds_for(model)
    with pytest.raises(OnnxpressError, match=r"method='kl' \(--method\) .*weights='int4' is weight-only"):
        onnxpress.quantize(model, weights="int4", method="kl", calib=[x])
    with pytest.raises(OnnxpressError, match=r"overrides \(--override\) .*activations='dynamic'"):
        onnxpress.quantize(model, activations="dynamic", overrides={"X": {"dtype": "int8"}})
    with pytest.raises(CalibrationError, match=r"method='minmax' \(--method\) sets int8 activation ranges.*--calib"):
        onnxpress.quantize(cnn, method="minmax")
    with pytest.raises(CalibrationError, match=r"overrides \(--override\) set int8 activation ranges"):
        onnxpress.quantize(model, overrides={"X": {"range": (-1.0, 1.0)}})


def test_a_method_named_with_a_table_recomputes_its_ranges_from_the_histograms(tmp_path: Path) -> None:
    """--table T --method M: M's ranges from T's histograms (the same as calibrating with M); bare ranges refused."""
    model = residual_cnn()
    x = feeds_for(model, n=32)
    kl = onnxpress.calibrate(model, [x], method="kl")
    direct = onnxpress.calibrate(model, [x], method="percentile")
    res = onnxpress.quantize(model, table=kl, method="percentile")
    assert res.table.meta["method"] == "percentile"
    for name, r in direct.ranges.items():
        assert (res.table[name].min, res.table[name].max) == pytest.approx((r.min, r.max), rel=1e-6), name
    moved = [n for n in direct.ranges if abs(direct[n].max - kl[n].max) > 1e-3 * abs(kl[n].max)]
    assert moved  # the two methods differ here, so the test can see which one was used
    same = onnxpress.quantize(model, table=kl)  # no method: the table's ranges as they are
    assert same.table[moved[0]].max == pytest.approx(kl[moved[0]].max)
    with pytest.raises(CalibrationError, match=r"ranges without histograms .* method='kl' \(--method\)"):
        onnxpress.quantize(model, table=minmax_table(model, x), method="kl")
    src, data, path = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "t.npz"
    onnx.save(model, src)
    np.savez(data, X=x["X"])
    kl.save(path)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--table", str(path), "--method",
                 "percentile", "-q"]) == 0
    assert onnx.load(tmp_path / "q.onnx").SerializeToString() == res.model.SerializeToString()


def test_a_model_saved_after_onnxruntimes_optimisations_is_quantized_around_its_fused_ops(tmp_path):
    """FusedConv stopped onnx's shape inference: the tensors after it went uncalibrated and quantize blamed
    NaN/inf values in the data; lowrank asked for static shapes the model had."""
    import onnxruntime as ort

    from onnxpress.errors import UnsupportedModelError
    from tests.test_qdq import feeds_for, residual_cnn

    model = residual_cnn()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert any(n.op_type == "FusedConv" for n in fused.graph.node)
    feeds = feeds_for(model)
    res = onnxpress.quantize(fused, calib=[feeds])
    assert any(n.startswith("float: kept float, no QDQ form: com.microsoft::FusedConv x") for n in res.notes)
    assert any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)
    with pytest.raises(UnsupportedModelError, match=r"stops at the model's com\.microsoft::FusedConv"):
        onnxpress.lowrank(fused, flops=0.5)
