"""SplitLowRank / SplitGemmLowRank / SplitConvLowRank: exact at full rank, MACs, rank selection, data-aware."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxpress.calibration.moments import SecondMomentObserver
from onnxpress.errors import UnsupportedModelError
from onnxpress.passes.flops import count_macs
from onnxpress.passes.low_rank import SplitConvLowRank, SplitGemmLowRank, SplitLowRank
from onnxpress.pipeline import import_graph, run_passes
from tests import graphs


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


def _sqnr(y: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((y - ref).astype(np.float64) ** 2)))


def gemm_model(k: int, n: int, trans_a: int, trans_b: int, bias: bool, seed: int = 0):
    """X[batch,k] (or [k,batch] with transA) -> Gemm(W, B?, alpha=0.5, beta=2) -> Y[batch,n]."""
    r = graphs.rng(seed)
    inits = {"W": r.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)}
    ins = ["X", "W"]
    if bias:
        inits["B"] = r.standard_normal(n).astype(np.float32)
        ins.append("B")
    node = helper.make_node("Gemm", ins, ["Y"], transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0)
    x_shape = [k, 5] if trans_a else [5, k]
    return graphs.make_model([node], [("X", x_shape)], [("Y", [5, n])], inits)


def matmul_model(k: int = 8, n: int = 6, w: np.ndarray | None = None, seed: int = 0):
    """X[batch,T=5,k] -> MatMul(W[k,n]) -> Add(b) -> Y[batch,5,n]."""
    r = graphs.rng(seed)
    w = r.standard_normal((k, n)).astype(np.float32) if w is None else w
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["Y"])]
    return graphs.make_model(nodes, [("X", ["batch", 5, k])], [("Y", ["batch", 5, n])],
                             {"W": w, "b": r.standard_normal(n).astype(np.float32)})


def _conv_out(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - (k - 1) * d - 1) // s + 1


def conv_model(c_in, c_out, k, stride, pads, dil, group, bias=True, size=(9, 10), seed=0):
    """X[N,c_in,H,W] -> Conv(W[c_out, c_in/group, k, k], B?) -> Y."""
    r = graphs.rng(seed)
    inits = {"W": r.standard_normal((c_out, c_in // group, k, k)).astype(np.float32)}
    ins = ["X", "W"]
    if bias:
        inits["B"] = r.standard_normal(c_out).astype(np.float32)
        ins.append("B")
    ho = _conv_out(size[0], k, stride[0], pads[0], pads[2], dil[0])
    wo = _conv_out(size[1], k, stride[1], pads[1], pads[3], dil[1])
    node = helper.make_node("Conv", ins, ["Y"], strides=list(stride), pads=list(pads), dilations=list(dil), group=group)
    return graphs.make_model([node], [("X", ["N", c_in, *size])], [("Y", ["N", c_out, ho, wo])], inits)


# ---------------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_full_rank_split_is_exact(trans_a, trans_b, bias):
    """X -> Gemm(W, B, transA, transB, alpha, beta) -> Y  ==>  Gemm -> Gemm, same outputs."""
    model = gemm_model(8, 6, trans_a, trans_b, bias)
    x = graphs.rng(1).standard_normal((8, 5) if trans_a else (5, 8)).astype(np.float32)
    split = SplitGemmLowRank(rank=6, only_if_cheaper=False)
    result = run_passes(model, [split])
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Gemm"]
    assert split.report[0].rank == 6 and split.report[0].energy == pytest.approx(1.0)
    _close(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])


def test_batched_matmul_full_rank_split_is_exact():
    """X[2,5,8] -> MatMul(W[8,6]) -> Add -> Y  ==>  MatMul -> MatMul -> Add."""
    model = matmul_model()
    x = graphs.rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    result = run_passes(model, [SplitLowRank(rank=6, only_if_cheaper=False)])
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul", "Add"]
    _close(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])


def test_weight_of_rank_r_split_at_rank_r_is_exact():
    """W[32,24] = A[32,3]·B[3,24]: the rank-3 split reproduces the outputs and cuts MACs."""
    r = graphs.rng(3)
    w = (r.standard_normal((32, 3)) @ r.standard_normal((3, 24))).astype(np.float32)
    model = matmul_model(32, 24, w=w)
    x = r.standard_normal((2, 5, 32)).astype(np.float32)
    split = SplitLowRank(rank=3)
    result = run_passes(model, [split])
    assert split.report[0].rank == 3
    assert split.report[0].macs_after == 5 * 3 * (32 + 24) < split.report[0].macs_before == 5 * 32 * 24
    _close(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])


def test_factors_share_the_singular_values_evenly():
    """sqrt(S) in both factors: the two weights have equal Frobenius norms."""
    model = matmul_model(16, 12)
    result = run_passes(model, [SplitLowRank(rank=4)])
    inits = {i.name: i for i in result.model.graph.initializer}
    from onnx import numpy_helper

    norms = [np.linalg.norm(numpy_helper.to_array(inits[n])) for n in inits if "lowrank" in n]
    assert len(norms) == 2
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


@settings(max_examples=12, deadline=None)
@given(
    k=st.sampled_from([1, 2, 3]),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    pads=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    dil=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    group=st.sampled_from([1, 2]),
    bias=st.booleans(),
    tucker=st.booleans(),
)
def test_conv_full_rank_split_is_exact(k, stride, pads, dil, group, bias, tucker):
    """Conv(stride, pads, dilation, group) ==> k×k(r) -> 1×1 (or Tucker-2) reproduces outputs."""
    model = conv_model(4, 6, k, stride, pads, dil, group, bias)
    x = graphs.rng(5).standard_normal((2, 4, 9, 10)).astype(np.float32)
    split = SplitConvLowRank(rank=64, only_if_cheaper=False, conv_method="tucker2" if tucker else "channel")
    result = run_passes(model, [split])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv"] * (3 if tucker and group == 1 else 2)
    _close(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])


def test_conv_low_rank_weight_split_at_its_rank_is_exact():
    """Conv W[16,8,3,3] of rank 2 (as a 16 × 72 matrix) split at rank 2: exact and cheaper."""
    r = graphs.rng(7)
    model = conv_model(8, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    w = (r.standard_normal((16, 2)) @ r.standard_normal((2, 72))).reshape(16, 8, 3, 3).astype(np.float32)
    model.graph.initializer[0].CopyFrom(__import__("onnx").numpy_helper.from_array(w, "W"))
    x = r.standard_normal((2, 8, 9, 10)).astype(np.float32)
    split = SplitConvLowRank(rank=2)
    result = run_passes(model, [split])
    assert split.report[0].rank == 2 and split.report[0].skipped is None
    _close(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])


# ---------------------------------------------------------------------------------------------
# MACs accounting
# ---------------------------------------------------------------------------------------------


def test_macs_match_hand_computed_values():
    """X[b,8] -> Gemm(W[8,6]) ; Conv 4->8 g2 3x3 s(2,1) p(1,0,1,2) d(1,2) on 9x10 -> 5x8."""
    split = SplitGemmLowRank(rank=2)
    run_passes(graphs.gemm(k=8, n=6), [split])
    assert split.macs == (8 * 6, 2 * (8 + 6))
    conv = conv_model(4, 8, 3, (2, 1), (1, 0, 1, 2), (1, 2), 2)
    assert sum(count_macs(import_graph(conv)).values()) == (5 * 8) * 8 * (2 * 3 * 3)
    split = SplitConvLowRank(rank=2)
    run_passes(conv, [split])
    rep = split.report[0]
    assert rep.shape == (4, 18) and rep.groups == 2
    assert rep.macs_after == (5 * 8) * 2 * 2 * (4 + 18)  # positions · groups · r · (m + n)
    assert rep.params_after == 2 * 2 * (4 + 18) + 8
    assert split.macs == (5760, 5760 - rep.macs_before + rep.macs_after)


def test_macs_count_activation_matmul_and_tucker_cost():
    """Q = X·Wq ; S = Q·Xᵀ (activation × activation, counted, not split); Tucker-2 cost by hand."""
    r = graphs.rng(0)
    nodes = [
        helper.make_node("MatMul", ["X", "Wq"], ["Q"]),
        helper.make_node("Transpose", ["X"], ["Xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["Q", "Xt"], ["Y"]),
    ]
    model = graphs.make_model(nodes, [("X", ["b", 7, 4])], [("Y", ["b", 7, 7])],
                              {"Wq": r.standard_normal((4, 4)).astype(np.float32)})
    assert sum(count_macs(model).values()) == 7 * 4 * 4 + 7 * 7 * 4
    conv = conv_model(8, 12, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1)  # 9x10 -> 5x5
    split = SplitConvLowRank(rank=3, conv_method="tucker2")
    run_passes(conv, [split])
    rep = split.report[0]
    assert rep.method == "tucker2"
    assert rep.macs_before == 25 * 12 * 8 * 9
    assert rep.macs_after == 90 * 8 * 3 + 25 * (3 * 3 * 9 + 3 * 12)  # 1x1 at input res, core, 1x1


# ---------------------------------------------------------------------------------------------
# rank selection and declines
# ---------------------------------------------------------------------------------------------


def test_energy_picks_the_smallest_rank_that_keeps_it():
    model = matmul_model(24, 20, seed=4)
    w = __import__("onnx").numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    s2 = np.linalg.svd(w, compute_uv=False) ** 2
    kept = np.cumsum(s2) / s2.sum()
    want = int(np.argmax(kept >= 0.6)) + 1
    split = SplitLowRank(energy=0.6)
    run_passes(model, [split])
    assert split.report[0].rank == want
    assert split.report[0].energy == pytest.approx(kept[want - 1])


def test_ranks_are_rounded_up_to_the_multiple():
    split = SplitLowRank(rank=5, multiple=4)
    run_passes(matmul_model(32, 32), [split])
    assert split.report[0].rank == 8


def test_layer_where_split_does_not_pay_is_skipped_with_reason():
    """W[8,6]: m·n/(m+n) = 3.43, so rank 4 would cost more than the layer."""
    split = SplitLowRank(rank=4)
    result = run_passes(matmul_model(8, 6), [split])
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    assert split.report[0].skipped and "m·n/(m+n) = 3.4" in split.report[0].skipped
    assert any("would not reduce MACs" in note for note in result.notes)


def test_depthwise_shared_and_dynamic_weights_are_declined():
    """Depthwise Conv, a weight used by two MatMuls, and a weight fed as a graph input are kept."""
    r = graphs.rng(0)
    dw = graphs.make_model(
        [helper.make_node("Conv", ["X", "W"], ["Y"], group=4, pads=[1, 1, 1, 1])],
        [("X", ["N", 4, 6, 6])], [("Y", ["N", 4, 6, 6])], {"W": r.standard_normal((4, 1, 3, 3)).astype(np.float32)},
    )
    shared = graphs.make_model(
        [helper.make_node("MatMul", ["X", "W"], ["A"]), helper.make_node("MatMul", ["A", "W"], ["Y"])],
        [("X", ["b", 16])], [("Y", ["b", 16])], {"W": r.standard_normal((16, 16)).astype(np.float32)},
    )
    dynamic = graphs.make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [("X", ["b", 16]), ("W", [16, 16])],
                                [("Y", ["b", 16])])
    for model, why in ((dw, "depthwise"), (shared, "shared with 2 nodes"), (dynamic, "not a constant")):
        split = SplitLowRank(rank=1)
        result = run_passes(model, [split])
        assert not result.modified
        assert any(why in (rep.skipped or "") for rep in split.report), split.report


def _two_layer_mlp():
    """X[b,64] -> MatMul(W1[64,64]) -> Relu -> MatMul(W2[64,48]) -> Y[b,48]; W1 nearly rank 8."""
    r = graphs.rng(11)
    w1 = (r.standard_normal((64, 8)) @ r.standard_normal((8, 64)) + 0.05 * r.standard_normal((64, 64)))
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["Y"])]
    return graphs.make_model(nodes, [("X", ["b", 64])], [("Y", ["b", 48])],
                             {"W1": w1.astype(np.float32), "W2": r.standard_normal((64, 48)).astype(np.float32)})


def test_flops_budget_is_met_and_spent_on_the_compressible_layer():
    model = _two_layer_mlp()
    split = SplitLowRank(flops=0.6, multiple=2)
    run_passes(model, [split])
    before, after = split.macs
    assert before == 64 * 64 + 64 * 48
    assert after <= 0.6 * before
    reps = {rep.key: rep for rep in split.report}
    assert reps["h"].rank is not None and reps["h"].energy > 0.99  # the near-rank-8 layer is cut first
    assert reps["Y"].rank is None and reps["Y"].skipped == "left whole by the MACs budget"


def test_unreachable_flops_budget_raises():
    with pytest.raises(UnsupportedModelError, match="cannot be met"):
        run_passes(_two_layer_mlp(), [SplitLowRank(flops=0.01, multiple=8)])


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.5}, {"rank": 0}, {"energy": 1.5}, {"flops": 0.0},
                                    {"rank": 2, "multiple": 0}, {"rank": 2, "conv_method": "cp"}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        SplitLowRank(**kwargs)


# ---------------------------------------------------------------------------------------------
# data-aware
# ---------------------------------------------------------------------------------------------


def _anisotropic(seed: int, n: int = 2000, k: int = 32) -> np.ndarray:
    mix = graphs.rng(99).standard_normal((k, k)) * np.logspace(0, -2, k)
    return (graphs.rng(seed).standard_normal((n, 5, k)) @ mix.T).astype(np.float32)


def test_whitened_svd_beats_plain_svd_on_held_out_output_sqnr():
    """Inputs with a decaying spectrum: the data-aware split keeps >= 3 dB more output SQNR at rank 8."""
    model = matmul_model(32, 32, seed=2)
    obs = SecondMomentObserver()
    obs.update(_anisotropic(1, 400))
    x = _anisotropic(2, 400)
    ref = graphs.run(model, {"X": x})[0]
    sq = {}
    for name, moments in (("plain", None), ("aware", {"h": obs.compute()})):
        split = SplitLowRank(rank=8, moments=moments)
        result = run_passes(model, [split])
        assert split.report[0].method == ("whitened-svd" if moments else "svd")
        sq[name] = _sqnr(graphs.run(result.model, {"X": x})[0], ref)
    assert sq["aware"] >= sq["plain"] + 3.0, sq


def test_whitened_split_with_rank_deficient_moment_is_exact_at_full_rank():
    """C of rank 4 (inputs in a 4-D subspace): the ridge keeps the full-rank split exact for any input."""
    model = matmul_model(12, 10, seed=6)
    obs = SecondMomentObserver()
    basis = graphs.rng(1).standard_normal((4, 12))
    obs.update((graphs.rng(2).standard_normal((300, 4)) @ basis).astype(np.float32))
    assert np.linalg.matrix_rank(obs.compute()) == 4
    split = SplitLowRank(rank=10, moments={"h": obs.compute()}, only_if_cheaper=False)
    result = run_passes(model, [split])
    x = graphs.rng(3).standard_normal((2, 5, 12)).astype(np.float32)  # off the subspace too
    _close(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])


def test_moment_of_wrong_shape_is_refused():
    with pytest.raises(UnsupportedModelError, match="expected"):
        run_passes(matmul_model(8, 6), [SplitLowRank(rank=2, moments={"h": np.eye(5)})])


# ---------------------------------------------------------------------------------------------
# joint split of sibling layers (one input, several weights: attention's Q/K/V)
# ---------------------------------------------------------------------------------------------


def siblings_model(k: int = 8, ns: tuple[int, ...] = (6, 6, 4), ws: list[np.ndarray] | None = None, seed: int = 0):
    """X[batch,5,k] -> MatMul(W_i[k,n_i]) -> Add(b_i) -> Y_i[batch,5,n_i] for each i (three siblings)::

        X ──┬─ MatMul(W0) ─ Add ─ Y0
            ├─ MatMul(W1) ─ Add ─ Y1
            └─ MatMul(W2) ─ Add ─ Y2
    """
    r = graphs.rng(seed)
    ws = ws if ws is not None else [r.standard_normal((k, n)).astype(np.float32) for n in ns]
    nodes, inits = [], {}
    for i, w in enumerate(ws):
        nodes += [helper.make_node("MatMul", ["X", f"W{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"Y{i}"])]
        inits[f"W{i}"], inits[f"b{i}"] = w, r.standard_normal(w.shape[1]).astype(np.float32)
    outs = [(f"Y{i}", ["batch", 5, w.shape[1]]) for i, w in enumerate(ws)]
    return graphs.make_model(nodes, [("X", ["batch", 5, k])], outs, inits)


def test_joint_full_rank_split_is_exact_and_shares_one_first_factor():
    """Stacked [W0; W1; W2] (16x8) at full rank 8: one MatMul(X, Bᵀ) feeds three second factors, outputs equal."""
    model = siblings_model()
    x = graphs.rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    split = SplitLowRank(rank=8, only_if_cheaper=False, joint=True)
    result = run_passes(model, [split])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("MatMul") == 4 and ops.count("Add") == 3
    # the shared first factor is named after the first member, so name prefixes still find it
    assert [n.name for n in result.model.graph.node if n.input[0] == "X"] == ["mm0_lowrank_joint_in"]
    (rep,) = split.report
    assert rep.members == ("mm0", "mm1", "mm2") and rep.key == "mm0+mm1+mm2"
    assert rep.shape == (16, 8) and rep.rank == 8 and rep.energy == pytest.approx(1.0)
    assert rep.macs_before == 5 * 8 * 16 and rep.macs_after == 5 * 8 * (16 + 8)
    assert sum(count_macs(result.model).values()) == rep.macs_after
    for got, want in zip(graphs.run(result.model, {"X": x}), graphs.run(model, {"X": x}), strict=True):
        _close(got, want)


def test_joint_split_of_weights_sharing_a_rank_3_row_space_is_exact_at_rank_3():
    """W_i = B·A_i with one B[12,3]: jointly rank 3 (separately each rank 3 too, at 3× the first-factor MACs)."""
    r = graphs.rng(4)
    b = r.standard_normal((12, 3))
    ws = [(b @ r.standard_normal((3, n))).astype(np.float32) for n in (12, 12, 12)]
    model = siblings_model(12, ws=ws)
    x = r.standard_normal((2, 5, 12)).astype(np.float32)
    joint, separate = SplitLowRank(rank=3, joint=True), SplitLowRank(rank=3)
    out_joint = run_passes(model, [joint]).model
    run_passes(model, [separate])
    assert joint.macs[1] == 5 * 3 * (12 + 36) < separate.macs[1] == 3 * 5 * 3 * (12 + 12)
    for got, want in zip(graphs.run(out_joint, {"X": x}), graphs.run(model, {"X": x}), strict=True):
        _close(got, want)


def test_joint_loss_is_the_sum_of_the_members_noise_to_signal_ratios():
    """The budget's loss of a joint unit equals Σ_i ‖W_i − A_i B‖² / ‖A_i B‖² from the built factors."""
    from onnxpress.passes.low_rank import _svd

    r = graphs.rng(6)
    ws = [r.standard_normal((n, 10)) * scale for n, scale in ((10, 1.0), (10, 3.0), (6, 0.2))]
    stacked = np.concatenate(ws, 0)
    for moment in (None, np.cov(r.standard_normal((10, 200))) + 0.5):
        fac = _svd([stacked], moment, 1e-3)
        fac.rows = (10, 10, 6)
        c_half = np.eye(10)
        if moment is not None:  # (C + ridge·tr(C)/n·I)^½, the whitening the pass applies
            vals, vecs = np.linalg.eigh(moment + 1e-3 * np.trace(moment) / 10 * np.eye(10))
            c_half = (vecs * np.sqrt(vals)) @ vecs.T
        for rank in (2, 5, 9):
            (a,), (b,) = fac.factors(rank)
            want, start = 0.0, 0
            for w in ws:
                approx = a[start : start + len(w)] @ b
                start += len(w)
                want += np.sum(((w - approx) @ c_half) ** 2) / np.sum((approx @ c_half) ** 2)
            assert fac.loss(rank) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(("m", "n"), [(3, 40), (12, 64), (63, 64)])
