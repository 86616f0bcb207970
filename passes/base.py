"""The pass interface shared by every graph rewrite.

A pass is a small object with typed constructor arguments::

    class FoldBatchNorm:
        name = "fold_batchnorm"
        def requires(self, graph): ...          # raise UnsupportedModelError if it cannot run
        def __call__(self, graph) -> PassResult  # edit the graph, count what changed

``PassResult.stats`` holds counters (``{"folded": 3}``) that the driver merges under
``"<pass name>.<key>"``; ``notes`` holds one line per node the pass declined and why, for reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = [
    "GraphPass",
    "PassResult",
    "constant_bias_add",
    "fresh_names",
    "graph_names",
    "is_float_constant",
    "proto_names",
    "quiet_graphsurgeon",
    "unique_name",
]


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What one pass did: the graph, whether it changed, counters and per-node notes."""

    graph: gs.Graph
    modified: bool
    stats: Mapping[str, int] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()


@runtime_checkable
class GraphPass(Protocol):
    """Protocol of a graph pass (see the module docstring)."""

    name: str

    def requires(self, graph: gs.Graph) -> None:
        """Raise ``UnsupportedModelError`` when the pass cannot run on this graph."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite ``graph`` (in place or into a new graph) and report what changed."""


def is_float_constant(t: object) -> bool:
    """Whether ``t`` is a graphsurgeon constant of a floating-point dtype."""
    return isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating)


def constant_bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """``(Add, index of its bias)`` after ``node``, the bias of a MatMul layer; else None.

    The Add must be the only reader of ``node``'s output and its other input a float constant used
    nowhere else.
    """
    y = node.outputs[0]
    if len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return None
    add = y.outputs[0]
    idx = [i for i, t in enumerate(add.inputs) if t is not y]
    if len(idx) != 1 or not is_float_constant(add.inputs[idx[0]]) or len(add.inputs[idx[0]].outputs) != 1:
        return None
    return add, idx[0]


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name starting with ``base`` that is not used anywhere in ``graph`` yet."""
    return fresh_names(graph_names(graph))(base)


def fresh_names(used: Iterable[str]) -> Callable[[str], str]:
    """A name maker for a batch of edits: ``base``, else ``base_1``, ``base_2``, ...

    It avoids ``used`` and every name it handed out before (one set, instead of rescanning the
    graph for each new name).
    """
    taken = set(used)

    def fresh(base: str) -> str:
        name = base
        for i in itertools.count(1):
            if name not in taken:
                break
            name = f"{base}_{i}"
        taken.add(name)
        return name

    return fresh


def graph_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name in ``graph``."""
    names = set(graph.tensors().keys())
    names.update(node.name for node in graph.nodes if node.name)
    return names


def proto_names(g: onnx.GraphProto) -> set[str]:
    """Every node and tensor name of an ONNX main graph (what a new name must avoid): ``graph_names`` for protos."""
    taken = {n.name for n in g.node} | {i.name for i in g.initializer} | {v.name for v in g.input}
    for n in g.node:
        taken.update(n.input)
        taken.update(n.output)
    return taken


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """Silence onnx-graphsurgeon's own logger (it prints warnings to stdout) for a block."""
    from onnx_graphsurgeon.logger import G_LOGGER

    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.severity = old


def reduce_axes(node: gs.Node, rank: int) -> list[int] | str:
    """A Reduce* node's reduced axes, sorted in ``0..rank-1``, or why they cannot be read.

    Its axes are an attribute before opset 18 (13 for ReduceSum) and a constant input after.
    """
    if int(node.attrs.get("noop_with_empty_axes", 0)):
        return "noop_with_empty_axes"
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        if not isinstance(node.inputs[1], gs.Constant):
            return "axes are computed at run time"
        axes = np.asarray(node.inputs[1].values).ravel().tolist()
    else:
        axes = node.attrs.get("axes")
    if not axes:
        return "reduces every axis"
    return sorted({int(a) % rank for a in axes})
