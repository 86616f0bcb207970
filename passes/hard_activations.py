"""HardSwish and HardSigmoid between uint8 QDQ nodes as onnxruntime's integer Add and Mul kernels.

onnxruntime has no integer HardSwish or HardSigmoid. In a QDQ model they run in float between a
DequantizeLinear and a QuantizeLinear, and on the CPU provider a HardSwish is split into a float
HardSigmoid and a Mul: four passes over the tensor. ``DQ, DQ -> Add -> Q`` and ``DQ, DQ -> Mul -> Q``,
on the other hand, are fused into ``QLinearAdd`` / ``QLinearMul``, which run channels-last beside
the integer convs. Both activations are a clip of an affine map, and a uint8 QuantizeLinear whose
grid starts at 0 clips by itself (it saturates), so:

HardSigmoid ``h(x) = clip(a x + b, 0, 1)`` (``a > 0``) followed by ``Q(s, z = 0)`` with ``255 s <= 1``::

    Q_s(clip(a x + b, 0, 1)) = Q_s(a (x + b / a)) = Q_{s/a}(x + b / a)     (exact)

    before:  x_q -> DQ -> HardSigmoid -> Q(s, 0) -> y_q
    after :  x_q -> DQ -> Add(DQ(b / a)) -> Q(s / a, 0) -> y_q           (QLinearAdd)

The clip at 0 is the saturation at the grid's zero point 0, and the clip at 1 is implied because the
grid ends at ``255 s <= 1`` (a HardSigmoid's calibrated output never exceeds 1).

HardSwish ``x * h(x)`` with ``h(x) = clip(x + 3, 0, 6) / 6`` (ONNX fixes ``a = 1/6, b = 1/2``) keeps
``x`` as one factor and rounds the gate ``g = clip(x + 3, 0, 6)`` on its own uint8 grid
``[0, u]``, ``u = min(6, hi + 3)`` (``hi``: the largest value of ``x``'s grid, so nothing above it arrives)::

    before:  x_q -> DQ -> HardSwish -> Q(s_y, z_y) -> y_q
    after :  x_q -> DQ -> Add(DQ(3)) -> Q(u/255, 0) -> DQ(u/1530, 0) -> Mul(DQ(x_q), .) -> Q(s_y, z_y) -> y_q
                                      (QLinearAdd)     the gate h(x) = g / 6      (QLinearMul)

The DQ after the gate's Q reads it with ``1/6`` of the Q's scale, so the Mul sees ``h(x)`` itself. The gate
is rounded to ``u / 510`` at most (``u <= 6``), so the output moves by at most ``|x| u / 3060``: half a step
of the output grid or less for ``|x| <= 6``. Measured on ``bench/architectures.py``'s MobileNetV3-style net
(ten HardSwish, random weights, 64 random inputs; 2 threads, interleaved): batch 32 1.10-1.25x -> 0.71-0.80x
the fp32 model's latency, batch 1 402 -> 359 us (fp32 344 us), logit SQNR 46.87 -> 46.77 dB.

Rewritten: a ``HardSwish`` / ``HardSigmoid`` whose input comes from a per-tensor uint8 DequantizeLinear
and whose output is read by exactly one per-tensor uint8 QuantizeLinear (and is not a graph output).
Others are kept, with a note: int8 activations (a symmetric int8 grid has no zero point at its bottom,
so it does not clip at 0, and TensorRT, the reason for int8 activations, fuses these activations itself),
a HardSigmoid grid that does not start at 0 or reaches past 1, and ``a <= 0`` or ``b = 0``. Nodes the user
excluded (``exclude``) are left as they are. The output tensor keeps its name.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names
from onnxpress.passes.qdq import Selection

__all__ = ["IntegerHardActivations"]

_OPS = ("HardSwish", "HardSigmoid")


class IntegerHardActivations:
    """Rewrite uint8 QDQ HardSwish / HardSigmoid nodes into integer Add (+ Mul) kernels (see the module docstring)."""

    name = "integer_hard_activations"

    def __init__(self, exclude: Selection | None = None) -> None:
        """``exclude``: the nodes ``--exclude`` keeps float (InsertQDQ's selection); they are kept as they are."""
        self.exclude = exclude
        self.rewritten: list[tuple[str, str]] = []  # (node name, op) of each node rewritten by the last call

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (nodes outside a uint8 Q/DQ sandwich are kept)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every eligible node; ``hardswish`` / ``hardsigmoid`` count them, notes say why others were kept."""
        offsets = _Offsets(graph, fresh_names(graph_names(graph)))
        outputs = {id(t) for t in graph.outputs}
        counts = {"hardswish": 0, "hardsigmoid": 0}
        notes: list[str] = []
        self.rewritten = []
        for node in [n for n in graph.nodes if n.op in _OPS]:
            label = node.name or node.outputs[0].name
            if self.exclude is not None and self.exclude.reason(node):
                continue
            found = _sandwich(node, outputs)
            if isinstance(found, str):
                if found:  # "" : not between Q/DQ at all (a float region): nothing to say
                    notes.append(f"{label}: kept float ({found})")
                continue
            x_scale, x_zero, q = found
            base = f"{'hsig' if node.op == 'HardSigmoid' else 'hswish'}{len(self.rewritten)}"  # short: file bytes
            if node.op == "HardSigmoid":
                why = _rewrite_hardsigmoid(node, q, offsets, base)
                if why:
                    notes.append(f"{label}: kept float ({why})")
                    continue
            else:
                _rewrite_hardswish(node, x_scale, x_zero, offsets, base)
            counts[node.op.lower()] += 1
            self.rewritten.append((label, node.op))
        if any(counts.values()):
            graph.cleanup().toposort()
        return PassResult(graph, any(counts.values()), counts, tuple(notes))


def _scalar(t: gs.Tensor | None, dtype: type) -> float | int | None:
    """The value of a one-element constant of ``dtype``, else None."""
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    if v.size != 1 or v.dtype != dtype:
        return None
    return v.reshape(()).item()


def _sandwich(node: gs.Node, outputs: set[int]) -> tuple[float, int, gs.Node] | str:
    """``(x scale, x zero point, the Q after)`` of a node between uint8 per-tensor QDQ nodes, or why not ("": no DQ)."""
    x, y = node.inputs[0], node.outputs[0]
    dq = x.inputs[0] if isinstance(x, gs.Variable) and x.inputs else None
    if dq is None or dq.op != "DequantizeLinear":
        return ""
    scale = _scalar(dq.inputs[1] if len(dq.inputs) > 1 else None, np.float32)
    zero = _scalar(dq.inputs[2], np.uint8) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if scale is None or zero is None or not isinstance(dq.inputs[0], gs.Variable):
        return ("its input is not a per-tensor uint8 DequantizeLinear with a float32 scale (int8 activations: "
                "no zero point to clip at)")
    if id(y) in outputs or len(y.outputs) != 1 or y.outputs[0].op != "QuantizeLinear":
        return "its output is a graph output or is read by other nodes than one QuantizeLinear"
    q = y.outputs[0]
    if q.inputs[0] is not y or _scalar(q.inputs[1], np.float32) is None or (
            len(q.inputs) < 3 or _scalar(q.inputs[2], np.uint8) is None):
        return "the QuantizeLinear after it is not per-tensor uint8"
    if not scale > 0:
        return "its input's scale is not positive"
    return float(scale), int(zero), q


def _uint8_const(name: str, value: float, fresh) -> tuple[gs.Constant, gs.Constant, gs.Constant]:
    """(code, scale, zero point) of a uint8 constant that dequantizes to ``value`` (!= 0): 255 or 0 with |value|/255."""
    scale = np.float32(abs(value) / 255.0)
    code, zero = (255, 0) if value > 0 else (0, 255)
    return (gs.Constant(fresh(f"{name}_q"), np.array(code, np.uint8)),
            gs.Constant(fresh(f"{name}_scale"), np.array(scale, np.float32)),
            gs.Constant(fresh(f"{name}_zero"), np.array(zero, np.uint8)))


class _Offsets:
    """One ``DQ(uint8 constant)`` per offset value, shared by every Add that adds it.

    onnxruntime copies a shared DQ per fused node at load, so a net with many HardSwish stores the constant 3 once.
    """

    def __init__(self, graph: gs.Graph, fresh) -> None:
        self.graph, self.fresh, self.made = graph, fresh, {}

    def plus(self, x: gs.Tensor, value: float, base: str) -> gs.Variable:
        """``x + DQ(value)`` as a new float tensor (for QLinearAdd)."""
        key = float(np.float32(value))
        c = self.made.get(key)
        if c is None:
            code, scale, zero = _uint8_const("offset", value, self.fresh)
            c = self.made[key] = gs.Variable(self.fresh("offset"), dtype=np.float32, shape=[])
            self.graph.nodes.append(gs.Node("DequantizeLinear", self.fresh("offset_dq"), inputs=[code, scale, zero],
                                            outputs=[c]))
        total = gs.Variable(self.fresh(f"{base}_x"), dtype=np.float32, shape=x.shape)
        self.graph.nodes.append(gs.Node("Add", self.fresh(f"{base}_add"), inputs=[x, c], outputs=[total]))
        return total


def _rewrite_hardsigmoid(node: gs.Node, q: gs.Node, offsets: _Offsets, base: str) -> str:
    """``DQ -> HardSigmoid -> Q(s, 0)`` as ``DQ -> Add(b / a) -> Q(s / a, 0)``; why not, or ""."""
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    s, z = float(_scalar(q.inputs[1], np.float32)), int(_scalar(q.inputs[2], np.uint8))
    if not alpha > 0 or beta == 0:
        return f"alpha {alpha:g} <= 0 or beta 0: not a shifted, clipped ramp"
    if z != 0 or 255 * s > 1 + 1e-6:
        return "the QuantizeLinear after it does not cover [0, <= 1] from its zero point 0: it would not clip"
    q.inputs[0] = offsets.plus(node.inputs[0], beta / alpha, base)
    q.inputs[1] = gs.Constant(offsets.fresh(f"{base}_s"), np.array(s / alpha, np.float32))
    node.outputs = []
    return ""


def _rewrite_hardswish(node: gs.Node, x_scale: float, x_zero: int, offsets: _Offsets, base: str) -> None:
    """``DQ -> HardSwish -> Q`` as integer Add (the gate) and Mul (see the module docstring)."""
    upper = min(6.0, x_scale * (255 - x_zero) + 3.0)  # the largest x + 3 that can arrive (>= 3: 0 is on x's grid)
    x, y = node.inputs[0], node.outputs[0]
    graph, fresh = offsets.graph, offsets.fresh
    shifted = offsets.plus(x, 3.0, base)
    zero = gs.Constant(fresh(f"{base}_z"), np.array(0, np.uint8))
    gate_q = gs.Variable(fresh(f"{base}_gq"), dtype=np.uint8, shape=x.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", fresh(f"{base}_q"), inputs=[
        shifted, gs.Constant(fresh(f"{base}_s"), np.array(upper / 255.0, np.float32)), zero], outputs=[gate_q]))
    gate = gs.Variable(fresh(f"{base}_g"), dtype=np.float32, shape=x.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{base}_dq"), inputs=[
        gate_q, gs.Constant(fresh(f"{base}_s6"), np.array(upper / 1530.0, np.float32)), zero], outputs=[gate]))
    node.outputs = []
    graph.nodes.append(gs.Node("Mul", fresh(f"{base}_mul"), inputs=[x, gate], outputs=[y]))
