"""The optimize report: report.md, report.json and every PNG, written only inside the report folder."""

from __future__ import annotations

import json

from onnxpress.optimize import optimize
from onnxpress.report import IMAGES
from tests.test_sensitivity import tiny_cnn, tiny_data


def test_report_has_all_images_and_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tiny_data(tmp_path / "d.npz")
    (tmp_path / "out").mkdir()
    res = optimize(tiny_cnn(), tmp_path / "out" / "m.onnx", calib=data, budget="flops=0.6", report=tmp_path / "rep",
                   cache_dir=tmp_path / "c", eval_samples=32, sensitivity_samples=16)
    rep = tmp_path / "rep"
    assert sorted(p.name for p in rep.iterdir()) == sorted([*IMAGES, "report.json", "report.md"])
    for name in IMAGES:
        blob = (rep / name).read_bytes()
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 5000, name
    md = (rep / "report.md").read_text()
    assert all(f"]({name})" in md for name in IMAGES) and "Before / after" in md
    record = json.loads((rep / "report.json").read_text())
    assert record["budget"] == {"kind": "flops", "value": 0.6}
    assert record["recipe"] == res.recipe and record["images"] == list(IMAGES)
    assert record["chosen"]["flops_ratio"] <= 0.6 and record["histograms"]
    # the before/after table comes from onnxpress.validate on the same samples (full ORT optimisations)
    assert abs(record["validation"]["outputs"][0]["sqnr_db"] - record["chosen"]["sqnr_db"]) < 0.5
    # sizes against the model as given, as the candidates table divides (its cleaned graph made 0.543 of 0.546)
    assert record["validation"]["size_ratio"] == record["chosen"]["size_ratio"]
    assert record["validation"]["reference_bytes"] == tiny_cnn().ByteSize()
    # latency at the budget's thread count (the search's latency_threads, 1) and at onnxruntime's default
    assert record["validation"]["threads"] == 1 and record["validation_default_threads"]["threads"] is None
    assert "latency ratio (1 thread, as the budget; re-timed for this report" in md
    assert "latency ratio (onnxruntime's default threads)" in md
    assert len(record["sensitivity"]["scores"]) == len(res.sensitivity.scores)
    assert any(s["family"] == "prune" for s in record["sensitivity"]["scores"])  # drawn as a second panel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d.npz", "out", "rep"]  # nothing in the cwd


def test_histograms_of_an_auto_ranges_recipe_mark_the_written_models_ranges(tmp_path):
    """A recipe whose quantize step says method "auto" (optimize keeps it when closer) is drawn too.

    The report used to calibrate with method="auto", which calibrate does not know: optimize wrote the
    model, then failed in the report. The range drawn is the one the written model's QuantizeLinear uses.
    """
    import dataclasses

    from onnxpress.quantize import quantize
    from onnxpress.report import _histograms_png, shipped_ranges

    data = tiny_data(tmp_path / "d.npz")
    (tmp_path / "out").mkdir()
    res = optimize(tiny_cnn(), tmp_path / "out" / "m.onnx", calib=data, budget="flops=0.6",
                   cache_dir=tmp_path / "c", eval_samples=32, sensitivity_samples=16)
    auto = quantize(tiny_cnn(), calib=data, method="auto").model
    steps = [{"pass": "quantize", "method": "auto"}]
    rows = _histograms_png(dataclasses.replace(res, model=auto, recipe={**res.recipe, "steps": steps}),
                           tiny_cnn(), data, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG") and rows
    shipped = shipped_ranges(auto)
    relu_input = {n.output[0]: n.input[0] for n in tiny_cnn().graph.node if n.op_type == "Relu"}
    for row in rows:  # a Relu output's range is its Conv's: the QDQ model drops the Relu
        assert row["range_from"] == "written model"
        assert (row["min"], row["max"]) == shipped[relu_input.get(row["tensor"], row["tensor"])]
        assert 0.0 <= row["clipped_fraction"] < 0.5 and row["max"] > 0


def test_histograms_find_the_written_range_through_relu_pool_and_floor_or_say_float(tmp_path):
    """concat: stem Conv -> Relu -> MaxPool stays float; quantize puts a Max floor and the Q after the pool.

    The pool's output (the next convs' input) gets that Q's range; the graph input, read by the float
    stem, is labelled float in the written model.
    """
    from pathlib import Path
    from types import SimpleNamespace

    import onnx

    from onnxpress.quantize import quantize
    from onnxpress.report import _histograms_png, shipped_ranges

    models = Path(__file__).resolve().parent.parent / "models"
    m0 = onnx.load(models / "concat.onnx")
    q = quantize(m0, calib=models / "digits32_calib.npz", max_samples=64).model
    scores = [SimpleNamespace(layer=name, family="int8", sqnr_db=40.0 + i)
              for i, name in enumerate(("node_Conv_126", "node_Conv_124"))]
    result = SimpleNamespace(sensitivity=SimpleNamespace(scores=scores), model=q,  # the fields the panel reads
                             recipe={"steps": [{"pass": "quantize", "method": "mse"}]})
    rows = {r["tensor"]: r for r in _histograms_png(result, m0, models / "digits32_calib.npz", tmp_path / "h.png")}
    assert (rows["max_pool2d"]["min"], rows["max_pool2d"]["max"]) == shipped_ranges(q)["max_pool2d_kept_float"]
    assert rows["max_pool2d"]["range_from"] == "written model"
    assert rows["input"]["range_from"] == "mse; float in the written model"


def test_report_of_a_recipe_draws_what_needs_no_search_and_says_what_is_absent(tmp_path, monkeypatch, capsys):
    """``--recipe`` with ``--report``: no search ran, so the int8 sensitivity is measured for the report (bars and
    the histograms' choice of tensors); the Pareto plot has no candidates, and report.md says so and why."""
    import onnx

    from onnxpress.cli import main

    monkeypatch.chdir(tmp_path)
    tiny_data(tmp_path / "d.npz")
    onnx.save(tiny_cnn(), tmp_path / "m.onnx")
    (tmp_path / "r.json").write_text(json.dumps({"version": 1, "steps": [{"pass": "quantize"}]}))
    rc = main(["optimize", "m.onnx", "-o", "q.onnx", "--calib", "d.npz", "--recipe", "r.json", "--report", "rep",
               "--cache-dir", "c", "-q"])
    assert rc == 0, capsys.readouterr().err
    rep = tmp_path / "rep"
    drawn = ["histograms.png", "sensitivity.png"]
    assert sorted(p.name for p in rep.iterdir()) == sorted([*drawn, "report.json", "report.md"])
    for name in drawn:
        blob = (rep / name).read_bytes()
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 5000, name
    md = (rep / "report.md").read_text()
    assert "](histograms.png)" in md and "](sensitivity.png)" in md and "](pareto.png)" not in md
    assert "## Images not written" in md and "`pareto.png`: no search ran (a recipe was applied)" in md
    record = json.loads((rep / "report.json").read_text())
    assert record["images"] == ["sensitivity.png", "histograms.png"] and list(record["images_absent"]) == ["pareto.png"]
    rows = record["histograms"]
    assert rows and all(r["range_from"] == "written model" for r in rows)  # the recipe's int8 ranges, marked
    assert record["sensitivity"] is None  # no search table: the int8 bars are the report's own measurement
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d.npz", "m.onnx", "q.onnx", "q.recipe.json", "r.json",
                                                          "rep"]
