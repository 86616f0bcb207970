"""``onnxpress.calibrate`` and ``onnxpress calibrate``: end to end on tiny graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxpress
from onnxpress.calibration.table import CalibrationTable
from onnxpress.cli import main
from onnxpress.errors import CalibrationError
from tests.graphs import conv_bn_relu, make_model, rng, run


def feeds(n: int = 24, seed: int = 0) -> list[dict[str, np.ndarray]]:
    r = rng(seed)
    return [{"X": r.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def masked_softmax():
    """X[N,4] -> Add(M with -inf) -> s -> Softmax -> Y: s carries -inf like an attention mask."""
    mask = np.array([[0.0, 0.0, -np.inf, 0.0]], np.float32)
    return make_model(
        [helper.make_node("Add", ["X", "M"], ["s"]), helper.make_node("Softmax", ["s"], ["Y"], axis=-1)],
        [("X", ["N", 4])],
        [("Y", ["N", 4])],
        {"M": mask},
    )


@pytest.mark.parametrize("method", ["minmax", "kl", "mse", "percentile"])
def test_calibrate_every_method(method: str) -> None:
    """X[N,3,8,8] -> Conv -> BatchNormalization -> Relu -> Y."""
    model = conv_bn_relu()
    before = model.SerializeToString()
    data = feeds()
    table = onnxpress.calibrate(model, data, method=method, batch_size=8)
    assert model.SerializeToString() == before
    assert set(table) == {"X", "c", "bn", "Y"} and not table.excluded
    (y,) = run(model, {"X": np.concatenate([d["X"] for d in data])})
    r = table["Y"]
    assert r.method == method and r.samples == 24 and r.min == 0.0
    assert 0 < r.max <= float(y.max()) + 1e-5
    if method == "minmax":
        assert r.max == pytest.approx(float(y.max()), abs=1e-5)
    else:
        assert table.summary("Y").amax == pytest.approx(float(y.max()), abs=1e-5)


def test_batch_size_does_not_change_the_table() -> None:
    a = onnxpress.calibrate(conv_bn_relu(), feeds(), method="kl", batch_size=1)
    b = onnxpress.calibrate(conv_bn_relu(), feeds(), method="kl", batch_size=7)
    c = onnxpress.calibrate(conv_bn_relu(), feeds(), method="kl", batch_size=64)
    assert a.ranges == b.ranges == c.ranges


def test_infinite_mask_is_excluded_not_crashed_on() -> None:
    r = rng(1)
    data = [{"X": r.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    table = onnxpress.calibrate(masked_softmax(), data, method="kl")
    assert "infinite" in table.excluded["s"]
    assert "X" in table and "Y" in table
    with pytest.raises(CalibrationError, match="excluded"):
        table["s"]


def test_infinite_mask_fed_as_an_input_is_excluded_not_refused(tmp_path) -> None:
    """The mask is a model input (as exporters give it) holding -inf: calibrate and quantize report it."""
    model = make_model(
        [helper.make_node("Add", ["X", "M"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
         helper.make_node("MatMul", ["p", "W"], ["Y"])],
        [("X", ["N", 4]), ("M", ["N", 4])],
        [("Y", ["N", 4])],
        {"W": rng(2).standard_normal((4, 4)).astype(np.float32)},
    )
    r = rng(1)
    mask = np.zeros((16, 4), np.float32)
    mask[:, 2] = -np.inf
    data = {"X": r.standard_normal((16, 4)).astype(np.float32), "M": mask}
    table = onnxpress.calibrate(model, [data], method="kl")
    assert "infinite" in table.excluded["M"] and "infinite" in table.excluded["s"]
    assert "X" in table and "p" in table
    np.savez(tmp_path / "calib.npz", **data)
    result = onnxpress.quantize(model, tmp_path / "q.onnx", calib=tmp_path / "calib.npz")
    assert {"M", "s"} <= set(result.excluded_tensors)
    (want,) = run(model, data)
    (got,) = run(result.model, data)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # p's range is [0, 1]: a coarse bound


def test_max_samples_and_tensor_choice() -> None:
    table = onnxpress.calibrate(conv_bn_relu(), feeds(), method="minmax", tensors=["c"], max_samples=5)
    assert list(table) == ["c"] and table["c"].samples == 5


def test_bad_arguments_raise_our_errors() -> None:
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        onnxpress.calibrate(conv_bn_relu(), feeds(), method="entropy")
    with pytest.raises(CalibrationError, match="power of two"):
        onnxpress.calibrate(conv_bn_relu(), feeds(), bins=1000)
    with pytest.raises(CalibrationError, match="not produced by any node"):
        onnxpress.calibrate(conv_bn_relu(), feeds(), tensors=["nope"])
    with pytest.raises(CalibrationError, match=r"percentile must be in \(0, 100\], got 101"):
        onnxpress.calibrate(conv_bn_relu(), feeds(), method="percentile", percentile=101)
    # a setting the method does not read is refused, not ignored
    with pytest.raises(CalibrationError, match=r"method='kl' does not read percentile=99 \(--percentile\)"):
        onnxpress.calibrate(conv_bn_relu(), feeds(), method="kl", percentile=99)
    with pytest.raises(CalibrationError, match=r"method='minmax' does not read bins=512 \(--bins\) or bits=4"):
        onnxpress.calibrate(conv_bn_relu(), feeds(), method="minmax", bins=512, bits=4)
    with pytest.raises(CalibrationError, match=r"method='percentile' does not read bits=4"):
        onnxpress.calibrate(conv_bn_relu(), feeds(), method="percentile", bits=4)


@pytest.mark.parametrize("percentile", [99.0, 100.0])
def test_percentile_setting_reaches_the_ranges(percentile: float) -> None:
    table = onnxpress.calibrate(conv_bn_relu(), feeds(), method="percentile", percentile=percentile)
    (y,) = run(conv_bn_relu(), {"X": np.concatenate([d["X"] for d in feeds()])})
    values = np.sort(y.ravel())  # Y >= 0: |x| is x
    kth = float(values[int(np.ceil(percentile / 100 * values.size)) - 1])  # the smallest with >= p% at or below
    w = 2.0 ** table.histograms["Y"].exp
    want = min(float(values[-1]), (np.floor(kth / w) + 1) * w)  # the right edge of its bin, at most max|x|
    assert table["Y"].max == pytest.approx(want, abs=1e-6)
    if percentile < 100:
        assert table["Y"].max < float(values[-1])
    assert table.meta["percentile"] == percentile


def test_cli_writes_a_loadable_table(tmp_path, capsys) -> None:
    model_path = tmp_path / "m.onnx"
    onnxpress.save_model(conv_bn_relu(), model_path)
    x = np.concatenate([d["X"] for d in feeds()])
    np.savez(tmp_path / "data.npz", X=x, labels=np.zeros(len(x), np.int64))
    out = tmp_path / "table.npz"
    args = ["calibrate", str(model_path), "--data", str(tmp_path / "data.npz"), "-o", str(out), "--batch", "8", "-q"]
    rc = main(args)
    assert rc == 0
    text = capsys.readouterr().out
    assert "Relu" in text and "Conv" in text and "wrote" in text
    table = CalibrationTable.load(out)
    direct = onnxpress.calibrate(conv_bn_relu(), [{"X": x}])  # the CLI's default method is the API's
    assert table.ranges == direct.ranges


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys) -> None:
    model_path = tmp_path / "m.onnx"
    onnxpress.save_model(conv_bn_relu(), model_path)
    rc = main(["calibrate", str(model_path), "--data", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "t.npz")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxpress: error:") and "missing.npz" in err and err.count("\n") == 1
    assert not (tmp_path / "t.npz").exists()
    np.savez(tmp_path / "data.npz", X=np.concatenate([d["X"] for d in feeds(4)]))
    rc = main(["calibrate", str(model_path), "--data", str(tmp_path / "data.npz"), "-o", str(tmp_path / "t.npz"),
               "--method", "percentile", "--percentile", "0"])
    assert rc == 2  # refused before the run, not an empty table
    assert "percentile must be in (0, 100], got 0" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


def test_no_files_are_written_while_calibrating(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    onnxpress.calibrate(conv_bn_relu(), feeds(4), method="kl")
    assert list(tmp_path.iterdir()) == []


def test_value_preserving_outputs_share_their_input_range() -> None:
    """X[N,2,3] -> Relu -> r -> Reshape -> f -> Transpose -> t -> Add(B) -> Y: f and t are r's values."""
    model = make_model(
        [
            helper.make_node("Relu", ["X"], ["r"]),
            helper.make_node("Reshape", ["r", "shape"], ["f"]),
            helper.make_node("Transpose", ["f"], ["t"], perm=[1, 0]),
            helper.make_node("Add", ["t", "B"], ["Y"]),
        ],
        [("X", [2, 3])],
        [("Y", [3, 2])],
        {"shape": np.array([2, 3], np.int64), "B": np.ones((3, 2), np.float32)},
    )
    r = rng(5)
    data = [{"X": r.standard_normal((2, 3)).astype(np.float32)} for _ in range(4)]
    table = onnxpress.calibrate(model, data, method="kl", tensors=["r", "f", "t", "Y"])
    assert table["r"] == table["f"] == table["t"]
    assert table.histograms["t"] is table.histograms["r"]
    direct = onnxpress.calibrate(model, data, method="kl", tensors=["t"])
    assert direct["t"] == table["t"]


