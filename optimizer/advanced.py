"""Advanced post-training methods as public functions: equalize, smoothquant, correct_bias, codebook.

Each one is load + cleanup (fold constants and BatchNorm) → [gather per-channel statistics] → one
pass → check + save; the statistics are streamed through ``collect_statistics`` into
:class:`ChannelStatsObserver` here, and the passes receive plain numpy arrays::

    equalize(model)              EqualizeCrossLayer                exact in float
    smoothquant(model, data)     max|X| per channel  -> SmoothQuant   exact in float
    correct_bias(model, data)    E[x] per channel    -> CorrectBias   (right once InsertQDQ rounds W)
    absorb_high_bias(model, data)  min per channel   -> AbsorbHighBias  exact on that data
    codebook(model)              CodebookWeights                    lossy (k-means weights)
    correct_bias_for_qdq(model, qdq, data)   measured on the W8A8 model, layer by layer (quantize's --bias-correction)

Typical order before quantizing: ``equalize`` → ``correct_bias`` → ``onnxpress.quantize``; on
transformers ``smoothquant`` → ``onnxpress.quantize``; ``codebook`` last (its weights are no longer
constants a QDQ pass could quantize). See the pass modules for the maths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import onnx

from onnxpress.driver import TransformResult, transform
from onnxpress.errors import ArgumentError, CalibrationError, OnnxpressError
from onnxpress.model_io import ModelSource, check_output_path, load_model, normalize_model
from onnxpress.pipeline import cleanup_passes, import_graph, run_passes

log = logging.getLogger(__name__)

__all__ = [
    "ChannelStatsObserver",
    "codebook",
    "codebook_weights",
    "collect_channel_stats",
    "collect_layer_hessians",
    "moment_flops",
    "InputMomentObserver",
    "absorb_high_bias",
    "correct_bias",
    "EpilogueObserver",
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
        self.minval: np.ndarray | None = None
        self.map_total: np.ndarray | None = None
        self.map_lost = False
        self.count = 0
        self.batch_count = 0
        self.samples = 0  # along axis 0

    def update(self, x: np.ndarray) -> None:
        """Accumulate one batch."""
        x = np.asarray(x)
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis]).astype(np.float64)
        if not np.all(np.isfinite(rows)):
            raise CalibrationError(f"tensor {self.name!r} has NaN/inf values on the calibration data")
        if self.total is not None and self.total.size != rows.shape[1]:
            raise CalibrationError(f"tensor {self.name!r} changed from {self.total.size} to {rows.shape[1]} channels")
        s, m = rows.sum(axis=0), np.abs(rows).max(axis=0, initial=0.0)
        lo = rows.min(axis=0, initial=np.inf)
        self.total = s if self.total is None else self.total + s
        self.absmax = m if self.absmax is None else np.maximum(self.absmax, m)
        self.minval = lo if self.minval is None else np.minimum(self.minval, lo)
        self.count += rows.shape[0]
        self.samples += int(x.shape[0]) if x.ndim else 1
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

    def minimum(self) -> np.ndarray:
        """Per-channel minimum. Raises CalibrationError when nothing was observed."""
        if self.minval is None or self.count == 0:
            raise CalibrationError(f"no values were observed for tensor {self.name!r}")
        return self.minval

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


class InputMomentObserver:
    """Running E[x x^T] of the vectors one layer's weight rows multiply: features, or conv patches.

    Gemm/MatMul: x [..., K] gives rows of K features. Conv (1-, 2- or 3-D, any strides, dilations, pads
    and auto_pad): the im2col patches [C_in * prod(kernel)] in the weight's (channel, taps) order; a
    grouped conv has one moment matrix per group, over its own input channels ([G, C_in/G * taps, ...]:
    a depthwise conv is the case C_in/G = 1). Only the sum and the count are kept; patches are formed a
    few samples at a time.

    Args:
        kind: "dense", "conv", "grouped" or "depthwise" (grouped with one group per input channel).
        kernel: the kernel's spatial shape, e.g. (kH, kW), for convs.
        pads: ONNX pads for convs: the begins of every spatial axis, then their ends.
        auto_pad: ONNX's auto_pad; SAME_UPPER / SAME_LOWER / VALID set the pads from each batch's shape.
        strides: per spatial axis, for convs.
        dilations: per spatial axis, for convs (default 1).
        groups: for "grouped".
        name: tensor name, for errors.
        rows_per_sample: use at most this many rows (conv output positions, or tokens) of each
            sample, evenly spaced and the same for every sample (so batch splits do not matter);
            None uses all. A 224x224 ResNet-18 took 48 s for the moments of 64 samples with all.
    """

    def __init__(self, kind: str, kernel=(1, 1), pads=(0, 0, 0, 0), strides=(1, 1), *, dilations=None, groups: int = 1,
                 auto_pad: str = "NOTSET", name: str = "tensor", rows_per_sample: int | None = None) -> None:
        self.kind, self.name = kind, name
        self.kernel, self.pads, self.strides = tuple(kernel), tuple(pads), tuple(strides)
        self.auto_pad = auto_pad
        self.dilations = tuple(dilations) if dilations is not None else (1,) * len(self.kernel)
        self.groups = int(groups)
        self.rows_per_sample = rows_per_sample
        self.total: np.ndarray | None = None
        self.count = 0

    def _picked(self, rows: int) -> np.ndarray | None:
        """Evenly spaced row indices of one sample, or None for all of them."""
        if self.rows_per_sample is None or rows <= self.rows_per_sample:
            return None
        return np.unique(np.linspace(0, rows - 1, self.rows_per_sample).round().astype(np.int64))

    def _patches(self, x: np.ndarray) -> np.ndarray:
        """[rows, C, taps] patches of an N-C-spatial batch (only the picked positions of each sample)."""
        from onnxpress.calibration.moments import conv_patches

        return conv_patches(x, self.kernel, self.strides, self.pads, self.dilations, self._picked, self.auto_pad)

    def update(self, x: np.ndarray) -> None:
        """Accumulate one batch."""
        x = np.asarray(x, np.float64)
        if not np.all(np.isfinite(x)):
            raise CalibrationError(f"tensor {self.name!r} has NaN/inf values on the calibration data")
        if self.kind == "dense":
            if x.ndim == 1:  # a vector-matrix MatMul (a model input without a batch axis): one row
                x = x[None, :]
            per_sample = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim > 2 else x[:, None, :]
            picked = self._picked(per_sample.shape[1])
            rows = (per_sample if picked is None else per_sample[:, picked]).reshape(-1, x.shape[-1])
            self._add(rows.T @ rows, rows.shape[0])
            return
        groups = x.shape[1] if self.kind == "depthwise" else self.groups if self.kind == "grouped" else 1
        step = max(1, 4096 // max(1, int(np.prod(x.shape[2:]))))  # ~4096 patch rows at a time
        for i in range(0, x.shape[0], step):
            p = self._patches(x[i : i + step])
            if groups == 1:
                rows = p.reshape(p.shape[0], -1)
                self._add(rows.T @ rows, rows.shape[0])
            else:  # one [Cg * taps]^2 moment per group, as a batched product: [G, M, rows] @ [G, rows, M]
                per_group = p.reshape(p.shape[0], groups, -1).transpose(1, 2, 0)
                self._add(per_group @ per_group.transpose(0, 2, 1), p.shape[0])

    def _add(self, part: np.ndarray, n: int) -> None:
        self.total = part if self.total is None else self.total + part
        self.count += n

    def hessian(self) -> np.ndarray:
        """E[x x^T] ([K, K], or [G, K/G, K/G] for a grouped conv: [C, taps, taps] for a depthwise one).

        Raises:
            CalibrationError: nothing observed.
        """
        if self.total is None or not self.count:
            raise CalibrationError(f"no values observed for tensor {self.name!r}")
        return self.total / self.count


class RecurrentMomentObserver(InputMomentObserver):
    """E[v vᵀ] of what an LSTM/GRU/RNN's weights multiply: its input X (for W) or its hidden states Y (for R).

    ``CodebookWeights`` rounds a recurrent weight one gate unit at a time over both directions
    (``[directions, gates * hidden, inputs]`` with the unit axis first: a row is direction 0's inputs,
    then direction 1's), so the moment is block-diagonal with one block per direction: X's own moment
    repeated for W; for R, each direction's hidden states (Y's ``[T, D, B, H]``, ``[B, T, D, H]`` with
    ``layout=1``). R multiplies ``h_{t-1}``; Y holds ``h_t`` for every step, so the first state (zero or
    the given one) is left out and the last one counted instead.
    """

    def __init__(self, directions: int, *, hidden: bool, layout: int = 0, name: str = "tensor") -> None:
        super().__init__("dense", name=name)
        self.directions = int(directions)
        self.hidden = hidden
        self.layout = int(layout)

    def update(self, x: np.ndarray) -> None:
        """Add one batch of X or Y."""
        x = np.asarray(x, np.float64)
        if self.hidden:  # one moment per direction: [D, rows, H]
            by_dir = np.moveaxis(x, 2 if self.layout else 1, 0)
            rows = by_dir.reshape(self.directions, -1, x.shape[-1])
            part = rows.transpose(0, 2, 1) @ rows
            n = rows.shape[1]
        else:
            rows = x.reshape(-1, x.shape[-1])
            part, n = rows.T @ rows, rows.shape[0]
        self._add(part, n)

    def hessian(self) -> np.ndarray:
        """The block-diagonal ``[D * K, D * K]`` moment (see the class docstring).

        Raises:
            CalibrationError: nothing observed.
        """
        blocks = super().hessian()
        if not self.hidden:
            blocks = np.broadcast_to(blocks, (self.directions, *blocks.shape))
        k = blocks.shape[-1]
        out = np.zeros((self.directions * k, self.directions * k))
        for d in range(self.directions):
            out[d * k : (d + 1) * k, d * k : (d + 1) * k] = blocks[d]
        return out


def _recurrent_moment_layers(graph: Any, min_elements: int):
    """(weight, tensor observed, observer) for the W and R of each LSTM/GRU/RNN with constant weights."""
    import onnx_graphsurgeon as gs

    from onnxpress.passes.codebook import RECURRENT_OPS

    for node in graph.nodes:
        if node.op not in RECURRENT_OPS or len(node.inputs) < 3:
            continue
        directions = 2 if node.attrs.get("direction", "forward") == "bidirectional" else 1
        layout = int(node.attrs.get("layout", 0))
        for slot, tensor in ((1, node.inputs[0]), (2, node.outputs[0] if node.outputs else None)):
            w = node.inputs[slot]
            if (tensor is None or not tensor.name or not isinstance(w, gs.Constant) or w.values.size < min_elements
                    or len(w.outputs) != 1):
                continue
            yield w, tensor, RecurrentMomentObserver(directions, hidden=slot == 2, layout=layout, name=tensor.name)


class _Fanout:
    """One tensor observed by several observers (two layers reading the same input)."""

    def __init__(self) -> None:
        self.observers: list[Any] = []

    def update(self, x: np.ndarray) -> None:
        for o in self.observers:
            o.update(x)


def _moment_observer(node: Any, rows_per_sample: int | None = None) -> InputMomentObserver | str:
    """The observer for a layer's input moments, or why the layer has none."""
    w = node.inputs[1].values
    if node.op in ("Gemm", "MatMul"):
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return "Gemm with transA=1"
        return InputMomentObserver("dense", name=node.inputs[0].name, rows_per_sample=rows_per_sample)
    from onnxpress.passes.low_rank import conv_spec

    if w.ndim < 3:
        return "not a conv"
    spec = conv_spec(node, node.inputs[0].name, w.shape)
    if spec.auto_pad not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return "not a conv"
    group = int(node.attrs.get("group", 1))
    return InputMomentObserver("conv" if group == 1 else "grouped", spec.kernel, spec.pads, spec.strides,
                               dilations=spec.dilations, groups=group, auto_pad=spec.auto_pad, name=spec.tensor,
                               rows_per_sample=rows_per_sample)


