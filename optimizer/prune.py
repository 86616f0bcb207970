"""Channel pruning API: ``onnxpress.prune`` and the per-layer sensitivity scan.

The graph work is done by the passes in :mod:`onnxpress.passes.prune_channels`; this module owns
what needs inference or I/O: mean ``|activation|`` statistics for the ``act`` criterion (collected
with :func:`onnxpress.calibration.collect.collect_statistics` and a small observer), the sensitivity
scan (prune one group at a time, output SQNR on calibration data), and the before/after report::

    load -> normalise -> FoldConstants -> PruneZeroChannels (exact) -> [observe |x|] -> PruneChannels (lossy)
         -> check -> save

SQNR of a candidate output ``y`` against the reference ``r``, over every sample and logit::

    SQNR = 10 log10( sum r^2 / sum (r - y)^2 )   [dB]; +inf when identical.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.calibration.readers import symbolic_sizes
from onnxpress.errors import ArgumentError, CalibrationError, OnnxpressError, check_argument_types
from onnxpress.model_io import (
    ModelSource,
    check_model,
    check_output_path,
    load_model,
    normalize_model,
    refuse_quantized,
    save_model,
)
from onnxpress.passes.flops import (
    MAC_OPS,
    assume_input_dims,
    count_macs,
    count_params,
    model_size_bytes,
    node_key,
    scoped_input_dims,
)
from onnxpress.passes.fold import FoldConstants, ShareTransposedConstants
from onnxpress.passes.prelu import RewritePRelu
from onnxpress.passes.prune_channels import CRITERIA, PruneChannels, PruneZeroChannels, activation_targets
from onnxpress.pipeline import PipelineResult, run_passes

__all__ = [
    "LayerCost",
    "MeanAbsObserver",
    "PruneResult",
    "Sensitivity",
    "collect_channel_stats",
    "collect_mean_abs",
    "cost_report",
    "prune",
    "sensitivity_scan",
    "sqnr_db",
]

log = logging.getLogger(__name__)


class MeanAbsObserver:
    """Per-channel mean ``|x|`` (and mean ``x``) along ``axis``: ``update`` accumulates, ``compute`` divides."""

    def __init__(self, axis: int) -> None:
        """Observe channels on ``axis`` of every batch."""
        self.axis = axis
        self.total: np.ndarray | None = None
        self.signed: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Add ``sum |x|`` and ``sum x`` over every axis but the channel axis."""
        x = np.asarray(x)
        moved = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
        part = np.abs(moved, dtype=np.float64).sum(axis=1)
        signed = moved.sum(axis=1, dtype=np.float64)
        self.total = part if self.total is None else self.total + part
        self.signed = signed if self.signed is None else self.signed + signed
        self.count += moved.shape[1]

    def _check(self) -> None:
        if self.total is None or self.count == 0:
            raise CalibrationError("no activation values were observed; give non-empty calibration data")

    def compute(self) -> np.ndarray:
        """Mean ``|x|`` per channel.

        Raises:
            CalibrationError: no batch was observed.
        """
        self._check()
        return self.total / self.count

    def mean(self) -> np.ndarray:
        """Mean ``x`` per channel.

        Raises:
            CalibrationError: no batch was observed.
        """
        self._check()
        return self.signed / self.count


