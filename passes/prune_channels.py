"""Structured channel pruning on the graph: exact removal of dead channels, and pruning to a target.

Both passes work on the units and groups of :mod:`onnxpress.passes.channel_groups`: a unit is a set
of coupled channels (a conv's output channel and, through a residual Add, the matching channels of
every other branch); removing it deletes the producers' rows, every per-channel parameter along the
way, and the consumers' input slices::

    X -> Conv(W[8,C]) -> BN -> Relu -> Conv(V[4,8,3,3])    ==>    X -> Conv(W[6,C]) -> BN -> Relu -> Conv(V[4,6,3,3])

**PruneZeroChannels** (exact) removes a unit when every consumer sees either a zero weight slice, a
provably zero input, or a provably constant input ``v`` that it can fold into its bias exactly::

    y = W·x + b,  x_c ≡ v   ==>   y = W[:, ≠c]·x[≠c] + (b + v · Σ_k W[:, c, k])

which holds for Gemm/MatMul and for a Conv whose windows never touch zero padding; otherwise the
channel is kept and the notes say why.

**PruneChannels** (lossy) scores each unit by an importance criterion (summed over the unit's
channels), normalises scores by their mean inside each group so that groups compare, and removes the
lowest scores: globally (one threshold over all groups, weighted by channel count) or per group.
Kept counts are rounded to a multiple (e.g. 8) for kernel efficiency, never below one channel.

- ``l1`` / ``l2``: norm of each producer's output filter ``W[o]``;
- ``bn``: ``|gamma|`` of the BatchNormalization after the channel (run before BN folding);
- ``act``: mean ``|x|`` of the tensors that enter the consumers, one value per channel, measured on
  calibration data by the caller (a pass runs no inference; see :func:`activation_targets`);
- ``contrib``: the consumers' expected output contribution ``mean|x_c| * ||W_consumer[:, c]||_2``
  (same statistics as ``act``); on the trained reference ResNet it keeps more accuracy than ``act``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError, CalibrationError, UnsupportedModelError
from onnxpress.passes.base import PassResult
from onnxpress.passes.channel_groups import ChannelAnalysis, ChannelGroup, analyze_channels, remove_units

__all__ = ["CRITERIA", "PruneChannels", "PruneZeroChannels", "activation_targets", "unit_importance"]

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn", "act", "contrib")
"""Importance criteria understood by :class:`PruneChannels`."""


def _frozen_notes(groups: list[ChannelGroup]) -> list[str]:
    return [f"group {g.name}: some channels kept ({'; '.join(g.frozen)})" for g in groups if g.is_frozen]


class PruneZeroChannels:
    """Remove channels whose output is provably zero or unused, folding exact constants into biases."""

    name = "prune_zero_channels"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Analyse, pick the exactly removable units, and remove them in place."""
        analysis = analyze_channels(graph)
        removable, kept = analysis.zero_removable()
        channels, units = remove_units(graph, analysis, removable, fold_constants=True)
        notes = _frozen_notes(analysis.groups()) if channels else []
        notes.extend(analysis.declined)
        for root, why in sorted(kept.items()):
            notes.append(f"constant channel {root} kept: {why}")
        stats = {"channels_removed": channels, "units_removed": units}
        return PassResult(graph, channels > 0, stats, tuple(notes))


def activation_targets(graph: gs.Graph) -> dict[str, int]:
    """Tensors whose per-channel mean ``|x|`` the ``act`` criterion needs -> their channel axis."""
    analysis = analyze_channels(graph)
    return {c.tensor: c.axis for c in analysis.consumers}


