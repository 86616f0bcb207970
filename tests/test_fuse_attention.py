"""FuseAttention: scaled dot-product attention chains become onnxruntime's MultiHeadAttention, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.model_io import infer_shapes, infer_shapes_thoroughly
from onnxpress.passes.fuse_attention import FuseAttention
from onnxpress.pipeline import run_passes
from tests import graphs

S, D, H = 5, 8, 2
MODELS = Path(__file__).resolve().parents[1] / "models"


def attention(scale: str = "mul", keys: str = "one", mask: str | None = None, seq: int | str = S,
              softmax_read: bool = False,
              out_perm: tuple[int, ...] = (0, 2, 1, 3), typed: bool = True,
              context: int | str | None = None, merge_by_shape: bool = False) -> onnx.ModelProto:
    """X[batch, seq, D] -> Q/K/V projections -> heads -> softmax(c q kᵀ) v -> merged heads -> output projection.

    scale: "mul" (scores * c), "mul_first" (c * scores), "div" (scores / sqrt(d)), "none".
    keys: "one" (Transpose[0,2,3,1] of the head split), "two" (Transpose[0,2,1,3] then [0,1,3,2]), "sdpa"
    (Transpose[0,2,1,3], Reshape[-1, S, d], Transpose[0,2,1], Reshape[-1, H, d, S], and sqrt(c) on q and k) or
    "script" (Transpose[0,2,3,1], and q and k each times ``Sqrt(1 / Sqrt(Cast(Slice(Shape(q), -1))))`` as torch's
    TorchScript export writes scaled_dot_product_attention).
    mask: "const" (scores + a constant [S] bias), "input" (+ an input ``pad[batch, 1, 1, seq]``), "where" /
    "where_keep" (``Where(pad, -inf, scores)`` / ``Where(pad, scores, -inf)``, pad a bool input),
    "where_small" (a fill of -1e4), "before_scale" (``(qk + bias) * c``), "sub" (``scores - pad``), "causal_pad"
    (``Where`` of a causal mask sliced off a constant [1, 1, 8, 8] buffer to the run-time length, then ``+ pad``:
    onnx's inference loses the slice's dimensions) or "temperature" (scores times a [1, H, 1, 1] tensor).
    merge_by_shape: the head merge's target from ``Shape`` of the attention's head-first output, as a TorchScript
    export of ``B, _, S, _ = a.shape`` writes it.
    context: the batch dimension of a second input ``ctx[context, L, D]`` (L = S + 1) that keys and values read
    (cross-attention), else they read ``x``.
    """
    r = graphs.rng(1)
    d = D // H
    inits = {f"w{n}": (r.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for n in "qkvo"}
    inits.update({f"b{n}": 0.1 * r.standard_normal(D).astype(np.float32) for n in "qkv"})
    inits["heads"] = np.array([0, 0, H, d], np.int64)  # 0: copy batch and sequence (a dynamic seq works)
    inits["merged"] = np.array([0, 0, D], np.int64)
    inits["c"] = np.array(1 / np.sqrt(d) if scale != "div" else np.sqrt(d), np.float32)
    inits["bias"] = np.where(np.arange(S) > 2, -1e4, 0).astype(np.float32)
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x" if n == "q" or context is None else "ctx", f"w{n}"], [f"{n}0"]),
                  helper.make_node("Add", [f"{n}0", f"b{n}"], [f"{n}1"]),
                  helper.make_node("Reshape", [f"{n}1", "heads"], [f"{n}h"])]
    nodes.append(helper.make_node("Transpose", ["qh"], ["qt0" if keys in ("sdpa", "script") else "qt"],
                                  perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]))
    if keys == "one":
        nodes.append(helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]))
    elif keys == "sdpa":  # torch's dynamo export of scaled_dot_product_attention: q and k scaled by sqrt(c) each
        inits["fold"], inits["unfold"] = np.array([-1, S, d], np.int64), np.array([-1, H, d, S], np.int64)
        inits["root"] = np.sqrt(inits["c"]).astype(np.float32)
        nodes += [helper.make_node("Transpose", ["kh"], ["kt0"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["kt0", "fold"], ["kt1"]),
                  helper.make_node("Transpose", ["kt1"], ["kt2"], perm=[0, 2, 1]),
                  helper.make_node("Reshape", ["kt2", "unfold"], ["kt3"]),
                  helper.make_node("Mul", ["kt3", "root"], ["kt"]),
                  helper.make_node("Mul", ["qt0", "root"], ["qt"])]
    elif keys == "script":  # the scale from the head size at run time, its square root on q and on k
        inits.update({"last": np.array([-1], np.int64), "end": np.array([2**62], np.int64),
                      "one": np.array(1, np.float32)})
        nodes += [helper.make_node("Transpose", ["kh"], ["kt0"], perm=[0, 2, 3, 1]),
                  helper.make_node("Shape", ["qt0"], ["qs"]),
                  helper.make_node("Slice", ["qs", "last", "end"], ["qd"]),
                  helper.make_node("Cast", ["qd"], ["qdf"], to=TensorProto.FLOAT),
                  helper.make_node("Sqrt", ["qdf"], ["qdr"]),
                  helper.make_node("Div", ["one", "qdr"], ["sc"]),
                  helper.make_node("Sqrt", ["sc"], ["scr"]),
                  helper.make_node("Mul", ["qt0", "scr"], ["qt"]),
                  helper.make_node("Mul", ["kt0", "scr"], ["kt"])]
    else:
        nodes += [helper.make_node("Transpose", ["kh"], ["kt0"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", ["kt0"], ["kt"], perm=[0, 1, 3, 2])]
    nodes.append(helper.make_node("MatMul", ["qt", "kt"], ["qk"]))
    scores = "qk"
    if mask == "before_scale":
        nodes.append(helper.make_node("Add", ["qk", "bias"], ["qkb"]))
        scores = "qkb"
    if scale != "none":
        nodes.append({"mul": helper.make_node("Mul", [scores, "c"], ["s0"]),
                      "mul_first": helper.make_node("Mul", ["c", scores], ["s0"]),
                      "div": helper.make_node("Div", [scores, "c"], ["s0"])}[scale])
        scores = "s0"
    if mask is not None and mask.startswith("where"):
        inits["fill"] = np.array(-1e4 if mask == "where_small" else -np.inf, np.float32)
    if mask in ("const", "input"):
        nodes.append(helper.make_node("Add", [scores, "bias" if mask == "const" else "pad"], ["s1"]))
        scores = "s1"
    elif mask in ("where", "where_small"):
        nodes.append(helper.make_node("Where", ["pad", "fill", scores], ["s1"]))
        scores = "s1"
    elif mask == "where_keep":
        nodes.append(helper.make_node("Where", ["pad", scores, "fill"], ["s1"]))
        scores = "s1"
    elif mask == "sub":
        nodes.append(helper.make_node("Sub", [scores, "pad"], ["s1"]))
        scores = "s1"
    elif mask == "causal_pad":
        inits.update({"tril": np.tril(np.ones((1, 1, 8, 8), bool)), "fill": np.array(-np.inf, np.float32),
                      "zero": np.array([0], np.int64), "axes": np.array([2, 3], np.int64)})
        nodes += [helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Slice", ["xs", "one_", "two_"], ["len"]),
                  helper.make_node("Concat", ["len", "len"], ["ends"], axis=0),
                  helper.make_node("Concat", ["zero", "zero"], ["starts"], axis=0),
                  helper.make_node("Slice", ["tril", "starts", "ends", "axes"], ["causal"]),
                  helper.make_node("Not", ["causal"], ["future"]),
                  helper.make_node("Where", ["future", "fill", scores], ["s1"]),
                  helper.make_node("Add", ["s1", "pad"], ["s2"])]
        inits.update({"one_": np.array([1], np.int64), "two_": np.array([2], np.int64)})
        scores = "s2"
    elif mask == "temperature":
        inits["temp"] = np.linspace(0.5, 2, H, dtype=np.float32).reshape(1, H, 1, 1)
        nodes.append(helper.make_node("Mul", [scores, "temp"], ["s1"]))
        scores = "s1"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["a"]),
              helper.make_node("Transpose", ["a"], ["at"], perm=list(out_perm)),
              helper.make_node("Reshape", ["at", "merge_to" if merge_by_shape else "merged"], ["m"]),
              helper.make_node("MatMul", ["m", "wo"], ["y"])]
    if merge_by_shape:  # after the MatMul that makes a, before the merge
        inits.update({"b0": np.array([0], np.int64), "b1": np.array([1], np.int64), "s2": np.array([2], np.int64),
                      "s3": np.array([3], np.int64), "width": np.array([D], np.int64)})
        nodes[-3:-3] = [helper.make_node("Shape", ["a"], ["as"]),
                        helper.make_node("Slice", ["as", "b0", "b1"], ["ab"]),
                        helper.make_node("Slice", ["as", "s2", "s3"], ["asq"]),
                        helper.make_node("Concat", ["ab", "asq", "width"], ["merge_to"], axis=0)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, D])]
    if softmax_read:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", H, seq, seq]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, D])]
    if context is not None:
        inputs.append(helper.make_tensor_value_info("ctx", TensorProto.FLOAT, [context, S + 1, D]))
    if mask in ("input", "where", "where_keep", "where_small", "sub", "causal_pad"):
        inputs.append(helper.make_tensor_value_info("pad", TensorProto.BOOL if mask.startswith("where") else
                                                    TensorProto.FLOAT,
                                                    ["batch", 1, 1, seq]))
    graph = helper.make_graph(nodes, "attention", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return infer_shapes(model) if typed else model  # the pass reads the tensor types (lowrank infers them first)


def _feeds(batch: int = 3, seq: int = S, context: int | None = None, mask: str | None = None) -> dict[str, np.ndarray]:
    r = graphs.rng(7)
    feeds = {"x": r.standard_normal((batch, seq, D)).astype(np.float32)}
    if context is not None:
        feeds["ctx"] = r.standard_normal((context, S + 1, D)).astype(np.float32)
    if mask in ("input", "where", "where_keep", "where_small", "sub", "causal_pad"):
        padded = np.arange(seq)[None, :] >= np.array([seq, 2, 1][:batch] + [seq] * max(0, batch - 3))[:, None]
        masked = padded if mask != "where_keep" else ~padded  # where_keep keeps the scores where m is true
        value = {"sub": 1e4, "causal_pad": -np.inf}.get(mask, -1e4)
        feeds["pad"] = (masked if mask.startswith("where") else
                        np.where(masked, value, 0).astype(np.float32))[:, None, None, :]
    return feeds


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _weights_dequantized(model: onnx.ModelProto) -> int:
    """DequantizeLinear nodes of 2-D int8 initializers: the quantized dense layers' weights."""
    matrices = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in matrices for n in model.graph.node)


