"""Run a transformer's scaled dot-product attention as onnxruntime's fused ``MultiHeadAttention``.

Exporters write attention as a dozen small ops. For each head split of the projected queries,
keys and values (``Reshape`` to ``[B, S, H, d]``)::

    s = Softmax(Mul(MatMul(Transpose[0,2,1,3](q), Transpose[0,2,3,1](k)), c))     (or Div by c, or no scale)
    y = Transpose[0,2,1,3](MatMul(s, Transpose[0,2,1,3](v)))

(``k`` may also be ``Transpose[0,2,1,3]`` then ``Transpose[0,1,3,2]``, or, as torch's dynamo export writes
``scaled_dot_product_attention``, ``Transpose[0,2,1,3]``, ``Reshape[B*H, L, d]``, ``Transpose[0,2,1]``,
``Reshape[B, H, d, L]``; scalar ``Mul``s on ``q`` and ``k`` multiply into the scale, also where the scalar is
computed from the head size at run time, as torch's TorchScript export writes ``scaled_dot_product_attention``;
without any the scale is 1). With ``FuseAttention(masks=True)`` (off by default: with a mask, onnxruntime's
kernel measured no faster than the graph's ops; see the class), a mask on the scaled scores, ``s + m``
(``m`` float, rank <= 4: BERT's padding mask, a causal mask, SDPA's float ``attn_mask``), ``s - m``, or
``Where(c, fill, s)`` with a fill of -inf or <= -1e30 (``masked_fill``), one after another or alone,
becomes the node's ``attention_bias``, broadcast to ``[B|1, H|1, S, L]`` as the kernel wants it (``Unsqueeze``
and ``Expand``; for ``Where``, ``Where(c, fill, 0)``, the same floats after the softmax since such a fill
swamps any score). This pass replaces the whole chain by one ``com.microsoft.MultiHeadAttention`` node
(``num_heads = H``, ``scale = c`` or ``1 / c``) that reads ``q``, ``k`` and ``v`` as ``[B, S, H*d]``
(a ``Reshape[0, 0, -1]`` of the head split, free in onnxruntime) and writes ``[B, S, H*d]``, which a
``Reshape[0, 0, H, d]`` turns back into ``y``. The same arithmetic (softmax(c q kᵀ) v per head),
so outputs agree to float rounding (measured max |Δ| 1.4e-6 on the reference transformer's logits).

Why: onnxruntime's CPU provider runs the chain as FusedMatMul, Softmax, MatMul and two to four
Transposes, each a pass over ``[B, H, S, S]`` or ``[B, H, S, d]`` tensors; its MultiHeadAttention
kernel does it in one. Measured on the reference transformer (batch 64, 1 thread, interleaved,
a loaded 2-core box): the original 1.0 -> 0.90-0.92x; its 0.5-MACs low-rank split 0.613-0.649x ->
0.585-0.613x; at batch 1 0.634-0.670 -> 0.606-0.634x; at 2 threads 0.623-0.713 -> 0.584-0.665x.

Left as they are, with a note: a mask added before the scale, a ``Where`` fill that does not swamp the
scores, probabilities read elsewhere too (torch's SDPA with a boolean mask zeroes fully masked rows, where the
node would give NaN), queries, keys and values whose batch sizes are not known to be equal (a fixed
``[1, L, D]`` context that ``MatMul`` broadcasts over batched queries), other permutations, heads
that are not known integers, non-float32 tensors (or tensors whose type is unknown: run shape
inference first, as ``lowrank`` does), and chains whose intermediate tensors are read elsewhere.
The node is onnxruntime's own (domain ``com.microsoft``): other runtimes do not know it, which is
why ``lowrank`` offers to keep the graph's ops (``--keep-attention``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper as onnx_helper

from onnxpress.passes.base import PassResult, fresh_names, graph_names

__all__ = ["FuseAttention"]

log = logging.getLogger(__name__)

_HEADS_FIRST = [0, 2, 1, 3]


def _only_reader(t: gs.Tensor, kept: frozenset[int]) -> gs.Node | None:
    """The single node reading ``t``, else None (also when ``t`` is a graph output: ``id(t)`` in ``kept``)."""
    return t.outputs[0] if len(t.outputs) == 1 and id(t) not in kept else None


def _data_reader(t: gs.Tensor, kept: frozenset[int]) -> gs.Node | None:
    """The single node reading ``t``'s values, besides ``Shape`` nodes.

    The dynamo SDPA export reads the keys' shape to build its Reshape targets; those die with the chain (or
    keep its old nodes alive, which stays exact).
    """
    data = [n for n in t.outputs if n.op != "Shape"]
    return data[0] if len(data) == 1 and id(t) not in kept else None


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _perm(node: gs.Node | None) -> list[int] | None:
    if node is None or node.op != "Transpose" or "perm" not in node.attrs:
        return None
    return [int(p) for p in node.attrs["perm"]]


def _scalar(t: gs.Tensor) -> float | None:
    """The value of a tensor holding one float known before run time, else None.

    A constant, or a small computation on constants and known dimensions: torch's TorchScript export of
    ``scaled_dot_product_attention`` multiplies q and k by ``Sqrt(Cast(1 / Sqrt(Cast(Slice(Shape(q), -1)))))``.
    """
    value = _static(t)
    if value is not None and value.size == 1 and np.issubdtype(value.dtype, np.floating):
        return float(value.reshape(-1)[0])
    return None


# The ops _static evaluates. Written here rather than through onnx's constant folding or a reference
# evaluator because the values hang off Shape nodes of tensors whose other dimensions are symbolic: only the
# dimensions the Slice keeps need to be known.
_UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative}
_BINARY = {"Div": np.divide, "Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Pow": np.power}


def _static(t: gs.Tensor, depth: int = 12) -> np.ndarray | None:
    """``t``'s value where constants and known dimensions fix it, else None.

    Shape arithmetic may give an object array: symbolic dimension names as strings, None for unknown ones
    (onnxruntime's ``unk__N`` included), until a ``Slice``/``Gather`` keeps only numbers. Arithmetic on such
    arrays gives None.
    """
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = _producer(t)
    if node is None or depth == 0:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    if node.op == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        dims = [d if (isinstance(d, int) and d >= 0) or (isinstance(d, str) and _definite(d))
                else _dim(node.inputs[0], axis, depth - 1, named=True) for axis, d in enumerate(shape)]
        return _numbers_if_known(np.array(dims[int(node.attrs.get("start", 0)):node.attrs.get("end")], dtype=object))
    args = [_static(i, depth - 1) for i in node.inputs]
    if any(a is None for a in args[:1]):
        return None
    x = args[0]
    if node.op in ("Slice", "Gather"):
        if any(a is None or a.dtype == object for a in args[1:]) or x.ndim != 1:
            return None
        if node.op == "Gather":
            out = np.asarray(x[args[1]], dtype=x.dtype)
        else:
            starts, ends = args[1], args[2]
            steps = args[4] if len(args) > 4 else np.ones_like(starts)
            if (len(args) > 3 and list(args[3]) not in ([0], [-1])) or starts.size != 1:
                return None
            out = x[int(starts[0]):int(max(min(ends[0], 2**62), -(2**62))):int(steps[0])]
        return _numbers_if_known(out)
    if node.op == "Concat" and all(a is not None and a.ndim == 1 for a in args):
        return _numbers_if_known(np.concatenate([a.astype(object) for a in args]))
    if node.op == "Unsqueeze" and x.ndim == 0 and len(args) > 1 and args[1] is not None and list(args[1]) in ([0],
                                                                                                          [-1]):
        return x.reshape(1)
    if x.dtype == object or any(a is None or a.dtype == object for a in args):
        return None
    if node.op == "Cast":
        return x.astype(onnx_helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if node.op in _UNARY:
        return _UNARY[node.op](x)
    if node.op in _BINARY and len(args) == 2:
        with np.errstate(all="ignore"):
            return _BINARY[node.op](x, args[1]).astype(np.result_type(x, args[1]))
    return None


def _numbers_if_known(x: np.ndarray) -> np.ndarray:
    """``x`` as int64 when it holds numbers only, else as it is (an object array of dimensions)."""
    if x.dtype == object and all(isinstance(d, int | np.integer) for d in x.reshape(-1)):
        return x.astype(np.int64)
    return x


def _head_shape(split: gs.Tensor) -> tuple[int, int] | None:
    """``(H, d)`` of a ``[B, S, H, d]`` head split: from its shape, else from its Reshape's constant target."""
    shape = split.shape
    if shape is not None and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape[2:]):
        return int(shape[2]), int(shape[3])
    node = _producer(split)
    if node is not None and node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant):
        target = np.asarray(node.inputs[1].values).reshape(-1)
        if target.size == 4 and target[2] > 0 and target[3] > 0:
            return int(target[2]), int(target[3])
    return None


