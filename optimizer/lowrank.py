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
import logging
import numbers
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.calibration.moments import PatchSecondMomentObserver, SecondMomentObserver
from onnxpress.calibration.readers import symbolic_sizes
from onnxpress.driver import transform
from onnxpress.errors import (
    ArgumentError,
    CalibrationError,
    OnnxpressError,
    UnsupportedModelError,
    check_argument_types,
)
from onnxpress.model_io import (
    ModelSource,
    check_model,
    check_output_path,
    infer_shapes,
    infer_shapes_thoroughly,
    load_model,
    normalize_model,
    refuse_quantized,
    save_model,
)
from onnxpress.passes.factor_bias import MIN_RATIO, FoldBiasIntoFactor, foldable
from onnxpress.passes.flatten_tokens import FlattenTokens
from onnxpress.passes.flops import assume_input_dims, count_params, scoped_input_dims, shapes_at
from onnxpress.passes.fold import ShareTransposedConstants
from onnxpress.passes.low_rank import (
    LayerReport,
    MomentSpec,
    SplitLowRank,
    candidate_layers,
    joint_units,
    moment_requests,
)
from onnxpress.pipeline import PipelineResult, attention_passes, cleanup_passes, import_graph, run_passes
from onnxpress.reporting import format_table

log = logging.getLogger(__name__)

__all__ = ["LowRankResult", "collect_moments", "lowrank", "measure_latency", "tokens_on_rows"]


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
        layer_seconds: with a latency table, the measured seconds of the candidate layers summed,
            before and after (``None`` without one).
        flattened: dense layers whose token-wise region now runs on ``[rows, features]``
            (``flatten_tokens``; 0 when none).
        biases_folded: split dense layers whose bias rides in the second factor (``fold_bias``; 0 when none).
        macs_per_position: the MACs could not be counted per sample (a symbolic input dimension, such as a
            sequence length, without a size: give ``dims`` or ``calib``) and no budget needed them, so every MACs
            figure is per output position of its layer, the totals summed over the candidate layers only.
        attention_fused: attention chains now run as onnxruntime's ``MultiHeadAttention`` (``fuse_attention``;
            0 when none).
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
    layer_seconds: tuple[float, float] | None = None
    flattened: int = 0
    biases_folded: int = 0
    macs_per_position: bool = False
    attention_fused: int = 0

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
        header = ["layer", "op", "m x n", "rank", "energy", "MACs/position" if self.macs_per_position else
                  "MACs/sample", "params", "method or why kept"]
        table = format_table(header, rows)
        if self.macs_per_position:
            table += ("\nMACs per output position of each layer, summed over these layers: the inputs' symbolic "
                      "dimensions have no size (give --dim NAME=SIZE or --calib for MACs per sample)")
        return table


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
    return PatchSecondMomentObserver(spec.kernel, spec.strides, spec.pads, spec.dilations, auto_pad=spec.auto_pad,
                                     name=spec.tensor)


def collect_moments(
    model: onnx.ModelProto,
    data: Any,
    *,
    ops: Sequence[str] = ("Gemm", "MatMul", "Conv"),
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
    requests: Mapping[str, MomentSpec] | None = None,
) -> dict[str, np.ndarray]:
    """Input second moments ``E[x xᵀ]`` of every splittable layer of ``model``, keyed by layer key.

    One observer per distinct (tensor, geometry); all of them filled in a single streamed pass of
    ``collect_statistics`` over ``data`` (1-, 2- and 3-D convs, with explicit pads or ``auto_pad``).

    Args:
        model: the model the pass will run on (same tensor names).
        data: anything ``onnxpress.calibration.readers.open_data`` accepts (``.npz`` path, folder,
            iterable of feed dicts, onnxruntime ``CalibrationDataReader``).
        ops: op types to collect for.
        batch_size: samples per inference batch.
        max_samples: stop after this many samples (``None``: all).
        progress: show a progress bar.
        requests: the moments to collect (layer key -> spec) instead of every splittable layer's
            (``moment_requests``, which reads every weight in float64).

    Raises:
        DataError: the data does not fit the model.
        CalibrationError: nothing was observed.
    """
    from onnxpress.calibration.collect import collect_statistics
    from onnxpress.calibration.readers import open_data

    if requests is None:
        requests = moment_requests(import_graph(model), ops)
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


def tokens_on_rows(model: onnx.ModelProto) -> PipelineResult:
    """``model`` with its transformer's token-wise region on ``[rows, features]`` (exact; ``FlattenTokens``).

    What ``lowrank(flatten_tokens=True)`` ends with; ``bench/lowrank.py`` times the original with it alone.
    """
    return run_passes(infer_shapes_thoroughly(model), [FlattenTokens()])


