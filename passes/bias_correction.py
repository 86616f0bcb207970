"""Bias correction (Nagel et al. 2019): cancel the mean output shift that weight rounding causes.

Quantizing W to Q(W) shifts the expected output of a layer by (Q(W) - W) E[x]. With the per-input-
channel means E[x] measured on calibration data (empirical bias correction), the bias absorbs it::

    E[Q(W) x + b'] = E[W x + b]   <=>   b' = b + (W - Q(W)) E[x]

    Conv:  eps_o = sum_{c, kh, kw} (W - Q(W))[o, c, kh, kw] * T[c, kh, kw]  (c within o's group)
    Gemm:  eps   = alpha * (W - Q(W)) E[x] / beta                          (W as [out, in])
    MatMul(W) -> Add(b):  eps = E[x] (W - Q(W))                              (W as [in, out])

    X -> Conv(W, b) -> Y   ==>   X -> Conv(W, b + eps) -> Y      (W unchanged; InsertQDQ rounds it later)

Q is the QDQ pass's own weight quantizer (``onnxpress.passes.qdq.weight_qparams`` /
``quantize_array`` / ``dequantize_array``, symmetric int8 per tensor or per output channel), so the
correction cancels exactly the rounding that pass will apply. The pass changes the float model on
purpose (it is only right once the weights are quantized), and it runs no inference: the means
come in as numpy arrays keyed by each layer's input tensor. For Conv, T[c, kh, kw] is the mean
input under tap (kh, kw) averaged over all output positions, computed from a per-position mean map
E[x][c, h, w] with the conv's pads/strides/dilations, so zero-padded borders (most of a 4x4 map)
count the zeros they see; given only per-channel means, T = E[x_c] for every tap. A layer without a
bias gets one. The analytic variant takes E[x] from a preceding BatchNorm's beta/gamma instead
(``onnxpress.passes.bn_stats.activation_means``, read before the BN is folded; ``onnxpress.quantize``
uses it when it has a table but no calibration data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, constant_bias_add, is_float_constant, unique_name
from onnxpress.passes.qdq import InsertQDQ, dequantize_array, quantize_array, weight_qparams

__all__ = ["CorrectBias", "bias_correction_inputs", "quantized_weight"]

log = logging.getLogger(__name__)


def quantized_weight(node: gs.Node, w: np.ndarray, *, per_channel: bool, bits: int = 8) -> np.ndarray:
    """Q(W) exactly as InsertQDQ will compute it for input 1 of ``node``."""
    axis = InsertQDQ._weight_axis(node, 1, gs.Constant("w", w)) if per_channel else None
    qp = weight_qparams(w, axis, bits=bits)
    return dequantize_array(quantize_array(w, qp), qp)


def _as_means(v: np.ndarray) -> np.ndarray:
    """[C] per-channel means, or a [C, H, W] per-position map (kept for Conv inputs)."""
    a = np.asarray(v, np.float64)
    return a if a.ndim == 3 else a.reshape(-1)


def _layer_reason(node: gs.Node) -> str | None:
    if node.op not in ("Conv", "Gemm", "MatMul"):
        return "not a layer"
    if len(node.inputs) < 2 or not is_float_constant(node.inputs[1]):
        return "weight is not a float constant"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "Gemm with transA=1"
    if node.op == "MatMul":
        if node.inputs[1].values.ndim != 2:
            return "MatMul weight is not 2-D"
        if constant_bias_add(node) is None:
            return "MatMul is not followed by a constant bias Add"
    if len(node.inputs) > 2 and node.inputs[2].name and not is_float_constant(node.inputs[2]):
        return "bias is not a float constant"
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and len(node.inputs[2].outputs) > 1:
        return "bias is shared with another node"
    return None


def bias_correction_inputs(graph: gs.Graph) -> list[tuple[str, int]]:
    """(input tensor, channel axis) of every layer bias correction can handle: what needs E[x]."""
    out = []
    for node in graph.nodes:
        if _layer_reason(node) is None:
            x = node.inputs[0]
            out.append((x.name, 1 if node.op == "Conv" else -1))
    return list(dict.fromkeys(out))


def tap_means(node: gs.Node, mean_map: np.ndarray) -> np.ndarray | None:
    """Mean input seen by each kernel tap of a 2-D Conv, over all output positions: [C, kh, kw].

    ``mean_map`` is E[x] per channel and position ([C, H, W]); zero padding is included, so border
    outputs count the zeros they really see. None when the geometry is not handled (``auto_pad``,
    not 2-D), and the caller falls back to per-channel means.
    """
    kernel = node.inputs[1].values.shape[2:]
    if mean_map.ndim != 3 or len(kernel) != 2 or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw_ = node.attrs.get("dilations", [1, 1])
    padded = np.pad(mean_map, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (padded.shape[1] - dh * (kernel[0] - 1) - 1) // sh + 1
    wo = (padded.shape[2] - dw_ * (kernel[1] - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        return None
    out = np.empty((mean_map.shape[0], *kernel))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            window = padded[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw_ : j * dw_ + sw * (wo - 1) + 1 : sw]
            out[:, i, j] = window.mean(axis=(1, 2))
    return out


def _shift(node: gs.Node, dw: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(W - Q(W)) E[x] as the layer's output sees it (before Gemm's beta)."""
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        c_out, cpg = dw.shape[0], dw.shape[1]
        opg = c_out // group
        taps = tap_means(node, mean) if mean.ndim == 3 else None
        if taps is not None:  # exact mean over output positions, padded borders included
            t = taps.reshape(group, cpg, -1)[np.arange(c_out) // opg]  # [C_out, cpg, k]
            return np.sum(dw.reshape(c_out, cpg, -1) * t, axis=(1, 2))
        m = mean.reshape(mean.shape[0], -1).mean(axis=1) if mean.ndim == 3 else mean
        per_in = dw.reshape(c_out, cpg, -1).sum(axis=2)  # [C_out, cpg]
        return np.sum(per_in * m.reshape(group, cpg)[np.arange(c_out) // opg], axis=1)
    if node.op == "Gemm":
        w_nk = dw if int(node.attrs.get("transB", 0)) else dw.T
        return float(node.attrs.get("alpha", 1.0)) * (w_nk @ mean)
    return mean @ dw  # MatMul: [K] @ [K, N]


class CorrectBias:
    """Add (W - Q(W)) E[x] to each layer's bias, Q being the QDQ pass's weight quantizer.

    Args:
        input_means: mean of each layer's input, keyed by the input tensor name: [C_in] per
            channel (axis 1 for Conv, last for Gemm/MatMul: see :func:`bias_correction_inputs`),
            or for a 2-D Conv a [C_in, H, W] per-position map (exact at padded borders).
        per_channel: the weight granularity InsertQDQ will use (must match it).
        bits: weight bits (InsertQDQ uses 8).
        layers: correct only these nodes (by name, or first output name for unnamed nodes): the
            ones the QDQ pass will quantize. ``None`` corrects every layer with a mean.
        quantizer: ``(node, W) -> Q(W)`` for another weight format (e.g.
            ``CodebookWeights(...).reconstruct``); default: InsertQDQ's int8 rounding.
    """

    name = "correct_bias"

    def __init__(
        self,
        input_means: Mapping[str, np.ndarray],
        *,
        per_channel: bool = True,
        bits: int = 8,
        layers: Collection[str] | None = None,
        quantizer: Callable[[gs.Node, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.input_means = {k: _as_means(v) for k, v in input_means.items()}
        self.layers = None if layers is None else frozenset(layers)
        self.quantizer = quantizer
        self.per_channel = per_channel
        self.bits = bits

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (layers without statistics are declined one by one)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Correct every layer with a constant weight and a measured input mean."""
        notes, corrected, largest = [], 0, 0.0
        for node in list(graph.nodes):
            if node.op not in ("Conv", "Gemm", "MatMul"):
                continue
            reason = _layer_reason(node)
            if reason is None and self.layers is not None and (node.name or node.outputs[0].name) not in self.layers:
                reason = "left float by the QDQ pass"
            mean = self.input_means.get(node.inputs[0].name)
            w = node.inputs[1].values if reason is None else None
            if reason is None and mean is None:
                reason = "no input mean"
            if reason is None:
                c_in = w.shape[1] * int(node.attrs.get("group", 1)) if node.op == "Conv" else None
                if node.op == "Gemm":
                    c_in = w.shape[1] if int(node.attrs.get("transB", 0)) else w.shape[0]
                elif node.op == "MatMul":
                    c_in = w.shape[0]
                if node.op != "Conv" and mean.ndim == 3:  # a map for a non-conv reader: plain channel means
                    mean = mean.reshape(mean.shape[0], -1).mean(axis=1)
                channels = mean.shape[0] if mean.ndim == 3 else mean.size
                if channels != c_in or not np.all(np.isfinite(mean)):
                    reason = f"input mean has {channels} channels ({mean.shape}) for {c_in}"
            if reason is not None:
                if reason not in ("not a layer",):
                    notes.append(f"{node.name or node.outputs[0].name}: not corrected ({reason})")
                continue
            w32 = np.asarray(w, np.float32)
            if self.quantizer is not None:
                q = np.asarray(self.quantizer(node, w32), np.float32)
            else:
                q = quantized_weight(node, w32, per_channel=self.per_channel, bits=self.bits)
            eps = _shift(node, w.astype(np.float64) - q.astype(np.float64), mean)
            self._add_to_bias(graph, node, eps)
            corrected += 1
            largest = max(largest, float(np.max(np.abs(eps))) if eps.size else 0.0)
        log.debug("correct_bias: %d layers, largest shift %.4g", corrected, largest)
        return PassResult(graph, corrected > 0, {"corrected": corrected, "declined": len(notes)}, tuple(notes))

    @staticmethod
    def _add_to_bias(graph: gs.Graph, node: gs.Node, eps: np.ndarray) -> None:
        dtype = node.inputs[1].values.dtype
        if node.op == "MatMul":
            add, i = constant_bias_add(node)
            b = add.inputs[i].values.astype(np.float64)
            add.inputs[i] = gs.Constant(add.inputs[i].name, (b + eps).astype(dtype))
            return
        if node.op == "Gemm":
            eps = eps / float(node.attrs.get("beta", 1.0)) if len(node.inputs) > 2 and node.inputs[2].name else eps
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = node.inputs[2].values.astype(np.float64)
            node.inputs[2] = gs.Constant(node.inputs[2].name, (b + eps).astype(dtype))
            return
        bias = gs.Constant(unique_name(graph, f"{node.inputs[1].name}_bias"), eps.astype(dtype))
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable.empty())
        if len(node.inputs) == 2:
            node.inputs.append(bias)
        else:
            node.inputs[2] = bias
