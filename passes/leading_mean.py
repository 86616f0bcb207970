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
Over axis 0 of ``Reshape(Transpose(Y))`` with the Transpose keeping axis 0 in front and the Reshape keeping its
size (a bidirectional LSTM's ``Y[T, 2, B, H] -> Transpose(0, 2, 1, 3) -> Reshape[T, B, 2H]``), the mean reads ``Y``
itself and the Transpose follows it on a ``[2, B, H]`` tensor: the reference LSTM at batch 64 (2 threads, fp32 = 1,
paired) 0.639 / 0.668 / 0.644 -> 0.603 / 0.602 / 0.584, at batch 1 about 3% faster (the Reshape's Shape arithmetic
goes too), 49.77 dB either way.
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
            source, steps, target, moved = plan
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
            ])
            if moved is not None:  # the mean of the time-major tensor, then its (now T times smaller) transpose
                inner, perm = moved
                shaped, turned = (gs.Variable(fresh(f"{y.name}_{s}"), dtype=np.float32) for s in ("mean", "turned"))
                graph.nodes.extend([
                    gs.Node("Reshape", fresh(f"{base}_unflatten"), outputs=[shaped],
                            inputs=[summed, gs.Constant(fresh(f"{base}_mean_shape"), np.array(inner, np.int64))]),
                    gs.Node("Transpose", fresh(f"{base}_transpose"), attrs={"perm": perm}, inputs=[shaped],
                            outputs=[turned]),
                ])
                summed = turned
            graph.nodes.append(
                gs.Node("Reshape", fresh(f"{base}_to_output"),
                        inputs=[summed, gs.Constant(fresh(f"{base}_output_shape"), np.array(target, np.int64))],
                        outputs=[y]))
            node.outputs = []  # the reduction (and a Transpose only it read) is gone in cleanup
            rewritten += 1
        if rewritten:
            graph.cleanup().toposort()
        return PassResult(graph, rewritten > 0, {"rewritten": rewritten}, tuple(notes))


def _plan(node: gs.Node) -> tuple[gs.Tensor, int, list[int], tuple[list[int], list[int]] | None] | str:
    """``(source, T, output shape with -1, moved)`` for a rewrite of ``node``, or why not ("" when no candidate).

    ``source`` is the tensor whose leading axes are reduced (the input, or the input of the Transpose that made
    it), ``T`` the number of values averaged per output element. ``moved`` is ``(shape, perm)`` where the mean
    is taken before a time-major Transpose instead (:func:`_before_transpose`), else None.
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
    moved = _before_transpose(source) if len(source_axes) == 1 else None
    if moved is not None:
        return moved[0], int(np.prod(dims)), target, moved[1:]
    return source, int(np.prod(dims)), target, None


def _before_transpose(x: gs.Tensor) -> tuple[gs.Tensor, list[int], list[int]] | None:
    """``(y, shape, perm)`` where ``x = Reshape(Transpose(y, p))`` keeps axis 0 in front, else None.

    A bidirectional LSTM's ``Y[T, 2, B, H] -> Transpose(0, 2, 1, 3) -> Reshape[T, B, 2H]``. The mean over axis 0
    commutes with the Transpose, so it can read ``y`` (its own rows, ``[T, -1]``) and the Transpose move after it,
    onto a tensor ``T`` times smaller (``shape``: ``y``'s other dimensions, one unknown as -1; ``perm``: ``p``
    without axis 0).
    The Reshape must keep axis 0 (its first dimension equal to ``y``'s static ``T``), so that each time step
    stays one block of values. Measured on the reference LSTM (batch 64, 2 threads): the Transpose took
    287 of ~4300 us. The Transpose and Reshape stay if anything else reads them.
    """
    reshape = x.inputs[0] if x.inputs else None
    if reshape is None or reshape.op != "Reshape" or not reshape.inputs[0].inputs:
        return None
    transpose = reshape.inputs[0].inputs[0]
    if transpose.op != "Transpose":
        return None
    y = transpose.inputs[0]
    if y.shape is None or x.shape is None or len(y.shape) < 3:
        return None
    perm = [int(p) for p in transpose.attrs.get("perm", list(range(len(y.shape) - 1, -1, -1)))]
    steps = y.shape[0]
    if perm[0] != 0 or not isinstance(steps, int) or steps <= 0 or x.shape[0] != steps:
        return None
    inner = [d if isinstance(d, int) and d > 0 else -1 for d in y.shape[1:]]
    if inner.count(-1) > 1:
        return None
    return y, inner, [p - 1 for p in perm[1:]]