def test_histogram_methods_leave_one_core_to_the_observer_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxpress.calibrate import _session_threads
    from onnxpress.calibration.observers import HistogramObserver, MinMaxObserver

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert _session_threads([MinMaxObserver("a")]) is None  # onnxruntime's default
    assert _session_threads([MinMaxObserver("a"), HistogramObserver("kl", name="b")]) == 7
    assert _session_threads([HistogramObserver("kl", name="b", values_per_sample=64)]) is None  # cheap updates
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert _session_threads([HistogramObserver("mse", name="b")]) == 1


@pytest.mark.parametrize("method", ["kl", "mse", "percentile"])
def test_histogram_subsample_does_not_depend_on_batch_size_or_order(method: str) -> None:
    """X[N,3,8,8] -> Conv -> BatchNormalization -> Relu -> Y: 192 and 512 values per sample, 16 binned."""
    data = feeds()
    tables = [
        onnxpress.calibrate(conv_bn_relu(), d, method=method, batch_size=b, histogram_values_per_sample=16)
        for b, d in ((1, data), (7, data[::-1]), (64, data))
    ]
    assert tables[0].ranges == tables[1].ranges == tables[2].ranges
    for name in ("X", "c", "Y"):
        counts = [t.histograms[name].counts for t in tables]
        np.testing.assert_array_equal(counts[0], counts[1])
        np.testing.assert_array_equal(counts[0], counts[2])
        assert int(counts[0].sum()) == 24 * 16
    assert tables[0].meta["histogram_values_per_sample"] == 16
    (y,) = run(conv_bn_relu(), {"X": np.concatenate([d["X"] for d in data])})
    assert tables[0].summary("Y").amax == pytest.approx(float(y.max()), abs=1e-5)  # min/max stay exact


