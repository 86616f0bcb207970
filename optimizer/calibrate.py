"""``onnxpress.calibrate``: one pass over sample data -> a :class:`CalibrationTable`.

    model + data  --collect_statistics-->  {tensor: observer}  --compute_range-->  table

The model is loaded as a private copy; the wanted activations become extra outputs of one
in-memory onnxruntime session (see :mod:`onnxpress.calibration.collect`). Tensors that cannot get a
range (never observed, NaN, +-inf such as attention masks, zero everywhere) are listed in
``table.excluded`` with the reason instead of failing the whole calibration. Outputs of
value-preserving ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity, Dropout) hold the
same values as their input, so they share its observer (exact, and half the work on attention
blocks).

Histograms bin ``histogram_values_per_sample`` values of each sample of more than twice as many
(positions set by the sample's shape and values; smaller samples whole; min/max stay exact; see
:mod:`onnxpress.calibration.histogram`), but only for tensors
whose axis 0 is the batch axis (:func:`~onnxpress.calibration.collect.batch_major_tensors`): there a
sample is one axis-0 slice, so the table stays independent of batch size and sample order. Other
tensors bin every value.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx

from onnxpress.calibration.collect import (
    DEFAULT_BUDGET_MB,
    batch_major_tensors,
    collect_statistics,
    select_tensors,
    value_aliases,
)
from onnxpress.calibration.histogram import DEFAULT_BINS
from onnxpress.calibration.observers import METHODS, HistogramObserver, MinMaxObserver, make_observer
from onnxpress.calibration.readers import accepts_infinite_inputs
from onnxpress.calibration.table import CalibrationTable, TensorRange
from onnxpress.errors import CalibrationError, check_argument_types
from onnxpress.model_io import ModelSource, check_model, infer_shapes, is_large, load_model, uses_external_data

__all__ = ["DEFAULT_HISTOGRAM_VALUES_PER_SAMPLE", "calibrate"]

DEFAULT_HISTOGRAM_VALUES_PER_SAMPLE: int | None = 4096
"""Histogram values per sample and tensor (``None``: all).

