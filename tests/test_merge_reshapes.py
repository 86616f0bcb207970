"""MergeReshapes: a Reshape of a Reshape reads the first one's input, with the shape the pair resolves to."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxpress.model_io import infer_shapes_thoroughly
from onnxpress.passes.merge_reshapes import MergeReshapes, merged_shape
from onnxpress.pipeline import run_passes
from tests import graphs


def resolve(dims: list[int], shape: list[int], allowzero: bool = False) -> list[int] | None:
    """The output dimensions of ONNX ``Reshape(x[dims], shape)`` (the spec's rules), None where it is invalid."""
    out = [dims[i] if d == 0 and not allowzero and i < len(dims) else d for i, d in enumerate(shape)]
    if any(d == 0 for i, d in enumerate(shape) if not allowzero and i >= len(dims)) or out.count(-1) > 1:
        return None
    known = math.prod(d for d in out if d != -1)
    total = math.prod(dims)
    if -1 in out:
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out if math.prod(out) == total else None


@pytest.mark.parametrize(("s1", "s2", "expected"), [
    ([-1, 64, 4, 32], [0, 0, -1], [-1, 64, 128]),   # FuseAttention's [B, S, H*d] view of a head split
    ([0, 0, 4, 32], [0, 0, -1], [0, 0, -1]),        # x's own dimensions copied through
    ([0, 0, 4, 32], [-1, 128], [-1, 128]),          # no 0 in the second: it alone decides
    ([-1, 8, 4, 8, 4], [0, 0, 0, 0, 0], [-1, 8, 4, 8, 4]),
    ([-1, 6], [0, 0, -1], None),                    # a 0 past the first shape's rank: left
])
def test_merged_shapes(s1, s2, expected) -> None:
    assert merged_shape(s1, s2) == expected


def test_a_literal_zero_dimension_is_left() -> None:
    assert merged_shape([2, 0, 3], [0, 0, 3], allowzero1=True) is None
    assert merged_shape([2, 0, 3], [2, 0, 3], allowzero2=True) == [2, 0, 3]


@st.composite
def reshape_pairs(draw):
    """x's dimensions, and two Reshapes that are valid on them one after the other (0s and one -1 drawn in)."""
    dims = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))

    def target(src: list[int]) -> list[int]:
        total = math.prod(src)
        out = []
        while total > 1 and len(out) < 4:  # a factorisation of the element count
            f = draw(st.sampled_from([d for d in range(1, total + 1) if total % d == 0]))
            out.append(f)
            total //= f
        out.append(total)
        spelled = [0 if i < len(src) and d == src[i] and draw(st.booleans()) else d for i, d in enumerate(out)]
        if draw(st.booleans()):
            i = draw(st.integers(0, len(spelled) - 1))
            spelled[i] = -1
        return spelled

    s1 = target(dims)
    t = resolve(dims, s1)
    return dims, s1, target(t)


@settings(max_examples=300, deadline=None)
@given(reshape_pairs())
def test_a_merged_shape_gives_what_the_pair_gives(case) -> None:
    dims, s1, s2 = case
    merged = merged_shape(s1, s2)
    if merged is not None:
        assert resolve(dims, merged) == resolve(resolve(dims, s1), s2)


def _chain(extra_reader: bool = False, opset: int = 17) -> onnx.ModelProto:
    """x[B, 6, 8] -> Reshape[-1, 6, 2, 4] -> Reshape[0, 0, -1] -> Relu -> y (and Neg of the middle one)."""
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["t"], name="split"),
             helper.make_node("Reshape", ["t", "s2"], ["u"], name="merge"),
             helper.make_node("Relu", ["u"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, 8])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["t"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 6, 2, 4]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6, 8])],
                              outputs, [numpy_helper.from_array(np.array([-1, 6, 2, 4], np.int64), "s1"),
                                        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "s2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(("extra_reader", "opset"), [(False, 17), (True, 17), (False, 13)])
def test_onnxruntime_gives_the_same_values_with_one_reshape_fewer(extra_reader, opset) -> None:
    """At opset 13 (no ``allowzero`` attribute yet) the merged node must not get one: the checker refuses it."""
    model = _chain(extra_reader, opset)
    x = graphs.rng(0).standard_normal((3, 6, 8)).astype(np.float32)
    result = run_passes(model, [MergeReshapes()])
    ops = [n.op_type for n in result.model.graph.node]
    assert result.stats["merge_reshapes.merged"] == 1
    assert ops.count("Reshape") == (2 if extra_reader else 1)  # the first stays while something else reads it
    onnx.checker.check_model(result.model)
    for a, b in zip(graphs.run(model, {"x": x}), graphs.run(result.model, {"x": x}), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_target_computed_at_run_time_is_read_off_the_inferred_shape() -> None:
    """TorchScript's head split: Reshape(x, Concat(Shape(x)[:1], [6, 2, 4])) -> Reshape[0, 0, -1] is one Reshape."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], end=1),
             helper.make_node("Concat", ["shape", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["t"], name="split"),
             helper.make_node("Reshape", ["t", "s2"], ["y"], name="merge")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, 8])],
                              [numpy_helper.from_array(np.array([6, 2, 4], np.int64), "rest"),
                               numpy_helper.from_array(np.array([0, 0, -1], np.int64), "s2")])
    # onnxruntime's symbolic inference follows the Shape arithmetic (quantize and lowrank run it before)
    model = infer_shapes_thoroughly(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]))
    result = run_passes(model, [MergeReshapes()])
    assert [n.op_type for n in result.model.graph.node] == ["Reshape"]  # the Shape arithmetic is gone too
    x = graphs.rng(1).standard_normal((3, 6, 8)).astype(np.float32)
    np.testing.assert_array_equal(graphs.run(model, {"x": x})[0], graphs.run(result.model, {"x": x})[0])
