"""``onnxpress.optimize``: sensitivity → budgeted search → best model + recipe (+ report).

    model ─prepare─► M0 ─┬─ recipe given ──────────────────────────► apply_recipe ─► save
                         └─ sensitivity (cached) ─► SearchSpace ─► greedy + local search
                              ─► shortlist built with apply_recipe ─► SQNR / accuracy / latency / size
                              ─► best within budget ─► save OUT and OUT.recipe.json [─► report DIR]

With a latency budget the search first times the int8 model with each layer left float (one loop):
a float layer inside an int8 chain costs what that measured, not its MACs (see ``onnxpress.search``).
Every later timing loop includes the uniform int8 baseline and is scaled to its first ratio, and the
candidates near the budget are timed twice more (the median counts, and no timing may pass the budget by
more than the 1% noise of one loop: ``retimed_ratio``). The pick is then timed alone beside the reference in
``CONFIRM_LOOPS`` unscaled loops, as a user times the written model; when their median misses the budget the
next best is taken.

With ``finetune`` (distillation after pruning/splitting, before quantizing) a fine-tune changes
weights, not the graph, so cost and fidelity are measured in two stages::

    structures (prune/split + quantize, no fine-tune) ─► size, MACs, latency   (seconds each; up to
        4 rounds, the estimate corrected by the measured candidates nearest the budget)
    in-budget structures (re-timed; ≤ shortlist, most budget used first) [─► probe fine-tune ─► rank]
    first (then second) ─► the recipe's full fine-tune ─► judged against max_drop ─► written

Pruning's SQNR before the fine-tune (-3 to 10 dB on the reference ResNet for structures that the
fine-tune brings back within a point) says little about what the fine-tune recovers, and neither did
a short probe fine-tune there (``probe_epochs``; off by default), so the structures that use the most
of the budget (most channels kept) are fine-tuned first. Searched recipes fine-tune without early
stopping (``patience`` = epochs): a deeply pruned model sits near chance for several epochs first.
Besides the greedy's picks the candidates include two structured baselines nearest the budget: every
channel group at one ratio, and the same with residual streams at half of it. Under a size or MACs
budget, a model with MatMul/Gemm layers offered int4 (4-bit weight-only, ``quantize.int4_layers``)
also gets two baselines: int4 on all of them with the other layers fp32, or int8. A size budget also
offers W4A8 per layer (``quantize.w4a8_layers``: the int8 kernel on 4-bit weight codes, at int8's speed),
with W4A8 on every layer that takes it as a baseline, and plans once more by precision alone on int8 kernels
(from uniform int8, W4A8 where bytes must go; no float kernel, split or pruning): "searched at int8 speed". Its
estimate is first corrected by the baselines' measured sizes.
MACs of a model with MatMulNBits or onnxruntime's fused attention are counted on its structure (onnx's shape
inference stops at those contrib ops).

With ``finetune`` the chosen model, when quantized, is also trained quantization-aware in its own graph (a
``qat`` recipe step, ``_with_qat``); the QAT model is kept only when it measures closer on the evaluation data.

The model written is the one built from the recipe written beside it, so
``onnxpress optimize MODEL --recipe OUT.recipe.json`` rebuilds it byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.calibration.readers import symbolic_sizes
from onnxpress.errors import DataError, OnnxpressError, UnsupportedModelError, check_argument_types
from onnxpress.model_io import (
    ModelSource,
    check_output_path,
    is_large,
    load_model,
    model_bytes,
    refuse_quantized,
    save_model,
)
from onnxpress.passes.equalize_activations import MIN_SAMPLES as EQUALIZE_MIN_SAMPLES
from onnxpress.passes.flops import assume_input_dims, count_macs, scoped_input_dims
from onnxpress.passes.weight_only import StoreConstantsInt8
from onnxpress.pipeline import run_passes
from onnxpress.prune import sqnr_db
from onnxpress.quantize import CONSTANTS_INT8_MIN_SIZE
from onnxpress.recipe import TRAINING_PASSES, apply_recipe, load_recipe, prepare, save_recipe, validate_recipe
from onnxpress.search import (
    FLOAT_RATE,
    Budget,
    Candidate,
    SearchSpace,
    measure_latency,
    pareto_front,
    parse_budget,
)
from onnxpress.sensitivity import (
    SensitivityResult,
    analyze_sensitivity,
    flat_outputs,
    read_feeds,
    run_output_arrays,
)

Metric = Callable[[list[np.ndarray], np.ndarray], float]
"""A user fidelity metric: ``metric(outputs, labels) -> float``, higher is better.

``outputs`` holds the candidate's outputs in the graph's output order, each concatenated over the
evaluation samples along axis 0; ``labels`` the evaluation labels (the first as many as samples).
"""

__all__ = [
    "FREE_PENALTY", "NEAR_FREE_PENALTY", "Metric", "OptimizeResult", "free_float_picks", "measure_float_penalties",
    "optimize", "pick_best", "retimed_ratio", "same_kernels",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OptimizeResult:
    """What :func:`optimize` did.

    Attributes:
        model: the chosen model (as written).
        output: where it was written.
        recipe: the recipe that rebuilds it; ``recipe_path`` where it was written.
        chosen: the chosen candidate with its measurements (None when a recipe was applied).
        candidates: every measured candidate (baselines first).
        pareto: the measured Pareto front (cost of the budget kind vs SQNR).
        budget: the (first) budget searched under (None with a recipe); ``budgets`` all of them.
        feasible: whether the chosen model meets the budget and max-drop as measured.
        sensitivity: the per-layer table (None with a recipe).
        labels: per layer option chosen.
        reference_accuracy: accuracy of the original on the evaluation data (with labels), or the value of
            the user ``metric`` (``Candidate.accuracy`` holds the same measure for each candidate).
        timed_out: the time limit stopped the search early.
        metric_name: what ``reference_accuracy``/``accuracy`` measure: ``"top-1 accuracy (first output)"``,
            the user metric's name, or None without labels.
    """

    model: onnx.ModelProto
    output: Path
    recipe: dict[str, Any]
    recipe_path: Path
    chosen: Candidate | None
    candidates: list[Candidate]
    pareto: list[Candidate]
    budget: Budget | None
    feasible: bool
    sensitivity: SensitivityResult | None
    choices: dict[str, str]
    reference_accuracy: float | None
    timed_out: bool
    budgets: list[Budget] = dataclasses.field(default_factory=list)
    metric_name: str | None = None
    max_drop: float | None = None

    def max_drop_kept(self) -> bool | None:
        """Whether the chosen model's accuracy drop is within ``max_drop`` (None: no max-drop or no accuracy)."""
        c = self.chosen
        if self.max_drop is None or c is None or c.accuracy is None or self.reference_accuracy is None:
            return None
        return _holds(drop_points(self.reference_accuracy, c.accuracy), self.max_drop)

    def verdict(self) -> str:
        """Each budget and the max-drop, with the chosen model's measured value and whether it holds.

        ``"latency=0.5 (measured 0.431: met), size=0.1 (measured 0.252: NOT met)"``; "" with a recipe.
        """
        c = self.chosen
        if c is None or not self.budgets:
            return ""
        parts = []
        for b in self.budgets:
            got = c.cost(b.kind)
            held = "not measured" if got is None else "met" if _holds(got, b.value) else "NOT met"
            parts.append(f"{b.kind}={b.value:g} ({'' if got is None else f'measured {got:.3f}: '}{held})")
        kept = self.max_drop_kept()
        if kept is not None:
            drop = drop_points(self.reference_accuracy, c.accuracy)
            parts.append(f"max-drop {self.max_drop:g} points (measured {drop:.2f}: {'met' if kept else 'NOT met'})")
        return ", ".join(parts)


def drop_points(reference: float, accuracy: float) -> float:
    """The accuracy drop ``max_drop`` bounds, in points: ``100 * (reference - candidate)``."""
    return (reference - accuracy) * 100


def _holds(value: float, bound: float) -> bool:
    """``value <= bound`` as every budget and max-drop check reads it (1e-9 of slack for float ratios)."""
    return value <= bound + 1e-9


def _npz_has_labels(source: object) -> bool:
    """Whether ``source`` is a readable ``.npz`` path holding a ``labels`` array."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).endswith(".npz"):
        return False
    try:
        with np.load(source, allow_pickle=False) as z:
            return "labels" in z.files
    except (OSError, ValueError):
        return False


UNTUNED = " [fidelity before fine-tune]"
"""Note suffix of a candidate whose fidelity was measured on its graph before the recipe's fine-tune."""

FINE_PRUNE_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
"""Prune ratios searched with ``finetune`` (steps of 1/8: the fine-tune recovers deep cuts)."""


def _recipe_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".onnx") + ".recipe.json")


