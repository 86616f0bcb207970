"""QuantizeWeightsInt4: blockwise 4-bit weights in onnxruntime's MatMulNBits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxpress.passes.weight_only import QuantizeWeightsInt4, _pack, dequantize_blocks, quantize_blocks
from onnxpress.pipeline import run_passes
from tests.graphs import make_model, rng, run


def mlp(k: int = 40, h: int = 24, n: int = 10, seed: int = 0) -> onnx.ModelProto:
    """X[N,k] -> MatMul(W[k,h]) -> Gemm(Wg[n,h], C, transB, alpha=0.5, beta=2) -> Y[N,n]."""
    r = rng(seed)
    inits = {
        "W": r.standard_normal((k, h)).astype(np.float32),
        "Wg": r.standard_normal((n, h)).astype(np.float32),
        "C": r.standard_normal(n).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "Wg", "C"], ["Y"], name="fc", transB=1, alpha=0.5, beta=2.0),
    ]
    return make_model(nodes, [("X", ["N", k])], [("Y", ["N", n])], inits)


@settings(deadline=None, max_examples=30)
@given(k=st.integers(1, 80), n=st.integers(1, 9), block=st.sampled_from([16, 32, 64]), seed=st.integers(0, 999))
def test_block_round_trip_within_half_a_step(k: int, n: int, block: int, seed: int) -> None:
    """Each element is within |s|/2 of its block's grid (or clipped at the grid's end), q in [-8, 7]."""
    w = (rng(seed).standard_normal((k, n)) * rng(seed + 1).uniform(0.01, 10)).astype(np.float32)
    q, s = quantize_blocks(w, block)
    assert q.min() >= -8 and q.max() <= 7 and s.shape == (-(-k // block), n) and np.all(s != 0)
    back = dequantize_blocks(q, s, k)
    step = np.repeat(s, block, axis=0)[:k]
    inside = (w / step >= -8) & (w / step <= 7)
    assert np.all(np.abs(back - w)[inside] <= np.abs(step[inside]) / 2 * (1 + 1e-5))
    # without the search, each block's largest magnitude is exact: it is the grid's end -8 * s
    q1, s1 = quantize_blocks(w, block, search=False)
    blocks = np.zeros((s1.shape[0] * block, n), np.float32)
    blocks[:k] = w
    extreme = np.abs(blocks.reshape(-1, block, n)).max(axis=1)
    assert np.allclose(np.abs(-8 * s1), extreme, rtol=1e-6)
    # the MSE search never does worse than plain max/7 scaling
    q0, s0 = quantize_blocks(w, block, search=False)
    assert np.sum((back - w) ** 2) <= np.sum((dequantize_blocks(q0, s0, k) - w) ** 2) * (1 + 1e-6)


def test_pack_layout_low_nibble_first() -> None:
    """Packing: B[n, block, byte] = (q[2i] + 8) | (q[2i+1] + 8) << 4; scales column-major by block."""
    q = np.arange(-8, 8, dtype=np.int8).reshape(16, 1).repeat(2, axis=1)
    q[:, 1] = q[::-1, 1]
    s = np.array([[0.5, 2.0]], np.float32)
    packed, scales = _pack(q, s, 16)
    assert packed.shape == (2, 1, 8)
    assert packed[0, 0, 0] == (0 | (1 << 4)) and packed[1, 0, 0] == (15 | (14 << 4))
    np.testing.assert_array_equal(scales, [0.5, 2.0])


def test_matmulnbits_matches_dequantized_weights() -> None:
    """onnxruntime's MatMulNBits output equals X @ dequantized weights (~1e-5), Gemm alpha/beta/transB kept."""
    model = mlp()
    res = run_passes(model, [QuantizeWeightsInt4(block_size=16, int8_below=0)])
    q = res.model
    onnx.checker.check_model(q, full_check=True)
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits", "MatMulNBits", "Add"]
    assert res.stats["quantize_weights_int4.weights_int4"] == 2
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    x = rng(5).standard_normal((7, 40)).astype(np.float32)
    w1 = dequantize_blocks(*quantize_blocks(inits["W"], 16), 40)
    w2 = dequantize_blocks(*quantize_blocks(0.5 * inits["Wg"].T, 16), 24)
    expect = (x @ w1) @ w2 + 2.0 * inits["C"]
    np.testing.assert_allclose(run(q, {"X": x})[0], expect, rtol=1e-5, atol=1e-4)


def test_int4_error_bound_on_smooth_weights() -> None:
    """On weights of similar magnitude per block, output SQNR vs fp32 is above 15 dB."""
    model = mlp(k=64, h=64, n=16, seed=3)
    q = run_passes(model, [QuantizeWeightsInt4(block_size=32)]).model
    x = rng(6).standard_normal((32, 64)).astype(np.float32)
    ref, out = run(model, {"X": x})[0], run(q, {"X": x})[0]
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
    assert sqnr > 15


