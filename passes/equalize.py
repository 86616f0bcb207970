"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): exact in float.

For two layers joined by a positive-homogeneous activation f (f(x / s) = f(x) / s for s > 0: ReLU,
LeakyReLU, no activation), scaling output channel i of the first layer by 1/s_i and input channel i
of the second by s_i leaves the network function unchanged::

    y = W2 f(W1 x + b1) + b2 = (W2 S) f(S^-1 W1 x + S^-1 b1) + b2,      S = diag(s)

    X -> Conv1(W1, b1) -> Relu -> Conv2(W2, b2) -> Y
      ==>  X -> Conv1(W1 / s, b1 / s) -> Relu -> Conv2(W2 * s, b2) -> Y

With r1_i = max|W1[i, ...]| (output channel i) and r2_i = max|W2[:, i, ...]| (input channel i),
s_i = sqrt(r1_i * r2_i) / r2_i makes both ranges equal to sqrt(r1_i * r2_i), which is what a
per-tensor weight quantizer wants. Chains (pointwise -> depthwise -> pointwise in MobileNets) are
swept repeatedly until every s_i is within ``tol`` of 1 or ``max_iterations`` is reached.

Clip (ReLU6) is not positive-homogeneous: Clip(x / s, lo, hi) != Clip(x, lo, hi) / s, and Clip
only takes scalar bounds, so a per-channel bound lo/s_i cannot be written in it. With
``clip="skip"`` (default) such pairs are declined with a note. With ``clip="split"`` the Clip is
rewritten into ops that take per-channel bounds, which keeps the rewrite exact::

    Clip(x, lo, hi)  ==>  Min(Max(x, lo_c), hi_c)      (lo_c, hi_c: [C,1,1] or [N] constants)
                     ==>  Min(Relu(x), hi_c)          when lo == 0

and the per-channel bounds are divided by s_i with the rest of the pair. The cost is one extra
elementwise node per Clip (onnxruntime no longer fuses Conv+Clip there, and a QDQ pass that does
not know Min quantizes both the Relu and the Min output). ``clip="relu"`` is the choice of Nagel
et al. for MobileNetV2: Clip(x, 0, hi) becomes Relu(x) (**not exact**: values above hi are no
longer clipped; measure the float model after it), which keeps Conv+Relu fusable.
``strength=b`` applies S^b of the converged scales S (exact too: a partial equalization).
High-bias absorption is a pass of its own (``onnxpress.passes.absorb_bias``; exact only where the
pre-activation never falls below the absorbed amount), run after this one when data is at hand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError
from onnxpress.passes.base import PassResult, is_float_constant, unique_name

__all__ = ["EqualizeCrossLayer", "find_pairs"]

log = logging.getLogger(__name__)

_HOMOGENEOUS = {"Relu", "LeakyRelu"}


def _has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and node.inputs[2] is not None and bool(node.inputs[2].name)


def layer_decline_reason(node: gs.Node) -> str | None:
    """Why a Conv/Gemm cannot have its channels rescaled (None when it can)."""
    if node.op not in ("Conv", "Gemm"):
        return f"{node.op} is not Conv/Gemm"
    if len(node.inputs) < 2 or not is_float_constant(node.inputs[1]):
        return "weight is not a float constant"
    if any(len(t.outputs) > 1 for t in node.inputs[1:] if isinstance(t, gs.Constant)):
        return "weight or bias is shared with another node"
    if _has_bias(node) and not is_float_constant(node.inputs[2]):
        return "bias is not a float constant"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "Gemm with transA=1"
    return None


# --- channel views ------------------------------------------------------------------------------
# out_view(W) / in_view(W) reshape a weight into [channels, -1] so that row i holds every weight
# that touches output (input) channel i; scaling a row scales exactly that channel.


