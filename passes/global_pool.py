"""ReduceMean over every spatial axis -> GlobalAveragePool (exact up to float summation order).

PyTorch exports ``x.mean((2, 3))`` / ``adaptive_avg_pool2d(x, 1).flatten(1)`` heads as ``ReduceMean``
over the trailing axes. Both ops compute the same mean, but onnxruntime's QDQ fusions know only the pool:
``DQ -> GlobalAveragePool -> Q`` becomes ``QLinearGlobalAveragePool``, which runs channels-last beside
the NHWC integer convs, while ``DQ -> ReduceMean -> Q`` stays a float ReduceMean behind a uint8
Transpose back to NCHW and a DequantizeLinear. Measured on the reference MobileNet (int8, batch 64,
2 threads, interleaved with fp32): 0.643 -> 0.603x fp32 latency, logits bit-identical.

Rewritten: ``ReduceMean`` whose reduced axes (the attribute before opset 18, a constant input from 18
on) are exactly ``2 .. rank-1`` of an input of known rank >= 4. Rank 3 is left alone: ``[batch, seq,
features]`` averaged over its last axis is a LayerNorm written out far more often than a 1-D pooling
head, and as a pool it would keep onnxruntime from fusing the LayerNorm. The rank comes from inferred shapes
(``onnxpress.model_io.infer_shapes`` first); where it is not known the node is kept. ``keepdims=1``: the pool's
output is the ReduceMean's tensor. ``keepdims=0`` on rank 4: the pool feeds ``Flatten(axis=1)`` (shape
``[N, C]``, what ReduceMean gave), a scale-keeping op for InsertQDQ and onnxruntime. The output tensor
keeps its name, so calibration tables made on the original model still apply.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names, reduce_axes

__all__ = ["ReduceMeanToGlobalPool"]


class ReduceMeanToGlobalPool:
    """Turn spatial-mean ``ReduceMean`` nodes into ``GlobalAveragePool`` (see the module docstring)."""

    name = "reducemean_to_global_pool"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every eligible ReduceMean; notes say why the others were kept."""
        rewritten, notes = 0, []
        fresh = fresh_names(graph_names(graph))
        for node in [n for n in graph.nodes if n.op == "ReduceMean"]:
            why = _decline_reason(node)
            if why:
                notes.append(f"{node.name or node.outputs[0].name}: kept ({why})")
                continue
            x, y = node.inputs[0], node.outputs[0]
            keep = int(node.attrs.get("keepdims", 1))
            node.op, node.inputs, node.attrs = "GlobalAveragePool", [x], {}
            if not keep:  # the pool's [N, C, 1, 1] -> [N, C]
                pooled = gs.Variable(fresh(f"{y.name}_pooled"), dtype=y.dtype)
                node.outputs = [pooled]
                flat = gs.Node("Flatten", fresh(f"{node.name or y.name}_flatten"),
                               attrs={"axis": 1}, inputs=[pooled], outputs=[y])
                graph.nodes.append(flat)
            rewritten += 1
        if rewritten:
            graph.toposort()
        return PassResult(graph, rewritten > 0, {"rewritten": rewritten}, tuple(notes))


def _decline_reason(node: gs.Node) -> str | None:
    """Why ``node`` (a ReduceMean) cannot become a GlobalAveragePool, or None."""
    x = node.inputs[0]
    if x.dtype is None or not np.issubdtype(np.dtype(x.dtype), np.floating):
        return "input is not a known float tensor (GlobalAveragePool takes floats only)"
    rank = len(x.shape) if x.shape is not None else None
    if rank is None or rank < 4:
        # rank 3 [batch, seq, features]: a mean over the last axis is most often a LayerNorm written out
        # (opset < 17 exports), which onnxruntime fuses only while it stays a ReduceMean
        return "input rank unknown or below 4"
    axes = reduce_axes(node, rank)
    if isinstance(axes, str):
        return axes
    if axes != list(range(2, rank)):
        return f"axes {list(axes)} are not the spatial axes 2..{rank - 1}"
    if not int(node.attrs.get("keepdims", 1)) and rank != 4:
        return "keepdims=0 on a rank other than 4"
    return None
