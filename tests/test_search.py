"""Search: budget parsing, the estimate-driven greedy, the Pareto front, and measured budgets on a tiny CNN."""

from __future__ import annotations

import dataclasses
import math

import pytest

from onnxpress.errors import OnnxpressError
from onnxpress.optimize import optimize
from onnxpress.recipe import prepare
from onnxpress.search import Budget, Candidate, SearchSpace, pareto_front, parse_budget
from onnxpress.sensitivity import LayerInfo, OptionScore, SensitivityResult
from tests.test_sensitivity import tiny_cnn, tiny_data


def _sens() -> SensitivityResult:
    """Two layers: A (big, robust) and B (small, sensitive)."""
    layers = (LayerInfo("A", "Conv", 1000, 400, 20), LayerInfo("B", "Conv", 100, 100, 10))
    scores = (
        OptionScore("A", "int8", "int8", 40.0, 1000, 400, None, -1200),
        OptionScore("A", "rank", "rank10", 30.0, 500, 200, 10, -800),
        OptionScore("B", "int8", "int8", 20.0, 100, 100, None, -300),
        OptionScore("B", "rank", "rank5", 10.0, 50, 50, 5, -200),
    )
    return SensitivityResult(layers, scores, 8, "k")


def test_parse_budget():
    assert parse_budget("latency=0.3") == Budget("latency", 0.3)
    for bad, match in [("speed=0.5", "budget kind"), ("size", "look like"), ("flops=x", "not a number"),
                       ("size=0", r"fraction in \(0, 1\]"), ("size=1.5", "fraction")]:
        with pytest.raises(OnnxpressError, match=match):
            parse_budget(bad)


def test_greedy_meets_the_estimated_budget_with_least_noise():
    space = SearchSpace(_sens(), model_bytes=2000)
    picks = space.greedy("flops", 0.6)
    assert space.cost("flops", picks) <= 0.6
    # only splitting A reaches 0.6 (550/1100 = 0.5); B's split alone saves too little
    assert space.describe(picks)["A"].endswith("+r10") and "r5" not in space.describe(picks)["B"]
    assert space.greedy("flops", 0.01) is None  # cannot be met
    size = space.greedy("size", 0.5)  # bytes 2000 - 1200 = 800 with A int8 (NSR 1e-4): 0.4
    assert space.cost("size", size) <= 0.5
    assert space.describe(size) == {"A": "int8", "B": "fp32"}


def test_greedy_and_refine_meet_every_budget_given():
    space = SearchSpace(_sens(), model_bytes=2000)
    alone = space.greedy("flops", 0.6)
    assert space.cost("size", alone) > 0.45  # planned against flops alone, the size budget is missed
    both = space.greedy("flops", 0.6, also=[("size", 0.45)])
    assert space.cost("flops", both) <= 0.6 and space.cost("size", both) <= 0.45
    assert space.greedy("size", 0.45, also=[("flops", 0.6)]) == both  # the order does not matter here
    refined = space.refine("flops", 0.6, both, iterations=50, also=[("size", 0.45)])
    assert space.cost("flops", refined) <= 0.6 + 1e-12 and space.cost("size", refined) <= 0.45 + 1e-12
    assert space.est_sqnr(refined) >= space.est_sqnr(both)
    assert space.greedy("flops", 0.6, also=[("size", 0.01)]) is None  # cannot be met together


def test_refine_never_worsens_and_respects_budget():
    space = SearchSpace(_sens(), model_bytes=2000)
    start = space.greedy("size", 0.4)
    refined = space.refine("size", 0.4, start, iterations=50)
    assert space.cost("size", refined) <= 0.4 + 1e-12
    assert space.est_sqnr(refined) >= space.est_sqnr(start)


def test_pareto_front():
    pts = [Candidate((i,), 0, 0, sqnr_db=s, flops_ratio=c) for i, (c, s) in
           enumerate([(0.5, 20.0), (0.6, 18.0), (0.7, 30.0), (0.4, 10.0), (0.7, 25.0)])]
    front = pareto_front(pts, "flops")
    assert [(c.flops_ratio, c.sqnr_db) for c in front] == [(0.4, 10.0), (0.5, 20.0), (0.7, 30.0)]