def _gemm_w_nk(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """Gemm weight as [N(out), K(in)]."""
    return w if int(node.attrs.get("transB", 0)) else w.T


def out_ranges(node: gs.Node) -> np.ndarray:
    """Max |W| per output channel of a Conv/Gemm."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Gemm":
        w = _gemm_w_nk(node, w)
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def _conv_in_view(w: np.ndarray, group: int) -> np.ndarray:
    c_out, cpg = w.shape[0], w.shape[1]
    opg = c_out // group
    v = w.reshape((group, opg, cpg) + w.shape[2:])
    v = np.moveaxis(v, 2, 1)  # [g, cpg, opg, k...]
    return v.reshape(group * cpg, -1)


def in_ranges(node: gs.Node) -> np.ndarray:
    """Max |W| per input channel of a Conv/Gemm."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Gemm":
        return np.abs(_gemm_w_nk(node, w)).max(axis=0)
    return np.abs(_conv_in_view(w, int(node.attrs.get("group", 1)))).max(axis=1)


def in_channels(node: gs.Node) -> int:
    """Number of input channels a Conv/Gemm consumes."""
    w = node.inputs[1].values
    if node.op == "Gemm":
        return _gemm_w_nk(node, w).shape[1]
    return w.shape[1] * int(node.attrs.get("group", 1))


def _set_const(node: gs.Node, index: int, values: np.ndarray) -> None:
    old = node.inputs[index]
    node.inputs[index] = gs.Constant(old.name, np.ascontiguousarray(values.astype(old.values.dtype)))


def scale_outputs(node: gs.Node, factor: np.ndarray) -> None:
    """Multiply output channel i of a Conv/Gemm (weights and bias) by factor[i]."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Gemm":
        w = w * (factor[:, None] if int(node.attrs.get("transB", 0)) else factor[None, :])
    else:
        w = w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
    _set_const(node, 1, w)
    if _has_bias(node):
        b = node.inputs[2].values.astype(np.float64)
        if node.op == "Gemm" and b.ndim and b.shape[-1] == 1:  # broadcast a [.., 1] bias to per channel
            b = np.broadcast_to(b, b.shape[:-1] + (factor.size,))
        elif b.ndim == 0:
            b = np.broadcast_to(b, factor.shape)
        _set_const(node, 2, b * factor)


def scale_inputs(node: gs.Node, factor: np.ndarray) -> None:
    """Multiply the weights that read input channel i of a Conv/Gemm by factor[i]."""
    w = node.inputs[1].values.astype(np.float64)
    if node.op == "Gemm":
        w = w * (factor[None, :] if int(node.attrs.get("transB", 0)) else factor[:, None])
    else:
        group = int(node.attrs.get("group", 1))
        view = _conv_in_view(w, group) * factor[:, None]
        c_out, cpg = w.shape[0], w.shape[1]
        v = view.reshape((group, cpg, c_out // group) + w.shape[2:])
        w = np.moveaxis(v, 1, 2).reshape(w.shape)
    _set_const(node, 1, w)


# --- pairs --------------------------------------------------------------------------------------


class Pair:
    """Two layers and the elementwise nodes between them (activations and per-channel bounds)."""

    def __init__(self, first: gs.Node, between: Sequence[gs.Node], second: gs.Node) -> None:
        self.first, self.between, self.second = first, list(between), second

    def describe(self) -> str:
        """``conv1 -> Relu -> conv2`` for notes."""
        names = [self.first.name or self.first.op, *(n.op for n in self.between), self.second.name or self.second.op]
        return " -> ".join(names)


def _only_consumer(graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
    if t in graph.outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _bound_input(node: gs.Node) -> gs.Constant | None:
    """The constant operand of a Max/Min with one variable operand, else None."""
    if len(node.inputs) != 2:
        return None
    consts = [t for t in node.inputs if isinstance(t, gs.Constant)]
    return consts[0] if len(consts) == 1 and is_float_constant(consts[0]) else None


def _clip_bounds(node: gs.Node) -> tuple[float | None, float | None] | None:
    """(lo, hi) of a Clip with constant (or absent) bounds, else None."""
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    for i, name in ((1, "lo"), (2, "hi")):
        if len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].name:
            t = node.inputs[i]
            if not isinstance(t, gs.Constant):
                return None
            v = float(np.asarray(t.values).reshape(-1)[0])
            if name == "lo":
                lo = v
            else:
                hi = v
    return lo, hi


def find_pairs(graph: gs.Graph, clip: str = "skip") -> tuple[list[Pair], list[str]]:
    """Every Conv->Conv and Gemm->Gemm pair joined by rescalable elementwise nodes.

    Returns:
        The pairs, and notes naming each candidate pair that was declined and why.
    """
    pairs, notes = [], []
    for first in graph.nodes:
        if first.op not in ("Conv", "Gemm") or layer_decline_reason(first):
            continue
        t, between, reason, second = first.outputs[0], [], None, None
        while second is None and reason is None:
            if not t.outputs:
                break  # a graph output with no consumer: not a candidate, nothing to note
            node = _only_consumer(graph, t)
            if node is None:
                reason = "output has several consumers or is a graph output"
            elif node.op in ("Conv", "Gemm"):
                second = node
            elif (
                node.op in _HOMOGENEOUS
                or (node.op == "Clip" and _clip_bounds(node))
                or (node.op in ("Max", "Min") and (bound := _bound_input(node)) is not None and len(bound.outputs) == 1)
            ):
                between.append(node)
            else:
                break  # not followed by another layer: not a candidate, nothing to note
            if between and between[-1] is node:
                t = node.outputs[0]
        if second is None:
            if reason:
                notes.append(f"{first.name}: not equalized ({reason})")
            continue
        why = layer_decline_reason(second)
        clips = [n for n in between if n.op == "Clip"]
        if why is None and clips and clip == "skip":
            why = "Clip/ReLU6 between them is not positive-homogeneous; clip='split' rewrites it"
        if why is None and clip == "relu" and any(_clip_bounds(n)[0] != 0.0 for n in clips):
            why = "Clip with a lower bound other than 0 cannot become Relu"
        if why is None and first.op != second.op:
            why = f"{first.op} followed by {second.op}"
        if why is None and second.inputs[0] is not t:
            why = "second layer does not read the activation as its data input"
        if why is None and in_channels(second) != out_ranges(first).size:
            why = "channel counts differ"
        if why:
            notes.append(f"{first.name} -> {second.name}: not equalized ({why})")
            continue
        pairs.append(Pair(first, between, second))
    return pairs, notes


def _bound_shape(first: gs.Node) -> tuple[int, ...]:
    """Shape of a per-channel constant that broadcasts over the first layer's output (axis 1)."""
    channels = out_ranges(first).size
    rank = first.inputs[1].values.ndim if first.op == "Conv" else 2
    return (channels,) + (1,) * (rank - 2)


def _split_clip(graph: gs.Graph, pair: Pair, to_relu: bool = False) -> int:
    """Rewrite each Clip between the layers into Relu/Max + Min with per-channel bounds (or Relu only)."""
    shape = _bound_shape(pair.first)
    dtype = pair.first.inputs[1].values.dtype
    rewritten, new_between = 0, []
    for node in pair.between:
        if node.op != "Clip":
            new_between.append(node)
            continue
        lo, hi = _clip_bounds(node)
        chain: list[tuple[str, np.ndarray | None]] = []
        if lo == 0.0:
            chain.append(("Relu", None))
        elif lo is not None:
            chain.append(("Max", np.full(shape, lo, dtype)))
        if hi is not None and not to_relu:
            chain.append(("Min", np.full(shape, hi, dtype)))
        if not chain:  # a Clip without bounds is the identity; positive-homogeneous as it is
            new_between.append(node)
            continue
        x, y = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        cur = x
        for i, (op, bound) in enumerate(chain):
            last = i == len(chain) - 1
            out = y if last else gs.Variable(unique_name(graph, f"{y.name}_{op.lower()}"), x.dtype, x.shape)
            inputs = [cur]
            if bound is not None:
                inputs.append(gs.Constant(unique_name(graph, f"{y.name}_{op.lower()}_bound"), bound))
            name = unique_name(graph, f"{node.name or 'clip'}_{op.lower()}")
            new = gs.Node(op, name=name, inputs=inputs, outputs=[out])
            graph.nodes.append(new)
            new_between.append(new)
            cur = out
        rewritten += 1
    pair.between = new_between
    return rewritten


def _scale_pair(pair: Pair, s: np.ndarray) -> None:
    inv = 1.0 / s
    scale_outputs(pair.first, inv)
    full = _bound_shape(pair.first)
    for node in pair.between:
        if node.op not in ("Max", "Min"):
            continue
        bound = _bound_input(node)
        values = bound.values.astype(np.float64)
        if values.ndim < len(full):  # scalar, [1] or [W]: make it per channel (a valid model's bound broadcasts)
            values = np.broadcast_to(values, np.broadcast_shapes(values.shape, full))
        axis = values.ndim - len(full)  # channel axis of a right-aligned broadcast over [N, C, ...]
        factor = inv.reshape((1,) * axis + full)
        _set_const(node, node.inputs.index(bound), values * factor)
    scale_inputs(pair.second, s)


def equalization_scales(pair: Pair) -> np.ndarray:
    """s_i = sqrt(r1_i * r2_i) / r2_i; 1 where either range is zero."""
    r1, r2 = out_ranges(pair.first), in_ranges(pair.second)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
    return s


class EqualizeCrossLayer:
    """Equalize per-channel weight ranges of consecutive Conv/Gemm pairs (exact in float).

    Args:
        clip: ``"skip"`` declines pairs joined by Clip/ReLU6; ``"split"`` rewrites the Clip into
            Relu/Max + Min with per-channel bounds so the pair can be equalized exactly; ``"relu"``
            replaces Clip(0, hi) by Relu (lossy, as Nagel et al. do for MobileNetV2).
        max_iterations: sweeps over all pairs (chains need several).
        tol: stop when every scale of a sweep is within ``tol`` of 1 (relative).
        strength: apply ``S^strength`` of the converged per-pair scales ``S`` (1: full equalization,
            0: none; still exact in float). Scalings compose multiplicatively, so this is one extra
            rescale after convergence. Meant for trading weight ranges against the activation
            ranges that equalization unbalances (with per-tensor activations).
    """

    name = "equalize_cross_layer"

    def __init__(
        self,
        clip: Literal["skip", "split", "relu"] = "skip",
        max_iterations: int = 100,
        tol: float = 1e-3,
        strength: float = 1.0,
    ) -> None:
        if clip not in ("skip", "split", "relu"):
            raise ArgumentError(f"clip must be 'skip', 'split' or 'relu', not {clip!r}")
        if max_iterations < 1:
            raise ArgumentError("max_iterations must be >= 1")
        if not 0.0 <= strength <= 1.0:
            raise ArgumentError(f"strength must be in [0, 1], not {strength}")
        self.clip = clip
        self.strength = strength
        self.max_iterations = max_iterations
        self.tol = tol

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (pairs that cannot be equalized are declined one by one)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Find pairs, split Clips if asked, then sweep until the scales converge."""
        pairs, notes = find_pairs(graph, self.clip)
        clips = sum(_split_clip(graph, p, to_relu=self.clip == "relu") for p in pairs) if self.clip != "skip" else 0
        sweeps = 0
        totals = [np.ones(out_ranges(p.first).size) for p in pairs]
        for sweeps in range(1, self.max_iterations + 1):  # noqa: B007
            worst = 0.0
            for pair, total in zip(pairs, totals, strict=True):
                s = equalization_scales(pair)
                worst = max(worst, float(np.max(np.abs(s - 1.0))) if s.size else 0.0)
                _scale_pair(pair, s)
                total *= s
            if worst <= self.tol:
                break
        if self.strength != 1.0:  # scalings compose multiplicatively: S then S^(b-1) is S^b
            for pair, total in zip(pairs, totals, strict=True):
                _scale_pair(pair, total ** (self.strength - 1.0))
        for pair in pairs:
            log.debug("equalized %s", pair.describe())
        for note in notes:
            log.debug("equalize_cross_layer: %s", note)
        key = "clips_to_relu" if self.clip == "relu" else "clips_split"
        stats = {"pairs": len(pairs), "declined": len(notes), key: clips, "sweeps": sweeps if pairs else 0}
        return PassResult(graph, bool(pairs), stats, tuple(notes))
