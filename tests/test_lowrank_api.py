"""onnxpress.lowrank / ``onnxpress lowrank`` and the second-moment observers."""

from __future__ import annotations

import collections
import hashlib
import re

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxpress
from onnxpress.calibration.moments import PatchSecondMomentObserver, SecondMomentObserver
from onnxpress.cli import main
from onnxpress.errors import CalibrationError, DataError, ModelLoadError
from onnxpress.prune import sqnr_db
from tests import graphs

# ---------------------------------------------------------------------------------------------
# observers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0])
def test_streamed_moment_equals_moment_of_the_concatenation(axis):
    r = graphs.rng(0)
    parts = [r.standard_normal((3, 7, 5)).astype(np.float32) for _ in range(4)]
    obs, other = SecondMomentObserver(axis), SecondMomentObserver(axis)
    for p in parts[:3]:
        obs.update(p)
    other.update(parts[3])
    obs.merge(other)
    rows = np.moveaxis(np.concatenate(parts, 1 if axis == 0 else 0), axis, -1)
    rows = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(obs.compute(), rows.T @ rows / len(rows), rtol=1e-10)
    assert obs.count == len(rows)


def test_empty_or_non_finite_observer_raises():
    with pytest.raises(CalibrationError, match="no data"):
        SecondMomentObserver(name="a").compute()
    with pytest.raises(CalibrationError, match="NaN"):
        SecondMomentObserver(name="a").update(np.array([[1.0, np.nan]]))
    obs = SecondMomentObserver(name="a")
    obs.update(np.ones((2, 3)))
    with pytest.raises(CalibrationError, match="feature size changed"):
        obs.update(np.ones((2, 4)))


def test_patch_moment_matches_conv_output_energy_on_onnxruntime():
    """tr(W C Wᵀ) over im2col patches equals the mean squared output of a bias-free Conv."""
    r = graphs.rng(1)
    c, m, k = 3, 5, 3
    w = r.standard_normal((m, c, k, k)).astype(np.float32)
    attrs = {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}
    model = graphs.make_model([helper.make_node("Conv", ["X", "W"], ["Y"], **attrs)],
                              [("X", ["N", c, 9, 10])], [("Y", ["N", m, 5, 7])], {"W": w})
    x = r.standard_normal((4, c, 9, 10)).astype(np.float32)
    obs = PatchSecondMomentObserver((k, k), attrs["strides"], attrs["pads"], attrs["dilations"])
    obs.update(x[:1])
    obs.update(x[1:])
    y = graphs.run(model, {"X": x})[0].astype(np.float64)
    assert obs.count == 4 * 5 * 7
    wf = w.reshape(m, -1).astype(np.float64)
    expected = np.mean(np.sum(y**2, axis=1))  # E_positions ‖W p‖²
    assert np.trace(wf @ obs.compute() @ wf.T) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("spatial", "kernel", "attrs"), [
    ((20,), (3,), {"dilations": [2], "pads": [4, 0]}),  # 1-D, causal (a TCN)
    ((5, 6, 4), (3, 2, 3), {"strides": [1, 2, 1], "pads": [1, 0, 1, 1, 1, 0]}),  # 3-D
    ((9, 10), (3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),  # tf2onnx's SAME
    ((9, 10), (4, 3), {"strides": [2, 1], "auto_pad": "SAME_LOWER"}),
])
def test_patch_moment_of_1d_3d_and_auto_pad_convs(spatial, kernel, attrs):
    """The same identity for 1-D and 3-D convs and auto_pad ones (the pads follow from each batch's shape)."""
    r = graphs.rng(2)
    c, m = 3, 5
    w = r.standard_normal((m, c, *kernel)).astype(np.float32)
    model = graphs.make_model([helper.make_node("Conv", ["X", "W"], ["Y"], **attrs)],
                              [("X", ["N", c, *spatial])], [("Y", ["N", m] + ["?"] * len(spatial))], {"W": w})
    x = r.standard_normal((4, c, *spatial)).astype(np.float32)
    obs = PatchSecondMomentObserver(kernel, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"),
                                    auto_pad=attrs.get("auto_pad", "NOTSET"))
    obs.update(x[:1])
    obs.update(x[1:])
    y = graphs.run(model, {"X": x})[0].astype(np.float64)
    assert obs.count == 4 * int(np.prod(y.shape[2:]))
    wf = w.reshape(m, -1).astype(np.float64)
    assert np.trace(wf @ obs.compute() @ wf.T) == pytest.approx(np.mean(np.sum(y**2, axis=1)), rel=1e-5)


