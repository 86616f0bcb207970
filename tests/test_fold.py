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


def _tied_layers(bn: str | None = None) -> onnx.ModelProto:
    """X -> Conv(W) -> [BN1] -> Relu -> Conv(W) -> [BN2] -> Y: one 16x16x3x3 weight read through two Identity nodes.

    The layout TorchScript's exporter writes for a weight two layers share. ``bn``: None, "same" (both
    BatchNorms equal, as one module applied twice) or "different".
    """
    r = graphs.rng(7)
    inits = {"W": r.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Identity", ["W"], ["W1"]), helper.make_node("Identity", ["W"], ["W2"])]
    x = "X"
    for i in (1, 2):
        nodes.append(helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        x = f"c{i}"
        if bn:
            p = "bn1" if bn == "same" else f"bn{i}"
            if i == 1 or bn == "different":
                inits.update({f"{p}_{k}": (r.random(16) + 0.5).astype(np.float32) for k in "gbmv"})
            nodes.append(helper.make_node("BatchNormalization", [x, *(f"{p}_{k}" for k in "gbmv")], [f"n{i}"]))
            x = f"n{i}"
        if i == 1:
            nodes.append(helper.make_node("Relu", [x], ["r1"]))
            x = "r1"
    nodes.append(helper.make_node("Identity", [x], ["Y"]))
    return graphs.make_model(nodes, [("X", [2, 16, 8, 8])], [("Y", [2, 16, 8, 8])], inits)


def _stored_values(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).size for t in model.graph.initializer)


@pytest.mark.parametrize("bn", [None, "same"])
def test_cleanup_keeps_a_tied_weight_stored_once(bn):
    """Folding the Identity nodes used to give each layer a copy (2 x 2304 values); it is one tensor again."""
    from onnxpress.pipeline import cleanup_passes

    model = _tied_layers(bn)
    result = run_passes(model, cleanup_passes())
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "Relu", "Conv", "Identity"]  # the output Identity is not a constant
    weights = [t for t in result.model.graph.initializer if numpy_helper.to_array(t).size == 2304]
    assert len(weights) == 1
    assert [n.input[1] for n in result.model.graph.node if n.op_type == "Conv"] == [weights[0].name] * 2
    x = graphs.rng(3).standard_normal((2, 16, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5, rtol=0)


def test_fold_constants_alone_shares_the_folded_copies():
    """FoldConstants (what prune, recipes and sensitivity run) does not multiply the tied weight either."""
    model = _tied_layers()
    result = run_passes(model, [FoldConstants()])
    assert _stored_values(result.model) == 2304
    assert result.stats["fold_constants.constants_shared"] == 1


def test_bn_fold_gives_a_shared_weight_a_copy_per_batchnorm():
    """Two different BatchNorms after the tied convs: both fold (exactly), each into its own weight."""
    from onnxpress.pipeline import cleanup_passes

    model = _tied_layers("different")
    result = run_passes(model, cleanup_passes())
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph.node]
    assert result.stats["fold_batchnorm.folded"] == 2
    assert _stored_values(result.model) == 2 * 2304 + 2 * 16  # two folded weights, two biases
    x = graphs.rng(4).standard_normal((2, 16, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-4, rtol=0)


def test_share_constants_leaves_small_and_different_constants_alone():
    """Equal small constants (below SHARE_MIN_ELEMENTS) and equal-shaped different weights stay separate."""
    from onnxpress.passes.fold import SHARE_MIN_ELEMENTS, ShareConstants

    r = graphs.rng(5)
    big = r.standard_normal((32, 64)).astype(np.float32)
    small = np.ones(64, np.float32)
    inits = {"A": big, "B": big.copy(), "C": big + np.float32(1e-3), "s1": small, "s2": small.copy()}
    nodes = [helper.make_node("MatMul", ["X", w], [f"y{w}"]) for w in "ABC"]
    nodes += [helper.make_node("Sum", ["yA", "yB", "yC"], ["z"]), helper.make_node("Mul", ["z", "s1"], ["z1"]),
              helper.make_node("Mul", ["z1", "s2"], ["Y"])]
    model = graphs.make_model(nodes, [("X", [16, 32])], [("Y", [16, 64])], inits)
    assert big.size >= SHARE_MIN_ELEMENTS > small.size
    result = run_passes(model, [ShareConstants()])
    assert result.stats["share_constants.constants_shared"] == 1
    assert sorted(t.name for t in result.model.graph.initializer) == ["A", "C", "s1", "s2"]
    x = r.standard_normal((16, 32)).astype(np.float32)
    np.testing.assert_array_equal(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])
