"""A GELU written out (Erf or Tanh chain) stays float, so onnxruntime fuses it into one Gelu kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxpress
from onnxpress.passes.qdq import GELU_REASON, gelu_chain_nodes
from tests import graphs
from tests.test_qdq import optimized_ops

D, F = 16, 32
SQRT2 = np.float32(np.sqrt(2.0))


def _ffn(kind: str, leak: bool = False) -> onnx.ModelProto:
    """X[batch, 8, D] -> MatMul(W1) -> Add(b1) -> GELU chain (``kind``) -> MatMul(W2) -> Y[batch, 8, D]."""
    r = graphs.rng(11)
    inits = {
        "W1": r.standard_normal((D, F)).astype(np.float32) * 0.3, "b1": r.standard_normal(F).astype(np.float32),
        "W2": r.standard_normal((F, D)).astype(np.float32) * 0.3, "sqrt2": SQRT2, "one": np.float32(1.0),
        "half": np.float32(0.5), "three": np.float32(3.0), "c1": np.float32(0.044715),
        "c2": np.float32(np.sqrt(2 / np.pi)),
    }  # fmt: skip
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["x"], name="fc1_bias")]  # fmt: skip
    if kind == "erf":  # torch TorchScript export of nn.GELU(): x * 0.5 * (1 + erf(x / sqrt 2)), in this order
        nodes += [
            helper.make_node("Div", ["x", "sqrt2"], ["d"], name="g_div"),
            helper.make_node("Erf", ["d"], ["e"], name="g_erf"),
            helper.make_node("Add", ["e", "one"], ["a"], name="g_add"),
            helper.make_node("Mul", ["x", "a"], ["m"], name="g_mul"),
            helper.make_node("Mul", ["m", "half"], ["g"], name="g_half"),
        ]
    else:  # tanh approximation, 0.5 * x taken first
        nodes += [
            helper.make_node("Pow", ["x", "three"], ["p"], name="g_pow"),
            helper.make_node("Mul", ["p", "c1"], ["pc"], name="g_cube"),
            helper.make_node("Add", ["x", "pc"], ["s"], name="g_sum"),
            helper.make_node("Mul", ["s", "c2"], ["t"], name="g_scale"),
            helper.make_node("Tanh", ["t"], ["th"], name="g_tanh"),
            helper.make_node("Add", ["th", "one"], ["a"], name="g_add"),
            helper.make_node("Mul", ["x", "half"], ["xh"], name="g_xhalf"),
            helper.make_node("Mul", ["xh", "a"], ["g"], name="g_mul"),
        ]
    outputs = [("Y", ["batch", 8, D])]
    nodes.append(helper.make_node("MatMul", ["g", "W2"], ["Y"], name="fc2"))
    if leak:  # the Erf/Tanh input is also a graph output: no fusion possible, nothing kept float for it
        outputs.append(("d" if kind == "erf" else "t", ["batch", 8, F]))
    return graphs.make_model(nodes, [("X", ["batch", 8, D])], outputs, inits)


def _data() -> list[dict[str, np.ndarray]]:
    r = graphs.rng(12)
    return [{"X": r.standard_normal((4, 8, D)).astype(np.float32)} for _ in range(4)]



@pytest.mark.parametrize("kind", ["erf", "tanh"])
def test_gelu_chain_stays_float_and_the_matmuls_integer(kind: str, tmp_path: Path) -> None:
    model, data = _ffn(kind), _data()
    result = onnxpress.quantize(model, calib=data)
    chain = {d.name for d in result.kept_float if d.reason == GELU_REASON}
    expected = {"g_add", "g_mul", "g_half"} if kind == "erf" else {"g_sum", "g_scale", "g_cube", "g_add", "g_xhalf",
                                                                   "g_mul"}  # fmt: skip
    assert chain == expected  # the candidate ops among them (Div, Pow, Erf, Tanh are never quantized)
    opt = optimized_ops(result.model, tmp_path)
    assert "QLinearMul" not in opt and "QLinearAdd" not in opt
    assert opt.count("MatMulIntegerToFloat") == 2 or opt.count("QGemm") + opt.count("MatMulIntegerToFloat") == 2
    if kind == "erf":  # onnxruntime's fusion of the float chain (with the bias before it)
        assert "BiasGelu" in opt or "Gelu" in opt
    ref = graphs.run(model, data[0])[0]
    out = graphs.run(result.model, data[0], optimize=True)[0]
    assert 10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()) > 30


@pytest.mark.parametrize("kind", ["erf", "tanh"])
def test_chain_with_an_intermediate_read_elsewhere_is_not_a_gelu(kind: str) -> None:
    graph = gs.import_onnx(_ffn(kind, leak=True))
    assert gelu_chain_nodes(graph) == set()
    assert len(gelu_chain_nodes(gs.import_onnx(_ffn(kind)))) == (5 if kind == "erf" else 8)


def test_quantize_ops_gelu_quantizes_the_chain(tmp_path: Path) -> None:
    result = onnxpress.quantize(_ffn("erf"), calib=_data(), quantize_ops=["Gelu"])
    assert not any(d.reason == GELU_REASON for d in result.kept_float)
    assert "QLinearMul" in optimized_ops(result.model, tmp_path)