def test_declines_with_reasons() -> None:
    """Excluded, non-constant and 3-D weights stay float with a note."""
    r = rng(7)
    inits = {"W3": r.standard_normal((2, 8, 8)).astype(np.float32), "W": r.standard_normal((8, 4)).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["X", "W3"], ["a"], name="batched"),
        helper.make_node("MatMul", ["a", "Z"], ["b"], name="dynamic"),
        helper.make_node("MatMul", ["b", "W"], ["Y"], name="skip_me"),
    ]
    model = make_model(nodes, [("X", [2, 3, 8]), ("Z", [2, 8, 8])], [("Y", [2, 3, 4])], inits)
    res = run_passes(model, [QuantizeWeightsInt4(exclude=frozenset({"skip_me"}), constants_int8_min_size=None)])
    assert not res.modified and [n.op_type for n in res.model.graph.node] == ["MatMul"] * 3
    text = "\n".join(res.notes)
    assert "not 2-D" in text and "weight is not a constant" in text and "excluded" in text


def test_bad_block_size() -> None:
    """Block sizes that MatMulNBits does not take are refused."""
    for bad in (8, 24):
        with pytest.raises(ValueError, match="power of two"):
            QuantizeWeightsInt4(block_size=bad)


def test_other_constants_become_int8() -> None:
    """A large constant outside MatMul/Gemm (positional embedding) is stored int8, error <= s/2."""
    r = rng(8)
    pos = (r.standard_normal((1, 64, 8)) * 0.02).astype(np.float32)
    model = make_model([helper.make_node("Add", ["X", "pos"], ["Y"])], [("X", ["N", 64, 8])], [("Y", ["N", 64, 8])],
                       {"pos": pos})  # fmt: skip
    res = run_passes(model, [QuantizeWeightsInt4(constants_int8_min_size=256)])
    assert res.stats["quantize_weights_int4.constants_int8"] == 1
    assert [n.op_type for n in res.model.graph.node] == ["DequantizeLinear", "Add"]
    x = np.zeros((1, 64, 8), np.float32)
    step = np.abs(pos).max() / 127
    assert np.abs(run(res.model, {"X": x})[0] - pos).max() <= step / 2 * (1 + 1e-5)
    small = run_passes(model, [QuantizeWeightsInt4(constants_int8_min_size=1024)])
    assert not small.modified


def test_short_weights_use_a_smaller_block() -> None:
    """K=16 rows with block_size 64: the node's block is 16, so no padding bytes are stored."""
    r = rng(9)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [("X", ["N", 16])], [("Y", ["N", 32])],
                       {"W": r.standard_normal((16, 32)).astype(np.float32)})  # fmt: skip
    q = run_passes(model, [QuantizeWeightsInt4(block_size=64, int8_below=0)]).model
    node = q.graph.node[0]
    assert {a.name: a.i for a in node.attribute}["block_size"] == 16
    packed = next(i for i in q.graph.initializer if i.data_type == onnx.TensorProto.UINT8)
    assert list(packed.dims) == [32, 1, 8]


def test_small_weights_get_int8_per_channel() -> None:
    """Weights under int8_below elements: int8 per output channel + DequantizeLinear, error <= s/2."""
    model = mlp()  # W 40x24 (960) and Wg 10x24 (240): both small
    res = run_passes(model, [QuantizeWeightsInt4(int8_below=1000, constants_int8_min_size=None)])
    assert res.stats["quantize_weights_int4.weights_int8"] == 2
    assert [n.op_type for n in res.model.graph.node].count("DequantizeLinear") == 2
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    x = rng(5).standard_normal((7, 40)).astype(np.float32)
    from onnxpress.passes.qdq import dequantize_array, quantize_array, weight_qparams

    w1 = inits["W"]
    q1 = weight_qparams(w1, 1)
    w1d = dequantize_array(quantize_array(w1, q1), q1)
    assert np.all(np.abs(w1d - w1) <= q1.scale / 2 * (1 + 1e-6))
    wg = inits["Wg"]
    qg = weight_qparams(wg, 0)  # Gemm transB=1: output channels are rows
    wgd = dequantize_array(quantize_array(wg, qg), qg)
    expect = 0.5 * (x @ w1d) @ wgd.T + 2.0 * inits["C"]
    np.testing.assert_allclose(run(res.model, {"X": x})[0], expect, rtol=1e-5, atol=1e-4)


def test_asymmetric_blocks_match_the_kernel() -> None:
    """symmetric=False: per-block zero points (packed two per byte); MatMulNBits equals X @ dequantized W."""
    from onnxpress.passes.weight_only import dequantize_blocks_asym, quantize_blocks_asym

    r = rng(10)
    w = (r.standard_normal((40, 24)) + 0.5).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [("X", ["N", 40])], [("Y", ["N", 24])],
                       {"W": w})  # fmt: skip
    q = run_passes(model, [QuantizeWeightsInt4(block_size=16, int8_below=0, symmetric=False)]).model
    assert len(q.graph.node[0].input) == 4  # A, B, scales, zero_points
    qq, s, z = quantize_blocks_asym(w, 16)
    assert qq.max() <= 15 and z.max() <= 15
    back = dequantize_blocks_asym(qq, s, z, 40)
    step = np.repeat(s, 16, axis=0)[:40]
    assert np.mean(np.abs(back - w) <= step / 2 * (1 + 1e-5)) > 0.95  # all but the clipped tails
    x = r.standard_normal((5, 40)).astype(np.float32)
    np.testing.assert_allclose(run(q, {"X": x})[0], x @ back, rtol=1e-5, atol=1e-4)


