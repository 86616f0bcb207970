"""FlattenTokens: token-wise regions run on [rows, features], exactly; their dense layers become QGemm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxpress
from onnxpress.model_io import infer_shapes
from onnxpress.passes.flatten_tokens import FlattenTokens
from onnxpress.pipeline import run_passes
from tests import graphs
from tests.test_qdq import optimized_ops

S, D, F = 4, 8, 16


def _encoder(batch: int | str = "batch", seq: int | str = S, *, layers: int = 1, pos: bool = True,
             mean_read: bool = False, opset: int = graphs.OPSET, seed: int = 0,
             traced_heads: bool = False) -> onnx.ModelProto:
    """A pre-LN encoder block stack on X[batch, S, D], head Y = mean over tokens, and the heads Q.

        X -> Add(pos[1,S,D]) -> h
        per layer:  h -> LN -> MatMul(Wq) + bq -> Reshape[-1,S,2,D/2] -> Q_i   (a graph output; with
                    traced_heads the target is Concat(Shape(q)[0], Shape(q)[1], 2, D/2), as TorchScript writes it)
                    h -> LN -> MatMul(W1) + b1 -> GELU (Div, Erf, Add, Mul, Mul) -> MatMul(W2) + b2 -> Add(h) -> h
        h -> ReduceMean(last axis, keepdims) -> Sub -> ... (an RMS-style norm written out) -> ReduceMean(axis 1) -> Y
    """
    r = graphs.rng(seed)
    inits: dict[str, np.ndarray] = {"pos": r.standard_normal((1, S, D)).astype(np.float32) * 0.1,
                                    "half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32),
                                    "sqrt2": np.array(np.sqrt(2.0), np.float32), "eps": np.array(1e-5, np.float32),
                                    "gamma": (1 + 0.1 * r.standard_normal((1, 1, D))).astype(np.float32),
                                    "heads": np.array([-1, S, 2, D // 2], np.int64) if isinstance(seq, int)
                                    else np.array([0, 0, 2, D // 2], np.int64)}
    nodes = []
    h = "X"
    if pos:
        nodes.append(helper.make_node("Add", ["X", "pos"], ["h_in"], name="add_pos"))
        h = "h_in"
    outputs = []
    for i in range(layers):
        for name, shape in ((f"ln{i}_g", (D,)), (f"ln{i}_b", (D,)), (f"bq{i}", (D,)), (f"b1_{i}", (F,)),
                            (f"b2_{i}", (D,))):
            inits[name] = (0.1 * r.standard_normal(shape)).astype(np.float32)
        inits[f"Wq{i}"] = (r.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        inits[f"W1_{i}"] = (r.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32)
        inits[f"W2_{i}"] = (r.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)
        ln_out = [f"ln{i}"] + ([f"ln{i}_mean"] if mean_read and i == 0 else [])
        if traced_heads:
            inits.update({"zero": np.array(0, np.int64), "one_i": np.array(1, np.int64),
                          "ax0": np.array([0], np.int64), "rest": np.array([2, D // 2], np.int64)})
            traced = [helper.make_node("Shape", [f"q{i}_b"], [f"q{i}_shape"]),
                      helper.make_node("Gather", [f"q{i}_shape", "zero"], [f"q{i}_n"]),
                      helper.make_node("Shape", [f"q{i}_b"], [f"q{i}_shape2"]),
                      helper.make_node("Gather", [f"q{i}_shape2", "one_i"], [f"q{i}_s"]),
                      helper.make_node("Unsqueeze", [f"q{i}_n", "ax0"], [f"q{i}_n1"]),
                      helper.make_node("Unsqueeze", [f"q{i}_s", "ax0"], [f"q{i}_s1"]),
                      helper.make_node("Concat", [f"q{i}_n1", f"q{i}_s1", "rest"], [f"heads{i}"], axis=0)]
        else:
            traced = []
        nodes += [
            helper.make_node("LayerNormalization", [h, f"ln{i}_g", f"ln{i}_b"], ln_out, axis=-1, name=f"ln{i}"),
            helper.make_node("MatMul", [f"ln{i}", f"Wq{i}"], [f"q{i}_mm"], name=f"q{i}"),
            helper.make_node("Add", [f"q{i}_mm", f"bq{i}"], [f"q{i}_b"], name=f"q{i}_bias"),
            *traced,
            helper.make_node("Reshape", [f"q{i}_b", f"heads{i}" if traced_heads else "heads"], [f"Q{i}"],
                             name=f"q{i}_heads"),
            helper.make_node("MatMul", [f"ln{i}", f"W1_{i}"], [f"f{i}_mm"], name=f"ffn1_{i}"),
            helper.make_node("Add", [f"f{i}_mm", f"b1_{i}"], [f"f{i}_b"], name=f"ffn1_{i}_bias"),
            helper.make_node("Div", [f"f{i}_b", "sqrt2"], [f"g{i}_d"]),
            helper.make_node("Erf", [f"g{i}_d"], [f"g{i}_e"]),
            helper.make_node("Add", [f"g{i}_e", "one"], [f"g{i}_a"]),
            helper.make_node("Mul", [f"f{i}_b", f"g{i}_a"], [f"g{i}_m"]),
            helper.make_node("Mul", [f"g{i}_m", "half"], [f"g{i}"]),
            helper.make_node("MatMul", [f"g{i}", f"W2_{i}"], [f"o{i}_mm"], name=f"ffn2_{i}"),
            helper.make_node("Add", [f"o{i}_mm", f"b2_{i}"], [f"o{i}_b"], name=f"ffn2_{i}_bias"),
            helper.make_node("Add", [h, f"o{i}_b"], [f"h{i}"], name=f"residual{i}"),
        ]
        if mean_read and i == 0:
            nodes.append(helper.make_node("Identity", [f"ln{i}_mean"], ["ln_mean_out"]))
            outputs.append(("ln_mean_out", [batch, seq, 1]))
        outputs.append((f"Q{i}", [batch, seq, 2, D // 2]))
        h = f"h{i}"
    if opset >= 18:
        inits["last"] = np.array([-1], np.int64)
        sq = [helper.make_node("ReduceMean", ["sq", "last"], ["ms"], keepdims=1)]
    else:
        sq = [helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1)]
    nodes += [helper.make_node("Mul", [h, h], ["sq"]), *sq,
              helper.make_node("Add", ["ms", "eps"], ["ms_e"]), helper.make_node("Sqrt", ["ms_e"], ["rms"]),
              helper.make_node("Div", [h, "rms"], ["normed"]), helper.make_node("Mul", ["normed", "gamma"], ["T"])]
    if opset >= 18:
        inits["tokens"] = np.array([1], np.int64)
        nodes.append(helper.make_node("ReduceMean", ["T", "tokens"], ["Y"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMean", ["T"], ["Y"], axes=[1], keepdims=0))
    outputs = [("Y", [batch, D]), ("T", [batch, seq, D])] + outputs
    return graphs.make_model(nodes, [("X", [batch, seq, D])], outputs, inits, opset=opset)


def _feed(batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"X": graphs.rng(seed).standard_normal((batch, S, D)).astype(np.float32)}


def _flatten(model: onnx.ModelProto, **kwargs):
    result = run_passes(infer_shapes(model), [FlattenTokens(**kwargs)])
    onnx.checker.check_model(result.model, full_check=True)
    return result


def _same(a: onnx.ModelProto, b: onnx.ModelProto, batches=(1, 3)) -> None:
    for n in batches:
        want, got = graphs.run(a, _feed(n)), graphs.run(b, _feed(n))
        assert len(want) == len(got)
        for w, g in zip(want, got, strict=True):
            assert w.shape == g.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_encoder_runs_on_rows_with_the_same_outputs() -> None:
    """Two layers: 6 dense layers in one region; h_in enters by one Reshape, T (also read by the mean) leaves by one."""
    model = _encoder(layers=2)
    result = _flatten(model)
    assert result.stats["flatten_tokens.regions"] == 1 and result.stats["flatten_tokens.layers"] == 6
    assert result.stats["flatten_tokens.nodes_added"] == 2  # into rows; back to T, which the mean also reads
    graph_outputs = [(o.name, len(o.type.tensor_type.shape.dim)) for o in result.model.graph.output]
    assert graph_outputs == [("Y", 2), ("T", 3), ("Q0", 4), ("Q1", 4)]
    shapes = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in infer_shapes(result.model).graph.value_info}
    assert shapes["f0_b"] == 2 and shapes["h0"] == 2 and shapes["ms"] == 2  # inside the region: rank 2
    assert shapes["h_in"] == 3  # the positional Add varies along tokens: outside
    _same(model, result.model)


def test_reductions_with_axes_as_inputs_opset_18() -> None:
    model = _encoder(layers=2, opset=18)
    result = _flatten(model)
    assert result.stats["flatten_tokens.layers"] == 6
    _same(model, result.model)


@pytest.mark.parametrize(
    ("why", "kwargs", "flatten"),
    [
        ("fewer dense layers (3) than min_layers", {"layers": 1}, {"min_layers": 4}),
        ("costs 7 nodes (two dynamic dims, heads copying dims with 0) for 6 bias Adds",
         {"layers": 2, "seq": "seq", "pos": False}, {}),
        ("every dense layer excluded", {"layers": 2}, {"skip": lambda node: node.op == "MatMul"}),
    ],
)
def test_declines(why: str, kwargs: dict, flatten: dict) -> None:
    model = _encoder(**kwargs)
    result = _flatten(model, **flatten)
    assert not result.stats["flatten_tokens.modified"], why


def test_layernorm_whose_mean_is_read_stays_outside() -> None:
    """ln0's Mean output is a graph output: ln0 stays rank 3, the rest of the region is flattened."""
    model = _encoder(layers=2, mean_read=True)
    result = _flatten(model)
    shapes = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in infer_shapes(result.model).graph.value_info}
    assert shapes["ln0"] == 3 and shapes["h1"] == 2
    _same(model, result.model)


