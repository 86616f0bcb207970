"""``onnxpress.lowrank``: split Gemm/MatMul and Conv weights into low-rank factors.

Three steps, each with one owner::

    load + cleanup (fold BN/constants)  ->  [calib data] collect E[x xᵀ] per layer input
        ->  SplitLowRank(rank | energy | flops, moments)  ->  check + save

The statistics are gathered here (streamed through ``collect_statistics`` into the observers of
:mod:`onnxpress.calibration.moments`); the pass itself runs no inference and only receives numpy
arrays. See :mod:`onnxpress.passes.low_rank` for the maths and the rank selection.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.calibration.moments import PatchSecondMomentObserver, SecondMomentObserver
from onnxpress.driver import transform
from onnxpress.errors import CalibrationError
from onnxpress.model_io import ModelSource, check_output_path, infer_shapes, load_model, normalize_model
from onnxpress.passes.flops import count_params
from onnxpress.passes.low_rank import LayerReport, MomentSpec, SplitLowRank, moment_requests
from onnxpress.pipeline import cleanup_passes, import_graph, run_passes
from onnxpress.reporting import format_table

__all__ = ["LowRankResult", "collect_moments", "lowrank"]


@dataclasses.dataclass(frozen=True)
class LowRankResult:
    """The split model, where it was written, and what happened to each candidate layer.

    Attributes:
        model: the rewritten model.
        output: the written path (``None`` when not asked to write).
        layers: one :class:`~onnxpress.passes.low_rank.LayerReport` per candidate layer.
        macs_before, macs_after: whole-model MACs per sample (Conv/Gemm/MatMul).
        params_before, params_after: floating-point initializer elements of the whole model.
        notes: why layers were kept (one line each).
        data_aware: whether input second moments were used.
    """

    model: onnx.ModelProto
    output: Path | None
    layers: tuple[LayerReport, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    notes: tuple[str, ...]
    data_aware: bool

    def table(self) -> str:
        """Per-layer rank, energy kept, MACs and params before → after, and a total row."""
        rows: list[list[object]] = []
        for lay in self.layers:
            if lay.full_rank == 0:
                rows.append([lay.key, lay.op, "-", "-", "-", "-", "-", f"kept: {lay.skipped}"])
                continue
            shape = f"{lay.shape[0]}x{lay.shape[1]}" + (f" g{lay.groups}" if lay.groups > 1 else "")
            rank = f"{lay.rank}/{lay.full_rank}" if lay.rank is not None else f"-/{lay.full_rank}"
            note = lay.method if lay.skipped is None else f"kept: {lay.skipped}"
            rows.append([lay.key, lay.op, shape, rank, f"{lay.energy:.4f}",
                         f"{lay.macs_before:,} -> {lay.macs_after:,}",
                         f"{lay.params_before:,} -> {lay.params_after:,}", note])
        rows.append(["total", "", "", "", "", f"{self.macs_before:,} -> {self.macs_after:,} "
                     f"({self.macs_after / max(self.macs_before, 1):.3f})",
                     f"{self.params_before:,} -> {self.params_after:,} "
                     f"({self.params_after / max(self.params_before, 1):.3f})", ""])
        header = ["layer", "op", "m x n", "rank", "energy", "MACs/sample", "params", "method or why kept"]
        return format_table(header, rows)


def _params(model: onnx.ModelProto) -> int:
    return sum(count_params(model).values())


class _Fanout:
    """Feeds one observed tensor to several observers (one per distinct moment spec)."""

    def __init__(self, observers: Sequence[Any]) -> None:
        self.observers = list(observers)

    def update(self, x: np.ndarray) -> None:
        for obs in self.observers:
            obs.update(x)


def _observer(spec: MomentSpec) -> SecondMomentObserver:
    if spec.axis is not None:
        return SecondMomentObserver(spec.axis, name=spec.tensor)
    return PatchSecondMomentObserver(spec.kernel, spec.strides, spec.pads, spec.dilations, name=spec.tensor)


def collect_moments(
    model: onnx.ModelProto,
    data: Any,
    *,
    ops: Sequence[str] = ("Gemm", "MatMul", "Conv"),
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Input second moments ``E[x xᵀ]`` of every splittable layer of ``model``, keyed by layer key.

    One observer per distinct (tensor, geometry); all of them filled in a single streamed pass of
    ``collect_statistics`` over ``data``. Conv layers whose geometry the patch observer does not
    handles (not 2-D, ``auto_pad=SAME_*``) are left out by ``moment_requests`` (they get the plain SVD).

    Args:
        model: the model the pass will run on (same tensor names).
        data: anything ``onnxpress.calibration.readers.open_data`` accepts (``.npz`` path, folder,
            iterable of feed dicts, onnxruntime ``CalibrationDataReader``).
        ops: op types to collect for.
        batch_size: samples per inference batch.
        max_samples: stop after this many samples (``None``: all).
        progress: show a progress bar.

    Raises:
        DataError: the data does not fit the model.
        CalibrationError: nothing was observed.
    """
    from onnxpress.calibration.collect import collect_statistics
    from onnxpress.calibration.readers import open_data

    graph = import_graph(model)
    requests = moment_requests(graph, ops)
    by_spec: dict[MomentSpec, SecondMomentObserver] = {}
    for spec in requests.values():
        if spec not in by_spec:
            by_spec[spec] = _observer(spec)
    per_tensor: dict[str, list[SecondMomentObserver]] = {}
    for spec, obs in by_spec.items():
        per_tensor.setdefault(spec.tensor, []).append(obs)
    observers = {name: obs[0] if len(obs) == 1 else _Fanout(obs) for name, obs in per_tensor.items()}
    if not observers:
        return {}
    reader = open_data(data, model, max_samples=max_samples)
    seen = collect_statistics(model, reader, observers, batch_size=batch_size, max_samples=max_samples,
                              progress=progress)
    if not seen:
        raise CalibrationError("calibration data yielded no samples; give at least one sample")
    return {key: by_spec[spec].compute() for key, spec in requests.items() if spec in by_spec}