@pytest.mark.parametrize(("scale", "keys"), [("mul", "one"), ("mul_first", "one"), ("div", "one"),
                                             ("none", "one"), ("mul", "two"), ("none", "sdpa"), ("none", "script")])
def test_attention_runs_as_one_node_with_the_same_outputs(scale, keys) -> None:
    model = attention(scale, keys)
    res = run_passes(model, [FuseAttention()])
    assert res.stats["fuse_attention.fused"] == 1 and not res.notes
    ops = _ops(res.model)
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and "Transpose" not in ops
    node = next(n for n in res.model.graph.node if n.op_type == "MultiHeadAttention")
    assert node.domain == "com.microsoft"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    want = 1.0 if scale == "none" and keys not in ("sdpa", "script") else 1 / np.sqrt(D // H)
    assert attrs["num_heads"] == H and attrs["scale"] == pytest.approx(want, rel=1e-6)
    onnx.checker.check_model(res.model, full_check=True)
    for feeds in (_feeds(), _feeds(batch=1)):
        (want_y,), (got_y,) = graphs.run(model, feeds), graphs.run(res.model, feeds, optimize=True)
        np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge_by_shape", [False, True])
def test_a_dynamic_sequence_length_is_fused_and_runs_at_any_length(merge_by_shape) -> None:
    """Also where the head merge reads the attention's shape (it is read off the fused output instead)."""
    model = attention(seq="seq", merge_by_shape=merge_by_shape)
    res = run_passes(model, [FuseAttention()])
    assert res.stats["fuse_attention.fused"] == 1 and not res.notes
    assert "MatMul" in _ops(res.model) and "Softmax" not in _ops(res.model) and "Transpose" not in _ops(res.model)
    for seq in (2, 7):
        feeds = _feeds(seq=seq)
        np.testing.assert_allclose(graphs.run(res.model, feeds)[0], graphs.run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "note"), [
    ({"mask": "before_scale"}, "a mask or bias is applied to the scores before they are scaled"),
    ({"mask": "where_small"}, "a fill that does not swamp them"),
    ({"mask": "temperature"}, "the scores are scaled by a tensor, not by one number"),
    ({"out_perm": (0, 2, 3, 1)}, "the heads are laid out otherwise"),  # [B, S, d, H]: merged otherwise
    ({"softmax_read": True}, "read by more than the value MatMul"),  # a graph output: the chain must stay
    ({"typed": False}, "the tensor types are not known"),
])
def test_what_is_not_plain_attention_is_left_as_it_is(kwargs, note) -> None:
    model = attention(**kwargs)
    res = run_passes(model, [FuseAttention()])
    assert res.stats["fuse_attention.fused"] == 0 and "MultiHeadAttention" not in _ops(res.model)
    assert _ops(res.model) == _ops(model)
    if note is not None:
        assert len(res.notes) == 1 and note in res.notes[0]