class _Evaluator:
    """Builds candidates from recipes and measures fidelity, size and MACs against M0."""

    def __init__(self, m0: onnx.ModelProto, original_bytes: int, calib: object, feeds: list[dict[str, np.ndarray]],
                 labels: np.ndarray | None, progress: bool, metric: Metric | None = None) -> None:
        self.m0, self.original_bytes, self.calib, self.feeds = m0, original_bytes, calib, feeds
        self.labels = labels
        self.metric = metric
        self.macs0 = max(sum(count_macs(m0).values()), 1)
        self.moments: dict[str, Any] = {}
        self.tuned: dict[str, onnx.ModelProto] = {}  # fine-tuned models: recipes that differ after it reuse one
        self.declined: list[Candidate] = []  # polish variants measured and not kept (shown in the candidates table)
        self.models: dict[tuple[int, ...], onnx.ModelProto] = {}  # built from the full recipe
        self.structures: dict[tuple[int, ...], onnx.ModelProto] = {}  # built without the fine-tune step
        self.progress = progress
        from onnxpress.calibration.readers import output_sample_axes, sample_axes

        # read once: every candidate is scored on M0's feeds, whose layout does not change
        self.sample_axes, self.output_axes = sample_axes(m0), output_sample_axes(m0)
        arrays = run_output_arrays(m0, feeds)
        self.reference = flat_outputs(arrays)
        self.ref_accuracy = self._accuracy(arrays) if labels is not None else None

    @property
    def metric_name(self) -> str | None:
        """What ``accuracy`` measures (None without labels)."""
        if self.labels is None:
            return None
        if self.metric is None:
            return "top-1 accuracy (first output)"
        return getattr(self.metric, "__name__", None) or type(self.metric).__name__

    def _accuracy(self, arrays: list[list[np.ndarray]]) -> float:
        """The user metric, or top-1 accuracy of the first graph output read as ``[samples, classes]``.

        Only the first output: flattening every output together into rows (as before) mixed a second
        output's values into the first one's rows and took the argmax over both.
        """
        if self.metric is not None:
            return _user_metric(self.metric, arrays, self.labels, self.output_axes)
        from onnxpress.calibration.readers import samples_in

        rows = []
        for feed, outs in zip(self.feeds, arrays, strict=True):
            n = samples_in(feed, self.sample_axes)
            first = np.asarray(outs[0])
            if n == 0 or first.size % n:
                raise DataError(
                    f"accuracy reads the model's first output as [samples, classes]; its shape {list(first.shape)} "
                    f"does not split into {n} samples: pass optimize(metric=...) to score these outputs"
                )
            rows.append(first.reshape(n, -1))
        return float((np.concatenate(rows).argmax(1) == self.labels).mean())

    def best(self, cands: Sequence[Candidate]) -> Candidate:
        """:func:`pick_best` with the evaluation data's labels (a user metric: no binomial tie)."""
        n = None if self.labels is None else len(self.labels)
        return pick_best(cands, n, binomial=self.metric is None)

    def build(self, cand: Candidate) -> onnx.ModelProto:
        model = apply_recipe(self.m0, cand.recipe, self.calib, prepared=True, moments_cache=self.moments,
                             finetune_cache=self.tuned)
        self.models[cand.picks] = model
        return model

    def build_structure(self, cand: Candidate) -> onnx.ModelProto:
        """The candidate without its fine-tune steps: the same graph and tensor shapes, so the same cost."""
        steps = [s for s in cand.recipe["steps"] if s["pass"] not in TRAINING_PASSES]
        model = apply_recipe(self.m0, {**cand.recipe, "steps": steps}, self.calib, prepared=True,
                             moments_cache=self.moments)
        self.structures[cand.picks] = model
        return model

    def build_probe(self, cand: Candidate, epochs: int) -> onnx.ModelProto:
        """The candidate with its fine-tune step cut to ``epochs`` (a cheap look at what the fine-tune recovers)."""
        steps = [{**s, "epochs": epochs} if s["pass"] == "finetune" else s for s in cand.recipe["steps"]]
        return apply_recipe(self.m0, {**cand.recipe, "steps": steps}, self.calib, prepared=True,
                            moments_cache=self.moments)

    def measure_cost(self, cand: Candidate, model: onnx.ModelProto) -> None:
        cand.size_ratio = model.ByteSize() / self.original_bytes
        if any(n.op_type in STRUCTURE_MAC_OPS and n.domain == "com.microsoft" for n in model.graph.node):
            # shape inference stops at these contrib ops (the int8 transformer's QAttention made the MACs of its
            # uniform int8 baseline uncountable), and the fused attention hides the MatMuls the original counts;
            # quantizing changes no MACs: count them on the candidate's structure (its recipe without quantize,
            # finetune and qat)
            steps = [s for s in cand.recipe["steps"] if s["pass"] != "quantize" and s["pass"] not in TRAINING_PASSES]
            model = apply_recipe(self.m0, {**cand.recipe, "steps": steps}, self.calib, prepared=True,
                                 moments_cache=self.moments) if steps else self.m0
        cand.flops_ratio = sum(count_macs(model).values()) / self.macs0

    def measure_fidelity(self, cand: Candidate, model: onnx.ModelProto) -> None:
        arrays = run_output_arrays(model, self.feeds)  # one run for both SQNR and the accuracy/metric
        cand.sqnr_db = sqnr_db(self.reference, flat_outputs(arrays))
        if self.labels is not None:
            cand.accuracy = self._accuracy(arrays)

    def measure(self, cand: Candidate) -> None:
        model = self.models.get(cand.picks) or self.build(cand)
        self.measure_fidelity(cand, model)
        self.measure_cost(cand, model)


FAST_PLAN_SKIPS = frozenset({"rank", "group"})
"""Besides the float-kernel options, what the "searched at int8 speed" plan never moves to: splits, pruned groups."""

STRUCTURE_MAC_OPS = frozenset({"MatMulNBits", "QAttention", "MultiHeadAttention", "Attention"})
"""onnxruntime contrib ops a quantized candidate may hold (``com.microsoft``): its MACs are counted on its structure."""


def _user_metric(metric: Metric, arrays: list[list[np.ndarray]], labels: np.ndarray,
                 axes: Sequence[int | None] | None = None) -> float:
    """``metric`` on the outputs per graph output (concatenated over the feeds on their sample axes) and the labels.

    An output's sample axis (``axes``) is 0, or 1 for a sequence-first output ``[seq, batch, ...]``
    (:func:`onnxpress.calibration.readers.output_sample_axes`); the metric gets the outputs in the model's layout.
    The outputs of a model without a sample axis (``None``: one sample per run) are stacked on a new axis 0.

    Raises:
        DataError: an output cannot be concatenated over the samples (no such axis, or other axes differ).
        OnnxpressError: the metric returned something that is not a finite number.
    """
    outputs = []
    for k in range(len(arrays[0])):
        parts = [np.asarray(outs[k]) for outs in arrays]
        axis = axes[k] if axes and k < len(axes) else 0
        try:
            if axis is None:
                outputs.append(np.stack(parts))
            else:
                outputs.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis))
        except (ValueError, np.exceptions.AxisError):
            shapes = [list(x.shape) for x in parts[:3]]
            if axis is None:
                raise DataError(
                    f"output {k} of the model cannot be stacked over the evaluation samples (shapes {shapes}): the "
                    "model has no sample axis, so the metric receives each output stacked on a new axis 0, which "
                    "needs one shape"
                ) from None
            raise DataError(
                f"output {k} of the model cannot be joined over the evaluation batches on axis {axis} (shapes "
                f"{shapes}); the metric receives each output with its samples on axis {axis}"
            ) from None
    value = metric(outputs, labels)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise OnnxpressError(f"the metric returned {type(value).__name__}; it must return a number "
                             "(higher is better)") from None
    if not math.isfinite(value):
        raise OnnxpressError(f"the metric returned {value}; it must return a finite number (higher is better)")
    return value


_BIAS_STORAGE = {onnx.TensorProto.INT16: onnx.TensorProto.INT32}
"""CompactQDQ stores an int32 bias that fits in int16 as int16 plus a Cast: the same kernel either way."""


