"""Run lists of passes; pipelines are functions that return lists of passes.

``run_passes`` imports the model once into onnx-graphsurgeon, then for each pass: ``requires``,
the pass, ``cleanup().toposort()`` (the checker rejects unsorted graphs), stats merged under
``"<pass>.<key>"``. An unexpected exception becomes a ``PassError`` naming the passes that ran
before; our own typed errors pass through unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
from collections.abc import Sequence

import onnx
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from onnxpress.errors import OnnxpressError, PassError, UnsupportedModelError
from onnxpress.model_io import is_large, subgraphs
from onnxpress.passes.base import GraphPass, quiet_graphsurgeon

__all__ = ["PipelineResult", "cleanup_passes", "export_graph", "import_graph", "run_passes"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """The rewritten model, merged counters, the names of the passes that ran, and their notes."""

    model: onnx.ModelProto
    stats: dict[str, int]
    history: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def modified(self) -> bool:
        """Whether any pass changed the graph."""
        return any(v for k, v in self.stats.items() if k.endswith(".modified"))


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx-graphsurgeon graph of ``model`` (the model itself is not modified).

    Raises:
        UnsupportedModelError: onnx-graphsurgeon cannot represent the graph (e.g. optional types).
    """
    shadowed = _shadowed_names(model.graph)
    if shadowed:
        raise UnsupportedModelError(
            f"a subgraph reuses the outer tensor name {shadowed!r}, which onnxpress's graph editor "
            "(onnx-graphsurgeon) cannot represent; give subgraph values their own names"
        )
    try:
        with quiet_graphsurgeon():
            return gs.import_onnx(model)
    except Exception as exc:  # graphsurgeon raises bare errors on types it does not model
        raise UnsupportedModelError(
            f"onnxpress cannot edit this graph (onnx-graphsurgeon import failed: {type(exc).__name__}: {exc}); "
            "optional and sparse types are not supported"
        ) from None


