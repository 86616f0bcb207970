"""Calibration table: tensor name → range (min, max) and how it was chosen.

Core data type shared by calibration (which fills it) and the quantization passes (which read
it). Missing tensors raise :class:`CalibrationError`; there is no silent default range.

A table may also carry each tensor's :class:`~onnxpress.calibration.histogram.Histogram`, which
makes it mergeable: calibrate shards of the data on several workers, then
``CalibrationTable.merge(a, b)`` sums the histograms exactly and recomputes each range with the
table's method (the result equals calibrating on all the data at once).

File format (``save`` / ``load``): one ``.npz`` holding ``header`` (UTF-8 JSON as uint8:
``{"format": "onnxpress.calibration", "version": 1, "ranges": {...}, "excluded": {...},
"histograms": {name: {"key": "h0", "exp": ..., ...}}, "meta": {...}}``) and one int64 array of
bin counts per histogram under its ``key``. Written atomically; ``load`` refuses other formats and
newer versions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxpress.errors import CalibrationError
from onnxpress.model_io import move_into_place

if TYPE_CHECKING:
    from onnxpress.calibration.histogram import Histogram

__all__ = ["CalibrationTable", "HistogramSummary", "TensorRange"]

TABLE_VERSION = 1
TABLE_FORMAT = "onnxpress.calibration"


@dataclasses.dataclass(frozen=True)
class TensorRange:
    """The calibrated range of one tensor.

    Attributes:
        min: lower end of the range (≤ 0 is not required; quantizers widen to include 0).
        max: upper end of the range.
        method: how it was chosen ("minmax", "percentile", "kl", "mse", "manual").
        samples: how many samples the observer saw.
    """

    min: float
    max: float
    method: str = "manual"
    samples: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise CalibrationError(f"range [{self.min}, {self.max}] is not finite")
        if self.min > self.max:
            raise CalibrationError(f"range min {self.min} > max {self.max}")

    @property
    def amax(self) -> float:
        """max(|min|, |max|): the symmetric threshold."""
        return max(abs(self.min), abs(self.max))


_READS = {"kl": ("bits", 8), "mse": ("bits", 8), "percentile": ("percentile", 99.99)}
"""Per method, the table setting (``meta`` key, default) its range rule reads besides the histogram."""


@dataclasses.dataclass
class CalibrationTable:
    """Mapping of tensor name → :class:`TensorRange`, plus which tensors were left out and why."""

    ranges: dict[str, TensorRange] = dataclasses.field(default_factory=dict)
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    version: int = TABLE_VERSION
    histograms: dict[str, Histogram] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_ranges(cls, ranges: Mapping[str, tuple[float, float]], method: str = "manual") -> CalibrationTable:
        """Build a table from ``{name: (min, max)}`` (handy in tests and for hand-made tables)."""
        return cls({k: TensorRange(float(lo), float(hi), method) for k, (lo, hi) in ranges.items()})

    def __getitem__(self, name: str) -> TensorRange:
        try:
            return self.ranges[name]
        except KeyError:
            why = self.excluded.get(name)
            detail = f" (excluded: {why})" if why else ""
            raise CalibrationError(
                f"no calibrated range for tensor {name!r}{detail}; recalibrate with this model"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.ranges

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    # ------------------------------------------------------------------ summaries
    def summary(self, name: str) -> HistogramSummary:
        """Histogram summary of one tensor (needs the table to carry histograms).

        Raises:
            CalibrationError: the tensor has no range or no histogram.
        """
        rng = self[name]
        hist = self.histograms.get(name)
        if hist is None:
            raise CalibrationError(f"table has no histogram for {name!r}; calibrate with a histogram method")
        return HistogramSummary.of(hist, rng)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table to ``path`` (``.npz``; atomically: temp file beside it, then rename).

        Raises:
            OutputError: the folder is missing or not writable.
        """
        from onnxpress.model_io import check_output_path

        out = check_output_path(path, example="table.npz")
        arrays: dict[str, np.ndarray] = {}
        hists: dict[str, dict[str, Any]] = {}
        for k, (name, h) in enumerate(sorted(self.histograms.items())):
            key = f"h{k}"
            hists[name] = {
                "key": key,
                "size": h.size,
                "exp": h.exp,
                "zeros_pending": h.zeros_pending,
                "min": _num(h.min),
                "max": _num(h.max),
                "count": h.count,
                "nan": h.nan,
                "posinf": h.posinf,
                "neginf": h.neginf,
                "values_per_sample": h.values_per_sample,
            }
            if h.counts is not None:
                arrays[key] = h.counts
        header = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "ranges": {n: dataclasses.asdict(r) for n, r in self.ranges.items()},
            "excluded": self.excluded,
            "histograms": hists,
            "meta": self.meta,
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(prefix=".onnxpress-", suffix=".npz", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
            move_into_place(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationTable:
        """Read a table written by :meth:`save`.

        Raises:
            CalibrationError: missing/unreadable file, not a calibration table, newer version.
        """
        p = Path(path)
        if not p.is_file():
            raise CalibrationError(f"calibration table {p} not found")
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
            if magic != b"PK\x03\x04":  # an .npz is a zip archive; numpy's own error speaks of pickles
                raise CalibrationError(
                    f"{p} is not an onnxpress calibration table (not an .npz archive); give the file that "
                    "`onnxpress calibrate -o TABLE.npz` or CalibrationTable.save wrote"
                )
            with np.load(p, allow_pickle=False) as z:
                if "header" not in z:
                    raise CalibrationError(f"{p} is not an onnxpress calibration table (no header)")
                header = json.loads(z["header"].tobytes().decode())
                counts = {k: z[k] for k in z.files if k != "header"}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:  # a zip cut short is a BadZipFile
            raise CalibrationError(f"cannot read calibration table {p}: {exc}") from None
        if not isinstance(header, dict) or header.get("format") != TABLE_FORMAT:
            what = header.get("format") if isinstance(header, dict) else header
            raise CalibrationError(f"{p} is not an onnxpress calibration table (format {what!r})")
        version = header.get("version")
        if not isinstance(version, int) or version > TABLE_VERSION:
            raise CalibrationError(
                f"{p} has table version {version}; this onnxpress reads up to {TABLE_VERSION}: upgrade onnxpress"
            )
        try:
            return cls._from_header(header, counts, version)
        except (KeyError, TypeError, AttributeError, ValueError, CalibrationError) as exc:
            # a header edited by hand or written by something else: one message, not a traceback from the parser
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise CalibrationError(
                f"calibration table {p} is damaged ({what}); calibrate again with `onnxpress calibrate`"
            ) from None

    @classmethod
    def _from_header(cls, header: dict[str, Any], counts: dict[str, np.ndarray], version: int) -> CalibrationTable:
        """The table a checked header and its count arrays describe (KeyError/TypeError/ValueError when damaged)."""
        from onnxpress.calibration.histogram import Histogram

        ranges = {str(n): TensorRange(float(r["min"]), float(r["max"]), str(r.get("method", "manual")),
                                      int(r.get("samples", 0)))
                  for n, r in header["ranges"].items()}
        hists = {}
        for name, h in header.get("histograms", {}).items():
            size, exp = int(h["size"]), h["exp"]
            arr = counts.get(h["key"])
            if exp is not None and (arr is None or arr.shape != (2 * size,)):
                # a histogram that saw values has 2*size counts; a missing array would load as empty
                raise ValueError(f"the bin counts of {name!r} are missing or the wrong size")
            hists[str(name)] = Histogram(
                size=size,
                exp=None if exp is None else int(exp),
                counts=None if exp is None else arr.astype(np.int64),
                zeros_pending=int(h["zeros_pending"]),
                min=math.inf if h["min"] is None else float(h["min"]),
                max=-math.inf if h["max"] is None else float(h["max"]),
                count=int(h["count"]),
                nan=int(h["nan"]),
                posinf=int(h["posinf"]),
                neginf=int(h["neginf"]),
                values_per_sample=h.get("values_per_sample"),  # absent in tables written before it existed
            )
        return cls(ranges, dict(header.get("excluded", {})), version, hists, dict(header.get("meta", {})))

    # ------------------------------------------------------------------ merge
    @classmethod
    def merge(cls, *tables: CalibrationTable, method: str | None = None) -> CalibrationTable:
        """Combine tables calibrated on shards of the same model's data.

        Histograms are summed exactly and each range recomputed with ``method`` (default: the
        method the shards used); tables without histograms can only be merged as ``minmax``
        (union of ranges). A tensor excluded in any shard stays excluded; samples add up.
        The tables come one by one (``merge(t1, t2)``) or as one list or tuple (``merge([t1, t2])``).

        Raises:
            CalibrationError: no tables, something that is not a table, different tensor sets, mixed methods,
                an unknown method, shards calibrated with a different setting the method reads (``bits`` for
                kl/mse, ``percentile``), or a non-minmax merge without histograms.
        """
        from onnxpress.calibration.observers import METHODS, range_from_histogram

        if len(tables) == 1 and isinstance(tables[0], list | tuple):  # merge([t1, t2]) reads as merge(t1, t2)
            tables = tuple(tables[0])
        if not tables:
            raise CalibrationError("merge needs at least one table")
        for t in tables:
            if not isinstance(t, CalibrationTable):
                raise CalibrationError(f"merge takes CalibrationTables (CalibrationTable.load(path) reads one), "
                                       f"got a {type(t).__name__}")
        first = tables[0]
        names = set(first.ranges) | set(first.excluded)
        for t in tables[1:]:
            other = set(t.ranges) | set(t.excluded)
            if other != names:
                diff = sorted(names ^ other)[:5]
                raise CalibrationError(f"tables cover different tensors (e.g. {diff}); calibrate the same model")
        methods = {r.method for t in tables for r in t.ranges.values()}
        if method is not None and method not in METHODS:
            raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
        if method is None:
            if len(methods) > 1:
                raise CalibrationError(f"tables mix methods {sorted(methods)}; pass method= to merge")
            method = methods.pop() if methods else "minmax"
        # the setting the range rule reads (minmax reads none): shards that disagree have no one merged range
        key, default = _READS.get(method, (None, None))
        seen = {t.meta.get(key, default) for t in tables} if key else set()
        if len(seen) > 1:
            raise CalibrationError(
                f"tables were calibrated with different {key} ({', '.join(map(str, sorted(seen)))}); "
                f"calibrate every shard with the same {key}, or merge tables of one setting"
            )
        bits = int(first.meta.get("bits", 8))
        percentile = float(first.meta.get("percentile", 99.99))
        excluded: dict[str, str] = {}
        for t in tables:
            excluded.update(t.excluded)
        ranges: dict[str, TensorRange] = {}
        hists: dict[str, Histogram] = {}
        for name in sorted(names):
            samples = sum(t.ranges[name].samples for t in tables if name in t.ranges)
            if all(name in t.histograms for t in tables):
                h = tables[0].histograms[name]
                for t in tables[1:]:
                    h = h.merge(t.histograms[name])
                hists[name] = h
                if name in excluded:
                    continue
                try:
                    r = range_from_histogram(h, method, bits=bits, percentile=percentile, name=name)
                except CalibrationError as exc:
                    excluded[name] = str(exc)
                    continue
                ranges[name] = dataclasses.replace(r, samples=samples)
            elif name in excluded:
                continue
            elif method == "minmax":
                lo = min(t.ranges[name].min for t in tables)
                hi = max(t.ranges[name].max for t in tables)
                ranges[name] = TensorRange(lo, hi, "minmax", samples)
            else:
                raise CalibrationError(
                    f"cannot merge {method!r} ranges of {name!r} without histograms; save tables with histograms"
                )
        meta = dict(first.meta)
        meta["method"] = method
        meta["samples"] = sum(int(t.meta.get("samples", 0)) for t in tables)
        meta["merged_from"] = len(tables)
        return cls(ranges, excluded, TABLE_VERSION, hists, meta)


@dataclasses.dataclass(frozen=True)
class HistogramSummary:
    """What a tensor's histogram says about its range.

    Attributes:
        amax: largest finite magnitude.
        threshold: the chosen range's magnitude ``max(|min|, |max|)``.
        clip_ratio: ``threshold / amax`` (1.0 = nothing clipped).
        clipped_fraction: share of values beyond the threshold.
        bins_used: magnitude bins up to the last non-empty one; ``width`` is the bin width.
        p99, p9999: 99th / 99.99th percentile of ``|x|`` (bin upper edges).
        negative_fraction: share of finite values below zero.
        count: finite values seen.
    """

    amax: float
    threshold: float
    clip_ratio: float
    clipped_fraction: float
    bins_used: int
    width: float
    p99: float
    p9999: float
    negative_fraction: float
    count: int

    @classmethod
    def of(cls, hist: Histogram, rng: TensorRange) -> HistogramSummary:
        """Summarise ``hist`` against the chosen range ``rng``."""
        from onnxpress.calibration.histogram import percentile_bin

        mag = hist.magnitude()
        total = max(int(mag.sum()), 1)
        w = hist.width
        thr = rng.amax
        kept = int(mag[: int(math.ceil(thr / w))].sum()) if w else total
        neg = int(hist.counts[: hist.size].sum()) if hist.counts is not None else 0
        amax = hist.amax
        return cls(
            amax=amax,
            threshold=thr,
            clip_ratio=thr / amax if amax else 1.0,
            clipped_fraction=1.0 - kept / total,
            bins_used=hist.occupied(),
            width=w,
            p99=percentile_bin(mag, 99.0) * w if mag.any() else 0.0,
            p9999=percentile_bin(mag, 99.99) * w if mag.any() else 0.0,
            negative_fraction=neg / total,
            count=hist.count,
        )


def _num(x: float) -> float | None:
    """JSON-safe float (``None`` for the infinities of an empty histogram)."""
    return x if math.isfinite(x) else None