def test_wide_whitened_factors_from_the_gram_matrix_equal_the_svd_of_w_times_c_half(m, n):
    """A wide layer (m < n) takes U and S from eigh(W (C + λI) Wᵀ); the reference is the SVD of W (C + λI)^½, with
    the square root from the eigendecomposition of C (rank deficient: a quarter of the inputs always zero)."""
    from onnxpress.passes.low_rank import _svd

    r = graphs.rng(m)
    x = r.standard_normal((5 * n, n)) * np.exp(r.standard_normal(n))
    x[:, : n // 4] = 0.0
    moment = x.T @ x / len(x)
    w = r.standard_normal((m, n))
    vals, vecs = np.linalg.eigh(moment + 1e-3 * np.trace(moment) / n * np.eye(n))
    u, s, _ = np.linalg.svd(w @ ((vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T), full_matrices=False)
    fac = _svd([w], moment, 1e-3)
    np.testing.assert_allclose(fac.s[0], s, rtol=1e-9, atol=1e-12 * s[0])
    for rank in (1, max(1, m // 2), m):
        (a,), (b,) = fac.factors(rank)
        np.testing.assert_allclose(a @ b, u[:, :rank] @ u[:, :rank].T @ w, atol=1e-9 * np.abs(w).max())
        assert fac.kept(rank) == pytest.approx(float(np.sum(s[:rank] ** 2) / np.sum(s**2)), rel=1e-9)


def test_joint_budget_is_met_on_the_graph_and_beats_separate_splits_here():
    """Three 32->32 siblings on one rank-12 input subspace plus noise, 50% MACs: separately r <= 8, jointly 12."""
    r = graphs.rng(7)
    b = r.standard_normal((32, 12))
    ws = [(b @ r.standard_normal((12, 32)) + 0.05 * r.standard_normal((32, 32))).astype(np.float32) for _ in range(3)]
    model = siblings_model(32, ws=ws)
    x = r.standard_normal((4, 5, 32)).astype(np.float32)
    ref = graphs.run(model, {"X": x})
    sqnr = {}
    for joint in (False, True):
        split = SplitLowRank(flops=0.5, multiple=4, joint=joint)
        out = run_passes(model, [split]).model
        assert sum(count_macs(out).values()) == split.macs[1] <= 0.5 * split.macs[0]
        ys = graphs.run(out, {"X": x})
        sqnr[joint] = _sqnr(np.concatenate([y.ravel() for y in ys]), np.concatenate([y.ravel() for y in ref]))
    assert sqnr[True] > sqnr[False] + 3


def test_only_compatible_siblings_are_joined():
    """Gemm siblings with different transA, and a Conv, are not joined; the two same-attribute Gemms are."""
    r = graphs.rng(8)
    inits = {f"W{i}": r.standard_normal((6, 6)).astype(np.float32) for i in range(3)}
    nodes = [helper.make_node("Gemm", ["X", "W0"], ["Y0"], name="g0"),
             helper.make_node("Gemm", ["X", "W1"], ["Y1"], name="g1", beta=0.5),
             helper.make_node("Gemm", ["X", "W2"], ["Y2"], name="g2", transA=1)]
    model = graphs.make_model(nodes, [("X", [6, 6])], [(f"Y{i}", [6, 6]) for i in range(3)], inits)
    from onnxpress.passes.low_rank import joint_units

    assert joint_units(import_graph(model)) == {"g0+g1": ("g0", "g1")}
    x = r.standard_normal((6, 6)).astype(np.float32)
    split = SplitLowRank(rank=6, only_if_cheaper=False, joint=True)
    out = run_passes(model, [split]).model
    assert sorted(rep.key for rep in split.report) == ["g0+g1", "g2"]
    for got, want in zip(graphs.run(out, {"X": x}), graphs.run(model, {"X": x}), strict=True):
        _close(got, want)