def same_kernels(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Same nodes (op types, in order) and the same non-scalar initializers (type and shape): the same kernels.

    So the two models cost the same to run and store (the search and bench/optimize.py reuse a timing on it).

    Scalars are left out: two tensors whose ranges come out equal share one scale constant. So are the Cast
    nodes and int16 types of biases stored narrow (``_BIAS_STORAGE``): rescaled channels can make a bias
    outgrow int16.
    """
    def shape(m: onnx.ModelProto) -> tuple:
        arrays = sorted((_BIAS_STORAGE.get(i.data_type, i.data_type), tuple(i.dims)) for i in m.graph.initializer
                        if int(np.prod(i.dims)) > 1)
        return tuple(n.op_type for n in m.graph.node if n.op_type != "Cast"), tuple(arrays)
    return shape(a) == shape(b)


def _with_auto_ranges(chosen: Candidate, built: onnx.ModelProto, ev: _Evaluator) -> tuple[Candidate, onnx.ModelProto]:
    """The chosen model with its activation ranges picked per tensor (quantize ``method="auto"``), if it is closer.

    Same graph, same kernels, so the same latency and size: it is kept when it measures better on the
    evaluation data (``pick_best``) and the graph is unchanged (checked, not timed). On the reference ResNet
    uniform int8 went 43.47 -> 45.39 dB test SQNR with ``--method auto`` (``onnxpress.range_search``); a
    search whose winner ties uniform int8 on latency then wins on fidelity at the same cost.
    """
    recipe = _int8_step_changed(chosen.recipe, {"method": "auto"}, lambda s: s.get("method") != "auto")
    return (chosen, built) if recipe is None else _kept_if_closer(chosen, built, ev, recipe, "auto ranges")


def _int8_step_changed(recipe: dict[str, Any], change: Mapping[str, Any],
                       also: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any] | None:
    """``recipe`` with ``change`` written into its one int8 QDQ quantize step (that ``also`` accepts), or None."""
    steps = recipe["steps"]
    at = [i for i, s in enumerate(steps) if s["pass"] == "quantize" and s.get("weights", "int8") == "int8"
          and s.get("codebook") is None and also(s)]
    if len(at) != 1:
        return None
    return {**recipe, "steps": [{**s, **change} if i == at[0] else s for i, s in enumerate(steps)]}


def _with_equalized_activations(chosen: Candidate, built: onnx.ModelProto, ev: _Evaluator, *, held_out: bool,
                                calib_samples: int | None) -> tuple[Candidate, onnx.ModelProto]:
    """The chosen model with its activation channels equalized (quantize ``equalize="activations"``), if closer.

    Same kernels (only weights, biases and ranges change), so the same cost; kept when it measures better on
    the evaluation data (``pick_best``). Tried when the evaluation data is held out from calibration, or the
    calibration data has at least ``EQUALIZE_MIN_SAMPLES`` samples: compared on the calibration data itself, it
    measures closer whatever tail it clips on other data (MobileNet on 32 samples: 37.79 -> 40.09 dB on them,
    37.94 -> 35.05 on the test split). Test-split SQNR of uniform int8 on the reference MobileNet: 38.08 -> 39.47 dB
    (``bench/advanced_ptq.py`` section D, where it also loses on 32 samples or without bias correction: so it
    is measured, not assumed).
    """
    if not held_out and (calib_samples is None or calib_samples < EQUALIZE_MIN_SAMPLES):
        return chosen, built
    recipe = _int8_step_changed(chosen.recipe, {"equalize": "activations"},
                                lambda s: s.get("equalize") is None and s.get("smoothquant") is None
                                and s.get("per_channel", True))
    return (chosen, built) if recipe is None else _kept_if_closer(chosen, built, ev, recipe, "equalized activations")


def _kept_if_closer(
    chosen: Candidate, built: onnx.ModelProto, ev: _Evaluator, recipe: dict[str, Any], what: str
) -> tuple[Candidate, onnx.ModelProto]:
    """``chosen`` rebuilt from ``recipe`` (the same graph, so the same kernels and cost), if it measures closer."""
    model = apply_recipe(ev.m0, recipe, ev.calib, prepared=True, moments_cache=ev.moments, finetune_cache=ev.tuned)
    if not same_kernels(model, built):
        log.info("%s changed the graph; kept the model without it", what)
        return chosen, built
    variant = dataclasses.replace(chosen, recipe=recipe, note=f"{chosen.note} + {what}")
    ev.measure_fidelity(variant, model)
    ev.measure_cost(variant, model)
    log.info("%s: SQNR %.2f -> %.2f dB", what, chosen.sqnr_db or -math.inf, variant.sqnr_db or -math.inf)
    if ev.best([chosen, variant]) is variant:
        return variant, model
    variant.note += " (not kept: measured no closer)"
    ev.declined.append(variant)
    return chosen, built


def _with_qat(
    chosen: Candidate, built: onnx.ModelProto, ev: _Evaluator, device: str
) -> tuple[Candidate, onnx.ModelProto]:
    """With ``finetune``: the chosen quantized model trained quantization-aware in its own graph, if it is closer.

    The recipe gains a ``qat`` step after its quantize step (MSE distillation from the original, 6 epochs at
    lr 1e-4). QAT changes values, not the graph, so latency and size stay; it is kept when it measures better
    on the evaluation data (``pick_best``). The reference transformer's int4 model went 40.17 -> 44.11 dB this
    way (``bench/finetune.py``); on the reference CNNs' int8 models no epoch beat the PTQ model.
    """
    steps = chosen.recipe["steps"]
    if not any(s["pass"] == "quantize" for s in steps) or any(s["pass"] == "qat" for s in steps):
        return chosen, built
    recipe = {**chosen.recipe, "steps": [*steps, {"pass": "qat", "device": device}]}
    return _kept_if_closer(chosen, built, ev, recipe, "QAT")


def _tied_tables(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Per layer key, the (stored, int8) bytes of the token table its weight is tied to (equal, transposed)."""
    from onnxpress.passes.fold import transposed_twins
    from onnxpress.passes.low_rank import layer_keys
    from onnxpress.pipeline import import_graph

    graph = import_graph(model)
    keys = layer_keys(graph)
    out: dict[str, tuple[int, int]] = {}
    for a, b in transposed_twins(graph):
        for table, weight in ((a, b), (b, a)):
            if all(c.op == "Gather" for c in table.outputs):
                for layer in weight.outputs:
                    if layer.op in ("MatMul", "Gemm") and id(layer) in keys:
                        values = np.asarray(table.values)
                        out[keys[id(layer)]] = (int(values.nbytes), int(values.size))
    return out


FREE_PENALTY = 0.01
"""Float penalty up to which a layer counts as free in float (:func:`free_float_picks`)."""

NEAR_FREE_PENALTY = 0.05
"""Float penalty (of the original's latency, measured on the unpruned int8 model) up to which ``optimize`` also tries
each such int8 layer of its winner float, one at a time, keeping it only when the winner then times no slower (three
loops side by side) and is no less faithful.

Pruning changes which kernel is faster: the reference ResNet's 1-input-channel stem measured a penalty of 0.012-0.041
on the full int8 model in four searches (above ``free_float_picks``' 0.01, so the winner kept it int8), while in the
winner, 62.5% pruned + fine-tuned + int8, it ran 0.199 / 0.202 / 0.195x with the stem int8 and 0.186 / 0.190 /
0.180x float (same accuracy); its last conv (0.012-0.014) read 0.21x float against 0.21-0.22x int8 in the same
loops, so one at a time. In a search the difference was within the noise (a greedy pruned mix: 0.203 / 0.201 / 0.199
float vs 0.203 / 0.199 / 0.203 int8; the 62.5%-pruned structure 0.195 / 0.195 / 0.204 vs 0.193 / 0.192 / 0.196), so
the winner keeps the int8 layer unless the float one measures no slower. Also tried on every structured baseline
before the fine-tune: no pick changed in that run, and the extra structures crowd the shortlist; not kept."""


def _float_options(space: SearchSpace, picks: tuple[int, ...], low: float, high: float) -> list[tuple[int, int]]:
    """``(layer i, its fp32 option j at the same rank)`` per int8 layer whose float penalty is in ``(low, high]``.

    Lowest penalty first; none before penalties are measured; a layer with no fp32 option at its rank is left out.
    """
    if space.float_penalty is None:
        return []
    found = []
    for i in range(len(space.layers)):
        cur = space.options[i][picks[i]]
        penalty = space.float_penalty[i]
        if cur.quant != "int8" or penalty is None or not low < penalty <= high:
            continue
        j = next((j for j, o in enumerate(space.options[i]) if o.quant == "fp32" and o.rank == cur.rank), None)
        if j is not None:
            found.append((penalty, i, j))
    return [(i, j) for _, i, j in sorted(found)]


def free_float_picks(space: SearchSpace, picks: tuple[int, ...], tolerance: float = FREE_PENALTY) -> tuple[int, ...]:
    """``picks`` with every int8 layer whose measured float penalty is at most ``tolerance`` set to fp32, same rank.

    The tolerance (1% of the original's latency) is about the timing noise of one penalty; penalties are
    clipped at 0, so a layer that is really as fast in float reads 0 to ~0.01. The caller times the result.
    """
    out = list(picks)
    for i, j in _float_options(space, picks, -math.inf, tolerance):
        out[i] = j
    return tuple(out)


LATENCY_NOISE = 0.01
"""Relative spread of one interleaved timing loop that ``retimed_ratio`` forgives (a tie at the budget).

Measured on the quiet 2-core box (1 thread, 30 rounds per loop, 10 loops): the reference ResNet int8 with
its stem and classifier float against plain int8 read 0.9986 +- 0.0040 (wall) and 0.9978 +- 0.0050 (CPU time).
"""


def retimed_ratio(times: Sequence[float]) -> float:
    """The latency ratio a candidate timed in several loops is judged by: ``max(median, max / (1 + noise))``.

    So it meets a budget ``B`` when the median of its timings does and no single timing exceeds ``B`` by
    more than ``LATENCY_NOISE``. Taking the largest timing alone (the rule before) turned every tie into a
    coin flip per loop: the searched ResNet with its stem and classifier float, as fast as uniform int8
    (0.998x, above) and 2.3 dB more faithful, was dropped at uniform int8's latency whenever one of three
    loops read it above 1.0. A small pruned model whose loops spread by 10-15% (0.213, 0.178, 0.194 at a
    0.2 budget, which later measured 0.217) still fails: 0.213 / 1.01 > 0.2.
    """
    ordered = sorted(times)
    return max(float(np.median(ordered)), ordered[-1] / (1.0 + LATENCY_NOISE))


USABLE_SQNR_DB = 20.0
"""When no candidate meets the budget (and no ``max_drop`` says what accuracy is acceptable), the one written is
the cheapest of those whose output SQNR is at least this (10% RMS error), and the cheapest of all only when none is.
A model within the budget but below it is written with a warning (the budget is the user's; the search gave the
closest outputs it found there: the tiny test CNN at flops=0.3 gets 1.3 dB).

The cheapest of all was once written whatever its fidelity: a ViT searched against latency=0.5 got a -1.55 dB model
(12.5% top-1 agreement) at 0.562 while uniform int8 measured 32.6 dB at 0.746; a GRU classifier got a rank-2
split at 7.5 dB (72% agreement) for a latency of 0.967 against int8's 43.4 dB at 1.045. A model over its budget is
written for the user to look at and decide (status 3), and a broken one helps nobody decide.
"""

CONFIRM_LOOPS = 3
CONFIRM_ROUNDS = 40
"""The written model is timed alone beside the latency reference in this many loops of this many rounds, unscaled.

In-search timings are scaled to the uniform int8 baseline's first ratio (it removes the drift between loops,
but a baseline read 3% low moves every candidate with it), and the search picks the most faithful model under
the budget, so its pick sits at the budget. Timed again the way a user (and ``bench/optimize.py``) times it,
the reference ResNet's target pick (a greedy prune mix + KD + int8, 1 thread, budget 0.2) read 0.210x
(0.202-0.212) while the search had it within 0.2: the pick is confirmed that way, and the next best is
taken when the median misses (seconds: ~6 s for a batch-64 CNN).
"""


def pick_best(candidates: Sequence[Candidate], n_labels: int | None, *, binomial: bool = True) -> Candidate:
    """The candidate with the best fidelity: highest SQNR, or with labels the highest accuracy.

    Accuracies within one binomial standard error of the best (at least one sample) count as a tie
    that SQNR breaks. On the 360 test digits one sample is 0.28 points; ranking by accuracy alone once preferred a 20 dB
    candidate to a 29 dB one for a single digit, a difference the data cannot resolve.
    ``binomial=False`` (a user metric, whose noise we cannot know): only equal values tie.
    """
    def sqnr(c: Candidate) -> float:
        return c.sqnr_db if c.sqnr_db is not None else -math.inf

    scored = [c for c in candidates if c.accuracy is not None]
    if n_labels is None or not scored:
        return max(candidates, key=sqnr)
    top = max(c.accuracy for c in scored)
    tol = max(math.sqrt(top * (1.0 - top) / n_labels), 1.0 / n_labels) if binomial else 0.0
    return max((c for c in scored if c.accuracy >= top - tol - 1e-12), key=sqnr)


PENALTY_LOOP_SECONDS = 20.0
"""A float-penalty timing loop is cut to about this long (fewer rounds, at least 8) on a large model."""


def _repeats_within(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], sessions: int, repeats: int,
                    threads: int | None) -> int:
    """``repeats``, lowered so that ``sessions`` runs per round fit ``PENALTY_LOOP_SECONDS`` (at least 8).

    The reference CNNs keep all 30 rounds (27 sessions of ~3 ms: ~2.5 s a loop); a 4-layer BERT-style
    encoder (27 sessions of ~0.1 s on 48 x 128 tokens) took 411 s for its three loops of 30.
    """
    from onnxpress.runtime import make_session

    session = make_session(model, threads=threads, what="model")
    session.run(None, dict(feed))  # warm-up
    start = time.perf_counter()
    session.run(None, dict(feed))
    one = time.perf_counter() - start
    fit = int(PENALTY_LOOP_SECONDS / max(one * sessions, 1e-9))
    return max(min(repeats, 8), min(repeats, fit))


