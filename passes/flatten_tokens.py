"""Run the token-wise part of a transformer on ``[rows, features]`` so its dense layers become Gemms.

A transformer keeps its residual stream as ``x[B, S, D]`` and almost every op on it works on each
token (row) alone: the dense layers ``x W + b``, LayerNorm over the last axis, GELU, the residual
``Add`` of two such tensors. For these ``f(x)`` equals ``f(x.reshape(B*S, D)).reshape(B, S, -1)``.
With the rows flattened the dense layers are rank-2 ``MatMul + Add``, which
``passes/matmul_to_gemm.py`` turns into ``Gemm``, so the int32 bias goes into onnxruntime's
``QGemm`` instead of a separate float ``Add`` after each ``MatMulIntegerToFloat``::

    before: x[B,S,D] -> LN -> MatMul(W) -> Add(b) -> Reshape[-1,S,H,d] ...    (x, LN, Adds rank 3)
    after:  x[B,S,D] -> Reshape[-1,D] -> LN -> MatMul(W) -> Add(b) -> Reshape[-1,S,H,d] ...

A *region* is a connected set of row-wise nodes; its tensors are rank >= 3 with the same leading
dims (``shape[:-1]``, equal ints or equal named dims) and a known last dim ``d``. Row-wise nodes:
``MatMul`` by a 2-D constant; unary elementwise ops; binary elementwise ops whose other inputs are
region tensors of the same rows or constants that vary along the last axis only (their shape is
made 1-D: ``[1, 1, D]`` would broadcast a rank-2 tensor back to rank 3); ``LayerNormalization``,
``Softmax``/``LogSoftmax`` and keep-dims reductions over the last axis only.

- Entering: ``Reshape[-1, d]`` is added, or the ``Reshape`` that made the tensor gets ``[-1, d]``
  as its target when only the region reads it.
- Leaving (to another op, or as a graph output, which keeps its name and shape): ``Reshape`` back.
  Its target is constant with ``-1`` for the one dynamic dim; with two (batch and sequence) it is
  ``Concat(Shape(entry)[:-1], [d])``, built once per region and width from the earliest entry.
- Readers that need nothing back: a ``Reshape`` whose target holds no 0 (a constant, or ``Concat``
  / ``Unsqueeze`` / ``Gather`` ... of ``Shape`` dims and constants, as exporters build head splits)
  depends only on the element count, so it reads the rank-2 tensor; a ``Shape`` read only at leading
  dims (``Gather`` of indices < rank - 1) reads the entry instead, which has the same leading dims.

A region is rewritten only when it holds more dense layers with a constant bias (the Adds that go
away) than the nodes it adds, and at least ``min_layers`` of them. Measured (2 threads, int8,
each model's fp32 = 1, interleaved):

- reference transformer, dynamic batch: 0.711 -> 0.648 at batch 1; 0.566 -> 0.572 at batch 64
  (12 dense layers as QGemm, 2 Reshapes added);
- TorchScript export at opset 17 (Shape-built head splits): 0.77 -> 0.73 at batch 1;
- 4-layer BERT-style dynamo export, dynamic batch and sequence, d = 256 (24 layers, 5 nodes added):
  0.535 -> 0.515 at 1 x 32 tokens, 0.524 -> 0.517 at 8 x 64.

It pays at small batches. At large ones onnxruntime's ``QGemm`` with a float output was up to 5%
slower than ``MatMulIntegerToFloat`` + ``Add`` for wide outputs (512-4096 rows, N = 1024, single
layer) and the FFN's first bias no longer fuses into ``BiasGelu``, which about cancels the Adds
saved. ``quantize`` runs this pass before calibration.

In float (without the Gemm rewrite) the reference transformer runs at 0.92x at batch 64 and 1 thread
(fifteenth session). onnxruntime 1.32 fuses a rank-3 ``Add`` read only by a LayerNorm (here the last
residual Add and the final LayerNorm) into its CPU ``SkipLayerNormalization``, which measured 4-8x
slower than ``Add`` + ``LayerNormalization`` alone ([64, 64, 128]: 2.6 vs 0.4 ms; [1, 128, 768]: 0.49 vs
0.07 ms, 1 thread); on rows it does not fuse. The FFN's bias also goes into the Gemm instead of
``BiasGelu``. After a low-rank split the rewrite takes a 0.5-MACs split from 0.69x to 0.59x, so
``lowrank`` runs it after splitting. ``prune`` output keeps its graph's ranks: on the transformer pruned
by half the rewrite ended one region at a 3-D Add + LayerNorm that onnxruntime then fused, 0.66x -> 0.71x.

Exact in float up to summation order (the same dot products).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, constant_bias_add, fresh_names, graph_names

__all__ = ["FlattenTokens"]

log = logging.getLogger(__name__)

UNARY = frozenset({
    "Abs", "Cast", "Ceil", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sin",
    "Softplus", "Softsign", "Sqrt", "Tanh",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"})
LAST_AXIS = frozenset({"LayerNormalization", "Softmax", "LogSoftmax"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"})


def _rows(t: object) -> tuple | None:
    """The leading dims of a tensor a region may hold (rank >= 3, ints or names, known last dim)."""
    if not isinstance(t, gs.Variable) or t.shape is None or len(t.shape) < 3:
        return None
    shape = list(t.shape)
    if not isinstance(shape[-1], int) or shape[-1] <= 0:
        return None
    lead = shape[:-1]
    if any(not (isinstance(d, int) and d > 0) and not (isinstance(d, str) and d) for d in lead):
        return None  # unknown dims: two tensors could not be told to have the same rows
    return tuple(lead)


def _column_constant(t: object, rank: int, width: int) -> bool:
    """A constant that varies along the last axis only (broadcasts the same per row)."""
    if not isinstance(t, gs.Constant):
        return False
    shape = np.asarray(t.values).shape
    return (len(shape) <= rank and all(d == 1 for d in shape[:-1])
            and (not shape or shape[-1] in (1, width)))


def _axes(node: gs.Node) -> list[int] | None:
    """A reduction's axes (attribute, or constant second input); None when not known."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.asarray(node.inputs[1].values).reshape(-1)]
    return None


