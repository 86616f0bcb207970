"""Einsum layers with a constant weight as MatMul, so quantization can take them.

``torch.einsum`` exports as an ONNX ``Einsum`` (dynamo and TorchScript alike), and neither onnxruntime's
quantizer nor ours has an integer Einsum: a projection written ``einsum("btd,dhk->bthk", x, W)`` stayed
float. For two operands, one of them a constant ``W``, each index is one of

    batch       in x and the output        (kept)
    contracted  in x and W                 (summed)
    free        in W and the output        (W's output features)

and the Einsum is a MatMul of ``x`` (its batch axes in output order, then the contracted ones, the
contracted ones merged by a Reshape) with ``W`` laid out as ``[prod(contracted), prod(free)]`` (done
once, in numpy), followed by a Reshape that splits the free axes and a Transpose when the output
interleaves batch and free axes. Each Transpose and Reshape is left out when it would do nothing. An
ellipsis is taken in the common Linear form ``...d,dk->...k`` (one contracted, one free index).

Declined (left as Einsum): more than two operands, no constant operand, a repeated index in one
operand (a diagonal), an index in only one operand and not the output (a reduction), an index in all
three (a weight batched per index, as per-head weights), other ellipsis forms, non-float32 weights.

The rewrite is exact up to float summation order (tested against onnxruntime's Einsum, <= 1e-5
relative). onnxruntime runs the MatMul form about as fast in float (``btd,dhk->bthk`` on [16, 128,
256] x [256, 4, 64]: 602 vs 574 us); the gain is that int8 then applies.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names

__all__ = ["EinsumToMatMul", "einsum_plan"]


def einsum_plan(equation: str, weight_shape: tuple[int, ...], weight_first: bool) -> dict[str, object] | None:
    """How ``equation`` (x and a constant weight) becomes a MatMul, or None when it is not that form.

    Returns ``x_perm`` (None: identity), ``keep`` (batch axes of x kept by the Reshape),
    ``contracted`` sizes, ``w_perm`` (weight axes: contracted, then free, in output order), ``free``
    sizes, ``out_perm`` (None: identity), ``ellipsis``.
    """
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    w_sub, x_sub = (ops[0], ops[1]) if weight_first else (ops[1], ops[0])
    ellipsis = "..." in x_sub or "..." in out
    if "..." in w_sub:
        return None
    if ellipsis:
        if not (x_sub.startswith("...") and out.startswith("...")):
            return None
        x_sub, out = x_sub[3:], out[3:]
    for sub in (x_sub, w_sub, out):
        if not sub.isalpha() or len(set(sub)) != len(sub):
            return None
    if len(w_sub) != len(weight_shape):
        return None
    xs, ws, os_ = set(x_sub), set(w_sub), set(out)
    if (xs - ws - os_) or (ws - xs - os_) or (xs & ws & os_) or (os_ - xs - ws):
        return None  # a reduction over one operand, a batched weight, or an output index from nowhere
    contracted = [i for i in x_sub if i in ws]
    free = [i for i in out if i in ws]
    batch = [i for i in out if i in xs]
    if not contracted or not free:
        return None
    if ellipsis and (len(contracted) != 1 or len(free) != 1 or batch or x_sub != contracted[0] or out != free[0]):
        return None
    x_order = [x_sub.index(i) for i in batch + contracted]
    x_perm = None if x_order == sorted(x_order) else x_order
    w_perm = [w_sub.index(i) for i in contracted + free]
    size = dict(zip(w_sub, weight_shape, strict=True))
    produced = batch + free
    out_perm = [produced.index(i) for i in out]
    return {
        "x_perm": x_perm,
        "keep": len(batch),
        "contracted": [size[i] for i in contracted],
        "w_perm": w_perm,
        "free": [size[i] for i in free],
        "out_perm": None if out_perm == sorted(out_perm) else out_perm,
        "ellipsis": ellipsis,
    }


class EinsumToMatMul:
    """Rewrite two-operand Einsums with a constant float32 operand as MatMul (see the module docstring)."""

    name = "einsum_to_matmul"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite in place; count the Einsums rewritten."""
        fresh = None
        rewritten = 0
        for node in list(graph.nodes):
            if node.op != "Einsum" or len(node.inputs) != 2:
                continue
            consts = [isinstance(t, gs.Constant) and np.asarray(t.values).dtype == np.float32 for t in node.inputs]
            if consts.count(True) != 1:
                continue
            weight_first = consts[0]
            w_t, x = (node.inputs[0], node.inputs[1]) if weight_first else (node.inputs[1], node.inputs[0])
            w = np.asarray(w_t.values)
            plan = einsum_plan(str(node.attrs.get("equation", "")), w.shape, weight_first)
            if plan is None:
                continue
            fresh = fresh_names(graph_names(graph)) if fresh is None else fresh
            label = node.name or node.outputs[0].name
            y = node.outputs[0]
            k, n = math.prod(plan["contracted"]), math.prod(plan["free"])
            weight = gs.Constant(fresh(f"{w_t.name}_matmul"),
                                 np.ascontiguousarray(w.transpose(plan["w_perm"]).reshape(k, n)))  # fmt: skip
            nodes: list[gs.Node] = []
            cur = x
            if plan["x_perm"] is not None:
                t = gs.Variable(fresh(f"{label}_x_perm"), dtype=np.float32)
                nodes.append(gs.Node("Transpose", fresh(f"{label}_Transpose_x"), {"perm": plan["x_perm"]}, [cur], [t]))
                cur = t
            if len(plan["contracted"]) > 1:
                shape = gs.Constant(fresh(f"{label}_x_shape"), np.array([0] * plan["keep"] + [k], np.int64))
                t = gs.Variable(fresh(f"{label}_x_rows"), dtype=np.float32)
                nodes.append(gs.Node("Reshape", fresh(f"{label}_Reshape_x"), {}, [cur, shape], [t]))
                cur = t
            last_split = len(plan["free"]) > 1
            mm = gs.Variable(fresh(f"{label}_matmul"), dtype=np.float32) if last_split or plan["out_perm"] else y
            nodes.append(gs.Node("MatMul", fresh(f"{label}_MatMul"), {}, [cur, weight], [mm]))
            cur = mm
            if last_split:
                shape = gs.Constant(fresh(f"{label}_y_shape"), np.array([0] * plan["keep"] + plan["free"], np.int64))
                t = y if plan["out_perm"] is None else gs.Variable(fresh(f"{label}_y_split"), dtype=np.float32)
                nodes.append(gs.Node("Reshape", fresh(f"{label}_Reshape_y"), {}, [cur, shape], [t]))
                cur = t
            if plan["out_perm"] is not None:
                perm = {"perm": plan["out_perm"]}
                nodes.append(gs.Node("Transpose", fresh(f"{label}_Transpose_y"), perm, [cur], [y]))
            node.outputs.clear()
            node.inputs.clear()
            graph.nodes.extend(nodes)
            rewritten += 1
        if rewritten:
            graph.cleanup().toposort()
        return PassResult(graph, rewritten > 0, {"rewritten": rewritten})
