"""Cleanup passes: constant folding and BatchNormalization folding.

FoldBatchNorm, for a Conv (or ConvTranspose/Gemm) whose only consumer is a BatchNormalization::

    y = gamma * (W*x + b - mean) / sqrt(var + eps) + beta
      = (W * a) * x + (b - mean) * a + beta,        a = gamma / sqrt(var + eps)  (per channel)

    X -> Conv(W, b) -> BN(gamma, beta, mean, var) -> Y   ==>   X -> Conv(W', b') -> Y

The fold is exact up to float rounding (tested ≤ 1e-5 on onnxruntime). It declines, with a reason,
when the conv output is also a graph output or has other consumers, when a parameter is not a
constant, or when BN is in training mode.

ShareConstants: constants with the same dtype, shape and bytes (at least ``SHARE_MIN_ELEMENTS`` values)
become one tensor read by all their consumers. TorchScript's exporter stores a weight that several layers
read (tied or cloned weights: ALBERT's layers, a siamese branch, ``nn.TransformerEncoder``'s copies of one
initial layer) once, behind one ``Identity`` per reader; folding turns each Identity into a copy of its
own (a 4-layer ViT: 0.63M stored values -> 1.97M, and 4 int8 copies after quantizing, 0.97x the float
file). FoldConstants ends with this merge, and the cleanup runs it once more after FoldBatchNorm, which
folds a shared weight into a private copy per BatchNorm (equal copies when the BatchNorms are equal, as in
a siamese net). Small constants (shapes, axes, a LayerNorm's ones) are left alone: merging them saves
nothing and would make per-layer rewrites of them copy-on-write for no gain.

ShareTransposedConstants, run on finished models (quantize, prune, lowrank and the cleanup command), keeps
a constant equal to another's transpose as ``Transpose(other)``: a language model's token table tied to its
output layer, which dynamo writes as ``Transpose(W)`` and folding turns into a second copy.

FoldConstants uses onnx-graphsurgeon's ``fold_constants`` (which evaluates constant subgraphs with
onnxruntime) rather than a folder of our own: it is well kept and folding is not where this
project adds value. Its shape folding (``fold_shapes``) is off: on onnx's conformance cases it
folded ``Shape`` with ``start``/``end`` attributes to the full shape (wrong values).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, quiet_graphsurgeon, unique_name

__all__ = [
    "SHARE_MIN_ELEMENTS",
    "FoldBatchNorm",
    "FoldConstants",
    "ShareConstants",
    "ShareTransposedConstants",
    "share_identical_constants",
    "transposed_twins",
]

log = logging.getLogger(__name__)

SHARE_MIN_ELEMENTS = 1024
"""Constants of at least this many values are merged when identical (``ShareConstants``)."""


class FoldConstants:
    """Fold constant subgraphs and ``Constant`` nodes into initializers; drop dead nodes."""

    name = "fold_constants"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Fold in place; count the nodes removed."""
        before = len(graph.nodes)
        folded = graph.copy()
        _constant_nodes_to_tensors(folded)
        try:
            with quiet_graphsurgeon():
                folded.fold_constants(fold_shapes=False, flatten_subgraphs=False, error_ok=True).cleanup()
        except Exception as exc:  # graphsurgeon fails on some sequence-typed graphs; folding is optional
            log.debug("fold_constants declined: %s", exc)
            return PassResult(graph, False, {"nodes_removed": 0}, (f"not folded ({type(exc).__name__}: {exc})",))
        removed = before - len(folded.nodes)
        shared = share_identical_constants(folded)
        return PassResult(folded, removed > 0 or shared > 0, {"nodes_removed": removed, "constants_shared": shared})