@pytest.mark.parametrize("mask", ["const", "input", "where", "where_keep", "sub", "causal_pad"])
@pytest.mark.parametrize("seq", [S, "seq"])
def test_a_mask_on_the_scores_becomes_the_fused_nodes_attention_bias(mask, seq) -> None:
    """With masks=True, scores + mask (constant or an input), scores - mask, Where(m, -inf, scores) and masks one
    after another: the mask broadcast to [B|1, H|1, S, L] as the kernel wants it (a constant at known lengths,
    an Expand at run time); padded keys and the rows of a query that sees one key only agree to float rounding.
    By default masked attention stays as it is, with a note (the kernel is no faster with a mask)."""
    model = attention(mask=mask, seq=seq)
    kept = run_passes(model, [FuseAttention()])
    assert kept.stats["fuse_attention.fused"] == 0 and _ops(kept.model) == _ops(model)
    assert len(kept.notes) == 1 and "a mask is applied to the scores" in kept.notes[0]
    res = run_passes(model, [FuseAttention(masks=True)])
    assert res.stats["fuse_attention.fused"] == 1 and not res.notes
    ops = _ops(res.model)
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and "Transpose" not in ops
    node = next(n for n in res.model.graph.node if n.op_type == "MultiHeadAttention")
    assert len(node.input) == 6 and node.input[3] == node.input[4] == ""  # attention_bias, no bias or padding mask
    onnx.checker.check_model(res.model, full_check=True)
    for lengths in ((3, S), (2, S), (1, S)) + (((3, 2), (2, 7)) if seq == "seq" and mask != "const" else ()):
        feeds = _feeds(batch=lengths[0], seq=lengths[1], mask=mask)
        (want_y,), (got_y,) = graphs.run(model, feeds), graphs.run(res.model, feeds, optimize=True)
        np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
        if mask != "const":  # the mask is used: without it the outputs differ
            free = {**feeds, "pad": feeds["pad"] & False if mask.startswith("where") else np.zeros_like(feeds["pad"])}
            if mask == "where_keep":
                free["pad"] = ~free["pad"]
            assert np.abs(graphs.run(res.model, free)[0] - got_y).max() > 1e-2 or lengths[0] == 1


