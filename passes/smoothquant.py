"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights; exact in float.

For an activation X[..., K] read only by MatMul/Gemm layers Y = X W (W: [K, N]) and produced by a
node whose output channels can be scaled for free (LayerNormalization's gamma/beta, or the weight
columns and bias of a preceding MatMul+Add / Gemm)::

    Y = X W = (X diag(s)^-1) (diag(s) W),      s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)

    LN(gamma, beta) -> X -> MatMul(W) -> Y
      ==>  LN(gamma / s, beta / s) -> X / s -> MatMul(diag(s) W) -> Y

max|X_j| comes from calibration (``act_absmax``, per input channel); the pass itself runs no
inference. When X feeds several layers (Q, K and V after one LayerNorm) one s is shared and
max|W_j,:| is taken over all of them. alpha = 0 leaves activations as they are (s_j = 1/max|W_j|
still equalizes weight rows); alpha = 1 moves all of the range into the weights; 0.5 is the
paper's default. A gamma/beta shared with another LayerNorm (exporters deduplicate equal
constants) is copied first, so the other LayerNorm is not touched.

Declined, with a note: X produced by anything else (Gelu, Softmax/Reshape chains, residual Adds),
X also read by a non-MatMul node or being a graph output, non-constant weights, no statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError
from onnxpress.passes.base import PassResult, is_float_constant, unique_name

__all__ = ["SmoothQuant", "smoothquant_targets"]

log = logging.getLogger(__name__)


def _weight_kn(node: gs.Node) -> np.ndarray:
    """The consumer's weight as [K(in), N(out)] (float64)."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        w = w.T
    return w


def _consumer_reason(node: gs.Node, x: gs.Tensor) -> str | None:
    if node.op not in ("MatMul", "Gemm"):
        return f"also read by {node.op}"
    if node.inputs[0] is not x or (len(node.inputs) > 1 and node.inputs[1] is x):
        return f"{node.name} reads it as its weight"
    w = node.inputs[1]
    if not is_float_constant(w) or w.values.ndim != 2:
        return f"{node.name} has no constant 2-D weight"
    if len(w.outputs) != 1:
        return f"{node.name}'s weight is shared"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return f"{node.name} is a Gemm with transA=1"
    return None


def _producer(x: gs.Tensor) -> tuple[str, gs.Node] | None:
    """How X's channels can be scaled: ("ln", LN), ("gemm", Gemm), ("matmul_add", Add) or ("affine", Add)."""
    if not x.inputs:
        return None
    node = x.inputs[0]
    if node.op == "LayerNormalization" and len(node.outputs) >= 1 and node.outputs[0] is x:
        axis = int(node.attrs.get("axis", -1))
        rank = len(x.shape) if x.shape else None
        if (axis == -1 or (rank is not None and axis == rank - 1)) and is_float_constant(node.inputs[1]):
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is None or not bias.name or is_float_constant(bias):
                return "ln", node
        return None
    if node.op == "Gemm" and is_float_constant(node.inputs[1]) and len(node.inputs[1].outputs) == 1:
        if len(node.inputs) < 3 or not node.inputs[2].name or is_float_constant(node.inputs[2]):
            return "gemm", node
        return None
    if node.op == "Add" and len(node.inputs) == 2:
        consts = [t for t in node.inputs if is_float_constant(t)]
        others = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(consts) == 1 and len(others) == 1 and others[0].inputs and len(others[0].outputs) == 1:
            mm = others[0].inputs[0]
            if (
                mm.op == "MatMul"
                and is_float_constant(mm.inputs[1])
                and mm.inputs[1].values.ndim == 2
                and len(mm.inputs[1].outputs) == 1
                and len(consts[0].outputs) == 1
            ):
                return "matmul_add", node
            if mm.op == "Mul" and len(consts[0].outputs) == 1 and consts[0].values.ndim <= 1 and _channel_const(mm):
                return "affine", node  # a LayerNorm written out (opset < 17 exports): ... * gamma + beta
    return None


def _channel_const(mul: gs.Node) -> gs.Constant | None:
    """The Mul's float constant of at most one axis (gamma), used by it alone, or None."""
    consts = [t for t in mul.inputs if is_float_constant(t)]
    if len(mul.inputs) != 2 or len(consts) != 1 or consts[0].values.ndim > 1 or len(consts[0].outputs) != 1:
        return None
    return consts[0]


def _candidates(graph: gs.Graph) -> tuple[list[tuple[gs.Tensor, list[gs.Node]]], list[str]]:
    """(X, consumers) pairs that can be smoothed, and notes on MatMul inputs that cannot."""
    found, notes, seen = [], [], set()
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[0].name in seen:
            continue
        if not is_float_constant(node.inputs[1]):
            continue  # activation x activation (attention scores): not a layer with weights
        x = node.inputs[0]
        seen.add(x.name)
        if isinstance(x, gs.Constant):
            continue
        if x in graph.outputs:
            notes.append(f"{x.name}: not smoothed (it is a graph output)")
            continue
        readers = [c for c in x.outputs if c.op != "Shape"]  # a Shape reads the dims only (TorchScript reshapes)
        reasons = [r for c in readers if (r := _consumer_reason(c, x))]
        if reasons:
            notes.append(f"{x.name}: not smoothed ({reasons[0]})")
            continue
        if _producer(x) is None:
            producer = x.inputs[0].op if x.inputs else "a graph input"
            notes.append(f"{x.name}: not smoothed (produced by {producer}, which cannot absorb 1/s)")
            continue
        found.append((x, readers))
    return found, notes


