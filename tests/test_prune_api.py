"""onnxpress.prune, the sensitivity scan and the ``onnxpress prune`` command on tiny graphs."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest

import onnxpress
from onnxpress.cli import main
from onnxpress.errors import CalibrationError
from onnxpress.prune import MeanAbsObserver, collect_mean_abs, sensitivity_scan, sqnr_db
from tests import graphs
from tests.test_prune_channels import conv_bn_chain, residual


@pytest.fixture()
def files(tmp_path):
    model = residual()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=graphs.rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32))
    return model, path, calib


def test_zero_only_keeps_outputs_and_never_touches_the_input(files, tmp_path):
    model, path, _ = files
    before = path.read_bytes()
    result = onnxpress.prune(path, tmp_path / "out.onnx")
    assert path.read_bytes() == before
    assert result.total.params_before == result.total.params_after == 840
    x = graphs.rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = onnx.load(tmp_path / "out.onnx")
    np.testing.assert_allclose(graphs.run(out, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx", "out.onnx"]


def test_ratio_report_counts_per_layer(files):
    """residual at 50%: conv_a and conv_c halve, conv_b (both sides) quarters; totals add up."""
    model, _, _ = files
    result = onnxpress.prune(model, ratio=0.5)
    rows = {r.name: r for r in result.layers}
    assert rows["conv_a"].macs_after * 2 == rows["conv_a"].macs_before
    assert rows["conv_b"].macs_after * 4 == rows["conv_b"].macs_before
    assert result.total.macs_after == sum(r.macs_after for r in result.layers)
    assert result.size_bytes[1] < result.size_bytes[0]
    assert result.stats["prune_channels.channels_removed"] == 8  # 4 units x 2 coupled convs


def test_act_criterion_from_calibration_data(files):
    """Mean |x| observed by collect_statistics equals numpy's on the same data."""
    model, _, calib = files
    x = np.load(calib)["X"]
    acts = collect_mean_abs(model, calib, max_samples=24, batch_size=8)
    ra = np.maximum(graphs.run(_with_output(model, "ra"), {"X": x})[1], 0)
    np.testing.assert_allclose(acts["ra"], np.abs(ra).mean(axis=(0, 2, 3)), rtol=1e-5)
    result = onnxpress.prune(model, ratio=0.5, criterion="act", calib=calib)
    assert result.stats["prune_channels.channels_removed"] == 8


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def test_act_without_data_is_a_clear_error(files):
    model, _, _ = files
    with pytest.raises(CalibrationError, match="--calib"):
        onnxpress.prune(model, ratio=0.5, criterion="act")


def test_mean_abs_observer_and_sqnr():
    obs = MeanAbsObserver(axis=1)
    with pytest.raises(CalibrationError):
        obs.compute()
    a = graphs.rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    obs.update(a[:2])
    obs.update(a[2:])
    np.testing.assert_allclose(obs.compute(), np.abs(a).mean(axis=(0, 2)), rtol=1e-6)
    assert sqnr_db(a, a) == math.inf
    assert sqnr_db(a, 0.9 * a) == pytest.approx(20.0, abs=1e-4)  # float32 rounding of 0.9 * a


def test_sensitivity_scan_is_monotone_in_macs():
    """conv_bn_chain: pruning more of conv1 never raises MACs; the SQNR is finite and rows are complete."""
    model = conv_bn_chain()
    feeds = [{"X": graphs.rng(s).standard_normal((4, 3, 8, 8)).astype(np.float32)} for s in range(3)]
    rows = sensitivity_scan(model, feeds, ratios=(0.25, 0.5, 0.75))
    expected = [("conv1", 0.25, 2), ("conv1", 0.5, 4), ("conv1", 0.75, 6)]
    assert [(r.group, r.ratio, r.units_removed) for r in rows] == expected
    macs = [r.macs_ratio for r in rows]
    assert macs == sorted(macs, reverse=True) and macs[-1] < 0.5
    assert all(math.isfinite(r.sqnr_db) for r in rows)
    with pytest.raises(ValueError, match="no prunable channel group"):
        sensitivity_scan(model, feeds, groups=["nope"])


def test_cli_prints_report_and_writes(files, tmp_path, capsys):
    _, path, calib = files
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--multiple", "4", "-q"]) == 0
    text = capsys.readouterr().out
    assert "conv_b" in text and "total" in text and "size:" in text and f"wrote {out}" in text
    assert onnx.load(out).graph.initializer


def test_cli_errors_are_one_line(files, tmp_path, capsys):
    _, path, _ = files
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5", "--criterion", "act"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calib" in err
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "1.5"])
    assert exc.value.code == 2
    assert main(["prune", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "p.onnx")]) == 2


def test_mean_compensation_raises_sqnr(tmp_path):
    """conv_bn_chain at 50%: folding the removed Relu channels' means into conv2's bias lowers the error."""
    model = conv_bn_chain()
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=graphs.rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    x = graphs.rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    ref = graphs.run(model, {"X": x})[0]
    plain = onnxpress.prune(model, ratio=0.5).model  # l2 reads no data (calib would be refused)
    comp = onnxpress.prune(model, ratio=0.5, calib=calib, compensate=True).model
    s_plain = sqnr_db(ref, graphs.run(plain, {"X": x})[0])
    s_comp = sqnr_db(ref, graphs.run(comp, {"X": x})[0])
    assert s_comp > s_plain + 0.5, (s_plain, s_comp)  # measured 3.0 -> 3.7 dB (fixed seeds)
    with pytest.raises(CalibrationError, match="--calib"):
        onnxpress.prune(model, ratio=0.5, compensate=True)


