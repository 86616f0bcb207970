"""A weight several layers read (TorchScript's Identity-per-reader layout) is quantized and stored once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxpress
from tests.graphs import make_model, rng, run


def tied_mlp(depth: int = 3, dim: int = 64) -> onnx.ModelProto:
    """X -> depth x (MatMul(W) + b_i -> Relu) -> Y, one W[dim, dim] behind one Identity per layer (a cloned
    layer stack, ALBERT-style), biases of their own."""
    r = rng(11)
    inits = {"W": (r.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)}
    nodes, x = [], "X"
    for i in range(depth):
        inits[f"b{i}"] = (r.standard_normal(dim) * 0.1).astype(np.float32)
        nodes += [
            helper.make_node("Identity", ["W"], [f"W{i}"]),
            helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}" if i < depth - 1 else "Y"]),
        ]
        x = f"r{i}"
    return make_model(nodes, [("X", ["N", dim])], [("Y", ["N", dim])], inits)


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


def _values_of(model: onnx.ModelProto, dtype: type) -> int:
    return sum(a.size for a in map(numpy_helper.to_array, model.graph.initializer) if a.dtype == dtype)


def _tensors_of(model: onnx.ModelProto, dtype: type, size: int) -> int:
    return sum(a.dtype == dtype and a.size == size for a in map(numpy_helper.to_array, model.graph.initializer))


@pytest.mark.parametrize("activations", ["uint8", "dynamic"])
def test_tied_weight_is_one_int8_tensor(activations: str) -> None:
    """int8 (static QDQ and the data-free dynamic path): one 128 x 128 int8 tensor for the three layers,
    and the file is ~ a quarter of the float one (it was 0.97x on a 4-layer ViT export before)."""
    model = tied_mlp(dim=128)
    x = rng(12).standard_normal((64, 128)).astype(np.float32)
    calib = None if activations == "dynamic" else [{"X": x}]
    res = onnxpress.quantize(model, calib=calib, activations=activations)
    q = res.model
    assert _tensors_of(q, np.int8, 128 * 128) == 1
    assert _values_of(q, np.int8) < 2 * 128 * 128  # the weight, and zero points or small constants at most
    assert _values_of(q, np.float32) < 128 * 128 / 16
    assert len(q.SerializeToString()) < 0.3 * len(model.SerializeToString())
    assert _sqnr(run(model, {"X": x})[0], run(q, {"X": x})[0]) > 30


def test_tied_weight_is_packed_once_in_int4() -> None:
    """int4: the three MatMulNBits read one packed weight (it used to be declined and left float)."""
    model = tied_mlp(dim=128)
    x = rng(13).standard_normal((32, 128)).astype(np.float32)
    res = onnxpress.quantize(model, calib=[{"X": x}], weights="int4")
    q = res.model
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3
    assert len({n.input[1] for n in nbits}) == 1 and len({n.input[2] for n in nbits}) == 1
    assert _tensors_of(q, np.uint8, 128 * 128 // 2) == 1
    assert _values_of(q, np.uint8) < 128 * 128
    assert _values_of(q, np.float32) < 128 * 128 / 16
    assert _sqnr(run(model, {"X": x})[0], run(q, {"X": x})[0]) > 15
