"""A LayerNormalization / RMSNorm written out (opset < 17 exports) keeps its tail float so onnxruntime fuses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxpress
from onnxpress.passes.qdq import NORM_REASON, norm_chain_nodes
from tests import graphs
from tests.test_qdq import optimized_ops

D = 16


def _block(kind: str, opset: int = 13) -> onnx.ModelProto:
    """X[batch, 8, D] -> norm written out (``kind``) -> MatMul(W) -> Add(b) -> Y; reduce axes as attributes."""
    r = graphs.rng(21)
    inits = {
        "W": r.standard_normal((D, D)).astype(np.float32) * 0.3, "b": r.standard_normal(D).astype(np.float32),
        "gamma": (1 + 0.1 * r.standard_normal(D)).astype(np.float32), "beta": r.standard_normal(D).astype(np.float32),
        "two": np.float32(2.0), "eps": np.float32(1e-5), "one": np.float32(1.0),
    }  # fmt: skip
    if kind == "layernorm":  # torch's TorchScript export of nn.LayerNorm at opset 13
        nodes = [
            helper.make_node("ReduceMean", ["X"], ["mu"], axes=[-1]),
            helper.make_node("Sub", ["X", "mu"], ["d"]),
            helper.make_node("Pow", ["d", "two"], ["p"]),
            helper.make_node("ReduceMean", ["p"], ["var"], axes=[-1]),
            helper.make_node("Add", ["var", "eps"], ["ve"], name="n_eps"),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["d", "sd"], ["nrm"], name="n_div"),
            helper.make_node("Mul", ["nrm", "gamma"], ["sc"], name="n_gamma"),
            helper.make_node("Add", ["sc", "beta"], ["h"], name="n_beta"),
        ]
    else:  # RMSNorm (T5 / LLaMA style): x / sqrt(mean(x^2) + eps) * w
        nodes = [
            helper.make_node("Pow", ["X", "two"], ["p"]),
            helper.make_node("ReduceMean", ["p"], ["ms"], axes=[-1]),
            helper.make_node("Add", ["ms", "eps"], ["ve"], name="n_eps"),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["X", "sd"], ["nrm"], name="n_div"),
            helper.make_node("Mul", ["nrm", "gamma"], ["h"], name="n_gamma"),
        ]
    nodes += [helper.make_node("MatMul", ["h", "W"], ["y0"], name="fc"), helper.make_node("Add", ["y0", "b"], ["Y"])]
    return graphs.make_model(nodes, [("X", ["batch", 8, D])], [("Y", ["batch", 8, D])], inits, opset=opset)


def _data() -> list[dict[str, np.ndarray]]:
    r = graphs.rng(22)
    return [{"X": (3 * r.standard_normal((4, 8, D)) + 1).astype(np.float32)} for _ in range(4)]



@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_tail_stays_float_and_onnxruntime_fuses_the_norm(kind: str, tmp_path: Path) -> None:
    model, data = _block(kind), _data()
    result = onnxpress.quantize(model, calib=data)
    chain = {d.name for d in result.kept_float if d.reason == NORM_REASON}
    assert chain == ({"n_gamma", "n_beta"} if kind == "layernorm" else {"n_gamma"})
    assert [d.name for d in result.quantized] == ["fc"]
    opt = optimized_ops(result.model, tmp_path)
    fused = "LayerNormalization" if kind == "layernorm" else "SimplifiedLayerNormalization"
    assert fused in opt and "QLinearMul" not in opt and "QLinearAdd" not in opt
    assert "MatMulIntegerToFloat" in opt
    ref = graphs.run(model, data[0])[0]
    out = graphs.run(result.model, data[0], optimize=True)[0]
    assert 10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()) > 30


def test_sqrt_without_a_normalization_tail_marks_nothing() -> None:
    r = graphs.rng(23)
    nodes = [helper.make_node("Sqrt", ["X"], ["s"]), helper.make_node("Mul", ["s", "c"], ["Y"])]
    model = graphs.make_model(nodes, [("X", [2, D])], [("Y", [2, D])], {"c": r.standard_normal(D).astype(np.float32)})
    assert norm_chain_nodes(gs.import_onnx(model)) == set()
    assert len(norm_chain_nodes(gs.import_onnx(_block("layernorm")))) == 3  # Div, Mul(gamma), Add(beta)


def test_quantize_ops_layernormalization_quantizes_the_tail_too() -> None:
    result = onnxpress.quantize(_block("layernorm"), calib=_data(), quantize_ops=["LayerNormalization"])
    assert not any(d.reason == NORM_REASON for d in result.kept_float)
    assert {"n_gamma", "n_beta"} <= {d.name for d in result.quantized}


def test_reciprocal_form_marks_the_product_with_x_too() -> None:
    """RMSNorm as ``x * (1 / s) * w``: the Mul by the chain right after the Div belongs to it, a second does not."""
    r = graphs.rng(24)
    inits = {"two": np.float32(2.0), "eps": np.float32(1e-5), "one": np.float32(1.0),
             "w": r.standard_normal(D).astype(np.float32)}  # fmt: skip
    nodes = [
        helper.make_node("Pow", ["X", "two"], ["p"]), helper.make_node("ReduceMean", ["p"], ["ms"], axes=[-1]),
        helper.make_node("Add", ["ms", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["one", "sd"], ["inv"], name="n_div"),
        helper.make_node("Mul", ["X", "inv"], ["nrm"], name="n_x"),
        helper.make_node("Mul", ["nrm", "w"], ["h"], name="n_w"),
        helper.make_node("Mul", ["h", "X"], ["Y"], name="not_norm"),
    ]  # fmt: skip
    graph = gs.import_onnx(graphs.make_model(nodes, [("X", [2, 8, D])], [("Y", [2, 8, D])], inits))
    marked = {n.name for n in graph.nodes if id(n) in norm_chain_nodes(graph)}
    assert marked == {"n_div", "n_x", "n_w"}