def _moment_bytes(node: Any) -> int:
    """Bytes of a layer's input second moment in float64 (``K²``, or ``G (K/G)²`` for a grouped conv)."""
    w = np.asarray(node.inputs[1].values)
    if node.op in ("Gemm", "MatMul"):
        k = w.shape[1] if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w.shape[0]
        return 8 * k * k
    group = int(node.attrs.get("group", 1))
    return 8 * group * (w.shape[1] * int(np.prod(w.shape[2:]))) ** 2


def _moment_layers(graph: Any, min_elements: int, rows_per_sample: int | None):
    """(layer, observer) of each Conv/Gemm/MatMul whose own constant weight (>= ``min_elements``) gets moments."""
    import onnx_graphsurgeon as gs

    from onnxpress.passes.fold import transposed_twins

    # a weight equal to another constant's transpose (a tied embedding's output layer) is rounded to nearest,
    # as the embedding's rows are, so that ShareTransposedConstants can store the two once
    twins = {id(t) for pair in transposed_twins(graph) for t in pair}
    shared: dict[int, InputMomentObserver | None] = {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or w.values.size < min_elements or id(w) in twins:
            continue
        obs = _moment_observer(node, rows_per_sample)
        if isinstance(obs, str):
            continue
        if len(w.outputs) != 1:
            # a weight several layers read (cloned or tied layers) is rounded once: against the moments of all
            # its layers' inputs together (the summed output error), when they all read it alike
            if id(w) not in shared:
                shared[id(w)] = obs if _reads_alike(w, rows_per_sample) else None
            if shared[id(w)] is None:
                continue
            obs = shared[id(w)]
        yield node, obs


def _reads_alike(w: Any, rows_per_sample: int | None) -> bool:
    """Every reader of ``w`` is a layer that reads it as its weight with the same input moment layout."""
    configs = set()
    for reader in w.outputs:
        if reader.op not in ("Conv", "Gemm", "MatMul") or len(reader.inputs) < 2 or reader.inputs[1] is not w \
                or any(t is w for t in reader.inputs[2:]) or reader.inputs[0] is w:
            return False
        obs = _moment_observer(reader, rows_per_sample)
        if isinstance(obs, str):
            return False
        trans = int(reader.attrs.get("transB", 0)) if reader.op == "Gemm" else 0
        configs.add((reader.op == "Conv", obs.kind, obs.kernel, obs.pads, obs.auto_pad, obs.strides, obs.dilations,
                     obs.groups, trans))
    return len(configs) == 1


def moment_flops(model: onnx.ModelProto, *, samples: int, rows_per_sample: int | None = None,
                 min_elements: int = 0) -> float:
    """Multiply-adds ``collect_layer_hessians`` will spend on the layers it observes.

    Per layer, the rows it sees (``samples`` x output positions or tokens, at most ``rows_per_sample``
    each) times ``K²``. Positions come from inferred shapes; an unknown one counts as
    ``rows_per_sample`` (or 1 without a cap).
    """
    from onnxpress.model_io import infer_shapes

    total = 0.0
    for node, _ in _moment_layers(import_graph(infer_shapes(model)), min_elements, rows_per_sample):
        shape = (node.outputs[0].shape or [])[2:] if node.op == "Conv" else (node.inputs[0].shape or [])[1:-1]
        known = all(isinstance(d, int) for d in shape)
        positions = int(np.prod(shape)) if known else (rows_per_sample or 1)
        rows = samples * (positions if rows_per_sample is None else min(positions, rows_per_sample))
        total += rows * _moment_bytes(node) / 8
    return total


def collect_layer_hessians(
    model: onnx.ModelProto,
    data: Any,
    *,
    min_elements: int = 256,
    batch_size: int = 64,
    max_samples: int | None = 128,
    progress: bool = False,
    max_bytes: int | None = None,
    rows_per_sample: int | None = None,
    recurrent: bool | Literal["only"] = False,
) -> dict[str, np.ndarray]:
    """E[x x^T] of the inputs of each Conv/Gemm/MatMul weight (``{weight name: H}``), for GPTQ-style rounding.

    With ``recurrent``, also the moments of LSTM/GRU/RNN W and R (:class:`RecurrentMomentObserver`; the
    codebook pass is the one that reads them); ``"only"``: those alone.

    A weight read by several layers gets one moment, over all their inputs, when they read it alike (the
    same op and input layout); otherwise none. Weights below ``min_elements``, equal to another constant's
    transpose (a tied embedding's output layer), or of layers ``InputMomentObserver`` does not handle
    (Gemm transA) get none. With ``max_bytes``, layers are
    taken in graph order while their moments (float64, ``K²`` each; ``G (K/G)²`` for a grouped conv)
    fit in it together; the others get none (a warning says how many): the moments of a large model
    would not fit in memory at once. ``rows_per_sample``: see ``InputMomentObserver``.

    Raises:
        DataError: the data does not fit the model.
        CalibrationError: no samples, or non-finite values.
    """
    from onnxpress.calibration.collect import collect_statistics
    from onnxpress.calibration.readers import open_data

    graph = import_graph(model)
    wanted: dict[str, InputMomentObserver] = {}
    fanout: dict[str, _Fanout] = {}
    used = skipped = 0
    for node, obs in _moment_layers(graph, min_elements, rows_per_sample) if recurrent != "only" else ():
        w = node.inputs[1]
        size = 0 if w.name in wanted else _moment_bytes(node)  # a shared weight's one moment counts once
        if max_bytes is not None and used + size > max_bytes:
            skipped += 1
            continue
        used += size
        wanted[w.name] = obs
        fanout.setdefault(node.inputs[0].name, _Fanout()).observers.append(obs)
    for w, tensor, obs in _recurrent_moment_layers(graph, min_elements) if recurrent else ():
        size = 8 * (obs.directions * w.values.shape[-1]) ** 2
        if max_bytes is not None and used + size > max_bytes:
            skipped += 1
            continue
        used += size
        wanted[w.name] = obs
        fanout.setdefault(tensor.name, _Fanout()).observers.append(obs)
    if skipped:
        log.warning("input moments of %d layer(s) left out: with them the moments would take more than "
                    "%.0f MB (they are rounded to nearest)", skipped, max_bytes / 2**20)
    if not wanted:
        return {}
    reader = open_data(data, model, max_samples=max_samples)
    collect_statistics(model, reader, fanout, batch_size=batch_size, max_samples=max_samples, progress=progress)
    return {name: obs.hessian() for name, obs in wanted.items()}


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


def _measured_floors(model: onnx.ModelProto, data: Any, **stream: Any) -> dict[str, np.ndarray]:
    """Per-channel minima, on ``data``, of every pre-activation tensor AbsorbHighBias could use."""
    from onnxpress.passes.absorb_bias import preactivation_tensors

    requests = preactivation_tensors(import_graph(model))
    if not requests:
        return {}
    stats = collect_channel_stats(model, data, requests, **stream)
    return {name: obs.minimum() for name, obs in stats.items()}


def absorb_high_bias(
    model: ModelSource,
    data: Any = None,
    output: str | os.PathLike[str] | None = None,
    *,
    k: float = 3.0,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
) -> TransformResult:
    """High-bias absorption (Nagel et al. 2019): a Relu layer's never-cut part moves into the next layer's bias.

    With ``data`` the floors are the per-channel minima of each pre-activation on it (exact there);
    without, ``β − k|γ|`` from the BatchNorm that precedes the Relu in ``model`` (data-free; inexact
    for the Φ(−k) of values below it, 0.13% at k = 3). Usually after ``equalize``, which can scale
    biases up. On the reference models (BN already folded at export) no channel's pre-activation
    stays above 0 on the calibration digits, so nothing moves there.
    """
    from onnxpress.passes.absorb_bias import AbsorbHighBias
    from onnxpress.passes.bn_stats import preactivation_floors

    if data is None:
        if output is not None:
            check_output_path(output, [model])
        original = normalize_model(load_model(model), min_opset=13)
        try:
            floors = preactivation_floors(import_graph(original), k=k)
        except ValueError as exc:
            raise OnnxpressError(str(exc)) from None
        passes = [*cleanup_passes(), AbsorbHighBias(floors)]
        return transform(model, passes, output, progress=progress)
    proto = _prepare(model, output, data)
    floors = _measured_floors(proto, data, batch_size=batch_size, max_samples=max_samples, progress=progress)
    return transform(proto, [AbsorbHighBias(floors)], output, progress=progress)


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
        raise ArgumentError(f"alpha must be in [0, 1], not {alpha}")
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
    preserve_norm: bool = False,
    keep_gain: bool = True,
    error_feedback: bool = False,
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
        preserve_norm: rescale each channel scale so the rebuilt channel keeps its norm (needs
            channel_scale; undoes the shrink of cluster means, no extra storage).
        keep_gain: rescale each channel (each codebook without channel_scale) by
            <W_c, W_c> / <W_hat_c, W_c>, so its projection onto the original is exact (the default;
            ``preserve_norm`` takes its place when set).
        error_feedback: choose each layer's indices GPTQ-style against its output error on ``data``
            (the same codebooks; see ``passes/codebook.py``). Needs ``data``.
        data: calibration data, needed for ``bias_correction`` and ``error_feedback``.
        bias_correction: first add (W - W_codebook) E[x] to each bias (k-means levels are cluster
            means, so the codebook shrinks large weights and shifts output means; this cancels it).
        batch_size: samples per onnxruntime run while streaming the calibration data.
        max_samples: stop after this many calibration samples (``None``: all).
        progress: progress bar over the passes.

    Raises:
        OnnxpressError: bits or group size out of range.
        CalibrationError: bias correction or error feedback without data.
    """
    from onnxpress.passes.bias_correction import CorrectBias, bias_correction_inputs
    from onnxpress.passes.codebook import CodebookWeights

    try:
        pass_ = CodebookWeights(bits=bits, group_size=group_size, min_elements=min_elements,
                                channel_scale=channel_scale, preserve_norm=preserve_norm, keep_gain=keep_gain)
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None
    if error_feedback and data is None:
        raise CalibrationError("codebook error feedback needs calibration data (data=)")
    proto = _prepare(model, output, data)
    if error_feedback:
        pass_.hessians = collect_layer_hessians(proto, data, min_elements=min_elements, batch_size=batch_size,
                                                max_samples=max_samples, progress=progress, recurrent=True)
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
    equalize: Literal["skip", "split", "relu", "activations"] | None = None,
    smoothquant: float | None = None,
    bias_correction: bool = False,
    per_channel: bool = True,
    batch_size: int = 64,
    max_samples: int | None = 512,
    progress: bool = False,
    stats: dict[str, int] | None = None,
    notes: list[str] | None = None,
    stretch_only: Callable[[onnx.ModelProto], set[str]] | None = None,
) -> onnx.ModelProto:
    """The float rewrites that go before InsertQDQ, in order: CLE, SmoothQuant, bias correction.

    ``equalize="activations"`` is the data-aware activation-range equalization
    (``onnxpress.passes.equalize_activations``) in place of CLE; it needs ``data``, and with ``stretch_only``
    (called on the model when it has a pair) it rescales only the pairs whose activation is in the set that
    returns (those the quantizer will quantize).

    ``stats`` and ``notes``, when given, receive the CLE and SmoothQuant passes' counters
    (``"smoothquant.smoothed"``, ...) and notes (why an activation or a layer pair was declined).

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

    if (smoothquant is not None or bias_correction or equalize == "activations") and data is None:
        raise CalibrationError("SmoothQuant, bias correction and equalize='activations' need calibration data "
                               "(calib= / --calib)")
    try:
        cle = EqualizeCrossLayer(clip=equalize) if equalize and equalize != "activations" else None
        smooth = SmoothQuant({}, alpha=smoothquant) if smoothquant is not None else None
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None
    stream = {"batch_size": batch_size, "max_samples": max_samples, "progress": progress}

    def record(result: Any) -> onnx.ModelProto:
        if stats is not None:
            stats.update(result.stats)
        if notes is not None:
            notes.extend(result.notes)
        return result.model

    if equalize == "activations":
        from onnxpress.passes.equalize_activations import MIN_SAMPLES, EqualizeActivations, activation_pairs

        pairs, _ = activation_pairs(import_graph(model))
        names = [p.second.inputs[0].name for p in pairs]
        only = stretch_only(model) if stretch_only is not None and names else None
        names = [n for n in names if only is None or n in only]
        observed = collect_channel_stats(model, data, dict.fromkeys(names, 1), **stream) if names else {}
        absmax = {name: obs.max_abs() for name, obs in observed.items()}
        model = record(run_passes(model, [EqualizeActivations(absmax, only=only)], progress=progress))
        seen = min((obs.samples for obs in observed.values()), default=None)
        if seen is not None and seen < MIN_SAMPLES:
            warning = (f"equalize_activations warning: measured on {seen} calibration sample(s): with fewer than "
                       f"{MIN_SAMPLES} a channel's maximum is underestimated and the int8 grid clips its stretched "
                       "tail on other data (MobileNet, held-out SQNR: -2.9 dB at 32 samples, -19 dB at 4); give more "
                       "samples, or drop --equalize activations")
            log.warning(warning)
            if notes is not None:
                notes.append(warning)
    if cle is not None:
        model = record(run_passes(model, [cle], progress=progress))
        if data is not None:  # Nagel et al.'s order: CLE, then absorb what the Relus never cut (exact on data)
            from onnxpress.passes.absorb_bias import AbsorbHighBias

            floors = _measured_floors(model, data, **stream)
            model = run_passes(model, [AbsorbHighBias(floors)], progress=progress).model
    if smooth is not None:
        names = smoothquant_targets(import_graph(model))
        observed = collect_channel_stats(model, data, {n: -1 for n in names}, **stream)
        absmax = {name: obs.max_abs() for name, obs in observed.items()}
        model = record(run_passes(model, [SmoothQuant(absmax, alpha=smoothquant)], progress=progress))
    if bias_correction:
        requests = dict(bias_correction_inputs(import_graph(model)))
        observed = collect_channel_stats(model, data, requests, spatial=True, **stream)
        means = {n: m if (m := obs.mean_map()) is not None else obs.mean() for n, obs in observed.items()}
        model = run_passes(model, [CorrectBias(means, per_channel=per_channel)], progress=progress).model
    return model


# --- empirical bias correction on the quantized model itself -----------------------------------
_ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Min", "Max")


def _epilogue(graph: Any, node: Any) -> tuple[Any, list[Any]]:
    """(biased output, activations after it): the tensor the bias shifts and the chain to the Q input.

    The biased output is the layer's output, or for a MatMul the output of its bias Add. The chain
    follows single consumers through Relu / LeakyRelu / Clip and Min / Max with a constant bound
    (the per-channel bounds ``EqualizeCrossLayer(clip="split")`` leaves), stopping at graph outputs.
    """
    from onnxpress.passes.base import constant_bias_add

    t = biased = constant_bias_add(node)[0].outputs[0] if node.op == "MatMul" else node.outputs[0]
    chain: list[Any] = []
    while t not in graph.outputs and len(t.outputs) == 1 and t.outputs[0].op in _ACTIVATIONS:
        c = t.outputs[0]
        if c.op in ("Min", "Max") and _const_operand(c) is None:
            break
        if c.op == "Clip" and any(x.name and not _const(x) for x in c.inputs[1:]):
            break
        chain.append(c)
        t = c.outputs[0]
    return biased, chain


def _const(t: Any) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(t, gs.Constant)


def _const_operand(node: Any) -> np.ndarray | None:
    consts = [t for t in node.inputs if _const(t)]
    return np.asarray(consts[0].values, np.float64) if len(node.inputs) == 2 and len(consts) == 1 else None


def _chain_spec(chain: list[Any]) -> list[tuple[str, Any]]:
    """The activations as numpy-ready (op, parameter) steps."""
    from onnxpress.passes.equalize import _clip_bounds

    steps: list[tuple[str, Any]] = []
    for c in chain:
        if c.op == "Relu":
            steps.append(("Relu", None))
        elif c.op == "LeakyRelu":
            steps.append(("LeakyRelu", float(c.attrs.get("alpha", 0.01))))
        elif c.op == "Clip":
            lo, hi = _clip_bounds(c)
            steps.append(("Clip", (-np.inf if lo is None else lo, np.inf if hi is None else hi)))
        else:
            steps.append((c.op, _const_operand(c)))
    return steps


class EpilogueObserver:
    """Per-channel mean of act(x) and of act'(x) for a layer's biased output x and its activations.

    ``act'`` is the slope of the activation chain (1 where every activation passes x through, 0 where
    Relu/Clip/Min/Max hold it at a bound, alpha on LeakyRelu's negative side), so the mean slope is
    d E[act(x + b)] / d b for each channel: how far the post-activation mean moves per unit of bias.

    Args:
        axis: channel axis of x (1 for NCHW, -1 for [..., features]).
        steps: the activation chain as ``(op, parameter)`` pairs (see ``_chain_spec``).
        name: tensor name, for errors.
    """

    def __init__(self, axis: int, steps: list[tuple[str, Any]], *, name: str = "tensor") -> None:
        self.post = ChannelStatsObserver(axis, name=name)
        self.slope = ChannelStatsObserver(axis, name=name)
        self.steps = steps

    def update(self, x: np.ndarray) -> None:
        """Accumulate one batch of the biased output."""
        y = np.asarray(x, np.float64)
        d = np.ones_like(y)
        for op, p in self.steps:
            if op == "Relu":
                d, y = d * (y > 0), np.maximum(y, 0.0)
            elif op == "LeakyRelu":
                d, y = d * np.where(y > 0, 1.0, p), np.where(y > 0, y, p * y)
            elif op == "Clip":
                d, y = d * ((y > p[0]) & (y < p[1])), np.clip(y, p[0], p[1])
            elif op == "Min":
                d, y = d * (y < p), np.minimum(y, p)
            else:
                d, y = d * (y > p), np.maximum(y, p)
        self.post.update(y)
        self.slope.update(d)


def correct_bias_for_qdq(
    model: onnx.ModelProto,
    qdq: Any,
    data: Any,
    *,
    batch_size: int = 64,
    max_samples: int | None = 512,
    min_slope: float = 0.05,
    progress: bool = False,
) -> onnx.ModelProto:
    """Empirical bias correction against the quantized model itself, one layer at a time.

    For each Conv/Gemm/MatMul that ``qdq`` (an InsertQDQ) quantizes, in topological order, the
    per-channel mean of the tensor that reaches the next quantizer (after Relu / Clip / the
    per-channel Min of ``equalize(clip="split")``) is measured in the float model, ``m_c``, and in
    ``qdq`` applied to the current model, ``q_c`` (weights *and* activations rounded, with the
    calibrated ranges, every layer before it already corrected); the bias moves by one Newton step::

        b_c += (m_c - q_c) / E[act'(x_c)]        (channels with a mean slope below ``min_slope``: 0)

    so the shift that weight rounding, activation rounding and range clipping cause together
    is cancelled where the next layer sees it, not only the weight part (W - Q(W)) E[x] that
    ``CorrectBias`` computes analytically (which misses that the next layer sees post-activation
    values, and the clipping of an input range). Costs one InsertQDQ run and one pass over the data
    per corrected layer; the data (at most ``max_samples``, or 512) are read once and kept.

    Args:
        model: a cleaned float model (not modified).
        qdq: the InsertQDQ that will quantize the result (its table and settings are used as is).
        data: calibration data (``.npz`` path, folder, iterable of feed dicts, reader).
        batch_size: samples per onnxruntime run.
        max_samples: samples used (``None``: 512).
        min_slope: channels whose activations pass less than this fraction of values (dead or
            saturated) are left alone: the bias barely moves their output.
        progress: progress bar over the layers.

    Returns:
        The float model with corrected biases (to be quantized with ``qdq``).

    Raises:
        CalibrationError: no data.
    """
    from tqdm.auto import tqdm

    from onnxpress.calibration.collect import collect_statistics
    from onnxpress.calibration.readers import open_data
    from onnxpress.passes.bias_correction import _layer_reason

    if data is None:
        raise CalibrationError("bias correction needs calibration data (calib= / --calib), not only a table")
    run_passes(model, [qdq])  # dry run: fills qdq.decisions; the real call resets them
    layers = {d.name for d in qdq.decisions if d.quantized and d.op in ("Conv", "Gemm", "MatMul")}
    limit = 512 if max_samples is None else max_samples
    feeds = list(open_data(data, model, max_samples=limit).batches(batch_size))
    graph = import_graph(model)
    targets = []  # (layer name, biased output, post tensor, axis, observer)
    for node in graph.nodes:
        label = node.name or node.outputs[0].name
        if label not in layers or _layer_reason(node) is not None:
            continue
        biased, chain = _epilogue(graph, node)
        post = chain[-1].outputs[0] if chain else biased
        axis = 1 if node.op == "Conv" else -1
        observer = EpilogueObserver(axis, _chain_spec(chain), name=biased.name)
        targets.append((label, biased.name, post.name, axis, observer))
    if not targets:
        return model
    collect_statistics(model, feeds, {t[1]: t[4] for t in targets}, batch_size=batch_size)
    current = model
    for label, _, post, axis, ref in tqdm(targets, desc="bias correction", unit="layer", disable=not progress):
        quantized = run_passes(current, [qdq]).model
        got = ChannelStatsObserver(axis, name=post)
        # only the nodes that compute `post`: onnxruntime runs every node of a session whatever it fetches, and
        # the layers after this one cannot change it (the same nodes, so the same values; ResNet-50-style net,
        # 53 layers, 32 samples: the correction took 35 s of a 39 s quantize run)
        collect_statistics(upstream_of(quantized, post), feeds, {post: got}, batch_size=batch_size)
        slope = ref.slope.mean()
        delta = np.where(slope >= min_slope, (ref.post.mean() - got.mean()) / np.maximum(slope, min_slope), 0.0)
        current = run_passes(current, [_ShiftBias(label, delta)]).model
    return current


def upstream_of(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` cut down to the nodes that ``name`` depends on, graph inputs kept.

    ``name`` is the only output when it had a value_info, else there is none (``collect_statistics``
    exposes it). A walk back over producers, by hand: ``onnx.utils.Extractor`` would run shape inference over the whole
    model on every call, and this runs once per corrected layer. A node with subgraphs brings the outer
    names its bodies read.
    """
    from onnxpress.model_io import names_read, subgraphs

    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    needed, stack, kept = set(), [name], set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = producer.get(t)
        if node is None or id(node) in kept:
            continue
        kept.add(id(node))
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:
            for sub in subgraphs(attr):
                stack.extend(names_read(sub))
    out = onnx.ModelProto(ir_version=model.ir_version)  # the fields a session reads; only the kept weights copied
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    sub = out.graph
    sub.name = g.name
    sub.node.extend(n for n in g.node if id(n) in kept)
    sub.initializer.extend(t for t in g.initializer if t.name in needed)
    sub.input.extend(g.input)
    sub.value_info.extend(g.value_info)
    sub.output.extend(vi for vi in [*g.value_info, *g.output] if vi.name == name)
    return out


class _ShiftBias:
    """Add ``delta`` to the bias of the layer labelled ``label`` (creating the bias if it has none)."""

    name = "shift_bias"

    def __init__(self, label: str, delta: np.ndarray) -> None:
        self.label, self.delta = label, delta

    def requires(self, graph: Any) -> None:
        """No preconditions."""

    def __call__(self, graph: Any) -> Any:
        """Shift one layer's bias."""
        from onnxpress.passes.base import PassResult
        from onnxpress.passes.bias_correction import CorrectBias

        node = next(n for n in graph.nodes if (n.name or n.outputs[0].name) == self.label)
        CorrectBias._add_to_bias(graph, node, self.delta)
        return PassResult(graph, True, {"shifted": 1})


def codebook_weights(
    model: onnx.ModelProto,
    bits: int,
    *,
    group_size: int | None = None,
    progress: bool = False,
    data: Any = None,
    max_samples: int | None = 128,
    exclude: Any = None,
):
    """Run CodebookWeights on a cleaned model; return the pipeline result and one decision per layer.

    ``exclude`` (a ``passes.qdq.Selection``) keeps the layers it names float, as ``quantize(exclude=)`` does.

    With ``data`` the indices are chosen GPTQ-style against each layer's output error
    (``collect_layer_hessians`` on at most ``max_samples`` samples; see ``codebook(error_feedback=)``).

    Raises:
        OnnxpressError: bits outside 1..8 or a bad group size.
        CalibrationError: data that yields no samples or non-finite values.
    """
    from onnxpress.passes.codebook import WEIGHT_INPUTS, CodebookWeights
    from onnxpress.passes.qdq import NodeDecision

    layers = {n.name or n.output[0]: n for n in model.graph.node
              if n.op_type in WEIGHT_INPUTS and len(n.input) > 1}
    left_out = {} if exclude is None else {k: why for k, n in layers.items()
                                           if (why := exclude.reason_of(n.name, n.op_type))}
    try:
        pass_ = CodebookWeights(bits=bits, group_size=group_size,
                                layers=[k for k in layers if k not in left_out] if left_out else None)
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None
    if data is not None:
        pass_.hessians = collect_layer_hessians(model, data, min_elements=pass_.min_elements,
                                                max_samples=max_samples, progress=progress, recurrent=True)
    result = run_passes(model, [pass_], progress=progress)
    decisions = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_INPUTS and len(node.input) > 1:
            key = node.name or node.output[0]
            weights = [node.input[i] for i in WEIGHT_INPUTS[node.op_type] if i < len(node.input)]
            done = any(w in pass_.objective for w in weights)
            why = "" if done else left_out.get(key) or next(
                (n.split("(", 1)[-1].rstrip(")") for n in result.notes if node.input[1] in n),
                "weight is not a float initializer")
            decisions.append(NodeDecision(key, node.op_type, done, why))
    return result, decisions
