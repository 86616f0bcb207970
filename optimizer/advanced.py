"""Advanced post-training methods as public functions: equalize, smoothquant, correct_bias, codebook.

Each one is load + cleanup (fold constants and BatchNorm) → [gather per-channel statistics] → one
pass → check + save; the statistics are streamed through ``collect_statistics`` into
:class:`ChannelStatsObserver` here, and the passes receive plain numpy arrays::

    equalize(model)              EqualizeCrossLayer                exact in float
    smoothquant(model, data)     max|X| per channel  -> SmoothQuant   exact in float
    correct_bias(model, data)    E[x] per channel    -> CorrectBias   (right once InsertQDQ rounds W)
    codebook(model)              CodebookWeights                    lossy (k-means weights)

Typical order before quantizing: ``equalize`` → ``correct_bias`` → ``onnxpress.quantize``; on
transformers ``smoothquant`` → ``onnxpress.quantize``; ``codebook`` last (its weights are no longer
constants a QDQ pass could quantize). See the pass modules for the maths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import onnx

from onnxpress.driver import TransformResult, transform
from onnxpress.errors import CalibrationError, OnnxpressError
from onnxpress.model_io import ModelSource, check_output_path, load_model, normalize_model
from onnxpress.pipeline import cleanup_passes, import_graph, run_passes

__all__ = [
    "ChannelStatsObserver",
    "codebook",
    "codebook_weights",
    "collect_channel_stats",
    "correct_bias",
    "correct_bias_for_qdq",
    "equalize",
    "prepare_for_quantize",
    "smoothquant",
]


class ChannelStatsObserver:
    """Per-channel running sum, count and max |x| along one axis; nothing grows with samples.

    With ``spatial=True`` it also sums over the batch axis only, keeping a per-position mean map
    ([C, H, W] for NCHW), as long as every batch has the same shape beyond axis 0.

    Args:
        axis: the channel axis of the observed tensor (1 for NCHW, -1 for [..., features]).
        spatial: also keep the per-position map (axis must be 1).
        name: tensor name, for error messages.
    """

    def __init__(self, axis: int, *, spatial: bool = False, name: str = "tensor") -> None:
        self.axis = axis
        self.name = name
        self.spatial = spatial and axis == 1
        self.total: np.ndarray | None = None
        self.absmax: np.ndarray | None = None
        self.map_total: np.ndarray | None = None
        self.map_lost = False
        self.count = 0
        self.batch_count = 0

    def update(self, x: np.ndarray) -> None:
        """Accumulate one batch."""
        x = np.asarray(x)
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis]).astype(np.float64)
        if not np.all(np.isfinite(rows)):
            raise CalibrationError(f"tensor {self.name!r} has NaN/inf values on the calibration data")
        if self.total is not None and self.total.size != rows.shape[1]:
            raise CalibrationError(f"tensor {self.name!r} changed from {self.total.size} to {rows.shape[1]} channels")
        s, m = rows.sum(axis=0), np.abs(rows).max(axis=0, initial=0.0)
        self.total = s if self.total is None else self.total + s
        self.absmax = m if self.absmax is None else np.maximum(self.absmax, m)
        self.count += rows.shape[0]
        if self.spatial and not self.map_lost and x.ndim >= 3:
            per_position = x.sum(axis=0, dtype=np.float64)
            if self.map_total is None:
                self.map_total = per_position
            elif self.map_total.shape == per_position.shape:
                self.map_total += per_position
            else:  # spatial size changed between batches: only channel means are meaningful
                self.map_lost, self.map_total = True, None
            self.batch_count += x.shape[0]

    def mean(self) -> np.ndarray:
        """Per-channel mean. Raises CalibrationError when nothing was observed."""
        if self.total is None or self.count == 0:
            raise CalibrationError(f"no values were observed for tensor {self.name!r}")
        return self.total / self.count

    def mean_map(self) -> np.ndarray | None:
        """Per-position mean ([C, H, W]), or None when not kept or the shape varied."""
        if self.map_total is None or self.map_lost or self.batch_count == 0:
            return None
        return self.map_total / self.batch_count

    def max_abs(self) -> np.ndarray:
        """Per-channel max |x|. Raises CalibrationError when nothing was observed."""
        if self.absmax is None:
            raise CalibrationError(f"no values were observed for tensor {self.name!r}")
        return self.absmax


def collect_channel_stats(
    model: onnx.ModelProto,
    data: Any,
    requests: Mapping[str, int],
    *,
    spatial: bool = False,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> dict[str, ChannelStatsObserver]:
    """Stream ``data`` through ``model`` once and observe each requested tensor along its axis.

    Args:
        model: the model (not modified).
        data: anything ``open_data`` accepts (``.npz`` path, folder, iterable of feed dicts, reader).
        requests: ``{tensor name: channel axis}``.
        spatial: also keep per-position mean maps of axis-1 (NCHW) tensors.
        batch_size: samples per onnxruntime run.
        max_samples: stop after this many samples (``None``: all).
        progress: show a progress bar.

    Raises:
        DataError: the data does not fit the model.
        CalibrationError: no samples, or non-finite values.
    """
    from onnxpress.calibration.collect import collect_statistics
    from onnxpress.calibration.readers import open_data

    observers = {name: ChannelStatsObserver(axis, spatial=spatial, name=name) for name, axis in requests.items()}
    if not observers:
        return {}
    reader = open_data(data, model, max_samples=max_samples)
    collect_statistics(model, reader, observers, batch_size=batch_size, max_samples=max_samples, progress=progress)
    return observers


def _prepare(model: ModelSource, output: str | os.PathLike[str] | None, data: Any = None) -> onnx.ModelProto:
    if output is not None:
        check_output_path(output, [model, data])
    return run_passes(normalize_model(load_model(model)), cleanup_passes()).model


def equalize(
    model: ModelSource,
    output: str | os.PathLike[str] | None = None,
    *,
    clip: Literal["skip", "split", "relu"] = "skip",
    max_iterations: int = 100,
    progress: bool = False,
) -> TransformResult:
    """Cross-layer equalization (exact in float): fold BN, then equalize Conv/Gemm pairs.

    Args:
        model: path or ModelProto (never modified).
        output: where to write the result; ``None`` to only return it.
        clip: ``"skip"`` leaves pairs joined by Clip/ReLU6 alone; ``"split"`` rewrites such a Clip
            into Relu + Min with per-channel bounds so that the pair can be equalized (exact too);
            ``"relu"`` replaces Clip(0, hi) by Relu first (lossy: check the float model after it).
        max_iterations: sweeps over the pairs (chains converge geometrically).
        progress: progress bar over the passes.
    """
    from onnxpress.passes.equalize import EqualizeCrossLayer

    if output is not None:
        check_output_path(output, [model])
    passes = [*cleanup_passes(), EqualizeCrossLayer(clip=clip, max_iterations=max_iterations)]
    return transform(model, passes, output, progress=progress)


def smoothquant(
    model: ModelSource,
    data: Any,
    output: str | os.PathLike[str] | None = None,
    *,
    alpha: float = 0.5,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> TransformResult:
    """SmoothQuant (exact in float): measure max|X| per channel, fold s into LayerNorm/Gemm and weights.

    Args:
        model: path or ModelProto (never modified).
        data: calibration data (``.npz`` path, folder, iterable of feed dicts, reader).
        output: where to write the result; ``None`` to only return it.
        alpha: migration strength in [0, 1].
        batch_size: samples per onnxruntime run while streaming the calibration data.
        max_samples: stop after this many calibration samples (``None``: all).
        progress: progress bars.

    Raises:
        ValueError: alpha outside [0, 1].
        DataError / CalibrationError: the data does not fit the model.
    """
    from onnxpress.passes.smoothquant import SmoothQuant, smoothquant_targets

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    proto = _prepare(model, output, data)
    names = smoothquant_targets(import_graph(proto))
    stats = collect_channel_stats(proto, data, {n: -1 for n in names}, batch_size=batch_size,
                                  max_samples=max_samples, progress=progress)
    absmax = {name: obs.max_abs() for name, obs in stats.items()}
    return transform(proto, [SmoothQuant(absmax, alpha=alpha)], output, progress=progress)


def correct_bias(
    model: ModelSource,
    data: Any,
    output: str | os.PathLike[str] | None = None,
    *,
    per_channel: bool = True,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> TransformResult:
    """Empirical bias correction for int8 weights: b += (W - Q(W)) E[x], E[x] measured on ``data``.

    The float result is deliberately biased: it is meant to be quantized next with the same weight
    granularity (``per_channel``) as ``onnxpress.quantize`` / ``InsertQDQ`` will use.

    Args:
        model: path or ModelProto (never modified).
        data: calibration data (``.npz`` path, folder, iterable of feed dicts, reader).
        output: where to write the result; ``None`` to only return it.
        per_channel: the weight granularity the following quantization uses.
        batch_size: samples per onnxruntime run while streaming the calibration data.
        max_samples: stop after this many calibration samples (``None``: all).
        progress: progress bars.
    """
    from onnxpress.passes.bias_correction import CorrectBias, bias_correction_inputs

    proto = _prepare(model, output, data)
    requests = dict(bias_correction_inputs(import_graph(proto)))
    stats = collect_channel_stats(proto, data, requests, spatial=True, batch_size=batch_size,
                                  max_samples=max_samples, progress=progress)
    means = {}
    for name, obs in stats.items():
        per_position = obs.mean_map()
        means[name] = per_position if per_position is not None and per_position.ndim == 3 else obs.mean()
    return transform(proto, [CorrectBias(means, per_channel=per_channel)], output, progress=progress)


def codebook(
    model: ModelSource,
    output: str | os.PathLike[str] | None = None,
    *,
    bits: int = 4,
    group_size: int | None = None,
    min_elements: int = 256,
    channel_scale: bool = True,
    data: Any = None,
    bias_correction: bool = False,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> TransformResult:
    """Store Conv/Gemm/MatMul weights as b-bit k-means codebook indices (lossy; smaller file).

    Args:
        model: path or ModelProto (never modified).
        output: where to write the result; ``None`` to only return it.
        bits: index bits (1..8); 2^bits centroids per codebook.
        group_size: output channels per codebook; ``None`` for one per layer.
        min_elements: weights smaller than this stay float.
        channel_scale: normalise each output channel by its max |W| first (one float per channel).
        data: calibration data, needed for ``bias_correction``.
        bias_correction: first add (W - W_codebook) E[x] to each bias (k-means levels are cluster
            means, so the codebook shrinks large weights and shifts output means; this cancels it).
        batch_size: samples per onnxruntime run while streaming the calibration data.
        max_samples: stop after this many calibration samples (``None``: all).
        progress: progress bar over the passes.

    Raises:
        OnnxpressError: bits or group size out of range.
        CalibrationError: bias correction without data.
    """
    from onnxpress.passes.bias_correction import CorrectBias, bias_correction_inputs
    from onnxpress.passes.codebook import CodebookWeights

    try:
        pass_ = CodebookWeights(bits=bits, group_size=group_size, min_elements=min_elements,
                                channel_scale=channel_scale)
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None
    proto = _prepare(model, output, data)
    passes: list[Any] = [pass_]
    if bias_correction:
        if data is None:
            raise CalibrationError("codebook bias correction needs calibration data (data=)")
        requests = dict(bias_correction_inputs(import_graph(proto)))
        stats = collect_channel_stats(proto, data, requests, spatial=True, batch_size=batch_size,
                                      max_samples=max_samples, progress=progress)
        means = {n: m if (m := obs.mean_map()) is not None else obs.mean() for n, obs in stats.items()}
        passes.insert(0, CorrectBias(means, quantizer=pass_.reconstruct))
    return transform(proto, passes, output, progress=progress)


def prepare_for_quantize(
    model: onnx.ModelProto,
    data: Any,
    *,
    equalize: Literal["skip", "split", "relu"] | None = None,
    smoothquant: float | None = None,
    bias_correction: bool = False,
    per_channel: bool = True,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> onnx.ModelProto:
    """The float rewrites that go before InsertQDQ, in order: CLE, SmoothQuant, bias correction.

    ``model`` must already be cleaned up (BatchNorm folded); ``onnxpress.quantize`` calls this on
    its cleaned model. Bias correction comes last because it depends on the final weights, and it
    assumes int8 weights with the same ``per_channel`` as the QDQ pass that follows.

    Raises:
        OnnxpressError: a bad setting (clip mode, alpha).
        CalibrationError: SmoothQuant or bias correction asked for without data.
    """
    from onnxpress.passes.bias_correction import CorrectBias, bias_correction_inputs
    from onnxpress.passes.equalize import EqualizeCrossLayer
    from onnxpress.passes.smoothquant import SmoothQuant, smoothquant_targets

    if (smoothquant is not None or bias_correction) and data is None:
        raise CalibrationError("SmoothQuant and bias correction need calibration data (calib= / --calib)")
    try:
        cle = EqualizeCrossLayer(clip=equalize) if equalize else None
        smooth = SmoothQuant({}, alpha=smoothquant) if smoothquant is not None else None
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None
    stream = {"batch_size": batch_size, "max_samples": max_samples, "progress": progress}
    if cle is not None:
        model = run_passes(model, [cle], progress=progress).model
    if smooth is not None:
        names = smoothquant_targets(import_graph(model))
        stats = collect_channel_stats(model, data, {n: -1 for n in names}, **stream)
        absmax = {name: obs.max_abs() for name, obs in stats.items()}
        model = run_passes(model, [SmoothQuant(absmax, alpha=smoothquant)], progress=progress).model
    if bias_correction:
        requests = dict(bias_correction_inputs(import_graph(model)))
        stats = collect_channel_stats(model, data, requests, spatial=True, **stream)
        means = {n: m if (m := obs.mean_map()) is not None else obs.mean() for n, obs in stats.items()}
        model = run_passes(model, [CorrectBias(means, per_channel=per_channel)], progress=progress).model
    return model


def correct_bias_for_qdq(
    model: onnx.ModelProto,
    qdq: Any,
    data: Any,
    *,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> onnx.ModelProto:
    """Bias correction for exactly the layers ``qdq`` (an InsertQDQ) will quantize, with its granularity.

    A dry run of the pass on a copy tells which Conv/Gemm/MatMul it quantizes (it keeps shallow
    convs, excluded nodes and unranged tensors float; correcting those would only add error).

    Raises:
        CalibrationError: no data to measure the input means on.
    """
    from onnxpress.passes.bias_correction import CorrectBias, bias_correction_inputs

    if data is None:
        raise CalibrationError("bias correction needs calibration data (calib= / --calib), not only a table")
    run_passes(model, [qdq])  # dry run: fills qdq.decisions; the real call resets them
    layers = {d.name for d in qdq.decisions if d.quantized and d.op in ("Conv", "Gemm", "MatMul")}
    graph = import_graph(model)
    wanted = {n.inputs[0].name for n in graph.nodes if (n.name or n.outputs[0].name) in layers and n.inputs}
    requests = {name: axis for name, axis in bias_correction_inputs(graph) if name in wanted}
    stats = collect_channel_stats(model, data, requests, spatial=True, batch_size=batch_size,
                                  max_samples=max_samples, progress=progress)
    means = {n: m if (m := obs.mean_map()) is not None else obs.mean() for n, obs in stats.items()}
    corrected = CorrectBias(means, per_channel=bool(qdq.per_channel), layers=layers)
    return run_passes(model, [corrected], progress=progress).model


def codebook_weights(model: onnx.ModelProto, bits: int, *, group_size: int | None = None, progress: bool = False):
    """Run CodebookWeights on a cleaned model; return the pipeline result and one decision per layer.

    Raises:
        OnnxpressError: bits outside 1..8 or a bad group size.
    """
    from onnxpress.passes.codebook import CodebookWeights
    from onnxpress.passes.qdq import NodeDecision

    try:
        pass_ = CodebookWeights(bits=bits, group_size=group_size)
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None
    result = run_passes(model, [pass_], progress=progress)
    decisions = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            done = node.input[1] in pass_.objective
            why = "" if done else next((n.split("(", 1)[-1].rstrip(")") for n in result.notes if node.input[1] in n),
                                       "weight is not a float initializer")
            decisions.append(NodeDecision(node.name or node.output[0], node.op_type, done, why))
    return result, decisions