def test_data_aware_split_of_1d_convs_beats_plain_svd():
    """A dilated 1-D conv stack on correlated signals: at 60% of the MACs the whitened split reads 15.2 dB against
    plain SVD's 2.6 (before, 1-D convs got the plain SVD either way; +6 dB asserted); at full rank it is exact."""
    r = graphs.rng(3)
    inits, nodes, x = {}, [], "X"
    for i, d in enumerate((1, 2, 4)):
        inits[f"W{i}"] = (r.standard_normal((32, 32 if i else 16, 3)) / 6).astype(np.float32)
        nodes += [helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], dilations=[d], pads=[2 * d, 0]),
                  helper.make_node("Relu", [f"c{i}"], [f"a{i}"])]
        x = f"a{i}"
    nodes[-1].output[0] = "Y"
    model = graphs.make_model(nodes, [("X", ["N", 16, 40])], [("Y", ["N", 32, 40])], inits)
    mix = r.standard_normal((16, 4))
    signal = lambda n, seed: (np.einsum("cs,nst->nct", mix, np.cumsum(  # noqa: E731
        graphs.rng(seed).standard_normal((n, 4, 40)), axis=2)) / 4).astype(np.float32)
    calib, test = [{"X": signal(64, 10)}], {"X": signal(64, 11)}
    ref = graphs.run(model, test)[0]
    db = {k: sqnr_db(ref, graphs.run(onnxpress.lowrank(model, flops=0.6, calib=c).model, test)[0])
          for k, c in (("plain", None), ("data", calib))}
    assert db["data"] > db["plain"] + 6, db
    from onnxpress.lowrank import collect_moments
    from onnxpress.passes.low_rank import SplitConvLowRank
    from onnxpress.pipeline import run_passes

    moments = collect_moments(model, calib)
    assert len(moments) == 3  # every 1-D conv has its patch moment
    split = SplitConvLowRank(rank=96, only_if_cheaper=False, moments=moments)
    full = run_passes(model, [split]).model
    assert {lay.method for lay in split.report} == {"whitened-svd"}
    np.testing.assert_allclose(graphs.run(full, test)[0], ref, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------


def small_cnn(seed: int = 0):
    """X[N,4,8,8] -> Conv 3x3 (16) -> Relu -> Conv 3x3 s2 (32) -> Relu -> Flatten -> Gemm(10) -> Y."""
    r = graphs.rng(seed)
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("Flatten", ["a2"], ["f"]),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["Y"], transB=1),
    ]
    inits = {
        "W1": (r.standard_normal((16, 4, 3, 3)) / 6).astype(np.float32),
        "B1": r.standard_normal(16).astype(np.float32) * 0.1,
        "W2": (r.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32),
        "B2": r.standard_normal(32).astype(np.float32) * 0.1,
        "W3": (r.standard_normal((10, 512)) / 22).astype(np.float32),
        "B3": r.standard_normal(10).astype(np.float32) * 0.1,
    }
    return graphs.make_model(nodes, [("X", ["N", 4, 8, 8])], [("Y", ["N", 10])], inits)