@pytest.mark.parametrize("budget", ["flops=0.6", "size=0.6"])
def test_search_respects_a_measured_budget(tmp_path, budget):
    data = tiny_data(tmp_path / "d.npz")
    res = optimize(tiny_cnn(), tmp_path / "out.onnx", calib=data, budget=budget, cache_dir=tmp_path / "c",
                   eval_samples=32, sensitivity_samples=16)
    kind, value = budget.split("=")
    assert res.feasible and res.chosen.cost(kind) <= float(value)
    assert all(c.feasible == (c.cost(kind) <= float(value) + 1e-9) for c in res.candidates)
    # the chosen one is the best measured SQNR among those within the budget
    assert res.chosen.sqnr_db == max(c.sqnr_db for c in res.candidates if c.feasible)
    assert (tmp_path / "out.onnx").is_file() and res.recipe_path.is_file()
    assert res.pareto and all(math.isfinite(c.sqnr_db) for c in res.pareto)


def test_uniform_baseline_is_all_int8():
    space = SearchSpace(_sens(), model_bytes=2000)
    assert set(space.describe(space.uniform("int8")).values()) == {"int8"}
    assert space.describe(space.uniform("int8", 0.5)) == {"A": "int8+r10", "B": "int8+r5"}
    assert prepare(tiny_cnn()) is not None


def _sens_with_group() -> SensitivityResult:
    """The two layers of ``_sens`` plus channel group G (shared by A and B): pruning half saves 40% of MACs."""
    base = _sens()
    prune = (OptionScore("G", "prune", "prune0.5", 35.0, 660, 300, None, -700, 0.5, 8),
             OptionScore("G", "prune", "prune0.75", 5.0, 330, 150, None, -1000, 0.75, 12))
    return SensitivityResult(base.layers, base.scores + prune, 8, "k")


def test_prune_group_is_a_slot_in_cost_and_recipe():
    space = SearchSpace(_sens_with_group(), model_bytes=2000, prune_multiple=8)
    assert space.slots == ["A", "B", "group G"]
    assert [o.label for o in space.options[2]] == ["keep", "prune0.5", "prune0.75"]
    # flops 0.6: pruning G by half (noise 10^-3.5 for 440 MACs saved) beats splitting A (10^-3 for 500)
    # in noise per MAC saved; est cost = (1100 - 440) / 1100 = 0.6
    picks = space.greedy("flops", 0.6)
    assert space.cost("flops", picks) <= 0.6 + 1e-12
    assert space.describe(picks)["group G"] == "prune0.5"
    recipe = space.recipe(picks, finetune_epochs=2)
    assert [s["pass"] for s in recipe["steps"]] == ["prune", "finetune"]
    assert recipe["steps"][0] == {"pass": "prune", "ratio": {"G": 0.5}, "criterion": "l2", "multiple": 8}
    assert space.uniform("int8")[2] == 0 and len(space.uniform("int8")) == 3
    # the prune discount (assumed fine-tune recovery) only scales pruning's noise
    assert space.est_sqnr(picks) == pytest.approx(35.0)
    space.prune_discount = 0.01
    assert space.est_sqnr(picks) == pytest.approx(55.0)
    assert SearchSpace(_sens_with_group(), model_bytes=2000, prune=False).slots == ["A", "B"]
    assert space.describe(picks)["A"] in ("fp32", "int8")  # the group's label never hides a layer's


def test_measured_latency_of_options_steers_the_latency_greedy():
    """A split measured slower than the whole layer is not taken for latency; a pruned group's timed saving is."""
    base = _sens_with_group()
    timed = tuple(dataclasses.replace(s, latency_ratio={"rank": 1.05, "prune": 0.6}[s.family])
                  if s.family in ("rank", "prune") else s for s in base.scores)
    space = SearchSpace(SensitivityResult(base.layers, timed, 8, "k"), model_bytes=2000, int8_latency=0.5)
    rank_a = next(o for o in space.options[0] if o.rank and o.quant == "fp32")
    assert space.layer_cost("latency", rank_a) == pytest.approx(1000 / 1100 + 0.05)
    assert space.layer_cost("latency", space.options[2][1]) == pytest.approx(-0.4 * 0.5)
    picks = space.greedy("latency", 0.45)
    labels = space.describe(picks)
    assert space.cost("latency", picks) <= 0.45 and labels["group G"].startswith("prune") and "+r" not in labels["A"]
    # untimed, the same options are costed by MACs (the split then looks like a saving)
    untimed = SearchSpace(base, model_bytes=2000)
    assert untimed.layer_cost("latency", untimed.options[0][2]) < 1000 / 1100


