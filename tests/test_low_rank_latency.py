"""Latency-steered MACs budget of SplitLowRank, and onnxpress.lowrank's layer timing (measure_latency)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxpress
from onnxpress.cli import main
from onnxpress.errors import UnsupportedModelError
from onnxpress.lowrank import measure_latency
from onnxpress.passes.flops import count_macs, shapes_at
from onnxpress.passes.low_rank import SplitLowRank
from onnxpress.pipeline import run_passes
from tests import graphs

T = 5  # tokens per sample


def _two_matmuls(seed: int = 3):
    """X[b,5,64] -> MatMul(W1[64,64]) -> Relu -> MatMul(W2[64,64]) -> Y[b,5,64].

    W1 is nearly rank 8 (cheap to split by energy), W2 is a dense random matrix.
    """
    r = graphs.rng(seed)
    w1 = r.standard_normal((64, 8)) @ r.standard_normal((8, 64)) + 0.01 * r.standard_normal((64, 64))
    w2 = r.standard_normal((64, 64))
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["Y"])]
    return graphs.make_model(nodes, [("X", ["b", T, 64])], [("Y", ["b", T, 64])],
                             {"W1": w1.astype(np.float32), "W2": w2.astype(np.float32)})


# a split of "h" never saves time; "Y" gets faster with lower ranks, except r = 8 (slower than 16)
SLOW_H = {None: 1.0, 8: 1.2, 16: 1.3, 24: 1.4, 32: 1.5, 40: 1.6, 48: 1.7, 56: 1.8, 64: 1.9}
FAST_Y = {None: 1.0, 8: 0.6, 16: 0.5, 24: 0.7, 32: 0.9, 40: 1.1, 48: 1.2, 56: 1.3, 64: 1.4}
LATENCY = {"h": SLOW_H, "Y": FAST_Y}


def _ranks(split: SplitLowRank) -> dict[str, int | None]:
    return {rep.key: rep.rank for rep in split.report}


def test_macs_mode_cuts_the_compressible_layer_but_latency_mode_the_one_that_saves_time():
    """Same MACs budget: by MACs the near-rank-8 W1 goes first; by time W1 stays whole (never faster)."""
    by_macs = SplitLowRank(flops=0.75, multiple=8)
    run_passes(_two_matmuls(), [by_macs])
    assert _ranks(by_macs)["h"] is not None and _ranks(by_macs)["Y"] is None

    by_time = SplitLowRank(flops=0.75, multiple=8, latency=LATENCY)
    out = run_passes(_two_matmuls(), [by_time]).model
    assert _ranks(by_time) == {"h": None, "Y": 16}
    assert {rep.key: rep.skipped for rep in by_time.report}["h"] == "no split was measured faster than the whole layer"
    before, after = by_time.macs
    assert before == 2 * T * 64 * 64
    assert after <= 0.75 * before
    assert sum(count_macs(out).values()) == after  # the report's count is the graph's count


def test_latency_budget_is_met_exactly_at_several_budgets():
    """Whatever the budget the table allows, the split model's MACs (counted on the graph) fit it."""
    table = {"h": {r: 1.0 - (64 - (r or 64)) / 80 for r in [None, *range(8, 65, 8)]}, "Y": FAST_Y}
    for flops in (0.9, 0.75, 0.6):
        split = SplitLowRank(flops=flops, multiple=8, latency=table)
        out = run_passes(_two_matmuls(), [split]).model
        total = sum(count_macs(out).values())
        assert total == split.macs[1] <= flops * split.macs[0], flops


def test_latency_mode_is_deterministic():
    """Same model, same table: the same ranks and byte-identical models."""
    runs = []
    for _ in range(2):
        split = SplitLowRank(flops=0.75, multiple=8, latency={k: dict(v) for k, v in LATENCY.items()})
        model = run_passes(_two_matmuls(), [split]).model
        runs.append((_ranks(split), model.SerializeToString()))
    assert runs[0] == runs[1]


def test_a_rank_slower_than_a_larger_one_is_never_offered():
    """Y at r=8 (0.6 s) is slower than at r=16 (0.5 s): a budget that needs r=8 cannot be met by time."""
    need_r8 = (64 * 64 + 8 * 128) / (2 * 64 * 64)  # h whole, Y at rank 8
    with pytest.raises(UnsupportedModelError, match="measured faster"):
        run_passes(_two_matmuls(), [SplitLowRank(flops=need_r8, multiple=8, latency=LATENCY)])
    # by MACs the same budget is met, with Y at rank 8 or h cut
    split = SplitLowRank(flops=need_r8, multiple=8)
    run_passes(_two_matmuls(), [split])
    assert split.macs[1] <= need_r8 * split.macs[0]