def _row_wise(node: gs.Node, opset: int) -> str | None:
    """Why ``node`` cannot be part of a region; None when it can."""
    if not node.outputs or not node.inputs:
        return "no inputs or outputs"
    y = node.outputs[0]
    rows = _rows(y)
    if rows is None:
        return "output is not rank >= 3 with known rows"
    rank = len(rows) + 1
    if node.op == "MatMul":
        w = node.inputs[1] if len(node.inputs) == 2 else None
        if not isinstance(w, gs.Constant) or np.asarray(w.values).ndim != 2 or _rows(node.inputs[0]) != rows:
            return "MatMul is not by a 2-D constant"
        return None
    if node.op in UNARY:
        if _rows(node.inputs[0]) != rows:
            return "input has other rows"
        if any(isinstance(t, gs.Variable) for t in node.inputs[1:]):
            return "bounds are not constants"
        return None
    if node.op in BINARY:
        for t in node.inputs:
            if isinstance(t, gs.Variable):
                if _rows(t) != rows:
                    return "an input has other rows"
            elif not _column_constant(t, rank, y.shape[-1]):
                return "a constant varies along other axes than the last"
        return None
    if node.op in LAST_AXIS:
        # Softmax/LogSoftmax before opset 13 default to axis 1 (and flatten from it): only the last is row-wise
        default = 1 if node.op != "LayerNormalization" and opset < 13 else -1
        axis = int(node.attrs.get("axis", default))
        if axis not in (-1, rank - 1) or _rows(node.inputs[0]) != rows:
            return "not over the last axis"
        if any(t.outputs for t in node.outputs[1:]):
            return "statistics outputs are read"
        if any(isinstance(t, gs.Variable) for t in node.inputs[1:]):
            return "scale or bias is not a constant"
        return None
    if node.op in REDUCE:
        if _axes(node) not in ([-1], [rank - 1]) or int(node.attrs.get("keepdims", 1)) != 1:
            return "not a keep-dims reduction over the last axis"
        if _rows(node.inputs[0]) != rows:
            return "input has other rows"
        return None
    return f"{node.op} is not a row-wise op"


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, x in enumerate(node.inputs):
        if x is old:
            node.inputs[i] = new