def test_fit_cost_takes_the_ratio_of_the_candidates_nearest_the_budget():
    """Measured / estimated is 1.0 far from the budget and 2.0 near it: the correction is the local 2.0."""
    space = SearchSpace(_sens_with_group(), model_bytes=2000, int8_latency=0.5)
    picks = [(0, 0, 0), (1, 1, 0), (1, 1, 1), (2, 0, 2)]
    raw = [space.raw_cost("latency", p) for p in picks]
    measured = [raw[0], raw[1], 2.0 * raw[2], 2.0 * raw[3]]
    space.fit_cost("latency", list(zip(picks, measured, strict=True)), near=0.9, points=4)
    assert space.scale["latency"] == pytest.approx(1.5)  # all four: the median of 1, 1, 2, 2
    space.fit_cost("latency", list(zip(picks, measured, strict=True)), near=min(measured[2:]), points=1)
    assert space.scale["latency"] == pytest.approx(2.0) and space.offset["latency"] == 0.0
    for p, x in zip(picks, raw, strict=True):
        assert space.cost("latency", p) == pytest.approx(2.0 * x)
    fitted = space.greedy("latency", 0.35)  # plans against the corrected cost: an estimate of at most 0.175
    assert space.raw_cost("latency", fitted) <= 0.175 + 1e-12
    space.fit_cost("latency", [(picks[1], math.nan)])  # nothing usable: the correction is left as it was
    assert space.scale["latency"] == pytest.approx(2.0)


def test_coupled_groups_multiply_the_macs_kept():
    """A layer between two pruned groups keeps (1 - a)(1 - b) of its MACs, not 1 - a - b."""
    layers = (LayerInfo("A", "Conv", 1000, 400, 20), LayerInfo("B", "Conv", 1000, 400, 20))
    scores = (OptionScore("G", "prune", "prune0.5", 10.0, 1500, 400, None, -100, 0.5, 4,
                          layer_macs={"A": 500, "B": 1000}),
              OptionScore("H", "prune", "prune0.5", 10.0, 1000, 400, None, -100, 0.5, 4,
                          layer_macs={"A": 500, "B": 500}))
    space = SearchSpace(SensitivityResult(layers, scores, 8, "k"), model_bytes=2000)
    assert space.raw_cost("flops", (0, 0, 1, 0)) == pytest.approx(0.75)
    assert space.raw_cost("flops", (0, 0, 1, 1)) == pytest.approx((250 + 500) / 2000)  # additive would say 0.25


def test_latency_weights_are_fitted_to_activation_traffic():
    """Timings that follow activations, not MACs, move the weights there; pruning the stream then looks cheap."""
    space = _stream_space(b_int8_db=40.0)
    assert space.lat_weights == (0.7, 0.3)
    picks = [(1, 1, 0, 0), (1, 1, 1, 0), (1, 1, 0, 1), (1, 1, 1, 1)]
    acts = [0.5 * (1 - a) for a in (0.0, 0.4, 0.05, 0.45)]  # measured: activations only
    space.fit_cost("latency", list(zip(picks, acts, strict=True)))
    assert space.lat_weights[0] == pytest.approx(0.0, abs=1e-9) and space.lat_weights[1] == pytest.approx(1.0)
    for p, y in zip(picks, acts, strict=True):
        assert space.cost("latency", p) == pytest.approx(y)
    assert space.describe(space.greedy("latency", 0.35))["group S"] == "prune0.5"  # 0.5·0.6 = 0.3: the stream


def _stream_space(b_int8_db: float = 20.0) -> SearchSpace:
    """Layers A, B (1000 MACs each, int8 40 dB and ``b_int8_db``); groups S, T remove 40% / 5% of activations."""
    layers = (LayerInfo("A", "Conv", 1000, 400, 20), LayerInfo("B", "Conv", 1000, 400, 20))
    scores = (OptionScore("A", "int8", "int8", 40.0, 1000, 400), OptionScore("B", "int8", "int8", b_int8_db, 1000, 400),
              OptionScore("S", "prune", "prune0.5", 10.0, 1500, 400, None, -100, 0.5, 4,
                          layer_macs={"A": 500, "B": 1000}, acts_removed=0.4),
              OptionScore("T", "prune", "prune0.5", 10.0, 1000, 400, None, -100, 0.5, 4,
                          layer_macs={"A": 500, "B": 500}, acts_removed=0.05))
    return SearchSpace(SensitivityResult(layers, scores, 8, "k"), model_bytes=2000, int8_latency=0.5)


