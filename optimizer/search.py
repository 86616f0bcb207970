"""Budgeted search over per-layer precision × rank and per-group channel pruning.

Each MAC layer ``l`` takes one option ``o_l = (q, r)``, ``q ∈ {fp32, int8}``, ``r ∈ {full} ∪ ranks``, or
``int4`` (4-bit weight-only MatMul/Gemm at full rank, where the sensitivity table measured it;
its latency is estimated as fp32's: MatMulNBits ran ~1.03x fp32 here, so it buys size, not time),
and each prunable channel group ``g`` one ratio ``p_g ∈ {0} ∪ prune ratios`` (a slot of its own:
a group spans several layers). The search solves, approximately::

    max  fidelity(o)          fidelity ≈ -10 log10 Σ [NSR_l(q_l) + NSR_l(r_l) + δ·NSR_g(p_g)]   (additive)
    s.t. cost(o) ≤ budget     (each budget given: flops, size, latency)
                              cost: flops  = Σ_l MACs_l(r_l)·Π_g κ_l,g(p_g) / Σ MACs_l
                                    size   = 1 + Σ Δbytes(o) / bytes    (Δ measured per option alone)
                                    latency = w_m·ρ·Σ_l K_l / Σ MACs_l,   K_l = MACs_l(r_l)·Π_g κ_l,g(p_g)
                                              + w_a·ρ·(1 - Σ_g α_g(p_g))
                                              + Σ_{l float} π_l·K_l / MACs_l,
                                              π_l = measured latency ratio added by keeping only layer l
                                              float in the int8 model (a float island also pays the
                                              layout changes and the float Add/Relu beside it: on the
                                              reference ResNet a 1x1 shortcut conv with 0.9% of the
                                              MACs added 0.16, the stem nothing), else (1 - ρ)·MACs_l/Σ,
                                              α_g = fraction of activation elements group g removes
                                              (Relu/Add/QDQ traffic: residual streams), (w_m, w_a)
                                              least-squares fitted on the timed candidates,
                                              κ_l,g = MACs of layer l kept when only group g is pruned
                                              (measured per layer: a conv between two pruned groups keeps
                                              (1-p_in)(1-p_out), which a sum of savings overstates),
                                              ρ = measured latency ratio of the all-int8 model;
                                              with timed options (sensitivity ``latency=True``) the sum
                                              form: a split's MACs share is replaced by MACs_l/Σ - (1 - t_l,r/t)
                                              and a group's by -(1 - t_g,p/t): measured fp32 savings
                              δ = 1, or with fine-tune a few assumed recoveries δ < 1 (pruning's noise
                              is measured before the fine-tune that recovers most of it; which δ is
                              right is settled by fine-tuning the built candidates: a short probe each,
                              then the full fine-tune of the best, see ``onnxpress.optimize``)
                              each times k = measured / estimated of the built candidates nearest
                              the budget (QDQ nodes add bytes, non-MAC ops take time: optimistic estimates)

    1. greedy: from all-fp32, repeatedly take the move with the least ΔNSR per unit of cost saved
    2. local search: upgrade one layer, re-fit the budget greedily, keep if the estimate improves
    3. shortlist: build the best few (and budget neighbours for the Pareto plot), measure real SQNR
       (and accuracy with labels) and, for a latency budget, real onnxruntime latency (interleaved)
    4. the best measured candidate within the budget (and ``max_drop``) wins; all measured points
       form the Pareto front. A time limit stops at the next step and returns the best so far.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxpress.errors import OnnxpressError
from onnxpress.sensitivity import SensitivityResult, nsr

__all__ = ["BUDGET_KINDS", "Budget", "Candidate", "LayerChoice", "SearchSpace", "parse_budget", "pareto_front"]

log = logging.getLogger(__name__)

BUDGET_KINDS = ("latency", "size", "flops")

FLOAT_RATE = ("fp32", "int4", "cb4")
"""Layer options whose MACs run at the float rate in the latency estimate (MatMulNBits: float activations)."""

INT8_RATE = ("int8", "w4a8", "group")
"""Options whose MACs run at the int8 rate ρ (W4A8: the same int8 kernels, its 4-bit codes rebuilt at load)."""

LATENCY_PRIOR = (0.7, 0.3)
"""Latency weights (int8 MACs, activation elements) before any candidate is timed: on the reference
ResNet (int8, 1 thread, batch 64) pruned models took ~0.08 + 0.29 x their MACs share, i.e. about a
quarter of the all-int8 time did not shrink with the MACs. Refit from every timed candidate."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """``kind`` (latency | size | flops) must end at or below ``value`` × the original."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise OnnxpressError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {self.kind!r}")
        if not (isinstance(self.value, (int, float)) and 0.0 < self.value <= 1.0):
            raise OnnxpressError(f"budget {self.kind}={self.value!r} must be a fraction in (0, 1]")


