"""RewritePRelu: a PRelu with one slope is LeakyRelu, bit for bit, and onnxruntime runs it much faster."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxpress
from onnxpress.passes.prelu import RewritePRelu
from onnxpress.pipeline import run_passes
from tests.graphs import make_model, rng, run
from tests.test_dynamic_quant import _fused_ops


def conv_prelu(slope: np.ndarray) -> onnx.ModelProto:
    """X[N, 4, 16] -> Conv1d(8, k3) -> PRelu(slope) -> Conv1d(6, k1) -> Y (no value_info, as TorchScript writes)."""
    r = rng(3)
    init = {"W": r.standard_normal((8, 4, 3)).astype(np.float32), "B": r.standard_normal(8).astype(np.float32),
            "W2": r.standard_normal((6, 8, 1)).astype(np.float32), "slope": slope}  # fmt: skip
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1], name="conv"),
             helper.make_node("PRelu", ["c", "slope"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "W2"], ["Y"], name="conv2")]  # fmt: skip
    return make_model(nodes, [("X", ["N", 4, 16])], [("Y", ["N", 6, 16])], init)


def _x() -> np.ndarray:
    x = rng(4).standard_normal((5, 4, 16)).astype(np.float32)
    x[0, 0, :3] = [0.0, -0.0, 1e-30]
    return x


@pytest.mark.parametrize("slope_shape", [(1,), (1, 1), (1, 1, 1), ()])
def test_one_slope_becomes_leaky_relu_with_identical_outputs(tmp_path, slope_shape):
    slope = np.full(slope_shape, 0.2137, np.float32)
    model = conv_prelu(slope)
    result = run_passes(model, [RewritePRelu()])
    assert result.stats["rewrite_prelu.leaky_relu"] == 1
    (act,) = [n for n in result.model.graph.node if n.name == "act"]
    assert act.op_type == "LeakyRelu" and list(act.input) == ["c"]
    assert helper.get_attribute_value(act.attribute[0]) == pytest.approx(float(slope.reshape(())), abs=0)
    onnx.checker.check_model(result.model, full_check=True)
    x = _x()
    for optimize in (False, True):
        np.testing.assert_array_equal(run(result.model, {"X": x}, optimize=optimize)[0],
                                      run(model, {"X": x}, optimize=optimize)[0])  # fmt: skip
    assert "FusedConv" in _fused_ops(result.model, tmp_path)  # onnxruntime fuses the activation into the conv


@pytest.mark.parametrize("slope_shape", [(8, 1), (1, 8, 1)])
def test_a_slope_per_channel_becomes_relu_plus_scaled_min_with_identical_outputs(slope_shape):
    slope = np.linspace(-0.3, 0.8, 8, dtype=np.float32).reshape(slope_shape)  # a negative slope too
    model = conv_prelu(slope)
    result = run_passes(model, [RewritePRelu()])
    assert result.stats["rewrite_prelu.split"] == 1
    ops = [n.op_type for n in result.model.graph.node]
    assert "PRelu" not in ops and sorted(ops) == ["Add", "Conv", "Conv", "Min", "Mul", "Relu"]
    onnx.checker.check_model(result.model, full_check=True)
    x = _x()
    x[1, :, 5] = np.nan
    for optimize in (False, True):
        np.testing.assert_array_equal(run(result.model, {"X": x}, optimize=optimize)[0],
                                      run(model, {"X": x}, optimize=optimize)[0])  # fmt: skip


def test_a_slope_fed_at_run_time_stays_prelu():
    node = helper.make_node("PRelu", ["X", "slope"], ["Y"])
    runtime_slope = make_model([node], [("X", ["N", 4]), ("slope", [1])], [("Y", ["N", 4])])
    assert not run_passes(runtime_slope, [RewritePRelu()]).modified


def test_pruning_goes_through_a_split_prelu():
    """The per-channel slope constant is sliced with the channels it scales; a PRelu stopped the analysis."""
    model = conv_prelu(np.linspace(0.1, 0.8, 8, dtype=np.float32).reshape(8, 1))
    result = onnxpress.prune(model, ratio=0.5)
    (mul,) = [n for n in result.model.graph.node if n.op_type == "Mul"]
    slope = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}[mul.input[1]]
    assert slope.shape == (4, 1)


def test_cleanup_and_quantize_take_it(tmp_path):
    """Every pipeline starts with cleanup: int8 runs it as onnxruntime's QLinearLeakyRelu."""
    model = conv_prelu(np.full((1, 1), 0.25, np.float32))
    assert onnxpress.cleanup(model).stats["rewrite_prelu.leaky_relu"] == 1
    x = rng(5).standard_normal((64, 4, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=x)
    quantized = onnxpress.quantize(model, calib=tmp_path / "calib.npz").model
    assert "QLinearLeakyRelu" in _fused_ops(quantized, tmp_path)


def test_a_float16_export_gets_the_rewrites_too(tmp_path):
    """Cleanup runs before quantize computes a float16 export in float32: the rewrites that take float32 slopes
    and weights run again then, so its PRelu and Einsum are rewritten as a float32 export's are."""
    from onnx import TensorProto, numpy_helper

    from tests.test_einsum import einsum_model

    for model, op in ((conv_prelu(np.linspace(0.1, 0.8, 8, dtype=np.float32).reshape(8, 1)), "PRelu"),
                      (einsum_model("btd,dhk->bthk", sizes={"d": 32, "k": 16}), "Einsum")):  # fmt: skip
        g = model.graph
        for i, init in enumerate(g.initializer):
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                              init.name))  # fmt: skip
        for vi in [*g.input, *g.output]:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        x_dims = [d.dim_value or 3 for d in g.input[0].type.tensor_type.shape.dim]
        np.savez(tmp_path / "calib.npz", X=rng(6).standard_normal([63, *x_dims[1:]]).astype(np.float16))
        quantized = onnxpress.quantize(model, calib=tmp_path / "calib.npz").model
        assert op not in {n.op_type for n in quantized.graph.node}