def test_float_layers_keep_their_cost_after_an_all_int8_latency_fit():
    """Weights fitted on int8 timings that follow activations only must not make float layers free.

    The fit is on all-int8 candidates, so it says nothing about float layers; before the fix the
    activation term was charged at the int8 rate whatever the precision, an activations-only fit
    priced all-fp32 at the all-int8 time, and the greedy kept every layer float.
    """
    space = _stream_space()
    picks = [(1, 1, 0, 0), (1, 1, 1, 0), (1, 1, 0, 1), (1, 1, 1, 1)]
    space.fit_cost("latency", [(p, 0.5 * (1 - a)) for p, a in zip(picks, (0.0, 0.4, 0.05, 0.45), strict=True)])
    assert space.lat_weights[0] == pytest.approx(0.0, abs=1e-9)
    # all float: the int8 time plus each layer's MACs at the fp32 rate instead of the int8 one
    assert space.cost("latency", (0, 0, 0, 0)) == pytest.approx(0.5 + (1 - 0.5) * 1.0)
    assert space.describe(space.greedy("latency", 0.5)) == {"A": "int8", "B": "int8", "group S": "keep",
                                                           "group T": "keep"}


def test_measured_float_penalty_prices_each_float_layer():
    """A layer measured free to keep float stays float (less noise); one measured dear goes int8."""
    space = _stream_space()
    space.float_penalty = [0.3, 0.0]
    int8 = space.cost("latency", (1, 1, 0, 0))
    assert space.cost("latency", (0, 1, 0, 0)) == pytest.approx(int8 + 0.3)
    assert space.cost("latency", (1, 0, 0, 0)) == pytest.approx(int8)
    pruned = space.cost("latency", (1, 1, 1, 0))  # S keeps half of A's MACs: half of A's penalty
    assert space.cost("latency", (0, 1, 1, 0)) == pytest.approx(pruned + 0.15)
    chosen = space.describe(space.greedy("latency", int8 + 0.01))
    assert (chosen["A"], chosen["B"]) == ("int8", "fp32")
    space.float_penalty = None  # estimated: B float costs its MACs at the fp32 rate, 0.25
    assert space.describe(space.greedy("latency", int8 + 0.01))["B"] == "int8"


def test_uniform_prune_cuts_residual_streams_at_their_own_ratio():
    """A group touching 3+ layers is a stream; the baseline prunes it at ``stream_ratio``, block groups at ``ratio``."""
    layers = tuple(LayerInfo(k, "Conv", 1000, 400, 20) for k in "ABC")
    stream = {"A": 500, "B": 500, "C": 500}
    block = {"A": 1000, "B": 500, "C": 500}
    scores = tuple(OptionScore(g, "prune", f"prune{r:g}", 10.0, 2000, 400, None, -100, r, 4, layer_macs=lm)
                   for g, lm in (("S", stream), ("K", block)) for r in (0.25, 0.5))
    space = SearchSpace(SensitivityResult(layers, scores, 8, "k"), model_bytes=2000)
    assert [space.is_stream(k) for k in range(2)] == [True, False]
    assert space.describe(space.uniform_prune(0.5)) == {"A": "fp32", "B": "fp32", "C": "fp32",
                                                        "group S": "prune0.5", "group K": "prune0.5"}
    two = space.describe(space.uniform_prune(0.5, stream_ratio=0.3))  # 0.3: the largest offered below is 0.25
    assert two["group S"] == "prune0.25" and two["group K"] == "prune0.5"
    assert space.describe(space.uniform_prune(0.1))["group K"] == "keep"


def test_several_budgets_must_all_hold(tmp_path):
    """Both budgets plan the search (flops steers its neighbours); feasible means both as measured."""
    data = tiny_data(tmp_path / "d.npz")
    res = optimize(tiny_cnn(), tmp_path / "out.onnx", calib=data, budget=["flops=0.7", "size=0.75"],
                   cache_dir=tmp_path / "c", eval_samples=32, sensitivity_samples=16)
    assert [b.kind for b in res.budgets] == ["flops", "size"] and res.budget.kind == "flops"
    for c in res.candidates:
        assert c.feasible == (c.flops_ratio <= 0.7 + 1e-9 and c.size_ratio <= 0.75 + 1e-9)
    assert res.feasible and res.chosen.size_ratio <= 0.75 and res.chosen.flops_ratio <= 0.7
    with pytest.raises(OnnxpressError, match="one budget per kind"):
        optimize(tiny_cnn(), tmp_path / "o2.onnx", calib=data, budget=["size=0.5", "size=0.4"])