def parse_budget(text: str | Budget) -> Budget:
    """Parse ``"latency=0.3"`` (also ``size=0.2``, ``flops=0.5``).

    Raises:
        OnnxpressError: not ``KIND=FRACTION`` with a known kind and 0 < fraction ≤ 1.
    """
    if isinstance(text, Budget):
        return text
    kind, sep, value = str(text).partition("=")
    if not sep:
        raise OnnxpressError(f"budget {text!r} must look like latency=0.3, size=0.2 or flops=0.5")
    try:
        number = float(value)
    except ValueError:
        raise OnnxpressError(f"budget {text!r}: {value!r} is not a number") from None
    return Budget(kind.strip(), number)


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """One option of one layer with its estimated costs and noise."""

    quant: str  # "fp32" | "int8" | "w4a8" | "int4" | "cb4" | "group" (a channel-group slot: macs = -MACs saved)
    rank: int | None
    nsr: float
    macs: int
    params: int
    bytes_delta: float = 0.0
    prune: float | None = None
    lat_share: float | None = None  # measured share of fp32 latency (groups: minus the share saved)
    factors: Any = None  # MACs kept per table layer (numpy vector) by this option alone; None: all kept
    acts: float = 0.0  # groups: fraction of the float activation elements removed

    @property
    def label(self) -> str:
        """``int8``, ``fp32``, ``int8+r16``, ``keep``, ``prune0.5``, ..."""
        if self.quant == "group":
            return f"prune{self.prune:g}" if self.prune else "keep"
        return self.quant + (f"+r{self.rank}" if self.rank else "")


@dataclasses.dataclass
class Candidate:
    """A full assignment (option index per layer) with its estimates and, once built, measurements."""

    picks: tuple[int, ...]
    est_cost: float
    est_sqnr: float
    sqnr_db: float | None = None
    accuracy: float | None = None
    latency_ratio: float | None = None
    size_ratio: float | None = None
    flops_ratio: float | None = None
    recipe: dict[str, Any] | None = None
    feasible: bool | None = None
    note: str = ""

    def cost(self, kind: str) -> float | None:
        """Measured cost ratio of ``kind``."""
        return {"latency": self.latency_ratio, "size": self.size_ratio, "flops": self.flops_ratio}[kind]