def _peel_scale(t: gs.Tensor, kept: frozenset[int]) -> tuple[gs.Tensor, float, list[gs.Node]]:
    """``(x, c, [Mul])`` when ``t = x * c`` (a scalar constant, as SDPA exports scale q and k), else ``(t, 1, [])``."""
    node = _producer(t)
    if node is not None and node.op == "Mul" and _only_reader(t, kept) is not None:
        for i in (0, 1):
            c = _scalar(node.inputs[1 - i])
            if c is not None and c != 0.0 and np.isfinite(c):
                return node.inputs[i], c, [node]
    return t, 1.0, []


def _key_split(t: gs.Tensor) -> tuple[gs.Tensor | None, list[gs.Node]]:
    """The ``[B, L, H, d]`` head split under transposed keys ``[B, H, d, L]``, and the nodes between, first to last.

    Three layouts: ``Transpose[0,2,3,1]``; ``Transpose[0,2,1,3]`` then ``Transpose[0,1,3,2]``; and the dynamo
    SDPA export's ``Transpose[0,2,1,3]`` -> ``Reshape[B*H, L, d]`` -> ``Transpose[0,2,1]`` -> ``Reshape[B, H, d, L]``
    (its shapes are checked by :func:`_folds_heads`).
    """
    node = _producer(t)
    if _perm(node) == [0, 2, 3, 1]:
        return node.inputs[0], [node]
    if _perm(node) == [0, 1, 3, 2] and _perm(_producer(node.inputs[0])) == _HEADS_FIRST:
        inner = _producer(node.inputs[0])
        return inner.inputs[0], [inner, node]
    if node is not None and node.op == "Reshape":
        t2 = _producer(node.inputs[0])
        r1 = _producer(t2.inputs[0]) if _perm(t2) == [0, 2, 1] else None
        t1 = _producer(r1.inputs[0]) if r1 is not None and r1.op == "Reshape" else None
        if _perm(t1) == _HEADS_FIRST:
            return t1.inputs[0], [t1, r1, t2, node]
    return None, []


