"""An int8 input Conv with fewer than 4 input channels reads its input padded to 4 zero channels (exact).

onnxruntime's NHWC integer conv is slow for 1-3 input channels (``InsertQDQ._narrow_input_reason``: with 4 it
ties the float conv). ``InsertQDQ`` keeps such a stem float where it can, but not when a residual Add reads
its output (a float stem there costs layout transposes), so a grayscale ResNet's stem runs as a 1-channel
QLinearConv. Padded to 4 channels, with zero weights on the new ones, the same convolution runs on the fast
kernel::

    x[N,1,H,W] -> Q -> DQ -> Conv(DQ(W_q[O,1,k,k]))            (before)
    x[N,1,H,W] -> Pad(channels +3, zeros) -> Q -> DQ -> Conv(DQ(W_q[O,4,k,k] = [W_q, 0, 0, 0]))

Exact: a zero input quantizes to the zero point and dequantizes to 0 (a uint8 / int8 activation range always
holds 0), and a zero int8 weight with zero point 0 dequantizes to 0, so the new channels add 0 + 0 to every
dot product. Measured on the reference ResNet (``onnxpress quantize`` defaults, interleaved with fp32, 40
rounds): 0.527 -> 0.416x fp32 at batch 64, 2 threads; 0.422 -> 0.399 at 1 thread; 0.64 -> 0.59 / 0.44 -> 0.42
at batch 1 (2 / 1 threads); the 62.5%-pruned int8 ResNet of ``optimize``'s target search 0.205-0.211 ->
0.186-0.192x at 1 thread (stem kernel 1725 -> 1044 us); SQNR 43.47 / 43.50 dB. A stem that ``InsertQDQ`` keeps
float (MobileNet's, the Inception CNN's) is not touched: forced int8 and padded they ran slower than float
(MobileNet 0.626 -> 0.773 at batch 64, 1 thread).

Rewritten: a Conv with ``group`` 1 whose data input is ``DQ(Q(x))`` with ``x`` a graph input, the Q and DQ read
by nothing else, and whose weight is ``DQ`` of a constant int8/uint8 ``[O, C, ...]`` with ``C < 4`` and zero
points all 0 (``InsertQDQ``'s symmetric weights).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names
from onnxpress.passes.qdq import _dq_of

__all__ = ["PadInputChannels"]

WIDTH = 4
"""Input channels the padded conv gets (onnxruntime's integer conv is as fast as the float one from 4)."""


class PadInputChannels:
    """Pad the input of narrow int8 input Convs to ``WIDTH`` zero channels (see the module docstring)."""

    name = "pad_input_channels"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (a graph without QDQ input convs is left as it is)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every eligible Conv."""
        fresh = fresh_names(graph_names(graph))
        inputs = {id(t) for t in graph.inputs}
        padded = 0
        for conv in [n for n in graph.nodes if n.op == "Conv"]:
            found = _match(conv, inputs)
            if found is None:
                continue
            q, w_const, w_dq = found
            x, w = q.inputs[0], w_const.values
            extra = WIDTH - w.shape[1]
            pads = np.zeros(2 * w.ndim, np.int64)
            pads[w.ndim + 1] = extra  # end of axis 1 (channels)
            wide = gs.Variable(fresh(f"{x.name}_{WIDTH}ch"), dtype=x.dtype)
            graph.nodes.append(gs.Node("Pad", fresh(f"{conv.name or x.name}_pad_channels"),
                                       inputs=[x, gs.Constant(fresh(f"{x.name}_channel_pads"), pads)],
                                       outputs=[wide]))
            q.inputs[0] = wide
            zeros = np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)
            w_dq.inputs[0] = gs.Constant(fresh(f"{w_const.name}_{WIDTH}ch"), np.concatenate([w, zeros], axis=1))
            padded += 1
        if padded:
            graph.cleanup().toposort()
        return PassResult(graph, padded > 0, {"convs": padded})


def _match(conv: gs.Node, graph_inputs: set[int]) -> tuple[gs.Node, gs.Constant, gs.Node] | None:
    """``(Q of the input, int8 weight constant, weight DQ)`` when ``conv`` is eligible, else None."""
    if int(conv.attrs.get("group", 1)) != 1 or len(conv.inputs) < 2:
        return None
    dq = _dq_of(conv.inputs[0])
    if dq is None or len(conv.inputs[0].outputs) != 1:
        return None
    q = dq.inputs[0].inputs[0] if dq.inputs[0].inputs else None
    if q is None or q.op != "QuantizeLinear" or len(dq.inputs[0].outputs) != 1:
        return None
    if id(q.inputs[0]) not in graph_inputs:
        return None
    w_dq = _dq_of(conv.inputs[1])
    if w_dq is None or len(conv.inputs[1].outputs) != 1:
        return None
    w = w_dq.inputs[0]
    if not isinstance(w, gs.Constant) or len(w.outputs) != 1:
        return None
    values = np.asarray(w.values)
    if values.dtype not in (np.int8, np.uint8) or values.ndim < 3 or not 1 <= values.shape[1] < WIDTH:
        return None
    zp = w_dq.inputs[2] if len(w_dq.inputs) > 2 else None
    if zp is not None and (not isinstance(zp, gs.Constant) or np.any(np.asarray(zp.values) != 0)):
        return None
    return q, w, w_dq