def measure_float_penalties(m0: onnx.ModelProto, calib: object, space: SearchSpace, feed: Mapping[str, np.ndarray],
                            *, method: str = "mse", threads: int | None = 1, repeats: int = 30, loops: int = 3,
                            reference: onnx.ModelProto | None = None, progress: bool = False,
                            deadline: float | None = None) -> list[float] | None:
    """Latency ratio added by keeping each MAC layer of ``space`` float in the all-int8 model (≥ 0).

    One calibration table, one model per layer (int8 but that layer), all timed in interleaved loops
    with the all-int8 model: ``π_l = t(int8 except l) / t(M0) - t(int8) / t(M0)`` within a loop, the
    smallest over ``loops`` loops. The smallest, because a penalty only proposes: a free float layer
    (``free_float_picks``) is tried in a candidate that is then timed against the budget, and the cost
    model is corrected by measured candidates. One loop read the MobileNet classifier at 0.000-0.037 over
    six searches, on both sides of the 0.01 that makes a layer free, so the variant that keeps it float
    (+0.11 dB at the same latency) was proposed in some searches only. A float
    layer inside an int8 chain pays more than its MACs (layout changes around it, the float Add/Relu
    it feeds): on the reference ResNet (1 thread) the 1x1 shortcut conv with 0.9% of the MACs added
    0.16 and a 3x3 conv with 16% added 0.31, while the stem and the classifier added nothing.
    ``reference``: the model latencies are ratios to (default ``m0``).

    ``deadline`` (a ``time.monotonic()`` value): None (no penalties, so no free float layers) when the
    variants are not all built by then; loops after the first run only while one more fits before it.
    On a 4-layer BERT-style encoder (26 layers, 48 x 128 tokens) this phase took 411 s of a 653 s search.
    """
    from tqdm.auto import tqdm

    from onnxpress.quantize import quantize
    from onnxpress.recipe import split_names

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    base = quantize(m0, calib=calib, method=method, max_samples=256, bias_correction=False,
                    int8_method="rtn")  # timed only
    models = [base.model]
    names = {n.name for n in m0.graph.node}  # a layer key that names no node (an unnamed one's output) is left out
    for lay in tqdm(space.layers, desc="float penalties", unit="layer", disable=not progress):
        if late():
            log.warning("time limit: float penalties not measured (no layer is proposed as a free float layer)")
            return None
        models.append(quantize(m0, table=base.table, exclude=split_names(lay.key, names)).model)
    ref = m0 if reference is None else reference
    repeats = _repeats_within(models[0], feed, len(models) + 1, repeats, threads)
    per_loop: list[list[float]] = []
    for _ in range(max(1, loops)):
        started = time.monotonic()
        per_loop.append(measure_latency(ref, models, feed, repeats=repeats, threads=threads))
        if deadline is not None and time.monotonic() + (time.monotonic() - started) > deadline:
            break  # another loop would end past the time limit: the penalties of the loops so far
    penalties = [max(min(r[k] - r[0] for r in per_loop), 0.0) for k in range(1, len(models))]
    log.info("float penalties: %s", ", ".join(f"{lay.key} {p:.3f}" for lay, p in zip(space.layers, penalties,
                                                                                      strict=True)))
    return penalties


DEFAULT_FINETUNE_EPOCHS = 60
"""``optimize(finetune=True)``'s epochs when ``finetune_epochs`` is not given (see ``optimize``)."""


def _check_search_options(with_recipe: bool, with_report: bool, **given: Any) -> None:
    """Refuse options that would be ignored: search options beside a recipe, fine-tune options without a fine-tune.

    ``given``: the arguments as passed (None: not given; ``finetune`` and ``auto_ranges`` at their defaults
    False and True are not given). ``latency_threads`` and ``cache_dir`` also serve the report, so a recipe
    takes them with one.

    Raises:
        OnnxpressError: naming the options and the flags they come from.
    """
    flags = {"budget": "--budget", "max_drop": "--max-drop", "time_limit": "--time-limit", "finetune": "--finetune",
             "finetune_epochs": "--finetune-epochs", "finetune_device": "--finetune-device",
             "probe_epochs": "--probe-epochs", "auto_ranges": "--no-auto-ranges",
             "latency_threads": "--latency-threads", "cache_dir": "--cache-dir"}
    asked = [k for k, v in given.items() if (v is True if k == "finetune" else v is False if k == "auto_ranges"
                                              else v is not None)]
    for_report = [k for k in asked if k in ("latency_threads", "cache_dir")]
    searching = [k for k in asked if k not in for_report]
    named = ", ".join(f"{k}{'=False' if k == 'auto_ranges' else ''} ({flags[k]})" for k in searching)
    if with_recipe and searching:
        raise OnnxpressError(f"a recipe is applied as written, so {named} would not apply (they steer the search): "
                             f"drop {'it' if len(searching) == 1 else 'them'}, or drop the recipe to search")
    if with_recipe and for_report and not with_report:
        one = len(for_report) == 1
        named = ", ".join(f"{k} ({flags[k]})" for k in for_report)
        raise OnnxpressError(f"with a recipe, {named} serve{'s' if one else ''} the report (report=, --report) only: "
                             f"add it, or drop {'it' if one else 'them'}")
    tuning = [k for k in asked if k in ("finetune_epochs", "finetune_device", "probe_epochs")]
    if tuning and not given["finetune"]:
        named = ", ".join(f"{k} ({flags[k]})" for k in tuning)
        verb, obj = ("sets", "it") if len(tuning) == 1 else ("set", "them")
        raise OnnxpressError(f"{named} {verb} up the fine-tune, which runs only with finetune=True (--finetune): "
                             f"add that, or drop {obj}")