def test_cross_attention_is_fused_only_where_queries_and_keys_share_the_batch(tmp_path, capsys) -> None:
    """A fixed [1, L, D] context that MatMul broadcasts over batched queries stays as it is: onnxruntime's
    MultiHeadAttention refuses query and key batches that differ (the fused model failed at batch 3)."""
    same = attention(context="batch")
    res = run_passes(same, [FuseAttention()])
    assert res.stats["fuse_attention.fused"] == 1 and not res.notes
    feeds = _feeds(context=3)
    np.testing.assert_allclose(graphs.run(res.model, feeds)[0], graphs.run(same, feeds)[0], rtol=1e-5, atol=1e-5)

    shared = attention(context=1)
    res = run_passes(shared, [FuseAttention()])
    assert res.stats["fuse_attention.fused"] == 0 and _ops(res.model) == _ops(shared)
    assert len(res.notes) == 1 and "may differ in batch size" in res.notes[0]
    feeds = _feeds(context=1)
    np.testing.assert_allclose(graphs.run(res.model, feeds)[0], graphs.run(shared, feeds)[0], rtol=1e-6, atol=1e-6)

    # quantize keeps the note and prints it (it had dropped the pass's notes)
    done = onnxpress.quantize(shared, activations="dynamic")
    assert "MultiHeadAttention" not in _ops(done.model)
    assert [n for n in done.notes if n.startswith("fuse_attention: ") and "batch size" in n]
    graphs.run(done.model, feeds)
    onnx.save(shared, str(tmp_path / "cross.onnx"))
    from onnxpress.cli import main

    assert main(["quantize", str(tmp_path / "cross.onnx"), "-o", str(tmp_path / "q.onnx"), "--activations",
                 "dynamic"]) == 0
    assert ("attention kept as the graph's ops at 1 Softmax node(s) (p): the queries, keys and values may differ in "
            "batch size") in capsys.readouterr().out