def unit_importance(
    analysis: ChannelAnalysis,
    criterion: str,
    activations: Mapping[str, np.ndarray] | None = None,
) -> dict[int, float]:
    """Importance of every unit root under ``criterion`` (summed over the unit's channels).

    Raises:
        UnsupportedModelError: ``bn`` on a graph without BatchNormalization.
        CalibrationError: ``act`` without the statistics of a tensor a consumer reads.
    """
    if criterion not in CRITERIA:
        raise ArgumentError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    score = np.zeros(len(analysis.parent))
    if criterion in ("l1", "l2"):
        for s in analysis.sources:
            w = np.asarray(s.node.inputs[1].values, dtype=np.float64)
            rows = np.moveaxis(w, s.weight_axis, 0).reshape(len(s.ids), -1)
            score[s.ids] += np.abs(rows).sum(axis=1) if criterion == "l1" else np.sqrt((rows**2).sum(axis=1))
    elif criterion == "bn":
        gammas = [p for p in analysis.params if p.node.op == "BatchNormalization" and p.input_index == 1]
        if not gammas:
            raise UnsupportedModelError(
                "criterion 'bn' needs BatchNormalization nodes, and this model has none (BN was probably "
                "folded into Conv at export); use criterion 'l1', 'l2' or 'act'"
            )
        seen = np.zeros(len(analysis.parent), dtype=bool)
        for p in gammas:
            gamma = np.abs(np.asarray(p.node.inputs[1].values, dtype=np.float64))
            np.add.at(score, p.ids, gamma)
            seen[p.ids] = True
        if not seen.all():  # units without a BN after them fall back to the filter norm
            fallback = unit_importance(analysis, "l2")
            has_bn: dict[int, bool] = {}
            for i in range(len(analysis.parent)):
                root = analysis.find(i)
                has_bn[root] = has_bn.get(root, False) or bool(seen[i])
            for root, ok in has_bn.items():
                if not ok:
                    score[root] = fallback[root]
    else:
        if activations is None:
            raise CalibrationError(f"criterion {criterion!r} needs activation statistics; pass calibration data")
        for c in analysis.consumers:
            if c.tensor not in activations:
                raise CalibrationError(
                    f"no activation statistics for tensor {c.tensor!r}; collect them on this model "
                    "(see activation_targets)"
                )
            act = np.asarray(activations[c.tensor], dtype=np.float64).reshape(-1)
            if act.shape != c.ids.shape:
                raise CalibrationError(
                    f"activation statistics of {c.tensor!r} have {act.size} channels, the model has {c.ids.size}"
                )
            if criterion == "contrib":
                w = np.asarray(c.node.inputs[1].values, dtype=np.float64)
                cols = np.moveaxis(w, c.weight_axis, 0).reshape(len(c.ids), -1)
                act = act * np.sqrt((cols**2).sum(axis=1))
            np.add.at(score, c.ids, act)
    out: dict[int, float] = {}
    for i, value in enumerate(score):
        root = analysis.find(i)
        out[root] = out.get(root, 0.0) + float(value)
    return out