def _same_batch(splits: tuple[gs.Tensor, ...]) -> bool:
    """Whether the head splits' batch dimensions are known to be one: the same number or the same symbolic name.

    ``MatMul`` broadcasts its batch dimensions, so cross-attention over a fixed ``[1, L, D]`` context with batched
    queries runs as exported; onnxruntime's MultiHeadAttention refuses query and key batches that differ.
    """
    batches = [_dim(s, 0) if s.shape is not None and len(s.shape) == 4 else None for s in splits]
    return batches[0] is not None and all(b == batches[0] for b in batches)


def _folds_heads(chain: list[gs.Node], heads: int, size: int) -> bool:
    """Whether the SDPA key chain's Reshapes are ``[B*H, L, d]`` and ``[B, H, d, L]`` (known shapes only)."""
    folded, back = chain[1].outputs[0].shape, chain[3].outputs[0].shape
    return (folded is not None and len(folded) == 3 and folded[2] == size
            and back is not None and len(back) == 4 and back[1] == heads and back[2] == size)


def _scores_of_heads(node: gs.Node | None) -> bool:
    """Whether ``node`` makes attention scores: a MatMul of two head layouts, or a scalar Mul/Div of one.

    A head layout is a Transpose or Reshape output, maybe times a scalar.
    """
    if node is not None and node.op in ("Mul", "Div"):
        node = _producer(node.inputs[0] if _scalar(node.inputs[0]) is None else node.inputs[1])
    if node is None or node.op != "MatMul":
        return False
    heads = [_producer(_peel_scale(t, frozenset())[0]) for t in node.inputs]
    return all(n is not None and n.op in ("Transpose", "Reshape") for n in heads)


# A fill at or below this (or -inf) swamps any score: Where(mask, fill, s) and s + Where(mask, fill, 0) are the same
# floats, and their softmaxes too, fully masked rows included (all equal to the fill either way).
_SWAMPING_FILL = -1e30


