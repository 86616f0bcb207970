"""Calibration table: save/load round trip, versioning, shard merge, histogram summaries."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from onnxpress.calibration.observers import HistogramObserver, make_observer
from onnxpress.calibration.table import CalibrationTable, TensorRange
from onnxpress.errors import CalibrationError, OutputError


def table_from(chunks: dict[str, list[np.ndarray]], method: str = "kl") -> CalibrationTable:
    """Calibrate tensors directly from arrays, the way ``calibrate`` fills a table."""
    table = CalibrationTable(meta={"method": method, "bits": 8, "percentile": 99.99, "samples": 1})
    for name, parts in chunks.items():
        obs = make_observer(method, name)
        for p in parts:
            obs.update(p)
        if isinstance(obs, HistogramObserver):
            table.histograms[name] = obs.histogram
        try:
            table.ranges[name] = obs.compute_range()
        except CalibrationError as exc:
            table.excluded[name] = str(exc)
    return table


def data(seed: int = 0) -> dict[str, list[np.ndarray]]:
    r = np.random.default_rng(seed)
    return {
        "a": [r.standard_normal(3000).astype(np.float32)],
        "relu": [np.maximum(r.laplace(0, 1, 3000), 0).astype(np.float32)],
        "mask": [np.array([0.0, -np.inf], np.float32)],
    }


def test_interface_of_the_foundation_is_kept() -> None:
    t = CalibrationTable.from_ranges({"x": (-1.0, 2.0)})
    assert t["x"] == TensorRange(-1.0, 2.0, "manual") and "x" in t and len(t) == 1
    with pytest.raises(CalibrationError, match="no calibrated range for tensor 'y'"):
        t["y"]


@pytest.mark.parametrize("method", ["kl", "minmax"])
def test_save_load_round_trip(tmp_path, method: str) -> None:
    t = table_from(data(), method)
    path = t.save(tmp_path / "table.npz")
    back = CalibrationTable.load(path)
    assert back.ranges == t.ranges and back.excluded == t.excluded and back.meta == t.meta
    assert "infinite" in back.excluded["mask"]
    assert set(back.histograms) == set(t.histograms)
    for name, h in t.histograms.items():
        g = back.histograms[name]
        assert (g.exp, g.min, g.max, g.count, g.neginf) == (h.exp, h.min, h.max, h.count, h.neginf)
        np.testing.assert_array_equal(g.magnitude(), h.magnitude())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.npz"]  # no scratch left behind


def test_load_refuses_newer_versions_and_other_files(tmp_path) -> None:
    path = table_from(data()).save(tmp_path / "t.npz")
    with zipfile.ZipFile(path) as z:
        header = json.loads(np.lib.format.read_array(z.open("header.npy")).tobytes())
    header["version"] = 99
    np.savez(tmp_path / "new.npz", header=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(CalibrationError, match="version 99"):
        CalibrationTable.load(tmp_path / "new.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(CalibrationError, match="not an onnxpress calibration table"):
        CalibrationTable.load(tmp_path / "other.npz")
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationTable.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CalibrationError, match=r"junk.npz is not an onnxpress calibration table \(not an .npz"):
        CalibrationTable.load(tmp_path / "junk.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)  # no pickle hint
    with pytest.raises(CalibrationError, match=r"not an .npz archive\); give the file that `onnxpress calibrate"):
        CalibrationTable.load(tmp_path / "objects.npy")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:200])  # a zip cut short
    with pytest.raises(CalibrationError, match="cannot read calibration table"):
        CalibrationTable.load(tmp_path / "cut.npz")
    with pytest.raises(OutputError):
        table_from(data()).save(tmp_path / "no" / "such" / "t.npz")


def _rewrite(src, dst, edit, drop: str | None = None) -> None:
    """Copy table ``src`` to ``dst``: ``edit(header)`` applied (in place, or what it returns), ``drop`` left out."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files if k != drop}
    header = json.loads(arrays["header"].tobytes())
    new = edit(header)
    header = header if new is None else new
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(dst, **arrays)


@pytest.mark.parametrize(("edit", "drop", "match"), [
    (lambda h: h.__delitem__("ranges"), None, "missing field 'ranges'"),
    (lambda h: h["ranges"].update(a=[0, 1]), None, "damaged"),  # a list where an object belongs
    (lambda h: h["ranges"].update(a={"min": 2.0, "max": 1.0}), None, r"range min 2\.0 > max 1\.0"),
    (lambda h: h["histograms"]["a"].update(size="big"), None, "damaged"),
    (lambda h: h["histograms"]["a"].__delitem__("count"), None, "missing field 'count'"),
    (lambda h: h.update(excluded=["mask"]), None, "damaged"),
    (lambda h: ["not", "a", "header"], None, "not an onnxpress calibration table"),
    (lambda h: None, "h0", r"the bin counts of 'a' are missing"),  # loaded as an empty histogram before
])
def test_a_damaged_header_is_one_clear_error(tmp_path, edit, drop, match) -> None:
    path = table_from(data()).save(tmp_path / "t.npz")
    _rewrite(path, tmp_path / "bad.npz", edit, drop)
    with pytest.raises(CalibrationError, match=match) as err:
        CalibrationTable.load(tmp_path / "bad.npz")
    assert "bad.npz" in str(err.value)