def test_exact_histograms_bin_every_value() -> None:
    from onnxpress.calibration.histogram import Histogram

    data = feeds()
    table = onnxpress.calibrate(conv_bn_relu(), data, method="kl", batch_size=24, histogram_values_per_sample=None)
    (y,) = run(conv_bn_relu(), {"X": np.concatenate([d["X"] for d in data])}, optimize=True)  # as calibrate runs it
    direct = Histogram.with_resolution()
    direct.update(y)
    np.testing.assert_array_equal(table.histograms["Y"].counts, direct.counts)
    assert int(table.histograms["Y"].counts.sum()) == y.size


def test_tensors_whose_axis_0_is_not_the_batch_bin_every_value() -> None:
    """X[N,4,6] -> Relu -> r -> Transpose(1,0,2) -> t[4,N,6] -> Add(B) -> Y: t's axis 0 is not the batch."""
    from onnxpress.calibration.collect import batch_major_tensors

    model = make_model(
        [
            helper.make_node("Relu", ["X"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0, 2]),
            helper.make_node("Add", ["t", "B"], ["Y"]),
        ],
        [("X", ["N", 4, 6])],
        [("Y", [4, "N", 6])],
        {"B": np.ones((1, 1, 6), np.float32)},
    )
    assert batch_major_tensors(model, ["X", "r", "t", "Y"]) == {"X", "r"}
    r = rng(8)
    data = [{"X": r.standard_normal((3, 4, 6)).astype(np.float32)} for _ in range(4)]
    table = onnxpress.calibrate(model, data, method="mse", tensors=["r", "Y"], histogram_values_per_sample=5)
    assert table.histograms["r"].values_per_sample == 5 and int(table.histograms["r"].counts.sum()) == 12 * 5
    assert table.histograms["Y"].values_per_sample is None and int(table.histograms["Y"].counts.sum()) == 12 * 24


def test_bad_histogram_subsample_raises() -> None:
    for bad in (0, -1, True, 2.5):
        with pytest.raises(CalibrationError, match="histogram_values_per_sample"):
            onnxpress.calibrate(conv_bn_relu(), feeds(2), histogram_values_per_sample=bad)


def test_calibrate_defaults_to_quantizes_method_so_a_saved_table_quantizes_alike(tmp_path):
    """calibrate, then quantize --table, gives the model quantize --calib gives (it used to default to kl: the
    reference ResNet got 26.2 dB that way instead of 37.9). The API and the CLI both."""
    from onnxpress.quantize import DEFAULT_METHOD

    model, data = conv_bn_relu(), feeds()
    table = onnxpress.calibrate(model, data)
    assert table.meta["method"] == DEFAULT_METHOD
    via_table = onnxpress.quantize(model, table=table, bias_correction=False, int8_method="rtn").model
    via_calib = onnxpress.quantize(model, calib=data, bias_correction=False, int8_method="rtn").model
    assert via_table.SerializeToString() == via_calib.SerializeToString()
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", **{k: np.concatenate([f[k] for f in data]) for k in data[0]})
    out = tmp_path / "t.npz"
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "-o", str(out), "-q"]) == 0
    assert CalibrationTable.load(out).meta["method"] == DEFAULT_METHOD