# Ops whose output dimensions are their inputs' broadcast (numpy rules; a LayerNormalization's scale and bias
# broadcast over the rows, a Clip's bounds are single numbers)
_SHAPE_KEEPING = frozenset({
    "Abs", "Add", "And", "Cast", "Clip", "Div", "Dropout", "Equal", "Erf", "Exp", "Gelu", "Greater", "GreaterOrEqual",
    "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pow", "Reciprocal", "Relu", "Sigmoid", "Sin", "Cos",
    "Softmax", "Sqrt", "Sub", "Tanh", "Where", "Xor",
})


# _dim's answers during one pass: (tensor, answer, depth left when asked), by (id, axis, named). Cleared per
# call; a rewrite changes no tensor's dimensions, and the entry keeps its tensor alive so that ids stay unique.
_DIMS: dict[tuple[int, int, bool], tuple[gs.Tensor, int | str | None, int]] = {}


def _dim(t: gs.Tensor, axis: int, depth: int = 96, *, named: bool = False) -> int | str | None:
    """Dimension ``axis`` of ``t`` (memoized: residual Adds join two paths at every block).

    A known answer holds whatever the depth; an unknown one only for searches no deeper than the one that
    found it.
    """
    key = (id(t), axis, named)
    seen = _DIMS.get(key)
    if seen is not None and seen[0] is t and (_definite(seen[1]) or seen[2] >= depth):
        return seen[1]
    answer = _traced_dim(t, axis, depth, named=named)
    _DIMS[key] = (t, answer, depth)
    return answer


def _definite(d: int | str | None) -> bool:
    """Whether ``d`` is a dimension, not None or an onnxruntime ``unk__N`` name (unknown)."""
    return d is not None and not str(d).startswith("unk__")


def _traced_dim(t: gs.Tensor, axis: int, depth: int, *, named: bool = False) -> int | str | None:
    """Dimension ``axis`` of ``t``: from its shape, else through the ops that keep it.

    A TorchScript export slices a causal mask off a ``[1, 1, N, N]`` buffer with run-time ends, and onnx's
    inference then loses every dimension of the slice, the untouched leading ones included; onnxruntime's
    loses the batch of ``embedding + position[:, :S]`` (it cannot tell that the slice's first dimension is 1)
    and of the Reshapes after it. ``named``: None rather than an ``unk__N`` name that tracing did not replace.
    """
    shape = t.shape
    if shape is None or axis >= len(shape):
        return None
    known = shape[axis] if isinstance(shape[axis], int | str) and shape[axis] != -1 else None
    if _definite(known):  # onnxruntime's inference names unknowns unk__N
        return known
    if named:
        known = None
    node = _producer(t)
    source = None
    if node is not None and depth > 0 and node.op == "Slice" and len(node.inputs) > 3:
        axes = _static(node.inputs[3])
        if axes is not None and axes.dtype != object and axis not in {int(a) % len(shape) for a in axes.reshape(-1)}:
            source = node.inputs[0]
    elif node is not None and depth > 0 and node.op == "Reshape" and not node.attrs.get("allowzero", 0):
        target = _static(node.inputs[1], depth - 1)
        if target is not None and target.shape == (len(shape),):
            value = target[axis]
            if isinstance(value, str) or (isinstance(value, int | np.integer) and value > 0):
                return int(value) if not isinstance(value, str) else value
            if isinstance(value, int | np.integer) and value == 0:  # 0 copies the input's dimension
                source = node.inputs[0]
    elif node is not None and depth > 0 and node.op == "Transpose" and _perm(node) is not None:
        return _dim(node.inputs[0], _perm(node)[axis], depth - 1, named=named) or known
    elif node is not None and depth > 0 and node.op == "MultiHeadAttention" and axis < 2:  # [B, S, .] as the query
        source = node.inputs[0]
    elif node is not None and depth > 0 and node.op in ("MatMul", "Gemm"):
        a, b = node.inputs[0], node.inputs[1]
        if a.shape is None or b.shape is None or len(a.shape) < 2 or len(b.shape) < 2 or (
                node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("transB", 0))):
            return known
        if axis == len(shape) - 1:
            traced = _dim(b, len(b.shape) - 1, depth - 1, named=True)
            return known if traced is None else traced
        if axis == len(shape) - 2:
            traced = _dim(a, len(a.shape) - 2, depth - 1, named=True)
            return known if traced is None else traced
        dims = set()
        for i in (a, b):  # the batch dimensions broadcast
            offset = axis - (len(shape) - len(i.shape))
            dims.add(1 if offset < 0 else _dim(i, offset, depth - 1, named=True))
        if (joined := _broadcast(dims)) is not None:
            return joined
    elif node is not None and depth > 0 and node.op in _SHAPE_KEEPING:
        # elementwise, broadcasting: the inputs' dimensions aligned from the right; 1s give way to the others
        dims = set()
        for i in node.inputs:
            if not i.name:  # an optional input left out
                continue
            value = _static(i, 2) if i.shape is None else None  # a Constant node's output has no shape
            rank = len(i.shape) if i.shape is not None else None if value is None else value.ndim
            offset = None if rank is None else axis - (len(shape) - rank)
            dims.add(None if offset is None else 1 if offset < 0 else
                     int(value.shape[offset]) if value is not None else _dim(i, offset, depth - 1, named=True))
        if (joined := _broadcast(dims)) is not None:
            return joined
    traced = None if source is None else _dim(source, axis, depth - 1, named=named)
    return known if traced is None else traced