class PruneChannels:
    """Remove the least important channel units to a target ratio (lossy; see the module docstring).

    Args:
        ratio: fraction of prunable channels to remove (0 <= ratio < 1), or a mapping group name ->
            ratio that prunes only the named groups, each to its own ratio.
        criterion: ``l1``, ``l2``, ``bn`` or ``act``.
        scope: ``global`` (one threshold over all groups) or ``layer`` (the ratio in every group).
        multiple: round each group's kept channel count to a multiple of this.
        activations: per-channel mean ``|x|`` for ``act`` (tensor name -> array).
        means: per-channel mean ``x`` of the consumers' inputs (tensor name -> array); when given,
            each removed channel's mean is folded into its consumers' biases (mean compensation).
    """

    name = "prune_channels"

    def __init__(
        self,
        ratio: float | Mapping[str, float],
        *,
        criterion: str = "l2",
        scope: str = "global",
        multiple: int = 1,
        activations: Mapping[str, np.ndarray] | None = None,
        means: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Check and keep the configuration."""
        ratios = ratio.values() if isinstance(ratio, Mapping) else [ratio]
        if any(not (0.0 <= float(r) < 1.0) for r in ratios):
            raise ArgumentError(f"pruning ratio must be in [0, 1), got {ratio!r}")
        if criterion not in CRITERIA:
            raise ArgumentError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if scope not in ("global", "layer"):
            raise ArgumentError(f"scope must be 'global' or 'layer', got {scope!r}")
        if int(multiple) < 1:
            raise ArgumentError(f"multiple must be >= 1, got {multiple!r}")
        self.ratio = ratio
        self.criterion = criterion
        self.scope = scope
        self.multiple = int(multiple)
        self.activations = activations
        self.means = means

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (errors about criteria surface when scoring)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Score the units, choose the ones to drop, and remove them in place."""
        analysis = analyze_channels(graph)
        groups = analysis.groups()
        frozen = analysis.frozen_units()
        members = analysis.unit_members()
        importance = unit_importance(analysis, self.criterion, self.activations)
        candidates: list[tuple[ChannelGroup, list[int], np.ndarray]] = []
        non_finite: list[str] = []
        for g in groups:
            if isinstance(self.ratio, Mapping) and g.name not in self.ratio:
                continue
            free = [u for u in g.units if u not in frozen]
            if len(free) < 2:
                continue
            raw = np.array([importance[u] for u in free])
            if not np.isfinite(raw).all():  # NaN/inf weights or statistics: no order to prune by
                non_finite.append(f"group {g.name}: kept whole (its channel scores hold NaN or inf)")
                continue
            mean = raw.mean()
            candidates.append((g, free, raw / mean if mean > 0 else raw))
        if isinstance(self.ratio, Mapping):
            chosen = {g.name: self._lowest(free, s, float(self.ratio[g.name])) for g, free, s in candidates}
        elif self.scope == "layer":
            chosen = {g.name: self._lowest(free, s, float(self.ratio)) for g, free, s in candidates}
        else:
            chosen = self._global(candidates, members, float(self.ratio))
        removed: set[int] = set()
        notes = list(non_finite)
        for g, free, scores in candidates:
            n_drop = self._rounded_drop(len(g.units), len(free), len(chosen[g.name]))
            order = np.argsort(scores, kind="stable")
            drop = [free[i] for i in order[:n_drop]]
            removed.update(drop)
            if drop:
                notes.append(f"group {g.name}: removed {len(drop)} of {len(g.units)} channel units")
        channels, units = remove_units(graph, analysis, removed, fold_constants=False, fold_means=self.means)
        notes.extend(_frozen_notes(groups))
        notes.extend(analysis.declined)
        total = sum(len(members[u]) for g in groups for u in g.units if u not in frozen)
        stats = {"channels_removed": channels, "units_removed": units, "prunable_channels": total}
        return PassResult(graph, channels > 0, stats, tuple(notes))

    @staticmethod
    def _lowest(free: list[int], scores: np.ndarray, ratio: float) -> list[int]:
        n = int(round(ratio * len(free)))
        order = np.argsort(scores, kind="stable")
        return [free[i] for i in order[:n]]

    @staticmethod
    def _global(candidates, members: Mapping[int, np.ndarray], ratio: float) -> dict[str, list[int]]:
        pool = [
            (s, g.name, u, len(members[u]))
            for g, free, scores in candidates
            for u, s in zip(free, scores, strict=True)
        ]
        pool.sort(key=lambda item: (item[0], item[1], item[2]))
        budget = ratio * sum(w for *_, w in pool)
        chosen: dict[str, list[int]] = {g.name: [] for g, _, _ in candidates}
        spent = 0
        for _, name, unit, weight in pool:
            if spent + weight / 2 > budget:
                break
            chosen[name].append(unit)
            spent += weight
        return chosen

    def _rounded_drop(self, total: int, free: int, drop: int) -> int:
        """How many units to drop so that the kept count is a multiple of ``self.multiple`` (>= 1)."""
        keep = total - drop
        m = self.multiple
        target = max(m, int(math.floor(keep / m + 0.5)) * m) if m > 1 else max(1, keep)
        target = min(total, max(target, total - free))
        return total - target
