"""ONNX -> torch interpreter: every op against onnxruntime (ORT_DISABLE_ALL), reference models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxpress.bridge.convert import OnnxModule, onnx_to_torch  # noqa: E402
from onnxpress.errors import UnsupportedModelError  # noqa: E402
from tests.graphs import OPSET, rng, run  # noqa: E402
from tests.graphs import make_model as _make_checked  # noqa: E402
from tests.test_bridge_graphs import tiny_cnn  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    """tests.graphs.make_model, but outputs may have unknown shape (None)."""
    if all(shape is not None for _, shape in outputs):
        return _make_checked(nodes, inputs, outputs, initializers, opset=opset)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # not checked: the checker wants output shapes; onnxruntime does not
    return model


def _torch_out(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    mod = OnnxModule(model).eval()
    with torch.no_grad():
        outs = mod.evaluate([torch.from_numpy(feeds[n]) for n in mod.input_names], mod.output_names)
    return [o.numpy() for o in outs]


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    want = run(model, feeds)
    got = _torch_out(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def _single(op: str, x_shape, y_shape, inits=None, opset: int = 17, extra_inputs=(), **attrs) -> onnx.ModelProto:
    """X -> op(X, *extra_inputs) -> Y."""
    node = helper.make_node(op, ["X", *extra_inputs], ["Y"], **attrs)
    return make_model([node], [("X", x_shape)], [("Y", y_shape)], inits or {}, opset=opset)


def _x(*shape, seed: int = 0) -> np.ndarray:
    return rng(seed).standard_normal(shape).astype(np.float32)


CONV_CASES = {
    "plain": dict(w=(6, 3, 3, 3), attrs=dict(pads=[1, 1, 1, 1])),
    "strided_dilated": dict(w=(6, 3, 3, 3), attrs=dict(strides=[2, 2], dilations=[2, 2])),
    "grouped": dict(w=(6, 1, 3, 3), attrs=dict(group=3, pads=[0, 1, 2, 1])),
    "depthwise": dict(w=(3, 1, 3, 3), attrs=dict(group=3, pads=[1, 1, 1, 1])),
    "same_upper": dict(w=(4, 3, 2, 2), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2])),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_onnxruntime(case):
    """X[2,3,9,9] -> Conv(W, B) -> Y."""
    spec = CONV_CASES[case]
    r = rng(1)
    w = r.standard_normal(spec["w"]).astype(np.float32)
    b = r.standard_normal(spec["w"][0]).astype(np.float32)
    model = _single("Conv", [2, 3, 9, 9], None, {"W": w, "B": b}, extra_inputs=["W", "B"], **spec["attrs"])
    _check(model, {"X": _x(2, 3, 9, 9)})


def test_conv_transpose_matches_onnxruntime():
    """X[2,4,5,5] -> ConvTranspose(W[4,2,3,3], stride 2, pads 1, output_padding 1) -> Y."""
    w = rng(2).standard_normal((4, 2, 3, 3)).astype(np.float32)
    model = _single("ConvTranspose", [2, 4, 5, 5], None, {"W": w}, extra_inputs=["W"], strides=[2, 2],
                    pads=[1, 1, 1, 1], output_padding=[1, 1])  # fmt: skip
    _check(model, {"X": _x(2, 4, 5, 5)})


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta", [(0, 0, 1.0, 1.0), (1, 1, 0.5, 2.0)])
def test_gemm_matches_onnxruntime(trans_a, trans_b, alpha, beta):
    """X -> Gemm(W, C; transA, transB, alpha, beta) -> Y."""
    r = rng(3)
    w = r.standard_normal((6, 4) if trans_b else (4, 6)).astype(np.float32)
    c = r.standard_normal(6).astype(np.float32)
    x_shape = [4, 3] if trans_a else [3, 4]
    model = _single("Gemm", x_shape, None, {"W": w, "C": c}, extra_inputs=["W", "C"], transA=trans_a,
                    transB=trans_b, alpha=alpha, beta=beta)  # fmt: skip
    _check(model, {"X": _x(*x_shape)})


def test_batchnorm_layernorm_matmul():
    """X[2,4,6] -> MatMul(W[6,6]) -> LayerNormalization(axis -1) -> Transpose -> BatchNormalization -> Y."""
    r = rng(4)
    inits = {
        "W": r.standard_normal((6, 6)).astype(np.float32),
        "g": r.uniform(0.5, 1.5, 6).astype(np.float32), "b": r.standard_normal(6).astype(np.float32),
        "s": r.uniform(0.5, 1.5, 6).astype(np.float32), "t": r.standard_normal(6).astype(np.float32),
        "m": r.standard_normal(6).astype(np.float32), "v": r.uniform(0.5, 2, 6).astype(np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["a"]),
        helper.make_node("LayerNormalization", ["a", "g", "b"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Transpose", ["ln"], ["tr"], perm=[0, 2, 1]),
        helper.make_node("BatchNormalization", ["tr", "s", "t", "m", "v"], ["Y"], epsilon=1e-3),
    ]
    model = make_model(nodes, [("X", [2, 4, 6])], [("Y", [2, 6, 4])], inits)
    _check(model, {"X": _x(2, 4, 6)})


ACTIVATIONS = [
    ("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("Erf", {}), ("HardSwish", {}), ("Softplus", {}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("LeakyRelu", {"alpha": 0.2}), ("Abs", {}), ("Neg", {}),
    ("Softmax", {"axis": 1}), ("LogSoftmax", {"axis": -1}), ("Identity", {}), ("Exp", {}),
]  # fmt: skip


@pytest.mark.parametrize("op,attrs", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_unary_ops(op, attrs):
    """X[2,3,4] -> op -> Y."""
    _check(_single(op, [2, 3, 4], None, **attrs), {"X": _x(2, 3, 4)})


@pytest.mark.parametrize("opset", [17, 20])
def test_gelu_clip_sqrt_pow(opset):
    """X -> Clip(-1, 1) -> Gelu (opset 20) or Erf -> Pow(2) -> Add(1) -> Sqrt -> Y."""
    inits = {"lo": np.float32(-1), "hi": np.float32(1), "two": np.float32(2), "one": np.float32(1)}
    if opset >= 20:
        act = helper.make_node("Gelu", ["c"], ["g"], approximate="tanh")
    else:
        act = helper.make_node("Erf", ["c"], ["g"])
    nodes = [
        helper.make_node("Clip", ["X", "lo", "hi"], ["c"]), act,
        helper.make_node("Pow", ["g", "two"], ["p"]), helper.make_node("Add", ["p", "one"], ["a"]),
        helper.make_node("Sqrt", ["a"], ["Y"]),
    ]  # fmt: skip
    model = make_model(nodes, [("X", [3, 5])], [("Y", [3, 5])], inits, opset=opset)
    _check(model, {"X": _x(3, 5) * 2})


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], pads=[0, 0, 2, 1]),
])  # fmt: skip
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pooling(op, attrs):
    """X[2,3,7,7] -> MaxPool/AveragePool -> Y."""
    if op == "AveragePool" and attrs.get("pads") == [0, 0, 2, 1]:
        attrs = dict(attrs, count_include_pad=1)
    _check(_single(op, [2, 3, 7, 7], None, **attrs), {"X": _x(2, 3, 7, 7)})


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pooling(op):
    """X[2,3,5,5] -> GlobalPool -> Y[2,3,1,1]."""
    _check(_single(op, [2, 3, 5, 5], None), {"X": _x(2, 3, 5, 5)})


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_attr_and_input_axes(opset):
    """X[2,3,4] -> ReduceMean(axes [1, 2]) -> Y; axes are an attribute before opset 18, an input after."""
    if opset >= 18:
        model = _single("ReduceMean", [2, 3, 4], None, {"axes": np.array([1, 2], np.int64)}, opset=opset,
                        extra_inputs=["axes"], keepdims=0)  # fmt: skip
    else:
        model = _single("ReduceMean", [2, 3, 4], None, opset=opset, axes=[1, 2], keepdims=0)
    _check(model, {"X": _x(2, 3, 4)})


def test_shape_arithmetic_reshape_path():
    """X[N,2,3,4] -> Shape -> Gather(0) -> Unsqueeze -> Concat([-1]) -> Reshape(X) -> Slice -> Split -> Concat."""
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "minus1": np.array([-1], np.int64),
             "st": np.array([2], np.int64), "en": np.array([100], np.int64), "ax": np.array([1], np.int64),
             "sp": np.array([11, 11], np.int64)}  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["X"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["X", "shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "st", "en", "ax"], ["sl"]),
        helper.make_node("Split", ["sl", "sp"], ["p1", "p2"], axis=1),
        helper.make_node("Concat", ["p2", "p1"], ["Y"], axis=1),
    ]
    model = make_model(nodes, [("X", ["N", 2, 3, 4])], [("Y", ["N", 22])], inits, opset=17)
    _check(model, {"X": _x(3, 2, 3, 4)})


def test_gather_squeeze_flatten_resize():
    """X[2,3,4,4] -> Gather(idx [2,0], axis 1) -> Resize(x2 nearest / linear) -> Flatten(2) -> Squeeze."""
    inits = {"idx": np.array([2, 0], np.int64), "scales": np.array([1, 1, 2, 2], np.float32)}
    for mode, extra in [("nearest", dict(coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
                        ("linear", dict(coordinate_transformation_mode="half_pixel"))]:  # fmt: skip
        nodes = [
            helper.make_node("Gather", ["X", "idx"], ["g"], axis=1),
            helper.make_node("Resize", ["g", "", "scales"], ["r"], mode=mode, **extra),
            helper.make_node("Flatten", ["r"], ["f"], axis=2),
            helper.make_node("Unsqueeze", ["f", "idx0"], ["u"]),
            helper.make_node("Squeeze", ["u", "idx0"], ["Y"]),
        ]
        inits["idx0"] = np.array([0], np.int64)
        model = make_model(nodes, [("X", [2, 3, 4, 4])], [("Y", None)], inits, opset=17)
        _check(model, {"X": _x(2, 3, 4, 4)})


def test_quantize_dequantize_is_fake_quant():
    """X -> QuantizeLinear(s, z uint8) -> DequantizeLinear -> Conv(DQ(W int8 per channel)) -> Y."""
    r = rng(5)
    wq = r.integers(-127, 128, (4, 2, 3, 3)).astype(np.int8)
    inits = {"s": np.float32(0.05), "z": np.uint8(128), "wq": wq, "ws": r.uniform(0.01, 0.02, 4).astype(np.float32),
             "wz": np.zeros(4, np.int8)}  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("Conv", ["dq", "w"], ["Y"]),
    ]
    model = make_model(nodes, [("X", [2, 2, 5, 5])], [("Y", None)], inits, opset=17)
    _check(model, {"X": _x(2, 2, 5, 5) * 3})


def test_float_weights_are_parameters_and_constants_are_not():
    """tiny_cnn: Conv/Gemm weights and biases train; nothing else does."""
    mod = OnnxModule(tiny_cnn())
    assert set(mod.param_names) == {"c1.weight", "c1.bias", "c2.weight", "c2.bias", "fc.weight", "fc.bias"}
    assert all(p.requires_grad for p in mod.parameters())


def test_state_to_onnx_writes_weights_back():
    """Changing a parameter and writing back gives the same outputs on onnxruntime as the module."""
    model = tiny_cnn()
    mod = OnnxModule(model)
    with torch.no_grad():
        mod.initializer("c1.weight").mul_(1.5)
    x = _x(3, 1, 8, 8)
    with torch.no_grad():
        want = mod(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(mod.state_to_onnx(model), {"input": x})[0], want, atol=1e-5, rtol=0)


def test_unsupported_op_is_named():
    """X -> DFT (an op the bridge does not run) -> Y: the error names the op."""
    node = helper.make_node("DFT", ["X"], ["Y"])
    model = make_model([node], [("X", [1, 4, 1])], [("Y", [1, 4, 2])])
    with pytest.raises(UnsupportedModelError, match="DFT"):
        OnnxModule(model)


def _cast_add(w: np.ndarray) -> onnx.ModelProto:
    """X + Cast(W: float16 -> float) -> Y, two values."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["W"], ["w32"], to=TensorProto.FLOAT), helper.make_node("Add", ["X", "w32"], ["Y"])],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])], [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float16_initializer_is_refused():
    """X + W(float16 cast) -> Y: the bridge asks for a float32 model."""
    with pytest.raises(UnsupportedModelError, match="float32"):
        OnnxModule(_cast_add(np.ones(2, np.float16)))