def test_lowrank_fuses_the_reference_transformers_attention_exactly(tmp_path, capsys) -> None:
    """lowrank ends with the fusion (2 blocks); the split is the same, and --keep-attention keeps the ops."""
    src = MODELS / "transformer.onnx"
    x = np.load(MODELS / "digits32_test.npz")["input"][:64]
    fused = onnxpress.lowrank(str(src), rank=16)
    kept = onnxpress.lowrank(str(src), rank=16, fuse_attention=False)
    assert fused.attention_fused == 2 and kept.attention_fused == 0
    assert _ops(fused.model).count("MultiHeadAttention") == 2 and "MultiHeadAttention" not in _ops(kept.model)
    assert [lay.rank for lay in fused.layers] == [lay.rank for lay in kept.layers]
    a = graphs.run(fused.model, {"input": x}, optimize=True)[0]
    b = graphs.run(kept.model, {"input": x}, optimize=True)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    from onnxpress.cli import main

    assert main(["lowrank", str(src), "-o", str(tmp_path / "k.onnx"), "--rank", "16", "--keep-attention"]) == 0
    assert "MultiHeadAttention" not in capsys.readouterr().out
    assert "MultiHeadAttention" not in _ops(onnx.load(str(tmp_path / "k.onnx")))
    assert main(["lowrank", str(src), "-o", str(tmp_path / "f.onnx"), "--rank", "16"]) == 0
    assert "ran 2 attention block(s) as onnxruntime's MultiHeadAttention" in capsys.readouterr().out


def test_a_softmax_over_a_dense_layer_is_no_attention_and_gets_no_note() -> None:
    w = graphs.rng(2).standard_normal((D, 4)).astype(np.float32)
    model = graphs.make_model([helper.make_node("MatMul", ["x", "w"], ["z"]),
                               helper.make_node("Add", ["z", "b"], ["s"]),
                               helper.make_node("Softmax", ["s"], ["y"], axis=-1)],
                              [("x", ["batch", D])], [("y", ["batch", 4])], {"w": w, "b": np.ones(4, np.float32)})
    res = run_passes(infer_shapes(model), [FuseAttention()])
    assert res.stats["fuse_attention.fused"] == 0 and res.notes == () and _ops(res.model) == _ops(model)


