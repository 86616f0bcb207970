"""Run a transformer's scaled dot-product attention as onnxruntime's fused ``MultiHeadAttention``.

Exporters write attention as a dozen small ops. For each head split of the projected queries,
keys and values (``Reshape`` to ``[B, S, H, d]``)::

    s = Softmax(Mul(MatMul(Transpose[0,2,1,3](q), Transpose[0,2,3,1](k)), c))     (or Div by c, or no scale)
    y = Transpose[0,2,1,3](MatMul(s, Transpose[0,2,1,3](v)))

(``k`` may also be ``Transpose[0,2,1,3]`` then ``Transpose[0,1,3,2]``, or, as torch's dynamo export writes
``scaled_dot_product_attention``, ``Transpose[0,2,1,3]``, ``Reshape[B*H, L, d]``, ``Transpose[0,2,1]``,
``Reshape[B, H, d, L]``; scalar ``Mul``s on ``q`` and ``k`` multiply into the scale, and without any the
scale is 1). This pass replaces the whole chain by one ``com.microsoft.MultiHeadAttention`` node
(``num_heads = H``, ``scale = c`` or ``1 / c``) that reads ``q``, ``k`` and ``v`` as ``[B, S, H*d]``
(a ``Reshape[0, 0, -1]`` of the head split, free in onnxruntime) and writes ``[B, S, H*d]``, which a
``Reshape[0, 0, H, d]`` turns back into ``y``. The same arithmetic (softmax(c q kᵀ) v per head),
so outputs agree to float rounding (measured max |Δ| 1.4e-6 on the reference transformer's logits).

Why: onnxruntime's CPU provider runs the chain as FusedMatMul, Softmax, MatMul and two to four
Transposes, each a pass over ``[B, H, S, S]`` or ``[B, H, S, d]`` tensors; its MultiHeadAttention
kernel does it in one. Measured on the reference transformer (batch 64, 1 thread, interleaved,
a loaded 2-core box): the original 1.0 -> 0.90-0.92x; its 0.5-MACs low-rank split 0.613-0.649x ->
0.585-0.613x; at batch 1 0.634-0.670 -> 0.606-0.634x; at 2 threads 0.623-0.713 -> 0.584-0.665x.

Left as they are, with a note: attention with a mask or bias added to the scores (an ``Add``
before the Softmax), queries, keys and values whose batch sizes are not known to be equal (a fixed
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
    """The value of a constant holding one number, else None."""
    if isinstance(t, gs.Constant) and t.values.size == 1 and np.issubdtype(t.values.dtype, np.floating):
        return float(np.asarray(t.values).reshape(-1)[0])
    return None


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
    batches = [s.shape[0] if s.shape is not None and len(s.shape) == 4 else None for s in splits]
    return batches[0] is not None and batches[0] != -1 and all(b == batches[0] for b in batches)


def _folds_heads(chain: list[gs.Node], heads: int, size: int) -> bool:
    """Whether the SDPA key chain's Reshapes are ``[B*H, L, d]`` and ``[B, H, d, L]`` (known shapes only)."""
    folded, back = chain[1].outputs[0].shape, chain[3].outputs[0].shape
    return (folded is not None and len(folded) == 3 and folded[2] == size
            and back is not None and len(back) == 4 and back[1] == heads and back[2] == size)


def _scores_of_heads(node: gs.Node | None) -> bool:
    """Whether ``node`` makes attention scores: a MatMul of two Transposes, or a scalar Mul/Div of one."""
    if node is not None and node.op in ("Mul", "Div"):
        node = _producer(node.inputs[0])
    return node is not None and node.op == "MatMul" and all(_perm(_producer(t)) is not None for t in node.inputs)