def test_threaded_rounding_gives_the_same_codes(monkeypatch):
    """A weight large enough to be rounded on one thread per core gets the codes of the one-thread path."""
    from onnxpress.passes import weight_only

    w = np.random.default_rng(8).standard_normal((256, 1536)).astype(np.float32)
    monkeypatch.setattr(weight_only, "_THREADED_FROM", 1)
    monkeypatch.setattr(weight_only.os, "cpu_count", lambda: 3)  # more threads than this box, uneven chunks
    threaded = weight_only.quantize_blocks(w, 32)
    monkeypatch.setattr(weight_only, "_THREADED_FROM", 1 << 62)
    single = weight_only.quantize_blocks(w, 32)
    np.testing.assert_array_equal(threaded[0], single[0])
    np.testing.assert_array_equal(threaded[1], single[1])


def _embedding_model() -> onnx.ModelProto:
    """ids[N, T] -> Gather(E[300, 16]) -> e; e + P[T=4, 16] -> h; h -> MatMul(W[16, 8]) -> Add(b[8]) -> Y."""
    r = rng(30)
    table = r.standard_normal((300, 16)).astype(np.float32) * np.linspace(0.1, 3.0, 300, dtype=np.float32)[:, None]
    inits = {"E": table, "P": r.standard_normal((4, 16)).astype(np.float32),
             "W": r.standard_normal((16, 8)).astype(np.float32), "b": r.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], axis=0), helper.make_node("Add", ["e", "P"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 4])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", 4, 8])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("keep_biases", [False, True])
def test_embedding_rows_get_a_scale_each_and_biases_can_stay_float(keep_biases):
    """An embedding table is stored int8 per row and dequantized after the lookup (only the rows looked up);
    with keep_biases a MatMul's bias Add keeps its float constant."""
    from onnxpress.passes.weight_only import StoreConstantsInt8

    model = _embedding_model()
    ids = rng(31).integers(0, 300, (5, 4)).astype(np.int64)
    out = run_passes(model, [StoreConstantsInt8(min_size=8, keep_biases=keep_biases)]).model
    onnx.checker.check_model(out, full_check=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    table = onnx.numpy_helper.to_array(model.graph.initializer[0])
    q_name = next(n for n in inits if n.startswith("E_rows_q"))
    assert inits[q_name].dtype == np.int8 and inits[q_name].shape == (300, 16) and "E" not in inits
    gathered = [n for n in out.graph.node if n.op_type == "Gather"]
    assert {g.input[0] for g in gathered} == {q_name, next(n for n in inits if n.startswith("E_rows_s"))}
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == q_name for n in out.graph.node)
    # each row within half its own step: rows of small range keep their precision
    exposed = onnx.ModelProto()
    exposed.CopyFrom(out)
    exposed.graph.output.append(helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None))
    e = run(exposed, {"ids": ids})[1]
    step = np.abs(table).max(axis=1) / 127
    assert np.all(np.abs(e - table[ids]) <= step[ids][..., None] / 2 * (1 + 1e-6))
    assert ("b" in inits and inits["b"].dtype == np.float32) == keep_biases
    ref, got = run(model, {"ids": ids})[0], run(out, {"ids": ids})[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_unpack_inverts_the_matmulnbits_packing_of_codes_and_zero_points():
    """QAT reads MatMulNBits weights back through these: codes [K, N] -> B [N, blocks, block/2] -> codes."""
    from onnxpress.passes.weight_only import _pack, _pack_zero_points, _unpack, _unpack_zero_points

    r = np.random.default_rng(0)
    n, blocks, block = 5, 3, 16
    q = r.integers(0, 16, (blocks * block, n)).astype(np.uint8)
    b, _ = _pack(q, np.ones((blocks, n), np.float32), block)
    assert np.array_equal(_unpack(b), q.T.reshape(n, blocks, block))
    zero = r.integers(0, 16, (blocks, n)).astype(np.uint8)  # an odd block count pads the last byte
    assert np.array_equal(_unpack_zero_points(_pack_zero_points(zero), n, blocks), zero.T)


def test_whole_model_int4_names_the_convs_it_leaves_float(tmp_path, capsys):
    """--weights int4 on a CNN: the convs are listed as float with the reason, not left out of the table."""
    from onnxpress.cli import main

    model = Path(__file__).resolve().parent.parent / "models" / "resnet.onnx"
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--weights", "int4"]) == 0
    out = capsys.readouterr().out
    assert "float  9 x Conv: int4 weight-only takes MatMul/Gemm layers" in out
    assert "no layer took 4-bit weights: MatMul/Gemm weights of 4096 elements or more do" in out
