"""method="auto": each activation's range method chosen by the quantized model's output error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxpress
from onnxpress.calibration.histogram import Histogram
from onnxpress.calibration.observers import range_from_histogram
from onnxpress.calibration.table import CalibrationTable
from onnxpress.cli import main
from onnxpress.errors import CalibrationError
from onnxpress.range_search import METHODS, search_ranges
from tests.graphs import rng, run
from tests.test_qdq import feeds_for, residual_cnn, sqnr_db


def _table() -> CalibrationTable:
    """Three tensors: "a" (a heavy-tailed one) and its alias "a_view" share a histogram; "b" has its own."""
    r = rng(61)
    ha, hb = Histogram.with_resolution(2048), Histogram.with_resolution(2048)
    ha.update(r.standard_t(2, 20000).astype(np.float32))
    hb.update(np.abs(r.standard_normal(20000)).astype(np.float32))
    ranges = {n: range_from_histogram(h, "mse") for n, h in (("a", ha), ("a_view", ha), ("b", hb))}
    return CalibrationTable(ranges=ranges, histograms={"a": ha, "a_view": ha, "b": hb},
                            meta={"method": "mse", "bits": 8, "percentile": 99.99})


def test_greedy_keeps_only_trials_that_bring_the_outputs_closer() -> None:
    """A stand-in model whose error is |a's range - 5| + |b's range - b's max|: the search must move "a"
    (and its alias with it) to the candidate nearest 5 and "b" to minmax, try each other method once, and
    leave the given table alone."""
    table = _table()
    before = {k: (r.min, r.max) for k, r in table.ranges.items()}
    cands = {n: {m: range_from_histogram(table.histograms[n], m) for m in METHODS} for n in ("a", "b")}
    b_max = table.histograms["b"].max

    def run_(tab: CalibrationTable) -> np.ndarray:
        err = abs(tab.ranges["a"].max - 5.0) + abs(tab.ranges["b"].max - b_max)
        assert tab.ranges["a"] == tab.ranges["a_view"]  # aliases move together
        return np.array([1.0 + err])

    res = search_ranges(table, build=lambda tab: tab, run=run_, reference=np.array([1.0]))
    want_a = min(METHODS, key=lambda m: (abs(cands["a"][m].max - 5.0), METHODS.index(m)))
    assert res.table.ranges["a"].method == want_a == res.table.ranges["a_view"].method
    assert res.table.ranges["b"].max == pytest.approx(b_max) and res.chosen["b"] in ("minmax", "percentile", "kl")
    distinct = sum(len({(c.min, c.max) for c in cands[n].values()}) - 1 for n in ("a", "b"))
    assert res.trials == distinct
    assert res.sqnr_after > res.sqnr_before and res.tensors == 3
    assert {k: (r.min, r.max) for k, r in table.ranges.items()} == before  # the input table is untouched
    assert res.table.meta["method"] == "auto"


def test_no_trial_is_kept_without_a_gain() -> None:
    """A model that ignores the ranges: every trial ties, nothing moves."""
    res = search_ranges(_table(), build=lambda tab: tab, run=lambda m: np.array([1.5]), reference=np.array([1.0]))
    assert res.chosen == {} and res.trials > 0 and res.sqnr_after == res.sqnr_before


def test_quantize_auto_is_at_least_as_close_on_the_calibration_data_and_keeps_the_graph(tmp_path: Path) -> None:
    """quantize(method="auto") on the residual CNN: same op list as mse (same kernels, same latency),
    every range one of the four methods', calibration-output SQNR no worse than mse's, a summary note."""
    model = residual_cnn()
    x = feeds_for(model, n=64)
    ref = run(model, x)[0]
    mse = onnxpress.quantize(model, calib=[x], bias_correction=False)
    auto = onnxpress.quantize(model, calib=[x], method="auto", bias_correction=False)
    assert [n.op_type for n in auto.model.graph.node] == [n.op_type for n in mse.model.graph.node]
    assert {r.method for r in auto.table.ranges.values()} <= set(METHODS)
    assert sqnr_db(ref, run(auto.model, x)[0]) >= sqnr_db(ref, run(mse.model, x)[0]) - 1e-6
    assert any(n.startswith("auto ranges: ") for n in auto.notes)


def test_auto_needs_calibration_data_and_int8() -> None:
    model = residual_cnn()
    with pytest.raises(CalibrationError, match="auto"):
        onnxpress.quantize(model, method="auto", table=CalibrationTable.from_ranges({"X": (-1.0, 1.0)}))
    with pytest.raises(CalibrationError, match="auto"):
        onnxpress.quantize(model, method="auto", calib=[feeds_for(model)], weights="int4")


def test_cli_method_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = residual_cnn()
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    import onnx

    onnx.save(model, path)
    np.savez(data, X=rng(62).standard_normal((32, 3, 8, 8)).astype(np.float32))
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(data), "--method", "auto"]) == 0
    assert "auto ranges: " in capsys.readouterr().out


def test_optimize_keeps_the_auto_ranges_variant_only_when_it_measures_better(tmp_path: Path) -> None:
    """The chosen candidate rebuilt with method="auto": same graph, recipe says auto, kept iff closer."""
    from onnxpress.optimize import _Evaluator, _with_auto_ranges
    from onnxpress.recipe import apply_recipe, prepare
    from onnxpress.search import Candidate

    m0 = prepare(residual_cnn())
    r = rng(63)  # binary pixels with rare bright ones
    pixels = (r.random((64, 3, 8, 8)) < 0.5).astype(np.float32)
    pixels[r.random(pixels.shape) < 0.003] = 6.0
    x = {"X": pixels}
    ev = _Evaluator(m0, m0.ByteSize(), [x], [x], None, False)
    recipe = {"version": 1, "steps": [{"pass": "quantize", "method": "mse", "max_samples": 64}]}
    chosen = Candidate(picks=(0,), est_cost=0.0, est_sqnr=0.0, recipe=recipe, feasible=True, note="uniform int8")
    built = apply_recipe(m0, recipe, [x], prepared=True)
    ev.measure_fidelity(chosen, built)
    got, model = _with_auto_ranges(chosen, built, ev)
    assert got.recipe["steps"][0]["method"] == "auto" and got.note.endswith("+ auto ranges")
    assert got.sqnr_db > chosen.sqnr_db
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in built.graph.node]
    assert apply_recipe(m0, got.recipe, [x], prepared=True).SerializeToString() == model.SerializeToString()
    worse = Candidate(picks=(0,), est_cost=0.0, est_sqnr=0.0, recipe=recipe, feasible=True, sqnr_db=1e9)
    assert _with_auto_ranges(worse, built, ev)[0] is worse  # a variant that measures lower is not taken


def test_auto_with_a_minmax_table_says_what_to_do(tmp_path: Path) -> None:
    """A saved minmax table has no histograms to pick from: a CalibrationError naming the way out."""
    model = residual_cnn()
    x = feeds_for(model, n=32)
    path = onnxpress.calibrate(model, [x], method="minmax").save(tmp_path / "t.npz")
    with pytest.raises(CalibrationError, match="histogram method"):
        onnxpress.quantize(model, calib=[x], table=path, method="auto")
    saved = onnxpress.calibrate(model, [x], method="mse").save(tmp_path / "h.npz")
    res = onnxpress.quantize(model, calib=[x], table=saved, method="auto")  # a histogram table works
    assert any(n.startswith("auto ranges: ") for n in res.notes)
