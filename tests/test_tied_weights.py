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


def tied_embedding(vocab: int = 300, dim: int = 32, gemm: bool = False) -> onnx.ModelProto:
    """ids -> Gather(W) -> MatMul(Wh) + Relu -> MatMul(Transpose(W)) -> logits: a language model's tied embedding
    and output layer, as torch's dynamo exporter writes it (the token table once, a Transpose node to the head).
    ``gemm``: the head is ``Gemm(x, W, transB=1)`` on 2-D tokens (ids [B]), reading the table itself."""
    r = rng(21)
    inits = {"W": (r.standard_normal((vocab, dim)) * 0.5).astype(np.float32),
             "Wh": (r.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)}
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "Wh"], ["h"], name="hidden"),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
        helper.make_node("MatMul", ["hr", "WT"], ["logits"], name="head"),
    ]
    if gemm:
        nodes[-2:] = [helper.make_node("Gemm", ["hr", "W"], ["logits"], name="head", transB=1)]
    dims = ["B"] if gemm else ["B", "T"]
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [*dims, vocab])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cleanup_does_not_store_a_tied_embedding_twice() -> None:
    """Folding Transpose(W) made a second float copy (the dynamo GPT-style export: 0.66M -> 0.92M values); the
    cleanup keeps it a Transpose of the one table, and the outputs are bit-identical."""
    model = tied_embedding()
    ids = {"ids": rng(22).integers(0, 300, (4, 9)).astype(np.int64)}
    out = onnxpress.cleanup(model).model
    assert sum(numpy_helper.to_array(t).size for t in out.graph.initializer) == 300 * 32 + 32 * 32
    np.testing.assert_array_equal(run(out, ids)[0], run(model, ids)[0])


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("activations", ["uint8", "dynamic"])
def test_tied_embedding_is_one_int8_table(tmp_path, activations: str, gemm: bool) -> None:
    """int8: the token table's int8 rows and the output layer's int8 weight are one tensor (the head reads its
    Transpose, which onnxruntime folds at load, or, a Gemm with transB=1, the table's rows themselves), the head
    still runs as an integer kernel, and its weight is rounded to nearest (GPTQ would round it apart from the
    table's rows). The Gemm head without data used to leave the float table beside its int8 copy: 1.21x the
    float file."""
    from onnxpress.runtime import make_session

    model = tied_embedding(gemm=gemm)
    shape = (8,) if gemm else (8, 12)
    ids = {"ids": rng(23).integers(0, 300, shape).astype(np.int64)}
    calib = None if activations == "dynamic" else [{"ids": rng(24).integers(0, 300, (64, *shape[1:])).astype(np.int64)}]
    q = onnxpress.quantize(model, calib=calib, activations=activations).model
    assert _tensors_of(q, np.int8, 300 * 32) == 1
    assert _values_of(q, np.float32) < 300 * 32 / 8
    transposes = [a.name for n in q.graph.node if n.op_type == "Transpose" for a in n.attribute]
    assert transposes == ([] if gemm and activations == "uint8" else ["perm"])
    path = tmp_path / "opt.onnx"
    make_session(q, optimized_model_path=str(path))
    fused = [n.op_type for n in onnx.load(str(path)).graph.node]
    integer = {"MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm"}
    assert sum(op in integer for op in fused) == 2 and "Transpose" not in fused
    assert _sqnr(run(model, ids)[0], run(q, ids)[0]) > 30


def test_transposed_twins_need_exact_equality() -> None:
    """A constant equal to another's transpose pairs with it; one differing in a single value does not."""
    import onnx_graphsurgeon as gs

    from onnxpress.passes.fold import transposed_twins

    a = rng(25).standard_normal((48, 40)).astype(np.float32)
    near = a.T.copy()
    near[3, 7] += np.float32(1e-6)
    graph = gs.Graph(nodes=[], inputs=[], outputs=[])
    x = gs.Variable("x", np.float32, [4, 48])
    ta, tb, tn = gs.Constant("A", a), gs.Constant("B", np.ascontiguousarray(a.T)), gs.Constant("N", near)
    y1 = gs.Variable("y1", np.float32)
    graph.nodes = [gs.Node("MatMul", inputs=[x, ta], outputs=[y1]),
                   gs.Node("MatMul", inputs=[y1, tn], outputs=[gs.Variable("y2", np.float32)]),
                   gs.Node("Gather", inputs=[tb, gs.Variable("i", np.int64)], outputs=[gs.Variable("y3", np.float32)])]
    pairs = transposed_twins(graph)
    assert [(p.name, q.name) for p, q in pairs] == [("A", "B")]