def _inputs(seed: int, n: int) -> np.ndarray:
    """Correlated inputs: a smooth (low-frequency) image per channel plus a little noise."""
    r = graphs.rng(seed)
    base = r.standard_normal((n, 4, 2, 2))
    smooth = np.kron(base, np.ones((1, 1, 4, 4)))
    return (smooth + 0.05 * r.standard_normal((n, 4, 8, 8))).astype(np.float32)


def _sqnr(y, ref):
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((y - ref).astype(np.float64) ** 2)))


def test_lowrank_writes_a_checked_model_and_leaves_the_input_alone(tmp_path):
    src = tmp_path / "cnn.onnx"
    src.write_bytes(small_cnn().SerializeToString())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "split.onnx"
    result = onnxpress.lowrank(str(src), out, flops=0.6, multiple=2)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert result.output == out and out.is_file()
    assert result.macs_after <= 0.6 * result.macs_before
    assert result.params_after < result.params_before
    assert not result.data_aware
    table = result.table()
    assert "total" in table and "c2" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "split.onnx"]


def test_data_aware_lowrank_beats_plain_on_held_out_logits():
    model = small_cnn()
    calib = [{"X": _inputs(1, 64)}]
    x = _inputs(2, 64)
    ref = graphs.run(model, {"X": x})[0]
    plain = onnxpress.lowrank(model, rank=8)
    aware = onnxpress.lowrank(model, rank=8, calib=calib)
    assert aware.data_aware and {lay.method for lay in aware.layers} == {"whitened-svd"}
    assert [lay.rank for lay in aware.layers] == [lay.rank for lay in plain.layers]
    sq_plain = _sqnr(graphs.run(plain.model, {"X": x})[0], ref)
    sq_aware = _sqnr(graphs.run(aware.model, {"X": x})[0], ref)
    assert sq_aware >= sq_plain + 3.0, (sq_plain, sq_aware)


def test_data_aware_gemm_with_trans_a_observes_the_feature_axis_0():
    """X[24, 5] -> Relu -> h -> Gemm(transA=1, W[24, 20]) -> Y[5, 20]: E[h hᵀ] is over h's axis 0."""
    from onnxpress.lowrank import collect_moments

    r = graphs.rng(4)
    w = r.standard_normal((24, 20)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["X"], ["h"]), helper.make_node("Gemm", ["h", "W"], ["Y"], transA=1)]
    model = graphs.make_model(nodes, [("X", [24, 5])], [("Y", [5, 20])], {"W": w})
    x = r.standard_normal((24, 5)).astype(np.float32)
    h = np.maximum(x, 0).astype(np.float64)
    moments = collect_moments(model, [{"X": x}])
    np.testing.assert_allclose(moments["Y"], h @ h.T / 5, rtol=1e-9)
    result = onnxpress.lowrank(model, rank=8, calib=[{"X": x}])
    assert result.layers[0].method == "whitened-svd" and result.layers[0].rank == 8
    plain = onnxpress.lowrank(model, rank=8)
    ref = graphs.run(model, {"X": x})[0]
    # on the calibration data itself the whitened split is the optimum of the output error
    assert _sqnr(graphs.run(result.model, {"X": x})[0], ref) > _sqnr(graphs.run(plain.model, {"X": x})[0], ref)


def test_lowrank_calib_data_with_wrong_input_name_raises_data_error():
    with pytest.raises(DataError):
        onnxpress.lowrank(small_cnn(), rank=4, calib=[{"image": _inputs(1, 4)}])


def test_lowrank_refuses_two_selectors():
    with pytest.raises(ValueError, match="exactly one"):
        onnxpress.lowrank(small_cnn(), rank=4, energy=0.9)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_lowrank_prints_the_per_layer_table(tmp_path, capsys):
    src, out, data = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib.npz"
    src.write_bytes(small_cnn().SerializeToString())
    np.savez(data, X=_inputs(3, 32))
    assert main(["lowrank", str(src), "-o", str(out), "--energy", "0.9", "--calib", str(data), "-q"]) == 0
    text = capsys.readouterr().out
    assert "whitened-svd" in text and "MACs/sample" in text and "data-aware" in text
    assert out.is_file()