def test_saved_table_has_the_mode_a_plain_open_gives(tmp_path) -> None:
    import os

    old = os.umask(0o022)
    try:
        path = table_from(data()).save(tmp_path / "t.npz")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # a scratch file's 0600 would lock out other workers


def test_merge_refuses_unknown_methods_and_shards_of_other_settings() -> None:
    a, b = table_from(data(0)), table_from(data(1))
    with pytest.raises(CalibrationError, match="unknown calibration method 'kll'"):
        CalibrationTable.merge(a, b, method="kll")
    b.meta["bits"] = 4
    with pytest.raises(CalibrationError, match=r"different bits \(4, 8\)"):
        CalibrationTable.merge(a, b)
    assert CalibrationTable.merge(a, b, method="minmax")["a"].method == "minmax"  # minmax reads no bits
    b.meta["bits"], b.meta["percentile"] = 8, 99.9
    assert CalibrationTable.merge(a, b).meta["merged_from"] == 2  # kl reads no percentile
    with pytest.raises(CalibrationError, match=r"different percentile \(99.9, 99.99\)"):
        CalibrationTable.merge(a, b, method="percentile")


@pytest.mark.parametrize("method", ["kl", "mse", "percentile", "minmax"])
def test_merging_shards_equals_calibrating_everything(method: str) -> None:
    full, left, right = data(0), {}, {}
    for name, (arr,) in full.items():
        left[name], right[name] = [arr[: arr.size // 3]], [arr[arr.size // 3 :]]
    merged = CalibrationTable.merge(table_from(left, method), table_from(right, method))
    whole = table_from(full, method)
    assert merged.ranges == whole.ranges
    assert set(merged.excluded) == {"mask"}
    assert merged.meta["merged_from"] == 2


def test_merge_takes_a_list_of_tables_and_refuses_what_is_not_one(tmp_path) -> None:
    a, b = table_from(data(0)), table_from(data(1))
    assert CalibrationTable.merge([a, b]).ranges == CalibrationTable.merge(a, b).ranges  # an AttributeError before
    with pytest.raises(CalibrationError, match=r"merge takes CalibrationTables .* got a PosixPath"):
        CalibrationTable.merge(a, a.save(tmp_path / "a.npz"))


def test_merge_without_histograms_only_as_minmax() -> None:
    a = CalibrationTable.from_ranges({"x": (-1.0, 2.0)}, method="minmax")
    b = CalibrationTable.from_ranges({"x": (-3.0, 1.0)}, method="minmax")
    assert CalibrationTable.merge(a, b)["x"] == TensorRange(-3.0, 2.0, "minmax")
    with pytest.raises(CalibrationError, match="without histograms"):
        CalibrationTable.merge(a, b, method="kl")
    with pytest.raises(CalibrationError, match="different tensors"):
        CalibrationTable.merge(a, CalibrationTable.from_ranges({"y": (0.0, 1.0)}, method="minmax"))
    with pytest.raises(CalibrationError, match="mix methods"):
        CalibrationTable.merge(a, CalibrationTable.from_ranges({"x": (0.0, 1.0)}, method="kl"))


def test_summary_reports_the_clipping() -> None:
    r = np.random.default_rng(5)
    x = r.standard_normal(20000).astype(np.float32)
    x[0] = 40.0
    t = table_from({"x": [x]})
    s = t.summary("x")
    assert s.amax == 40.0 and s.threshold == t["x"].amax
    assert 0 < s.clip_ratio < 0.5 and 0 < s.clipped_fraction < 0.01
    assert s.p99 < s.p9999 <= s.amax + s.width
    assert 0.4 < s.negative_fraction < 0.6 and s.bins_used >= 2048
    with pytest.raises(CalibrationError, match="no histogram"):
        CalibrationTable.from_ranges({"x": (0.0, 1.0)}).summary("x")


def test_subsampled_histograms_round_trip_and_merge_only_with_the_same_setting(tmp_path) -> None:
    r = np.random.default_rng(9)
    x = r.laplace(0, 1, (40, 200)).astype(np.float32)

    def shard(part: np.ndarray, k: int | None) -> CalibrationTable:
        obs = make_observer("mse", "x", values_per_sample=k)
        obs.update(part)
        return CalibrationTable({"x": obs.compute_range()}, histograms={"x": obs.histogram}, meta={"bits": 8})

    a, b = shard(x[:25], 32), shard(x[25:], 32)
    loaded = CalibrationTable.load(a.save(tmp_path / "a.npz"))
    assert loaded.histograms["x"].values_per_sample == 32 and loaded.ranges == a.ranges
    assert CalibrationTable.merge(loaded, b).ranges == shard(x, 32).ranges  # exact sum of the shards
    with pytest.raises(CalibrationError, match="same setting"):
        CalibrationTable.merge(a, shard(x[25:], None))