class ShareConstants:
    """Merge identical constants of at least ``min_elements`` values into one tensor (see the module docstring)."""

    name = "share_constants"

    def __init__(self, min_elements: int = SHARE_MIN_ELEMENTS) -> None:
        self.min_elements = min_elements

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Merge in place; count the tensors merged into another."""
        shared = share_identical_constants(graph, self.min_elements)
        return PassResult(graph, shared > 0, {"constants_shared": shared})


def _digest(values: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).digest()


def share_identical_constants(graph: gs.Graph, min_elements: int = SHARE_MIN_ELEMENTS) -> int:
    """Point every reader of a constant equal to an earlier one (dtype, shape, bytes) at that one.

    Only constants read by nodes of ``graph`` itself (not by a subgraph, not a graph output) take part.
    Returns how many tensors were merged into another. Candidates are grouped by dtype, shape and a few
    sampled values first, so distinct weights of equal shape (every layer of a transformer) are not
    hashed in full.
    """
    own = {id(n) for n in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    groups: dict[tuple, list[gs.Constant]] = {}
    seen: set[int] = set()
    for node in graph.nodes:
        for t in node.inputs:
            if not isinstance(t, gs.Constant) or id(t) in seen or id(t) in outputs:
                continue
            seen.add(id(t))
            values = np.asarray(t.values)
            if values.size < min_elements or any(id(c) not in own for c in t.outputs):
                continue
            flat = values.reshape(-1)
            probe = flat[:: max(1, flat.size // 16)][:16].tobytes()
            groups.setdefault((values.dtype.str, values.shape, probe), []).append(t)
    target: dict[int, gs.Constant] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        first: dict[bytes, gs.Constant] = {}
        for t in members:
            kept = first.setdefault(_digest(np.asarray(t.values)), t)
            if kept is not t:
                target[id(t)] = kept
    if not target:
        return 0
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if id(t) in target:
                node.inputs[i] = target[id(t)]
    log.debug("shared %d identical constants", len(target))
    return len(target)


def _probe(values: np.ndarray, transposed: bool = False) -> bytes:
    """16 values at fixed positions of ``values`` (of ``values.T`` laid out in C order if ``transposed``)."""
    n = values.size
    pos = np.arange(0, n, max(1, n // 16))[:16]
    if not transposed:
        return values.reshape(-1)[pos].tobytes()
    rows = values.shape[0]  # values.T is [cols, rows]: its flat index i is values.T[i // rows, i % rows]
    return values[pos % rows, pos // rows].tobytes()


def transposed_twins(graph: gs.Graph, min_elements: int = SHARE_MIN_ELEMENTS) -> list[tuple[gs.Constant, gs.Constant]]:
    """Pairs ``(a, b)`` of 2-D constants read by nodes of ``graph`` with ``b == a.T``, ``a`` first in node order.

    Same dtype, at least ``min_elements`` values, each constant in one pair at most. A tied embedding: the token
    table ``W`` that a Gather reads and the ``W.T`` that constant folding made of the output layer's
    ``Transpose(W)``.
    """
    own = {id(n) for n in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    consts: list[gs.Constant] = []
    seen: set[int] = set()
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in seen and id(t) not in outputs:
                seen.add(id(t))
                v = np.asarray(t.values)
                if v.ndim == 2 and v.size >= min_elements and v.shape[0] != 1 and v.shape[1] != 1 \
                        and all(id(c) in own for c in t.outputs):
                    consts.append(t)
    by_probe: dict[tuple, list[gs.Constant]] = {}
    for t in consts:
        v = np.asarray(t.values)
        by_probe.setdefault((v.dtype.str, v.shape, _probe(v)), []).append(t)
    pairs, used = [], set()
    for b in consts:
        vb = np.asarray(b.values)
        for a in by_probe.get((vb.dtype.str, vb.shape[::-1], _probe(vb, transposed=True)), []):
            if a is b or id(a) in used or id(b) in used:
                continue
            if _digest(np.asarray(a.values)) == _digest(vb.T):
                first, second = (a, b) if consts.index(a) < consts.index(b) else (b, a)
                pairs.append((first, second))
                used.update((id(a), id(b)))
                break
    return pairs


class ShareTransposedConstants:
    """Store a constant that equals another's transpose as ``Transpose(other)`` (written once; folded at load).

    Run last, on the finished model: a tied embedding's output layer then reads ``Transpose(W)`` (as the dynamo
    export wrote it) instead of a second copy of ``W``. onnxruntime folds the Transpose of an initializer when it
    loads the model (before its Q/DQ fusions), so the kernels are the same; only the file is smaller. The int8
    case needs both tensors rounded alike (round to nearest per row: the embedding's rows and the output layer's
    per-channel weight have the same grid), which is why GPTQ leaves such weights out (``transposed_twins``).
    """

    name = "share_transposed_constants"

    def __init__(self, min_elements: int = SHARE_MIN_ELEMENTS) -> None:
        self.min_elements = min_elements

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Replace the second of each pair by a Transpose of the first; count them."""
        pairs = transposed_twins(graph, self.min_elements)
        for a, b in pairs:
            t = gs.Variable(unique_name(graph, f"{a.name}_T"), dtype=np.asarray(a.values).dtype, shape=list(b.shape))
            node = gs.Node("Transpose", unique_name(graph, f"{a.name}_Transpose"), {"perm": [1, 0]}, [a], [t])
            for reader in list(b.outputs):
                for i, x in enumerate(reader.inputs):
                    if x is b:
                        reader.inputs[i] = t
            graph.nodes.append(node)
        if pairs:
            graph.toposort()
        return PassResult(graph, bool(pairs), {"constants_transposed": len(pairs)})


def _constant_nodes_to_tensors(graph: gs.Graph) -> None:
    """Replace ``Constant`` nodes by constant tensors with ONNX's dtypes.

    Done by hand because onnx-graphsurgeon 0.6 turns ``value_float`` into float64, which then
    breaks folding of float32 arithmetic (Mul(float, double)).
    """
    for node in [n for n in graph.nodes if n.op == "Constant" and len(n.outputs) == 1 and len(n.attrs) == 1]:
        (key, value), = node.attrs.items()
        if key == "value" and isinstance(value, gs.Constant):
            array = value.values
        elif key in ("value_float", "value_floats"):
            array = np.asarray(value, dtype=np.float32)
        elif key in ("value_int", "value_ints"):
            array = np.asarray(value, dtype=np.int64)
        else:
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name, np.asarray(array))
        for consumer in list(out.outputs):
            for i, tensor in enumerate(consumer.inputs):
                if tensor is out:
                    consumer.inputs[i] = const
        graph.outputs[:] = [const if t is out else t for t in graph.outputs]
        node.outputs.clear()


