"""LeadingMeanAsMatMul: means and sums over leading axes as one MatMul, the same values up to summation order."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxpress
from onnxpress.model_io import infer_shapes
from onnxpress.passes.leading_mean import LeadingMeanAsMatMul
from onnxpress.pipeline import run_passes
from tests.graphs import make_model, rng, run

T, B, D = 6, 3, 5


def reduce_model(op: str, axes: list[int], in_shape: list, *, perm: list[int] | None = None, keepdims: int = 0,
                 opset: int = 18, also_read: bool = False) -> onnx.ModelProto:
    """X -> [Transpose(perm)] -> t -> op(axes, keepdims) -> Y (and t -> Relu -> Z when ``also_read``)."""
    nodes, inits, src = [], {}, "X"
    if perm is not None:
        nodes.append(helper.make_node("Transpose", ["X"], ["t"], perm=perm))
        src = "t"
    if opset >= (18 if op == "ReduceMean" else 13):
        inits["axes"] = np.array(axes, np.int64)
        nodes.append(helper.make_node(op, [src, "axes"], ["Y"], keepdims=keepdims))
    else:
        nodes.append(helper.make_node(op, [src], ["Y"], axes=axes, keepdims=keepdims))
    rank = len(in_shape)
    outputs = [("Y", [f"y{i}" for i in range(rank if keepdims else rank - len(axes))])]
    if also_read:
        nodes.append(helper.make_node("Relu", [src], ["Z"]))
        outputs.append(("Z", [f"z{i}" for i in range(rank)]))
    return make_model(nodes, [("X", in_shape)], outputs, inits, opset=opset)


def rewrite(model: onnx.ModelProto):
    return run_passes(infer_shapes(model), [LeadingMeanAsMatMul()])


def x_of(shape) -> np.ndarray:
    return rng(3).standard_normal([B if d == "batch" else d for d in shape]).astype(np.float32)


@pytest.mark.parametrize(
    ("op", "axes", "shape", "perm", "keepdims", "opset"),
    [
        ("ReduceMean", [0], [T, "batch", D], None, 0, 18),  # a mean over time of [T, batch, features]
        ("ReduceMean", [1], [T, "batch", D], [1, 0, 2], 0, 18),  # the LSTM export: transposed first
        ("ReduceMean", [1], [T, "batch", D], [1, 0, 2], 1, 18),  # keepdims: [batch, 1, D]
        ("ReduceSum", [0], [T, "batch", D], None, 1, 13),  # a sum; axes as an input from opset 13
        ("ReduceMean", [0], [T, "batch", D], None, 0, 17),  # axes as an attribute before opset 18
        ("ReduceMean", [-4, 1], [2, T, "batch", D], None, 0, 18),  # two leading axes, one negative
    ],
)
def test_leading_reductions_become_one_matmul(op, axes, shape, perm, keepdims, opset) -> None:
    model = reduce_model(op, axes, shape, perm=perm, keepdims=keepdims, opset=opset)
    result = rewrite(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert result.stats["leading_mean_as_matmul.rewritten"] == 1
    assert op not in ops and "Transpose" not in ops and ops.count("MatMul") == 1
    x = x_of(shape)
    (want,) = run(model, {"X": x})
    (got,) = run(result.model, {"X": x})
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    onnx.checker.check_model(result.model, full_check=True)


def test_a_transpose_read_elsewhere_stays_and_both_outputs_hold() -> None:
    model = reduce_model("ReduceMean", [1], [T, "batch", D], perm=[1, 0, 2], also_read=True)
    result = rewrite(model)
    assert [n.op_type for n in result.model.graph.node].count("Transpose") == 1
    x = x_of([T, "batch", D])
    for want, got in zip(run(model, {"X": x}), run(result.model, {"X": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("axes", "shape", "perm", "why"),
    [
        ([2], [T, "batch", D], None, ""),  # the last axis: onnxruntime is fast there, a product slow
        ([1], ["batch", T, D], None, ""),  # a middle axis: as fast as the product
        ([0], ["t", "batch", D], None, "reduced axes without a static size"),
        ([1], [T, "batch", D], [2, 0, 1], ""),  # through the transpose: axis 0 of X, but B and D swap order
        ([0], [T, "batch", "d"], None, "more than one dynamic output dimension"),
    ],
)
def test_other_reductions_are_kept(axes, shape, perm, why) -> None:
    result = rewrite(reduce_model("ReduceMean", axes, shape, perm=perm))
    assert not result.stats.get("leading_mean_as_matmul.rewritten")
    assert [n.op_type for n in result.model.graph.node].count("ReduceMean") == 1
    if why:
        assert any(why in note for note in result.notes)


def test_quantize_runs_a_recurrent_mean_over_time_as_a_matmul() -> None:
    """The reference LSTM's mean over time (after its LSTM) leaves quantize as a MatMul; outputs stay close."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "models"
    result = onnxpress.quantize(root / "lstm.onnx", calib=root / "digits32_calib.npz", max_samples=32)
    ops = [n.op_type for n in result.model.graph.node]
    assert "ReduceMean" not in ops and result.stats["leading_mean_as_matmul.rewritten"] == 1
    x = np.load(root / "digits32_test.npz")["input"][:64]
    (want,) = run(onnx.load(root / "lstm.onnx"), {"input": x})
    (got,) = run(result.model, {"input": x}, optimize=True)
    assert 10 * np.log10((want**2).sum() / ((want - got) ** 2).sum()) > 40