def test_per_token_constant_is_a_boundary_not_broadcast_wrongly() -> None:
    """A constant that varies along tokens ([1, S, D]) is never made 1-D; [1, 1, D] is (its values kept)."""
    model = _encoder(layers=2)
    result = _flatten(model)
    consts = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert consts["pos"] == (1, S, D)
    assert any(name.startswith("gamma") and dims == (D,) for name, dims in consts.items())


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 5), layers=st.integers(2, 3), opset=st.sampled_from([17, 18]), seed=st.integers(0, 50))
def test_exact_for_random_weights_and_batches(batch: int, layers: int, opset: int, seed: int) -> None:
    model = _encoder(layers=layers, opset=opset, seed=seed)
    result = _flatten(model)
    assert result.stats["flatten_tokens.layers"] == 3 * layers
    _same(model, result.model, batches=(batch,))


def test_quantized_dense_layers_run_as_qgemm(tmp_path: Path) -> None:
    """After quantize the bias Adds are inside QGemm: no MatMulIntegerToFloat, no float Gemm, outputs close."""
    model = _encoder(batch=2, layers=2)
    calib = [_feed(2, seed=s) for s in range(8)]
    result = onnxpress.quantize(model, calib=calib, bias_correction=False)
    assert result.stats["flatten_tokens.layers"] == 6 and result.stats["matmul_add_to_gemm.fused"] == 6
    opt = optimized_ops(result.model, tmp_path)
    assert opt.count("QGemm") == 6 and "MatMulIntegerToFloat" not in opt and "Gemm" not in opt
    want, got = graphs.run(model, _feed(2, seed=99)), graphs.run(result.model, _feed(2, seed=99))
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape
        sqnr = 10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum((w.astype(np.float64) - g) ** 2))
        assert sqnr > 25, sqnr  # int8 of a tiny random block: well above noise, far below exact


