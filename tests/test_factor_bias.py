"""FoldBiasIntoFactor: a low-rank pair's bias rides in its second factor behind a column of ones, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxpress.passes.factor_bias import MIN_RATIO, FoldBiasIntoFactor
from onnxpress.pipeline import run_passes
from tests import graphs


def pair(k: int, r: int, n: int, *, first: str = "MatMul", second: str = "MatMul", trans_first: int = 0,
         trans_second: int = 0, beta: float = 1.0, bias_shape: tuple[int, ...] | None = None, seed: int = 0,
         rank3: bool = False) -> onnx.ModelProto:
    """X[b,k] -> first(U[k,r]) -> second(V[r,n]) (+ b[n]: an Add after a MatMul, C of a Gemm) -> Y[b,n]."""
    g = graphs.rng(seed)
    u = g.standard_normal((k, r)).astype(np.float32)
    v = g.standard_normal((r, n)).astype(np.float32)
    b = g.standard_normal(bias_shape or (n,)).astype(np.float32)
    inits = {"U": u.T if trans_first else u, "V": v.T if trans_second else v, "b": b}
    nodes = [helper.make_node(first, ["X", "U"], ["t"], **({"transB": trans_first} if first == "Gemm" else {}))]
    if second == "Gemm":
        nodes.append(helper.make_node("Gemm", ["t", "V", "b"], ["Y"], transB=trans_second, beta=beta))
    else:
        nodes += [helper.make_node("MatMul", ["t", "V"], ["y"]), helper.make_node("Add", ["y", "b"], ["Y"])]
    lead = ["batch", 3] if rank3 else ["batch"]
    return graphs.make_model(nodes, [("X", [*lead, k])], [("Y", [*lead, n])], inits)


def _folded(model: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, int]:
    res = run_passes(model, [FoldBiasIntoFactor(**kwargs)])
    onnx.checker.check_model(res.model, full_check=True)
    return res.model, int(res.stats.get("fold_bias_into_factor.pairs", 0))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 24), r=st.integers(1, 6), wide=st.integers(4, 8), seed=st.integers(0, 9),
       first=st.sampled_from(["MatMul", "Gemm"]), second=st.sampled_from(["MatMul", "Gemm"]),
       trans_first=st.integers(0, 1), trans_second=st.integers(0, 1), beta=st.sampled_from([1.0, 0.5]))
def test_folded_pairs_give_the_same_outputs_in_onnxruntime(k, r, wide, seed, first, second, trans_first,
                                                           trans_second, beta):
    n = wide * (r + 1)  # wide enough for MIN_RATIO
    model = pair(k, r, n, first=first, second=second, trans_first=trans_first if first == "Gemm" else 0,
                 trans_second=trans_second if second == "Gemm" else 0, beta=beta if second == "Gemm" else 1.0,
                 seed=seed)
    folded, count = _folded(model)
    assert count == 1
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Add") == (1 if first == "MatMul" else 0)  # the bias Add is gone; a MatMul first gets e_r
    x = graphs.rng(seed + 1).standard_normal((5, k)).astype(np.float32)
    want, got = graphs.run(model, {"X": x})[0], graphs.run(folded, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_a_rank3_pair_and_a_broadcast_bias_fold_too():
    model = pair(16, 4, 40, rank3=True, bias_shape=(1, 1, 40))
    folded, count = _folded(model)
    assert count == 1
    x = graphs.rng(3).standard_normal((2, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(graphs.run(folded, {"X": x})[0], graphs.run(model, {"X": x})[0], rtol=1e-5, atol=1e-4)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert sorted(v.shape for v in inits.values() if v.ndim == 2) == [(5, 40), (16, 5)]  # [V; b] and [U, 0]


@pytest.mark.parametrize(("model", "why"), [
    (pair(16, 8, int(MIN_RATIO * 9) - 1), "output narrower than MIN_RATIO (r + 1)"),
    (pair(16, 4, 40, bias_shape=(2, 40)), "a bias that varies along more than the last axis"),
    (pair(16, 4, 40, second="Gemm", bias_shape=(2, 40)), "a Gemm C of more than N elements"),
])  # fmt: skip
def test_pairs_it_cannot_or_should_not_fold_are_left(model, why):
    folded, count = _folded(model)
    assert count == 0, why
    assert folded.graph.node == model.graph.node, why


def test_a_shared_first_factor_or_a_read_intermediate_is_left():
    """A joint unit's first factor feeds two second factors; an intermediate that is a graph output must keep r
    columns: neither is folded."""
    model = pair(16, 4, 40)
    joint = onnx.ModelProto()
    joint.CopyFrom(model)
    joint.graph.node.append(helper.make_node("MatMul", ["t", "V"], ["Z"]))
    joint.graph.output.append(helper.make_tensor_value_info("Z", onnx.TensorProto.FLOAT, ["batch", 40]))
    read = onnx.ModelProto()
    read.CopyFrom(model)
    read.graph.output.append(helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["batch", 4]))
    for m in (joint, read):
        assert _folded(m)[1] == 0


def test_names_limit_what_is_folded():
    model = pair(16, 4, 40)
    second = model.graph.node[1]
    second.name = "second"
    assert _folded(model, names={"other"})[1] == 0
    assert _folded(model, names={"second"})[1] == 1


def test_lowrank_folds_within_its_macs_budget_and_exactly_at_fixed_ranks():
    """The reference transformer: at fixed ranks the folded split gives the unfolded one's outputs; under a MACs
    budget the columns fit (the split leaves room for them) and every wide pair is folded."""
    from pathlib import Path

    import onnxpress

    model = Path(__file__).resolve().parents[1] / "models" / "transformer.onnx"
    calib = str(Path(model).parent / "digits32_calib.npz")
    x = {"input": np.load(calib)["input"][:16]}
    plain = onnxpress.lowrank(str(model), rank=16, fold_bias=False)
    folded = onnxpress.lowrank(str(model), rank=16)
    ones = [n for n in folded.model.graph.node if n.name.endswith("_one")]
    assert len(ones) == 12  # every split dense layer is 16 wide: 128 >= 3 * 17
    np.testing.assert_allclose(graphs.run(folded.model, x)[0], graphs.run(plain.model, x)[0], rtol=1e-4, atol=1e-4)
    budget = onnxpress.lowrank(str(model), flops=0.5, multiple=8, max_samples=64, calib=calib)
    assert budget.macs_after <= 0.5 * budget.macs_before
    wide = [lay for lay in budget.layers if lay.rank is not None and lay.skipped is None
            and lay.shape[0] >= MIN_RATIO * (lay.rank + 1)]
    assert wide and len([n for n in budget.model.graph.node if n.name.endswith("_one")]) == len(wide)
    assert not [n for n in budget.notes if "bias left" in n]


def test_cli_lowrank_says_it_folded_the_biases_unless_asked_to_keep_them(tmp_path, capsys):
    from onnxpress.cli import main

    src = tmp_path / "pair.onnx"
    onnx.save(graphs.gemm(k=64, n=64), src)  # one Gemm with a bias: split at rank 4, 64 >= 3 * 5
    assert main(["lowrank", str(src), "-o", str(tmp_path / "a.onnx"), "--rank", "4", "-q"]) == 0
    assert "folded the bias of 1 split layer(s) into the second factor" in capsys.readouterr().out
    assert main(["lowrank", str(src), "-o", str(tmp_path / "b.onnx"), "--rank", "4", "--keep-bias", "-q"]) == 0
    assert "folded the bias" not in capsys.readouterr().out
    x = {"X": graphs.rng(5).standard_normal((3, 64)).astype(np.float32)}
    a, b = (graphs.run(onnx.load(tmp_path / f), x)[0] for f in ("a.onnx", "b.onnx"))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    shapes = [sorted(tuple(i.dims) for i in onnx.load(tmp_path / f).graph.initializer if len(i.dims) == 2)
              for f in ("a.onnx", "b.onnx")]
    assert shapes == [[(5, 64), (64, 5)], [(4, 64), (64, 4)]]  # [V; b] behind [U, 0]; the plain rank-4 factors


def test_near_the_floor_of_the_ranks_lowrank_keeps_its_split_and_folds_what_fits():
    """At 0.17 of the transformer's MACs (every layer at rank 8 leaves 0.165) no room for the columns can be made by
    splitting again: the split stands, two columns fit, the others are named as left."""
    from pathlib import Path

    import onnxpress

    model = Path(__file__).resolve().parents[1] / "models" / "transformer.onnx"
    res = onnxpress.lowrank(str(model), flops=0.17, multiple=8)
    assert res.macs_after <= 0.17 * res.macs_before
    left = [n for n in res.notes if "bias left on the wide output" in n]
    assert res.biases_folded >= 1 and left
    assert res.biases_folded + len(left) == sum(1 for lay in res.layers if lay.rank is not None and lay.skipped is None
                                                and lay.shape[0] >= MIN_RATIO * (lay.rank + 1))


def test_bias_free_layers_claim_no_room_in_the_budget():
    """LLaMA-style projections have no bias: nothing to fold, so lowrank splits exactly as with fold_bias=False."""
    import onnxpress

    g = graphs.rng(2)
    model = graphs.make_model(
        [helper.make_node("MatMul", ["X", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["Y"])],
        [("X", ["batch", 64])], [("Y", ["batch", 64])],
        {"W1": g.standard_normal((64, 256)).astype(np.float32), "W2": g.standard_normal((256, 64)).astype(np.float32)},
    )
    folded = onnxpress.lowrank(model, flops=0.5)
    plain = onnxpress.lowrank(model, flops=0.5, fold_bias=False)
    assert folded.biases_folded == 0 and not [n for n in folded.notes if "bias left" in n]
    assert [lay.rank for lay in folded.layers] == [lay.rank for lay in plain.layers]
    assert folded.model.SerializeToString() == plain.model.SerializeToString()


def test_the_lowrank_table_counts_the_folded_pairs_as_the_written_graph_computes():
    """x[64] -> Gemm(32) -> Relu -> Gemm(10) at rank 8: the fold's zero column in the first factor is multiplied too.

    The row read 2,048 -> 800 MACs and 2,080 -> 800 params where the graph holds 576 + 288 MACs and 873 params.
    """
    import onnxpress
    from onnxpress.passes.flops import count_macs, count_params

    r = graphs.rng(4)
    model = graphs.make_model(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2")],
        [("x", ["batch", 64])], [("y", ["batch", 10])],
        {"w1": r.standard_normal((64, 32)).astype(np.float32), "b1": r.standard_normal(32).astype(np.float32),
         "w2": r.standard_normal((32, 10)).astype(np.float32), "b2": r.standard_normal(10).astype(np.float32)})
    res = onnxpress.lowrank(model, rank=8)
    fc1 = next(lay for lay in res.layers if lay.key == "fc1")
    assert res.biases_folded == 1 and fc1.macs_after == 64 * 9 + 9 * 32 and fc1.params_after == 64 * 9 + 9 + 9 * 32
    assert res.macs_after == sum(count_macs(res.model).values()) == 64 * 9 + 9 * 32 + 32 * 10
    assert res.params_after == sum(count_params(res.model).values()) == sum(lay.params_after for lay in res.layers)