Chosen by measurement (reference models, 250 digits, kl/mse/percentile): with 4096 the thresholds
moved by a median 0.0-0.8% from exact histograms, less than calibrating on the other 250 digits
moves them (0.1-1.6%); with 1024 they moved 0.1-6% (KL most). ``bench/calibration.py`` prints both.
"""

log = logging.getLogger(__name__)


@accepts_infinite_inputs  # an attention mask fed as an input holds -inf: reported, left float
def calibrate(
    model: ModelSource,
    data: object,
    *,
    method: str = "mse",
    tensors: Sequence[str] | None = None,
    op_types: Iterable[str] | None = None,
    bits: int | None = None,
    bins: int | None = None,
    percentile: float | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    progress: bool = False,
    memory_budget_mb: float | None = DEFAULT_BUDGET_MB,
    histogram_values_per_sample: int | None = DEFAULT_HISTOGRAM_VALUES_PER_SAMPLE,
) -> CalibrationTable:
    """Calibrate the activation ranges of ``model`` on ``data``.

    Args:
        model: path or ModelProto (never modified).
        data: an ``.npz`` path, a folder of ``.npz`` feeds, an iterable of feed dicts, an
            onnxruntime ``CalibrationDataReader`` (all via ``open_data``) or a ``DataReader``.
        method: ``"mse"`` (the default, as ``onnxpress.quantize``'s: a table calibrated alone then quantizes as
            ``quantize(calib=...)`` does; it was ``"kl"`` until 2026-12-02, whose table gave the reference ResNet
            26.2 dB instead of 37.9), ``"kl"`` (TensorRT-style entropy), ``"minmax"`` or ``"percentile"``.
        tensors: the tensors to calibrate; default: inputs/outputs of the ops in ``op_types``.
        op_types: op types whose float inputs/outputs are calibrated (default: the quantizable ones).
        bits: quantization bit width the search assumes (default 8: 256 levels; ``kl`` and ``mse`` only).
        bins: minimum histogram resolution (a power of two, default ``DEFAULT_BINS``; histogram methods only).
        percentile: for ``method="percentile"``, the percentile of ``|x|`` kept (default 99.99);
            refused with another method, which would ignore it.
        batch_size: samples per inference call (when the model's batch dimension is dynamic).
        max_samples: use at most this many samples.
        progress: show a progress bar.
        memory_budget_mb: cap on one batch's observed values; the batch shrinks to fit (``None``: off).
        histogram_values_per_sample: histogram methods bin this many values of each sample of a
            tensor that has more than twice as many (positions set by the sample's shape and values;
            min/max and the bin width stay exact); ``None`` bins every value (module docstring).

    Returns:
        The table; histogram methods also keep each tensor's histogram (for ``summary``/``merge``).

    Raises:
        CalibrationError: unknown method or bad settings, no samples, unknown tensor names.
        DataError: the data does not fit the model.
    """
    check_argument_types("calibrate", flags={"progress": progress},
                         counts={"bits": bits, "bins": bins, "batch_size": batch_size, "max_samples": max_samples},
                         numbers={"percentile": percentile, "memory_budget_mb": memory_budget_mb})
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    # a setting the method does not read would be ignored without a word
    unread = [f"{key}={value:g} (--{key})" for key, value, readers in (
        ("percentile", percentile, ("percentile",)), ("bins", bins, ("kl", "mse", "percentile")),
        ("bits", bits, ("kl", "mse"))) if value is not None and method not in readers]
    if unread:
        raise CalibrationError(f"method={method!r} does not read {' or '.join(unread)}: drop "
                               f"{'it' if len(unread) == 1 else 'them'}, or choose a method that does")
    bits = 8 if bits is None else bits
    bins = DEFAULT_BINS if bins is None else bins
    percentile = 99.99 if percentile is None else percentile
    # calibration only runs the model: a large ModelProto (a caller's working copy) is checked, not copied,
    # and a file's external data stays in its file, which onnxruntime maps itself (bench/large_model.py,
    # 2.25 GiB of weights: calibrate 9.9-12.3 s -> 2.0 s, peak memory 7.09 -> 2.59 GB)
    folder = None
    if isinstance(model, onnx.ModelProto) and is_large(model):
        check_model(model, where="the given ModelProto")
        m = model
    elif isinstance(model, onnx.ModelProto):
        m = load_model(model)
    else:
        m = load_model(model, external_data=False)
        folder = str(Path(model).resolve().parent) if uses_external_data(m) else None
    inferred = infer_shapes(m, weights=False)  # once, for the selection, the batch axes and the collector
    names = list(tensors) if tensors is not None else select_tensors(m, op_types, inferred=inferred)
    if not names:
        raise CalibrationError("the model has no float activations to calibrate for the chosen op types")
    roots = value_aliases(m, names)  # Reshape/Transpose/... outputs share their input's observer
    k = histogram_values_per_sample
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise CalibrationError(f"histogram_values_per_sample must be a positive integer or None (all values), got {k}")
    sampled = batch_major_tensors(m, names, inferred=inferred) if k is not None and method != "minmax" else set()
    observers = {
        n: make_observer(
            method, n, bins=bins, bits=bits, percentile=percentile, values_per_sample=k if n in sampled else None
        )
        for n in names
        if roots[n] == n
    }
    reader = _as_reader(data, m, max_samples)
    samples = collect_statistics(
        m,
        reader,
        observers,
        batch_size=batch_size,
        max_samples=max_samples,
        progress=progress,
        memory_budget_mb=memory_budget_mb,
        threads=_session_threads(observers.values()),
        inferred=inferred,
        external_data_folder=folder,
    )
    table = CalibrationTable(
        meta={
            "method": method,
            "bits": bits,
            "bins": bins,
            "percentile": percentile,
            "samples": samples,
            "histogram_values_per_sample": k if method != "minmax" else None,
        }
    )
    # the searches are numpy-bound and release the GIL: one thread per core
    with ThreadPoolExecutor(max_workers=min(len(observers), os.cpu_count() or 1)) as pool:
        results = list(pool.map(_range_or_error, observers.values()))
    by_root = dict(zip(observers, results, strict=True))
    for name in names:
        obs, result = observers[roots[name]], by_root[roots[name]]
        if isinstance(obs, HistogramObserver):
            table.histograms[name] = obs.histogram
        if isinstance(result, CalibrationError):
            alias = f" ({name!r} holds the same values)" if roots[name] != name else ""
            table.excluded[name] = f"{result}{alias}"
            log.warning("excluded %s: %s", name, result)
            continue
        table.ranges[name] = dataclasses.replace(result, samples=samples)
    if not table.ranges:  # e.g. one +inf pixel: it reaches every layer, and an empty table quantizes nothing
        first = next(iter(table.excluded))
        raise CalibrationError(
            f"no tensor got a range: all {len(names)} were left out ({first}: {table.excluded[first]}); a NaN or "
            "infinite value in the data reaches every layer after it: remove the samples that hold one"
        )
    return table


def _session_threads(observers: Iterable[MinMaxObserver | HistogramObserver]) -> int | None:
    """Threads for onnxruntime: one core fewer than the machine has when some histogram bins every value.

    Exact histogram updates (``np.add.at`` holds the GIL) run on one observer thread in parallel
    with onnxruntime and are the slower side of that pipeline; leaving their core to them measured
    KL calibration 10-20% faster on the 2-core reference box (resnet, mobilenet, concat,
    transformer at N=500). Subsampled histograms (``values_per_sample``) cost about what MinMax's
    updates cost, and then onnxruntime's default (every core) measured faster in 7 of 8 cases
    (4 reference models x N=100/500, 1024 values per sample, box loaded by other jobs): KL/MinMax
    wall time 2.0-3.4x against 1.8-6.0x with one core left to the observer. MinMax keeps
    onnxruntime's default.
    """
    exact = any(isinstance(o, HistogramObserver) and o.histogram.values_per_sample is None for o in observers)
    return max(1, (os.cpu_count() or 2) - 1) if exact else None


def _range_or_error(obs: MinMaxObserver | HistogramObserver) -> TensorRange | CalibrationError:
    """The observer's range, or the CalibrationError saying why it has none."""
    try:
        return obs.compute_range()
    except CalibrationError as exc:
        return exc


def _as_reader(data: object, model: object, max_samples: int | None) -> object:
    """A ``DataReader`` for ``data`` (or the iterable itself if the readers module is missing)."""
    if callable(getattr(data, "batches", None)):
        return data
    try:
        from onnxpress.calibration.readers import open_data
    except ImportError:  # readers not installed yet: plain iterables of feed dicts still work
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise CalibrationError("reading data files needs onnxpress.calibration.readers") from None
        return data
    return open_data(data, model, max_samples=max_samples)  # type: ignore[arg-type]