@pytest.mark.parametrize("with_data", [False, True])
def test_tied_embedding_is_one_int4_table(with_data: bool) -> None:
    """int4: the token table is the head's packed 4-bit weight, read by onnxruntime's GatherBlockQuantized (a
    Reshape of it) and by MatMulNBits, so it is stored once as 4-bit blocks; each gathered row is exactly the
    head's weight column as MatMulNBits stores it (unpacked here: low nibble first, zero point 8)."""
    model = tied_embedding(vocab=300, dim=64)
    model.graph.output.append(helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["B", "T", 64]))
    ids = {"ids": rng(26).integers(0, 300, (6, 10)).astype(np.int64)}
    calib = [{"ids": rng(27).integers(0, 300, (64, 10)).astype(np.int64)}] if with_data else None
    res = onnxpress.quantize(model, calib=calib, weights="int4")
    q = res.model
    ops = [n.op_type for n in q.graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert res.stats["quantize_weights_int4.embeddings_tied_int4"] == 1
    assert _tensors_of(q, np.uint8, 300 * 64 // 2) == 1
    assert _values_of(q, np.float32) < 300 * 64 / 8
    got, ref = run(q, ids), run(model, ids)
    head = next(n for n in q.graph.node if n.op_type == "MatMulNBits" and helper.get_node_attr_value(n, "N") == 300)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    packed, scales = inits[head.input[1]], inits[head.input[2]].reshape(300, -1)
    nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(300, scales.shape[1], -1).astype(np.float32)
    columns = ((nibbles - 8) * scales[:, :, None]).reshape(300, 64)
    np.testing.assert_array_equal(got[1], columns[ids["ids"]])
    assert _sqnr(ref[1], got[1]) > 15 and _sqnr(ref[0], got[0]) > 12


def tied_lm(vocab: int = 512, dim: int = 128, depth: int = 6) -> onnx.ModelProto:
    """ids -> Gather(W) -> depth x residual (MatMul + Relu) -> MatMul(Transpose(W)): a tied output layer whose
    table is 40% of the weights."""
    r = rng(31)
    inits = {"W": (r.standard_normal((vocab, dim)) * 0.5).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["W", "ids"], ["h0"], name="embed")]
    for i in range(depth):
        inits[f"W{i}"] = (r.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
                  helper.make_node("Add", [f"r{i}", f"h{i}"], [f"h{i + 1}"])]
    nodes += [helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
              helper.make_node("MatMul", [f"h{depth}", "WT"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", "T", vocab])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_size_search_counts_a_tied_table_once(tmp_path) -> None:
    """optimize --budget size=0.2 on a tied LM: with the table counted once (its int8 rows leave with an int8 or
    int4 head), the search keeps the head int8 and puts the other layers in int4 (26.7 dB at 0.196). Counting
    the 4-bit head's dropped float table as its own saving, it chose the head in int4: 23.9 dB at 0.191."""
    src = tmp_path / "lm.onnx"
    onnx.save(tied_lm(), str(src))
    np.savez(tmp_path / "calib.npz", ids=rng(32).integers(0, 512, (32, 16)).astype(np.int64))
    res = onnxpress.optimize(str(src), str(tmp_path / "out.onnx"), calib=str(tmp_path / "calib.npz"),
                             budget="size=0.2", cache_dir=str(tmp_path / "cache"))
    assert res.chosen.size_ratio <= 0.2
    step = res.recipe["steps"][-1]
    assert "head" not in (step.get("int4_layers") or []) and "head" not in step.get("exclude", [])
    assert res.chosen.sqnr_db > 25.5


def test_shared_weight_gets_the_moment_of_all_its_inputs() -> None:
    """GPTQ's input moment of a weight two MatMuls read is E[x xᵀ] over both layers' input rows together (the
    summed output error of the two layers); before, a shared weight got none and was rounded to nearest."""
    from onnxpress.advanced import collect_layer_hessians

    r = rng(41)
    w = r.standard_normal((64, 32)).astype(np.float32)  # >= SHARE_MIN_ELEMENTS: the cleanup keeps it one tensor
    nodes = [helper.make_node("Identity", ["W"], ["Wa"]), helper.make_node("Identity", ["W"], ["Wb"]),
             helper.make_node("MatMul", ["A", "Wa"], ["ya"], name="a"),
             helper.make_node("MatMul", ["B", "Wb"], ["yb"], name="b"), helper.make_node("Add", ["ya", "yb"], ["Y"])]
    model = onnxpress.cleanup(make_model(nodes, [("A", ["N", 64]), ("B", ["N", 64])], [("Y", ["N", 32])],
                                         {"W": w})).model
    a = r.standard_normal((40, 64)).astype(np.float32)
    b = (r.standard_normal((40, 64)) * 3 + 1).astype(np.float32)
    h = collect_layer_hessians(model, [{"A": a, "B": b}], min_elements=0)
    (name,) = [t.name for t in model.graph.initializer]
    expected = (a.T.astype(np.float64) @ a + b.T.astype(np.float64) @ b) / 80
    np.testing.assert_allclose(h[name], expected, rtol=1e-6)


@pytest.mark.parametrize("command", ["prune", "lowrank"])
def test_prune_and_lowrank_keep_a_tied_table_stored_once(command: str) -> None:
    """prune and lowrank start from the same folding; where they leave the output layer whole, it reads the one
    table through a Transpose, so the output holds no more values than the input (the pruned GPT-style export
    was 1.24x the input file before; here the residual stream keeps every channel, and a 99.9% energy split
    pays on no layer)."""
    model = tied_lm()
    before = sum(numpy_helper.to_array(t).size for t in model.graph.initializer)
    if command == "prune":
        out = onnxpress.prune(model, ratio=0.25, dims={"T": 16}).model
    else:
        out = onnxpress.lowrank(model, energy=0.999, dims={"T": 16}).model
    assert sum(numpy_helper.to_array(t).size for t in out.graph.initializer) == before
    assert [n.op_type for n in out.graph.node].count("Transpose") == 1