def _shadowed_names(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> str | None:
    """The first value name a subgraph redefines from an enclosing scope, if any."""
    defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    clash = sorted(defined & outer)
    if clash:
        return clash[0]
    scope = frozenset(outer | defined)
    for node in graph.node:
        for attr in node.attribute:
            for sub in subgraphs(attr):
                found = _shadowed_names(sub, scope)
                if found:
                    return found
    return None


def _drop_shadowing_initializers(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """Remove, from every subgraph, initializers named like a value of an enclosing scope (in place).

    graphsurgeon writes an outer constant that a subgraph reads (an If branch's MatMul by the main graph's ``W``)
    into that subgraph as an initializer of the same name: the same values, but a name the next import refuses as
    shadowed ("a subgraph reuses the outer tensor name 'W'"). The subgraph reads the outer one without it. A model
    that shadowed a name itself was refused on import, so every such copy here is graphsurgeon's.
    """
    defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    if outer:
        keep = [i for i in graph.initializer if i.name not in outer]
        if len(keep) < len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)
            defined = {v.name for v in graph.input} | {i.name for i in keep} | {o for n in graph.node for o in n.output}
    scope = frozenset(outer | defined)
    for node in graph.node:
        for attr in node.attribute:
            for sub in subgraphs(attr):
                _drop_shadowing_initializers(sub, scope)


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto, keeping ``like``'s IR version, producer and metadata."""
    try:
        with quiet_graphsurgeon():
            model = gs.export_onnx(graph.cleanup().toposort())
    except Exception as exc:  # graphsurgeon raises bare errors on types it does not model
        raise UnsupportedModelError(
            f"onnxpress cannot write this graph back (onnx-graphsurgeon export failed: {type(exc).__name__}: {exc})"
        ) from None
    model.ir_version = max(like.ir_version, 7) if like.ir_version else model.ir_version
    model.producer_name = like.producer_name or "onnxpress"
    model.producer_version = like.producer_version
    model.doc_string, model.domain, model.model_version = like.doc_string, like.domain, like.model_version
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    _drop_shadowing_initializers(model.graph)
    # graphsurgeon writes every shape it has seen as value_info, including ones that folding made
    # stale; keep only the value_info the input model declared, and let shape inference do the rest.
    declared = {vi.name for vi in like.graph.value_info}
    kept = [vi for vi in model.graph.value_info if vi.name in declared]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    known = {imp.domain for imp in model.opset_import}
    for imp in like.opset_import:  # keep imported domains gs dropped (e.g. unused-by-now domains)
        if imp.domain not in known:
            model.opset_import.append(imp)
    return model


def run_passes(
    model: onnx.ModelProto,
    passes: Sequence[GraphPass],
    *,
    progress: bool = False,
) -> PipelineResult:
    """Run ``passes`` in order on a copy of ``model``.

    Raises:
        PassError: a pass failed unexpectedly (message names it and the passes before it).
        OnnxpressError: a pass's ``requires`` (or the pass) raised one of our typed errors.
    """
    graph = import_graph(model)
    stats: dict[str, int] = {}
    notes: list[str] = []
    history: list[str] = []
    bar = tqdm(passes, desc="passes", unit="pass", disable=not progress, leave=False)
    for pass_ in bar:
        bar.set_postfix_str(pass_.name)
        try:
            with quiet_graphsurgeon():  # it prints to stdout, e.g. on reading bfloat16 constants' values
                pass_.requires(graph)
                result = pass_(graph)
                graph = result.graph.cleanup().toposort()
        except OnnxpressError:
            raise
        except Exception as exc:
            before = ", ".join(history) or "none"
            raise PassError(
                f"pass {pass_.name!r} failed ({type(exc).__name__}: {exc}); passes run before it: [{before}]"
            ) from exc
        history.append(pass_.name)
        stats[f"{pass_.name}.modified"] = stats.get(f"{pass_.name}.modified", 0) + int(result.modified)
        for key, value in result.stats.items():
            stats[f"{pass_.name}.{key}"] = stats.get(f"{pass_.name}.{key}", 0) + int(value)
        notes.extend(f"{pass_.name}: {n}" for n in result.notes)
        log.debug("pass %s: modified=%s stats=%s", pass_.name, result.modified, dict(result.stats))
    if not any(stats.get(f"{name}.modified") for name in history):
        # Nothing changed: hand back the input itself rather than a graphsurgeon round trip,
        # which can only lose information (optional types, value_info, attribute order).
        out = copy.deepcopy(model)
    else:
        out = export_graph(graph, model)
    if is_large(model):
        # a graphsurgeon graph is a web of reference cycles (nodes <-> tensors): its weight arrays wait for the
        # cycle collector, which counts objects, not bytes; a 2.4 GB model's held several copies at once
        graph = result = None
        gc.collect()
    return PipelineResult(out, stats, tuple(history), tuple(notes))


def cleanup_passes() -> list[GraphPass]:
    """The exact passes every pipeline starts with.

    Fold constants, projection Einsums as MatMul, fold BatchNormalization, PRelu as faster ops, store
    equal weights once (FoldBatchNorm gives a shared weight a copy per BatchNorm), and leave out recurrent
    layers' initial states that are zero by construction (ONNX's default).
    """
    from onnxpress.passes.einsum import EinsumToMatMul
    from onnxpress.passes.fold import FoldBatchNorm, FoldConstants, ShareConstants
    from onnxpress.passes.prelu import RewritePRelu
    from onnxpress.passes.zero_states import DropZeroInitialStates

    return [FoldConstants(), EinsumToMatMul(), FoldBatchNorm(), RewritePRelu(), ShareConstants(),
            DropZeroInitialStates()]


def attention_passes() -> list[GraphPass]:
    """Run scaled dot-product attention as onnxruntime's ``MultiHeadAttention`` (exact to float rounding).

    ``FuseAttention``, then ``MergeReshapes`` on the Reshape pairs it leaves around each fused node: the one
    ``[-1, S, N]`` view per projection that ``FuseQuantizedAttention`` matches after quantization.
    """
    from onnxpress.passes.fuse_attention import FuseAttention
    from onnxpress.passes.merge_reshapes import MergeReshapes

    return [FuseAttention(), MergeReshapes()]