def test_missing_latency_for_a_candidate_layer_names_it():
    with pytest.raises(UnsupportedModelError, match="no latency measured for layer 'h'"):
        run_passes(_two_matmuls(), [SplitLowRank(flops=0.75, multiple=8, latency={"Y": FAST_Y})])


@pytest.mark.parametrize("kwargs", [
    {"rank": 8, "latency": LATENCY},  # latency only steers a flops budget
    {"flops": 0.5, "latency": {"h": {None: 1.0, 8: 0.0}}},
    {"flops": 0.5, "latency": {"h": {None: float("nan")}}},
])
def test_bad_latency_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        SplitLowRank(**kwargs)


def test_measure_latency_times_every_candidate_once_per_shape():
    """Both layers are 64x64 MatMuls on [2,5,64]: one measurement, every grid rank, positive seconds."""
    table = measure_latency(_two_matmuls(), batch=2, threads=1, multiple=16, rounds=2)
    assert set(table) == {"h", "Y"}
    assert set(table["h"]) == {None, 16, 32, 48, 64}
    assert table["h"] == table["Y"]
    assert all(np.isfinite(v) and v > 0 for v in table["h"].values())


def _expanded_constant():
    """C[1,64] expanded to [b, 64] through the Shape -> Concat -> Equal -> Where chain a legacy torch export of
    ``cls.expand(B, -1, -1)`` writes -> MatMul(W[64,64]) -> Y. onnx's inference loses the MatMul input's batch;
    onnxruntime's symbolic inference does not."""

    nodes = [helper.make_node("Shape", ["X"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Equal", ["target", "minus1s"], ["auto"]),
             helper.make_node("Where", ["auto", "ones", "target"], ["shape"]),
             helper.make_node("Expand", ["C", "shape"], ["cx"]), helper.make_node("MatMul", ["cx", "W"], ["Y"])]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus1": np.array([-1], np.int64),
             "minus1s": np.array([-1, -1], np.int64), "ones": np.array([1, 1], np.int64),
             "C": np.ones((1, 64), np.float32), "W": graphs.rng(4).standard_normal((64, 64)).astype(np.float32)}
    model = graphs.make_model(nodes, [("X", ["b", 64])], [("Y", ["b", 64])], inits)
    assert shapes_at(model, 2)["cx"] == (None, 64) and shapes_at(model, 2, need=["cx"])["cx"] == (2, 64)
    return model


def test_measure_latency_takes_onnxruntimes_shapes_where_onnx_loses_them():
    """A legacy export of scaled_dot_product_attention (cls token expanded to the batch) once failed here with
    "its input shape is unknown at batch 64" though count_macs, and so lowrank without timing, read the shape."""
    table = measure_latency(_expanded_constant(), batch=2, threads=1, multiple=16, rounds=1)
    assert set(table) == {"Y"} and all(np.isfinite(v) and v > 0 for v in table["Y"].values())


def _wide_matmul():
    """X[b,16,256] -> MatMul(W[256,256]) -> Y: a split at rank 32 or 64 is a quarter or half the MACs."""
    w = graphs.rng(5).standard_normal((256, 256)).astype(np.float32)
    return graphs.make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [("X", ["b", 16, 256])],
                             [("Y", ["b", 16, 256])], {"W": w})


def test_lowrank_by_latency_meets_the_budget_and_reports_layer_seconds():
    result = onnxpress.lowrank(_wide_matmul(), flops=0.6, multiple=32, by_latency=True, latency_batch=16)
    assert result.macs_after <= 0.8 * result.macs_before
    assert sum(count_macs(result.model).values()) == result.macs_after
    before, after = result.layer_seconds
    assert 0 < after < before


def test_lowrank_latency_arguments_are_checked():
    with pytest.raises(ValueError, match="flops"):
        onnxpress.lowrank(_two_matmuls(), rank=8, by_latency=True)
    with pytest.raises(ValueError, match="not both"):
        onnxpress.lowrank(_two_matmuls(), flops=0.5, by_latency=True, latency=LATENCY)


def test_cli_by_latency_prints_the_timed_layers(tmp_path, capsys):
    src, out = tmp_path / "wide.onnx", tmp_path / "split.onnx"
    src.write_bytes(_wide_matmul().SerializeToString())
    code = main(["lowrank", str(src), "-o", str(out), "--flops", "0.6", "--multiple", "32", "--by-latency",
                 "--latency-batch", "16", "-q"])
    assert code == 0 and out.is_file()
    assert "timed layers at batch 16, 1 thread(s):" in capsys.readouterr().out