def test_the_finetune_bridge_runs_the_fused_node_and_a_lowrank_student_trains(tmp_path) -> None:
    """lowrank -> finetune is a natural chain: the bridge runs MultiHeadAttention as ONNX's ops would."""
    torch = pytest.importorskip("torch")
    from onnxpress.bridge.convert import OnnxModule

    for mask in (None, "input", "where"):  # with a mask, it is the node's attention_bias
        fused = run_passes(attention("div", mask=mask), [FuseAttention(masks=True)]).model
        assert "MultiHeadAttention" in _ops(fused)
        feeds = _feeds(mask=mask)
        mod = OnnxModule(fused).eval()
        with torch.no_grad():
            (got,) = mod.evaluate([torch.from_numpy(feeds[n]) for n in mod.input_names], mod.output_names)
        np.testing.assert_allclose(got.numpy(), graphs.run(fused, feeds)[0], rtol=1e-5, atol=1e-5)

    x = np.load(MODELS / "digits32_calib.npz")["input"][:64]
    student = onnxpress.lowrank(str(MODELS / "transformer.onnx"), rank=16).model
    assert "MultiHeadAttention" in _ops(student)
    res = onnxpress.finetune(student, str(MODELS / "transformer.onnx"), [{"input": x}], tmp_path / "s.onnx",
                             epochs=1, seed=0)
    onnx.checker.check_model(onnx.load(str(tmp_path / "s.onnx")), full_check=True)
    assert res.mode == "float" and res.export_max_diff <= 1e-4  # the written model runs as the module trained
    assert res.metrics["sqnr_db_after"] > res.metrics["sqnr_db_before"]  # 5.06 -> 7.81 dB (plain SVD, rank 16)


def test_quantize_runs_attention_fused_in_float_unless_asked_to_quantize_it(tmp_path, capsys) -> None:
    """int8: the projections are quantized as before, attention runs fused; quantize_ops MatMul keeps the chain."""
    src = str(MODELS / "transformer.onnx")
    calib = np.load(MODELS / "digits32_calib.npz")["input"][:64]
    x = np.load(MODELS / "digits32_test.npz")["input"][:128]
    fused = onnxpress.quantize(src, calib=[{"input": calib}], max_samples=64, quantized_attention=False)
    kept = onnxpress.quantize(src, calib=[{"input": calib}], max_samples=64, fuse_attention=False)
    assert fused.stats["fuse_attention.fused"] == 2 and _ops(fused.model).count("MultiHeadAttention") == 2
    assert "MultiHeadAttention" not in _ops(kept.model)
    assert _weights_dequantized(fused.model) == _weights_dequantized(kept.model) == 14  # embedding, 2 x 6, head
    a = graphs.run(fused.model, {"input": x}, optimize=True)[0]
    b = graphs.run(kept.model, {"input": x}, optimize=True)[0]
    # the same int8 model: float rounding in attention flips a few roundings of the next QuantizeLinear (one step)
    assert 10 * np.log10(np.sum(b.astype(np.float64) ** 2) / np.sum((a - b).astype(np.float64) ** 2)) > 45
    # by default the int8 projections run inside QAttention with the attention (tests/test_quantized_attention.py)
    default = onnxpress.quantize(src, calib=[{"input": calib}], max_samples=64)
    assert _ops(default.model).count("QAttention") == 2 and "MultiHeadAttention" not in _ops(default.model)
    asked = onnxpress.quantize(src, calib=[{"input": calib}], max_samples=64, quantize_ops=["MatMul"])
    assert "MultiHeadAttention" not in _ops(asked.model)

    from onnxpress.cli import main

    np.savez(tmp_path / "c.npz", input=calib)
    assert main(["quantize", src, "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "c.npz"),
                 "--keep-attention", "--no-latency-check"]) == 0
    assert "MultiHeadAttention" not in capsys.readouterr().out
    assert "MultiHeadAttention" not in _ops(onnx.load(str(tmp_path / "q.onnx")))


def test_int4_weight_only_runs_attention_fused_too() -> None:
    src = str(MODELS / "transformer.onnx")
    x = np.load(MODELS / "digits32_test.npz")["input"][:64]
    fused = onnxpress.quantize(src, weights="int4")
    kept = onnxpress.quantize(src, weights="int4", fuse_attention=False)
    assert _ops(fused.model).count("MultiHeadAttention") == 2 and "MultiHeadAttention" not in _ops(kept.model)
    a = graphs.run(fused.model, {"input": x}, optimize=True)[0]
    b = graphs.run(kept.model, {"input": x}, optimize=True)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # weight-only: no rounding of activations to flip