def _sens_with_int4() -> SensitivityResult:
    """Two MatMul layers: A (4000 params, int8 or int4) and B (1000 params, int8 only); 20000 model bytes."""
    layers = (LayerInfo("A", "MatMul", 4000, 4000, 40), LayerInfo("B", "MatMul", 1000, 1000, 10))
    scores = (
        OptionScore("A", "int8", "int8", 40.0, 4000, 4000, None, -12000),
        OptionScore("A", "int4", "int4", 35.0, 4000, 4000, None, -13800),
        OptionScore("B", "int8", "int8", 40.0, 1000, 1000, None, -3000),
    )
    return SensitivityResult(layers, scores, 8, "k4")


def test_int4_is_picked_only_when_the_size_budget_needs_it():
    """size=0.3 is met by int8 everywhere (0.25); size=0.2 needs A at int4 (0.16); int4 costs fp32's latency."""
    space = SearchSpace(_sens_with_int4(), model_bytes=20000)
    assert [o.label for o in space.options[0]] == ["fp32", "int8", "int4"]
    assert space.describe(space.greedy("size", 0.3)) == {"A": "int8", "B": "int8"}
    picks = space.greedy("size", 0.2)
    assert space.describe(picks) == {"A": "int4", "B": "int8"} and space.cost("size", picks) == pytest.approx(0.16)
    assert space.refine("size", 0.2, picks, iterations=50) == picks  # the only fit
    recipe = space.recipe(picks)
    step = recipe["steps"][-1]
    assert step["pass"] == "quantize" and step["int4_layers"] == ["A"] and step["exclude"] == []
    assert "int4_layers" not in space.recipe(space.uniform("int8"))["steps"][-1]
    # A int4, B fp32: no int8 layer, so a weight-only step (no QDQ on the ops that are no layers) excluding B
    only4 = space.recipe((2, 0))["steps"][-1]
    assert only4["weights"] == "int4" and "int4_layers" not in only4 and only4["exclude"] == ["B"]
    assert "weights" not in step  # the mixed int4 + int8 step keeps the default int8 QDQ for the rest
    # latency: int4 layers run at the float rate (MatMulNBits, float activations)
    fp32, int8, int4 = (space.cost("latency", (j, 1)) for j in range(3))
    assert int4 == pytest.approx(fp32) and int8 < fp32
    no_quant = SearchSpace(_sens_with_int4(), model_bytes=20000, quantize=False)
    assert [o.label for o in no_quant.options[0]] == ["fp32"]
    assert space.describe(space.uniform_int4("fp32")) == {"A": "int4", "B": "fp32"}
    assert space.describe(space.uniform_int4("int8")) == {"A": "int4", "B": "int8"}
    assert no_quant.uniform_int4() is None and SearchSpace(_sens(), model_bytes=2000).uniform_int4() is None


def test_w4a8_is_an_int8_speed_option_that_buys_size():
    """A's w4a8 option (4-bit codes on the int8 kernel) costs int8's latency and nearly int4's bytes."""
    base = _sens_with_int4()
    sens = SensitivityResult(base.layers, base.scores + (OptionScore("A", "w4a8", "w4a8", 36.0, 4000, 4000, None,
                                                                     -13500),), 8, "k48")
    space = SearchSpace(sens, model_bytes=20000)
    assert [o.label for o in space.options[0]] == ["fp32", "int8", "int4", "w4a8"]
    fp32, int8, int4, w4a8 = (space.cost("latency", (j, 1)) for j in range(4))
    assert w4a8 == pytest.approx(int8) and int4 == pytest.approx(fp32) and int8 < fp32
    # size 0.2 and latency at int8's: only w4a8 for A fits both (int4 runs at the float rate)
    lat = space.cost("latency", (1, 1))
    picks = space.greedy("size", 0.2, also=[("latency", lat + 1e-9)])
    assert space.describe(picks) == {"A": "w4a8", "B": "int8"}
    step = space.recipe(picks)["steps"][-1]
    assert step["w4a8_layers"] == ["A"] and "int4_layers" not in step and "weights" not in step
    assert "w4a8_layers" not in space.recipe(space.uniform("int8"))["steps"][-1]
    assert space.describe(space.uniform_where("w4a8")) == {"A": "w4a8", "B": "int8"}
    assert SearchSpace(base, model_bytes=20000).uniform_where("w4a8") is None
    assert space.offers("w4a8") and not SearchSpace(base, model_bytes=20000).offers("w4a8")