def test_cli_lowrank_says_tucker_convs_were_split_plain_with_data(tmp_path, capsys):
    src, out, data = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib.npz"
    src.write_bytes(small_cnn().SerializeToString())
    np.savez(data, X=_inputs(3, 32))
    assert main(["lowrank", str(src), "-o", str(out), "--energy", "0.7", "--calib", str(data), "--tucker", "-q"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    methods = collections.Counter(w for line in text for w in line.split()[-1:] if w in ("tucker2", "whitened-svd"))
    last = text[-1]
    # the summary counts what the table's method column says, not "data-aware" for all
    assert f"plain Tucker-2 for {methods['tucker2']} layer(s)" in last and methods["tucker2"] > 0, text
    assert "Tucker-2 keeps weight energy" in last
    assert main(["lowrank", str(src), "-o", str(out), "--energy", "0.7", "--tucker", "-q"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]  # no data: was "plain SVD" with Tucker-2 splits
    assert re.match(r"(plain SVD for \d+ layer\(s\), )?plain Tucker-2 for \d+ layer\(s\); wrote", last), last


@pytest.mark.parametrize(("extra", "match"), [
    (["--threads", "2"], "--threads sets up the layer timing of --by-latency: add it, or drop it"),
    (["--latency-batch", "8", "--latency-step", "macs"], "--latency-step, --latency-batch set up the layer timing"),
    (["--max-samples", "8"], "--max-samples caps the --calib samples of the data-aware SVD: add --calib"),
])
def test_cli_lowrank_refuses_options_that_would_be_ignored(tmp_path, capsys, extra, match):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    src.write_bytes(small_cnn().SerializeToString())
    assert main(["lowrank", str(src), "-o", str(out), "--energy", "0.9", "-q", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and not out.exists()


def test_cli_lowrank_errors_are_one_line(tmp_path, capsys):
    assert main(["lowrank", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxpress: error:") and "not found" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["lowrank", "m.onnx", "-o", "o.onnx", "--rank", "2", "--flops", "0.5"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["lowrank", "m.onnx", "-o", "o.onnx", "--energy", "1.5"])


def test_cli_lowrank_missing_calib_data_is_one_line(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(small_cnn().SerializeToString())
    out, calib = tmp_path / "o.onnx", tmp_path / "no.npz"
    code = main(["lowrank", str(src), "-o", str(out), "--rank", "2", "--calib", str(calib)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no.npz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_model_load_error_type():
    with pytest.raises(ModelLoadError):
        onnxpress.lowrank("/nonexistent/model.onnx", rank=2)


def test_cli_lowrank_joint_prints_one_row_for_the_siblings(tmp_path, capsys):
    """--joint: three siblings on one rank-4 input subspace are one row a+b+c; rank 4 reproduces them."""
    r = graphs.rng(2)
    shared = r.standard_normal((8, 4))
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"], name=n) for i, n in enumerate("abc")]
    model = graphs.make_model(nodes, [("X", ["b", 4, 8])], [(f"Y{i}", ["b", 4, 8]) for i in range(3)],
                              {f"W{i}": (shared @ r.standard_normal((4, 8))).astype(np.float32) for i in range(3)})
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    src.write_bytes(model.SerializeToString())
    assert main(["lowrank", str(src), "-o", str(out), "--rank", "4", "--joint", "-q"]) == 0
    text = capsys.readouterr().out
    assert "a+b+c" in text and "24x8" in text and "4/8" in text  # 4·(8+24) = 128 < 3·64 MACs per token
    split = onnx.load(out)
    assert [n.op_type for n in split.graph.node].count("MatMul") == 4
    x = r.standard_normal((2, 4, 8)).astype(np.float32)
    for got, want in zip(graphs.run(split, {"X": x}), graphs.run(model, {"X": x}), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
