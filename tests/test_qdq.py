"""InsertQDQ: numerics on onnxruntime (ORT_DISABLE_ALL) and integer kernels in its optimised graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxpress.calibration.table import CalibrationTable
from onnxpress.errors import UnsupportedModelError
from onnxpress.model_io import infer_shapes
from onnxpress.passes.matmul_bias import MatMulBiasToOutputRank
from onnxpress.passes.qdq import (
    InsertQDQ,
    QParams,
    Selection,
    TensorOverride,
    activation_qparams,
    bias_qparams,
    dequantize_array,
    quantize_array,
    weight_qparams,
)
from onnxpress.pipeline import run_passes
from onnxpress.runtime import make_session
from tests.graphs import make_model, rng, run

MODELS = Path(__file__).resolve().parent.parent / "models"


def minmax_table(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> CalibrationTable:
    """Min/max of every float value of ``model`` on ``feeds`` (test helper, not a calibrator)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(inferred)
    have = {o.name for o in probe.graph.output}
    for vi in inferred.graph.value_info:
        if vi.name not in have and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            probe.graph.output.append(vi)
    values = run(probe, feeds)
    ranges = {o.name: (float(v.min()), float(v.max())) for o, v in zip(probe.graph.output, values, strict=True)}
    ranges.update({k: (float(v.min()), float(v.max())) for k, v in feeds.items()})
    return CalibrationTable.from_ranges(ranges, method="minmax")


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