_FOLDABLE = {"Conv": 0, "ConvTranspose": 1, "Gemm": None}


class FoldBatchNorm:
    """Fold ``BatchNormalization`` into a preceding Conv, ConvTranspose or Gemm."""

    name = "fold_batchnorm"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Fold every eligible producer → BatchNormalization pair."""
        folded, notes = 0, []
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            reason = self._decline_reason(graph, bn)
            if reason:
                notes.append(f"{bn.name or bn.outputs[0].name}: kept ({reason})")
                log.debug("fold_batchnorm declines %s: %s", bn.name, reason)
                continue
            self._fold(graph, bn)
            folded += 1
        return PassResult(graph, folded > 0, {"folded": folded}, tuple(notes))

    @staticmethod
    def _decline_reason(graph: gs.Graph, bn: gs.Node) -> str | None:
        x = bn.inputs[0]
        if not x.inputs:
            return "input is not produced by a node"
        prod = x.inputs[0]
        if prod.op not in _FOLDABLE:
            return f"producer is {prod.op}, not Conv/ConvTranspose/Gemm"
        if len(x.outputs) != 1:
            return "producer output has other consumers"
        if x in graph.outputs:
            return "producer output is a graph output"
        if len(bn.outputs) != 1 or int(bn.attrs.get("training_mode", 0)):
            return "training-mode BatchNormalization"
        if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
            return "BN parameters are not constants"
        params = prod.inputs[1:]
        if not all(isinstance(t, gs.Constant) for t in params if t is not None and t.name):
            return "weights are not constants"
        w = prod.inputs[1]
        if prod.op == "ConvTranspose" and int(prod.attrs.get("group", 1)) != 1:
            return "grouped ConvTranspose"
        if prod.op == "Gemm":
            if len(bn.inputs[0].shape or ()) not in (0, 2) and bn.inputs[0].shape is not None:
                return "Gemm output is not 2-D"
            beta_used = len(prod.inputs) > 2 and float(prod.attrs.get("beta", 1.0)) != 1.0
            if float(prod.attrs.get("alpha", 1.0)) != 1.0 or beta_used:
                return "Gemm alpha/beta != 1"
        if not np.issubdtype(w.values.dtype, np.floating):
            return "weights are not floating point"
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale_sq = bn.inputs[4].values.astype(np.float64) + eps
        if not (np.isfinite(scale_sq).all() and (scale_sq > 0).all()):  # the BN itself yields NaN there; keep it
            return "variance + epsilon is not positive and finite"
        return None

    @staticmethod
    def _fold(graph: gs.Graph, bn: gs.Node) -> None:
        prod = bn.inputs[0].inputs[0]
        gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        a = gamma / np.sqrt(var + eps)
        w_t = prod.inputs[1]
        w = w_t.values.astype(np.float64)
        dtype = w_t.values.dtype
        if prod.op == "Conv":
            w = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
        elif prod.op == "ConvTranspose":  # weight layout [C_in, C_out/group, k...]
            w = w * a.reshape((1, -1) + (1,) * (w.ndim - 2))
        else:  # Gemm: output features are W's rows if transB else its columns
            w = w * (a.reshape(-1, 1) if int(prod.attrs.get("transB", 0)) else a.reshape(1, -1))
        has_bias = len(prod.inputs) > 2 and prod.inputs[2] is not None and prod.inputs[2].name
        b = prod.inputs[2].values.astype(np.float64) if has_bias else np.zeros_like(a)
        b = np.broadcast_to(b, a.shape)
        new_b = (b - mean) * a + beta
        # a weight or bias that other nodes read too gets a folded copy of its own (ShareConstants merges
        # equal copies again: a siamese pair of convs with one BatchNorm folds to one weight)
        prod.inputs[1] = gs.Constant(_own_name(graph, w_t), w.astype(dtype))
        old_b = prod.inputs[2] if has_bias else None
        bias_name = _own_name(graph, old_b) if has_bias else unique_name(graph, f"{w_t.name}_bnbias")
        bias = gs.Constant(bias_name, new_b.astype(dtype))
        if has_bias:
            prod.inputs[2] = bias
        else:
            if prod.op == "Gemm":
                prod.attrs["beta"] = 1.0
            prod.inputs.append(bias)
        y = bn.outputs[0]
        prod.outputs[0] = y
        bn.outputs.clear()
        bn.inputs.clear()


def _own_name(graph: gs.Graph, t: gs.Tensor) -> str:
    """``t``'s name for a replacement read only by one node; a fresh name when other nodes read ``t`` too."""
    return t.name if len(t.outputs) <= 1 else unique_name(graph, f"{t.name}_folded")