def lowrank(
    model: ModelSource,
    output: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    flops: float | None = None,
    calib: Any = None,
    moments: Mapping[str, np.ndarray] | None = None,
    multiple: int = 1,
    conv_method: str = "channel",
    ops: Iterable[str] = ("Gemm", "MatMul", "Conv"),
    ridge: float = 1e-3,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> LowRankResult:
    """Split Gemm/MatMul and Conv layers into two (or three, Tucker-2) low-rank layers.

    Exactly one of ``rank``, ``energy`` or ``flops`` selects the ranks. With ``calib`` (or
    precomputed ``moments``) the split is data-aware: it minimises the expected output error on the
    calibration inputs instead of the weight error.

    Args:
        model: path or ModelProto (never modified).
        output: where to write the result (atomically, checked); ``None`` to only return it.
        rank: the same rank for every layer.
        energy: smallest rank keeping this fraction of each layer's energy (0 < e ≤ 1).
        flops: whole-model MACs budget as a fraction of the original (0 < f ≤ 1).
        calib: calibration data (anything ``open_data`` accepts) for the data-aware split.
        moments: precomputed second moments ``{layer key: C}`` (see :func:`collect_moments`).
        multiple: round ranks up to a multiple of this.
        conv_method: ``"channel"`` or ``"tucker2"``.
        ops: which op types to split.
        ridge: relative ridge on the second moments.
        batch_size: calibration batch size.
        max_samples: calibration samples to use (``None``: all).
        progress: show progress bars.

    Raises:
        ValueError: not exactly one of rank/energy/flops, or a value out of range.
        OutputError, ModelLoadError, DataError, CalibrationError, UnsupportedModelError: as named.
    """
    ops = tuple(ops)
    split = SplitLowRank(rank=rank, energy=energy, flops=flops, multiple=multiple, ridge=ridge,
                         conv_method=conv_method, ops=ops)  # validates the arguments before any work
    if calib is not None and moments is not None:
        raise ValueError("give calib= or moments=, not both")
    if output is not None:
        check_output_path(output, [model, calib])  # never overwrite the calibration data
    proto = normalize_model(load_model(model))
    # shapes on every tensor: the pass reads conv input sizes (Tucker-2 cost) from them
    cleaned = infer_shapes(run_passes(proto, cleanup_passes(), progress=progress).model)
    if calib is not None:
        moments = collect_moments(cleaned, calib, ops=ops, batch_size=batch_size, max_samples=max_samples,
                                  progress=progress)
    split.moments = dict(moments or {})
    result = transform(cleaned, [split], output, progress=progress)
    return LowRankResult(
        result.model, result.output, split.report, split.macs[0], split.macs[1], _params(proto),
        _params(result.model), result.pipeline.notes, bool(split.moments),
    )