def _time_major_mean(reshape_target: list[int], *, also_read: bool = False) -> onnx.ModelProto:
    """A bidirectional LSTM's output Y[T, 2, batch, D] -> Transpose(0, 2, 1, 3) -> Reshape -> ReduceMean(axis 0)."""
    nodes = [helper.make_node("Transpose", ["X"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]),
             helper.make_node("ReduceMean", ["r", "axes"], ["Y"], keepdims=0)]
    outputs = [("Y", ["y0", "y1"])]
    if also_read:
        nodes.append(helper.make_node("Relu", ["t"], ["Z"]))
        outputs.append(("Z", ["z0", "z1", "z2", "z3"]))
    inits = {"shape": np.array(reshape_target, np.int64), "axes": np.array([0], np.int64)}
    return make_model(nodes, [("X", [T, 2, "batch", D])], outputs, inits, opset=18)


@pytest.mark.parametrize("also_read", [False, True])
def test_a_mean_over_time_is_taken_before_a_time_major_transpose(also_read) -> None:
    """The Transpose moves after the mean, onto a tensor T times smaller (on the reference LSTM it was 287 of
    ~4300 us at batch 64); read elsewhere too, the Transpose stays for that reader."""
    model = _time_major_mean([T, -1, 2 * D], also_read=also_read)
    result = rewrite(model)
    graph = result.model.graph
    assert result.stats["leading_mean_as_matmul.rewritten"] == 1 and "ReduceMean" not in [n.op_type for n in graph.node]
    moved = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] != "X"]
    assert len(moved) == 1 and list(moved[0].attribute[0].ints) == [1, 0, 2]  # [2, batch, D] -> [batch, 2, D]
    assert [n.op_type for n in graph.node].count("Transpose") == (2 if also_read else 1)
    x = x_of([T, 2, "batch", D])
    for want, got in zip(run(model, {"X": x}), run(result.model, {"X": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_reshape_that_moves_time_keeps_the_transpose_before_the_mean() -> None:
    """[T, 2, batch, D] -> Transpose -> Reshape[-1, T, ...] regroups time steps: the mean stays after the transpose."""
    model = _time_major_mean([2 * D, T, -1])
    result = rewrite(model)
    x = x_of([T, 2, "batch", D])
    for want, got in zip(run(model, {"X": x}), run(result.model, {"X": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert all(not (n.op_type == "Transpose" and n.input[0] != "X") for n in result.model.graph.node)