@pytest.mark.parametrize("as_constant", [False, True])
def test_float8_weights_are_refused_by_name(as_constant):
    """DequantizeLinear(W: float8e4m3fn, s) -> Conv: a float8 model is refused, not a TypeError from torch."""
    w = helper.make_tensor("W", TensorProto.FLOAT8E4M3FN, [2, 1, 1, 1], [1.0, -0.5])
    nodes = [
        helper.make_node("DequantizeLinear", ["W", "s"], ["wd"], axis=0),
        helper.make_node("Conv", ["X", "wd"], ["Y"]),
    ]
    inits = [numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "s")]
    if as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=w))
    else:
        inits.append(w)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2, 2, 2])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    with pytest.raises(UnsupportedModelError, match="float8|FLOAT8"):
        mod = OnnxModule(model)
        mod.evaluate([torch.ones(1, 1, 2, 2)], mod.output_names)


def test_input_model_is_not_modified(tmp_path):
    model = tiny_cnn()
    before = model.SerializeToString()
    mod = onnx_to_torch(model)
    with torch.no_grad():
        mod.initializer("fc.weight").zero_()
    assert model.SerializeToString() == before


REFERENCE = ["resnet", "mobilenet", "concat", "transformer", "lstm", "resnet_opset11", "resnet_constants"]


