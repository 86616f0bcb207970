"""A mean or sum over a tensor's leading axes as one ``MatMul`` by a constant row (exact up to summation order).

onnxruntime 1.32's CPU ``ReduceMean`` / ``ReduceSum`` over the *leading* axis of a ``[T, ...]`` tensor
runs 15x slower on two threads than on one: ``[32, 64, 256]`` averaged over axis 0 took 962 us at two
threads (with or without spinning) against 65 us at one, while over axis 1 of ``[64, 32, 256]`` it
took 59 us. Its transpose optimizer creates that case by itself: a recurrent net's mean over time,
``LSTM -> ... -> Transpose(1, 0, 2) -> ReduceMean(axis=1)``, has the Transpose pushed through the reduce
and becomes a ``ReduceMean(axis=0)`` on ``[T, batch, features]``. On the reference LSTM (batch 64, two
threads) that one node was 16% of the int8 model's kernel time.

The same mean as a matrix product by the constant row ``w = [1/T, ..., 1/T]`` (``1`` for a sum)::

    before: X[T, B, D] ----------------------------------------> ReduceMean(axes=0) -> Y[B, D]
            (or X -> Transpose(1, 0, 2) -> ReduceMean(axes=1), the same values)
    after:  X[T, B, D] -> Reshape[T, -1] -> MatMul(w[1, T], .) -> Reshape[B, D] -> Y

measured 62 us at two threads and 44 us at one on ``[32, 64, 256]`` (MLAS's GEMM), the same values
up to float summation order (1.8e-7 on unit-variance data).

Rewritten: ``ReduceMean`` / ``ReduceSum`` of a float tensor with constant axes (the attribute before
opset 18 for ReduceMean and 13 for ReduceSum, an input after), ``noop_with_empty_axes`` off, whose
reduced axes, after looking through a ``Transpose`` before it (which stays if anything else reads it),
are the leading axes ``0 .. k-1`` of that transpose's input, with static sizes, and leave the other
axes in their order.
The output shape must be known up to one dynamic dimension (it is the final Reshape's target, with
``-1`` there). Reductions over other axes are left alone: over a trailing axis the product is far
slower (spatial means of ``[64, 256, 8, 8]``: 134 us as ReduceMean, 4.3 ms as MatMul), and over
middle axes onnxruntime is as fast as the product. The output keeps its name.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names, reduce_axes

__all__ = ["LeadingMeanAsMatMul"]

_REDUCES = ("ReduceMean", "ReduceSum")


class LeadingMeanAsMatMul:
    """Turn means and sums over leading axes into a ``MatMul`` by a constant row (see the module docstring)."""

    name = "leading_mean_as_matmul"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (shapes come from the graph's value info; unknown ones keep the node)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every eligible reduction; ``rewritten`` counts them, notes say why others were kept."""
        fresh = fresh_names(graph_names(graph))
        rewritten, notes = 0, []
        for node in [n for n in graph.nodes if n.op in _REDUCES]:
            plan = _plan(node)
            if isinstance(plan, str):
                if plan:
                    notes.append(f"{node.name or node.outputs[0].name}: kept ({plan})")
                continue
            source, steps, target = plan
            y = node.outputs[0]
            base = node.name or y.name
            rows = gs.Variable(fresh(f"{y.name}_rows"), dtype=np.float32)
            summed = gs.Variable(fresh(f"{y.name}_row_sum"), dtype=np.float32)
            weight = np.full((1, steps), 1.0 / steps if node.op == "ReduceMean" else 1.0, np.float32)
            graph.nodes.extend([
                gs.Node("Reshape", fresh(f"{base}_as_rows"),
                        inputs=[source, gs.Constant(fresh(f"{base}_rows_shape"), np.array([steps, -1], np.int64))],
                        outputs=[rows]),
                gs.Node("MatMul", fresh(f"{base}_as_matmul"),
                        inputs=[gs.Constant(fresh(f"{base}_weights"), weight), rows], outputs=[summed]),
                gs.Node("Reshape", fresh(f"{base}_to_output"),
                        inputs=[summed, gs.Constant(fresh(f"{base}_output_shape"), np.array(target, np.int64))],
                        outputs=[y]),
            ])
            node.outputs = []  # the reduction (and a Transpose only it read) is gone in cleanup
            rewritten += 1
        if rewritten:
            graph.cleanup().toposort()
        return PassResult(graph, rewritten > 0, {"rewritten": rewritten}, tuple(notes))


def _plan(node: gs.Node) -> tuple[gs.Tensor, int, list[int]] | str:
    """``(source, T, output shape with -1)`` for a rewrite of ``node``, or why not ("" when it is no candidate).

    ``source`` is the tensor whose leading axes are reduced (the input, or the input of the Transpose that made
    it), ``T`` the number of values averaged per output element.
    """
    x = node.inputs[0]
    if x.dtype is None or np.dtype(x.dtype) != np.float32 or x.shape is None:
        return ""  # not a known float32 tensor: nothing to say (most graphs have many such reductions)
    rank = len(x.shape)
    axes = reduce_axes(node, rank)
    if isinstance(axes, str):
        return ""
    source, source_axes = x, axes
    producer = x.inputs[0] if x.inputs else None
    if producer is not None and producer.op == "Transpose":  # read its input (the Transpose stays if others read it)
        perm = [int(p) for p in producer.attrs.get("perm", list(range(rank - 1, -1, -1)))]
        kept = [perm[i] for i in range(rank) if i not in axes]
        if kept == sorted(kept):  # the other axes keep their order: no transpose left on the output
            source, source_axes = producer.inputs[0], sorted(perm[a] for a in axes)
    if source_axes != list(range(len(source_axes))) or len(source_axes) == rank:
        return ""  # not leading axes (onnxruntime reduces these as fast as the product), or every axis
    if source.shape is None or len(source.shape) != rank:
        return "input shape unknown"
    dims = [source.shape[a] for a in source_axes]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return "reduced axes without a static size"
    out = node.outputs[0].shape
    if out is None:
        return "output shape unknown"
    target = [d if isinstance(d, int) and d >= 0 else -1 for d in out]
    if target.count(-1) > 1:
        return "more than one dynamic output dimension"
    return source, int(np.prod(dims)), target
