"""EinsumToMatMul: projection Einsums as MatMul (within float rounding of onnxruntime's Einsum), then int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxpress
from onnxpress.passes.einsum import EinsumToMatMul
from onnxpress.pipeline import run_passes
from tests.graphs import make_model, rng, run
from tests.test_dynamic_quant import _fused_ops

SIZES = {"b": 3, "t": 5, "d": 8, "h": 2, "k": 4, "c": 6, "w": 7, "i": 8}


def einsum_model(equation: str, weight_first: bool = False, x_shape: list[int] | None = None,
                 sizes: dict[str, int] | None = None) -> onnx.ModelProto:
    """One Einsum of an input X and a constant W (random), shapes from ``SIZES`` updated by ``sizes``."""
    size = {**SIZES, **(sizes or {})}
    lhs = equation.replace("...", "").split("->")[0].split(",")
    x_sub, w_sub = (lhs[1], lhs[0]) if weight_first else (lhs[0], lhs[1])
    w = rng(1).standard_normal([size[i] for i in w_sub]).astype(np.float32)
    shape = x_shape or [size[i] for i in x_sub]
    inputs = ["W", "X"] if weight_first else ["X", "W"]
    operands = (w, np.zeros(shape, np.float32)) if weight_first else (np.zeros(shape, np.float32), w)
    node = helper.make_node("Einsum", inputs, ["Y"], equation=equation, name="ein")
    return make_model([node], [("X", shape)], [("Y", list(np.einsum(equation, *operands).shape))], {"W": w})


CASES = [
    ("btd,dk->btk", False, None),
    ("btd,dhk->bthk", False, None),  # a fused QKV-style projection
    ("bthk,hkd->btd", False, None),  # the output projection back
    ("btd,dhk->bhtk", False, None),  # heads before time: a Transpose after
    ("bdt,dk->btk", False, None),  # contracted axis in the middle: a Transpose before
    ("dk,btd->btk", True, None),  # the weight first
    ("bd,kd->bk", False, None),  # nn.Linear's [out, in] layout
    ("bchw,cd->bhwd", False, None),  # a 1x1 conv written as einsum
    ("...d,dk->...k", False, [3, 2, 5, 8]),  # a Linear over any leading axes
]


@pytest.mark.parametrize(("equation", "weight_first", "x_shape"), CASES)
def test_projection_einsums_become_matmul_with_the_same_outputs(equation, weight_first, x_shape):
    model = einsum_model(equation, weight_first, x_shape)
    result = run_passes(model, [EinsumToMatMul()])
    assert result.stats["einsum_to_matmul.rewritten"] == 1
    ops = [n.op_type for n in result.model.graph.node]
    assert "Einsum" not in ops and ops.count("MatMul") == 1
    onnx.checker.check_model(result.model, full_check=True)
    x_in = model.graph.input[0].type.tensor_type.shape.dim
    x = rng(2).standard_normal([d.dim_value for d in x_in]).astype(np.float32)
    ref, got = run(model, {"X": x})[0], run(result.model, {"X": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("equation", [
    "bhd,hdk->bhk",  # a weight batched per head
    "bii,ik->bk",  # a diagonal
    "btd,dk->bk",  # t summed over x alone
    "d...,dk->...k",  # an ellipsis after the contracted axis
])  # fmt: skip
def test_other_einsums_stay(equation):
    model = einsum_model(equation, x_shape=[8, 3] if "..." in equation else None)
    assert not run_passes(model, [EinsumToMatMul()]).modified


def test_two_activations_or_three_operands_stay():
    node = helper.make_node("Einsum", ["X", "Z"], ["Y"], equation="bqd,bkd->bqk")
    two = make_model([node], [("X", [2, 3, 4]), ("Z", [2, 5, 4])], [("Y", [2, 3, 5])])
    assert not run_passes(two, [EinsumToMatMul()]).modified
    node = helper.make_node("Einsum", ["X", "W", "V"], ["Y"], equation="bd,dk,kn->bn")
    three = make_model([node], [("X", [2, 4])], [("Y", [2, 5])],
                       {"W": np.ones((4, 3), np.float32), "V": np.ones((3, 5), np.float32)})  # fmt: skip
    assert not run_passes(three, [EinsumToMatMul()]).modified


def test_quantize_takes_an_einsum_projection(tmp_path):
    """Cleanup runs it first: without data the projection is a dynamic int8 MatMul, with data a static one."""
    model = einsum_model("btd,dhk->bthk", sizes={"d": 32, "k": 16})  # depth 32: the dynamic kernel pays
    x = rng(3).standard_normal((63, 5, 32)).astype(np.float32)  # 21 batches of the model's fixed 3
    np.savez(tmp_path / "calib.npz", X=x)
    dynamic = onnxpress.quantize(model)
    assert [d.op for d in dynamic.quantized] == ["MatMul"]
    assert "DynamicQuantizeMatMul" in _fused_ops(dynamic.model, tmp_path)
    static = onnxpress.quantize(model, calib=tmp_path / "calib.npz")
    assert [d.op for d in static.quantized if d.op in ("MatMul", "Gemm")]
    ref = run(model, {"X": x[:3]})[0]
    for q in (dynamic.model, static.model):
        got = run(q, {"X": x[:3]})[0]
        assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) >= 30


@st.composite
def projections(draw):
    """An equation x,W->out with 0-2 batch, 1-2 contracted and 1-2 free indices, each operand in a random order."""
    letters = iter("abcdefg")
    batch = [next(letters) for _ in range(draw(st.integers(0, 2)))]
    contracted = [next(letters) for _ in range(draw(st.integers(1, 2)))]
    free = [next(letters) for _ in range(draw(st.integers(1, 2)))]
    x_sub = "".join(draw(st.permutations(batch + contracted)))
    w_sub = "".join(draw(st.permutations(contracted + free)))
    out = "".join(draw(st.permutations(batch + free)))
    weight_first = draw(st.booleans())
    sizes = {i: draw(st.integers(1, 4)) for i in batch + contracted + free}
    return (f"{w_sub},{x_sub}->{out}" if weight_first else f"{x_sub},{w_sub}->{out}"), weight_first, sizes


@settings(max_examples=40, deadline=None)
@given(projections())
def test_random_projection_einsums_match_onnxruntime(case):
    equation, weight_first, sizes = case
    model = einsum_model(equation, weight_first, sizes=sizes)
    result = run_passes(model, [EinsumToMatMul()])
    assert result.stats["einsum_to_matmul.rewritten"] == 1
    x_in = model.graph.input[0].type.tensor_type.shape.dim
    x = rng(2).standard_normal([d.dim_value for d in x_in]).astype(np.float32)
    ref, got = run(model, {"X": x})[0], run(result.model, {"X": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(np.abs(ref).max(), 1.0))
