"""High-bias absorption (Nagel et al. 2019, §4.1): move what a Relu never cuts into the next layer's bias.

When every value of a pre-activation channel stays at or above ``c ≥ 0``, ``relu(y − c) + c = relu(y)``,
so ``c`` can leave the first layer's bias and reach the next layer through its bias::

    y = W1 x + b1 ;  z = W2 relu(y) + b2
      = W2 relu(W1 x + (b1 − c)) + (b2 + W2 c)          exact where y ≥ c

    X -> Conv1(W1, b1) -> Relu -> Conv2 1x1 (W2, b2)      ==>   X -> Conv1(W1, b1 − c) -> Relu -> Conv2(W2, b2 + W2 c)
    X -> Conv1 -> Relu -> Min(hi)  (equalize's split ReLU6) ==>  ... -> Relu -> Min(hi − c) -> ...   (c ≤ hi)

The activation's range shrinks by ``c`` per channel, which a per-tensor activation quantizer gains from
after cross-layer equalization scaled some channels' biases up. ``c = max(floor, 0)`` per channel,
the floor being a lower bound of the pre-activation: measured minima over calibration data (exact on
that data) or ``β − 3|γ|`` from a BatchNorm (``onnxpress.passes.bn_stats.preactivation_floors``; holds
for all but ~0.13% of Gaussian values). The next layer must add ``W2 c`` the same at every output
position, so it is a 1x1 Conv without padding (padded borders read zeros, not ``c``), a Gemm
(``transA = 0``) or a MatMul followed by a constant bias Add; the first is a Conv / Gemm with a
constant bias or a MatMul with a constant bias Add. Everything else is declined with a reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, constant_bias_add, is_float_constant

__all__ = ["AbsorbHighBias", "preactivation_tensors"]

log = logging.getLogger(__name__)


def _producer(node: gs.Node) -> tuple[gs.Variable, gs.Node, int] | str:
    """(pre-activation tensor, node holding the bias, bias input index) of a first layer, or why not."""
    if node.op in ("Conv", "Gemm"):
        if len(node.inputs) < 3 or not is_float_constant(node.inputs[2]) or len(node.inputs[2].outputs) != 1:
            return "no constant bias of its own"
        if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm beta != 1"
        if node.op == "Conv" and node.inputs[2].values.ndim != 1:
            return "bias is not 1-D"
        return node.outputs[0], node, 2
    if node.op == "MatMul":
        found = constant_bias_add(node)
        if found is None:
            return "MatMul without a constant bias Add"
        add, i = found
        if add.inputs[i].values.ndim != 1:
            return "bias is not 1-D"
        return add.outputs[0], add, i
    return "not a layer"


def _consumer_shift(node: gs.Node, tensor: gs.Variable, c: np.ndarray) -> tuple[gs.Node, int, np.ndarray] | str:
    """(node, bias input index, amount to add) so that ``node`` reads ``tensor − c`` unchanged, or why not."""
    if not node.inputs or node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return f"{node.op} reads the activation other than as its input 0"
    if node.op == "Conv":
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if not is_float_constant(w) or w.values.ndim < 3 or any(k != 1 for k in w.values.shape[2:]):
            return "Conv is not 1x1 with a constant weight"
        if int(node.attrs.get("group", 1)) != 1:
            return "grouped 1x1 Conv"
        if any(int(p) for p in node.attrs.get("pads", [])) or node.attrs.get("auto_pad", "NOTSET") not in (
            "NOTSET", "VALID", b"NOTSET", b"VALID"):
            return "padded Conv (its borders read zeros, not the absorbed amount)"
        if w.values.shape[1] != c.size:
            return f"Conv has {w.values.shape[1]} input channels for {c.size}"
        shift = w.values.astype(np.float64).reshape(w.values.shape[0], c.size, -1).sum(axis=2) @ c
        has_bias = len(node.inputs) > 2 and node.inputs[2].name
        if has_bias and (not is_float_constant(node.inputs[2]) or len(node.inputs[2].outputs) != 1):
            return "Conv bias is not its own constant"
        return node, 2, shift
    if node.op == "Gemm":
        b = node.inputs[1] if len(node.inputs) > 1 else None
        if int(node.attrs.get("transA", 0)) or not is_float_constant(b) or b.values.ndim != 2:
            return "Gemm with transA or a non-constant weight"
        w = b.values.astype(np.float64)
        w = w.T if int(node.attrs.get("transB", 0)) else w  # [K, N]
        if w.shape[0] != c.size:
            return f"Gemm has {w.shape[0]} inputs for {c.size} channels"
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = node.inputs[2]
            if not is_float_constant(bias) or len(bias.outputs) != 1 or bias.values.size != w.shape[1]:
                return "Gemm bias is not its own per-output constant"
        beta = float(node.attrs.get("beta", 1.0)) if len(node.inputs) > 2 and node.inputs[2].name else 1.0
        return node, 2, float(node.attrs.get("alpha", 1.0)) * (c @ w) / beta
    if node.op == "MatMul":
        if len(node.inputs) < 2 or not is_float_constant(node.inputs[1]) or node.inputs[1].values.ndim != 2:
            return "MatMul without a constant 2-D weight"
        found = constant_bias_add(node)
        if found is None:
            return "MatMul without a constant bias Add"
        w = node.inputs[1].values.astype(np.float64)
        if w.shape[0] != c.size:
            return f"MatMul has {w.shape[0]} inputs for {c.size} channels"
        add, i = found
        return add, i, c @ w
    return f"{node.op} is not a layer that takes the shift in its bias"


def _add_to_bias(graph: gs.Graph, node: gs.Node, index: int, amount: np.ndarray, dtype: np.dtype) -> None:
    if len(node.inputs) > index and node.inputs[index].name:
        old = node.inputs[index]
        new = old.values.astype(np.float64) + amount.reshape(old.values.shape)
        node.inputs[index] = gs.Constant(old.name, new.astype(old.values.dtype))
        return
    bias = gs.Constant(f"{node.name or node.outputs[0].name}_absorbed_bias", amount.astype(dtype))
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    node.inputs.append(bias)
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0


def preactivation_tensors(graph: gs.Graph) -> dict[str, int]:
    """``{pre-activation tensor: channel axis}`` of every layer whose output a single Relu reads: what floors key."""
    out = {}
    for node in graph.nodes:
        found = _producer(node) if node.op in ("Conv", "Gemm", "MatMul") else "not a layer"
        if isinstance(found, str):
            continue
        pre = found[0]
        if len(pre.outputs) == 1 and pre.outputs[0].op == "Relu" and pre not in graph.outputs:
            out[pre.name] = 1 if node.op == "Conv" else -1
    return out


class AbsorbHighBias:
    """Absorb ``c = max(floor, 0)`` of each Relu-activated layer into the layers that read it.

    Args:
        floors: per-channel lower bounds of pre-activation tensors, keyed by tensor name (the first
            layer's output, or its bias Add's output for a MatMul): measured minima, or
            ``bn_stats.preactivation_floors`` from a BatchNorm before folding.
    """

    name = "absorb_high_bias"

    def __init__(self, floors: Mapping[str, np.ndarray]) -> None:
        self.floors = {k: np.asarray(v, np.float64).reshape(-1) for k, v in floors.items()}

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (layers are declined one by one)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Absorb in place; count the layers and the channels that moved."""
        notes: list[str] = []
        layers = channels = 0
        for node in list(graph.nodes):
            found = _producer(node) if node.op in ("Conv", "Gemm", "MatMul") else "not a layer"
            if isinstance(found, str):
                continue
            pre, holder, index = found
            floor = self.floors.get(pre.name)
            if floor is None:
                continue
            label = node.name or node.outputs[0].name
            spatial = node.inputs[1].values.ndim - 2 if node.op == "Conv" and is_float_constant(node.inputs[1]) else 0
            reason = self._absorb(graph, pre, holder, index, floor, spatial)
            if isinstance(reason, str):
                notes.append(f"{label}: not absorbed ({reason})")
            elif reason:
                layers += 1
                channels += reason
        log.debug("absorb_high_bias: %d layers, %d channels", layers, channels)
        return PassResult(graph, layers > 0, {"layers": layers, "channels": channels}, tuple(notes))

    @staticmethod
    def _absorb(graph: gs.Graph, pre: gs.Variable, holder: gs.Node, index: int, floor: np.ndarray,
                spatial: int) -> int | str:
        bias = holder.inputs[index]
        if floor.size != bias.values.size or not np.all(np.isfinite(floor)):
            return f"floor has {floor.size} channels for a bias of {bias.values.size}"
        if pre in graph.outputs or len(pre.outputs) != 1 or pre.outputs[0].op != "Relu":
            return "its output is not read by one Relu only"
        relu = pre.outputs[0]
        act = relu.outputs[0]
        c = np.maximum(floor, 0.0)
        min_node, bound_index = None, None
        if len(act.outputs) == 1 and act not in graph.outputs and act.outputs[0].op == "Min":
            min_node = act.outputs[0]
            others = [i for i, t in enumerate(min_node.inputs) if t is not act]
            if len(min_node.inputs) != 2 or len(others) != 1 or not is_float_constant(min_node.inputs[others[0]]):
                return "Min after the Relu has no constant bound"
            bound_index = others[0]
            hi = min_node.inputs[bound_index].values.astype(np.float64)
            if hi.size not in (1, c.size) or len(min_node.inputs[bound_index].outputs) != 1:
                return "Min bound is neither per channel nor its own constant"
            c = np.minimum(c, np.broadcast_to(hi.reshape(-1), c.shape))
            act = min_node.outputs[0]
        if not np.any(c > 0):
            return 0
        if act in graph.outputs or not act.outputs:
            return "the activation is a graph output"
        shifts = [_consumer_shift(n, act, c) for n in act.outputs]
        bad = next((s for s in shifts if isinstance(s, str)), None)
        if bad is not None:
            return bad
        dtype = bias.values.dtype
        holder.inputs[index] = gs.Constant(bias.name, (bias.values.astype(np.float64) - c).astype(dtype))
        if min_node is not None:
            hi_t = min_node.inputs[bound_index]
            hi = hi_t.values.astype(np.float64)
            shape = hi.shape if hi.size == c.size else (c.size,) + (1,) * spatial  # channel axis 1 (Conv) or last
            new_hi = np.broadcast_to(hi.reshape(-1), c.shape) - c
            min_node.inputs[bound_index] = gs.Constant(hi_t.name, new_hi.reshape(shape).astype(hi_t.values.dtype))
        for node, i, amount in shifts:
            _add_to_bias(graph, node, i, amount, dtype)
        return int(np.count_nonzero(c > 0))