def test_cli_by_latency_without_flops_is_one_line(tmp_path, capsys):
    src = tmp_path / "wide.onnx"
    src.write_bytes(_wide_matmul().SerializeToString())
    assert main(["lowrank", str(src), "-o", str(tmp_path / "o.onnx"), "--rank", "8", "--by-latency", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--flops" in err[0]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("latency", [None, LATENCY])
@pytest.mark.parametrize("flops", [0.3, 0.45, 0.6, 0.75, 0.9])
def test_budget_overshoot_is_given_back(flops, latency):
    """After the greedy, no split layer could move to its next larger offered rank and still fit the budget."""
    split = SplitLowRank(flops=flops, multiple=8, latency=latency)
    try:
        run_passes(_two_matmuls(), [split])
    except UnsupportedModelError:
        assert latency is not None  # by time only Y may be cut, down to r = 16 (0.625 of the MACs)
        assert flops < 0.625
        return
    before, after = split.macs
    budget = flops * before

    def cost(key, r):
        return T * 64 * 64 if r is None else T * r * 128

    def offered(key):
        """The ranks the pass offers for this layer (walking down from full rank), ascending, then whole."""
        out, last_cost = [], cost(key, None)
        last_time = latency[key][None] if latency else 0.0
        for r in range(64, 0, -8):
            t = latency[key][r] if latency else 0.0
            if cost(key, r) < last_cost and (latency is None or t < last_time):
                out.append(r)
                last_cost, last_time = cost(key, r), t
        return [*sorted(out), None]

    assert after <= budget
    for rep in split.report:
        if rep.rank is None:
            continue
        options = offered(rep.key)
        larger = options[options.index(rep.rank) + 1]
        assert after - cost(rep.key, rep.rank) + cost(rep.key, larger) > budget, (rep.key, rep.rank, larger)


def test_latency_step_macs_ranks_steps_by_macs_among_the_faster_splits():
    """h saves ~1e-9 s per split, Y saves half its time: by time Y is cut; by MACs (both faster) h is."""
    barely = {None: 1.0, **{r: 1.0 - 1e-9 * (72 - r) / 8 for r in range(8, 65, 8)}}
    table = {"h": barely, "Y": FAST_Y}
    by_time = SplitLowRank(flops=0.75, multiple=8, latency=table)
    run_passes(_two_matmuls(), [by_time])
    assert _ranks(by_time) == {"h": None, "Y": 16}
    by_macs = SplitLowRank(flops=0.75, multiple=8, latency=table, latency_step="macs")
    run_passes(_two_matmuls(), [by_macs])
    assert _ranks(by_macs)["h"] is not None and _ranks(by_macs)["Y"] is None
    assert by_macs.macs[1] <= 0.75 * by_macs.macs[0]
    with pytest.raises(ValueError, match="latency_step"):
        SplitLowRank(flops=0.75, latency=table, latency_step="seconds")


def _qkv(seed: int = 9):
    """X[b,5,32] -> three MatMul(W_i[32,32]) siblings (Q, K, V of one attention input) -> Y0, Y1, Y2."""
    r = graphs.rng(seed)
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"], name=f"p{i}") for i in range(3)]
    return graphs.make_model(nodes, [("X", ["b", T, 32])], [(f"Y{i}", ["b", T, 32]) for i in range(3)],
                             {f"W{i}": r.standard_normal((32, 32)).astype(np.float32) for i in range(3)})


def test_measure_latency_times_joint_units_under_their_joined_key():
    """joint=True adds one row for the three siblings, ranks up to min(96, 32), besides the single layers."""
    table = measure_latency(_qkv(), batch=2, threads=1, multiple=16, rounds=2, joint=True)
    assert set(table) == {"p0", "p1", "p2", "p0+p1+p2"}
    assert set(table["p0+p1+p2"]) == {None, 16, 32}
    assert all(np.isfinite(v) and v > 0 for v in table["p0+p1+p2"].values())


def test_lowrank_joint_by_latency_meets_the_budget_with_one_shared_first_factor():
    """The unit is steered by its own measured times; the budget holds on the graph; one first factor is shared."""
    table = {"p0+p1+p2": {None: 1.0, 8: 0.3, 16: 0.5, 24: 0.7, 32: 1.2}}
    result = onnxpress.lowrank(_qkv(), flops=0.5, multiple=8, joint=True, latency=table)
    (rep,) = result.layers
    # 0.5 · 3·32·32 = 1536 MACs per token: rank 8 (8·(32+96) = 1024) fits, rank 16 (2048) does not
    assert rep.members == ("p0", "p1", "p2") and rep.rank == 8
    assert sum(count_macs(result.model).values()) == result.macs_after <= 0.5 * result.macs_before
    firsts = [n for n in result.model.graph.node if n.input[0] == "X"]
    assert len(firsts) == 1 and result.layer_seconds == (1.0, 0.3)