def test_skipped_option_kinds_are_never_moved_to():
    """int4 (float kernels) scores better than w4a8 for A, and a split of A better still, so size=0.2 takes the
    split; with splits skipped int4, with int4 skipped too w4a8."""
    base = _sens_with_int4()
    extra = (OptionScore("A", "w4a8", "w4a8", 33.0, 4000, 4000, None, -13500),
             OptionScore("A", "rank", "rank10", 45.0, 2000, 2000, 10, -10000))
    space = SearchSpace(SensitivityResult(base.layers, base.scores + extra, 8, "k48"), model_bytes=20000)
    assert space.describe(space.greedy("size", 0.2))["A"] == "int8+r10"
    space.skip_quant = frozenset({"rank"})
    assert space.describe(space.greedy("size", 0.2)) == {"A": "int4", "B": "int8"}
    space.skip_quant = frozenset({"int4", "cb4", "rank"})
    picks = space.greedy("size", 0.2)
    assert space.describe(picks) == {"A": "w4a8", "B": "int8"}
    assert space.describe(space.refine("size", 0.2, picks, iterations=50)) == {"A": "w4a8", "B": "int8"}


def test_free_float_picks_sets_zero_penalty_int8_layers_to_fp32_at_the_same_rank():
    """Only int8 layers whose measured float penalty is <= 0 flip to fp32; ranks and other layers stay."""
    from onnxpress.optimize import free_float_picks

    space = SearchSpace(_sens(), model_bytes=2000, int8_latency=0.5)
    labels = lambda picks: [space.options[i][j].label for i, j in enumerate(picks[: len(space.layers)])]  # noqa: E731
    int8 = space.uniform("int8")
    assert free_float_picks(space, int8) == int8  # nothing measured: nothing flips
    space.float_penalty = [0.004, 0.2]  # within the 0.01 timing tolerance, and clearly slower in float
    assert labels(free_float_picks(space, int8)) == ["fp32", "int8"]
    ranked = space.uniform("int8", 0.5)
    before = labels(ranked)
    after = labels(free_float_picks(space, ranked))
    assert after[0] == before[0].replace("int8", "fp32") and after[1] == before[1]


def test_near_free_options_flip_one_layer_at_a_time_lowest_penalty_first():
    """Each int8 layer with a penalty in (0.01, NEAR_FREE_PENALTY] gives one variant with only it fp32, same rank
    (what optimize's polish tries, one at a time)."""
    from onnxpress.optimize import FREE_PENALTY, NEAR_FREE_PENALTY, _float_options

    def near_free(space, picks):  # polish's variants: one layer flipped each
        return [(*picks[:i], j, *picks[i + 1 :]) for i, j in _float_options(space, picks, FREE_PENALTY,
                                                                             NEAR_FREE_PENALTY)]

    space = SearchSpace(_sens(), model_bytes=2000, int8_latency=0.5)
    labels = lambda picks: [space.options[i][j].label for i, j in enumerate(picks[: len(space.layers)])]  # noqa: E731
    int8 = space.uniform("int8")
    assert near_free(space, int8) == []  # nothing measured
    space.float_penalty = [NEAR_FREE_PENALTY, 0.02]
    assert [labels(p) for p in near_free(space, int8)] == [["int8", "fp32"], ["fp32", "int8"]]
    space.float_penalty = [0.01, NEAR_FREE_PENALTY + 1e-6]  # free (polish's first step) and too costly: none
    assert near_free(space, int8) == []
    space.float_penalty = [0.02, 0.02]
    ranked = space.uniform("int8", 0.5)
    for variant in near_free(space, ranked):
        changed = [i for i, (a, b) in enumerate(zip(variant, ranked, strict=True)) if a != b]
        assert len(changed) == 1 and labels(variant)[changed[0]] == labels(ranked)[changed[0]].replace("int8", "fp32")
