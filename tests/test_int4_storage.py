"""int4 weights on int8 kernels (W4A8): 4-bit codes in the int8 initializers, stored two to a byte (exact)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxpress
from onnxpress.cli import main
from onnxpress.passes.int4_storage import PackInt4Weights, pack_nibbles, unpack_nibbles
from onnxpress.pipeline import run_passes
from onnxpress.runtime import make_session
from tests.test_qdq import MODELS, optimized_ops, sqnr_db

CALIB = MODELS / "digits32_calib.npz"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=300))
def test_nibbles_round_trip(codes) -> None:
    c = np.array(codes, np.int8)
    packed = pack_nibbles(c)
    assert packed.dtype == np.uint8 and packed.size == (c.size + 1) // 2
    np.testing.assert_array_equal(unpack_nibbles(packed, c.size), c)


def test_a_code_outside_four_bits_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_nibbles(np.array([0, 8], np.int8))


def _outputs(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def resnet_w4a8() -> onnxpress.QuantizeResult:
    # compact=False: the 4-bit codes are left in their int8 initializers, to compare with the packed form
    return onnxpress.quantize(MODELS / "resnet.onnx", calib=CALIB, weights="int4", activations="uint8",
                              compact=False)


def test_packing_is_exact_and_keeps_the_int8_kernels(resnet_w4a8, tmp_path: Path) -> None:
    unpacked = resnet_w4a8.model
    result = run_passes(unpacked, [PackInt4Weights()])
    assert result.stats["pack_int4_weights.weights"] == resnet_w4a8.stats["insert_qdq.weights_4bit"] == 7
    onnx.checker.check_model(result.model, full_check=True)
    with np.load(MODELS / "digits32_test.npz") as data:
        x = data["input"][:32].astype(np.float32)
    for optimize in (True, False):  # folded at load, or rebuilt on every call: the same numbers either way
        np.testing.assert_array_equal(_outputs(result.model, x, optimize), _outputs(unpacked, x, optimize))
    kernels = Counter(optimized_ops(result.model, tmp_path))
    assert kernels["QLinearConv"] == 9 and kernels["Conv"] == 0  # every conv still runs as an int8 kernel
    saved = result.stats["pack_int4_weights.bytes_saved"]  # the rebuild's nodes and names: ~600 bytes a weight
    assert saved - 800 * 7 < unpacked.ByteSize() - result.model.ByteSize() < saved


def test_packing_leaves_what_does_not_fit_four_bits(resnet_w4a8) -> None:
    eight_bit = onnxpress.quantize(MODELS / "resnet.onnx", calib=CALIB, compact=False).model
    assert not run_passes(eight_bit, [PackInt4Weights()]).modified  # int8 codes beyond [-8, 7]
    small = run_passes(resnet_w4a8.model, [PackInt4Weights(min_elements=10**9)])
    assert not small.modified


@pytest.mark.parametrize(("name", "packed", "max_size", "min_db"),
                         [("resnet", 7, 0.15, 36.0), ("transformer", 8, 0.15, 36.0)])
def test_w4a8_is_about_int4_small_at_int8_speed_and_holds_its_outputs(name, packed, max_size, min_db,
                                                                       tmp_path) -> None:
    """Measured: resnet 38.85 dB, 0.139x; transformer 38.63 dB, 0.147x; 100% / 99.72% top-1 agreement on the 360
    test digits. The transformer's 12 four-bit weights are 8 packed tensors: each layer's query, key and value
    codes sit side by side in one QAttention weight."""
    src = MODELS / f"{name}.onnx"
    res = onnxpress.quantize(src, tmp_path / "w4.onnx", calib=CALIB, weights="int4", activations="uint8")
    assert res.size_ratio <= max_size
    assert res.stats["pack_int4_weights.weights"] == packed
    with np.load(MODELS / "digits32_test.npz") as data:
        x = data["input"].astype(np.float32)
    ref = make_session(str(src)).run(None, {"input": x})[0]
    out = make_session(str(tmp_path / "w4.onnx")).run(None, {"input": x})[0]
    assert sqnr_db(ref, out) >= min_db
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.995
    kernels = Counter(optimized_ops(res.model, tmp_path))
    assert not kernels["MatMulNBits"] and (kernels["QLinearConv"] or kernels["QGemm"])


def test_the_cli_says_which_weights_took_four_bits(tmp_path, capsys) -> None:
    out = tmp_path / "w4.onnx"
    assert main(["quantize", str(MODELS / "resnet.onnx"), "-o", str(out), "--calib", str(CALIB), "--weights", "int4",
                 "--activations", "uint8", "--no-latency-check", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "int4 weights on int8 kernels, uint8 activations (7 of 10 weights 4-bit" in printed
    assert re.search(r"\(0\.1[34]\dx\); wrote", printed)  # the size ratio


# --- per layer (optimize's w4a8 option): quantize(w4a8_layers=...), the recipe field and the search option -------

BIG = ["node_Conv_140", "node_Conv_142", "node_Conv_144"]  # reference ResNet convs of 9216+ weights each


def test_only_the_named_layers_take_four_bit_codes(tmp_path) -> None:
    """Measured: 3 of the 7 large convs 4-bit: 40.39 dB at 0.241x (uniform W4A8 38.85 dB at 0.136x, int8 43.47)."""
    res = onnxpress.quantize(MODELS / "resnet.onnx", tmp_path / "mix.onnx", calib=CALIB, w4a8_layers=BIG)
    assert res.stats["insert_qdq.weights_4bit"] == res.stats["pack_int4_weights.weights"] == 3
    int8 = onnxpress.quantize(MODELS / "resnet.onnx", calib=CALIB)
    assert res.size_ratio < int8.size_ratio - 0.01
    with np.load(MODELS / "digits32_test.npz") as data:
        x = data["input"].astype(np.float32)
    ref = make_session(str(MODELS / "resnet.onnx")).run(None, {"input": x})[0]
    out = make_session(str(tmp_path / "mix.onnx")).run(None, {"input": x})[0]
    assert sqnr_db(ref, out) >= 38.0 and (out.argmax(1) == ref.argmax(1)).mean() >= 0.995
    assert Counter(optimized_ops(res.model, tmp_path))["QLinearConv"] >= 8  # int8 kernels (the stem's aside)
    # unpacked, the codes are in the DequantizeLinear initializers: [-7, 7] on the named convs, 8-bit elsewhere
    unpacked = onnxpress.quantize(MODELS / "resnet.onnx", calib=CALIB, w4a8_layers=BIG, compact=False).model
    codes = _weight_codes(unpacked)
    assert all(np.abs(codes[k]).max() == 7 for k in BIG)  # scale max|W_c| / 7 per channel
    assert all(np.abs(c).max() > 7 for k, c in codes.items() if k not in BIG)


def _weight_codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The int8 weight codes of each Conv, by node name (a QDQ model stored without CompactQDQ)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        dq = producers.get(n.input[1]) if n.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            out[n.name] = inits[dq.input[0]]
    return out


def test_w4a8_layers_that_cannot_take_four_bits_are_refused_by_name() -> None:
    for layers, match in [(["node_Conv_148"], "2048 elements"), (["nope"], "not a node of the model"),
                          (["node_relu_3"], "is a Relu, not a Conv")]:
        with pytest.raises(onnxpress.OnnxpressError, match=match):
            onnxpress.quantize(MODELS / "resnet.onnx", calib=CALIB, w4a8_layers=layers)
    for kwargs, match in [({"weights": "int4", "activations": "uint8"}, "use it with weights='int8'"),
                          ({"per_channel": False}, "per-channel"),
                          ({"exclude": ["node_Conv_140"]}, "kept float by exclude"),
                          ({"codebook_layers": ["node_Conv_140"]}, "keep one")]:
        with pytest.raises(onnxpress.OnnxpressError, match=match):
            onnxpress.quantize(MODELS / "resnet.onnx", calib=CALIB, w4a8_layers=["node_Conv_140"], **kwargs)


def test_the_cli_takes_w4a8_layers_and_says_so(tmp_path, capsys) -> None:
    out = tmp_path / "mix.onnx"
    assert main(["quantize", str(MODELS / "resnet.onnx"), "-o", str(out), "--calib", str(CALIB), "--w4a8-layers",
                 *BIG[:2], "--no-latency-check", "-q"]) == 0
    assert "2 layer weight(s) with 4-bit codes (W4A8)" in capsys.readouterr().out
    assert main(["quantize", str(MODELS / "resnet.onnx"), "-o", str(tmp_path / "bad.onnx"), "--calib", str(CALIB),
                 "--w4a8-layers", "node_Conv_148", "--no-latency-check", "-q"]) == 2
    assert "node_Conv_148 has a weight of 2048 elements" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
