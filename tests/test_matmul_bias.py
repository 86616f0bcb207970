"""MatMulBiasToOutputRank: a fixed-shape int8 MatMul + bias stays an integer kernel in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxpress
from onnxpress.model_io import infer_shapes
from onnxpress.passes.matmul_bias import MatMulBiasToOutputRank
from onnxpress.passes.matmul_to_gemm import MatMulAddToGemm
from onnxpress.pipeline import run_passes
from tests import graphs
from tests.test_qdq import optimized_ops

D, N = 16, 24


def _block(batch: int | str, rank: int = 3) -> onnx.ModelProto:
    """X[batch, 6, D] (or [batch, D]) -> MatMul(W) -> Add(b) -> Relu -> MatMul(W2) -> Add(b2) -> Y (float)."""
    r = graphs.rng(5)
    inits = {
        "W": r.standard_normal((D, N)).astype(np.float32), "b": r.standard_normal(N).astype(np.float32),
        "W2": r.standard_normal((N, D)).astype(np.float32), "b2": r.standard_normal(D).astype(np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y0"], name="fc2"),
        helper.make_node("Add", ["y0", "b2"], ["Y"], name="fc2_bias"),
    ]
    lead = [batch, 6][: rank - 1]
    return graphs.make_model(nodes, [("X", [*lead, D])], [("Y", [*lead, D])], inits)


def _data(rank: int = 3, batch: int = 2) -> list[dict[str, np.ndarray]]:
    shape = [batch, 6, D][-rank:] if rank == 3 else [batch, D]
    r = graphs.rng(6)
    return [{"X": r.standard_normal(shape).astype(np.float32)} for _ in range(4)]



def _bias_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: next(inits[x] for x in n.input if x in inits) for n in model.graph.node if n.name.endswith("_bias")}


def test_fixed_shape_bias_takes_the_output_rank_and_the_matmuls_stay_integer(tmp_path: Path) -> None:
    model, data = _block(2), _data()
    plain = onnxpress.quantize(model, calib=data, bias_correction=False)
    assert plain.stats["matmul_bias_rank.reshaped"] == 2
    assert _bias_shapes(plain.model) == {"fc1_bias": (1, 1, N), "fc2_bias": (1, 1, D)}
    opt = optimized_ops(plain.model, tmp_path)
    assert "Gemm" not in opt and "MatMul" not in opt
    assert opt.count("MatMulIntegerToFloat") + opt.count("QLinearMatMul") + opt.count("QGemm") == 2
    # The same graph with the 1-D biases back: the same numbers (the Add broadcasts alike), but
    # onnxruntime 1.32 turns fc2 (float output) into a float Gemm fed by two DequantizeLinear.
    flat = onnx.ModelProto()
    flat.CopyFrom(plain.model)
    for init in flat.graph.initializer:
        if len(init.dims) == 3 and list(init.dims[:2]) == [1, 1]:
            arr = onnx.numpy_helper.to_array(init).reshape(-1)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    assert "Gemm" in optimized_ops(flat, tmp_path)
    x = data[0]
    np.testing.assert_array_equal(graphs.run(plain.model, x)[0], graphs.run(flat, x)[0])
    ref = graphs.run(model, x)[0]
    assert 10 * np.log10((ref**2).sum() / ((ref - graphs.run(plain.model, x, optimize=True)[0]) ** 2).sum()) > 30


def test_dynamic_biases_are_left_one_dimensional() -> None:
    """A dynamic axis: onnxruntime declines the fusion itself (and its BiasGelu fusion wants a 1-D bias)."""
    result = onnxpress.quantize(_block("batch"), calib=_data(), bias_correction=False)
    assert result.stats.get("matmul_bias_rank.reshaped", 0) == 0
    assert result.stats.get("matmul_add_to_gemm.fused", 0) == 0  # rank 3: not a Gemm
    assert _bias_shapes(result.model) == {"fc1_bias": (N,), "fc2_bias": (D,)}


@pytest.mark.parametrize("batch", [2, "batch"])
def test_rank_two_matmul_and_bias_become_a_gemm_with_the_same_outputs(batch) -> None:
    model = _block(batch, rank=2)
    x = _data(rank=2)[0]
    result = run_passes(infer_shapes(model), [MatMulAddToGemm()])
    assert result.stats["matmul_add_to_gemm.fused"] == 2
    gemms = [n for n in result.model.graph.node if n.op_type == "Gemm"]
    assert [n.name for n in gemms] == ["fc1", "fc2"] and [n.output[0] for n in gemms] == ["h1", "Y"]
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Relu", "Gemm"]
    np.testing.assert_allclose(graphs.run(result.model, x)[0], graphs.run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_rank_two_layers_quantize_to_qgemm_even_with_a_float_output(tmp_path: Path) -> None:
    """fc2 feeds the float graph output: as MatMul + Add it ran as a float Gemm on dequantized weights."""
    model, data = _block(2, rank=2), _data(rank=2)
    result = onnxpress.quantize(model, calib=data)
    assert result.stats["matmul_add_to_gemm.fused"] == 2
    assert {d.name: d.op for d in result.quantized} == {"fc1": "Gemm", "fc2": "Gemm"}
    opt = optimized_ops(result.model, tmp_path)
    assert opt.count("QGemm") == 2 and "Gemm" not in opt and "DequantizeLinear" not in opt
    ref = graphs.run(model, data[0])[0]
    out = graphs.run(result.model, data[0], optimize=True)[0]
    assert 10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()) > 30


def test_matmul_to_gemm_declines_shared_or_mismatched_bias_and_variable_weight() -> None:
    r = graphs.rng(7)
    inits = {"W": r.standard_normal((D, N)).astype(np.float32), "b": r.standard_normal(N).astype(np.float32),
             "b3": r.standard_normal((2, N)).astype(np.float32)}  # fmt: skip
    cases = {
        "shared bias": [helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y1"]),
                        helper.make_node("Add", ["y1", "b"], ["Y"])],
        "bias of 2 rows": [helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Add", ["h", "b3"], ["Y"])],
        "weight is an input": [helper.make_node("MatMul", ["X", "V"], ["h"]),
                               helper.make_node("Add", ["h", "b"], ["Y"])],
    }  # fmt: skip
    for why, nodes in cases.items():
        inputs = [("X", [2, D])] + ([("V", [D, N])] if why == "weight is an input" else [])
        model = graphs.make_model(nodes, inputs, [("Y", [2, N])], inits)
        result = run_passes(infer_shapes(model), [MatMulAddToGemm()])
        assert result.stats.get("matmul_add_to_gemm.fused", 0) == 0, why


def test_float_matmul_and_shared_bias_are_not_touched() -> None:
    """Only MatMuls with DequantizeLinear on both inputs (quantized ones) are touched."""
    model = _block(2)
    excluded = onnxpress.quantize(model, calib=_data(), exclude=["fc1", "fc2"], bias_correction=False)
    assert excluded.stats.get("matmul_bias_rank.reshaped", 0) == 0
    graph = run_passes(infer_shapes(model), [MatMulBiasToOutputRank()])
    assert graph.stats.get("matmul_bias_rank.reshaped", 0) == 0  # float model: no DQ inputs


def test_reference_transformer_exported_with_a_fixed_batch_runs_every_weight_matmul_in_int8(tmp_path: Path) -> None:
    """The transformer with batch fixed to 1 (many exports fix it): no float Gemm, no weight DequantizeLinear.

    Its 12 token-wise dense layers are flattened to rank 2 and run as QGemm (passes/flatten_tokens.py), the
    query/key/value projections inside QAttention (passes/quantized_attention.py); the patch embedding (its
    region has one layer) keeps rank 3 and its bias reshaped here.
    """
    model = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "transformer.onnx"))
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    del model.graph.value_info[:]
    x = np.load(Path(__file__).resolve().parents[1] / "models" / "digits32_calib.npz")["input"][:32]
    result = onnxpress.quantize(model, calib=[{"input": x[i : i + 1]} for i in range(32)])
    assert result.stats["flatten_tokens.layers"] == 12 and result.stats["matmul_add_to_gemm.fused"] == 12
    assert result.stats["matmul_bias_rank.reshaped"] == 1
    opt = optimized_ops(result.model, tmp_path)
    assert "Gemm" not in opt and opt.count("MatMulIntegerToFloat") == 1 and opt.count("QGemm") == 7
    assert opt.count("QAttention") == 2
    assert opt.count("DequantizeLinear") <= 1  # the one before the float head, none on weights


def test_excluded_matmuls_stay_matmuls(tmp_path: Path) -> None:
    """``op:MatMul`` and names still reach the rank-2 layers: they are not turned into Gemms first."""
    model, data = _block(2, rank=2), _data(rank=2)
    by_op = onnxpress.quantize(model, calib=data, exclude=["op:MatMul"])
    assert by_op.stats.get("matmul_add_to_gemm.fused", 0) == 0 and not by_op.quantized
    assert {d.name: d.op for d in by_op.kept_float if d.op == "MatMul"}.keys() == {"fc1", "fc2"}
    by_name = onnxpress.quantize(model, calib=data, exclude=["fc2"])
    assert by_name.stats["matmul_add_to_gemm.fused"] == 1
    assert [d.name for d in by_name.quantized] == ["fc1"] and "MatMul" in [n.op_type for n in by_name.model.graph.node]
