"""ReduceMeanToGlobalPool: spatial means become GlobalAveragePool, same outputs on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxpress.model_io import infer_shapes
from onnxpress.passes.global_pool import ReduceMeanToGlobalPool
from onnxpress.pipeline import run_passes
from tests import graphs


def _mean_model(axes: list[int], keepdims: int, opset: int, rank: int = 4) -> tuple:
    """X[2, 3, 5, 7(, 4)] -> Relu -> ReduceMean(axes, keepdims) -> Y (axes as attribute before opset 18)."""
    shape = [2, 3, 5, 7, 4][:rank]
    inits = {}
    if opset >= 18:
        inits["axes"] = np.array(axes, dtype=np.int64)
        mean = helper.make_node("ReduceMean", ["r", "axes"], ["Y"], keepdims=keepdims)
    else:
        mean = helper.make_node("ReduceMean", ["r"], ["Y"], axes=axes, keepdims=keepdims)
    red = {a % rank for a in axes}
    out = [1 if i in red else d for i, d in enumerate(shape) if keepdims or i not in red]
    model = graphs.make_model([helper.make_node("Relu", ["X"], ["r"]), mean], [("X", shape)], [("Y", out)],
                              inits, opset=opset)
    x = graphs.rng(3).standard_normal(shape).astype(np.float32)
    return model, x


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("axes", [[2, 3], [-1, -2], [3, -2]])
def test_spatial_mean_becomes_global_pool_with_the_same_output(axes, keepdims, opset):
    model, x = _mean_model(axes, keepdims, opset)
    result = run_passes(infer_shapes(model), [ReduceMeanToGlobalPool()])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Relu", "GlobalAveragePool"] + ([] if keepdims else ["Flatten"])
    assert result.stats["reducemean_to_global_pool.rewritten"] == 1
    assert result.model.graph.output[0].name == "Y"
    want, got = graphs.run(model, {"X": x})[0], graphs.run(result.model, {"X": x})[0]
    assert got.shape == want.shape == ((2, 3, 1, 1) if keepdims else (2, 3))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_rank5_spatial_mean_becomes_global_pool():
    model, x = _mean_model([2, 3, 4], 1, 13, rank=5)
    result = run_passes(infer_shapes(model), [ReduceMeanToGlobalPool()])
    assert "GlobalAveragePool" in [n.op_type for n in result.model.graph.node]
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("axes", "keepdims", "rank", "why"),
    [
        ([1, 2], 1, 4, "not the spatial axes"),  # channels are averaged too
        ([3], 1, 4, "not the spatial axes"),  # one spatial axis only
        ([2, 3, 4], 0, 5, "keepdims=0 on a rank other than 4"),
        ([2], 1, 3, "below 4"),  # [batch, seq, features]: a LayerNorm's mean more often than a pooling head
    ],
)
def test_other_means_are_kept_with_a_reason(axes, keepdims, rank, why):
    model, x = _mean_model(axes, keepdims, 13, rank=rank)
    result = run_passes(infer_shapes(model), [ReduceMeanToGlobalPool()])
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "ReduceMean"]
    assert not result.modified
    assert any(why in note for note in result.notes)


def test_integer_mean_is_kept():
    """ReduceMean takes int64; GlobalAveragePool does not."""
    nodes = [helper.make_node("ReduceMean", ["X"], ["Y"], axes=[2, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.INT64, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.INT64, [2, 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = run_passes(infer_shapes(model), [ReduceMeanToGlobalPool()])
    assert [n.op_type for n in result.model.graph.node] == ["ReduceMean"]
    assert any("float" in note for note in result.notes)


def test_mean_of_a_tensor_of_unknown_rank_is_kept():
    """Without shape inference the Relu output's type and rank are unknown: nothing is guessed."""
    model, _ = _mean_model([2, 3], 1, 13)
    result = run_passes(model, [ReduceMeanToGlobalPool()])
    assert "ReduceMean" in [n.op_type for n in result.model.graph.node]
    assert any("not a known float tensor" in note for note in result.notes)


def _torch_style_head() -> tuple[onnx.ModelProto, np.ndarray]:
    """X[n, 8, 12, 12] -> Conv -> Relu -> ReduceMean(axes [2, 3], keepdims=0) -> Gemm -> Y[n, 10], and 64 samples."""
    r = graphs.rng(5)
    inits = {
        "W": (r.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32),
        "B": r.standard_normal(16).astype(np.float32) * 0.1,
        "axes": np.array([2, 3], dtype=np.int64),
        "G": (r.standard_normal((10, 16)) * 0.3).astype(np.float32),
        "C": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=0),
        helper.make_node("Gemm", ["m", "G", "C"], ["Y"], transB=1),
    ]
    model = graphs.make_model(nodes, [("X", ["n", 8, 12, 12])], [("Y", ["n", 10])], inits, opset=18)
    return model, r.standard_normal((64, 8, 12, 12)).astype(np.float32)


def test_quantized_torch_style_head_runs_as_an_integer_pool(tmp_path):
    """``x.mean((2, 3))`` before the classifier: QLinearGlobalAveragePool in onnxruntime, said in the stats."""
    import onnxpress
    from tests.test_qdq import optimized_ops

    model, x = _torch_style_head()
    res = onnxpress.quantize(model, calib=[{"X": x}])
    assert "ReduceMean" not in [n.op_type for n in res.model.graph.node]
    assert res.stats["reducemean_to_global_pool.rewritten"] == 1
    assert "QLinearGlobalAveragePool" in optimized_ops(res.model, tmp_path)
    want, got = graphs.run(model, {"X": x})[0], graphs.run(res.model, {"X": x})[0]
    assert 10 * np.log10((want**2).sum() / ((got - want) ** 2).sum()) > 30


def test_a_table_calibrated_on_the_model_as_given_quantizes_the_pool_too(tmp_path):
    """The pool's output is a tensor the rewrite makes (``m_pooled``, then Flatten to ``m``): a table from
    ``calibrate`` on the model as given lacks it, and ``table=`` left the pool float where ``calib=`` did not.
    It takes ``m``'s range (the same values)."""
    import onnxpress
    from tests.test_qdq import optimized_ops

    model, x = _torch_style_head()
    table = onnxpress.calibrate(model, [{"X": x}])
    assert not [k for k in table.ranges if k.endswith("_pooled")]
    by_calib = onnxpress.quantize(model, calib=[{"X": x}], bias_correction=False, int8_method="rtn")
    by_table = onnxpress.quantize(model, table=table, bias_correction=False)
    assert [d.name for d in by_table.kept_float] == [d.name for d in by_calib.kept_float]
    assert by_table.table.ranges["m_pooled"] == table.ranges["m"]
    assert "QLinearGlobalAveragePool" in optimized_ops(by_table.model, tmp_path)
    ops = lambda m: sorted(n.op_type for n in m.graph.node)  # noqa: E731
    assert ops(by_table.model) == ops(by_calib.model)


def test_cli_quantize_says_it_rewrote_the_mean(tmp_path, capsys):
    from onnxpress.cli import main

    model, x = _torch_style_head()
    src, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(data, X=x)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(data), "-q"]) == 0
    assert "rewrote 1 spatial-mean ReduceMean as GlobalAveragePool" in capsys.readouterr().out