@scoped_input_dims
def optimize(
    model: ModelSource,
    output: str | os.PathLike[str],
    *,
    calib: object,
    eval_data: object | None = None,
    labels: object | None = None,
    metric: Metric | None = None,
    budget: str | Budget | Sequence[str | Budget] | None = None,
    max_drop: float | None = None,
    recipe: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    report: str | os.PathLike[str] | None = None,
    time_limit: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    rank_fractions: tuple[float, ...] | None = None,
    prune_ratios: tuple[float, ...] | None = None,
    prune_multiple: int = 8,
    time_options: bool = False,
    sensitivity_samples: int = 64,
    eval_samples: int = 1000,
    method: str = "mse",
    shortlist: int = 4,
    seed: int = 0,
    finetune: bool = False,
    finetune_epochs: int | None = None,
    finetune_device: str | None = None,
    probe_epochs: int | None = None,
    latency_threads: int | None = None,
    float_penalties: bool = True,
    latency_reference: ModelSource | None = None,
    auto_ranges: bool = True,
    dims: Mapping[str, int] | None = None,
    progress: bool = False,
) -> OptimizeResult:
    """Search per-layer int8/fp32 × low-rank × per-group pruning options under a budget and write the best model found.

    Candidates are built with :func:`onnxpress.recipe.apply_recipe` and the winner's recipe is
    written beside the output, so ``optimize(model, out, calib=..., recipe=<that file>)`` rebuilds it
    byte for byte.

    Args:
        model: path or ModelProto (never modified).
        output: where the model goes; its recipe is written beside it as ``<name>.recipe.json``.
        calib: calibration data (anything ``open_data`` accepts).
        eval_data: data the candidates are compared on (default: the calibration data).
        labels: class labels for ``eval_data`` (``.npy``/``.npz``/array); accuracy then ranks candidates.
            Default: the ``labels`` key of ``eval_data`` when it is an ``.npz`` that has one. Accuracy is top-1
            of the model's *first* output read as ``[samples, classes]`` (other outputs are not scored; give
            ``metric`` for those). With ``metric``, an array is passed to it as given (any dtype or shape,
            samples on axis 0); a file still holds class indices.
        metric: ``metric(outputs, labels) -> float``, higher is better (:data:`Metric`): scores each candidate
            (and the original) on the evaluation data in place of accuracy: it ranks candidates, ``max_drop``
            applies to it, and the report shows it. ``outputs`` lists the candidate's outputs in graph order,
            each concatenated over the samples on axis 0. Needs ``labels``. Unlike accuracy, values that differ
            at all are not a tie (the noise of a user metric is unknown); equal values are broken by SQNR.
        budget: ``latency=F`` (measured onnxruntime latency ratio), ``size=F`` or ``flops=F``; or a list
            of them, one per kind: the search plans against all of them (the first steers the neighbours it
            also builds and the Pareto front), and a candidate is feasible when every one holds as measured
            (``["latency=0.2", "size=0.1"]``). Default ``latency=0.5``.
        max_drop: largest accepted accuracy drop in points (needs labels): ``100 * (reference - candidate)``.
            With ``metric`` the same formula on its values, so points of a metric in [0, 1] like accuracy.
        recipe: apply this recipe instead of searching; the search's options (``budget``, ``max_drop``,
            ``time_limit``, ``finetune`` and its settings, ``auto_ranges=False``) are then refused, not ignored.
        report: folder for ``report.md``, ``report.json`` and the PNGs.
        time_limit: seconds for the whole run (> 0; None: no limit). Each phase stops at its next step once it
            has passed and the best model so far is written: the sensitivity analysis measures every layer's int8
            option (the uniform int8 baseline) and then other options while time remains, the float
            penalties are skipped when they cannot finish, and the search rounds stop. A run cut
            short says so (``timed_out``). Loading, fine-tuning, the last measurements of the chosen model and
            the report are not interrupted, so the run takes longer than the limit (a 5 s limit on the reference
            ResNet: 14 s, of which 1.7 s is starting Python).
        cache_dir: sensitivity cache folder (default ``~/.cache/onnxpress``).
        rank_fractions: rank options as fractions of each layer's full rank. Default ``(0.5, 0.25)``,
            except none for a latency budget with ``finetune`` and pruning (and no ``time_options``):
            on the reference ResNet (int8, 1 thread) a searched candidate with splits measured 0.33x
            latency at 0.30x MACs while pruning alone gave 0.24x at 0.54x MACs, so MAC-costed splits
            lead the latency search astray.
        prune_ratios: channel-pruning ratios offered per channel group (empty: no pruning). Default
            ``(0.25, 0.5, 0.75)``, or :data:`FINE_PRUNE_RATIOS` (steps of 0.125) with ``finetune``.
        prune_multiple: kept channels per group rounded to a multiple of this.
        time_options: with a latency budget, time every rank/prune option alone in the sensitivity
            phase and cost the latency by those timings instead of MACs. Off by default: on a shared
            2-core machine the single-option timings of the reference ResNet were noise-dominated
            (a 25% prune timed at 1.08x, the same group's 50% at 0.82x) and the search did worse.
        sensitivity_samples: samples the per-layer SQNR is measured on.
        eval_samples: samples candidates are compared on.
        method: calibration method of the quantize step.
        shortlist: candidates built and measured per round.
        seed: local-search seed.
        finetune: distil the original into every pruned or split candidate (on ``calib``) before it
            is quantized; candidates (and ``max_drop``) are measured after the fine-tune (needs torch).
            The search then also tries assuming the fine-tune removes 90% / 99% / 99.9% of pruning's noise.
            A quantized choice is then also trained quantization-aware (a ``qat`` recipe step), kept if closer.
        finetune_epochs: epochs of that fine-tune (default 60: on the 500-sample calibration set of the reference
            ResNet, the searched structure at 0.33x MACs ended 1.1 points below the original on the test
            split after 30 epochs and 0.3 points above it after 60, at 64 samples a step; at the batch the fine-tune
            now takes there, 16, ResNet with 62.5% of its channels pruned reads 0.980 after 30 epochs and 0.990
            after 60 on the 937 training digits outside the calibration set).
        finetune_device: where torch trains (``"cpu"``, the default, ``"cuda"``, ``"cuda:N"``, ``"auto"``); written
            into the recipe's finetune step, since a GPU-trained model differs from a CPU-trained one
            by float rounding and a recipe rebuilds byte for byte on the device it names.
        probe_epochs: epochs of the probe fine-tune that ranks the in-budget structures before the best
            get the full one. Default none: on the reference ResNet 6- and 10-epoch probes (of 30) left
            every in-budget structure at chance accuracy (0.10-0.16) while the full fine-tune brought one
            of them to 0.988 (those probes still stopped early after 3 epochs without progress, which the
            searched recipes no longer do; probes without early stopping were not re-measured). Without
            a probe the in-budget structures are fully fine-tuned in order of the budget they use.
        latency_threads: onnxruntime intra-op threads when timing candidates against the original (default 1)
            (the latency budget holds at this thread count; small pruned models gain less from a
            second thread than the original does, so their ratio is higher at 2 threads).
        float_penalties: with a latency budget, time the int8 model with each layer left float
            (:func:`measure_float_penalties`) and cost float layers by those timings; off: by their
            MACs at the fp32 rate, which on the reference ResNet understated a float shortcut conv ~25-fold.
        latency_reference: a model whose latency a ``latency`` budget is a fraction of, timed in the
            same loops as the candidates (default: the original). ``bench/optimize.py`` passes a
            uniform model with ``latency=1`` to search at that model's latency: a ratio to the fp32
            original measured minutes earlier moved by 6% (0.340 -> 0.360 for int8) on the shared box.
            The candidates' ``latency_ratio`` are then ratios to it.
        auto_ranges: once a feasible model is chosen, rebuild it with each activation's range method
            picked per tensor (quantize ``method="auto"``, ``onnxpress.range_search``) and keep that if it
            measures better on the evaluation data with the same graph (same kernels, so the same cost);
            the recipe then says ``"method": "auto"``. Then the same with its activation channels equalized
            (quantize ``equalize="activations"``; tried when ``eval_data`` is given or ``calib`` has at least
            ``EQUALIZE_MIN_SAMPLES`` samples). Seconds to tens of seconds on the reference models.
        dims: sizes of the inputs' symbolic dimensions beyond the batch (a sequence length), by name or
            ``"<input>:<axis>"``, for counting MACs (``flops`` budgets, the report); those left out come
            from the first sample of ``calib``.
        progress: progress bars.

    Raises:
        OnnxpressError: bad budget/recipe/max_drop/time_limit, a search option with a recipe, a fine-tune
            setting without ``finetune``, a metric without labels or that returns no finite number;
            DataError for data or labels that do not fit.
    """
    from tqdm.auto import tqdm

    start = time.monotonic()
    check_argument_types("optimize", flags={"finetune": finetune, "time_options": time_options,
                                            "float_penalties": float_penalties, "auto_ranges": auto_ranges,
                                            "progress": progress},
                         counts={"prune_multiple": prune_multiple, "sensitivity_samples": sensitivity_samples,
                                 "eval_samples": eval_samples, "shortlist": shortlist,
                                 "finetune_epochs": finetune_epochs, "probe_epochs": probe_epochs,
                                 "latency_threads": latency_threads},
                         numbers={"max_drop": max_drop, "time_limit": time_limit})
    if time_limit is not None and not time_limit > 0:  # NaN fails this too
        # 0 read as "no limit" and a negative one stopped at once and wrote a model over the budget
        raise OnnxpressError(f"--time-limit must be a positive number of seconds, got {time_limit}; "
                             "leave it out for no limit")
    deadline = start + time_limit if time_limit is not None else None
    _check_search_options(recipe is not None, report is not None, budget=budget, max_drop=max_drop,
                          time_limit=time_limit, finetune=finetune, finetune_epochs=finetune_epochs,
                          finetune_device=finetune_device, probe_epochs=probe_epochs, auto_ranges=auto_ranges,
                          latency_threads=latency_threads, cache_dir=cache_dir)
    latency_threads = 1 if latency_threads is None else latency_threads
    out = check_output_path(output, [model, calib, eval_data, labels, recipe, latency_reference])
    # the recipe beside it and the report folder fail now, not after the search wrote the model
    sidecar = _recipe_path(out)
    given_sidecar = isinstance(recipe, (str, os.PathLike)) and Path(recipe).resolve() == sidecar.resolve()
    if not given_sidecar:
        check_output_path(sidecar, [model, calib, eval_data, labels, recipe, latency_reference],
                          example="model.recipe.json")
    if report is not None:
        from onnxpress.report import check_report_folder

        check_report_folder(report)
    if labels is None and eval_data is not None and _npz_has_labels(eval_data):
        labels = eval_data  # an evaluation .npz that carries its labels (the readers ignore the extra key)
        log.info("labels taken from the 'labels' key of %s", eval_data)
    if max_drop is not None and (labels is None or not 0 <= max_drop < math.inf):  # NaN fails this too
        raise OnnxpressError("--max-drop needs labels (--labels) and a finite value >= 0 (accuracy points)")
    if metric is not None and (labels is None or not callable(metric)):
        raise OnnxpressError("metric must be a callable metric(outputs, labels) -> float and needs labels "
                             "(labels=, or an evaluation .npz with a 'labels' key)")
    finetune_epochs = DEFAULT_FINETUNE_EPOCHS if finetune_epochs is None else finetune_epochs
    finetune_device = "cpu" if finetune_device is None else finetune_device
    budget = "latency=0.5" if budget is None else budget
    if finetune and recipe is None and finetune_device != "cpu":
        from onnxpress.bridge.train import resolve_device

        # a missing GPU is a one-line error now, not after the sensitivity scan; "auto" is written into the
        # recipe as the device it chose here, so the recipe says where its bytes came from
        finetune_device = str(resolve_device(finetune_device))
    original = load_model(model)
    refuse_quantized(original, "optimize")
    if is_large(original):
        raise UnsupportedModelError(
            f"optimize builds, runs and times many candidates of the model; one over protobuf's 2 GiB "
            f"({model_bytes(original) / 2**30:.1f} GiB) is not supported: run quantize, prune or lowrank on it"
        )
    m0 = prepare(original)
    if finetune:
        try:
            from onnxpress.bridge.convert import OnnxModule
        except ImportError:
            raise UnsupportedModelError("--finetune needs torch: pip install 'onnxpress[torch]'") from None
        OnnxModule.check_ops(m0.graph)  # an op the bridge cannot run fails now, not after the search
        from onnxpress.finetune import check_dynamic_batch

        check_dynamic_batch(m0, "model")  # so does a fixed batch, which the training cannot run
    assume_input_dims(symbolic_sizes(m0, calib, dims))  # MACs per sample at the calibration data's sizes
    lat_ref = m0 if latency_reference is None else load_model(latency_reference)
    ref_bytes = lat_ref.SerializeToString()
    same_as_ref: dict[tuple[int, ...], bool] = {}
    over_budget: set[tuple[int, ...]] = set()  # picks whose written model timed over the budget (confirm)
    data = eval_data if eval_data is not None else calib
    feeds = read_feeds(m0, data, eval_samples)
    label_array = None
    if labels is not None:
        from onnxpress.calibration.readers import load_labels, sample_axes, samples_in

        axes = sample_axes(m0)
        n = sum(samples_in(f, axes) for f in feeds)
        if metric is not None and isinstance(labels, np.ndarray):
            label_array = labels  # the user's metric reads them: any dtype or shape, samples on axis 0
            if label_array.ndim == 0:
                raise DataError("labels for the metric must have the samples on axis 0, got a scalar")
        else:
            label_array = np.asarray(load_labels(labels)).reshape(-1)
        from onnxpress.calibration.readers import open_data

        # one label per sample evaluated, or per sample of all the data (eval_samples may read fewer); another
        # count (a longer file) belongs to other data
        total = None if metric is not None else open_data(data, m0).total_samples
        if label_array.shape[0] < n or total is not None and label_array.shape[0] not in (n, total):
            raise DataError(f"labels hold {label_array.shape[0]} entries but the evaluation data has "
                            f"{n if total is None else total} samples")
        label_array = label_array[:n]
    ev = _Evaluator(m0, original.ByteSize(), calib, feeds, label_array, progress, metric)

    if recipe is not None:
        checked = load_recipe(recipe)
        built = apply_recipe(m0, checked, calib, prepared=True, progress=progress)
        cand = Candidate((), math.nan, math.nan, recipe=checked)
        ev.models[()] = built
        ev.measure(cand)
        path = sidecar if given_sidecar else save_recipe(checked, sidecar)  # never rewrite the recipe given
        result = OptimizeResult(built, out, checked, path, cand, [cand], [], None, True, None, {},
                                ev.ref_accuracy, False, metric_name=ev.metric_name)
        if report is not None:
            from onnxpress.report import write_report

            # no search: int8 sensitivity for the images
            write_report(report, result, m0, calib, feeds, threads=latency_threads, cache_dir=cache_dir,
                         sensitivity_samples=sensitivity_samples, original_bytes=ev.original_bytes)
        save_model(built, out)  # last (see the search's end below)
        return result

    budgets = [parse_budget(b) for b in (budget if isinstance(budget, (list, tuple)) else [budget])]
    if not budgets or len({b.kind for b in budgets}) != len(budgets):
        raise OnnxpressError("give one budget per kind, e.g. --budget latency=0.2 --budget size=0.1")
    bud = budgets[0]  # the search plans against every one (this one steers the neighbours and the Pareto front)
    also = [(b.kind, b.value) for b in budgets[1:]]
    timed = any(b.kind == "latency" for b in budgets)
    if prune_ratios is None:
        prune_ratios = FINE_PRUNE_RATIOS if finetune else (0.25, 0.5, 0.75)
    if rank_fractions is None:
        # int8 splits measured slower than the pruning that saves the same MACs (see the docstring)
        no_split = finetune and bud.kind == "latency" and bool(prune_ratios) and not time_options
        rank_fractions = () if no_split else (0.5, 0.25)
    sens = analyze_sensitivity(m0, calib, rank_fractions=rank_fractions, prune_ratios=prune_ratios,
                               prune_multiple=prune_multiple, latency=time_options and bud.kind == "latency",
                               codebook=any(b.kind == "size" for b in budgets),
                               w4a8=any(b.kind == "size" for b in budgets),
                               method=method, max_samples=sensitivity_samples,
                               cache_dir=cache_dir, progress=progress, deadline=deadline)
    # the constants quantize stores int8 whatever the layers take (a token table): a fixed term of the size estimate
    stored = run_passes(m0, [StoreConstantsInt8(min_size=CONSTANTS_INT8_MIN_SIZE)]).model
    space = SearchSpace(sens, m0.ByteSize(), prune_multiple=prune_multiple,
                        fixed_bytes=stored.ByteSize() - m0.ByteSize(), tied_tables=_tied_tables(m0))
    # pruning's noise is measured before any fine-tune; with one, also search assuming most of it recovers
    discounts = (1.0, 0.1, 0.01, 0.001) if finetune and space.groups else (1.0,)
    probe = probe_epochs or 0
    ev.model_bytes = m0.ByteSize()
    candidates: list[Candidate] = []

    def make(picks: tuple[int, ...], note: str) -> Candidate:
        for c in candidates:
            if c.picks == picks:
                return c
        c = space.candidate(bud.kind, picks)
        c.recipe = space.recipe(picks, method=method, finetune_epochs=finetune_epochs if finetune else None,
                                finetune_device=finetune_device)
        c.note = note
        return c

    def tuned(c: Candidate) -> bool:
        return any(step["pass"] == "finetune" for step in c.recipe["steps"])

    def fits(c: Candidate) -> bool:
        return all(_holds(c.cost(b.kind) or math.inf, b.value) for b in budgets)

    def evaluate(batch: list[Candidate]) -> None:
        """Measure cost on each candidate's graph; fidelity right away only for those without a fine-tune.

        A fine-tune changes weights, not the graph: size, MACs and latency of a candidate are those of
        its recipe without the fine-tune step, so every structure is built and timed cheaply. Until
        it is fine-tuned (see ``judge``), a candidate that prunes or splits carries the fidelity of its
        un-tuned graph, marked in its note.

        Each batch is timed together with the uniform int8 baseline and scaled so that the baseline
        keeps its first ratio: on the shared 2-core machine the same int8 MobileNet measured 0.545,
        0.576 and 0.600 of the original in three loops, while models within one loop moved together
        (a float stem beside it: -0.012, -0.003, -0.018).
        """
        todo = [c for c in batch if c.size_ratio is None]
        for c in tqdm(todo, desc="candidates", unit="model", disable=not progress):
            if tuned(c):
                ev.measure_cost(c, ev.build_structure(c))
                ev.measure_fidelity(c, ev.structures[c.picks])
                c.note += UNTUNED
            else:
                ev.measure(c)
            candidates.append(c)
        if timed and todo:
            for c, r in zip(todo, time_ratios(todo), strict=True):
                c.latency_ratio = r

    def time_ratios(batch: list[Candidate]) -> list[float]:
        """Latency ratios of ``batch`` in one interleaved loop, with the baseline in it to remove the drift."""
        built = [ev.models.get(c.picks) or ev.structures[c.picks] for c in batch]
        anchor = candidates[0] if candidates and candidates[0] not in batch else None
        if anchor is not None and is_reference(anchor):
            anchor = None  # the baseline is the reference itself, already in every loop: no drift to remove
        if anchor is not None:  # the baseline again, in the same loop: its first ratio sets the scale
            built.insert(0, ev.models[anchor.picks])
        ratios = measure_latency(lat_ref, built, feeds[0], repeats=30, threads=latency_threads)
        if anchor is not None:
            drift = anchor.latency_ratio / ratios.pop(0)
            log.info("latency ratios of this loop scaled by %.3f (the uniform int8 baseline's drift)", drift)
            ratios = [r * drift for r in ratios]
        # a candidate that builds the reference's very bytes runs the same kernels: its ratio is 1, not a
        # timing that lands on either side of the budget (the bench's same-latency searches, whose
        # reference is the uniform model, otherwise dropped that model and chose a faster, worse one)
        return [1.0 if is_reference(c) else r for c, r in zip(batch, ratios, strict=True)]

    def is_reference(c: Candidate) -> bool:
        """Whether ``c``'s full model has the latency reference's bytes (once per built model)."""
        if c.picks not in ev.models:
            return False
        if c.picks not in same_as_ref:
            same_as_ref[c.picks] = ev.models[c.picks].SerializeToString() == ref_bytes
        return same_as_ref[c.picks]

    # baseline: uniform int8 (also gives the latency ratio ρ of int8 for the estimate)
    evaluate([make(space.uniform("int8"), "uniform int8")])
    if timed:  # every later loop is scaled to this ratio: the median of three loops, not one (one loop
        # read the 2-core box's load of that moment: ±3% on MobileNet ratios)
        base = candidates[0]
        base.latency_ratio = float(np.median([base.latency_ratio] + [time_ratios([base])[0] for _ in range(2)]))
    if timed and candidates[0].latency_ratio:  # a latency budget, first or not: the search plans against each
        space.rho = candidates[0].latency_ratio
        if float_penalties and any(o.quant == "int8" for opts in space.options for o in opts):
            space.float_penalty = measure_float_penalties(m0, calib, space, feeds[0], method=method,
                                                          threads=latency_threads, reference=lat_ref,
                                                          progress=progress, deadline=deadline)
    if space.float_penalty is not None:  # the int8 baseline with its free float layers: as fast, more faithful
        # (reference ResNet, bias correction on: stem + classifier float 43.75 vs 41.93 dB at 0.333 vs 0.335x)
        free = free_float_picks(space, candidates[0].picks)
        if free != candidates[0].picks:
            evaluate([make(free, "uniform int8 + free float layers")])
    if bud.kind != "latency":  # int4 layers run at fp32 speed: baselines for size and MACs budgets only
        mixes = [(space.uniform_int4(rest), f"uniform int4 + {rest}") for rest in ("fp32", "int8")]
        # W4A8 wherever a layer offers it (quantize --weights int4 --activations uint8): int8's speed, and a
        # size the greedy's per-layer picks may not reach for their estimates' errors
        mixes.append((space.uniform_where("w4a8"), "uniform w4a8 + int8"))
        evaluate([make(p, note) for p, note in mixes if p is not None and p != candidates[0].picks])

    def plan(at: float) -> tuple[tuple[int, ...] | None, Sequence[tuple[str, float]]]:
        """The greedy's picks for the first budget at ``at`` and every other one, and the budgets it planned for.

        When no assignment fits them all by the estimate: the first alone (the next best; the measured check of
        every budget still decides).
        """
        picks = space.greedy(bud.kind, at, also=also)
        if picks is None and also:
            return space.greedy(bud.kind, at), []
        return picks, also

    for b in budgets:
        if b.kind == "size" and len(candidates) > 1:
            # the baselines' measured sizes correct the estimate before the first plan: each layer's Q/DQ nodes
            # were counted once per layer measured alone, but are shared (and compacted) in a whole model, so the
            # estimate ran ~0.025 high on the reference ResNet (uniform int8 0.279 for 0.254 measured, uniform
            # W4A8 0.162 for 0.136) and its size=0.15 plan at int8 speed measured 0.126 with a layer split
            space.fit_cost("size", [(c.picks, c.size_ratio) for c in candidates], near=b.value)
    limit = bud.value
    fast_plan = any(b.kind == "size" for b in budgets) and space.offers("w4a8")
    timed_out = False
    want = shortlist  # with a fine-tune: structures within the measured budget wanted before judging
    for round_ in range(4 if finetune else 3):
        if deadline is not None and time.monotonic() > deadline:
            timed_out = True
            break
        batch = []
        searched: tuple[int, ...] | None = None
        for delta in discounts:
            space.prune_discount = delta
            greedy, joint = plan(limit)
            if joint is not also:
                log.info("no assignment fits every budget by the estimate; planning against %s alone", bud.kind)
            if greedy is None:
                continue
            refined = space.refine(bud.kind, limit, greedy, seed=seed + round_, deadline=deadline, also=joint)
            tag = "" if delta == 1.0 else f" (prune noise x{delta:g})"
            searched = refined if delta == 1.0 else searched
            batch += [make(refined, "searched" + tag), make(greedy, "greedy" + tag)]
        space.prune_discount = 1.0
        if fast_plan:
            # the plan again by precision alone on int8 kernels: from uniform int8, W4A8 where bytes must go; never
            # a float kernel (fp32, int4 weight-only, codebook), a split or a pruned group. The per-layer codebook
            # scores, measured with float activations, beat W4A8's and the plan took them, though the models
            # measured worse: the reference ResNet at size=0.2 read 38.4 dB that way, int8 with W4A8 on its largest
            # conv 43.0 dB at 0.196; float layers, cheap in bytes, took its latency from 0.32 to 0.55x; and a split
            # the estimate liked read 34.4 dB where W4A8 alone read 39.2 (size=0.15 with latency=0.45)
            space.skip_quant = frozenset(FLOAT_RATE) | FAST_PLAN_SKIPS
            int8 = space.uniform("int8")
            fast = space.greedy(bud.kind, limit, int8, also=also)
            joint = also if fast is not None else ()
            fast = fast if fast is not None or not also else space.greedy(bud.kind, limit, int8)
            if fast is not None:
                fast = space.refine(bud.kind, limit, fast, seed=seed + round_, deadline=deadline, also=joint)
                batch.append(make(fast, "searched at int8 speed"))
            space.skip_quant = frozenset()
        if not batch:
            log.warning("no assignment fits %s=%.3f by the estimate; keeping the best measured", bud.kind, limit)
            break
        for f in (0.8, 1.25):  # neighbours of the budget, for the Pareto front
            near, _ = plan(min(limit * f, 1.0))
            if near is not None:
                batch.append(make(near, f"greedy at {f:g}x budget"))
        if finetune and space.groups:
            # structured baselines nearest the budget (all int8): every group at r, and residual streams at r/2;
            # pruning's noise before the fine-tune cannot rank these against the greedy's picks, the probe does
            for half in (False, True):
                uni = [(r, space.uniform_prune(r, stream_ratio=r / 2 if half else None)) for r in sorted(prune_ratios)]
                fit_uni = [(r, p) for r, p in uni if space.cost(bud.kind, p) <= limit * 1.1][:2]
                for r, p in fit_uni:
                    label = f"uniform int8 + prune {r:g}" + (f" (streams {r / 2:g})" if half else "")
                    batch.append(make(p, label))
                    if space.float_penalty is not None and (free := free_float_picks(space, p)) != p:
                        # a pruned 1-input-channel stem runs slower in int8 than in float (reference ResNet,
                        # 50% pruned: 0.213 -> 0.179x at 2 threads with it float), which the all-int8 baseline misses
                        batch.append(make(free, label + " + free float layers"))
        seen: set[tuple[int, ...]] = set()
        batch = [c for c in batch if c.size_ratio is None and not (c.picks in seen or seen.add(c.picks))]
        # searched ones first; structures are cheap to build and time, so a fine-tuned search looks at more
        rank = {"searched": 0, "uniform": 1}
        batch = sorted(batch, key=lambda c: rank.get(c.note.split()[0], 2))[:shortlist * (2 if finetune else 1)]
        if not batch:
            break
        evaluate(batch)
        if finetune and sum(fits(c) for c in candidates[1:]) >= want:
            break
        main = next((c for c in candidates if c.picks == searched), None)
        if not finetune and (main is None or fits(main)):
            # the estimate's pick fits as measured; a neighbour that fits while it does not (the 0.8x-budget
            # greedy) is no reason to stop: the corrected estimate's next pick uses more of the budget
            break
        # the estimate missed: correct it by the measured / estimated ratio of the candidates nearest the budget
        for b in budgets:
            space.fit_cost(b.kind, [(c.picks, c.cost(b.kind)) for c in candidates], near=b.value)
        log.info("%s estimate corrected by %.3f", bud.kind, space.scale[bud.kind])

    def retime() -> None:
        """Time the structures near the latency budget twice more, together; judge them by :func:`retimed_ratio`.

        One interleaved timing of a small pruned model varied by ±10-15% on the shared 2-core machine,
        and the candidates within 1.15x of the budget are the ones that decision turns on: a model
        written as within the budget should stay there when measured again (a candidate timed 0.213,
        0.178, 0.194 whose median passed 0.2 measured 0.217 in five later rounds). Every latency search
        does this (not only with a fine-tune): the MobileNet mix searched at uniform int8 + 50% rank's
        latency, timed once at 0.636, measured 0.654 beside that model's 0.626 in the bench.
        """
        lat = next((b.value for b in budgets if b.kind == "latency"), None)
        near = [c for c in candidates[1:] if lat is not None and c.latency_ratio is not None
                and c.latency_ratio <= lat * 1.15 and all(_holds(c.cost(b.kind) or math.inf, b.value)
                                                           for b in budgets if b.kind != "latency")]
        if not near:
            return
        again = [time_ratios(near) for _ in range(2)]
        for k, c in enumerate(near):
            times = [c.latency_ratio, again[0][k], again[1][k]]
            log.info("%s: latency %s", c.note, ", ".join(f"{t:.3f}" for t in times))
            c.latency_ratio = retimed_ratio(times)

    def judge() -> None:
        """Fine-tune the structures within the budget (with ``probe_epochs``: a short probe each first).

        The in-budget structures (at most ``shortlist``, those using the most budget first), with
        ``probe_epochs`` ranked by fidelity after that short distillation (then quantized as their recipe
        says), get the recipe's full fine-tune in that order, three at most, until one meets ``max_drop``
        (two were not always enough on the reference ResNet once the latency estimate stopped pricing
        float layers as free: more pruned int8 mixes of the greedy fit the budget, and the first two
        tuned can both miss; one run tuned a 0.88-accuracy greedy mix before a uniform 50% cut at 0.989).
        """
        pending = [c for c in candidates if tuned(c) and UNTUNED in c.note and fits(c)]
        pending = sorted(pending, key=lambda c: -(c.cost(bud.kind) or 0.0))[:shortlist]
        if len(pending) > 1 and 0 < probe < finetune_epochs:
            for c in tqdm(pending, desc="probe fine-tunes", unit="model", disable=not progress):
                if deadline is not None and time.monotonic() > deadline:
                    break
                ev.measure_fidelity(c, ev.build_probe(c, probe))
                c.note = c.note.replace(UNTUNED, f" [fidelity after a {probe}-epoch probe fine-tune]")
            pending = sorted(pending, key=lambda c: fidelity(c), reverse=True)
        for c in pending[:3]:
            if deadline is not None and time.monotonic() > deadline and any(x.picks in ev.models for x in pending):
                break
            ev.measure(c)
            c.note = c.note.replace(UNTUNED, "").split(" [fidelity after")[0]
            if ok(c):
                break

    def polish(best: Candidate) -> Candidate:
        """The chosen model with its free float layers kept float, if that measures within every budget too.

        Then the two near-free layers (:data:`NEAR_FREE_PENALTY`) of lowest penalty float, one at a time, each kept
        where the model times no slower beside the current choice in three loops, still fits, and is no less faithful.

        A layer whose measured float penalty is about zero (float at no latency cost in the int8 model: on the
        reference ResNet the 1-input-channel stem and the classifier) only gains fidelity in float, and in
        a pruned model its int8 kernel can be the slower one: with the search's pick (50% pruning + KD +
        int8) the stem kept float measured 0.160 -> 0.140x at 1 thread and 0.209 -> 0.177x at 2, same
        accuracy. The structured baselines quantize every layer, so this is tried once on the winner, from
        the same fine-tuned weights (the fine-tune is cached), timed three times like ``retime``.
        """
        picks = free_float_picks(space, best.picks)
        if picks != best.picks:
            variant = built_variant(picks, best.note + " + free float layers")
            times = [time_ratios([variant])[0] for _ in range(3)]
            log.info("%s: latency %s", variant.note, ", ".join(f"{t:.3f}" for t in times))
            variant.latency_ratio = retimed_ratio(times)
            variant.feasible = ok(variant)
            if variant.feasible and ev.best([best, variant]) is variant:
                best = variant
        for i, j in _float_options(space, best.picks, FREE_PENALTY, NEAR_FREE_PENALTY)[:2]:  # float where no slower
            if deadline is not None and time.monotonic() > deadline:
                break
            picks = (*best.picks[:i], j, *best.picks[i + 1 :])  # on the current choice (it may hold the one before)
            variant = built_variant(picks, f"{best.note} + {space.layers[i].key} float")
            pairs = [time_ratios([best, variant]) for _ in range(3)]  # side by side: is it faster?
            log.info("%s: latency %s (without it %s)", variant.note, ", ".join(f"{v:.3f}" for _, v in pairs),
                     ", ".join(f"{b:.3f}" for b, _ in pairs))
            variant.latency_ratio = retimed_ratio([v for _, v in pairs])
            variant.feasible = ok(variant)
            if (variant.feasible and np.median([v for _, v in pairs]) <= np.median([b for b, _ in pairs])
                    and ev.best([best, variant]) is variant):
                best = variant
        return best

    def built_variant(picks: tuple[int, ...], note: str) -> Candidate:
        """The candidate for ``picks`` with its full recipe built and measured (the fine-tune is cached)."""
        variant = make(picks, note)
        if variant.picks not in ev.models:  # new, or timed as an un-tuned structure only: build its full recipe
            if variant.size_ratio is None:
                candidates.append(variant)
            ev.measure(variant)
            variant.note = variant.note.replace(UNTUNED, "").split(" [fidelity after")[0]
        return variant

    def ok(c: Candidate) -> bool:
        within = fits(c) and c.picks not in over_budget
        if max_drop is not None and c.accuracy is not None and ev.ref_accuracy is not None:
            within = within and _holds(drop_points(ev.ref_accuracy, c.accuracy), max_drop)
        return within

    def fidelity(c: Candidate) -> tuple[float, float]:
        return ((c.accuracy if c.accuracy is not None else 0.0), c.sqnr_db if c.sqnr_db is not None else -math.inf)

    if timed:
        retime()
    if finetune:
        judge()
    def confirm(c: Candidate) -> bool:
        """Whether ``c``'s built model meets the latency budget timed alone beside the reference (``CONFIRM_LOOPS``).

        Unscaled, in loops of its own, as a user times the written model; the median counts and becomes its
        latency. A model with the reference's graph runs its kernels (ratio 1, not timed); past the deadline
        the search's own timing stands.
        """
        lat = next((b.value for b in budgets if b.kind == "latency"), None)
        if lat is None or not timed:
            return True
        model = ev.models[c.picks]
        if is_reference(c) or same_kernels(model, lat_ref):
            ratios = [1.0]
        elif deadline is not None and time.monotonic() > deadline:
            log.info("%s: past the time limit, its latency not confirmed (%.3f in the search)", c.note, c.latency_ratio)
            return True
        else:
            ratios = [measure_latency(lat_ref, [model], feeds[0], repeats=CONFIRM_ROUNDS, threads=latency_threads)[0]
                      for _ in range(CONFIRM_LOOPS)]
            log.info("%s: latency alone beside the reference %s (%.3f in the search)", c.note,
                     ", ".join(f"{r:.3f}" for r in ratios), c.latency_ratio)
        c.latency_ratio = float(np.median(ratios))
        if _holds(c.latency_ratio, lat):
            return True
        over_budget.add(c.picks)
        c.feasible = False
        log.info("%s measured %.3f over the latency budget %g; taking the next best", c.note, c.latency_ratio, lat)
        return False

    def choose() -> Candidate:
        """The best feasible candidate, or (none) the cheapest within max-drop (or ``USABLE_SQNR_DB``), warned."""
        feasible = [c for c in candidates if c.feasible]
        if feasible:
            return ev.best(feasible)
        if max_drop is not None:
            judged = [c for c in candidates if c.picks in ev.models]
            near = [c for c in judged if _holds(drop_points(ev.ref_accuracy, c.accuracy), max_drop)]
            within = f"within max-drop {max_drop:g}"
        else:
            near = [c for c in candidates if c.sqnr_db is not None and c.sqnr_db >= USABLE_SQNR_DB]
            within = f"of at least {USABLE_SQNR_DB:g} dB SQNR"
        log.warning("no measured candidate meets %s; writing the cheapest one %s",
                    ", ".join(f"{b.kind}={b.value:g}" for b in budgets), within if near else f"found (none {within})")
        return min(near or candidates, key=lambda c: (c.cost(bud.kind) or math.inf, -fidelity(c)[1]))

    for c in candidates:  # judged on what its full recipe builds; a probe or an un-tuned graph is not judged
        c.feasible = ok(c) if c.picks in ev.models else None
    while True:  # each confirmation that fails removes one candidate: this ends
        chosen = choose()
        if chosen.feasible and timed and space.float_penalty is not None:
            chosen = polish(chosen)
        if not chosen.feasible or confirm(chosen):
            break
    if chosen.picks not in ev.models:  # over the budget, so not fine-tuned yet: build what the recipe says
        ev.measure(chosen)
        chosen.note = chosen.note.replace(UNTUNED, "").split(" [fidelity after")[0]
    built = ev.models[chosen.picks]
    if chosen.feasible and auto_ranges and (deadline is None or time.monotonic() < deadline):
        searched = chosen
        chosen, built = _with_auto_ranges(chosen, built, ev)
        if chosen is not searched:
            candidates.append(chosen)
    if chosen.feasible and auto_ranges and (deadline is None or time.monotonic() < deadline):
        searched = chosen
        from onnxpress.calibration.readers import open_data

        held_out = eval_data is not None  # the calibration data's size matters only when compared on it
        samples = None if held_out else open_data(calib, m0).total_samples
        chosen, built = _with_equalized_activations(chosen, built, ev, held_out=held_out, calib_samples=samples)
        if chosen is not searched:
            candidates.append(chosen)
    if chosen.feasible and finetune and (deadline is None or time.monotonic() < deadline):
        searched = chosen
        chosen, built = _with_qat(chosen, built, ev, finetune_device)
        if chosen is not searched:
            candidates.append(chosen)
    candidates.extend(ev.declined)  # tried and measured, so listed: a user sees QAT or auto ranges were tried
    if chosen.feasible and max_drop is None and chosen.sqnr_db is not None and chosen.sqnr_db < USABLE_SQNR_DB:
        log.warning("the model written meets %s but its outputs are far from the original's (SQNR %.1f dB, below "
                    "%g): check its accuracy (--labels, --max-drop) or relax the budget",
                    ", ".join(f"{b.kind}={b.value:g}" for b in budgets), chosen.sqnr_db, USABLE_SQNR_DB)
    recipe_out = validate_recipe(chosen.recipe)  # every default written out
    path = save_recipe(recipe_out, sidecar)
    result = OptimizeResult(
        built, out, recipe_out, path, chosen, candidates,
        pareto_front([c for c in candidates if c.feasible is not None], bud.kind), bud,  # final numbers only
        bool(chosen.feasible), sens, space.describe(chosen.picks), ev.ref_accuracy, timed_out, budgets,
        ev.metric_name, max_drop,
    )
    if report is not None:
        from onnxpress.report import write_report

        write_report(report, result, m0, calib, feeds, threads=latency_threads, original_bytes=ev.original_bytes)
    # the model last: once it is in place, its recipe and report are too (an interrupt during the report left the
    # model without them, and a run stopped by Ctrl-C looked finished)
    save_model(built, out)
    log.info("optimize done in %.1f s", time.monotonic() - start)
    return result