class SearchSpace:
    """Per-layer options and the additive cost/noise model built from a :class:`SensitivityResult`.

    Args:
        sens: the sensitivity table of the cleaned model.
        model_bytes: serialized bytes of the cleaned model (for the size estimate).
        int8_latency: measured latency ratio of the all-int8 model (ρ), for the latency estimate.
        quantize: offer int8 (and int4 where ``sens`` measured it).
        prune: offer the channel-pruning options of the table.
        prune_multiple: the multiple the table's prune options were rounded to (written into recipes).
        fixed_bytes: bytes every quantized candidate gains or loses whatever its layers take: the other
            constants quantize stores int8 (a token table, a positional embedding). Without it the size
            estimate counted a GPT-style model's float token table as kept in every candidate, and the
            search cut layers to make up for it (size=0.2 chose a 19.8 dB candidate where 33.5 dB fit).
        tied_tables: per layer key, the float and int8 bytes of the token table its weight is tied to (equal,
            transposed). Quantized, the layer and the table are one tensor (``ShareTransposedConstants``,
            int4's ``GatherBlockQuantized``), so the table's int8 rows in ``fixed_bytes`` go too; the int4
            option's measured bytes already dropped the float table (sensitivity builds the tie), which
            ``fixed_bytes`` counts once. Without this a GPT-style model's 4-bit head looked 8x cheaper than
            its int8 one and a size=0.2 search chose it (19.8 dB) where int8 for the head, int4 elsewhere,
            read 34.4 dB at 0.199.
    """

    def __init__(self, sens: SensitivityResult, model_bytes: int, *, int8_latency: float = 0.5,
                 quantize: bool = True, prune: bool = True, prune_multiple: int = 8, fixed_bytes: int = 0,
                 tied_tables: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.layers = [lay for lay in sens.layers if lay.macs > 0 or lay.params > 0]
        self.total_macs = max(sum(lay.macs for lay in self.layers), 1)
        self.prune_multiple = prune_multiple
        self.prune_discount = 1.0  # δ: assumed fraction of pruning's noise left after a fine-tune
        # option kinds greedy and refine do not move a slot to ("rank": a split layer; "group": a pruned group)
        self.skip_quant: frozenset[str] = frozenset()
        self.model_bytes = model_bytes
        self.fixed_bytes = fixed_bytes
        self.rho = int8_latency
        self.scale = dict.fromkeys(BUDGET_KINDS, 1.0)  # measured / estimated, updated from built candidates
        self.offset = dict.fromkeys(BUDGET_KINDS, 0.0)  # cost = offset + scale · estimate (fit_cost: offset 0)
        self.options: list[list[LayerChoice]] = []
        for lay in self.layers:
            q = sens.score(lay.key, "int8", "int8") if quantize else None
            ranks = [s for s in sens.scores if s.layer == lay.key and s.family == "rank"]
            opts = [LayerChoice("fp32", None, 0.0, lay.macs, lay.params)]
            table_f32, table_i8 = (tied_tables or {}).get(lay.key, (0, 0))
            if q is not None:
                opts.append(LayerChoice("int8", None, nsr(q.sqnr_db), lay.macs, lay.params, q.bytes_delta - table_i8))
            q4 = sens.score(lay.key, "int4", "int4") if quantize else None
            if q4 is not None:
                opts.append(LayerChoice("int4", None, nsr(q4.sqnr_db), lay.macs, lay.params,
                                        q4.bytes_delta + table_f32 - table_i8))
            w4 = sens.score(lay.key, "w4a8", "w4a8") if quantize else None
            if w4 is not None:  # int8 kernels on 4-bit weight codes: int8's speed at nearly int4's size
                # (a tied table is not shared with 4-bit codes, which the rebuild subgraph computes: it stays int8)
                opts.append(LayerChoice("w4a8", None, nsr(w4.sqnr_db), lay.macs, lay.params, w4.bytes_delta))
            cb = sens.score(lay.key, "codebook", "cb4") if quantize else None
            if cb is not None:  # float kernel on 4-bit codebook weights: smaller than int8, at fp32 speed
                opts.append(LayerChoice("cb4", None, nsr(cb.sqnr_db), lay.macs, lay.params, cb.bytes_delta))
            for s in ranks:
                # a measured split: the layer's MACs share minus the fp32 latency the split saved (may be < 0)
                share = None if s.latency_ratio is None else lay.macs / self.total_macs - (1.0 - s.latency_ratio)
                opts.append(LayerChoice("fp32", s.rank, nsr(s.sqnr_db), s.macs_after, s.params_after, s.bytes_delta,
                                        lat_share=share))
                if q is not None:  # int8 of the factors: the layer's int8 saving scaled by the params kept
                    shrink = s.params_after / max(lay.params, 1)
                    opts.append(LayerChoice("int8", s.rank, nsr(s.sqnr_db) + nsr(q.sqnr_db), s.macs_after,
                                            s.params_after, s.bytes_delta + q.bytes_delta * shrink, lat_share=share))
            self.options.append(opts)
        total0 = sum(lay.macs for lay in sens.layers)
        self.groups: list[str] = []
        for s in sens.scores if prune else ():
            if s.family != "prune":
                continue
            if s.layer not in self.groups:
                self.groups.append(s.layer)
                self.options.append([LayerChoice("group", None, 0.0, 0, 0, 0.0, 0.0)])
            share = None if s.latency_ratio is None else -(1.0 - s.latency_ratio)
            if s.layer_macs:
                kept = np.array([s.layer_macs.get(lay.key, lay.macs) / lay.macs if lay.macs else 1.0
                                 for lay in self.layers])
            else:  # a table without per-layer MACs: the saving spread evenly (additive estimate)
                kept = np.full(len(self.layers), s.macs_after / max(total0, 1))
            self.options[-1].append(LayerChoice("group", None, nsr(s.sqnr_db), s.macs_after - total0,
                                                s.params_after, s.bytes_delta, s.ratio, share, kept,
                                                s.acts_removed or 0.0))
        self._coupled = not any(o.lat_share is not None for opts in self.options for o in opts)
        # latency = ρ·(w_macs·MACs kept + w_acts·activations kept); the weights are refit from built candidates
        has_acts = any(o.acts for opts in self.options for o in opts)
        self.lat_weights = LATENCY_PRIOR if has_acts else (1.0, 0.0)
        # measured latency ratio added by keeping each MAC layer float in the int8 model (None: estimated)
        self.float_penalty: list[float | None] | None = None

    @property
    def slots(self) -> list[str]:
        """Slot keys: the MAC layers, then ``group <name>`` per channel group (a group is named after a layer)."""
        return [lay.key for lay in self.layers] + [f"group {g}" for g in self.groups]

    def _skipped(self, c: LayerChoice) -> bool:
        """Whether ``skip_quant`` keeps greedy and refine from moving to option ``c``."""
        return c.quant in self.skip_quant or (c.rank is not None and "rank" in self.skip_quant)

    def _nsr(self, c: LayerChoice) -> float:
        return c.nsr * self.prune_discount if c.quant == "group" else c.nsr

    # -- estimates -------------------------------------------------------------------------
    def layer_cost(self, kind: str, c: LayerChoice) -> float:
        """This layer's share of the ``kind`` cost ratio (before the measured correction)."""
        if kind == "flops":
            return c.macs / self.total_macs
        if kind == "size":
            return c.bytes_delta / self.model_bytes
        share = c.macs / self.total_macs if c.lat_share is None else c.lat_share
        return share * (self.rho if c.quant in INT8_RATE else 1.0)

    def cost(self, kind: str, picks: Sequence[int]) -> float:
        """Estimated ``kind`` ratio of an assignment."""
        return self.offset[kind] + self.scale[kind] * self.raw_cost(kind, picks)

    def raw_cost(self, kind: str, picks: Sequence[int]) -> float:
        """The uncorrected estimate of ``kind`` (what :meth:`fit_cost` regresses the measurements on).

        MACs and latency multiply the per-layer MACs kept by every pick (a layer's own rank, the
        groups on its input and output channels) when no option carries a timed latency share;
        size (and timed latency) add per-option deltas.
        """
        if kind == "latency" and self._coupled:
            macs, acts, penalty = self.latency_terms(picks)
            w_macs, w_acts = self.lat_weights
            return w_macs * macs + w_acts * acts + penalty
        if kind != "size" and self._coupled:
            return float(self._kept_macs(picks).sum()) / self.total_macs
        base = 1.0 + self.fixed_bytes / self.model_bytes if kind == "size" else 0.0
        total = base + sum(self.layer_cost(kind, self.options[i][j]) for i, j in enumerate(picks))
        if kind == "latency" and self.float_penalty is not None:  # timed options: a float layer costs what it measured
            for i, j in enumerate(picks[:len(self.layers)]):
                c = self.options[i][j]
                if c.quant in FLOAT_RATE:
                    share = c.macs / self.total_macs if c.lat_share is None else c.lat_share
                    total += share * (self.rho - 1.0) + self._penalty(i, c.macs)
        return total

    def _kept_macs(self, picks: Sequence[int]) -> np.ndarray:
        """MACs per layer left by every pick (the layer's own rank times each group's kept fraction)."""
        n = len(self.layers)
        kept = np.array([self.options[i][j].macs for i, j in enumerate(picks[:n])], dtype=np.float64)
        for i, j in enumerate(picks[n:], start=n):
            f = self.options[i][j].factors
            if f is not None:
                kept = kept * f
        return kept

    def _penalty(self, i: int, kept: float) -> float:
        """Latency ratio added by leaving layer ``i`` float in an int8 model, for ``kept`` of its MACs.

        Measured (:attr:`float_penalty`) it is scaled by the fraction of the layer's MACs kept; else
        the fp32 rate of those MACs minus the int8 one, ``(1 - ρ)·kept / Σ MACs``.
        """
        lay = self.layers[i]
        if self.float_penalty is not None and self.float_penalty[i] is not None:
            return self.float_penalty[i] * (kept / lay.macs if lay.macs else 1.0)
        return (1.0 - self.rho) * kept / self.total_macs

    def latency_terms(self, picks: Sequence[int]) -> tuple[float, float, float]:
        """``(MACs term, activations term, float penalty)`` of the coupled latency estimate.

        ``raw = w_m·MACs + w_a·activations + penalty``: the first two at the int8 rate (ρ times the
        MACs / activation elements kept), the penalty what the float layers add on top. Only the
        weights are fitted to timings; a float layer's cost is its own, so an all-int8 fit cannot
        make float layers look free (with activations-only weights they once cost nothing, and the
        search kept layers float that measured 0.4-0.65x size and 0.6x latency).
        """
        n = len(self.layers)
        kept = self._kept_macs(picks)
        acts = self.rho * (1.0 - sum(self.options[i][j].acts for i, j in enumerate(picks[n:], start=n)))
        penalty = sum(self._penalty(i, float(kept[i])) for i, j in enumerate(picks[:n])
                      if self.options[i][j].quant in FLOAT_RATE)
        return self.rho * float(kept.sum()) / self.total_macs, acts, penalty

    def fit_cost(self, kind: str, measured: Sequence[tuple[Sequence[int], float]], near: float | None = None,
                 points: int = 3) -> None:
        """Set ``scale`` to the median of measured / estimated over the built candidates nearest ``near``.

        A local ratio rather than one global line: on the reference ResNet (int8, 1 thread) the
        latency ratio per unit of int8 MACs grew from 1.0 (unpruned) to ~1.9 at 0.2x MACs (QDQ pairs,
        the float stem, Relu/Add and I/O do not shrink with the MACs), and the greedy plans near the
        budget, so the candidates measured nearest it (``points`` of them) set the correction.
        """
        usable = [(p, float(m)) for p, m in measured if m is not None and math.isfinite(m)]
        if kind == "latency" and self._coupled and self.lat_weights != (1.0, 0.0) and len(usable) >= 3:
            self._fit_latency_weights(usable)
        pts = [(self.raw_cost(kind, p), y) for p, y in usable]
        pts = [(x, y) for x, y in pts if x > 0]
        if not pts:
            return
        if near is not None:
            pts = sorted(pts, key=lambda xy: abs(xy[1] - near))[:points]
        self.scale[kind] = float(np.median([y / x for x, y in pts]))
        self.offset[kind] = 0.0

    def _fit_latency_weights(self, usable: Sequence[tuple[Sequence[int], float]]) -> None:
        """Least-squares ``measured - float penalty ≈ a·MACs term + b·activations term`` (both ≥ 0), then ``(a, b)``."""
        terms = np.array([self.latency_terms(p) for p, _ in usable])
        macs, acts = terms[:, 0], terms[:, 1]
        ys = np.array([y for _, y in usable]) - terms[:, 2]
        coef = np.linalg.lstsq(np.stack([macs, acts], axis=1), ys, rcond=None)[0]
        if np.all(coef >= 0) and coef.sum() > 0:
            self.lat_weights = (float(coef[0]), float(coef[1]))
        else:  # one term alone explains the points better than a negative mix: keep the one that fits
            fits = [(float(np.sum((ys - (x @ ys / (x @ x)) * x) ** 2)), k, float(x @ ys / (x @ x)))
                    for k, x in enumerate((macs, acts))]
            _, k, c = min(fits)
            self.lat_weights = (c, 0.0) if k == 0 else (0.0, c)
        log.info("latency model: %.3f x int8 MACs + %.3f x activations", *self.lat_weights)

    def est_sqnr(self, picks: Sequence[int]) -> float:
        """Estimated output SQNR (dB) from the summed per-layer noise."""
        total = sum(self._nsr(self.options[i][j]) for i, j in enumerate(picks))
        return math.inf if total <= 0 else -10.0 * math.log10(total)

    def candidate(self, kind: str, picks: Sequence[int]) -> Candidate:
        """A Candidate with its estimates."""
        picks = tuple(picks)
        return Candidate(picks, self.cost(kind, picks), self.est_sqnr(picks))

    # -- greedy + local search ---------------------------------------------------------------
    def greedy(self, kind: str, budget: float, start: Sequence[int] | None = None,
               frozen: frozenset[int] = frozenset(), *,
               also: Sequence[tuple[str, float]] = ()) -> tuple[int, ...] | None:
        """Least ΔNSR per cost saved until the estimate fits ``budget`` (and each ``(kind, budget)`` of ``also``).

        With several budgets a move's saving is the sum, over the budgets not yet met, of what it saves of each
        relative to that budget; a move may not raise the cost of a budget not yet met, nor take a met one over
        it. So every move lowers what is left to save and no assignment comes back: the loop ends. With one
        budget this is the plain ratio ΔNSR / Δcost. (Planning against the first budget alone once left a
        flops=0.8, size=0.4 search with pruned float models and unpruned int8 ones, none within both.)
        """
        limits = [(kind, budget), *also]
        picks = list(start) if start is not None else [0] * len(self.options)
        costs = [self.cost(k, picks) for k, _ in limits]
        while any(c > b + 1e-12 for c, (_, b) in zip(costs, limits, strict=True)):
            best = None
            for i, opts in enumerate(self.options):
                if i in frozen:
                    continue
                cur = opts[picks[i]]
                for j, o in enumerate(opts):
                    if j == picks[i] or self._skipped(o):
                        continue
                    trial = picks[:i] + [j] + picks[i + 1:]
                    saved = 0.0
                    for c, (k, b) in zip(costs, limits, strict=True):
                        new = self.cost(k, trial)
                        if c > b + 1e-12:
                            if new > c + 1e-15:
                                saved = -math.inf
                                break
                            saved += (c - new) / b if also else c - new
                        elif new > b + 1e-12:
                            saved = -math.inf
                            break
                    if saved <= 1e-15:
                        continue
                    score = max(self._nsr(o) - self._nsr(cur), 0.0) / saved
                    if best is None or score < best[0] - 1e-18:
                        best = (score, i, j)
            if best is None:
                return None
            _, i, j = best
            picks[i] = j
            costs = [self.cost(k, picks) for k, _ in limits]
        return tuple(picks)

    def refine(self, kind: str, budget: float, picks: Sequence[int], *, iterations: int = 200,
               seed: int = 0, deadline: float | None = None,
               also: Sequence[tuple[str, float]] = ()) -> tuple[int, ...]:
        """Local search: upgrade one layer (less noise), re-fit the budget(s) greedily, keep improvements."""
        rng = random.Random(seed)
        best = tuple(picks)
        best_nsr = sum(self._nsr(self.options[i][j]) for i, j in enumerate(best))
        for _ in range(iterations):
            if deadline is not None and time.monotonic() > deadline:
                break
            i = rng.randrange(len(self.options))
            cur = self.options[i][best[i]]
            better = [j for j, o in enumerate(self.options[i])
                      if self._nsr(o) < self._nsr(cur) and not self._skipped(o)]
            if not better:
                continue
            trial = list(best)
            trial[i] = rng.choice(better)
            fitted = self.greedy(kind, budget, trial, frozen=frozenset({i}), also=also)
            if fitted is None:
                continue
            total = sum(self._nsr(self.options[k][j]) for k, j in enumerate(fitted))
            if total < best_nsr - 1e-15:
                best, best_nsr = fitted, total
        return best

    def offers(self, quant: str) -> bool:
        """Whether some layer has an option of kind ``quant``."""
        return any(o.quant == quant for opts in self.options[:len(self.layers)] for o in opts)

    def uniform(self, quant: str, rank_fraction: float | None = None) -> tuple[int, ...]:
        """The option index per layer closest to a uniform setting (for baselines)."""
        picks = []
        for lay, opts in zip(self.layers, self.options[:len(self.layers)], strict=True):
            want = None
            if rank_fraction is not None and lay.full_rank > 1:
                want = max(1, math.ceil(rank_fraction * lay.full_rank))
            idx = next((j for j, o in enumerate(opts) if o.quant == quant and o.rank == want), None)
            if idx is None:
                idx = next((j for j, o in enumerate(opts) if o.quant == quant and o.rank is None), 0)
            picks.append(idx)
        return tuple(picks) + (0,) * len(self.groups)

    def uniform_int4(self, rest: str = "fp32") -> tuple[int, ...] | None:
        """int4 on every layer that offers it, ``rest`` (fp32 | int8) elsewhere; None when no layer offers int4.

        Measured beside the greedy's picks under size and MACs budgets (a uniform point the additive
        estimate may rank wrongly; on the reference transformer, with ``rest="fp32"`` a weight-only step
        (see :meth:`recipe`), they measured 42.8 and 35.2 dB at 0.154 and 0.152 of the size, where the
        greedy's size=0.2 pick read 36.3 dB at 0.199).
        """
        return self.uniform_where("int4", rest)

    def uniform_where(self, quant: str, rest: str = "int8") -> tuple[int, ...] | None:
        """``quant`` (full rank) on every layer that offers it, ``rest`` elsewhere; None when no layer offers it.

        ``uniform_where("w4a8")`` is ``quantize(weights="int4", activations="uint8")``: 4-bit codes wherever
        the weight is large enough, int8 elsewhere.
        """
        if not self.offers(quant):
            return None
        picks = []
        for opts in self.options[:len(self.layers)]:
            want = next((j for j, o in enumerate(opts) if o.quant == quant and o.rank is None), None)
            other = next((j for j, o in enumerate(opts) if o.quant == rest and o.rank is None), 0)
            picks.append(other if want is None else want)
        return tuple(picks) + (0,) * len(self.groups)

    def is_stream(self, group: int) -> bool:
        """Whether channel group ``group`` (index into :attr:`groups`) changes the MACs of 3+ layers.

        A group local to one block changes its producer's outputs and one consumer's inputs (2 layers);
        a residual stream is read and written by every block of its stage.
        """
        opts = self.options[len(self.layers) + group]
        touched = set()
        for o in opts:
            if o.factors is not None:
                touched |= {k for k, f in enumerate(o.factors) if f < 1.0}
        return len(touched) >= 3

    def uniform_prune(self, ratio: float, quant: str = "int8", stream_ratio: float | None = None) -> tuple[int, ...]:
        """``uniform(quant)`` with every channel group at the largest offered ratio ≤ ``ratio`` (a baseline).

        ``stream_ratio``: the ratio for residual streams (:meth:`is_stream`) instead, which every block
        of a stage reads: cutting them usually costs more accuracy per MAC than a block's own channels.
        """
        n = len(self.layers)
        picks = list(self.uniform(quant)[:n])
        for k, opts in enumerate(self.options[n:]):
            want = stream_ratio if stream_ratio is not None and self.is_stream(k) else ratio
            picks.append(max((j for j, o in enumerate(opts) if (o.prune or 0.0) <= want + 1e-9),
                             key=lambda j: opts[j].prune or 0.0))
        return tuple(picks)

    def recipe(self, picks: Sequence[int], *, method: str = "mse", calib_samples: int = 256,
               moment_samples: int = 64, finetune_epochs: int | None = None,
               finetune_device: str = "cpu") -> dict[str, Any]:
        """The recipe that builds an assignment.

        Steps: prune, lowrank, finetune (when something was pruned or split), quantize. One fine-tune
        after both structural steps recovers both before the ranges are calibrated; the low-rank
        split's moments are then measured on the pruned model, so its ranks apply to pruned layers
        (a rank at or above a pruned layer's full rank leaves it whole).
        """
        n = len(self.layers)
        ranks = {lay.key: self.options[i][j].rank for i, (lay, j) in enumerate(zip(self.layers, picks[:n],
                 strict=True)) if self.options[i][j].rank}
        ratios = {g: self.options[n + k][j].prune for k, (g, j) in enumerate(zip(self.groups, picks[n:], strict=True))
                  if self.options[n + k][j].prune}
        quant = [self.options[i][j].quant for i, j in enumerate(picks[:n])]
        steps: list[dict[str, Any]] = []
        if ratios:
            steps.append({"pass": "prune", "ratio": dict(sorted(ratios.items())), "criterion": "l2",
                          "multiple": self.prune_multiple})
        if ranks:
            steps.append({"pass": "lowrank", "ranks": dict(sorted(ranks.items())), "max_samples": moment_samples})
        if (ranks or ratios) and finetune_epochs:
            # no early stop: a deeply pruned model sits on a plateau for several epochs before it recovers
            steps.append({"pass": "finetune", "epochs": finetune_epochs, "patience": finetune_epochs,
                          "device": finetune_device})
        if any(q in ("int8", "w4a8", "int4", "cb4") for q in quant):
            exclude = sorted(lay.key for lay, q in zip(self.layers, quant, strict=True) if q == "fp32")
            books = sorted(lay.key for lay, q in zip(self.layers, quant, strict=True) if q == "cb4")
            # int8 rounding as onnxpress quantize's default: GPTQ where its input moments are cheap
            step = {"pass": "quantize", "method": method, "exclude": exclude, "max_samples": calib_samples,
                    "int8_method": "auto"}
            four = sorted(lay.key for lay, q in zip(self.layers, quant, strict=True) if q == "int4")
            if books:  # float kernels on codebook weights, after the int8 layers are quantized
                step["codebook_layers"] = books
            w4a8 = sorted(lay.key for lay, q in zip(self.layers, quant, strict=True) if q == "w4a8")
            if w4a8:  # int8 layers whose kernels read 4-bit weight codes
                step["w4a8_layers"] = w4a8
            if four and "int8" not in quant and not books and not w4a8:
                # weight-only: no int8 layer, so no QDQ either (with int4_layers the int8 pass would still
                # quantize the activation x activation attention MatMuls, which are no layers here: the
                # reference transformer read 35.5 dB that way, 42.6 with them float)
                step["weights"] = "int4"
            elif four:  # run before InsertQDQ, which leaves their MatMulNBits float
                step["int4_layers"] = four
            steps.append(step)
        if not steps:
            steps.append({"pass": "cleanup"})
        return {"version": 1, "steps": steps}

    def describe(self, picks: Sequence[int]) -> dict[str, str]:
        """``{layer or channel group: option label}``."""
        return {key: self.options[i][j].label for i, (key, j) in enumerate(zip(self.slots, picks, strict=True))}


def pareto_front(points: Sequence[Candidate], kind: str) -> list[Candidate]:
    """Measured candidates not dominated in (lower ``kind`` cost, higher SQNR), sorted by cost."""
    done = [c for c in points if c.sqnr_db is not None and c.cost(kind) is not None]
    front = []
    for c in done:
        dominated = any(
            o is not c and o.cost(kind) <= c.cost(kind) and o.sqnr_db >= c.sqnr_db
            and (o.cost(kind) < c.cost(kind) or o.sqnr_db > c.sqnr_db)
            for o in done
        )
        if not dominated:
            front.append(c)
    return sorted(front, key=lambda c: c.cost(kind))


def measure_latency(reference: onnx.ModelProto, candidates: Sequence[onnx.ModelProto],
                    feed: Mapping[str, np.ndarray], *, repeats: int = 15, threads: int | None = 1) -> list[float]:
    """Median latency ratio of each candidate to ``reference``, timed in interleaved rounds.

    Every round runs the reference and each candidate once (order rotating), so that the noise
    of other processes hits all of them; the ratio is of medians over ``repeats`` rounds.
    """
    from onnxpress.runtime import make_session, time_interleaved

    sessions = [make_session(m, threads=threads, what="model") for m in (reference, *candidates)]
    times = time_interleaved(sessions, feed, repeats, warmup=2)
    ref = float(np.median(times[0]))
    return [float(np.median(t)) / ref for t in times[1:]]


Evaluator = Callable[[Candidate], None]