def test_dynamic_int8_runs_attention_fused_too() -> None:
    src = str(MODELS / "transformer.onnx")
    x = np.load(MODELS / "digits32_test.npz")["input"][:64]
    fused = onnxpress.quantize(src, activations="dynamic", quantized_attention=False)
    kept = onnxpress.quantize(src, activations="dynamic", fuse_attention=False)
    assert _ops(fused.model).count("MultiHeadAttention") == 2 and "MultiHeadAttention" not in _ops(kept.model)
    a = graphs.run(fused.model, {"input": x}, optimize=True)[0]
    b = graphs.run(kept.model, {"input": x}, optimize=True)[0]
    assert 10 * np.log10(np.sum(b.astype(np.float64) ** 2) / np.sum((a - b).astype(np.float64) ** 2)) > 45


def test_a_torchscript_bert_with_a_padding_mask_fuses_every_block(tmp_path) -> None:
    """TorchScript export of a 2-layer BERT-style encoder: onnxruntime's inference loses the batch after
    ``embedding + position[:, :S]`` (unk__N), the head splits' Reshape targets come from Shape arithmetic and the
    mask is ``(1 - m[:, None, None, :]) * finfo.min``; the batch is traced to the inputs' and both blocks fuse
    (with masks=True; quantize leaves masked attention as it is, with a note per block)."""
    torch = pytest.importorskip("torch")
    import warnings

    torch.manual_seed(0)
    d, heads, seq = 32, 4, 8

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(3))
            self.out, self.norm = torch.nn.Linear(d, d), torch.nn.LayerNorm(d)
            self.ffn = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

        def forward(self, x, bias):
            b, s, _ = x.shape
            q, k, v = (lin(x).reshape(b, s, heads, d // heads).transpose(1, 2) for lin in self.qkv)
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5 + bias, -1) @ v
            x = self.norm(x + self.out(a.transpose(1, 2).reshape(b, s, d)))
            return x + self.ffn(x)

    class Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.pos = torch.nn.Embedding(50, d), torch.nn.Parameter(torch.randn(1, seq, d) * 0.1)
            self.layers = torch.nn.ModuleList(Layer() for _ in range(2))

        def forward(self, ids, mask):
            bias = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
            x = self.embed(ids) + self.pos[:, : ids.shape[1]]
            for layer in self.layers:
                x = layer(x, bias)
            return x

    path = tmp_path / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Bert().eval(), (torch.zeros(2, seq, dtype=torch.long), torch.ones(2, seq)), str(path),
                          dynamo=False, opset_version=17, input_names=["ids", "mask"],
                          dynamic_axes={"ids": {0: "b"}, "mask": {0: "b"}})
    done = onnxpress.quantize(str(path), activations="dynamic")  # masked: kept by default
    assert done.stats["fuse_attention.fused"] == 0
    assert len([n for n in done.notes if "a mask is applied to the scores" in n]) == 2
    from onnxpress.reporting import attention_lines

    (line,) = attention_lines(done.notes)  # the CLI prints one line per reason
    assert line.startswith("attention kept as the graph's ops at 2 Softmax node(s) (/layers.0/Softmax, ")
    fused = run_passes(infer_shapes_thoroughly(onnx.load(str(path))), [FuseAttention(masks=True)])
    assert fused.stats["fuse_attention.fused"] == 2
    r = graphs.rng(3)
    for batch in (1, 3):
        mask = np.ones((batch, seq), np.float32)
        mask[-1, 3:] = 0  # the last sample is padded after 3 tokens
        feeds = {"ids": r.integers(0, 50, (batch, seq)).astype(np.int64), "mask": mask}
        np.testing.assert_allclose(graphs.run(fused.model, feeds)[0], graphs.run(onnx.load(str(path)), feeds)[0],
                                   rtol=1e-5, atol=1e-5)
        graphs.run(done.model, feeds)