def _broadcast(dims: set[int | str | None]) -> int | str | None:
    """The broadcast of the inputs' dimensions along one axis: 1s give way to the one other, else None."""
    others = dims - {1}
    if None in others or len(others) > 1:
        return None
    return others.pop() if others else 1


def _scored(t: gs.Tensor, depth: int = 4) -> bool:
    """Whether ``t`` is attention scores: made by :func:`_scores_of_heads`, or those scores masked (Add/Sub/Where)."""
    node = _producer(t)
    if node is None:
        return False
    if _scores_of_heads(node):
        return True
    return depth > 0 and node.op in ("Add", "Sub", "Where") and any(_scored(i, depth - 1) for i in node.inputs)


def _mask(node: gs.Node, kept: frozenset[int]) -> tuple[gs.Tensor, tuple] | str | None:
    """``(scores, mask)`` when ``node`` masks attention scores, else why not ('' for no attention, None for no mask).

    ``mask`` is ``("add", t)`` for ``scores + t``, ``("sub", t)`` for ``scores - t`` (t of rank <= 4), or
    ``("where", cond, fill, fill_where_true)`` for ``Where(cond, fill, scores)`` or ``Where(cond, scores, fill)``
    with a swamping fill (-inf, or <= -1e30). ``scores`` may be masked scores themselves (masks one after another).
    """
    if node.op in ("Add", "Sub"):
        sides = list(zip(node.inputs, node.inputs[::-1], strict=True))[: 1 if node.op == "Sub" else 2]
        found = [(t, o) for t, o in sides if _scored(t) and _only_reader(t, kept) is node]
        if not found:
            return "a mask or bias is added to the scores" if any(_scored(t) for t in node.inputs) else None
        scores, mask = found[0]
        if mask.shape is None or len(mask.shape) > 4:
            return "the mask added to the scores has no known rank of at most 4"
        return scores, (node.op.lower(), mask)
    if node.op == "Where":
        cond, a, b = node.inputs
        for scores, fill in ((b, a), (a, b)):
            if _scored(scores) and _only_reader(scores, kept) is node:
                value = _scalar(fill)
                if value is None or not value <= _SWAMPING_FILL:
                    return "the scores are masked with a fill that does not swamp them (-inf or <= -1e30 does)"
                if cond.shape is None or len(cond.shape) > 4:
                    return "the mask has no known rank of at most 4"
                # Where(c, fill, s) keeps s where c is false: the bias is fill where c is true
                return scores, ("where", cond, np.float32(value), scores is b)
        return None
    return None