class FuseAttention:
    """Replace each matched scaled dot-product attention chain by ``com.microsoft.MultiHeadAttention``.

    Counts ``fused``; one note per Softmax whose chain looked like attention but was left as it is.
    """

    name = "fuse_attention"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (the node is onnxruntime's; the pass only adds it)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Fuse every chain that matches (module docstring)."""
        fresh = fresh_names(graph_names(graph))
        fused, notes = 0, []
        kept = frozenset(id(t) for t in graph.outputs)  # a chain tensor that is a graph output must stay
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            plan = self._match(softmax, kept)
            if isinstance(plan, str):
                if plan:
                    notes.append(f"{softmax.name or softmax.outputs[0].name}: attention kept as it is ({plan})")
                continue
            self._rewrite(graph, plan, fresh)
            fused += 1
        if fused:
            graph.cleanup().toposort()
        return PassResult(graph, fused > 0, {"fused": fused}, tuple(notes))

    @staticmethod
    def _match(softmax: gs.Node, kept: frozenset[int]) -> dict | str:
        """The chain around ``softmax`` as a plan, or why not ('' where it is no attention at all)."""
        axis = int(softmax.attrs.get("axis", -1))
        scores = _producer(softmax.inputs[0])
        scale, qk = 1.0, scores
        if scores is not None and scores.op in ("Mul", "Div") and _only_reader(scores.outputs[0], kept) is softmax:
            if _scalar(scores.inputs[1]) is not None:
                c, qk = _scalar(scores.inputs[1]), _producer(scores.inputs[0])
            elif scores.op == "Mul" and _scalar(scores.inputs[0]) is not None:
                c, qk = _scalar(scores.inputs[0]), _producer(scores.inputs[1])
            else:
                return ""
            if not c or not np.isfinite(c):
                return ""
            scale = c if scores.op == "Mul" else 1.0 / c
        elif scores is not None and scores.op == "Add":
            if any(_scores_of_heads(_producer(t)) for t in scores.inputs):
                return "a mask or bias is added to the scores"
            return ""
        if qk is None or qk.op != "MatMul":
            return ""
        if _only_reader(qk.outputs[0], kept) is not (softmax if qk is scores else scores):
            return ""
        av = _only_reader(softmax.outputs[0], kept)
        if av is None or av.op != "MatMul" or av.inputs[0] is not softmax.outputs[0]:
            return ""
        q_in, scale_q, q_muls = _peel_scale(qk.inputs[0], kept)
        k_in, scale_k, k_muls = _peel_scale(qk.inputs[1], kept)
        scale *= scale_q * scale_k
        tq, tv = _producer(q_in), _producer(av.inputs[1])
        if _perm(tq) is None:
            return ""
        out = _only_reader(av.outputs[0], kept)
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
        if any(h is None for h in heads) or len({h[0] for h in heads}) != 1 or heads[0][1] != heads[1][1]:
            return "the number of heads or the head size is not known"
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
        return {"splits": splits, "heads": heads[0][0], "v_size": heads[2][1], "scale": scale,
                "out": out.outputs[0], "inner": (qk, scores, softmax, av, out)}

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
        y = plan["out"]
        merged = gs.Variable(fresh(f"{y.name}_merged"), dtype=np.float32,
                             shape=None if y.shape is None else [*y.shape[:2], heads * v_size])
        graph.nodes.append(gs.Node("MultiHeadAttention", name=fresh(f"{y.name}_attention"), domain="com.microsoft",
                                   inputs=inputs, outputs=[merged],
                                   attrs={"num_heads": heads, "scale": float(plan["scale"])}))
        back = gs.Constant(fresh("attention_heads"), np.array([0, 0, heads, v_size], np.int64))
        producer = plan["inner"][-1]
        producer.outputs.clear()  # the old chain loses its output and is cleaned up
        graph.nodes.append(gs.Node("Reshape", name=fresh(f"{y.name}_split"), inputs=[merged, back], outputs=[y]))
        log.debug("fuse_attention: %s (%d heads, scale %g)", y.name, heads, plan["scale"])
