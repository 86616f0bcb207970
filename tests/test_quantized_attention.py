"""FuseQuantizedAttention: a fused attention's int8 q/k/v projections and the attention as one QAttention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxpress
from tests import graphs
from tests.conformance import sqnr_db
from tests.test_fuse_attention import _feeds, attention

MODELS = Path(__file__).resolve().parents[1] / "models"


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _projection_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """The int8 [K, N] weights of the Gemms that MultiHeadAttention's views read, per attention in graph order."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    found = []
    for mha in (n for n in model.graph.node if n.op_type == "MultiHeadAttention"):
        gemms = [made[made[t].input[0]] for t in mha.input]  # view <- Gemm
        found.append(np.concatenate([inits[made[g.input[1]].input[0]] for g in gemms], axis=1))
    return found


def test_the_reference_transformer_runs_its_projections_in_qattention_with_the_same_int8_weights() -> None:
    src = str(MODELS / "transformer.onnx")
    calib = np.load(MODELS / "digits32_calib.npz")["input"][:64]
    x = np.load(MODELS / "digits32_test.npz")["input"][:128]
    fused = onnxpress.quantize(src, calib=[{"input": calib}], max_samples=64, compact=False)
    gemms = onnxpress.quantize(src, calib=[{"input": calib}], max_samples=64, compact=False,
                               quantized_attention=False)
    assert fused.stats["quantized_attention.fused"] == 2
    assert _ops(fused.model).count("QAttention") == 2 and "MultiHeadAttention" not in _ops(fused.model)
    assert _ops(gemms.model).count("MultiHeadAttention") == 2 and "QAttention" not in _ops(gemms.model)
    inits = {i.name: numpy_helper.to_array(i) for i in fused.model.graph.initializer}
    written = [inits[n.input[1]] for n in fused.model.graph.node if n.op_type == "QAttention"]
    for a, b in zip(written, _projection_weights(gemms.model), strict=True):
        assert a.dtype == np.int8 and a.shape == (128, 384)
        np.testing.assert_array_equal(a, b)  # the very codes InsertQDQ chose, side by side
    onnx.checker.check_model(fused.model)
    ref = graphs.run(onnx.load(src), {"input": x})[0]
    a = graphs.run(fused.model, {"input": x}, optimize=True)[0]
    b = graphs.run(gemms.model, {"input": x}, optimize=True)[0]
    # float rounding apart (the bias added in float, another attention kernel) they are the same model; against
    # the float model the quantization noise is ~40 dB
    assert sqnr_db(a, b) > 50
    assert abs(sqnr_db(a, ref) - sqnr_db(b, ref)) < 0.1
    assert (a.argmax(1) == b.argmax(1)).all()


def test_dynamic_int8_runs_its_projections_in_qattention_too() -> None:
    """No data: the input is quantized at run time (DynamicQuantizeLinear) and QAttention reads its scale."""
    src = str(MODELS / "transformer.onnx")
    x = np.load(MODELS / "digits32_test.npz")["input"][:128]
    fused = onnxpress.quantize(src, activations="dynamic")
    gemms = onnxpress.quantize(src, activations="dynamic", quantized_attention=False)
    assert fused.stats["quantized_attention.fused"] == 2 and "MultiHeadAttention" not in _ops(fused.model)
    assert _ops(gemms.model).count("MatMulInteger") == _ops(fused.model).count("MatMulInteger") + 6
    a = graphs.run(fused.model, {"input": x}, optimize=True)[0]
    b = graphs.run(gemms.model, {"input": x}, optimize=True)[0]
    assert sqnr_db(a, b) > 50 and (a.argmax(1) == b.argmax(1)).all()


@pytest.mark.parametrize("kwargs", [{"scale": "mul"}, {"scale": "div"}, {"scale": "none"}, {"keys": "two"},
                                    {"keys": "sdpa"}, {"keys": "script"}, {"merge_by_shape": True}, {"seq": "S"}])
def test_a_small_attention_block_gives_the_same_outputs_through_qattention(kwargs) -> None:
    """x[B, S, D] -> q/k/v projections -> attention -> output projection, as each exporter writes it (the scale,
    the keys' layout, a dynamic sequence, torch's SDPA and TorchScript forms): one QAttention, the same outputs."""
    model = attention(**kwargs)
    calib = [_feeds(batch=3)]
    fused = onnxpress.quantize(model, calib=calib)
    gemms = onnxpress.quantize(model, calib=calib, quantized_attention=False)
    assert _ops(fused.model).count("QAttention") == 1 and "MultiHeadAttention" not in _ops(fused.model)
    assert _ops(gemms.model).count("MatMul") == _ops(fused.model).count("MatMul") + 3  # q, k, v: [B, S, D] form
    feeds = _feeds(batch=3)
    a = graphs.run(fused.model, feeds, optimize=True)[0]
    b = graphs.run(gemms.model, feeds, optimize=True)[0]
    assert sqnr_db(a, b) > 45


def test_int8_activations_and_the_option_off_keep_multiheadattention() -> None:
    model, calib = attention(), [_feeds(batch=3)]
    for kwargs in ({"activations": "int8"}, {"quantized_attention": False}):
        result = onnxpress.quantize(model, calib=calib, **kwargs)
        assert "QAttention" not in _ops(result.model) and _ops(result.model).count("MultiHeadAttention") == 1


def test_qat_names_qattention_and_the_option_that_writes_trainable_gemms() -> None:
    from onnxpress.bridge.qat import check_trainable_qdq
    from onnxpress.errors import UnsupportedModelError

    model, calib = attention(), [_feeds(batch=3)]
    with pytest.raises(UnsupportedModelError, match=r"1 x QAttention.*--keep-attention, or quantized_attention=False"):
        check_trainable_qdq(onnxpress.quantize(model, calib=calib).model)
    check_trainable_qdq(onnxpress.quantize(model, calib=calib, quantized_attention=False).model)  # no error