def collect_mean_abs(
    model: onnx.ModelProto,
    data: object,
    *,
    max_samples: int | None = 256,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Mean ``|x|`` per channel of every tensor a pruning consumer reads (for criterion ``act``).

    Same arguments as :func:`collect_channel_stats`.
    """
    return collect_channel_stats(model, data, max_samples=max_samples, batch_size=batch_size, progress=progress)[0]


def collect_channel_stats(
    model: onnx.ModelProto,
    data: object,
    *,
    max_samples: int | None = 256,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean ``|x|`` and mean ``x`` per channel of every tensor a pruning consumer reads.

    Args:
        model: the model to observe (not modified).
        data: anything ``open_data`` accepts (an ``.npz`` path, a folder, feed dicts, a reader).
        max_samples: samples to run.
        batch_size: samples per inference call.
        progress: show a progress bar.
    """
    from onnxpress.calibration.collect import collect_statistics
    from onnxpress.calibration.readers import open_data

    targets = activation_targets(gs.import_onnx(model))
    observers = {name: MeanAbsObserver(axis) for name, axis in targets.items()}
    if not observers:
        return {}, {}
    reader = open_data(data, model, max_samples=max_samples)
    collect_statistics(model, reader, observers, batch_size=batch_size, max_samples=max_samples, progress=progress)
    return {n: o.compute() for n, o in observers.items()}, {n: o.mean() for n, o in observers.items()}


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Parameters and MACs (per sample) of one Conv/ConvTranspose/Gemm/MatMul before and after."""

    name: str
    op: str
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None


def _costs(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int] | None, str | None]:
    """Params and MACs per layer, and why the MACs could not be counted (then None)."""
    try:
        return count_params(model), count_macs(model), None
    except OnnxpressError as exc:
        return count_params(model), None, str(exc)


def cost_report(before: onnx.ModelProto, after: onnx.ModelProto) -> tuple[list[LayerCost], LayerCost, tuple[int, int]]:
    """Per-layer rows, a total row, and (size before, size after) in bytes."""
    pb, mb, why = _costs(before)
    pa, ma, why_after = _costs(after)
    if why or why_after:  # once, though both models lack the sizes
        log.warning("MACs not counted: %s", why or why_after)
    ops = {node_key(n): n.op_type for n in before.graph.node}
    rows = [
        LayerCost(
            key, ops[key], pb.get(key, 0), pa.get(key, 0),
            None if mb is None else mb.get(key), None if ma is None else ma.get(key),
        )
        for key in (n for n in ops if ops[n] in MAC_OPS)
    ]
    total = LayerCost(
        "total", "", sum(pb.values()), sum(pa.values()),
        None if mb is None else sum(mb.values()), None if ma is None else sum(ma.values()),
    )
    return rows, total, (model_size_bytes(before), model_size_bytes(after))


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """The pruned model, where it was written, counters, notes, and the cost report."""

    model: onnx.ModelProto
    output: os.PathLike[str] | str | None
    stats: dict[str, int]
    notes: tuple[str, ...]
    layers: tuple[LayerCost, ...]
    total: LayerCost
    size_bytes: tuple[int, int]


def _before_pruning() -> list:
    """The passes prune and its sensitivity scan start with.

    Not the whole cleanup: the ``bn`` criterion reads BatchNormalization. FoldConstants: exporters leave
    weights behind Identity/Constant nodes that hide them. RewritePRelu: the channel analysis follows a
    per-channel PRelu as Relu + slope * Min(x, 0) (faster too).
    """
    return [FoldConstants(), RewritePRelu()]


@scoped_input_dims
def prune(
    model: ModelSource,
    output: str | os.PathLike[str] | None = None,
    *,
    ratio: float | None = None,
    criterion: str = "l2",
    scope: str = "global",
    multiple: int = 1,
    calib: object | None = None,
    compensate: bool = False,
    max_samples: int = 256,
    batch_size: int = 64,
    dims: Mapping[str, int] | None = None,
    progress: bool = False,
) -> PruneResult:
    """Prune channels: always the exactly removable ones, then (with ``ratio``) the least important.

    Args:
        model: path or ModelProto (never modified).
        output: where to write the result (atomic, checked); ``None`` to only return it.
        ratio: fraction of prunable channels to remove (``None``: exact zero-channel removal only).
        criterion: ``l1``, ``l2``, ``bn`` (needs BatchNormalization nodes), ``act`` or ``contrib`` (need ``calib``).
        scope: ``global`` threshold over all groups or the same ratio in each ``layer`` group.
        multiple: round kept channel counts per group to a multiple of this.
        calib: calibration data for ``act`` and ``compensate`` (anything ``open_data`` accepts).
        compensate: fold each removed channel's mean (measured on ``calib``) into its consumers' biases.
        max_samples: calibration samples for ``act``.
        batch_size: samples per inference call for ``act``.
        dims: sizes of the inputs' symbolic dimensions beyond the batch (a sequence length), by name or
            ``"<input>:<axis>"``, for the MAC columns; those left out come from the first sample of ``calib``.
        progress: progress bars.

    Raises:
        CalibrationError: ``act`` or ``compensate`` without ``calib``. Errors of loading, passes, saving.
        ValueError: a ratio outside [0, 1), an unknown criterion or scope.
        OnnxpressError: an argument of the wrong type (``compensate="yes"``, ``max_samples=2.5``, ``ratio="0.5"``).
    """
    check_argument_types("prune", flags={"compensate": compensate, "progress": progress},
                         counts={"multiple": multiple, "max_samples": max_samples, "batch_size": batch_size},
                         numbers={"ratio": ratio})
    if criterion not in CRITERIA:
        raise ArgumentError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if not ratio:  # exact removal only: the settings of pruning by importance would be ignored without a word
        unread = [text for text, given in ((f"criterion={criterion!r} (--criterion)", criterion != "l2"),
                                           (f"scope={scope!r} (--scope)", scope != "global"),
                                           (f"multiple={multiple} (--multiple)", multiple != 1),
                                           ("compensate (--compensate)", compensate)) if given]
        if unread:
            raise OnnxpressError(f"{', '.join(unread)} set{'s' if len(unread) == 1 else ''} how channels are pruned "
                                 f"by importance, and without a ratio > 0 (--ratio R) only exactly removable "
                                 f"channels go: add a ratio, or drop {'it' if len(unread) == 1 else 'them'}")
    if ratio is not None:
        PruneChannels(ratio, criterion=criterion, scope=scope, multiple=multiple)  # validates the arguments
        if criterion in ("act", "contrib") and calib is None:
            raise CalibrationError(f"criterion {criterion!r} needs calibration data (--calib DATA)")
        if compensate and calib is None:
            raise CalibrationError("mean compensation needs calibration data (--calib DATA)")
    if output is not None:
        check_output_path(output, [model, calib])  # calib: only when it is a path (never overwrite the data)
    original = load_model(model)
    refuse_quantized(original, "prune")
    original = normalize_model(original, in_place=True)
    _outputs_kept_apart(original)
    if calib is not None:  # read only by the data-driven criteria, --compensate, or for symbolic dimensions' sizes
        from onnxpress.passes.flops import symbolic_input_dims

        by_data = bool(ratio) and (criterion in ("act", "contrib") or compensate)
        if not by_data and all(key in (dims or {}) for key in symbolic_input_dims(original)):
            raise OnnxpressError(
                "calib (--calib) is read by criterion 'act' or 'contrib', by compensate (--compensate) and for the "
                "sizes of symbolic input dimensions, and this run has none of them: drop it"
            )
    assume_input_dims(symbolic_sizes(original, calib, dims))  # the report's MACs per sample at those sizes
    exact = run_passes(original, [*_before_pruning(), PruneZeroChannels()], progress=progress)
    stats, notes = dict(exact.stats), list(exact.notes)
    rewritten = stats.get("rewrite_prelu.leaky_relu", 0) + stats.get("rewrite_prelu.split", 0)
    if rewritten:  # the table's node and byte counts change even where no channel goes: say why
        notes.insert(0, f"rewrite_prelu: {rewritten} PRelu rewritten as LeakyRelu or Relu + slope * Min(x, 0) "
                        "(exact; onnxruntime runs it faster, and the channel analysis follows it)")
    pruned = exact.model
    if ratio is not None and ratio > 0:
        acts = means = None
        if criterion in ("act", "contrib") or compensate:
            acts, means = collect_channel_stats(
                pruned, calib, max_samples=max_samples, batch_size=batch_size, progress=progress
            )
        pass_ = PruneChannels(
            ratio, criterion=criterion, scope=scope, multiple=multiple, activations=acts,
            means=means if compensate else None,
        )
        lossy: PipelineResult = run_passes(pruned, [pass_], progress=progress)
        stats.update(lossy.stats)
        notes.extend(lossy.notes)
        pruned = lossy.model
    # a tied token table and its output layer's weight (folded from Transpose(W), pruned alike): stored once
    pruned = run_passes(pruned, [ShareTransposedConstants()]).model
    check_model(pruned, where="the pruned model")
    written = save_model(pruned, output) if output is not None else None
    layers, total, sizes = cost_report(original, pruned)
    return PruneResult(pruned, written, stats, tuple(notes), tuple(layers), total, sizes)


def _outputs_kept_apart(model: onnx.ModelProto) -> None:
    """Give the layers that read an initializer which is also a graph output a copy of it (in place).

    Pruning slices a weight where it is stored, so a weight that is also an output changed the model's output
    shape (w1 [32, 10] came out [16, 10]). The output keeps the original; the layers read the copy.
    """
    outputs = {o.name for o in model.graph.output}
    inits = {i.name: i for i in model.graph.initializer}
    shared = [name for name in outputs if name in inits and any(name in n.input for n in model.graph.node)]
    if not shared:
        return
    from onnxpress.passes.base import proto_names

    taken = proto_names(model.graph)
    for name in shared:
        copy_name = next(f"{name}_weight{'' if i == 0 else f'_{i}'}" for i in range(len(taken) + 1)
                         if f"{name}_weight{'' if i == 0 else f'_{i}'}" not in taken)
        taken.add(copy_name)
        weight = model.graph.initializer.add()
        weight.CopyFrom(inits[name])
        weight.name = copy_name
        for node in model.graph.node:
            node.input[:] = [copy_name if x == name else x for x in node.input]


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``candidate`` against ``reference`` in dB."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(((ref - np.asarray(candidate, dtype=np.float64)) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Output SQNR when only ``group`` is pruned to ``ratio`` (``channels`` units removed, MACs kept)."""

    group: str
    ratio: float
    units_removed: int
    macs_ratio: float
    sqnr_db: float


def _feeds(model: onnx.ModelProto, data: object, max_samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    if isinstance(data, Iterable) and not isinstance(data, (str, os.PathLike, Mapping)):
        data = list(data)
    from onnxpress.calibration.readers import open_data

    reader = open_data(data, model, max_samples=max_samples)
    return list(reader.batches(batch_size))


def _outputs(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    from onnxpress.runtime import make_session

    session = make_session(model, optimization="basic", what="model for the sensitivity scan")
    names = [o.name for o in session.get_outputs()]
    outs: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for i, value in enumerate(session.run(names, feed)):
            outs[i].append(value)
    return [np.concatenate([v.ravel() for v in o]) for o in outs]  # only compared as flat values (SQNR): batches of
    # a sequence-first output ([seq, batch, ...]) differ beyond axis 0


@scoped_input_dims
def sensitivity_scan(
    model: ModelSource,
    data: object,
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    criterion: str = "l2",
    groups: Sequence[str] | None = None,
    max_samples: int = 128,
    batch_size: int = 64,
    progress: bool = False,
) -> list[Sensitivity]:
    """Prune one channel group at a time at each ratio and measure the outputs' SQNR on ``data``.

    Args:
        model: path or ModelProto (never modified).
        data: calibration data (anything ``open_data`` accepts).
        ratios: ratios tried for each group.
        criterion: importance criterion (``act`` statistics are collected once, on ``data``).
        groups: group names to scan (default: every prunable group).
        max_samples: samples used.
        batch_size: samples per inference call.
        progress: progress bar over the (group, ratio) pairs.

    Returns:
        One row per (group, ratio), groups in graph order; SQNR over all outputs concatenated.
    """
    from tqdm.auto import tqdm

    from onnxpress.passes.channel_groups import analyze_channels

    proto = run_passes(normalize_model(load_model(model)), _before_pruning()).model
    assume_input_dims(symbolic_sizes(proto, data))
    feeds = _feeds(proto, data, max_samples, batch_size)
    reference = _outputs(proto, feeds)
    acts = None
    if criterion in ("act", "contrib"):
        acts = collect_mean_abs(proto, feeds, max_samples=max_samples, batch_size=batch_size)
    analysis = analyze_channels(gs.import_onnx(proto))
    frozen = analysis.frozen_units()
    names = [g.name for g in analysis.groups() if sum(u not in frozen for u in g.units) >= 2]
    if groups is not None:
        unknown = sorted(set(groups) - set(names))
        if unknown:
            raise ArgumentError(f"no prunable channel group named {unknown}; prunable groups: {names}")
        names = [n for n in names if n in set(groups)]
    macs_before = sum(count_macs(proto).values())
    rows = []
    pairs = [(name, float(r)) for name in names for r in ratios]
    for name, r in tqdm(pairs, desc="sensitivity", unit="prune", disable=not progress):
        result = run_passes(proto, [PruneChannels({name: r}, criterion=criterion, activations=acts)])
        outs = _outputs(result.model, feeds)
        sqnr = sqnr_db(np.concatenate([o.ravel() for o in reference]), np.concatenate([o.ravel() for o in outs]))
        macs = sum(count_macs(result.model).values()) / macs_before if macs_before else 1.0
        rows.append(Sensitivity(name, r, result.stats.get("prune_channels.units_removed", 0), macs, sqnr))
    return rows