def smoothquant_targets(graph: gs.Graph) -> list[str]:
    """Names of the activations SmoothQuant can smooth (they need per-channel max |X| statistics)."""
    return [x.name for x, _ in _candidates(graph)[0]]


def _private_const(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> None:
    old = node.inputs[index]
    name = old.name if len(old.outputs) == 1 else unique_name(graph, f"{old.name}_smooth")
    node.inputs[index] = gs.Constant(name, np.ascontiguousarray(values.astype(old.values.dtype)))


def _scale_channels(graph: gs.Graph, kind: str, node: gs.Node, inv: np.ndarray) -> None:
    """Multiply the producer's output channels (last axis) by ``inv``."""
    if kind == "ln":
        _private_const(graph, node, 1, node.inputs[1].values * inv)
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            _private_const(graph, node, 2, node.inputs[2].values * inv)
        return
    if kind == "gemm":
        w = node.inputs[1].values.astype(np.float64)
        w = w * (inv[:, None] if int(node.attrs.get("transB", 0)) else inv[None, :])
        _private_const(graph, node, 1, w)
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = np.broadcast_to(node.inputs[2].values.astype(np.float64), node.inputs[2].values.shape[:-1] + inv.shape)
            _private_const(graph, node, 2, b * inv)
        return
    bias_idx = 0 if isinstance(node.inputs[0], gs.Constant) else 1
    b = node.inputs[bias_idx].values.astype(np.float64)
    _private_const(graph, node, bias_idx, np.broadcast_to(b, b.shape[:-1] + inv.shape) * inv)
    mm = node.inputs[1 - bias_idx].inputs[0]
    if kind == "affine":  # gamma (a scalar or one value per channel) times 1/s, per channel
        gamma = _channel_const(mm)
        assert gamma is not None
        _private_const(graph, mm, mm.inputs.index(gamma), np.broadcast_to(gamma.values.astype(np.float64),
                                                                           inv.shape) * inv)
        return
    _private_const(graph, mm, 1, mm.inputs[1].values.astype(np.float64) * inv[None, :])


class SmoothQuant:
    """Migrate activation outliers into the following MatMul/Gemm weights (exact in float).

    Args:
        act_absmax: per-channel max |X| of each activation to smooth, keyed by tensor name
            (shape [K], from calibration; see :func:`smoothquant_targets`).
        alpha: migration strength in [0, 1].
        max_scale: factors are clipped to [1/max_scale, max_scale] to keep weights finite.
    """

    name = "smoothquant"

    def __init__(self, act_absmax: Mapping[str, np.ndarray], alpha: float = 0.5, max_scale: float = 1e4) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ArgumentError(f"alpha must be in [0, 1], not {alpha}")
        self.act_absmax = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in act_absmax.items()}
        self.alpha = float(alpha)
        self.max_scale = float(max_scale)

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (activations that cannot be smoothed are declined one by one)."""

    def scales(self, x_max: np.ndarray, w_max: np.ndarray) -> np.ndarray:
        """s_j = x_j^alpha / w_j^(1 - alpha), 1 where either is zero, clipped to the allowed band."""
        ok = (x_max > 0) & (w_max > 0)
        s = np.ones_like(x_max)
        s[ok] = x_max[ok] ** self.alpha / w_max[ok] ** (1.0 - self.alpha)
        return np.clip(s, 1.0 / self.max_scale, self.max_scale)

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Smooth every candidate activation that has statistics."""
        candidates, notes = _candidates(graph)
        smoothed = 0
        for x, consumers in candidates:
            stats = self.act_absmax.get(x.name)
            k = _weight_kn(consumers[0]).shape[0]
            if stats is None or stats.size != k or not np.all(np.isfinite(stats)):
                why = "no statistics" if stats is None else f"statistics of shape {stats.shape} for {k} channels"
                notes.append(f"{x.name}: not smoothed ({why})")
                continue
            w_max = np.max([np.abs(_weight_kn(c)).max(axis=1) for c in consumers], axis=0)
            s = self.scales(stats, w_max)
            kind, producer = _producer(x)
            _scale_channels(graph, kind, producer, 1.0 / s)
            for c in consumers:
                w = c.inputs[1].values.astype(np.float64)
                w = w * (s[None, :] if c.op == "Gemm" and int(c.attrs.get("transB", 0)) else s[:, None])
                _private_const(graph, c, 1, w)
            smoothed += 1
            log.debug("smoothquant: %s (%d readers), s in [%.3g, %.3g]", x.name, len(consumers), s.min(), s.max())
        return PassResult(graph, smoothed > 0, {"smoothed": smoothed, "declined": len(notes)}, tuple(notes))