def quantize_graph(model, feeds, **kwargs):
    """Calibrate min/max on ``feeds``, run InsertQDQ, return (pass, result model)."""
    p = InsertQDQ(minmax_table(model, feeds), **kwargs)
    out = run_passes(model, [p]).model
    onnx.checker.check_model(out, full_check=True)
    return p, out


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """Op types of onnxruntime's optimised graph (all optimisations on)."""
    path = tmp_path / "optimized.onnx"
    make_session(model, optimized_model_path=str(path))
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """X[N,3,8,8] -> Conv-Relu -> r1 -> Conv -> Add(r1) -> Clip(0,6) -> MaxPool -> GAP -> Flatten -> Gemm -> Y."""
    r = rng(seed)
    inits = {
        "W1": (r.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
        "B1": r.standard_normal(8).astype(np.float32),
        "W2": (r.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32),
        "B2": r.standard_normal(8).astype(np.float32),
        "Wf": r.standard_normal((10, 8)).astype(np.float32),
        "Bf": r.standard_normal(10).astype(np.float32),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Clip", ["a", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("MaxPool", ["r2"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["mp"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["Y"], name="fc", transB=1),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 10])], inits)


def quantize_params(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """Input tensor of every QuantizeLinear -> its (scale, zero point)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
    }


def feeds_for(model: onnx.ModelProto, n: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    """Standard-normal feeds for every graph input (symbolic dims become ``n``)."""
    r = rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.dim_value else n for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = r.standard_normal(dims).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- parameters


@settings(deadline=None, max_examples=60)
@given(
    lo=st.floats(-100, 0, allow_nan=False),
    width=st.floats(1e-3, 200, allow_nan=False),
    dtype=st.sampled_from(["uint8", "int8"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_at_most_half_a_step(lo: float, width: float, dtype: str, seed: int) -> None:
    """|DQ(Q(x)) - x| <= scale/2 for every x inside the (zero-widened) range."""
    hi = lo + width
    qp = activation_qparams(lo, hi, dtype)
    lo_q, hi_q = dequantize_array(np.array([qp.qmin, qp.qmax], qp.zero_point.dtype), qp)
    x = rng(seed).uniform(max(min(lo, 0), lo_q), min(max(hi, 0), hi_q), 257).astype(np.float32)
    err = np.abs(dequantize_array(quantize_array(x, qp), qp) - x)
    # scale/2, plus float32 rounding of x/s and q*s (a few ulps of the largest |x|)
    assert err.max() <= float(qp.scale) / 2 + 4 * np.finfo(np.float32).eps * float(np.abs(x).max())


def test_round_trip_matches_onnxruntime() -> None:
    """Our Q/DQ arithmetic equals onnxruntime's QuantizeLinear/DequantizeLinear, and errs <= scale/2."""
    x = rng(3).uniform(-2.0, 5.0, (4, 64)).astype(np.float32)
    for dtype in ("uint8", "int8"):
        qp = activation_qparams(-2.0, 5.0, dtype)
        inits = {"s": qp.scale, "z": qp.zero_point}
        model = make_model(
            [
                helper.make_node("QuantizeLinear", ["X", "s", "z"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["Y"]),
            ],
            [("X", [4, 64])],
            [("Y", [4, 64])],
            inits,
        )
        (y,) = run(model, {"X": x})
        np.testing.assert_array_equal(y, dequantize_array(quantize_array(x, qp), qp))
        assert np.abs(y - x).max() <= float(qp.scale) / 2 * (1 + 1e-6)


def test_activation_params_uint8_and_int8() -> None:
    """uint8: asymmetric, zero exactly representable; int8: symmetric with zero point 0."""
    qp = activation_qparams(-1.0, 3.0, "uint8")
    assert qp.zero_point.dtype == np.uint8 and int(qp.zero_point) == 64
    assert float(qp.scale) == pytest.approx(4.0 / 255)
    qp = activation_qparams(-1.0, 3.0, "int8")
    assert qp.zero_point.dtype == np.int8 and int(qp.zero_point) == 0
    assert float(qp.scale) == pytest.approx(3.0 / 127)
    relu = activation_qparams(0.0, 6.0, "uint8")
    assert int(relu.zero_point) == 0
    with pytest.raises(ValueError, match="zero width"):
        activation_qparams(0.0, 0.0)


def test_weight_params_per_channel_and_zero_channel() -> None:
    """Per-channel symmetric int8: s_c = max|W_c|/127; an all-zero channel stays exact."""
    w = rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    w[2] = 0.0
    qp = weight_qparams(w, 0)
    np.testing.assert_allclose(qp.scale[[0, 1, 3]], np.abs(w[[0, 1, 3]]).reshape(3, -1).max(1) / 127, rtol=1e-6)
    assert qp.scale[2] > 0
    back = dequantize_array(quantize_array(w, qp), qp)
    assert np.all(back[2] == 0)
    assert np.all(np.abs(back - w) <= qp.scale.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6))


# ----------------------------------------------------------------------------- graphs


def test_residual_cnn_fuses_to_integer_kernels(tmp_path: Path) -> None:
    """Every Conv becomes QLinearConv (Relu/Clip removed), Add QLinearAdd, MaxPool int8, Gemm QGemm."""
    model = residual_cnn()
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    ref, out = run(model, x)[0], run(q, x)[0]
    assert sqnr_db(ref, out) > 30
    # one Q per quantized activation, none between Conv and its Relu/Clip
    q_inputs = [n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(q_inputs) == sorted(["X", "r1", "c2", "r2", "mp", "g", "f"])
    opt = optimized_ops(q, tmp_path)
    assert opt.count("QLinearConv") == 2 and "Conv" not in opt and "FusedConv" not in opt
    assert "QLinearAdd" in opt and "QGemm" in opt and "QLinearGlobalAveragePool" in opt
    assert "Relu" not in opt and "Clip" not in opt and "Gemm" not in opt
    assert opt.count("DequantizeLinear") == 0
    assert all(d.quantized for d in p.decisions)


def test_bias_is_int32_with_product_scale_and_exact_rounding() -> None:
    """Bias DQ: int32, zero point 0, s_b = s_x * s_w per channel, |DQ(b_q) - b| <= s_b/2."""
    model = residual_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    orig = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in q.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        dq_x, dq_w, dq_b = (producers[i] for i in node.input[:3])
        assert dq_b.op_type == "DequantizeLinear"
        b_q, s_b = (inits[i] for i in dq_b.input[:2])
        assert len(dq_b.input) == (2 if node.op_type == "Conv" else 3)  # Conv: zero point 0 omitted
        assert b_q.dtype == np.int32 and (len(dq_b.input) == 2 or not np.any(inits[dq_b.input[2]]))
        s_x = inits[dq_x.input[1]]
        s_w = inits[dq_w.input[1]]
        np.testing.assert_allclose(s_b, np.float32(s_x) * s_w, rtol=1e-7)
        b = orig[{"conv1": "B1", "conv2": "B2", "fc": "Bf"}[node.name]]
        back = b_q.astype(np.float64) * s_b
        assert np.all(np.abs(back - b) <= s_b / 2 * (1 + 1e-6))
        np.testing.assert_array_equal(b_q, np.rint(b.astype(np.float64) / s_b).astype(np.int32))
        checked += 1
    assert checked == 3


def test_weight_axes_per_op(tmp_path: Path) -> None:
    """Conv axis 0, ConvTranspose axis 1, Gemm axis 0/1 by transB, MatMul weight axis = last."""
    r = rng(2)
    inits = {
        "Wc": r.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "Wt": r.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "Wg": r.standard_normal((5, 48)).astype(np.float32),
        "Wg2": r.standard_normal((5, 7)).astype(np.float32),
        "Wm": r.standard_normal((7, 6)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "Wt"], ["t"], name="convT", strides=[2, 2]),
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg"], ["g"], name="gemm", transB=1),
        helper.make_node("Gemm", ["g", "Wg2"], ["g2"], name="gemm2"),
        helper.make_node("MatMul", ["g2", "Wm"], ["Y"], name="matmul"),
    ]
    model = make_model(nodes, [("X", ["N", 2, 2, 2])], [("Y", ["N", 6])], inits)
    x = feeds_for(model)
    _, q = quantize_graph(model, x, min_conv_depth=0)  # every conv, even the narrow input one
    producers = {o: n for n in q.graph.node for o in n.output}
    expect = {"conv": 0, "convT": 1, "gemm": 0, "gemm2": 1, "matmul": 1}
    for node in q.graph.node:
        if node.name in expect:
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            axis = {a.name: a.i for a in dq.attribute}["axis"]
            assert axis == expect[node.name], node.name
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 25


def test_depthwise_and_grouped_conv(tmp_path: Path) -> None:
    """Depthwise (group=C) and grouped (group=2) convs quantize per output channel and fuse."""
    r = rng(4)
    inits = {
        "Wd": r.standard_normal((8, 1, 3, 3)).astype(np.float32) * r.uniform(0.01, 3, (8, 1, 1, 1)).astype(np.float32),
        "Bd": r.standard_normal(8).astype(np.float32),
        "Wg": r.standard_normal((8, 4, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "Wd", "Bd"], ["d"], group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Conv", ["r", "Wg"], ["Y"], group=2),
        helper.make_node("Relu", ["Y"], ["Z"]),
    ]
    model = make_model(nodes, [("X", ["N", 8, 6, 6])], [("Z", ["N", 8, 6, 6])], inits)
    x = feeds_for(model)
    _, q = quantize_graph(model, x, min_conv_depth=0)  # quantize even the shallow depthwise conv
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30
    opt = optimized_ops(q, tmp_path)
    assert opt.count("QLinearConv") == 2  # the last one too: its output Q/DQ sits on the graph output


def test_conv_on_a_graph_output_gets_an_int8_kernel(tmp_path: Path) -> None:
    """A Conv (+Relu) ending on a graph output is quantized there too, under the output's own name.

    onnxruntime has no integer Conv with a float output: without the Q/DQ it ran the Conv as a float
    FusedConv on dequantized weights, slower than the fp32 original. Another reader of that tensor
    reads the dequantized values, so every reader sees the same numbers as the graph output.
    """
    r = rng(41)
    inits = {
        "W1": r.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
        "W2": r.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
        "B2": r.standard_normal(8).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "W2", "B2"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["Y"]),
        helper.make_node("GlobalMaxPool", ["Y"], ["M"]),
    ]
    model = make_model(nodes, [("X", ["N", 8, 6, 6])], [("Y", ["N", 8, 6, 6]), ("M", ["N", 8, 1, 1])], inits)
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    onnx.checker.check_model(q, full_check=True)
    assert [o.name for o in q.graph.output] == ["Y", "M"]
    assert q.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    producers = {o: n for n in q.graph.node for o in n.output}
    assert producers["Y"].op_type == "DequantizeLinear"
    assert producers[producers["M"].input[0]].op_type == "DequantizeLinear"  # the other reader: same values
    assert optimized_ops(q, tmp_path).count("QLinearConv") == 2
    ref, out = run(model, x), run(q, x)
    assert sqnr_db(ref[0], out[0]) > 30
    np.testing.assert_array_equal(out[1], out[0].max(axis=(2, 3), keepdims=True))


def test_shared_tensor_gets_one_q_and_one_dq() -> None:
    """A tensor feeding two quantized Convs gets exactly one Q and one DQ."""
    r = rng(5)
    inits = {
        "W1": r.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "W2": r.standard_normal((4, 3, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["a"]),
        helper.make_node("Conv", ["X", "W2"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["Y"]),
    ]
    model = make_model(nodes, [("X", ["N", 3, 4, 4])], [("Y", ["N", 4, 4, 4])], inits)
    _, q = quantize_graph(model, feeds_for(model), min_conv_depth=0)
    q_of_x = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "X"]
    assert len(q_of_x) == 1
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q_of_x[0].output[0]]
    assert len(dq) == 1
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert {c.input[0] for c in convs} == {dq[0].output[0]}


def test_concat_inputs_share_the_output_range(tmp_path: Path) -> None:
    """Concat inputs and output get one common scale/zero point; QLinearConcat appears."""
    r = rng(6)
    inits = {
        "W1": r.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "W2": 3 * r.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "W3": r.standard_normal((4, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["a"]),
        helper.make_node("Conv", ["X", "W2"], ["b0"]),
        helper.make_node("Relu", ["b0"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "W3"], ["Y"]),
    ]
    model = make_model(nodes, [("X", ["N", 3, 4, 4])], [("Y", ["N", 4, 4, 4])], inits)
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    params = quantize_params(q)
    assert params["a"] == params["b"] == params["c"]
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30
    assert "QLinearConcat" in optimized_ops(q, tmp_path)


def test_scale_keeping_ops_reuse_input_params(tmp_path: Path) -> None:
    """Reshape/Transpose/MaxPool outputs reuse their input's scale, so onnxruntime drops their Q/DQ."""
    r = rng(7)
    inits = {
        "W1": r.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "shape": np.array([0, 4, 16], np.int64),
        "W2": r.standard_normal((4, 6)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["m", "shape"], ["rs"]),
        helper.make_node("Transpose", ["rs"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "W2"], ["Y"]),
    ]
    model = make_model(nodes, [("X", [2, 3, 8, 8])], [("Y", [2, 16, 6])], inits)
    x = feeds_for(model)
    _, q = quantize_graph(model, x, min_conv_depth=0)  # every conv, even the narrow input one
    params = quantize_params(q)
    assert params["c"] == params["m"] == params["rs"] == params["t"]
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30
    opt = optimized_ops(q, tmp_path)
    assert "QLinearConv" in opt and "DequantizeLinear" not in opt


def test_attention_block_ops(tmp_path: Path) -> None:
    """MatMul+bias, Mul by constant; LayerNormalization, Softmax and activation MatMuls float by default."""
    r = rng(8)
    d = 8
    inits = {
        "g": np.ones(d, np.float32), "b": np.zeros(d, np.float32),
        "Wq": r.standard_normal((d, d)).astype(np.float32), "bq": r.standard_normal(d).astype(np.float32),
        "Wk": r.standard_normal((d, d)).astype(np.float32), "c": np.array(0.35, np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("LayerNormalization", ["X", "g", "b"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "Wq"], ["q0"], name="q_proj"),
        helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
        helper.make_node("MatMul", ["ln", "Wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "c"], ["ss"], name="scale"),
        helper.make_node("Softmax", ["ss"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "q"], ["Y"], name="pv"),
    ]
    model = make_model(nodes, [("X", [2, 5, d])], [("Y", [2, 5, d])], inits, opset=17)
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    decisions = {dd.name: dd for dd in p.decisions}
    assert not decisions["ln"].quantized and "no integer kernel" in decisions["ln"].reason
    assert not decisions["softmax"].quantized and "slower than float Softmax" in decisions["softmax"].reason
    assert all(decisions[n].quantized for n in ("q_proj", "k_proj"))
    # Q.K^T and P.V multiply two activations: float, with the reason; the Mul between them too
    for n in ("scores", "pv"):
        assert not decisions[n].quantized and "both operands are activations" in decisions[n].reason
    assert not decisions["scale"].quantized
    assert "q_bias" not in decisions  # kept inside q_proj's epilogue
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 20
    # (with this fixed-shape input, q_proj's bias must take the output's rank: passes/matmul_bias.py)
    opt = optimized_ops(run_passes(infer_shapes(q), [MatMulBiasToOutputRank()]).model, tmp_path)
    assert "Softmax" in opt and "QLinearSoftmax" not in opt and "LayerNormalization" in opt
    assert opt.count("MatMulIntegerToFloat") == 2 and "QLinearMatMul" not in opt  # the two projections
    # Opting in wraps LayerNormalization, Softmax and the activation MatMuls in Q/DQ as well.
    p2, q2 = quantize_graph(model, x, quantize_ops={"LayerNormalization", "Softmax", "MatMul"})
    decisions = {dd.name: dd for dd in p2.decisions}
    assert all(decisions[n].quantized for n in ("ln", "q_proj", "k_proj", "scores", "scale", "softmax", "pv"))
    opt = optimized_ops(q2, tmp_path)
    assert "QLinearSoftmax" in opt and "QLinearMul" in opt
    assert "MatMul" not in opt and "FusedMatMul" not in opt  # all four MatMuls run as integer kernels
    assert sqnr_db(run(model, x)[0], run(q2, x)[0]) > 20
    with pytest.raises(ValueError, match="quantize_ops accepts only"):
        quantize_graph(model, x, quantize_ops={"Erf"})


def test_excluded_nodes_stay_float(tmp_path: Path) -> None:
    """Exclusion by name, op type and regex keeps those nodes' weights float and their kernels float in
    onnxruntime; an excluded conv behind a quantized one reads its own per-channel DQ, so the conv before it
    keeps its integer kernel (reading the float tensor left that producer in float)."""
    model = residual_cnn()
    x = feeds_for(model)
    inits = {i.name for i in model.graph.initializer}
    for sel, name, int8_convs in (
        (Selection.from_strings(["conv2"]), "conv2", 1),
        (Selection.from_strings(["op:Gemm"]), "fc", 2),
        (Selection.from_strings(["re:^conv1$"]), "conv1", 1),
    ):
        p, q = quantize_graph(model, x, exclude=sel)
        node = next(n for n in q.graph.node if n.name == name)
        assert node.input[1] in inits, name  # the float weight itself, not a DQ
        dec = {d.name: d for d in p.decisions}[name]
        assert not dec.quantized and "excluded" in dec.reason
        assert optimized_ops(q, tmp_path).count("QLinearConv") == int8_convs, name
        assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 25
    with pytest.raises(ValueError, match="invalid exclude pattern"):
        Selection.from_strings(["re:("])


def test_non_finite_range_is_left_float_and_reported() -> None:
    """A tensor in table.excluded (e.g. -inf mask) keeps its consumer float with the reason."""
    model = residual_cnn()
    x = feeds_for(model)
    table = minmax_table(model, x)
    del table.ranges["r1"]
    table.excluded["r1"] = "range is not finite (-inf seen)"
    p = InsertQDQ(table)
    q = run_passes(model, [p]).model
    dec = {d.name: d for d in p.decisions}
    assert not dec["conv2"].quantized and "not finite" in dec["conv2"].reason
    assert not dec["add"].quantized
    assert not dec["conv1"].quantized and "'r1'" in dec["conv1"].reason  # its fused output has no range
    assert dec["fc"].quantized
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 25


def test_overrides_dtype_and_float() -> None:
    """Per-tensor overrides: int8 for one tensor, float for another."""
    model = residual_cnn()
    x = feeds_for(model)
    p, q = quantize_graph(model, x, overrides={"X": TensorOverride(dtype="int8"), "f": TensorOverride(dtype="float")})
    zp = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    qx = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "X")
    assert zp[qx.input[2]].dtype == np.int8
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "f" for n in q.graph.node)
    assert not {d.name: d for d in p.decisions}["fc"].quantized


def test_int8_symmetric_activations() -> None:
    """activations='int8': every activation zero point is int8 0 (symmetric, what TensorRT wants)."""
    model = residual_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x, activations="int8")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    zps = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 25


def test_per_tensor_weights() -> None:
    """per_channel=False: scalar weight scales, no axis attribute."""
    model = residual_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x, per_channel=False)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8:
            assert inits[n.input[1]].ndim == 0 and not n.attribute


def test_unknown_ops_pass_through_untouched() -> None:
    """An op with no quantized form (Tanh) keeps float input and output; nothing is inserted around it."""
    r = rng(9)
    nodes = [
        helper.make_node("Tanh", ["X"], ["t"], name="tanh"),
        helper.make_node("Erf", ["t"], ["Y"], name="erf"),
    ]
    model = make_model(nodes, [("X", [2, 4])], [("Y", [2, 4])])
    x = {"X": r.standard_normal((2, 4)).astype(np.float32)}
    p, q = quantize_graph(model, x)
    assert ops(q) == ["Tanh", "Erf"]
    np.testing.assert_array_equal(run(model, x)[0], run(q, x)[0])


def test_sigmoid_resize_averagepool(tmp_path: Path) -> None:
    """Sigmoid, AveragePool and a nearest Resize between Convs are quantized and fused."""
    r = rng(10)
    inits = {
        "W1": r.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "W2": r.standard_normal((4, 4, 3, 3)).astype(np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("AveragePool", ["s"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["a", "", "scales"], ["rz"], mode="nearest"),
        helper.make_node("Conv", ["rz", "W2"], ["Y"], pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [("X", [2, 3, 8, 8])], [("Y", [2, 4, 8, 8])], inits)
    x = feeds_for(model)
    p, q = quantize_graph(model, x, min_conv_depth=0)  # every conv, even the narrow input one
    assert all(d.quantized for d in p.decisions)
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 25
    opt = optimized_ops(q, tmp_path)
    assert "QLinearSigmoid" in opt and "QLinearAveragePool" in opt and "QLinearConv" in opt


def test_requires_opset_13() -> None:
    """Per-axis QDQ needs opset 13: an older graph is refused with what to do."""
    model = make_model([helper.make_node("Relu", ["X"], ["Y"])], [("X", [2])], [("Y", [2])], opset=11)
    with pytest.raises(UnsupportedModelError, match="normalize_model"):
        run_passes(model, [InsertQDQ(CalibrationTable())])


def test_input_model_is_not_modified() -> None:
    """run_passes on a ModelProto leaves the caller's object byte-identical."""
    model = residual_cnn()
    before = model.SerializeToString()
    quantize_graph(model, feeds_for(model))
    assert model.SerializeToString() == before


def test_qparams_limits() -> None:
    """QParams reports the integer limits of its zero point's type."""
    qp = QParams(np.float32(0.1), np.uint8(3))
    assert (qp.qmin, qp.qmax) == (0, 255)


@pytest.mark.skipif(not (MODELS / "resnet.onnx").exists(), reason="models/resnet.onnx not built yet")
def test_reference_resnet_every_conv_is_an_integer_kernel(tmp_path: Path) -> None:
    """Every Conv of the reference residual CNN becomes QLinearConv in onnxruntime's optimised graph."""
    from onnxpress.model_io import load_model, normalize_model
    from onnxpress.pipeline import cleanup_passes

    model = run_passes(normalize_model(load_model(MODELS / "resnet.onnx")), cleanup_passes()).model
    n_conv = ops(model).count("Conv")
    data = np.load(MODELS / "digits32_calib.npz")["input"][:32]
    _, q = quantize_graph(model, {"input": data})
    opt = optimized_ops(q, tmp_path)
    assert n_conv > 0 and opt.count("QLinearConv") == n_conv
    assert "Conv" not in opt and "FusedConv" not in opt


def test_shallow_convs_at_the_float_frontier_stay_float(tmp_path: Path) -> None:
    """A 1-channel stem and the depthwise conv after it stay float; the shallow depthwise conv behind
    a quantized conv is still quantized (so no producer loses its fusion)."""
    inits = _frontier_weights()
    nodes = [
        helper.make_node("Conv", ["X", "Ws"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["sr"]),
        helper.make_node("Conv", ["sr", "Wd"], ["d"], name="dw1", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("Conv", ["dr", "Wp"], ["p"], name="pw1"),
        helper.make_node("Relu", ["p"], ["pr"]),
        helper.make_node("Conv", ["pr", "Wd2"], ["d2"], name="dw2", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d2"], ["d2r"]),
        helper.make_node("Conv", ["d2r", "Wp2"], ["Y"], name="pw2"),
    ]
    model = make_model(nodes, [("X", ["N", 1, 8, 8])], [("Y", ["N", 16, 8, 8])], inits)
    _assert_float_frontier(model, tmp_path)


def _frontier_weights() -> dict[str, np.ndarray]:
    """Weights of stem (1 -> 16, 3x3), dw1 / dw2 (depthwise 3x3) and pw1 / pw2 (16 -> 16, 1x1)."""
    r = rng(14)
    dw, pw = (16, 1, 3, 3), (16, 16, 1, 1)
    shapes = {"Ws": dw, "Wd": dw, "Wp": pw, "Wd2": dw, "Wp2": pw}
    return {k: r.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def _assert_float_frontier(model: onnx.ModelProto, tmp_path: Path) -> None:
    """stem and dw1 (reduction depth 9) stay float; pw1, dw2, pw2 are quantized, two of them integer kernels."""
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    dec = {d.name: d for d in p.decisions}
    assert not dec["stem"].quantized and "reduction depth 9" in dec["stem"].reason
    assert not dec["dw1"].quantized and "reduction depth 9" in dec["dw1"].reason
    assert dec["pw1"].quantized and dec["dw2"].quantized and dec["pw2"].quantized
    assert optimized_ops(q, tmp_path).count("QLinearConv") == 3  # pw1, dw2, pw2 (Q/DQ on the graph output)
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30


def _pooled_stem(strides: int = 2) -> onnx.ModelProto:
    """X[N,1,16,16] -> stem Conv(1->16, 3x3) -> Relu -> MaxPool(2x2, stride) -> Conv(16->16) -> Relu -> Conv -> Y."""
    r = rng(21)
    inits = {"Ws": r.standard_normal((16, 1, 3, 3)).astype(np.float32),
             "W1": (r.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32),
             "W2": (r.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["X", "Ws"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["sr"]),
        helper.make_node("MaxPool", ["sr"], ["p"], name="pool", kernel_shape=[2, 2], strides=[strides, strides]),
        helper.make_node("Conv", ["p", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["Y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    side = 16 // strides if strides > 1 else 15
    return make_model(nodes, [("X", ["N", 1, 16, 16])], [("Y", ["N", 16, side, side])], inits)


def test_shallow_stem_before_a_downsampling_pool_stays_float_with_the_pool(tmp_path: Path) -> None:
    """The stem and its MaxPool run in float; the Q after the pool sits behind a Max that onnxruntime keeps."""
    model = _pooled_stem()
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    dec = {d.name: d for d in p.decisions}
    assert not dec["stem"].quantized and "before a pool" in dec["stem"].reason
    assert not dec["pool"].quantized and "pooled in float" in dec["pool"].reason
    assert dec["c1"].quantized and dec["c2"].quantized
    assert [n.op_type for n in q.graph.node].count("Max") == 1
    opt = optimized_ops(q, tmp_path)
    assert opt.index("MaxPool") < opt.index("QuantizeLinear")  # the pool is float: before the first Q
    assert opt.count("QLinearConv") == 2  # c1 and c2 (Q/DQ on the graph output)
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30


def test_pool_barrier_is_what_keeps_the_pool_float_and_changes_no_value(tmp_path: Path) -> None:
    """Without the Max onnxruntime moves the Q above the pool (a uint8 pool); with it the outputs are identical."""
    model = _pooled_stem()
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    barrier = next(n for n in q.graph.node if n.op_type == "Max")
    low = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == barrier.input[1]))
    q_node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == barrier.output[0])
    scale = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == q_node.input[1]))
    zp = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == q_node.input[2]))
    assert float(low) == pytest.approx((0 - int(zp)) * float(scale))  # the real value of uint8 level 0
    bare = onnx.ModelProto()
    bare.CopyFrom(q)
    for n in bare.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] == barrier.output[0]:
            n.input[0] = barrier.input[0]
    keep = [n for n in bare.graph.node if n.op_type != "Max"]
    del bare.graph.node[:]
    bare.graph.node.extend(keep)
    opt = optimized_ops(bare, tmp_path)
    assert opt.index("QuantizeLinear") < opt.index("MaxPool")  # onnxruntime moved the Q above the pool
    for w, g in zip(run(bare, x), run(q, x), strict=True):
        np.testing.assert_array_equal(g, w)


def test_pool_that_does_not_downsample_leaves_the_shallow_stem_quantized() -> None:
    """A stride-1 pool keeps every value: the handover would not shrink, so the stem is quantized as before."""
    model = _pooled_stem(strides=1)
    p, _ = quantize_graph(model, feeds_for(model))
    dec = {d.name: d for d in p.decisions}
    assert dec["stem"].quantized and dec["pool"].quantized


def test_join_of_quantized_outputs_is_quantized(tmp_path: Path) -> None:
    """An Add of two quantized Conv outputs becomes QLinearAdd even when only float ops follow it."""
    r = rng(16)
    inits = {
        "W1": r.standard_normal((16, 16, 3, 3)).astype(np.float32),
        "W2": r.standard_normal((16, 16, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["X", "W2"], ["b"], name="c2"),
        helper.make_node("Add", ["a", "b"], ["s"], name="join"),
        helper.make_node("Relu", ["s"], ["sr"]),
        helper.make_node("ReduceMean", ["sr"], ["Y"], keepdims=0),
    ]
    model = make_model(nodes, [("X", ["N", 16, 6, 6])], [("Y", [])], inits, opset=17)
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    assert {d.name: d for d in p.decisions}["join"].quantized
    assert "QLinearAdd" in optimized_ops(q, tmp_path)
    p2, _ = quantize_graph(model, x, quantize_joins=False)
    assert not {d.name: d for d in p2.decisions}["join"].quantized
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30


def _split_relu6_cnn(seed: int = 17) -> onnx.ModelProto:
    """X[N,8,6,6] -> Conv(W1, B1) -> a -> Relu -> r -> Min(r, C[8,1,1]) -> m -> Conv(W2) -> Y (CLE's split ReLU6)."""
    r = rng(seed)
    inits = {
        "W1": r.standard_normal((8, 8, 3, 3)).astype(np.float32),
        "B1": r.standard_normal(8).astype(np.float32),
        "C": np.linspace(0.5, 3.0, 8, dtype=np.float32).reshape(8, 1, 1),
        "W2": r.standard_normal((8, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Min", ["r", "C"], ["m"]),
        helper.make_node("Conv", ["m", "W2"], ["Y"], name="c2"),
    ]
    return make_model(nodes, [("X", ["N", 8, 6, 6])], [("Y", ["N", 8, 6, 6])], inits)


def _q_params_of(model: onnx.ModelProto, name: str) -> tuple[float, int, str]:
    """(scale, zero point, DQ output name) of the Q/DQ pair on tensor ``name``."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    return float(inits[q.input[1]]), int(inits[q.input[2]]), dq.output[0]


def test_split_relu6_is_rounded_once_on_the_min_grid(tmp_path: Path) -> None:
    """Relu -> Min(c) takes the Min output's scale: one rounding, Conv+Relu+Q still fuses to QLinearConv."""
    model = _split_relu6_cnn()
    x = feeds_for(model, n=32)
    p, q = quantize_graph(model, x, min_conv_depth=0)
    _, q_two = quantize_graph(model, x, min_conv_depth=0, share_bound_grid=False)
    assert p.bound_grids_shared == 1
    s_r, z_r, _ = _q_params_of(q, "r")
    s_m, z_m, m_dq = _q_params_of(q, "m")
    assert (s_r, z_r) == (s_m, z_m) and z_m == 0
    s_r2, _, _ = _q_params_of(q_two, "r")
    assert s_r2 > 2 * s_m  # on its own the Relu output has a much wider range than the bounded one
    opt = optimized_ops(q, tmp_path)
    assert opt.count("QLinearConv") == 2 and "Relu" not in opt  # c2 too: Q/DQ on the graph output
    # The re-quantization after the Min moves a value by at most one step, and only next to the bound:
    # compared with quantizing min(relu(a), c) once on the same grid (a: the quantized model's conv output).
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.extend([helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("a", m_dq)])
    _, a, got = run(probe, x)
    c = np.linspace(0.5, 3.0, 8, dtype=np.float32).reshape(1, 8, 1, 1)
    once_qp = QParams(np.asarray(s_m, np.float32), np.asarray(z_m, np.uint8))
    once = dequantize_array(quantize_array(np.minimum(np.maximum(a, 0), c), once_qp), once_qp)
    diff = np.abs(got - once)
    assert diff.max() <= s_m * 1.0001
    far = np.abs(np.maximum(a, 0) - np.broadcast_to(c, a.shape)) > s_m
    np.testing.assert_array_equal(got[far], once[far])
    ref = run(model, x)[0]
    assert sqnr_db(ref, run(q, x)[0]) > sqnr_db(ref, run(q_two, x)[0]) + 1.0


def test_bound_grid_is_not_shared_when_the_tensor_has_another_reader() -> None:
    """A Relu output that also feeds a residual Add keeps its own range (the Min grid would clip it)."""
    model = _split_relu6_cnn()
    model.graph.node[-1].output[0] = "y0"
    model.graph.node.append(helper.make_node("Add", ["y0", "r"], ["Y"], name="join"))
    x = feeds_for(model, n=32)
    p, q = quantize_graph(model, x, min_conv_depth=0)
    assert p.bound_grids_shared == 0
    assert _q_params_of(q, "r")[0] > 2 * _q_params_of(q, "m")[0]


def test_shallow_frontier_looks_through_split_relu6(tmp_path: Path) -> None:
    """stem -> Relu -> Min(c) -> dw1 -> Relu -> Min(c) -> pw1 -> Relu -> Min(c) -> dw2 -> pw2: the stem and dw1
    stay float as they do with Clip(0, 6) (the split ReLU6 of cross-layer equalization changes nothing here)."""
    inits = _frontier_weights()
    for i in range(3):
        inits[f"C{i}"] = np.linspace(1.0, 6.0, 16, dtype=np.float32).reshape(16, 1, 1)
    nodes = []
    x = "X"
    for i, (name, w, group, pad) in enumerate((("stem", "Ws", 1, 1), ("dw1", "Wd", 16, 1), ("pw1", "Wp", 1, 0))):
        nodes += [
            helper.make_node("Conv", [x, w], [f"{name}_o"], name=name, group=group, pads=[pad] * 4),
            helper.make_node("Relu", [f"{name}_o"], [f"{name}_r"]),
            helper.make_node("Min", [f"{name}_r", f"C{i}"], [f"{name}_m"]),
        ]
        x = f"{name}_m"
    nodes += [
        helper.make_node("Conv", [x, "Wd2"], ["d2"], name="dw2", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d2"], ["d2r"]),
        helper.make_node("Conv", ["d2r", "Wp2"], ["Y"], name="pw2"),
    ]
    model = make_model(nodes, [("X", ["N", 1, 8, 8])], [("Y", ["N", 16, 8, 8])], inits)
    _assert_float_frontier(model, tmp_path)


def test_integer_shape_arithmetic_is_not_listed_as_kept_float() -> None:
    """TorchScript exports compute Reshape targets with Shape -> Gather -> Unsqueeze -> Concat on int64."""
    r = rng(31)
    inits = {"idx": np.array(0, np.int64), "rest": np.array([-1], np.int64), "ax": np.array([0], np.int64),
             "W": r.standard_normal((24, 8)).astype(np.float32)}  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["X"], ["s"]),
        helper.make_node("Gather", ["s", "idx"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "rest"], ["shape"], name="cat", axis=0),
        helper.make_node("Reshape", ["X", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "W"], ["Y"], name="fc"),
    ]
    model = infer_shapes(make_model(nodes, [("X", [2, 4, 6])], [("Y", [2, 8])], inits))  # as quantize() does
    p, _ = quantize_graph(model, feeds_for(model))
    names = {d.name for d in p.decisions}
    assert "fc" in names and not names & {"unsq", "cat"}


def test_op_on_a_float_constant_says_so() -> None:
    """A learned positional table sliced to the sequence length (GPT-style exports): a constant, not 'not float'."""
    r = rng(32)
    inits = {"pos": r.standard_normal((1, 16, 8)).astype(np.float32), "s": np.array([0], np.int64),
             "e": np.array([6], np.int64), "ax": np.array([1], np.int64),
             "W": r.standard_normal((8, 4)).astype(np.float32)}  # fmt: skip
    nodes = [helper.make_node("Slice", ["pos", "s", "e", "ax"], ["p"], name="cut"),
             helper.make_node("Add", ["X", "p"], ["h"], name="add"),
             helper.make_node("MatMul", ["h", "W"], ["Y"], name="fc")]  # fmt: skip
    model = infer_shapes(make_model(nodes, [("X", [2, 6, 8])], [("Y", [2, 6, 4])], inits))
    p, _ = quantize_graph(model, feeds_for(model))
    assert {d.name: d.reason for d in p.decisions}["cut"] == "input is a constant (nothing to quantize at run time)"


def _weights(seed: int, **shapes: tuple[tuple[int, ...], float]) -> dict[str, np.ndarray]:
    """Seeded float32 standard-normal weights, ``name=(shape, scale)``."""
    r = rng(seed)
    return {k: (r.standard_normal(shape) * scale).astype(np.float32) for k, (shape, scale) in shapes.items()}


def _narrow_stem(c_in: int, residual: bool = False) -> onnx.ModelProto:
    """X[N,c_in,8,8] -> stem Conv(->8) -> Relu -> c1 Conv(8->6) -> Relu -> c2 Conv(6->8) [-> Add(stem out)] -> Y."""
    inits = _weights(51, Ws=((8, c_in, 3, 3), 0.3), W1=((6, 8, 3, 3), 0.2), W2=((8, 6, 3, 3), 0.2))
    nodes = [
        helper.make_node("Conv", ["X", "Ws"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["sr"]),
        helper.make_node("Conv", ["sr", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2" if residual else "Y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["c2", "sr"], ["Y"], name="add"))
    return make_model(nodes, [("X", ["N", c_in, 8, 8])], [("Y", ["N", 8, 8, 8])], inits)


@pytest.mark.parametrize("c_in", [2, 3, 6])
def test_input_conv_with_channels_not_a_multiple_of_4_stays_float(tmp_path: Path, c_in: int) -> None:
    """An RGB-like stem runs faster in fp32 than as onnxruntime's NHWC int8 conv: it stays float. c2 has 6
    input channels too, but it reads the quantized c1, so it is still an int8 kernel."""
    model = _narrow_stem(c_in)
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    dec = {d.name: d for d in p.decisions}
    assert not dec["stem"].quantized and "not a multiple of 4" in dec["stem"].reason
    assert dec["c1"].quantized and dec["c2"].quantized  # c2 has 6 input channels but reads a quantized conv
    assert optimized_ops(q, tmp_path).count("QLinearConv") == 2
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30
    _, every = quantize_graph(model, x, min_conv_depth=0)  # the rule is off with the shallow-conv one
    assert optimized_ops(every, tmp_path).count("QLinearConv") == 3


@pytest.mark.parametrize(("c_in", "residual"), [(4, False), (8, False), (3, True), (1, False)])
def test_input_conv_stays_int8_where_the_narrow_rule_does_not_apply(c_in: int, residual: bool) -> None:
    """4 or 8 input channels; a stem a residual Add reads (the Add would meet a float NCHW tensor);
    1 channel (left to the shallow-conv rules): the stem is quantized."""
    model = _narrow_stem(c_in, residual)
    p, _ = quantize_graph(model, feeds_for(model))
    assert {d.name: d for d in p.decisions}["stem"].quantized


@pytest.mark.parametrize(("kernel", "quantized"), [(8, True), (4, False)])
def test_patchify_stem_stays_int8_from_depth_192(tmp_path: Path, kernel: int, quantized: bool) -> None:
    """An RGB patchify stem (stride = kernel, ViT's 16x16) with 3 * k * k >= 192 is an int8 conv (faster there,
    see ``_narrow_input_reason``); ConvNeXt's 4x4 (depth 48) stays float under the narrow-input rule."""
    inits = _weights(53, Wp=((16, 3, kernel, kernel), 0.1), W1=((16, 16, 3, 3), 0.2))
    nodes = [
        helper.make_node("Conv", ["X", "Wp"], ["p"], name="stem", strides=[kernel, kernel]),
        helper.make_node("Relu", ["p"], ["pr"]),
        helper.make_node("Conv", ["pr", "W1"], ["Y"], name="c1", pads=[1, 1, 1, 1]),
    ]
    side = 32 // kernel
    model = make_model(nodes, [("X", ["N", 3, 32, 32])], [("Y", ["N", 16, side, side])], inits)
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    stem = {d.name: d for d in p.decisions}["stem"]
    assert stem.quantized is quantized
    if not quantized:
        assert "not a multiple of 4" in stem.reason
    assert optimized_ops(q, tmp_path).count("QLinearConv") == 1 + quantized
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30


def _relu_and_signed_concat() -> onnx.ModelProto:
    """X -> a Conv -> Relu (>= 0) and b Conv (signed) -> Concat -> c Conv -> Relu -> Y (a U-Net skip join)."""
    inits = _weights(52, Wa=((8, 8, 3, 3), 0.2), Wb=((8, 8, 3, 3), 0.2), Wc=((8, 16, 3, 3), 0.2))
    nodes = [
        helper.make_node("Conv", ["X", "Wa"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["X", "Wb"], ["b"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ar", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "Wc"], ["c"], name="c", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", 8, 8, 8])], [("Y", ["N", 8, 8, 8])], inits)


def test_relu_input_of_a_signed_concat_keeps_its_own_range(tmp_path: Path) -> None:
    """Concat inputs share the output's range, except a fused Relu's output when that range goes below 0:
    its Q keeps zero point 0 and does the Relu's work, so the Conv before it stays an integer kernel
    (QLinearConcat requantizes that input); outputs stay close."""
    model = _relu_and_signed_concat()
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    params = quantize_params(q)
    assert params["ar"][1] == 0 and params["b"][1] > 0  # own [0, max] grid vs the signed shared one
    assert params["b"] == params["cat"] and params["ar"][0] < params["cat"][0]
    opt = optimized_ops(q, tmp_path)
    assert opt.count("QLinearConv") == 3 and "Relu" not in opt and "QLinearConcat" in opt
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30


def _silu_cnn() -> onnx.ModelProto:
    """X[N,3,8,8] -> stem Conv -> SiLU -> c1 Conv -> SiLU -> c2 Conv -> Y (x * Sigmoid(x) written out)."""
    inits = _weights(53, Ws=((8, 3, 3, 3), 0.3), W1=((8, 8, 3, 3), 0.2), W2=((8, 8, 3, 3), 0.2))
    nodes = [
        helper.make_node("Conv", ["X", "Ws"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["s"], ["ss"], name="sig0"),
        helper.make_node("Mul", ["s", "ss"], ["a0"], name="mul0"),
        helper.make_node("Conv", ["a0", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["cs"], name="sig1"),
        helper.make_node("Mul", ["cs", "c1"], ["a1"], name="mul1"),
        helper.make_node("Conv", ["a1", "W2"], ["Y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 8, 8, 8])], inits)


def test_silu_on_a_float_tensor_stays_float_and_fuses(tmp_path: Path) -> None:
    """Behind the float RGB stem, x * Sigmoid(x) stays float (onnxruntime fuses it into QuickGelu); behind
    an int8 Conv it is quantized (there the fusion fails on the duplicated DQs); quantize_ops={"SiLU"}
    quantizes both."""
    model = _silu_cnn()
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    dec = {d.name: d for d in p.decisions}
    assert not dec["stem"].quantized
    assert not dec["sig0"].quantized and not dec["mul0"].quantized and "SiLU" in dec["mul0"].reason
    assert dec["sig1"].quantized and dec["mul1"].quantized
    opt = optimized_ops(q, tmp_path)
    assert opt.count("QuickGelu") == 1 and opt.count("QLinearMul") == 1 and opt.count("QLinearConv") == 2
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30
    p_all, _ = quantize_graph(model, x, quantize_ops={"SiLU"})
    assert all(d.quantized for d in p_all.decisions if d.name in ("sig0", "mul0"))


def test_pool_before_a_float_head_is_quantized_so_the_dequantize_is_small(tmp_path: Path) -> None:
    """Conv -> Add (int8) -> GlobalAveragePool -> Flatten -> Gemm kept float: the pool still runs as
    QLinearGlobalAveragePool, so the DQ (and onnxruntime's transpose out of NHWC) acts on the pooled vector."""
    inits = _weights(54, W1=((8, 8, 3, 3), 0.2), W2=((8, 8, 3, 3), 0.2), Wf=((10, 8), 0.3))
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf"], ["Y"], name="fc", transB=1),
    ]
    model = make_model(nodes, [("X", ["N", 8, 6, 6])], [("Y", ["N", 10])], inits)
    x = feeds_for(model)
    p, q = quantize_graph(model, x, exclude=Selection(nodes=frozenset({"fc"})))
    dec = {d.name: d for d in p.decisions}
    assert not dec["fc"].quantized and dec["gap"].quantized and dec["add"].quantized
    opt = optimized_ops(q, tmp_path)
    assert "QLinearGlobalAveragePool" in opt and "GlobalAveragePool" not in opt
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30


def _grouped_middle(per_group: int, groups: int) -> onnx.ModelProto:
    """X -> c0 Conv(->C) -> Relu -> g Conv(C->C, groups) -> Relu -> c2 Conv(C->16) -> Y; C = per_group * groups."""
    c = per_group * groups
    inits = _weights(55, W0=((c, 16, 3, 3), 0.2), Wg=((c, per_group, 3, 3), 0.3), W2=((16, c, 3, 3), 0.2))
    nodes = [
        helper.make_node("Conv", ["X", "W0"], ["c0"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "Wg"], ["g"], name="g", pads=[1, 1, 1, 1], group=groups),
        helper.make_node("Relu", ["g"], ["rg"]),
        helper.make_node("Conv", ["rg", "W2"], ["Y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [("X", ["N", 16, 8, 8])], [("Y", ["N", 16, 8, 8])], inits)


@pytest.mark.parametrize("per_group", [2, 4, 8])
def test_narrow_grouped_conv_stays_float_between_int8_neighbours(tmp_path: Path, per_group: int) -> None:
    """A grouped conv with < 16 channels per group is kept float, and stays float in onnxruntime: its DQ is
    per channel, which onnxruntime's weight quantization (per-tensor DQ inputs only) leaves alone."""
    model = _grouped_middle(per_group, 4)
    x = feeds_for(model)
    p, q = quantize_graph(model, x)
    dec = {d.name: d for d in p.decisions}
    assert not dec["g"].quantized and "per group" in dec["g"].reason and dec["c0"].quantized and dec["c2"].quantized
    g_in = next(n for n in q.graph.node if n.name == "g").input[0]
    dq = next(n for n in q.graph.node if g_in in n.output)
    assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute}["axis"] == 1
    assert optimized_ops(q, tmp_path).count("QLinearConv") == 2  # c0 and c2; g runs as a float conv
    assert sqnr_db(run(model, x)[0], run(q, x)[0]) > 30


def test_wide_grouped_conv_is_quantized(tmp_path: Path) -> None:
    """16 channels per group: the integer kernel wins there, all three convs are QLinearConv."""
    model = _grouped_middle(16, 2)
    p, q = quantize_graph(model, feeds_for(model))
    assert all(d.quantized for d in p.decisions if d.op == "Conv")
    assert optimized_ops(q, tmp_path).count("QLinearConv") == 3


def _grouped_conv_transpose(group: int, bias: bool) -> onnx.ModelProto:
    """X -> c0 Conv(4->16) -> Relu -> up ConvTranspose(16->8, stride 2, group) [+ B] -> Relu -> c2 Conv(8->8) -> Y.

    Each group's weights get their own magnitude, so the per-channel scales (axis 1, shared by the groups)
    differ from slot to slot and a bias scale taken from the wrong slot would show.
    """
    inits = _weights(61, W0=((16, 4, 3, 3), 0.2), Wt=((16, 8 // group, 2, 2), 0.2), W2=((8, 8, 3, 3), 0.2))
    inits["Wt"] *= np.linspace(0.25, 2.0, 8 // group, dtype=np.float32)[None, :, None, None]
    up_in = ["r0", "Wt"]
    if bias:
        inits["B"] = (rng(62).standard_normal(8) * 0.3).astype(np.float32)
        up_in.append("B")
    nodes = [
        helper.make_node("Conv", ["X", "W0"], ["c0"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("ConvTranspose", up_in, ["t"], name="up", strides=[2, 2], group=group),
        helper.make_node("Relu", ["t"], ["rt"]),
        helper.make_node("Conv", ["rt", "W2"], ["Y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [("X", ["N", 4, 6, 6])], [("Y", ["N", 8, 12, 12])], inits)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_grouped_conv_transpose_is_quantized(group: int, bias: bool, per_channel: bool) -> None:
    """A grouped ConvTranspose with a bias quantizes (it failed: its per-channel weight scale has C_out/group
    entries, the bias C_out), and each output channel's int32 bias has s_x * s_w of its own channel.

    W is [C_in, C_out/group, k, k]: output channel g * C_out/group + j of every group g is computed with
    W[:, j], so the per-channel (axis 1) weight scale is shared by the groups and the bias scale is that
    scale tiled ``group`` times (checked against onnxruntime's own ConvTranspose on integer inputs while
    fixing this). onnxruntime has no integer ConvTranspose: it runs in float on the dequantized values.
    """
    model = _grouped_conv_transpose(group, bias)
    x = feeds_for(model)
    p, q = quantize_graph(model, x, per_channel=per_channel)
    assert {d.name: d.quantized for d in p.decisions}["up"]
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    up = next(n for n in q.graph.node if n.name == "up")
    dq_x, dq_w = producers[up.input[0]], producers[up.input[1]]
    s_x, s_w = inits[dq_x.input[1]], inits[dq_w.input[1]]
    assert s_w.shape == ((8 // group,) if per_channel else ())
    if bias:
        dq_b = producers[up.input[2]]
        b_q, s_b = inits[dq_b.input[0]], inits[dq_b.input[1]]
        assert dq_b.op_type == "DequantizeLinear" and b_q.dtype == np.int32 and b_q.shape == (8,)
        expect = np.float32(s_x) * (np.tile(s_w, group) if per_channel else s_w)
        np.testing.assert_allclose(s_b, expect, rtol=1e-7)
        if per_channel:
            assert {a.name: a.i for a in dq_b.attribute}["axis"] == 0
        b = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "B"))
        assert np.all(np.abs(b_q.astype(np.float64) * s_b - b) <= s_b / 2 * (1 + 1e-6))
    else:
        assert len(up.input) == 2
    ref = run(model, x)[0]
    # 30.7-33.4 dB measured over the twelve cases (per tensor lowest: the groups' magnitudes differ 8x)
    assert sqnr_db(ref, run(q, x)[0]) > 28
    assert sqnr_db(ref, run(q, x, optimize=True)[0]) > 28  # the same once onnxruntime has optimized it


def test_bias_params_refuse_a_channel_count_the_weight_scale_does_not_cover() -> None:
    """A per-channel weight scale must cover the bias exactly, group by group, not be broadcast over it."""
    w = weight_qparams(rng(63).standard_normal((16, 4, 2, 2)).astype(np.float32), 1)
    assert bias_qparams(np.float32(0.5), w, 8, group=2).scale.shape == (8,)
    with pytest.raises(ValueError, match="does not match a per-channel weight scale"):
        bias_qparams(np.float32(0.5), w, 8)


def _hard_sigmoid_net(*, stem: bool = True, mul: bool = False) -> onnx.ModelProto:
    """X -> [c1 Conv(8->16) ->] HardSigmoid -> [Mul(its input) ->] c2 Conv(16->16) -> Y (``mul``: the Mul is Y)."""
    inits = _weights(64, W1=((16, 8, 3, 3), 0.2), W2=((16, 16, 3, 3), 0.2))
    nodes = [helper.make_node("Conv", ["X", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1])] if stem else []
    x = "c1" if stem else "X"
    nodes.append(helper.make_node("HardSigmoid", [x], ["hs"], name="hsig", alpha=0.2, beta=0.5))
    if mul:  # hard swish, x * HardSigmoid(x), on a graph output: no quantized node reads it
        nodes.append(helper.make_node("Mul", [x, "hs"], ["Y"], name="mul"))
        return make_model(nodes, [("X", ["N", 8, 6, 6])], [("Y", ["N", 16, 6, 6])], {"W1": inits["W1"]})
    nodes.append(helper.make_node("Conv", ["hs", "W2"], ["Y"], name="c2", pads=[1, 1, 1, 1]))
    c_in = 8 if stem else 16
    kept = inits if stem else {"W2": inits["W2"]}
    return make_model(nodes, [("X", ["N", c_in, 6, 6])], [("Y", ["N", 16, 6, 6])], kept)


def _reader_dq_and_writer_q(model: onnx.ModelProto, name: str) -> tuple[str, str]:
    """Op types of the producer of node ``name``'s input and of the one consumer of its output."""
    node = next(n for n in model.graph.node if n.name == name)
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = [n for n in model.graph.node if node.output[0] in n.input]
    assert len(readers) == 1
    return producers[node.input[0]].op_type if node.input[0] in producers else "", readers[0].op_type


def test_hard_sigmoid_is_float_by_default_and_can_be_opted_in(tmp_path: Path) -> None:
    """Conv -> HardSigmoid -> Conv: float by default, with its reason; quantize_ops={"HardSigmoid"} marks it
    quantized, DQ -> HardSigmoid -> Q. onnxruntime has no integer HardSigmoid: it runs in float either way,
    and between two quantized convs the graph is the same (the convs already put a DQ before it and a Q
    after it); the opt-in adds a Q/DQ only on an input that would stay float (here a graph input)."""
    model = _hard_sigmoid_net()
    x = feeds_for(model)
    ref = run(model, x)[0]
    p, q = quantize_graph(model, x)
    dec = {d.name: d for d in p.decisions}
    assert not dec["hsig"].quantized and dec["hsig"].reason == "no integer kernel on CPU; kept float"
    assert dec["c1"].quantized and dec["c2"].quantized
    opt = optimized_ops(q, tmp_path)
    assert opt.count("QLinearConv") == 2 and "HardSigmoid" in opt
    assert sqnr_db(ref, run(q, x)[0]) > 30  # 37.5 dB measured, the same opted in

    p_in, q_in = quantize_graph(model, x, quantize_ops={"HardSigmoid"})
    assert all(d.quantized for d in p_in.decisions)
    assert _reader_dq_and_writer_q(q_in, "hsig") == ("DequantizeLinear", "QuantizeLinear")
    assert ops(q_in) == ops(q)  # no integer kernel: nothing for the opt-in to change between int8 convs
    assert sqnr_db(ref, run(q_in, x)[0]) > 30

    # on a graph input the opt-in is what puts the Q/DQ before it
    bare = _hard_sigmoid_net(stem=False)
    x = feeds_for(bare)
    _, q = quantize_graph(bare, x)
    _, q_in = quantize_graph(bare, x, quantize_ops={"HardSigmoid"})
    assert _reader_dq_and_writer_q(q, "hsig") == ("", "QuantizeLinear")
    assert _reader_dq_and_writer_q(q_in, "hsig") == ("DequantizeLinear", "QuantizeLinear")
    assert sqnr_db(run(bare, x)[0], run(q_in, x)[0]) > 30  # 39.2 dB measured


def test_opted_in_hard_sigmoid_that_no_quantized_node_reads_says_why_it_stayed_float() -> None:
    """Opted in, a HardSigmoid is quantized only where a quantized node reads it (like any unary op): in a hard
    swish on the graph output it stays float, and its reason says the opt-in was seen (it looked ignored)."""
    model = _hard_sigmoid_net(mul=True)
    p, _ = quantize_graph(model, feeds_for(model), quantize_ops={"HardSigmoid"})
    reason = {d.name: d for d in p.decisions}["hsig"].reason
    assert reason.startswith("its output feeds no quantized node") and "opted in by quantize_ops" in reason


def test_a_graph_input_that_is_also_an_output_keeps_its_name_and_its_values() -> None:
    """The input was renamed 'inp_float' to give its name to the DQ output: the model lost its input 'inp'."""
    import onnxpress

    r = rng(3)
    model = make_model([helper.make_node("MatMul", ["inp", "w0"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
                        helper.make_node("MatMul", ["h", "w1"], ["logits"])],
                       [("inp", ["N", 16])], [("logits", ["N", 10]), ("inp", ["N", 16])],
                       {"w0": r.standard_normal((16, 32)).astype(np.float32),
                        "w1": r.standard_normal((32, 10)).astype(np.float32)})
    x = r.standard_normal((32, 16)).astype(np.float32)
    res = onnxpress.quantize(model, calib=[{"inp": x}])
    assert [i.name for i in res.model.graph.input] == ["inp"]
    assert [o.name for o in res.model.graph.output] == ["logits", "inp"]
    assert "MatMulInteger" in ops(res.model) or "QuantizeLinear" in ops(res.model)
    logits, passed = run(res.model, {"inp": x})
    np.testing.assert_array_equal(passed, x)  # the float input itself, not its int8 rounding
    assert sqnr_db(run(model, {"inp": x})[0], logits) > 30
