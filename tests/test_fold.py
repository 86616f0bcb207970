"""FoldBatchNorm and FoldConstants: exact in float on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxpress.passes.fold import FoldBatchNorm, FoldConstants
from onnxpress.pipeline import run_passes
from tests import graphs


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_fold_is_exact(bias):
    model = graphs.conv_bn_relu(bias=bias)
    x = graphs.rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    result = run_passes(model, [FoldBatchNorm()])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "Relu"]
    assert result.stats["fold_batchnorm.folded"] == 1
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_fold_is_exact(trans_b):
    model = graphs.gemm_bn(trans_b=trans_b)
    x = graphs.rng(2).standard_normal((5, 8)).astype(np.float32)
    result = run_passes(model, [FoldBatchNorm()])
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5, rtol=0)


def test_bn_fold_declines_when_conv_output_is_also_a_graph_output():
    """X -> Conv -> c (graph output) -> BN -> Y: folding would change c, so it is declined."""
    model = graphs.conv_bn_relu()
    model.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    result = run_passes(model, [FoldBatchNorm()])
    assert "BatchNormalization" in [n.op_type for n in result.model.graph.node]
    assert result.stats["fold_batchnorm.folded"] == 0
    assert any("graph output" in note for note in result.notes)


def test_fold_constants_moves_constant_nodes_into_initializers():
    """X -> Add(Constant c) -> Y, where c = Constant -> Mul(2): folded to one initializer."""
    c = numpy_helper.from_array(np.arange(4, dtype=np.float32), "cval")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=c),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Mul", ["c", "two"], ["c2"]),
        helper.make_node("Add", ["X", "c2"], ["Y"]),
    ]
    model = graphs.make_model(nodes, [("X", [4])], [("Y", [4])])
    result = run_passes(model, [FoldConstants()])
    assert [n.op_type for n in result.model.graph.node] == ["Add"]
    x = np.ones(4, np.float32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], x + 2 * np.arange(4))
