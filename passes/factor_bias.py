"""A low-rank pair's bias moves into its second factor's weights, fed by a constant column of ones (exact).

``SplitLowRank`` turns ``y = x W + b`` into ``y = (x U) V + b``: the bias stays an addition over the wide
output ``[rows, N]``. onnxruntime 1.32 on x86 adds a Gemm's bias in a pass of its own over that output before
the product accumulates into it, and for a thin second factor (``r`` of 24-48) that pass costs as much as a
third of the product itself. So the bias rides in the product instead::

    before:  t = x U             [rows, r]       y = t V + b           (b added over [rows, N])
    after:   t = x [U, 0] + e_r  [rows, r + 1]   y = t [V; b]          (the last column of t is 1)

``e_r`` adds 1 to the new column only, over ``[rows, r + 1]``: cheap when ``N`` is several times ``r + 1``.
Exact in float up to summation order: the new column is ``0 + 1`` for every finite input, and ``1 * b`` is
``b``. Measured (onnxruntime 1.32, 1 thread, 4096 rows, one pair, interleaved): ``[128 -> 40 -> 512]``
2.09 -> 1.46 ms, ``[128 -> 32 -> 512]`` 1.76 -> 1.24 ms, ``[128 -> 40 -> 128]`` 0.71 -> 0.64 ms, but
``[512 -> 48 -> 128]`` 1.77 -> 2.04 ms; the reference transformer split to 0.5 of its MACs, batch 64:
0.711-0.715 -> 0.641-0.648x fp32 with the 8 pairs where ``N >= 3 (r + 1)`` folded, 0.650-0.655x with all 11.
Hence ``MIN_RATIO``.

Matched: a second factor ``MatMul(t, V)`` whose output only an ``Add`` of a constant bias reads (varying along
the last axis only), or ``Gemm(t, V, C)`` with ``transA`` 0, ``alpha`` 1 and ``C`` of ``N`` elements; its
input ``t`` read by it alone (a joint unit's shared first factor is left), made by ``MatMul(x, U)`` or a
``Gemm(x, U)`` without ``C``; ``U`` and ``V`` 2-D constants of one float type. The new column costs ``rows * N``
MACs in the second factor (the bias additions, now counted as MACs) and ``rows * n`` in the first (its zero
weight column is multiplied all the same): ``lowrank`` folds only the pairs that keep the model within its MACs
budget (``names``).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names

__all__ = ["MIN_RATIO", "FoldBiasIntoFactor", "foldable"]

MIN_RATIO = 3.0
"""Fold a pair when its output width ``N`` is at least this many times ``r + 1`` (measured above)."""


def _bias_vector(t: gs.Tensor, n: int) -> np.ndarray | None:
    """The bias as a length-``n`` vector when ``t`` is a constant that varies along the last axis only."""
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    if v.size != n or (v.ndim and v.shape[-1] != n):
        return None
    return v.reshape(n)


def _weight(node: gs.Node) -> np.ndarray | None:
    """The node's 2-D constant weight as ``[in, out]`` (``transB`` undone), or ``None``."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant) or np.asarray(w.values).ndim != 2:
        return None
    v = np.asarray(w.values)
    return v.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else v


Pair = tuple[gs.Node, gs.Node, "gs.Node | None", np.ndarray]