def test_excluded_dense_layers_are_not_flattened() -> None:
    """``--exclude op:MatMul`` keeps the layers float and the graph's ranks as they were."""
    model = _encoder(batch=2, layers=2)
    result = onnxpress.quantize(model, calib=[_feed(2, seed=s) for s in range(4)], exclude=["op:MatMul"])
    assert result.stats.get("flatten_tokens.layers", 0) == 0
    assert "MatMul" in [n.op_type for n in result.model.graph.node]


def test_fixed_batch_dynamic_sequence_goes_back_with_minus_one_for_the_sequence() -> None:
    """Batch 2, sequence dynamic: the way back is Reshape[2, -1, d]; a Reshape copying dims (0) gets it too."""
    model = _encoder(batch=2, seq="seq", pos=False, layers=2)
    result = _flatten(model)
    assert result.stats["flatten_tokens.layers"] == 6
    back = [n for n in result.model.graph.node if n.op_type == "Reshape" and n.name.endswith("_to_tokens")]
    targets = {tuple(onnx.numpy_helper.to_array(i)) for i in result.model.graph.initializer
               for n in back if i.name == n.input[1]}
    assert targets == {(2, -1, D)}
    for length in (3, 5):
        x = {"X": graphs.rng(length).standard_normal((2, length, D)).astype(np.float32)}
        for w, g in zip(graphs.run(model, x), graphs.run(result.model, x), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_cli_says_what_it_flattened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxpress.cli import main

    src, out, data = tmp_path / "enc.onnx", tmp_path / "enc_int8.onnx", tmp_path / "calib.npz"
    onnx.save(_encoder(layers=2), str(src))
    np.savez(data, X=np.concatenate([_feed(4, seed=s)["X"] for s in range(4)]))
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "-q"]) == 0
    said = capsys.readouterr().out
    assert "ran 1 token-wise region(s) on [rows, features] (6 dense layers; 2 node(s) added)" in said
    assert "fused 6 rank-2 MatMul + bias Add into Gemm" in said