def _reference_model(name: str, tmp_path: Path) -> Path:
    path = MODELS / f"{name}.onnx"
    if path.exists():
        return path
    if name not in ("resnet", "mobilenet", "concat", "transformer", "lstm") or os.environ.get("ONNXPRESS_NO_EXPORT"):
        pytest.skip(f"models/{name}.onnx not built yet")
    from models.nets import NETS  # untrained stand-in with the same graph, exported here

    torch.manual_seed(0)
    net = NETS[name]().eval()
    out = tmp_path / f"{name}.onnx"
    import contextlib
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 1, 32, 32),), str(out), input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)  # fmt: skip
    return out


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_models_match_onnxruntime(name, tmp_path):
    """Every reference model: module outputs equal onnxruntime's within 1e-4 (batch 5)."""
    path = _reference_model(name, tmp_path)
    model = onnx.load(str(path))
    x = _x(5, 1, 32, 32, seed=7)
    want = run(model, {"input": x})[0]
    mod = onnx_to_torch(path).eval()
    with torch.no_grad():
        got = mod(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- ops of real exports
def test_unet_block_at_opset_9_and_10_matches_onnxruntime():
    """InstanceNorm -> Relu -> Upsample-9 (nearest x2) / Resize-10 (linear x2): the pre-opset-11 grid.

    The bridge ran Resize-10 on Resize-11's half_pixel default before: a U-Net exported at opset 10 came
    out 0.36 (relative) off onnxruntime, and Upsample was refused.
    """
    scale, bias = rng(1).standard_normal(4).astype(np.float32), rng(2).standard_normal(4).astype(np.float32)
    scales = np.array([1, 1, 2, 2], np.float32)
    for opset, op, mode in [(9, "Upsample", "nearest"), (9, "Upsample", "linear"), (10, "Resize", "nearest"),
                            (10, "Resize", "linear")]:  # fmt: skip
        nodes = [
            helper.make_node("InstanceNormalization", ["X", "s", "b"], ["n"], epsilon=1e-5),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node(op, ["r", "sc"], ["Y"], mode=mode),
        ]
        model = make_model(nodes, [("X", [2, 4, 5, 3])], [("Y", None)], {"s": scale, "b": bias, "sc": scales},
                           opset=opset)  # fmt: skip
        _check(model, {"X": _x(2, 4, 5, 3)})


def test_downscaling_nearest_before_opset_11_rounds_up():
    """Resize-10 nearest at 0.5: onnxruntime rounds the asymmetric source index up (ceil)."""
    model = _single("Resize", [1, 1, 6, 6], None, {"sc": np.array([1, 1, 0.5, 0.5], np.float32)}, opset=10,
                    extra_inputs=["sc"], mode="nearest")  # fmt: skip
    _check(model, {"X": _x(1, 1, 6, 6)})


def test_causal_mask_from_range_trilu_where():
    """GPT-style mask: Shape -> Range -> compare / Trilu on a ones matrix -> Where(-inf) -> Softmax."""
    nodes = [
        helper.make_node("Shape", ["X"], ["shape"], start=1, end=2),
        helper.make_node("Squeeze", ["shape", "ax0"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax0"], ["row"]),
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["col"]),
        helper.make_node("Greater", ["row", "col"], ["future"]),
        helper.make_node("MatMul", ["X", "Xt"], ["scores"]),
        helper.make_node("Where", ["future", "neg", "scores"], ["masked"]),
        helper.make_node("Trilu", ["masked"], ["low"], upper=0),
        helper.make_node("Softmax", ["low"], ["Y"], axis=-1),
        helper.make_node("Transpose", ["X"], ["Xt"], perm=[0, 2, 1]),
    ]
    nodes = nodes[-1:] + nodes[:-1]
    inits = {"ax0": np.array([0], np.int64), "ax1": np.array([1], np.int64), "zero": np.array(0, np.int64),
             "one": np.array(1, np.int64), "neg": np.array(-1e9, np.float32)}  # fmt: skip
    model = make_model(nodes, [("X", [2, 5, 3])], [("Y", None)], inits)
    _check(model, {"X": _x(2, 5, 3)})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes_and_negative_step_slice(mode):
    """Pad (begin/end pads, negative = crop) -> Slice backwards along the last axis (a flip)."""
    pads = np.array([0, 0, 2, -1, 0, 0, 1, 3], np.int64)
    inits = {"p": pads, "s": np.array([-1], np.int64), "e": np.array([-(2**63)], np.int64),
             "a": np.array([3], np.int64), "st": np.array([-2], np.int64)}  # fmt: skip
    nodes = [helper.make_node("Pad", ["X", "p"], ["padded"], mode=mode),
             helper.make_node("Slice", ["padded", "s", "e", "a", "st"], ["Y"])]  # fmt: skip
    model = make_model(nodes, [("X", [1, 2, 4, 5])], [("Y", None)], inits, opset=19)
    _check(model, {"X": _x(1, 2, 4, 5)})


def test_mod_tile_cumsum_gather_elements_einsum_reduce_l2():
    """Relative positions (Mod of a CumSum), Tile, GatherElements, Einsum and a ReduceL2 weight norm."""
    nodes = [
        helper.make_node("CumSum", ["ids", "ax"], ["cum"]),
        helper.make_node("Mod", ["cum", "k"], ["pos"]),
        helper.make_node("GatherElements", ["X", "pos"], ["g"], axis=1),
        helper.make_node("Tile", ["g", "reps"], ["t"]),
        helper.make_node("ReduceL2", ["W", "axes"], ["norm"], keepdims=1),
        helper.make_node("Div", ["W", "norm"], ["wn"]),
        helper.make_node("Einsum", ["t", "wn"], ["Y"], equation="bi,ij->bj"),
    ]
    inits = {"ids": np.ones((2, 4), np.int64), "ax": np.array(1, np.int64), "axes": np.array([1], np.int64),
             "k": np.array(3, np.int64),
             "reps": np.array([1, 2], np.int64), "W": rng(3).standard_normal((8, 6)).astype(np.float32)}  # fmt: skip
    model = make_model(nodes, [("X", [2, 4])], [("Y", None)], inits, opset=18)
    _check(model, {"X": _x(2, 4)})
    assert "W" in OnnxModule(model).param_names  # the Einsum's weight trains


def _rnn_model(op: str, hidden: int = 5, seq: int = 4, batch: int = 3, size: int = 6, **attrs) -> onnx.ModelProto:
    """X [seq, batch, size] (layout 1: [batch, seq, size]) -> LSTM/GRU(W, R, B[, initial states, P]) -> Y, Y_h."""
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    r = rng(11)
    inits = {"W": r.standard_normal((dirs, gates * hidden, size)).astype(np.float32) * 0.5,
             "R": r.standard_normal((dirs, gates * hidden, hidden)).astype(np.float32) * 0.5,
             "B": r.standard_normal((dirs, 2 * gates * hidden)).astype(np.float32) * 0.5,
             "h0": r.standard_normal((dirs, batch, hidden)).astype(np.float32)}  # fmt: skip
    names = ["X", "W", "R", "B", "", "h0"]
    if op == "LSTM":
        inits.update(c0=r.standard_normal((dirs, batch, hidden)).astype(np.float32),
                     P=r.standard_normal((dirs, 3 * hidden)).astype(np.float32))  # fmt: skip
        names += ["c0", "P"]
    if attrs.get("layout"):
        inits["h0"] = np.ascontiguousarray(inits["h0"].transpose(1, 0, 2))
        if op == "LSTM":
            inits["c0"] = np.ascontiguousarray(inits["c0"].transpose(1, 0, 2))
    node = helper.make_node(op, names, ["Y", "Y_h"], hidden_size=hidden, **attrs)
    x_shape = [batch, seq, size] if attrs.get("layout") else [seq, batch, size]
    return make_model([node], [("X", x_shape)], [("Y", None), ("Y_h", None)], inits, opset=14)


@pytest.mark.parametrize("op, attrs", [
    ("LSTM", {}), ("LSTM", dict(direction="bidirectional", clip=0.7)), ("LSTM", dict(direction="reverse")),
    ("GRU", {}), ("GRU", dict(linear_before_reset=1, direction="bidirectional")), ("GRU", dict(clip=0.5)),
])  # fmt: skip
def test_lstm_gru_match_onnxruntime(op, attrs):
    """Peepholes, initial states, clip and both directions, against onnxruntime (which refuses layout=1:
    onnx's batchwise node cases check that in tests/test_bridge_conformance.py)."""
    model = _rnn_model(op, **attrs)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    _check(model, {"X": _x(*shape, seed=4)})
    assert {"W", "R", "B"} <= set(OnnxModule(model).param_names)  # the recurrent weights train


def test_rnn_with_shorter_sequence_lens_is_refused():
    """GRU with sequence_lens [4, 2, 4] on a length-4 batch: padding-aware unrolling is not built; refused by name."""
    model = _rnn_model("GRU")
    node = model.graph.node[0]
    node.input[4] = "lens"
    model.graph.initializer.append(numpy_helper.from_array(np.array([4, 2, 4], np.int32), "lens"))
    with pytest.raises(UnsupportedModelError, match="sequence_lens shorter than the sequence"):
        OnnxModule(model).evaluate([torch.zeros(4, 3, 6)], ["Y"])


def test_size_arithmetic_with_floor_stays_on_the_host():
    """Shape -> Cast(float) -> Mul(0.5) -> Floor -> Cast(int64) -> Reshape: TorchScript's way of sizing an
    interpolation. Floor on a host value used to make a tensor, and Reshape then refused "shape computed from
    tensor data"."""
    nodes = [
        helper.make_node("Shape", ["X"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sf", "half"], ["h"]),
        helper.make_node("Floor", ["h"], ["fl"]),
        helper.make_node("Ceil", ["h"], ["ce"]),
        helper.make_node("Add", ["fl", "ce"], ["both"]),
        helper.make_node("Cast", ["both"], ["shape"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["X", "shape"], ["Y"]),
    ]
    model = make_model(nodes, [("X", [2, 3, 4])], [("Y", None)], {"half": np.array(0.5, np.float32)})
    _check(model, {"X": _x(2, 3, 4)})


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_pixel_shuffle_round_trip_and_activations(mode):
    """Conv -> DepthToSpace (PixelShuffle) -> Elu/Selu/Celu/ThresholdedRelu -> SpaceToDepth -> cubic Resize."""
    w = rng(5).standard_normal((8, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("DepthToSpace", ["c"], ["d"], blocksize=2, mode=mode),
        helper.make_node("Elu", ["d"], ["e1"], alpha=0.7), helper.make_node("Selu", ["e1"], ["e2"]),
        helper.make_node("Celu", ["e2"], ["e3"], alpha=1.3),
        helper.make_node("ThresholdedRelu", ["e3"], ["e4"], alpha=0.1),
        helper.make_node("SpaceToDepth", ["e4"], ["s"], blocksize=2),
        helper.make_node("Resize", ["s", "", "sc"], ["Y"], mode="cubic"),
    ]  # fmt: skip
    model = make_model(nodes, [("X", [2, 2, 5, 5])], [("Y", None)],
                       {"W": w, "sc": np.array([1, 1, 1.6, 1.6], np.float32)})  # fmt: skip
    _check(model, {"X": _x(2, 2, 5, 5)})


def test_argmax_topk_and_scatters_match_onnxruntime():
    """Detection/segmentation heads: ArgMax, TopK (ties by the lower index), ScatterElements, ScatterND (add)."""
    x = np.array([[3, 1, 3, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.float32)  # ties on purpose
    nodes = [
        helper.make_node("ArgMax", ["X"], ["am"], axis=1, keepdims=1),
        helper.make_node("Cast", ["am"], ["amf"], to=TensorProto.FLOAT),
        helper.make_node("TopK", ["X", "k"], ["tv", "ti"], axis=1),
        helper.make_node("Cast", ["ti"], ["tif"], to=TensorProto.FLOAT),
        helper.make_node("ScatterElements", ["X", "ei", "eu"], ["se"], axis=1),
        helper.make_node("ScatterND", ["se", "ni", "nu"], ["sn"], reduction="add"),
        helper.make_node("Concat", ["amf", "tv", "tif", "sn"], ["Y"], axis=1),
    ]
    inits = {"k": np.array([3], np.int64), "ei": np.array([[0, -1], [2, 3]], np.int64),
             "eu": np.array([[9, 8], [7, 6]], np.float32), "ni": np.array([[0, 1], [1, 0], [0, 1]], np.int64),
             "nu": np.array([0.5, 0.25, 2.0], np.float32)}  # fmt: skip
    model = make_model(nodes, [("X", [2, 6])], [("Y", None)], inits, opset=18)
    _check(model, {"X": x})


def test_float16_constants_behind_cast_are_held_when_asked():
    """X + Cast(W: float16) -> Y with ``narrow_constants``: W is a float32 constant (exact), not a parameter."""
    model = _cast_add(np.array([0.5, -1.25], np.float16))
    mod = OnnxModule(model, narrow_constants=True)
    assert not list(mod.named_onnx_parameters())
    x = np.array([1.0, 2.0], np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(mod(torch.from_numpy(x)).numpy(), run(model, {"X": x})[0])
    read_directly = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [2])], list(model.graph.initializer),
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="float32"):
        OnnxModule(helper.make_model(read_directly, opset_imports=[helper.make_opsetid("", 17)]), narrow_constants=True)