class FuseAttention:
    """Replace each matched scaled dot-product attention chain by ``com.microsoft.MultiHeadAttention``.

    Counts ``fused``; one note per Softmax whose chain looked like attention but was left as it is.

    ``masks``: fuse masked attention too (off by default). onnxruntime's CPU kernel leaves its fast path when
    given an ``attention_bias``: alone, [64, 64, 4 x 32] attention took 6.9 ms plain and 11.0-12.1 ms with a
    bias or a padding mask. A BERT-style encoder (2 layers of 128, padding mask, int8) measured within 5% either
    way, sometimes slower: 0.645 vs 0.611x fp32 fused vs kept at batch 64 and sequence 64, 0.819 vs 0.834x at
    batch 1; at sequence 128 0.669 / 0.683 / 0.800 vs 0.696 / 0.673 / 0.819x at batch 64 / 8 / 1 (2 threads).
    No gain to pay for a node other runtimes do not know.
    """

    name = "fuse_attention"

    def __init__(self, *, masks: bool = False) -> None:
        self.masks = masks

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (the node is onnxruntime's; the pass only adds it)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Fuse every chain that matches (module docstring)."""
        fresh = fresh_names(graph_names(graph))
        fused, notes = 0, []
        _DIMS.clear()
        kept = frozenset(id(t) for t in graph.outputs)  # a chain tensor that is a graph output must stay
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            plan = self._match(softmax, kept, masks=self.masks)
            if isinstance(plan, str):
                if plan:
                    notes.append(f"{softmax.name or softmax.outputs[0].name}: attention kept as it is ({plan})")
                continue
            self._rewrite(graph, plan, fresh)
            fused += 1
        _DIMS.clear()
        if fused:
            graph.cleanup().toposort()
        return PassResult(graph, fused > 0, {"fused": fused}, tuple(notes))

    @staticmethod
    def _match(softmax: gs.Node, kept: frozenset[int], *, masks: bool = False) -> dict | str:
        """The chain around ``softmax`` as a plan, or why not ('' where it is no attention at all)."""
        axis = int(softmax.attrs.get("axis", -1))
        fuse_masked, masks, reader, t = masks, [], softmax, softmax.inputs[0]
        while (node := _producer(t)) is not None and node.op in ("Add", "Sub", "Where") and len(masks) < 8:
            found = _mask(node, kept) if _only_reader(t, kept) is reader else None
            if isinstance(found, str):
                return found
            if found is None:
                if masks:  # masked scores that are then added to something else
                    return ""
                break
            reader, (t, mask) = node, found
            masks.append(mask)
        scores = _producer(t)
        scale, qk = 1.0, scores
        if scores is not None and scores.op in ("Mul", "Div") and _only_reader(scores.outputs[0], kept) is reader:
            if _scalar(scores.inputs[1]) is not None:
                c, qk = _scalar(scores.inputs[1]), _producer(scores.inputs[0])
            elif scores.op == "Mul" and _scalar(scores.inputs[0]) is not None:
                c, qk = _scalar(scores.inputs[0]), _producer(scores.inputs[1])
            else:
                return "the scores are scaled by a tensor, not by one number" if any(
                    _scored(i) for i in scores.inputs) else ""
            if not c or not np.isfinite(c):
                return ""
            scale = c if scores.op == "Mul" else 1.0 / c
        if qk is not None and qk.op in ("Add", "Sub", "Where") and any(_scored(i) for i in qk.inputs):
            return "a mask or bias is applied to the scores before they are scaled"
        if qk is None or qk.op != "MatMul":
            return ""
        if _only_reader(qk.outputs[0], kept) is not (reader if qk is scores else scores):
            return ""
        av = _only_reader(softmax.outputs[0], kept)
        if av is None and _scores_of_heads(qk):
            # torch's SDPA with a boolean mask zeroes fully masked rows (IsNaN -> Where) where the node gives NaN
            return "the attention probabilities are read by more than the value MatMul"
        if av is None or av.op != "MatMul" or av.inputs[0] is not softmax.outputs[0]:
            return ""
        q_in, scale_q, q_muls = _peel_scale(qk.inputs[0], kept)
        k_in, scale_k, k_muls = _peel_scale(qk.inputs[1], kept)
        scale *= scale_q * scale_k
        tq, tv = _producer(q_in), _producer(av.inputs[1])
        if _perm(tq) is None:
            return ""
        out = _data_reader(av.outputs[0], kept)  # a Shape may read it (a later reshape's target)
        if out is None:
            return "the attention's output is read before its heads are merged"
        if _perm(tq) != _HEADS_FIRST or _perm(tv) != _HEADS_FIRST or _perm(out) != _HEADS_FIRST:
            return "the heads are laid out otherwise"
        if axis not in (-1, 3):
            return f"softmax over axis {axis}"
        k_split, k_chain = _key_split(k_in)
        if k_split is None:
            return "the keys are laid out otherwise"
        chains = ([tq, *q_muls, qk], [*k_chain, *k_muls, qk], [tv, av])
        if any(_data_reader(a.outputs[0], kept) is not b for c in chains for a, b in zip(c, c[1:], strict=False)):
            return "a transposed head split is read elsewhere too"
        splits = (tq.inputs[0], k_split, tv.inputs[0])
        heads = [_head_shape(s) for s in splits]
        if any(h is None for h in heads):
            return "the number of heads or the head size is not known"
        if len({h[0] for h in heads}) != 1 or heads[0][1] != heads[1][1]:
            return (f"queries, keys and values have {' / '.join(str(h[0]) for h in heads)} heads of "
                    f"{' / '.join(str(h[1]) for h in heads)}: the fused node wants one number of heads")
        if len(k_chain) == 4 and not _folds_heads(k_chain, *heads[1]):
            return "the keys are laid out otherwise"
        dtypes = {t.dtype for t in (*splits, softmax.outputs[0]) if t.dtype is not None}
        if not dtypes:  # onnxruntime's CPU kernel is float32 only: a float16 graph must not get it
            return "the tensor types are not known (infer shapes first)"
        if any(np.dtype(d) != np.float32 for d in dtypes):
            return "not float32"
        if not _same_batch(splits):
            return ("the queries, keys and values may differ in batch size, which MatMul broadcasts and the fused "
                    "node does not")
        for mask in masks:
            if mask[0] != "where" and (mask[1].dtype is None or np.dtype(mask[1].dtype) != np.float32):
                return "the mask added to the scores is not float32"
            lead = 4 - len(mask[1].shape)  # the leading dimensions Add broadcasts as 1
            batch, head = (1 if axis < lead else _dim(mask[1], axis - lead) for axis in (0, 1))
            if batch not in (1, splits[0].shape[0], _dim(splits[0], 0)) or head not in (1, heads[0][0]):
                return "the mask's batch or head dimension is not known to be 1 or the queries'"
        if masks and not fuse_masked:
            return ("a mask is applied to the scores: onnxruntime's MultiHeadAttention with a mask measured no "
                    "faster than the graph's ops")
        return {"splits": splits, "heads": heads[0][0], "v_size": heads[2][1], "scale": scale, "masks": masks,
                "out": out.outputs[0], "inner": (qk, scores, softmax, av, out),
                "transposes": [n for n in (tq, tv, *k_chain) if n.op == "Transpose"]}

    @staticmethod
    def _rewrite(graph: gs.Graph, plan: dict, fresh) -> None:
        heads, v_size = plan["heads"], plan["v_size"]
        to_rows = gs.Constant(fresh("attention_hidden"), np.array([0, 0, -1], np.int64))
        inputs = []
        for split, role in zip(plan["splits"], ("query", "key", "value"), strict=True):
            t = gs.Variable(fresh(f"{split.name}_{role}"), dtype=np.float32)
            graph.nodes.append(gs.Node("Reshape", name=fresh(f"{split.name}_{role}_reshape"),
                                       inputs=[split, to_rows], outputs=[t]))
            inputs.append(t)
        if plan["masks"]:
            inputs += [gs.Variable.empty(), gs.Variable.empty(), FuseAttention._bias(graph, plan, fresh)]
        y = plan["out"]
        merged = gs.Variable(fresh(f"{y.name}_merged"), dtype=np.float32,
                             shape=None if y.shape is None else [*y.shape[:2], heads * v_size])
        graph.nodes.append(gs.Node("MultiHeadAttention", name=fresh(f"{y.name}_attention"), domain="com.microsoft",
                                   inputs=inputs, outputs=[merged],
                                   attrs={"num_heads": heads, "scale": float(plan["scale"])}))
        back = gs.Constant(fresh("attention_heads"), np.array([0, 0, heads, v_size], np.int64))
        producer = plan["inner"][-1]
        producer.outputs.clear()  # the old chain loses its output and is cleaned up
        for transpose in plan["transposes"]:  # shapes read off the chain (dynamo's masks, reshape targets)
            FuseAttention._shape_of(graph, transpose.outputs[0], transpose.inputs[0], _perm(transpose), fresh)
        # the head-first output (a TorchScript export reads its shape for the merge): y transposed back
        FuseAttention._shape_of(graph, plan["inner"][3].outputs[0], y, _HEADS_FIRST, fresh)
        graph.nodes.append(gs.Node("Reshape", name=fresh(f"{y.name}_split"), inputs=[merged, back], outputs=[y]))
        log.debug("fuse_attention: %s (%d heads, scale %g, masks %s)", y.name, heads, plan["scale"],
                  [m[0] for m in plan["masks"]])

    @staticmethod
    def _shape_of(graph: gs.Graph, tensor: gs.Tensor, source: gs.Tensor, perm: list[int], fresh) -> None:
        """Read each ``Shape`` of ``tensor`` (``Transpose[perm](source)`` in value) off ``source``.

        ``Shape(Transpose[p](x)) = Gather(Shape(x), p)``, so the chain's nodes die with it.
        """
        for shape in [n for n in tensor.outputs if n.op == "Shape"]:
            whole = gs.Variable(fresh(f"{shape.name}_input"), dtype=np.int64)
            perm_t = gs.Constant(fresh(f"{shape.name}_perm"), np.array(perm, np.int64))
            permuted = gs.Variable(fresh(f"{shape.name}_permuted"), dtype=np.int64)
            out = shape.outputs[0]
            start, end = int(shape.attrs.get("start", 0)), shape.attrs.get("end")
            nodes = [gs.Node("Shape", name=fresh(shape.name), inputs=[source], outputs=[whole]),
                     gs.Node("Gather", name=fresh(f"{shape.name}_gather"), inputs=[whole, perm_t],
                             outputs=[permuted], attrs={"axis": 0})]
            if start != 0 or end is not None:
                bounds = [gs.Constant(fresh(f"{shape.name}_start"), np.array([start], np.int64)),
                          gs.Constant(fresh(f"{shape.name}_end"),
                                      np.array([np.iinfo(np.int64).max if end is None else int(end)], np.int64))]
                nodes.append(gs.Node("Slice", name=fresh(f"{shape.name}_slice"), inputs=[permuted, *bounds],
                                     outputs=[out]))
            else:
                nodes[-1].outputs = [out]
            shape.outputs.clear()
            graph.nodes.extend(nodes)

    @staticmethod
    def _bias(graph: gs.Graph, plan: dict, fresh) -> gs.Tensor:
        """The mask as MultiHeadAttention's ``attention_bias``, ``[B or 1, H or 1, S, L]``.

        The kernel broadcasts the first two dimensions only, where the graph's Add broadcast all four.
        """
        def node(op: str, inputs: list, dtype, **attrs) -> gs.Variable:
            out = gs.Variable(fresh(f"attention_bias_{op.lower()}"), dtype=dtype)
            graph.nodes.append(gs.Node(op, name=fresh(f"attention_bias_{op.lower()}"), inputs=inputs, outputs=[out],
                                       attrs=attrs))
            return out

        parts = []
        for kind, mask, *where in plan["masks"]:
            if kind == "where":  # fill where the scores were replaced, 0 where they were kept
                fill = gs.Constant(fresh("attention_fill"), np.array(where[0], np.float32))
                zero = gs.Constant(fresh("attention_zero"), np.array(0, np.float32))
                mask = node("Where", [mask, fill, zero] if where[1] else [mask, zero, fill], np.float32)
            elif kind == "sub":
                mask = node("Neg", [mask], np.float32)
            parts.append(mask)
        bias = parts[0]
        for part in parts[1:]:  # masks one after another add up (a -inf stays -inf)
            bias = node("Add", [bias, part], np.float32)
        rank = max(len(m[1].shape) for m in plan["masks"])
        if rank < 4:
            bias = node("Unsqueeze", [bias, gs.Constant(fresh("attention_axes"), np.arange(4 - rank, dtype=np.int64))],
                        np.float32)
        q_split, k_split = plan["splits"][0], plan["splits"][1]
        rows, cols = q_split.shape[1], k_split.shape[1]
        if isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0:
            target = gs.Constant(fresh("attention_bias_shape"), np.array([1, 1, rows, cols], np.int64))
        else:  # the sequence lengths at run time
            one = gs.Constant(fresh("attention_one"), np.array([1], np.int64))
            two = gs.Constant(fresh("attention_two"), np.array([2], np.int64))
            lengths = [node("Slice", [node("Shape", [split], np.int64), one, two], np.int64)
                       for split in (q_split, k_split)]
            target = node("Concat", [gs.Constant(fresh("attention_ones"), np.array([1, 1], np.int64)), *lengths],
                          np.int64, axis=0)
        return node("Expand", [bias, target], np.float32)