@pytest.mark.parametrize(("opset", "softmax_rank"), [(11, 3), (13, 2)])
def test_softmax_without_axis_is_row_wise_only_from_opset_13(opset: int, softmax_rank: int) -> None:
    """Before opset 13 Softmax's default axis is 1 (over tokens and features together): a boundary, not a member.

        X[batch, S, D] -> 3 x (MatMul + bias) -> Softmax (no axis) -> 2 x (MatMul + bias) -> Y
    """
    r = graphs.rng(3)
    inits, nodes, h = {}, [], "X"
    for i in range(5):
        inits[f"W{i}"] = (r.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        inits[f"b{i}"] = (0.1 * r.standard_normal(D)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        h = f"a{i}"
        if i == 2:
            nodes.append(helper.make_node("Softmax", [h], ["sm"], name="softmax"))
            h = "sm"
    nodes.append(helper.make_node("Relu", [h], ["Y"]))
    model = graphs.make_model(nodes, [("X", ["batch", S, D])], [("Y", ["batch", S, D])], inits, opset=opset)
    result = _flatten(model)
    assert result.stats["flatten_tokens.modified"]
    shapes = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in infer_shapes(result.model).graph.value_info}
    assert shapes["sm"] == softmax_rank
    _same(model, result.model)


def test_two_dynamic_dims_go_back_through_the_shape_of_an_entry() -> None:
    """Batch and sequence dynamic: the way back is Reshape(Concat(Shape(X)[:2], [d])), built once per width."""
    model = _encoder(seq="seq", pos=False, layers=3)
    result = _flatten(model)
    assert result.stats["flatten_tokens.layers"] == 9
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Shape") == 1 and ops.count("Concat") == 1  # one width (D) leaves the region
    for length in (3, 6):
        x = {"X": graphs.rng(length).standard_normal((2, length, D)).astype(np.float32)}
        for w, g in zip(graphs.run(model, x), graphs.run(result.model, x), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq", [S, "seq"])
def test_traced_heads_read_the_shape_of_an_entry_and_take_rank_2(seq: int | str) -> None:
    """TorchScript style: Shape(q)[0], Shape(q)[1] now read the entry; the computed target has no 0: no way back."""
    model = _encoder(seq=seq, pos=False, layers=2, traced_heads=True)
    result = _flatten(model)
    assert result.stats["flatten_tokens.layers"] == 6
    graph = result.model.graph
    assert {n.input[0] for n in graph.node if n.op_type == "Shape"} == {"X"}
    # X into rows; T back (by a constant target, or with a dynamic sequence Shape, Gather, Concat first)
    assert result.stats["flatten_tokens.nodes_added"] == (2 if seq == S else 5)
    for length in (2, 5) if seq == "seq" else (S,):
        x = {"X": graphs.rng(length).standard_normal((3, length, D)).astype(np.float32)}
        for w, g in zip(graphs.run(model, x), graphs.run(result.model, x), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _traced_reshape() -> onnx.ModelProto:
    """X[batch, 32] -> Reshape(Concat(Unsqueeze(Shape(X)[0]), [4, 8])) -> r -> MatMul(W) -> Y (opset 13, as traced)."""
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "rest": np.array([4, 8], np.int64),
             "W": np.ones((8, 6), np.float32)}
    nodes = [helper.make_node("Shape", ["X"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"]),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Concat", ["n1", "rest"], ["t"], axis=0),
             helper.make_node("Reshape", ["X", "t"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["Y"])]
    return graphs.make_model(nodes, [("X", ["batch", 32])], [("Y", ["batch", 4, 6])], inits, opset=13)


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for vi in model.graph.value_info:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim) or None
    return None


def test_symbolic_inference_shapes_what_onnx_leaves_after_a_traced_reshape(monkeypatch: pytest.MonkeyPatch) -> None:
    """At opset 13 onnx's inference stops at a Reshape built from Shape dims; onnxruntime's symbolic one does not."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from onnxpress.model_io import infer_shapes_thoroughly

    model = _traced_reshape()
    assert _rank(infer_shapes(model), "r") is None
    assert _rank(infer_shapes_thoroughly(model), "r") == 3

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(SymbolicShapeInference, "_infer_impl", fail)  # onnx's result stands
    assert infer_shapes_thoroughly(model).SerializeToString() == infer_shapes(model).SerializeToString()


def test_region_tensor_read_inside_a_subgraph_goes_back_for_it() -> None:
    """An If branch reading h0 from the outer scope gets the rank-3 tensor back; every output unchanged."""
    from onnx import TensorProto, numpy_helper

    model = _encoder(layers=2)
    g = model.graph
    branches = {
        name: helper.make_graph([helper.make_node("ReduceSum", ["h0", "ax1"], [f"{name}_out"], keepdims=0)], name,
                                [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
        for name in ("then", "else")
    }
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "ax1"),
                          numpy_helper.from_array(np.array(True), "cond")])
    g.node.append(helper.make_node("If", ["cond"], ["Z"], then_branch=branches["then"], else_branch=branches["else"]))
    g.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", D]))
    result = _flatten(model)
    assert result.stats["flatten_tokens.nodes_added"] == 3  # into rows, back to T, back to h0 for the If
    _same(model, result.model)


def _lowrank(model: onnx.ModelProto, rank: int = 2, **kwargs):
    import onnxpress

    return onnxpress.lowrank(model, rank=rank, **kwargs)


def test_lowrank_runs_its_split_encoder_on_rows_with_the_same_outputs() -> None:
    """lowrank ends with FlattenTokens: the split model's outputs are unchanged, its LayerNorms now read rows."""
    model = _encoder(layers=2)
    flat, kept = _lowrank(model), _lowrank(model, flatten_tokens=False)
    assert all(lay.rank == 2 for lay in flat.layers if lay.full_rank)
    assert flat.flattened == 6 and kept.flattened == 0
    onnx.checker.check_model(flat.model, full_check=True)
    _same(kept.model, flat.model)
    assert _rank(infer_shapes(flat.model), "ln0") == 2 and _rank(infer_shapes(kept.model), "ln0") == 3
    assert flat.macs_after == kept.macs_after  # the ranks are chosen on the graph as given


def test_lowrank_that_splits_nothing_keeps_the_graph_as_it_is() -> None:
    """rank 8 of an 8x8 weight saves nothing: no layer is split, so no Reshape is added either."""
    model = _encoder(layers=1)
    result = _lowrank(model, rank=8)
    assert result.flattened == 0
    assert [n.op_type for n in result.model.graph.node].count("Reshape") == 1  # the heads' own


def test_cli_lowrank_says_it_ran_on_rows_unless_asked_to_keep_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxpress.cli import main

    src = tmp_path / "enc.onnx"
    onnx.save(_encoder(layers=2), str(src))
    assert main(["lowrank", str(src), "-o", str(tmp_path / "a.onnx"), "--rank", "2", "-q"]) == 0
    assert "ran the token-wise region on [rows, features] (6 dense layers" in capsys.readouterr().out
    assert main(["lowrank", str(src), "-o", str(tmp_path / "b.onnx"), "--rank", "2", "--keep-ranks", "-q"]) == 0
    assert "token-wise" not in capsys.readouterr().out
    _same(onnx.load(tmp_path / "b.onnx"), onnx.load(tmp_path / "a.onnx"))
