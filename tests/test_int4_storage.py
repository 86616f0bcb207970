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