# ops through which a Reshape target carries only what flows into them: dims read by Shape (> 0 for a
# non-empty tensor) and constants; no arithmetic that could make a 0 (a 0 would copy an input dim)
_TARGET_FLOW = frozenset({"Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Cast", "Identity"})


def _no_copied_dims(t: gs.Tensor, depth: int = 0) -> bool:
    """Whether a Reshape target holds no 0 (constant without zeros, or built from Shape dims and such)."""
    if isinstance(t, gs.Constant):
        return not np.any(np.asarray(t.values) == 0)
    if depth > 8 or not t.inputs:
        return False
    node = t.inputs[0]
    if node.op == "Shape":
        return True
    if node.op not in _TARGET_FLOW:
        return False
    values = node.inputs if node.op == "Concat" else node.inputs[:1]
    return all(_no_copied_dims(x, depth + 1) for x in values)


def _reshape_reader(node: gs.Node, t: gs.Tensor) -> bool:
    """A Reshape of ``t`` whose result depends only on its element count: it can read the rank-2 tensor."""
    if node.op != "Reshape" or len(node.inputs) != 2 or node.inputs[0] is not t:
        return False
    return int(node.attrs.get("allowzero", 0)) == 1 or _no_copied_dims(node.inputs[1])


def _leading_dims_reader(node: gs.Node, rank: int) -> bool:
    """A Shape read only at leading dims (Gather of constant indices < rank - 1): any same-rows tensor will do."""
    if node.op != "Shape" or "start" in node.attrs or "end" in node.attrs:
        return False
    for c in node.outputs[0].outputs:
        if c.op != "Gather" or int(c.attrs.get("axis", 0)) != 0 or not isinstance(c.inputs[1], gs.Constant):
            return False
        idx = np.asarray(c.inputs[1].values).reshape(-1)
        if idx.size == 0 or np.any((idx >= rank - 1) | (idx < -rank) | (idx == -1)):
            return False
    return bool(node.outputs[0].outputs)


@dataclasses.dataclass
class _Plan:
    """What rewriting one region takes (see ``FlattenTokens._plan``)."""

    entries: list[tuple[gs.Variable, bool]]  # (tensor, its producing Reshape takes [-1, d] in place)
    exits: list[tuple[gs.Variable, list[gs.Node], list[gs.Node]]]  # (tensor, readers needing rank 3, Shape readers)
    reference: gs.Variable | None  # a rank >= 3 entry of the same rows, for Shape readers and dynamic targets
    dynamic: bool  # more than one dynamic leading dim: the way back is built from Shape(reference)
    cost: int  # nodes added