def foldable(graph: gs.Graph) -> list[Pair]:
    """Every ``(first, second, bias Add or None, bias)`` pair the pass can fold (any output width)."""
    outputs = {id(t) for t in graph.outputs}
    found = []
    for second in graph.nodes:
        if second.op not in ("MatMul", "Gemm") or len(second.inputs) < 2:
            continue
        v = _weight(second)
        t = second.inputs[0]
        if v is None or id(t) in outputs or len(t.outputs) != 1 or not t.inputs:  # a tensor's outputs: its readers
            continue
        first = t.inputs[0]
        u = _weight(first) if first.op in ("MatMul", "Gemm") else None
        if u is None or u.shape[1] != v.shape[0] or u.dtype != v.dtype or not np.issubdtype(v.dtype, np.floating):
            continue
        if first.op == "Gemm" and len(first.inputs) > 2 and first.inputs[2] is not None and first.inputs[2].name:
            continue  # the first factor has a bias of its own
        n = v.shape[1]
        if second.op == "Gemm":
            if int(second.attrs.get("transA", 0)) or float(second.attrs.get("alpha", 1.0)) != 1.0:
                continue
            c = _bias_vector(second.inputs[2], n) if len(second.inputs) > 2 else None
            if c is None:
                continue
            found.append((first, second, None, c * float(second.attrs.get("beta", 1.0))))
            continue
        y = second.outputs[0]
        adds = y.outputs
        if id(y) in outputs or len(adds) != 1 or adds[0].op != "Add":
            continue
        other = [i for i in adds[0].inputs if i is not y]
        c = _bias_vector(other[0], n) if len(other) == 1 else None
        out = adds[0].outputs[0]
        if c is None or c.dtype != v.dtype or out.shape is not None and y.shape is not None and out.shape != y.shape:
            continue
        found.append((first, second, adds[0], c))
    return found


class FoldBiasIntoFactor:
    """Move each low-rank pair's bias into its second factor (``[V; b]``) behind a column of ones.

    Args:
        min_ratio: fold a pair only when its output width is at least this many times ``r + 1``.
        names: fold only the pairs whose second-factor node has one of these names, or for a node without
            a name its output's (``SplitLowRank``'s layer keys; ``None``: every pair).
    """

    name = "fold_bias_into_factor"

    def __init__(self, min_ratio: float = MIN_RATIO, names: Collection[str] | None = None) -> None:
        self.min_ratio = float(min_ratio)
        self.names = None if names is None else set(names)
        self.folded: list[str] = []  # the second factors folded by the last call, by key (as ``names``)

    def requires(self, graph: gs.Graph) -> None:
        """Nothing beyond a valid graph."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Fold every matched pair wide enough (and named, with ``names``)."""
        fresh = fresh_names(graph_names(graph))
        self.folded = []
        for first, second, add, c in foldable(graph):
            v, u = _weight(second), _weight(first)
            r, n = v.shape
            key = second.name or second.outputs[0].name  # as SplitLowRank keys a layer
            if n < self.min_ratio * (r + 1) or self.names is not None and key not in self.names:
                continue
            dtype = v.dtype
            u2 = np.concatenate([u, np.zeros((u.shape[0], 1), dtype)], axis=1)
            v2 = np.concatenate([v, c.astype(dtype)[None, :]], axis=0)
            if first.op == "Gemm" and int(first.attrs.get("transB", 0)):
                u2 = u2.T
            if second.op == "Gemm" and int(second.attrs.get("transB", 0)):
                v2 = v2.T
            ones = np.zeros(r + 1, dtype)
            ones[-1] = 1
            first.inputs[1] = gs.Constant(fresh(f"{first.inputs[1].name}_ones"), np.ascontiguousarray(u2))
            second.inputs[1] = gs.Constant(fresh(f"{second.inputs[1].name}_bias"), np.ascontiguousarray(v2))
            t = second.inputs[0]
            if t.shape is not None:
                t.shape = [*t.shape[:-1], r + 1]
            e = gs.Constant(fresh(f"{t.name}_one"), ones)
            if first.op == "Gemm":
                while len(first.inputs) > 2:  # an empty optional C
                    first.inputs.pop()
                first.inputs.append(e)
                first.attrs["beta"] = 1.0
            else:
                raw = gs.Variable(fresh(f"{t.name}_raw"), dtype=t.dtype,
                                  shape=None if t.shape is None else list(t.shape))
                first.outputs[0] = raw
                graph.nodes.append(gs.Node("Add", fresh(f"{first.name}_one"), inputs=[raw, e], outputs=[t]))
            if second.op == "Gemm":
                while len(second.inputs) > 2:
                    second.inputs.pop()
                second.attrs.pop("beta", None)
            else:
                out = add.outputs[0]
                add.inputs.clear()
                add.outputs.clear()
                second.outputs[0] = out
            self.folded.append(key)
        if self.folded:
            graph.cleanup().toposort()
        return PassResult(graph, bool(self.folded), {"pairs": len(self.folded)})
