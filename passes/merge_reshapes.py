"""Merge a Reshape of a Reshape into one Reshape of the first one's input (exact).

A Reshape moves no data, so ``Reshape(Reshape(x, s1), s2)`` equals ``Reshape(x, s)`` for the shape ``s``
that ``s2`` resolves to::

    before: x -> Reshape[s1] -> t -> Reshape[s2] -> y          (t read by that Reshape only)
    after : x -> Reshape[s] -> y                               (the first Reshape goes when nothing reads t)

``s`` from ``s2`` (constant shapes; ``allowzero`` 0 unless said):
- ``s2`` has no 0, or its ``allowzero`` is 1: ``s = s2`` (the output shape depends on the element count
  only, which ``x`` and ``t`` share).
- A 0 at axis ``i`` copies ``t``'s dimension ``i``: ``s1[i]`` where that is a known size; a 0 of ``s1``
  (``x``'s own dimension ``i``) stays 0.
- Where that copies ``s1``'s ``-1`` and ``s2`` has a ``-1`` of its own, the latter is the element count over
  the other dimensions of ``y``: ``t``'s unknown dimension and any copied ``x`` dimensions cancel, and what
  is left must be a whole number. So the fused attention's query ``Reshape[0, 0, -1]`` of a head split
  ``Reshape[-1, 64, 4, 32]`` reads the split's input with ``[-1, 64, 128]``.
A first shape computed at run time (TorchScript exports write ``Concat(Shape(x)[0], 64, 4, 32)``) is read as ``t``'s
inferred dimensions, the one unknown (if any) as ``-1``: what ``t`` is, whatever computed it. Else (a 0 of ``s1``
with ``allowzero`` 1, a 0 past ``s1``'s rank, a run-time ``s2``) the pair stays.

Why: onnxruntime runs each Reshape as a kernel of its own, about 1-3 us at batch 1 and more where the
intra-op threads sleep between kernels; ``FuseAttention`` leaves such pairs around each attention node
(its ``[B, S, H*d]`` views of the head splits and its head split of the output, next to the
exporter's and ``FlattenTokens``' Reshapes): 8 of the reference transformer's 20 Reshapes. Merged, the projections'
views are the ``[-1, S, N]`` that ``passes/quantized_attention.py`` matches: the transformer's TorchScript exports
(run-time head splits) quantize to 0.669 -> 0.607x (opset 17) and 0.729 -> 0.589x (opset 13) fp32 at batch 1.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names

__all__ = ["MergeReshapes", "merged_shape"]

log = logging.getLogger(__name__)


def merged_shape(s1: list[int], s2: list[int], allowzero1: bool = False, allowzero2: bool = False) -> list[int] | None:
    """The shape ``s`` with ``Reshape(x, s) == Reshape(Reshape(x, s1), s2)`` for every ``x``, else None.

    The result is read with ``allowzero`` 0 unless ``s2`` has no 0 and ``allowzero2`` (then ``s = s2``
    keeps the second node's attribute).
    """
    if allowzero2 or 0 not in s2:
        return list(s2)
    if len(s2) > len(s1) or s1.count(-1) > 1 or s2.count(-1) > 1:
        return None
    out: list[int] = []
    for i, d in enumerate(s2):
        if d != 0:
            out.append(d)
        elif s1[i] == 0 and allowzero1:
            return None  # a literal empty dimension: rare, and the merged node could not say so with allowzero 0
        else:
            out.append(s1[i])  # a size, x's dimension i (0), or t's unknown one (-1)
    if out.count(-1) <= 1:
        return out
    # two -1: t's unknown dimension copied at `i`, and s2's own at `j`; y's elements are t's, so
    # s2's -1 = prod(t's dims) / prod(y's other dims), where U (t's unknown) and copied x dims cancel
    i = next(k for k, d in enumerate(s2) if d == 0 and s1[k] == -1)
    j = s2.index(-1)
    num = Counter(("x", k) if d == 0 else ("U",) if d == -1 else ("c", d) for k, d in enumerate(s1))
    den = Counter(("x", k) if s2[k] == 0 and s1[k] == 0 else ("U",) if k == i else ("c", d)
                  for k, d in enumerate(out) if k != j)
    left_num, left_den = num - den, den - num
    if any(key[0] != "c" for key in (*left_num, *left_den)):
        return None
    top = math.prod(key[1] ** n for key, n in left_num.items())
    bottom = math.prod(key[1] ** n for key, n in left_den.items())
    if bottom == 0 or top % bottom:
        return None
    out[j] = top // bottom
    return out


class MergeReshapes:
    """Read each Reshape whose input another Reshape made off that Reshape's input (module docstring)."""

    name = "merge_reshapes"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Merge every such pair (chains too, in graph order); the count is ``merged``."""
        fresh = fresh_names(graph_names(graph))
        merged = 0
        for node in graph.toposort().nodes:
            if node.op != "Reshape" or len(node.inputs) != 2 or not node.inputs[0].inputs:
                continue
            first = node.inputs[0].inputs[0]
            if first.op != "Reshape" or len(first.inputs) != 2:
                continue
            s1, s2 = _constant_shape(first.inputs[1]), _constant_shape(node.inputs[1])
            a1, a2 = bool(first.attrs.get("allowzero", 0)), bool(node.attrs.get("allowzero", 0))
            if s1 is None:  # a target computed at run time (TorchScript's Shape arithmetic): its inferred output
                s1, a1 = _inferred_shape(first.outputs[0]), False
            if s1 is None or s2 is None:
                continue
            shape = merged_shape(s1, s2, a1, a2)
            if shape is None:
                log.debug("merge_reshapes: %s after %s: shapes %s, %s not merged", node.name, first.name, s1, s2)
                continue
            if shape != s2:
                node.inputs[1] = gs.Constant(fresh(f"{node.name}_shape"), np.array(shape, np.int64))
                node.attrs.pop("allowzero", None)  # 0, the default (opset 13 has no such attribute)
            node.inputs[0] = first.inputs[0]
            merged += 1
        return PassResult(graph, merged > 0, {"merged": merged})


def _inferred_shape(t: gs.Tensor) -> list[int] | None:
    """``t``'s inferred dimensions as a Reshape target (-1 for the one unknown), else None."""
    if t.shape is None:
        return None
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in t.shape]
    return dims if dims.count(-1) <= 1 else None


def _constant_shape(t: gs.Tensor) -> list[int] | None:
    """The values of a constant 1-D int64 shape input, else None."""
    if not isinstance(t, gs.Constant):
        return None
    values = np.asarray(t.values)
    return [int(v) for v in values] if values.ndim == 1 and values.dtype.kind == "i" else None
