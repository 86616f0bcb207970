"""Channel dependency analysis: which channels of which tensors must be removed together.

Every Conv / ConvTranspose / Gemm / MatMul with a constant weight *opens a space* of output
channels; each channel gets an integer id. Walking the graph in topological order, every tensor
that carries such channels gets a *layout*: the channel axis and, for each position along it, the id
of the channel it carries (and, when known, the constant value it holds)::

    conv1 -> c1 ids [0 1 2 3]        conv2 -> c2 ids [4 5 6 7]
    Add(c1, c2)        ->  ids [0 1 2 3], and union(0,4) union(1,5) ...   (residual: coupled)
    Concat(c1, c2)     ->  ids [0 1 2 3 4 5 6 7]                          (offsets into the consumer)
    Slice(c2, 1:3)     ->  ids [5 6]                                       (starts/ends rewritten later)
    Flatten([N,4,2,2]) ->  ids [0 0 0 0 1 1 1 1 ...]                      (a channel is a block of features)

Channels joined by a union-find over ids form a *unit*: removing a unit deletes, for each id in it,
the producer's output row (W[o], b[o]), every per-channel parameter along the way (BatchNorm,
per-channel Mul/Add constants, depthwise conv filters) and the matching input slice of every
consumer (Conv W[:, c], Gemm/MatMul rows). A *group* is the set of spaces linked by units (a
residual stage, or one conv's outputs).

A depthwise conv (group = channels, multiplier 1) passes channels through (its filters, bias and
``group`` follow them); any other grouped conv freezes its input channels and opens no space for its
outputs, since removing one would unbalance the groups.

An op the analysis does not understand freezes every unit that reaches it (the group keeps those
channels and the reason is reported); so does a tensor that is a graph output. The analysis only
reads the graph; :func:`remove_units` performs the edits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.model_io import is_large, shape_only_copy
from onnxpress.passes.base import unique_name

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "Consumer",
    "Layout",
    "ParamSlice",
    "Source",
    "analyze_channels",
    "remove_units",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Layout:
    """Channels carried by one tensor: ``ids[p]`` is the channel at position ``p`` of ``axis``.

    ``values[p]`` is the constant that position holds for every input (NaN when not provably constant).
    """

    axis: int
    rank: int
    ids: np.ndarray
    values: np.ndarray

    def with_axis(self, axis: int, rank: int) -> Layout:
        """Same channels on another axis/rank (Transpose, Squeeze, ...)."""
        return Layout(axis, rank, self.ids, self.values)


@dataclasses.dataclass(frozen=True)
class Source:
    """A node whose output channels open a space: W's ``weight_axis`` indexes output channels."""

    node: gs.Node
    weight_axis: int
    bias_index: int | None
    ids: np.ndarray
    out_axis: int


@dataclasses.dataclass(frozen=True)
class ParamSlice:
    """A constant input of ``node`` sliced along ``axis`` when channels go (BN, per-channel Mul, depthwise W)."""

    node: gs.Node
    input_index: int
    axis: int
    ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A node that reduces over the channels of its input (Conv/Gemm/MatMul/ConvTranspose).

    ``weight_zero[p]`` says the weight slice of position ``p`` is all zero; ``fold_exact`` says a
    constant input channel can be folded into the bias exactly (no zero padding in the window).
    """

    node: gs.Node
    kind: str
    tensor: str
    weight_axis: int
    ids: np.ndarray
    values: np.ndarray
    weight_zero: np.ndarray
    fold_exact: bool
    axis: int


@dataclasses.dataclass(frozen=True)
class _Rewrite:
    kind: str  # "reshape" | "split" | "slice" | "group"
    node: gs.Node
    layout: Layout
    extra: tuple = ()


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Spaces whose channels are coupled; ``units`` are the removable unit roots in it."""

    name: str
    sources: tuple[int, ...]
    units: tuple[int, ...]
    frozen: tuple[str, ...]

    @property
    def is_frozen(self) -> bool:
        """Whether some of the group's units are frozen (reason in ``frozen``)."""
        return bool(self.frozen)