def _prepare(model: ModelSource, progress: bool) -> onnx.ModelProto:
    """The model the pass sees: normalised, cleaned up (BN/constants folded), shapes inferred."""
    proto = normalize_model(load_model(model))
    return infer_shapes(run_passes(proto, cleanup_passes(), progress=progress).model)


def _layer_model(nodes: Sequence[gs.Node], x_shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    """``x -> node_i(W_i, b_i) -> y_i``: the layer (or a joint unit's layers, sharing ``x``) alone, for timing."""
    dtype = nodes[0].inputs[1].values.dtype
    x = gs.Variable("x", dtype=dtype, shape=list(x_shape))
    layers, outputs = [], []
    for i, node in enumerate(nodes):
        tag = "" if len(nodes) == 1 else str(i)
        y = gs.Variable(f"y{tag}", dtype=dtype)
        inputs: list[gs.Tensor] = [x, gs.Constant(f"w{tag}", node.inputs[1].values)]
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            inputs.append(gs.Constant(f"b{tag}", node.inputs[2].values))
        layers.append(gs.Node(node.op, f"layer{tag}", attrs=dict(node.attrs), inputs=inputs, outputs=[y]))
        outputs.append(y)
    return gs.export_onnx(gs.Graph(nodes=layers, inputs=[x], outputs=outputs, opset=opset))


def measure_latency(
    model: ModelSource,
    *,
    batch: int = 64,
    threads: int | None = 1,
    multiple: int = 8,
    conv_method: str = "channel",
    ops: Iterable[str] = ("Gemm", "MatMul", "Conv"),
    rounds: int = 9,
    joint: bool = False,
    progress: bool = False,
) -> dict[str, dict[int | None, float]]:
    """Seconds per run of every splittable layer, unsplit (key ``None``) and split at each rank.

    Each layer is timed alone on onnxruntime (all graph optimisations, ``threads`` intra-op threads)
    at ``batch`` samples, as the exact two- (or three-) node layout :class:`SplitLowRank` emits for
    the ranks ``multiple, 2·multiple, …, full``. The options of one layer are timed interleaved
    (order rotated every round) and each gets the *minimum* over ``rounds`` of the process's CPU
    time per run (``time.process_time``). CPU time is blind to the time spent waiting for a core,
    which on a shared machine is most of the noise (wall-clock minima of 5 ms Convs still moved by
    up to 2× between two runs at load 8 on 2 cores); with several threads it is their summed work,
    a cost rather than a latency. Other processes only ever add time, hence the minimum. Layers of
    the same shape and attributes are timed once. With ``joint``, each joint unit (sibling layers
    reading one input, see :func:`~onnxpress.passes.low_rank.joint_units`) is also timed as one
    model, whole and as the shared-first-factor layout, under its ``+``-joined key. Hand the result to :func:`lowrank`
    (``latency=``) to spend a MACs budget where it saves time.

    Args:
        model: path or ModelProto (never modified); keys refer to it after the same clean-up as :func:`lowrank`.
        batch: samples per run (the value of the inputs' symbolic leading dimension).
        threads: onnxruntime intra-op threads (``None``: onnxruntime's default).
        multiple: the rank grid, as given to :func:`lowrank`.
        conv_method: ``"channel"`` or ``"tucker2"`` (the Conv layout to time).
        ops: op types to time.
        rounds: timed runs per option.
        joint: also time the joint units (for ``lowrank(..., joint=True)``).
        progress: show a progress bar over layers.

    Raises:
        UnsupportedModelError: a layer's input shape is unknown at this batch.
    """
    from tqdm.auto import tqdm

    from onnxpress.runtime import make_session, time_interleaved

    if batch < 1 or rounds < 1 or multiple < 1:
        raise ArgumentError(f"batch, rounds and multiple must be >= 1, got {batch}, {rounds}, {multiple}")
    cleaned = _prepare(model, progress=False)
    opset = next((o.version for o in cleaned.opset_import if o.domain in ("", "ai.onnx")), 13)
    graph = import_graph(cleaned)
    layers = candidate_layers(graph, tuple(ops))
    # the other symbolic dims at the sizes assumed for this call
    shapes = shapes_at(cleaned, batch, need=[node.inputs[0].name for node in layers.values()])
    units: dict[str, list[gs.Node]] = {key: [node] for key, node in layers.items()}
    if joint:
        units.update({key: [layers[k] for k in members] for key, members in joint_units(graph, tuple(ops)).items()})
    rng = np.random.default_rng(0)
    cache: dict[tuple[Any, ...], dict[int | None, float]] = {}
    out: dict[str, dict[int | None, float]] = {}
    for key, nodes in tqdm(units.items(), desc="timing layers", unit="layer", disable=not progress):
        node = nodes[0]
        x_shape = shapes.get(node.inputs[0].name)
        if x_shape is None or any(d is None or d < 1 for d in x_shape):
            raise UnsupportedModelError(
                f"cannot time layer {key!r}: its input shape is unknown at batch {batch}; give the sizes of "
                "the inputs' symbolic dimensions (--dim NAME=SIZE, dims={NAME: SIZE}, or calibration data)"
            )
        w = node.inputs[1].values
        sig = (x_shape, str(w.dtype), *(
            (n.op, repr(sorted(n.attrs.items())), n.inputs[1].values.shape,
             len(n.inputs) > 2 and n.inputs[2] is not None and bool(n.inputs[2].name))
            for n in nodes
        ))
        if sig not in cache:
            base = _layer_model(nodes, x_shape, opset)
            split = SplitLowRank(rank=1, only_if_cheaper=False, conv_method=conv_method, ops=(node.op,),
                                 joint=len(nodes) > 1)
            split.reuse_factors = {}  # one factorisation for all the ranks
            split(import_graph(base))
            full = split.report[0].full_rank
            ranks: list[int | None] = [None, *range(multiple, full, multiple), full]
            models = [base]
            for r in ranks[1:]:
                split.rank = r
                models.append(run_passes(base, [split], progress=False).model)
            sessions = [make_session(m, threads=threads, what=f"timing model of layer {key!r}") for m in models]
            feed = {"x": rng.standard_normal(x_shape).astype(w.dtype)}
            best = [min(t) for t in time_interleaved(sessions, feed, rounds, clock=time.process_time)]
            cache[sig] = dict(zip(ranks, best, strict=True))
            log.debug("latency of %s: %s", key, cache[sig])
        out[key] = dict(cache[sig])
    return out


def _foldable_layers(model: onnx.ModelProto, reports: Sequence[LayerReport]) -> list[tuple[LayerReport, int]]:
    """Split dense layers of ``model`` with a bias to fold and wide enough for ``FoldBiasIntoFactor``, widest first.

    Each with the MACs per sample its column of ones adds: ``rows * N`` in the second factor and ``rows * n`` in
    the first, whose new weight column is zeros that the kernel multiplies all the same (``macs_before / n +
    macs_before / N``; only the first term was counted, so the table read 800 MACs where the graph does 864). A layer
    without a bias (a LLaMA-style projection) has nothing to fold and is not listed, so it claims no room in the
    budget.
    """
    with_bias = {second.name or second.outputs[0].name for _, second, _, _ in foldable(import_graph(model))}
    picks = [lay for lay in reports if lay.rank is not None and lay.skipped is None and lay.op != "Conv"
             and not lay.members and lay.key in with_bias and lay.shape[0] >= MIN_RATIO * (lay.rank + 1)]
    picks.sort(key=lambda lay: -lay.shape[0] / (lay.rank + 1))
    return [(lay, lay.macs_before // max(lay.shape[1], 1) + lay.macs_before // max(lay.shape[0], 1)) for lay in picks]


def _fold_biases(model: onnx.ModelProto, reports: tuple[LayerReport, ...], macs_after: int,
                 limit: float | None) -> tuple[onnx.ModelProto, tuple[LayerReport, ...], int, tuple[str, ...]]:
    """``FoldBiasIntoFactor`` on the split dense layers wide enough, widest first while ``limit`` MACs allow.

    A layer's new column costs ``rows * (N + n)`` MACs per sample (:func:`_foldable_layers`) and ``n + r + 1``
    parameters (the first factor's zero column and its bias; the second factor's bias becomes a weight row).
    Returns the model, the reports with those MACs and parameters added, the new total and a note per layer left
    for the budget.
    """
    chosen: dict[str, int] = {}
    notes: list[str] = []
    for lay, added in _foldable_layers(model, reports):
        if limit is not None and macs_after + sum(chosen.values()) + added > limit:
            notes.append(f"{lay.key}: bias left on the wide output (its column of ones would take the MACs "
                         "over the budget)")
            continue
        chosen[lay.key] = added
    if not chosen:
        return model, reports, macs_after, tuple(notes)
    fold = FoldBiasIntoFactor(names=set(chosen))
    result = run_passes(model, [fold])
    done = set(fold.folded)  # a layer without a constant bias has nothing to fold and costs nothing
    check_model(result.model, where="the rewritten model")
    reports = tuple(dataclasses.replace(lay, macs_after=lay.macs_after + chosen[lay.key],
                                        params_after=lay.params_after + lay.shape[1] + lay.rank + 1)
                    if lay.key in done else lay for lay in reports)
    return result.model, reports, macs_after + sum(chosen[k] for k in done), tuple(notes)


@scoped_input_dims
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
    joint: bool = False,
    by_latency: bool = False,
    latency: Mapping[str, Mapping[int | None, float]] | None = None,
    latency_step: str = "time",
    latency_batch: int = 64,
    threads: int | None = 1,
    dims: Mapping[str, int] | None = None,
    flatten_tokens: bool = True,
    fuse_attention: bool = True,
    fold_bias: bool = True,
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
        joint: split sibling Gemm/MatMul layers that read the same input (attention's Q, K, V) as one
            unit with a shared first factor (one SVD of their stacked weights); reported as one row
            keyed ``"a+b+c"``. With ``latency=``, the table must hold those keys
            (``measure_latency(..., joint=True)``).
        by_latency: with ``flops``, time every candidate layer and split on onnxruntime first
            (:func:`measure_latency` at ``latency_batch`` and ``threads``) and spend the MACs budget
            where it saves the most time per unit of loss; splits that are not faster are not offered.
        latency: a precomputed :func:`measure_latency` table (instead of ``by_latency``).
        latency_step: ``"time"``: each greedy step is the least loss per second saved; ``"macs"``:
            least loss per MAC saved (as without a table) among the splits measured faster.
        latency_batch: batch size the layers are timed at.
        threads: onnxruntime intra-op threads for the timing.
        dims: sizes of the inputs' symbolic dimensions beyond the batch (a sequence length), by name or
            ``"<input>:<axis>"``, for counting MACs; those left out come from the first sample of ``calib``.
            Without either, ``rank`` and ``energy`` still work, with MACs per output position
            (``LowRankResult.macs_per_position``); ``flops`` and ``by_latency`` need the sizes.
        fold_bias: move each split dense layer's bias into its second factor behind a column of ones
            (:class:`~onnxpress.passes.factor_bias.FoldBiasIntoFactor`, exact), where the output is at least
            ``MIN_RATIO`` times wider than the rank and, with ``flops``, the budget has room for the ``rows * N``
            MACs the column adds: onnxruntime then no longer adds the bias over the wide output in a pass of its
            own (the reference transformer at 0.5 of its MACs, batch 64, 1 thread: 0.706 -> 0.643x fp32).
        flatten_tokens: when layers were split, run the transformer's token-wise region on
            ``[rows, features]`` afterwards (:class:`~onnxpress.passes.flatten_tokens.FlattenTokens`,
            exact): onnxruntime then runs its LayerNorms, GELUs and residual Adds as rank-2 kernels
            instead of the fused rank-3 ``SkipLayerNormalization`` / ``BiasGelu``, which are slower here
            (see that pass's docstring).
            The reference transformer at a 0.5 MACs budget (batch 64, 1 thread, fp32 = 1): 0.69 -> 0.59;
            the same rewrite alone takes the original to 0.92 (``bench/lowrank.py``'s ``rewritten orig`` column,
            which now fuses attention too).
            The ranks are chosen first, on the graph as given.
        fuse_attention: when layers were split, run each scaled dot-product attention chain as
            onnxruntime's ``com.microsoft.MultiHeadAttention`` afterwards
            (:class:`~onnxpress.passes.fuse_attention.FuseAttention`, exact to float rounding). The
            reference transformer at a 0.5 MACs budget (batch 64, 1 thread): 0.613-0.649 -> 0.585-0.613x;
            the original alone 0.90-0.92x. Other runtimes do not know the node: ``False`` keeps the ops.
        progress: show progress bars.

    Raises:
        ValueError: not exactly one of rank/energy/flops, or a value out of range.
        OutputError, ModelLoadError, DataError, CalibrationError, UnsupportedModelError: as named.
        OnnxpressError: an argument of the wrong type (``joint="yes"``, ``max_samples=2.5``).
    """
    check_argument_types("lowrank", flags={"joint": joint, "by_latency": by_latency, "flatten_tokens": flatten_tokens,
                                           "fuse_attention": fuse_attention,
                                           "progress": progress},
                         counts={"multiple": multiple, "batch_size": batch_size, "max_samples": max_samples,
                                 "latency_batch": latency_batch, "threads": threads},
                         numbers={"energy": energy, "flops": flops, "ridge": ridge})
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)):  # 0 is a range error
        raise OnnxpressError(f"lowrank: rank must be an integer, got {rank!r}")
    ops = tuple(ops)
    if by_latency and latency is not None:
        raise ArgumentError("give by_latency=True or latency=, not both")
    if (by_latency or latency is not None) and flops is None:
        raise ArgumentError("by_latency/latency= only steer a flops= budget; give flops= too")
    split = SplitLowRank(rank=rank, energy=energy, flops=flops, multiple=multiple, ridge=ridge,
                         conv_method=conv_method, ops=ops, latency=latency,
                         latency_step=latency_step, joint=joint)  # validates the arguments before any work
    if calib is not None and moments is not None:
        raise ArgumentError("give calib= or moments=, not both")
    if output is not None:
        check_output_path(output, [model, calib])  # never overwrite the calibration data
    proto = load_model(model)
    refuse_quantized(proto, "lowrank")
    proto = normalize_model(proto, in_place=True)
    # shapes on every tensor: the pass reads conv input sizes (Tucker-2 cost) from them
    cleaned = _prepare(proto, progress)
    assume_input_dims(symbolic_sizes(cleaned, calib, dims))  # MACs per sample at that sequence length / size
    if by_latency:
        split.latency = measure_latency(cleaned, batch=latency_batch, threads=threads, multiple=multiple,
                                        conv_method=conv_method, ops=ops, joint=joint, progress=progress)
    if calib is not None:
        moments = collect_moments(cleaned, calib, ops=ops, batch_size=batch_size, max_samples=max_samples,
                                  progress=progress)
    split.moments = dict(moments or {})
    # ShareTransposedConstants: a tied token table and an output layer left whole, stored once
    result = transform(cleaned, [split, ShareTransposedConstants()], None, progress=progress)
    if fold_bias and flops is not None:
        # the bias columns add MACs (rows * N per folded layer): split again within the budget less those, so that
        # every layer wide enough gets its column (a 0.5 budget left room for 4 of the transformer's 8: 0.678x
        # instead of 0.631x)
        need = sum(added for _, added in _foldable_layers(result.model, split.report))
        limit = flops * split.macs[0]
        if need and split.macs[1] + need > limit and limit - need > 0:
            kept = result, split.report, split.macs
            split.flops = (limit - need) / split.macs[0]
            try:
                result = transform(cleaned, [split, ShareTransposedConstants()], None, progress=progress)
            except UnsupportedModelError:  # near the floor of the ranks: keep the split, fold the columns that fit
                result, split.report, split.macs = kept
            split.flops = flops
    model, flattened, notes = result.model, 0, result.pipeline.notes
    if flatten_tokens and any(lay.rank is not None and lay.skipped is None for lay in split.report):
        # after the split, so the ranks and the MACs per sample are those of the graph as given
        # (flattened, a token would count as a sample of its own)
        flat = tokens_on_rows(model)
        flattened = int(flat.stats.get("flatten_tokens.layers", 0))
        if flattened:
            model, notes = flat.model, (*notes, *flat.notes)
            check_model(model, where="the rewritten model")
    reports, macs_after, folded = split.report, split.macs[1], 0
    if fold_bias:
        before = reports
        model, reports, macs_after, folded_notes = _fold_biases(model, reports, macs_after,
                                                                 None if flops is None else flops * split.macs[0])
        notes, folded = (*notes, *folded_notes), sum(a is not b for a, b in zip(before, reports, strict=True))
    fused = 0
    if fuse_attention and any(lay.rank is not None and lay.skipped is None for lay in split.report):
        attention = run_passes(infer_shapes_thoroughly(model), attention_passes())
        fused = int(attention.stats.get("fuse_attention.fused", 0))
        notes = (*notes, *attention.notes)
        if fused:
            model = attention.model
            check_model(model, where="the rewritten model")
    written = save_model(model, output) if output is not None else None
    seconds = None
    if split.latency is not None:
        timed = [(split.latency[lay.key], lay.rank) for lay in split.report if lay.key in split.latency]
        seconds = (sum(t[None] for t, _ in timed), sum(t[r] for t, r in timed))
    return LowRankResult(
        model, written, reports, split.macs[0], macs_after, _params(proto),
        _params(model), notes, bool(split.moments), seconds, flattened, folded, split.macs_per_position, fused,
    )