class FlattenTokens:
    """Flatten the rows of token-wise regions to rank 2 (module docstring).

    Args:
        min_layers: dense layers with a constant bias a region needs before it is rewritten.
        skip: MatMuls not to count as gains (``quantize`` passes its exclusions: they stay float).
    """

    name = "flatten_tokens"

    def __init__(self, min_layers: int = 2, skip: Callable[[gs.Node], bool] | None = None) -> None:
        self.min_layers = min_layers
        self.skip = skip

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every region that pays; counts ``regions``, ``layers`` and ``nodes_added``."""
        opset = int(getattr(graph, "opset", None) or 17)
        member = {id(n): n for n in graph.nodes if _row_wise(n, opset) is None}
        order = {id(n): i for i, n in enumerate(graph.nodes)}
        fresh = fresh_names(graph_names(graph))
        done = layers = added = 0
        for nodes in self._regions(graph, member):
            ids = {id(n) for n in nodes}
            gain = sum(1 for n in nodes if n.op == "MatMul" and constant_bias_add(n) is not None
                       and (self.skip is None or not self.skip(n)))
            plan = self._plan(graph, nodes, ids, order)
            if gain < self.min_layers or gain <= plan.cost:
                log.debug("flatten_tokens: region of %d nodes declined (%d layers, %d nodes to add)",
                          len(nodes), gain, plan.cost)
                continue
            added += self._rewrite(graph, nodes, ids, plan, fresh)
            done += 1
            layers += gain
        if done:
            graph.cleanup().toposort()
        return PassResult(graph, done > 0, {"regions": done, "layers": layers, "nodes_added": added})

    @staticmethod
    def _regions(graph: gs.Graph, member: dict[int, gs.Node]) -> list[list[gs.Node]]:
        """Connected groups of member nodes (joined by a tensor one produces and another reads)."""
        parent = {k: k for k in member}

        def find(k: int) -> int:
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        for node in member.values():
            for t in node.inputs:
                if not isinstance(t, gs.Variable):
                    continue
                # joined through a tensor one member produces, or an entry two members read
                for other in [*t.inputs, *t.outputs]:
                    if id(other) in member and other is not node:
                        parent[find(id(other))] = find(id(node))
        groups: dict[int, list[gs.Node]] = {}
        for node in graph.nodes:
            if id(node) in member:
                groups.setdefault(find(id(node)), []).append(node)
        return list(groups.values())

    @staticmethod
    def _plan(graph: gs.Graph, nodes: list[gs.Node], ids: set[int], order: dict[int, int]) -> _Plan:
        """Entries, exits, what the way back needs and how many nodes the rewrite adds."""
        outputs = {id(t) for t in graph.outputs}
        lead = _rows(nodes[0].outputs[0])
        rank = len(lead) + 1
        dynamic = sum(not isinstance(d, int) for d in lead) > 1
        entries: dict[int, tuple[gs.Variable, bool]] = {}
        exits = []
        for node in nodes:
            for t in node.inputs:
                if isinstance(t, gs.Variable) and id(t) not in entries and not (t.inputs and id(t.inputs[0]) in ids):
                    # a Reshape made it and only members read it: that Reshape can target [-1, d] itself
                    in_place = (bool(t.inputs) and t.inputs[0].op == "Reshape" and id(t) not in outputs
                                and all(id(c) in ids for c in t.outputs))
                    entries[id(t)] = (t, in_place)
            t = node.outputs[0]
            outside = [c for c in t.outputs if id(c) not in ids]
            shapes = [c for c in outside if _leading_dims_reader(c, rank)]
            need = [c for c in outside if c not in shapes and not _reshape_reader(c, t)]
            if need or shapes or id(t) in outputs:
                exits.append((t, need, shapes))
        backs = [t for t, need, _ in exits if need or id(t) in outputs]
        need_reference = any(shapes for _, _, shapes in exits) or (dynamic and backs)
        reference = None
        if need_reference:
            first = min(entries.values(), key=lambda e: order.get(id(e[0].inputs[0]), -1) if e[0].inputs else -1)
            reference = first[0]
            entries[id(reference)] = (reference, False)  # it must stay rank 3
        cost = sum(not in_place for _, in_place in entries.values()) + len(backs)
        if dynamic and backs:
            cost += 2 + len({int(t.shape[-1]) for t in backs})  # Shape, Gather, a Concat per width
        return _Plan(list(entries.values()), exits, reference, dynamic, cost)

    @staticmethod
    def _rewrite(graph: gs.Graph, nodes: list[gs.Node], ids: set[int], plan: _Plan, fresh) -> int:
        added = 0
        width = {}  # id(tensor) -> last dim, read before any shape changes
        for node in nodes:
            for t in list(node.inputs) + list(node.outputs[:1]):
                if isinstance(t, gs.Variable):
                    width[id(t)] = int(t.shape[-1])
        for t, in_place in plan.entries:
            d = width[id(t)]
            flat_shape = gs.Constant(fresh(f"{t.name}_rows_shape"), np.array([-1, d], np.int64))
            if in_place:
                t.inputs[0].inputs[1] = flat_shape
                t.shape = [None, d]
                continue
            flat = gs.Variable(fresh(f"{t.name}_rows"), dtype=t.dtype, shape=[None, d])
            graph.nodes.append(gs.Node("Reshape", fresh(f"{t.name}_to_rows"), inputs=[t, flat_shape], outputs=[flat]))
            added += 1
            for c in list(t.outputs):
                if id(c) in ids:
                    _replace_input(c, t, flat)
        shapes = {id(t): list(t.shape) for t, _, _ in plan.exits}
        for node in nodes:
            y = node.outputs[0]
            y.shape = [None, width[id(y)]]
            FlattenTokens._fit_node(node, fresh)
        graph_outputs = {id(t): i for i, t in enumerate(graph.outputs)}
        leading: gs.Variable | None = None
        targets: dict[int, gs.Tensor] = {}
        for t, need, shape_readers in plan.exits:
            for c in shape_readers:
                _replace_input(c, t, plan.reference)
            if not need and id(t) not in graph_outputs:
                continue  # read only by Reshapes that need no input dims, and by Shapes now of the reference
            shape, d = shapes[id(t)], width[id(t)]
            if d not in targets:
                if not plan.dynamic:
                    targets[d] = gs.Constant(fresh(f"{t.name}_tokens_shape"),
                                             np.array([x if isinstance(x, int) else -1 for x in shape], np.int64))
                else:
                    if leading is None:  # Shape(reference)[:-1], once per region
                        dims = gs.Variable(fresh(f"{plan.reference.name}_shape"), dtype=np.int64)
                        leading = gs.Variable(fresh(f"{plan.reference.name}_leading"), dtype=np.int64)
                        idx = gs.Constant(fresh(f"{plan.reference.name}_leading_idx"),
                                          np.arange(len(shape) - 1, dtype=np.int64))
                        graph.nodes += [gs.Node("Shape", fresh(f"{plan.reference.name}_shape"),
                                                inputs=[plan.reference], outputs=[dims]),
                                        gs.Node("Gather", fresh(f"{plan.reference.name}_leading"),
                                                inputs=[dims, idx], outputs=[leading], attrs={"axis": 0})]
                        added += 2
                    targets[d] = gs.Variable(fresh(f"tokens_{d}_shape"), dtype=np.int64)
                    graph.nodes.append(gs.Node("Concat", fresh(f"tokens_{d}_shape"), attrs={"axis": 0},
                                               inputs=[leading, gs.Constant(fresh(f"width_{d}"),
                                                                            np.array([d], np.int64))],
                                               outputs=[targets[d]]))
                    added += 1
            if id(t) in graph_outputs:
                name = t.name
                t.name = fresh(f"{name}_rows")
                out = gs.Variable(name, dtype=t.dtype, shape=shape)
                graph.outputs[graph_outputs[id(t)]] = out
            else:
                out = gs.Variable(fresh(f"{t.name}_tokens"), dtype=t.dtype, shape=shape)
            graph.nodes.append(gs.Node("Reshape", fresh(f"{t.name}_to_tokens"), inputs=[t, targets[d]], outputs=[out]))
            added += 1
            for c in need:
                _replace_input(c, t, out)
        return added

    @staticmethod
    def _fit_node(node: gs.Node, fresh) -> None:
        """Make a member's attributes and constants fit rank-2 inputs."""
        if node.op in LAST_AXIS:
            node.attrs["axis"] = -1
        elif node.op in REDUCE:
            if "axes" in node.attrs:
                node.attrs["axes"] = [-1]
            else:
                node.inputs[1] = gs.Constant(fresh(f"{node.name}_axes"), np.array([-1], np.int64))
        elif node.op in BINARY:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and np.asarray(t.values).ndim > 1:
                    values = np.asarray(t.values)
                    node.inputs[i] = gs.Constant(fresh(f"{t.name}_row"), values.reshape(values.shape[-1:]))