def test_weights_behind_identity_are_folded_first():
    """Conv weight W = Identity(W0) (as the TorchScript exporter writes): the pass alone declines and says
    why; onnxpress.prune folds constants first and prunes."""
    from onnx import helper

    from onnxpress.passes.prune_channels import PruneChannels
    from onnxpress.pipeline import run_passes

    model = residual()
    g = model.graph
    for node in g.node:
        if list(node.input[1:2]) == ["Wb"]:
            node.input[1] = "Wb_id"
    g.node.insert(0, helper.make_node("Identity", ["Wb"], ["Wb_id"]))
    onnx.checker.check_model(model, full_check=True)
    alone = run_passes(model, [PruneChannels(0.5)])
    assert not alone.modified and any("weights are computed" in n for n in alone.notes)
    result = onnxpress.prune(model, ratio=0.5)
    assert result.stats["prune_channels.channels_removed"] == 8


def test_a_prelu_rewrite_is_reported_even_when_nothing_goes():
    """prune rewrites a per-channel PRelu (exact, faster) before the analysis: with no channel removed the
    file still changes (a few more nodes), so the result says why instead of printing only "0 removed"."""
    from onnx import helper

    r = graphs.rng(3)
    inits = {"W": r.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "slope": r.uniform(0.1, 0.3, (4, 1, 1)).astype(np.float32)}  # fmt: skip
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c", "slope"], ["Y"])]  # fmt: skip
    model = graphs.make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)
    result = onnxpress.prune(model)
    assert result.stats["prune_zero_channels.channels_removed"] == 0
    assert "PRelu" not in {n.op_type for n in result.model.graph.node}
    assert any(n.startswith("rewrite_prelu: 1 PRelu rewritten") and "exact" in n for n in result.notes)
    x = r.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0])


def test_settings_of_pruning_by_importance_without_a_ratio_are_refused(files, tmp_path, capsys):
    """--compensate, --criterion, --scope, --multiple do nothing in exact (zero-only) mode: refused, nothing written."""
    model, path, calib = files
    for kwargs in ({"compensate": True, "calib": str(calib)}, {"criterion": "act", "calib": str(calib)},
                   {"scope": "layer"}, {"multiple": 8}, {"ratio": 0.0, "compensate": True, "calib": str(calib)}):
        with pytest.raises(onnxpress.OnnxpressError, match=r"without a ratio > 0 \(--ratio R\)"):
            onnxpress.prune(model, **kwargs)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--compensate", "--calib", str(calib)]) == 2
    assert "compensate (--compensate)" in capsys.readouterr().err and not out.exists()
    assert onnxpress.prune(model, ratio=0.3, compensate=True, calib=str(calib)).stats  # with a ratio it runs


@pytest.mark.parametrize(("extra", "match"), [
    # each was taken without a word (a --calib that does not exist too)
    (["--calib", "missing.npz"], r"calib \(--calib\) is read by criterion 'act' or 'contrib', by compensate"),
    (["--ratio", "0.3", "--calib", "calib.npz"], r"calib \(--calib\) is read by"),
    (["--ratio", "0.3", "--max-samples", "5"], r"--max-samples caps the samples of --criterion act/contrib"),
    (["--dim", "N=4"], r"name\(s\) \['N'\]: the batch dimension"),
    (["--ratio", "0.3", "--dim", "t=4", "--dim", "t=7"], r"--dim t is given twice, as 4 and 7"),
])
def test_cli_refuses_what_the_run_would_not_read(files, tmp_path, capsys, monkeypatch, extra, match):
    _, path, _ = files
    monkeypatch.chdir(tmp_path)
    assert main(["prune", str(path), "-o", "p.onnx", "-q", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not (tmp_path / "p.onnx").exists()


def test_cli_warns_when_a_ratio_removes_no_channel(files, tmp_path, capsys):
    _, path, _ = files
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.3", "--multiple", "1000", "-q"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: --ratio 0\.3 removed no channel: of \d+ prunable channels, the ratio rounded to none "
                     r"per group \(each group keeps a multiple of --multiple 1000\)", out), out


def test_a_weight_that_is_also_a_graph_output_keeps_its_shape_as_an_output():
    """Pruning sliced the stored weight, so the output w1 came out [16, 10] instead of [32, 10]."""
    from onnx import helper

    from tests import graphs

    r = graphs.rng(8)
    w0, w1 = r.standard_normal((16, 32)).astype(np.float32), r.standard_normal((32, 10)).astype(np.float32)
    model = graphs.make_model([helper.make_node("MatMul", ["x", "w0"], ["a"]),
                               helper.make_node("Relu", ["a"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])],
                              [("x", ["N", 16])], [("y", ["N", 10]), ("w1", [32, 10])], {"w0": w0, "w1": w1})
    res = onnxpress.prune(model, ratio=0.5)
    x = r.standard_normal((4, 16)).astype(np.float32)
    y, w_out = graphs.run(res.model, {"x": x})
    np.testing.assert_array_equal(w_out, w1)
    assert sum(len(i.dims) == 2 and i.dims[0] < 32 for i in res.model.graph.initializer if i.name != "w1")  # pruned