class ChannelAnalysis:
    """Result of :func:`analyze_channels`: layouts, edits to make, units, groups and frozen reasons."""

    def __init__(self) -> None:
        """Empty analysis (filled by the walker)."""
        self.parent: list[int] = []
        self.id_source: list[int] = []
        self.layouts: dict[str, Layout] = {}
        self.sources: list[Source] = []
        self.params: list[ParamSlice] = []
        self.consumers: list[Consumer] = []
        self.rewrites: list[_Rewrite] = []
        self.frozen_ids: dict[int, str] = {}
        self.declined: list[str] = []

    # ---- union-find -------------------------------------------------------------------------
    def new_ids(self, n: int, source: int) -> np.ndarray:
        """Allocate ``n`` fresh channel ids belonging to source ``source``."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.id_source.extend([source] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        """Root of id ``i`` (path halving)."""
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        """Couple channels ``a`` and ``b``."""
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """Unit root of every id in ``ids``."""
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))

    # ---- results ------------------------------------------------------------------------------
    def frozen_units(self) -> dict[int, str]:
        """Unit root -> reason it may not be removed."""
        out: dict[int, str] = {}
        for i, why in self.frozen_ids.items():
            out.setdefault(self.find(i), why)
        return out

    def unit_members(self) -> dict[int, np.ndarray]:
        """Unit root -> the channel ids in it."""
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return {r: np.asarray(m, dtype=np.int64) for r, m in members.items()}

    def groups(self) -> list[ChannelGroup]:
        """Groups of coupled spaces, each with its units and the reasons some are frozen."""
        n = len(self.sources)
        sp = list(range(n))

        def sfind(i: int) -> int:
            while sp[i] != i:
                sp[i] = sp[sp[i]]
                i = sp[i]
            return i

        members = self.unit_members()
        for ids in members.values():
            srcs = {self.id_source[int(i)] for i in ids}
            first = min(srcs)
            for s in srcs:
                a, b = sfind(first), sfind(s)
                if a != b:
                    sp[max(a, b)] = min(a, b)
        frozen = self.frozen_units()
        by_group: dict[int, list[int]] = {}
        for root, ids in members.items():
            by_group.setdefault(sfind(self.id_source[int(ids[0])]), []).append(root)
        groups = []
        for g in sorted(by_group):
            srcs = tuple(s for s in range(n) if sfind(s) == g)
            units = tuple(sorted(by_group[g]))
            reasons = tuple(sorted({frozen[u] for u in units if u in frozen}))
            groups.append(ChannelGroup(_node_name(self.sources[srcs[0]].node), srcs, units, reasons))
        return groups

    def unit_consumer_positions(self) -> dict[int, list[tuple[Consumer, int]]]:
        """Unit root -> (consumer, position) pairs it feeds."""
        out: dict[int, list[tuple[Consumer, int]]] = {}
        for c in self.consumers:
            for p, r in enumerate(self.roots(c.ids)):
                out.setdefault(int(r), []).append((c, p))
        return out

    def zero_removable(self) -> tuple[set[int], dict[int, str]]:
        """Units whose removal is exact, and, for the others that hold constants, why they stay.

        A unit is removable when it is not frozen and at every consumer position it feeds either the
        consumer's weight slice is zero, the value is provably 0, or it is a known constant that the
        consumer can fold into its bias exactly.
        """
        frozen = self.frozen_units()
        members = self.unit_members()
        positions = self.unit_consumer_positions()
        removable, kept = set(), {}
        for root in members:
            if root in frozen:
                continue
            ok, why = True, ""
            for c, p in positions.get(root, ()):
                v = c.values[p]
                if c.weight_zero[p] or v == 0.0:
                    continue
                if not math.isfinite(v):
                    ok = False
                    break
                if not c.fold_exact:
                    where = "with zero padding" if c.kind == "Conv" else "without a bias to fold it into"
                    ok, why = False, f"constant channel into {c.kind} {_node_name(c.node)} {where}"
                    break
            if ok:
                removable.add(root)
            elif why:
                kept[root] = why
        return removable, kept


def _node_name(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def _const(t: object) -> bool:
    return isinstance(t, gs.Constant)


def _present(node: gs.Node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None and bool(node.inputs[i].name)


def _infer_shapes(graph: gs.Graph) -> dict[str, tuple[int | None, ...] | None]:
    """Tensor name -> shape (None dims for symbolic) from onnx shape inference on an export."""
    shapes: dict[str, tuple[int | None, ...] | None] = {}
    for t in graph.tensors().values():
        if t.shape is not None:
            shapes[t.name] = tuple(d if isinstance(d, int) and d >= 0 else None for d in t.shape)
    try:
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        model = shape_only_copy(model) if is_large(model) else model  # over 2 GiB: without its weights
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort; unknown shapes freeze the affected groups
        log.debug("shape inference failed: %s", exc)
        return shapes
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return shapes


_UNARY: dict[str, Callable[[np.ndarray, gs.Node], np.ndarray] | None] = {
    "Relu": lambda v, n: np.maximum(v, 0.0),
    "LeakyRelu": lambda v, n: np.where(v >= 0, v, v * float(n.attrs.get("alpha", 0.01))),
    "Sigmoid": lambda v, n: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": lambda v, n: np.tanh(v),
    "HardSigmoid": lambda v, n: np.clip(float(n.attrs.get("alpha", 0.2)) * v + float(n.attrs.get("beta", 0.5)), 0, 1),
    "HardSwish": lambda v, n: v * np.clip(v / 6.0 + 0.5, 0, 1),
    "Identity": lambda v, n: v,
    "Dropout": lambda v, n: v,
    "Neg": lambda v, n: -v,
    "Abs": lambda v, n: np.abs(v),
    "Softplus": lambda v, n: np.log1p(np.exp(v)),
    "Elu": lambda v, n: np.where(v >= 0, v, float(n.attrs.get("alpha", 1.0)) * np.expm1(v)),
    "Gelu": lambda v, n: 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))
    if n.attrs.get("approximate", "none") == "none" else np.where(v == 0, 0.0, np.nan),
    "Erf": lambda v, n: np.vectorize(math.erf)(v) if v.size else v,
    "Sqrt": lambda v, n: np.sqrt(v),
    "Exp": lambda v, n: np.exp(v),
    "Cast": None,
    "Mish": lambda v, n: v * np.tanh(np.log1p(np.exp(v))),
    "Selu": lambda v, n: float(n.attrs.get("gamma", 1.0507))
    * np.where(v > 0, v, float(n.attrs.get("alpha", 1.67326)) * np.expm1(v)),
}

_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Max": np.maximum,
    "Min": np.minimum,
}

_POOL = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum")


class _Walker:
    """Forward walk in topological order that fills a :class:`ChannelAnalysis`."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.a = ChannelAnalysis()
        self.shapes = _infer_shapes(graph)

    # ---- helpers ----------------------------------------------------------------------------
    def lay(self, t: gs.Tensor | None) -> Layout | None:
        if t is None or not t.name or isinstance(t, gs.Constant):
            return None
        return self.a.layouts.get(t.name)

    def set(self, t: gs.Tensor, layout: Layout) -> None:
        self.a.layouts[t.name] = layout

    def freeze(self, layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for i in np.unique(layout.ids):
            self.a.frozen_ids.setdefault(int(i), reason)

    def freeze_inputs(self, node: gs.Node, reason: str, skip: Collection[int] = ()) -> None:
        for i, t in enumerate(node.inputs):
            if i not in skip:
                lay = self.lay(t)
                if lay is not None:
                    self.freeze(lay, f"{reason} ({node.op} {_node_name(node)})")

    def shape(self, t: gs.Tensor) -> tuple[int | None, ...] | None:
        if isinstance(t, gs.Constant):
            return tuple(t.values.shape)
        return self.shapes.get(t.name)

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def const_ints(self, node: gs.Node, index: int, attr: str) -> list[int] | None:
        """An int list given as constant input ``index`` (newer opsets) or attribute ``attr``."""
        if _present(node, index):
            t = node.inputs[index]
            return [int(v) for v in np.asarray(t.values).reshape(-1)] if _const(t) else None
        value = node.attrs.get(attr)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    # ---- walk ---------------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        for node in self.graph.toposort().nodes:
            self.node(node)
        for t in self.graph.outputs:
            self.freeze(self.lay(t), "reaches graph output " + t.name)
        return self.a

    def node(self, node: gs.Node) -> None:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                self.freeze_subgraph_uses(value, node)
        if node.domain not in (None, "", "ai.onnx"):
            self.freeze_inputs(node, "custom-domain op")
            return
        op = node.op
        handler = getattr(self, f"op_{op}", None)
        if handler is not None:
            handler(node)
        elif op in _UNARY:
            self.unary(node)
        elif op in _BINARY:
            self.binary(node)
        elif op in _POOL:
            self.pool(node)
        elif op in _REDUCE:
            self.reduce(node)
        else:
            self.freeze_inputs(node, "op not understood")

    def freeze_subgraph_uses(self, sub: gs.Graph, node: gs.Node) -> None:
        for inner in sub.nodes:
            for t in inner.inputs:
                self.freeze(self.lay(t), f"used inside a subgraph of {node.op} {_node_name(node)}")
            for value in inner.attrs.values():
                if isinstance(value, gs.Graph):
                    self.freeze_subgraph_uses(value, node)

    # ---- sources and consumers ----------------------------------------------------------------
    def open_source(self, node: gs.Node, weight_axis: int, bias_index: int | None, out_axis: int) -> None:
        """Give the node's output a fresh space of channels (if its weights may be edited)."""
        out = node.outputs[0]
        w = node.inputs[1]
        rank = self.rank(out)
        if rank is None or len(w.outputs) != 1 or len(node.outputs) != 1:
            return
        if bias_index is not None and _present(node, bias_index):
            b = node.inputs[bias_index]
            if not _const(b) or len(b.outputs) != 1:
                return
        wv = np.asarray(w.values, dtype=np.float64)
        n = wv.shape[weight_axis]
        ids = self.a.new_ids(n, len(self.a.sources))
        moved = np.moveaxis(wv, weight_axis, 0).reshape(n, -1)
        zero_rows = ~moved.any(axis=1)
        bias = np.zeros(n)
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if bias_index is not None and _present(node, bias_index):
            bv = np.asarray(node.inputs[bias_index].values, dtype=np.float64)
            if bv.size not in (1, n):
                return
            bias = np.broadcast_to(bv.reshape(-1), (n,)) * scale
        values = np.where(zero_rows, bias, np.nan)
        self.a.sources.append(Source(node, weight_axis, bias_index, ids, out_axis % rank))
        self.set(out, Layout(out_axis % rank, rank, ids, values))

    def add_consumer(self, node: gs.Node, kind: str, x: Layout, weight_axis: int, fold_exact: bool) -> bool:
        w = node.inputs[1]
        if not _const(w) or len(w.outputs) != 1:
            self.freeze(x, f"weight of {node.op} {_node_name(node)} is shared or not constant")
            return False
        wv = np.asarray(w.values)
        if wv.shape[weight_axis] != len(x.ids):
            self.freeze(x, f"{node.op} {_node_name(node)} weight does not match the channels")
            return False
        moved = np.moveaxis(wv, weight_axis, 0).reshape(len(x.ids), -1)
        self.a.consumers.append(
            Consumer(
                node, kind, node.inputs[0].name, weight_axis, x.ids, x.values, ~moved.any(axis=1), fold_exact, x.axis
            )
        )
        return True

    def op_Conv(self, node: gs.Node) -> None:  # noqa: N802
        self.freeze_inputs(node, "Conv weight/bias is computed", skip=(0,))
        x = self.lay(node.inputs[0])
        w = node.inputs[1]
        if not _const(w) or (_present(node, 2) and not _const(node.inputs[2])):
            self.freeze(x, f"Conv {_node_name(node)} has non-constant weights")
            self.a.declined.append(f"Conv {_node_name(node)}: weights are computed (fold constants first)")
            return
        group = int(node.attrs.get("group", 1))
        cout, cin_g = w.values.shape[:2]
        if group == 1:
            if x is not None:
                if x.axis != 1:
                    self.freeze(x, f"channels on axis {x.axis} enter Conv {_node_name(node)}")
                else:
                    self.add_consumer(node, "Conv", x, 1, _no_pad(node))
            self.open_source(node, 0, 2, 1)
        elif x is not None and x.axis == 1 and cin_g == 1 and group == cout == len(x.ids):
            self.depthwise(node, x)
        elif x is not None:
            self.freeze(x, f"grouped Conv {_node_name(node)} (group={group}) is not pruned")

    def depthwise(self, node: gs.Node, x: Layout) -> None:
        """Depthwise conv (multiplier 1): channel c in -> channel c out; filters follow the channels."""
        w = node.inputs[1]
        has_b = _present(node, 2)
        if len(w.outputs) != 1 or (has_b and len(node.inputs[2].outputs) != 1):
            self.freeze(x, f"depthwise Conv {_node_name(node)} shares its weights")
            return
        wv = np.asarray(w.values, dtype=np.float64).reshape(len(x.ids), -1)
        b = np.asarray(node.inputs[2].values, dtype=np.float64) if has_b else np.zeros(len(x.ids))
        wsum = wv.sum(axis=1)
        wzero = ~wv.any(axis=1)
        exact_const = _no_pad(node)
        values = np.where(wzero | (x.values == 0), b, np.where(exact_const, b + x.values * wsum, np.nan))
        self.a.params.append(ParamSlice(node, 1, 0, x.ids))
        if has_b:
            self.a.params.append(ParamSlice(node, 2, 0, x.ids))
        self.a.rewrites.append(_Rewrite("group", node, x))
        self.set(node.outputs[0], Layout(1, x.rank, x.ids, values))

    def op_ConvTranspose(self, node: gs.Node) -> None:  # noqa: N802
        self.freeze_inputs(node, "ConvTranspose weight/bias is computed", skip=(0,))
        x = self.lay(node.inputs[0])
        w = node.inputs[1]
        if not _const(w) or (_present(node, 2) and not _const(node.inputs[2])) or int(node.attrs.get("group", 1)) != 1:
            self.freeze(x, f"ConvTranspose {_node_name(node)} is grouped or has non-constant weights")
            return
        if x is not None:
            if x.axis != 1:
                self.freeze(x, f"channels on axis {x.axis} enter ConvTranspose {_node_name(node)}")
            else:
                self.add_consumer(node, "ConvTranspose", x, 0, False)
        self.open_source(node, 1, 2, 1)

    def op_Gemm(self, node: gs.Node) -> None:  # noqa: N802
        self.freeze_inputs(node, "Gemm B/C is computed", skip=(0,))
        x = self.lay(node.inputs[0])
        w = node.inputs[1]
        trans_b = int(node.attrs.get("transB", 0))
        if not _const(w) or (_present(node, 2) and not _const(node.inputs[2])):
            self.freeze(x, f"Gemm {_node_name(node)} has non-constant B or C")
            self.a.declined.append(f"Gemm {_node_name(node)}: B or C is computed (fold constants first)")
            return
        if x is not None:
            if int(node.attrs.get("transA", 0)) or x.axis != 1:
                self.freeze(x, f"Gemm {_node_name(node)} reduces over axis 0 (transA)")
            else:
                self.add_consumer(node, "Gemm", x, 1 if trans_b else 0, True)
        if _present(node, 2) and np.asarray(node.inputs[2].values).ndim == 2 and node.inputs[2].values.shape[0] != 1:
            return  # C varies per row: leave the outputs alone
        self.open_source(node, 0 if trans_b else 1, 2, 1)

    def op_MatMul(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        w = node.inputs[1]
        if not _const(w) or np.asarray(w.values).ndim != 2:
            self.freeze_inputs(node, "MatMul of two computed tensors")
            return
        if x is not None:
            if x.axis != x.rank - 1:
                self.freeze(x, f"channels on axis {x.axis} enter MatMul {_node_name(node)}")
            else:
                self.add_consumer(node, "MatMul", x, 0, _matmul_bias(node) is not None)
        self.open_source(node, 1, None, -1)

    # ---- channel-preserving ops -------------------------------------------------------------
    def unary(self, node: gs.Node) -> None:
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "computed operand", skip=(0,))
        if x is None:
            return
        fn = _UNARY[node.op]
        with np.errstate(all="ignore"):
            values = fn(x.values, node) if fn is not None else np.full_like(x.values, np.nan)
        self.set(node.outputs[0], Layout(x.axis, x.rank, x.ids, np.asarray(values, dtype=np.float64)))

    def op_Clip(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "Clip bound is computed", skip=(0,))
        if x is None:
            return
        lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
        for i, name in ((1, "lo"), (2, "hi")):
            if _present(node, i):
                t = node.inputs[i]
                if not _const(t):
                    self.freeze(x, f"Clip {_node_name(node)} has a computed bound")
                    return
                if name == "lo":
                    lo = float(np.asarray(t.values))
                else:
                    hi = float(np.asarray(t.values))
        self.set(node.outputs[0], Layout(x.axis, x.rank, x.ids, np.clip(x.values, lo, hi)))

    def op_BatchNormalization(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "BatchNormalization parameter is computed", skip=(0,))
        if x is None:
            return
        params = node.inputs[1:5]
        if x.axis != 1 or len(node.outputs) != 1 or int(node.attrs.get("training_mode", 0)):
            self.freeze(x, f"BatchNormalization {_node_name(node)} in training mode or on another axis")
            return
        if not all(_const(p) and np.asarray(p.values).shape == (len(x.ids),) for p in params):
            self.freeze(x, f"BatchNormalization {_node_name(node)} has non-constant or odd-shaped parameters")
            return
        if any(len(p.outputs) != 1 for p in params):  # slicing one reader's copy would add parameters
            self.freeze(x, f"BatchNormalization {_node_name(node)} shares its parameters with another node")
            return
        gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64) for p in params)
        eps = float(node.attrs.get("epsilon", 1e-5))
        values = gamma * (x.values - mean) / np.sqrt(var + eps) + beta
        for i in range(1, 5):
            self.a.params.append(ParamSlice(node, i, 0, x.ids))
        self.set(node.outputs[0], Layout(1, x.rank, x.ids, values))

    def binary(self, node: gs.Node) -> None:
        if len(node.inputs) != 2:  # Max/Min are variadic
            self.freeze_inputs(node, f"{len(node.inputs)}-input {node.op}")
            return
        a_t, b_t = node.inputs[0], node.inputs[1]
        la, lb = self.lay(a_t), self.lay(b_t)
        out = node.outputs[0]
        fn = _BINARY[node.op]
        if la is None and lb is None:
            return
        if la is not None and lb is not None:
            if la.rank != lb.rank or la.axis != lb.axis:
                self.freeze(la, f"{node.op} {_node_name(node)} mixes channel axes")
                self.freeze(lb, f"{node.op} {_node_name(node)} mixes channel axes")
                return
            if len(la.ids) == len(lb.ids):
                for i, j in zip(la.ids, lb.ids, strict=True):
                    self.a.union(i, j)
                with np.errstate(all="ignore"):
                    values = fn(la.values, lb.values)
                if node.op == "Mul":
                    values = np.where((la.values == 0) | (lb.values == 0), 0.0, values)
                self.set(out, Layout(la.axis, la.rank, la.ids, values))
                return
            big, small = (la, lb) if len(lb.ids) == 1 else (lb, la) if len(la.ids) == 1 else (None, None)
            if big is None:
                self.freeze(la, f"{node.op} {_node_name(node)} has mismatched channels")
                self.freeze(lb, f"{node.op} {_node_name(node)} has mismatched channels")
                return
            self.freeze(small, f"single channel broadcast in {node.op} {_node_name(node)}")
            self.set(out, Layout(big.axis, big.rank, big.ids, np.full(len(big.ids), np.nan)))
            return
        lay, index = (la, 0) if la is not None else (lb, 1)
        other = node.inputs[1 - index]
        shape = self.shape(other)
        if shape is None or len(shape) > lay.rank:
            self.freeze(lay, f"{node.op} {_node_name(node)} broadcasts to a higher rank")
            return
        ax = lay.axis - (lay.rank - len(shape))
        n = len(lay.ids)
        if _const(other):
            c = np.asarray(other.values, dtype=np.float64)
            if ax >= 0 and c.shape[ax] not in (1, n):
                self.freeze(lay, f"{node.op} {_node_name(node)} constant does not match the channels")
                return
            if ax >= 0 and c.shape[ax] == n and n > 1:
                if len(other.outputs) != 1:  # a sliced copy beside the kept original adds parameters
                    self.freeze(lay, f"{node.op} {_node_name(node)} shares its per-channel constant {other.name!r}")
                    return
                self.a.params.append(ParamSlice(node, 1 - index, ax, lay.ids))
            per_channel = all(d == 1 for k, d in enumerate(c.shape) if k != ax) and c.size in (1, n)
            cvec = np.broadcast_to(c.reshape(-1), (n,)) if per_channel else None
            with np.errstate(all="ignore"):
                if cvec is None:
                    values = np.where((lay.values == 0) & (node.op == "Mul"), 0.0, np.nan)
                else:
                    values = fn(lay.values, cvec) if index == 0 else fn(cvec, lay.values)
            self.set(out, Layout(lay.axis, lay.rank, lay.ids, np.asarray(values, dtype=np.float64)))
            return
        if ax >= 0 and shape[ax] != 1:
            self.freeze(lay, f"{node.op} {_node_name(node)} combines the channels with an unpruned tensor")
            return
        values = np.where((lay.values == 0) & (node.op == "Mul"), 0.0, np.nan)
        self.set(out, Layout(lay.axis, lay.rank, lay.ids, values))

    def pool(self, node: gs.Node) -> None:
        x = self.lay(node.inputs[0])
        if x is None:
            return
        if x.axis != 1 or len([o for o in node.outputs if o.name]) != 1:
            self.freeze(x, f"{node.op} {_node_name(node)} with indices or channels off axis 1")
            return
        values = x.values
        pads_count = node.op == "AveragePool" and int(node.attrs.get("count_include_pad", 0)) and not _no_pad(node)
        if node.op in ("LpPool", "GlobalLpPool") or pads_count:
            values = np.where(x.values == 0, 0.0, np.nan)
        self.set(node.outputs[0], Layout(1, x.rank, x.ids, values))

    def reduce(self, node: gs.Node) -> None:
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "reduce axes are computed", skip=(0,))
        if x is None:
            return
        axes = self.const_ints(node, 1, "axes")
        if axes is None or len(axes) == 0:
            self.freeze(x, f"{node.op} {_node_name(node)} reduces over the channels")
            return
        axes = [a % x.rank for a in axes]
        if x.axis in axes:
            self.freeze(x, f"{node.op} {_node_name(node)} reduces over the channels")
            return
        keep = int(node.attrs.get("keepdims", 1))
        axis = x.axis if keep else x.axis - sum(a < x.axis for a in axes)
        rank = x.rank if keep else x.rank - len(axes)
        values = x.values if node.op != "ReduceSum" else np.where(x.values == 0, 0.0, np.nan)
        self.set(node.outputs[0], Layout(axis, rank, x.ids, values))

    def op_Transpose(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        if x is None:
            return
        perm = list(node.attrs.get("perm", list(range(x.rank))[::-1]))
        self.set(node.outputs[0], x.with_axis(perm.index(x.axis), x.rank))

    def op_Squeeze(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "squeeze axes are computed", skip=(0,))
        if x is None:
            return
        axes = self.const_ints(node, 1, "axes")
        if axes is None:
            self.freeze(x, f"Squeeze {_node_name(node)} without constant axes")
            return
        axes = [a % x.rank for a in axes]
        if x.axis in axes:
            self.freeze(x, f"Squeeze {_node_name(node)} removes the channel axis")
            return
        self.set(node.outputs[0], x.with_axis(x.axis - sum(a < x.axis for a in axes), x.rank - len(axes)))

    def op_Unsqueeze(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "unsqueeze axes are computed", skip=(0,))
        if x is None:
            return
        axes = self.const_ints(node, 1, "axes")
        if axes is None:
            self.freeze(x, f"Unsqueeze {_node_name(node)} without constant axes")
            return
        rank = x.rank + len(axes)
        axes = sorted(a % rank for a in axes)
        axis = x.axis
        for a in axes:
            if a <= axis:
                axis += 1
        self.set(node.outputs[0], x.with_axis(axis, rank))

    def flatten_to(self, node: gs.Node, x: Layout, start: int) -> Layout | None:
        """Layout after merging axes ``start..`` into one (channel must be inside, dims known)."""
        shape = self.shape(node.inputs[0])
        if shape is None or start > x.axis:
            return None
        inner = shape[x.axis + 1 :]
        outer = shape[start : x.axis]
        if any(d is None for d in inner) or any(d is None for d in outer):
            return None
        s, p = int(np.prod(inner, dtype=np.int64)), int(np.prod(outer, dtype=np.int64))
        ids = np.tile(np.repeat(x.ids, s), p)
        values = np.tile(np.repeat(x.values, s), p)
        return Layout(start, start + 1, ids, values)

    def op_Flatten(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        if x is None:
            return
        start = int(node.attrs.get("axis", 1)) % (x.rank + 1)
        out = self.flatten_to(node, x, start) if 0 < start <= x.axis else None
        if out is None:
            self.freeze(x, f"Flatten {_node_name(node)} does not keep the channels in a trailing block")
            return
        self.set(node.outputs[0], Layout(1, 2, out.ids, out.values))

    def op_Reshape(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "reshape target is computed", skip=(0,))
        if x is None:
            return
        target = node.inputs[1] if _present(node, 1) else None
        out_shape = self.shape(node.outputs[0])
        in_shape = self.shape(node.inputs[0])
        if not _const(target) or len(target.outputs) < 1 or out_shape is None or in_shape is None:
            self.freeze(x, f"Reshape {_node_name(node)} has a computed target or unknown shapes")
            return
        if len(out_shape) == x.axis + 1 and x.axis > 0 and tuple(out_shape[: x.axis]) == tuple(in_shape[: x.axis]):
            out = self.flatten_to(node, x, x.axis)
            if out is not None:
                self.a.rewrites.append(_Rewrite("reshape", node, out, (x.axis, len(out.ids))))
                self.set(node.outputs[0], Layout(x.axis, x.axis + 1, out.ids, out.values))
                return
        self.freeze(x, f"Reshape {_node_name(node)} splits or moves the channel axis")

    def op_Concat(self, node: gs.Node) -> None:  # noqa: N802
        lays = [self.lay(t) for t in node.inputs]
        present = [lay for lay in lays if lay is not None]
        if not present:
            return
        rank = present[0].rank
        axis = int(node.attrs["axis"]) % rank
        if any(lay is None for lay in lays) or any(lay.rank != rank or lay.axis != present[0].axis for lay in present):
            for lay in present:
                self.freeze(lay, f"Concat {_node_name(node)} joins the channels with unpruned tensors")
            return
        if axis == present[0].axis:
            ids = np.concatenate([lay.ids for lay in present])
            values = np.concatenate([lay.values for lay in present])
            self.set(node.outputs[0], Layout(axis, rank, ids, values))
            return
        if len({len(lay.ids) for lay in present}) != 1:
            for lay in present:
                self.freeze(lay, f"Concat {_node_name(node)} joins different channel counts")
            return
        for lay in present[1:]:
            for i, j in zip(present[0].ids, lay.ids, strict=True):
                self.a.union(i, j)
        same = np.all([lay.values == present[0].values for lay in present], axis=0)
        values = np.where(same, present[0].values, np.nan)
        self.set(node.outputs[0], Layout(present[0].axis, rank, present[0].ids, values))

    def op_Split(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "split sizes are computed", skip=(0,))
        if x is None:
            return
        axis = int(node.attrs.get("axis", 0)) % x.rank
        if axis != x.axis:
            for o in node.outputs:
                self.set(o, x)
            return
        sizes = self.const_ints(node, 1, "split")
        n = len(x.ids)
        if sizes is None:
            parts = len(node.outputs)
            if n % parts:
                self.freeze(x, f"Split {_node_name(node)} into uneven parts without sizes")
                return
            sizes = [n // parts] * parts
        if sum(sizes) != n or len(sizes) != len(node.outputs):
            self.freeze(x, f"Split {_node_name(node)} sizes do not match the channels")
            return
        self.a.rewrites.append(_Rewrite("split", node, x, tuple(sizes)))
        start = 0
        for o, size in zip(node.outputs, sizes, strict=True):
            sl = slice(start, start + size)
            self.set(o, Layout(x.axis, x.rank, x.ids[sl], x.values[sl]))
            start += size

    def op_Slice(self, node: gs.Node) -> None:  # noqa: N802
        x = self.lay(node.inputs[0])
        self.freeze_inputs(node, "slice bounds are computed", skip=(0,))
        if x is None:
            return
        if len(node.inputs) < 3 or not all(_const(t) for t in node.inputs[1:] if t is not None and t.name):
            self.freeze(x, f"Slice {_node_name(node)} has computed bounds")
            return
        starts, ends = (list(np.asarray(node.inputs[i].values).reshape(-1)) for i in (1, 2))
        axes = self.const_ints(node, 3, "__none__") or list(range(len(starts)))
        steps = self.const_ints(node, 4, "__none__") or [1] * len(starts)
        axes = [a % x.rank for a in axes]
        if x.axis not in axes:
            self.set(node.outputs[0], x)
            return
        k = axes.index(x.axis)
        if steps[k] != 1:
            self.freeze(x, f"Slice {_node_name(node)} steps over the channels")
            return
        lo, hi, _ = slice(int(starts[k]), int(ends[k])).indices(len(x.ids))
        hi = max(hi, lo)
        self.a.rewrites.append(_Rewrite("slice", node, x, (k, lo, hi)))
        self.set(node.outputs[0], Layout(x.axis, x.rank, x.ids[lo:hi], x.values[lo:hi]))


def _no_pad(node: gs.Node) -> bool:
    """True when every output window lies fully inside the input (no zero padding)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad == "VALID":
        return True
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = node.attrs.get("kernel_shape")
        if kernel is None and len(node.inputs) > 1 and _const(node.inputs[1]):
            kernel = node.inputs[1].values.shape[2:]
        return kernel is not None and all(int(k) == 1 for k in kernel)
    return not any(int(p) for p in node.attrs.get("pads", ()))


def _matmul_bias(node: gs.Node) -> tuple[gs.Node, int] | None:
    """The ``Add(MatMul(...), const)`` after a MatMul whose constant can absorb a folded term."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    index = 1 if add.inputs[0] is out else 0
    c = add.inputs[index]
    n = np.asarray(node.inputs[1].values).shape[1]
    if not _const(c) or c.values.shape[-1:] != (n,) or any(d != 1 for d in c.values.shape[:-1]):
        return None
    return add, index


def analyze_channels(graph: gs.Graph) -> ChannelAnalysis:
    """Walk ``graph`` and return its channel layouts, units, groups and the edits removal needs.

    The graph is not modified (apart from its node order, which is toposorted).
    """
    return _Walker(graph).run()


def _keep_fixup(analysis: ChannelAnalysis, removed: set[int]) -> set[int]:
    """Drop from ``removed`` units whose removal would empty a tensor (keep one channel there)."""
    removed = set(removed)
    changed = True
    while changed:
        changed = False
        for lay in list(analysis.layouts.values()):
            roots = analysis.roots(np.unique(lay.ids))
            if len(roots) and all(int(r) in removed for r in roots):
                removed.discard(int(roots[0]))
                changed = True
    return removed


def _take(values: np.ndarray, keep: np.ndarray, axis: int) -> np.ndarray:
    return np.take(values, np.flatnonzero(keep), axis=axis)


def _set_const(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> None:
    """Replace input ``index`` of ``node`` by ``values``; copy the constant if other nodes share it."""
    old = node.inputs[index]
    values = np.ascontiguousarray(values.astype(old.values.dtype, copy=False))
    if len(old.outputs) > 1:
        node.inputs[index] = gs.Constant(unique_name(graph, old.name + "_pruned"), values)
    else:
        old.values = values


def remove_units(
    graph: gs.Graph,
    analysis: ChannelAnalysis,
    removed: Iterable[int],
    *,
    fold_constants: bool = True,
    fold_means: Mapping[str, np.ndarray] | None = None,
) -> tuple[int, int]:
    """Remove the units ``removed`` (roots) from ``graph`` in place.

    With ``fold_constants`` the constant value of each removed channel is added to its consumers'
    bias (exact only for units accepted by :meth:`ChannelAnalysis.zero_removable`). With
    ``fold_means`` (consumer input tensor -> mean per position along its channel axis) the mean of
    each removed channel is folded instead, which keeps the consumers' expected output (lossy
    pruning; at zero-padded borders of a Conv it is approximate). A unit whose removal would leave
    some tensor without channels is kept.

    Returns:
        (source channels removed, units removed).
    """
    removed = _keep_fixup(analysis, {analysis.find(int(r)) for r in removed})
    if not removed:
        return 0, 0
    n_ids = len(analysis.parent)
    keep_id = np.array([analysis.find(i) not in removed for i in range(n_ids)], dtype=bool)
    count = 0
    # Consumers first: folding reads the weights before they are sliced.
    for c in analysis.consumers:
        keep = keep_id[c.ids]
        if keep.all():
            continue
        if fold_means is not None and c.tensor in fold_means and (c.fold_exact or c.kind == "Conv"):
            mean = np.asarray(fold_means[c.tensor], dtype=np.float64).reshape(-1)
            if mean.shape == c.ids.shape:
                _fold_into_bias(graph, dataclasses.replace(c, values=mean, weight_zero=np.zeros_like(keep)), ~keep)
        elif fold_constants:
            _fold_into_bias(graph, c, ~keep)
        _set_const(graph, c.node, 1, _take(np.asarray(c.node.inputs[1].values), keep, c.weight_axis))
    for s in analysis.sources:
        keep = keep_id[s.ids]
        if keep.all():
            continue
        count += int((~keep).sum())
        node = s.node
        _set_const(graph, node, 1, _take(np.asarray(node.inputs[1].values), keep, s.weight_axis))
        if s.bias_index is not None and _present(node, s.bias_index):
            b = np.asarray(node.inputs[s.bias_index].values)
            if b.size == len(keep) and b.size > 1:
                _set_const(graph, node, s.bias_index, _take(b.reshape(b.shape), keep, b.ndim - 1))
    for p in analysis.params:
        keep = keep_id[p.ids]
        if not keep.all():
            values = np.asarray(p.node.inputs[p.input_index].values)
            _set_const(graph, p.node, p.input_index, _take(values, keep, p.axis))
    for r in analysis.rewrites:
        keep = keep_id[r.layout.ids]
        if keep.all():
            continue
        _apply_rewrite(graph, r, keep)
    protected = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in protected:
            t.shape = None
    return count, len(removed)


def _apply_rewrite(graph: gs.Graph, r: _Rewrite, keep: np.ndarray) -> None:
    node = r.node
    if r.kind == "group":
        node.attrs["group"] = int(keep.sum())
    elif r.kind == "reshape":
        axis, old = r.extra
        target = np.asarray(node.inputs[1].values).copy()
        if target[axis] == old:
            target[axis] = int(keep.sum())
            _set_const(graph, node, 1, target)
    elif r.kind == "split":
        sizes, start, new = r.extra, 0, []
        for size in sizes:
            new.append(int(keep[start : start + size].sum()))
            start += size
        arr = np.asarray(new, dtype=np.int64)
        if _present(node, 1):
            _set_const(graph, node, 1, arr)
        elif "split" in node.attrs:
            node.attrs["split"] = new
        else:  # num_outputs (opset 18) or equal parts: give explicit sizes
            node.attrs.pop("num_outputs", None)
            node.inputs.append(gs.Constant(unique_name(graph, _node_name(node) + "_split"), arr))
    elif r.kind == "slice":
        k, lo, hi = r.extra
        new_lo = int(keep[:lo].sum())
        new_hi = new_lo + int(keep[lo:hi].sum())
        for index, value in ((1, new_lo), (2, new_hi)):
            arr = np.asarray(node.inputs[index].values).copy()
            arr[k] = value
            _set_const(graph, node, index, arr)


def _fold_into_bias(graph: gs.Graph, c: Consumer, gone: np.ndarray) -> None:
    """Add the removed constant channels' contribution ``sum_p v_p * W[.., p, ..]`` to the bias."""
    v = np.where(gone & ~c.weight_zero & (c.values != 0), c.values, 0.0)
    v = np.nan_to_num(v, nan=0.0)
    if not v.any():
        return
    node = c.node
    w = np.asarray(node.inputs[1].values, dtype=np.float64)
    if c.kind == "Conv":  # W [O, C, k...]: delta[o] = sum_c v_c * sum_k W[o, c, k]
        delta = np.einsum("oc,c->o", w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2), v)
        _add_bias(graph, node, 2, delta, scale=1.0)
    elif c.kind == "Gemm":
        wk = w.T if int(node.attrs.get("transB", 0)) else w  # [K, N]
        delta = float(node.attrs.get("alpha", 1.0)) * (v @ wk)
        beta = float(node.attrs.get("beta", 1.0)) if _present(node, 2) else 1.0
        if not _present(node, 2):
            node.attrs["beta"] = 1.0
        _add_bias(graph, node, 2, delta, scale=1.0 / beta)
    elif c.kind == "MatMul":
        found = _matmul_bias(node)
        if found is None:
            raise AssertionError("MatMul fold without a bias Add")
        add, index = found
        cst = np.asarray(add.inputs[index].values)
        _set_const(graph, add, index, (cst + (v @ w).reshape(cst.shape)).astype(cst.dtype))
    else:
        raise AssertionError(f"cannot fold a constant into {c.kind}")


def _add_bias(graph: gs.Graph, node: gs.Node, index: int, delta: np.ndarray, scale: float) -> None:
    dtype = np.asarray(node.inputs[1].values).dtype
    if _present(node, index):
        b = np.asarray(node.inputs[index].values)
        new = b.astype(np.float64) + delta * scale  # C of a Gemm may be [N], [1, N] or [M, N]
        if new.shape != b.shape and b.size > 1:
            raise AssertionError("bias fold changed the bias shape")
        _set_const(graph, node, index, new.astype(b.dtype))
    else:
        name = unique_name(graph, _node_name(node) + "_bias")
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(gs.Constant(name, (delta * scale).astype(dtype)))
