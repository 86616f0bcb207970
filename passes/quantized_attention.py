"""Run a fused attention's int8 query/key/value projections and the attention as one ``QAttention``.

After ``FuseAttention`` and ``InsertQDQ`` an attention block of a token-wise (``FlattenTokens``) transformer reads::

    x_q (uint8) -> DQ -> Gemm(DQ(W_q), DQ(b_q)) -> Reshape[-1, S, N] -> query --+
                     -> Gemm(DQ(W_k), DQ(b_k)) -> Reshape[-1, S, N] -> key   --+-> MultiHeadAttention -> y
                     -> Gemm(DQ(W_v), DQ(b_v)) -> Reshape[-1, S, N] -> value --+

(or, where the tokens stay ``[B, S, K]``, ``Reshape[0, 0, -1](Add(MatMul(DQ(x_q), DQ(W)), b))`` each; or, from
``quantize``'s dynamic int8, ``Add(Cast(MatMulInteger(x_q, W)) * (s_x * s_w), b)`` with ``x_q, s_x, z_x`` the outputs
of one ``DynamicQuantizeLinear``, which QAttention then reads at run time).

onnxruntime runs that as three ``QGemm`` kernels with float outputs and one ``MultiHeadAttention``. Its
``com.microsoft.QAttention`` computes the same three integer products, ``(x_q - z_x) (W - z_w) s_x s_w + b``,
from one weight ``[K, 3N]`` (the three side by side, per-column scales side by side), then the same
``softmax(c q kᵀ) v`` per head::

    x_q (uint8) -> Reshape[-1, S, K] -> QAttention(W = [W_q | W_k | W_v], b = [b_q | b_k | b_v]) -> y
                   (no Reshape where x_q is [B, S, K])

The weights are the very int8 values ``InsertQDQ`` chose; the int32 biases become ``b_int32 * s_x * s_w`` in float.
So the outputs agree to float rounding: on the reference transformer the logits move by at most 2.7e-3, and
its SQNR against the float model reads 43.17 dB against 43.16 (the quantization noise is ~0.06).

Why: one kernel instead of four, and one pass over ``x_q``. Measured on the reference transformer (2 threads,
interleaved against the float model, the bench's session options): 0.62 -> 0.58x fp32 at batch 1 in five
runs; at batch 64 within noise (0.653 -> 0.639 in 60 paired repeats: onnxruntime's QAttention multiplies
``q kᵀ`` with its plain attention path, where MultiHeadAttention has a flash kernel, and that eats the saving).
Dynamic int8: 0.633 / 0.662 / 0.758 -> 0.597 / 0.620 / 0.650x at batch 1, at batch 64 0.621 -> 0.635 (60 paired
repeats), 41.36 dB either way.

Left as they are (debug log says why): attention with a mask or a bias, queries, keys and values that differ
in width or read different inputs, int8 activations (the CPU kernel takes uint8), non-zero weight zero points,
Gemms with ``transA``, ``alpha`` or ``beta`` other than the defaults, projections or views read elsewhere too.
The node is onnxruntime's own, as ``MultiHeadAttention`` is; the QAT bridge does not train it (``quantize``'s
``quantized_attention=False`` keeps the Gemms).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names
from onnxpress.passes.qdq import _dq_of, _present  # the QDQ graph's own readers (pad_input_channels shares them)

__all__ = ["FuseQuantizedAttention"]

log = logging.getLogger(__name__)


class FuseQuantizedAttention:
    """Fold the int8 projections of each fused attention into onnxruntime's ``QAttention`` (module docstring)."""

    name = "quantized_attention"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite each eligible MultiHeadAttention; the count is ``fused``."""
        fresh = fresh_names(graph_names(graph))
        outputs = {id(t) for t in graph.outputs}
        fused = 0
        for node in [n for n in graph.nodes if n.op == "MultiHeadAttention" and n.domain == "com.microsoft"]:
            plan = _match(node, outputs)
            if isinstance(plan, str):
                log.debug("quantized_attention: %s: %s", node.name, plan)
                continue
            _rewrite(graph, node, plan, fresh)
            fused += 1
        return PassResult(graph, fused > 0, {"fused": fused})


def _match(mha: gs.Node, outputs: set[int]) -> dict | str:
    """The pieces of the rewrite, or why ``mha`` stays."""
    if len(mha.inputs) != 3 or any(not t.name for t in mha.inputs) or len(mha.outputs) != 1:
        return "a mask, bias or cache input or output"
    if int(mha.attrs.get("unidirectional", 0)):
        return "unidirectional"
    projections = []
    for t in mha.inputs:
        found = _projection(t, outputs)
        if isinstance(found, str):
            return found
        projections.append(found)
    if len({tuple(map(id, p["source"])) for p in projections}) != 1:
        return "queries, keys and values are projections of different tensors"
    widths = {p["w"].shape[1] for p in projections}
    seqs = {p["seq"] for p in projections}
    if len(widths) != 1 or len(seqs) != 1:
        return "queries, keys and values differ in width, sequence length or form"
    heads = int(mha.attrs.get("num_heads", 0))
    if heads <= 0 or projections[0]["w"].shape[1] % heads:
        return "the number of heads does not divide the width"
    x_q, s_x, z_x = projections[0]["source"]
    if x_q.inputs and x_q.inputs[0].op == "DynamicQuantizeLinear":  # uint8, per tensor, at run time
        return {"projections": projections, "x_q": x_q, "s_x": s_x, "z_x": z_x}
    if not isinstance(s_x, gs.Constant) or (z_x is not None and not isinstance(z_x, gs.Constant)):
        return "the input's scale or zero point is not a constant"
    dtype = np.asarray(z_x.values).dtype if z_x is not None else x_q.dtype  # without one, QuantizeLinear gives uint8
    if dtype is None or np.dtype(dtype) != np.uint8:
        return "the projections' input is not uint8 (QAttention's CPU kernel takes uint8 inputs)"
    if np.asarray(s_x.values).size != 1 or (z_x is not None and np.asarray(z_x.values).size != 1):
        return "the input is not quantized per tensor"
    return {"projections": projections, "x_q": x_q, "s_x": s_x, "z_x": z_x}


def _projection(t: gs.Tensor, outputs: set[int]) -> dict | str:
    """``t`` is a projection of a quantized tensor, read by the attention only: its pieces, else why not.

    Two forms: ``Reshape[-1, S, N](Gemm(DQ(x), DQ(W int8), bias))`` of token rows (``FlattenTokens``), and
    ``Reshape[0, 0, -1 | N](Add(MatMul(DQ(x), DQ(W int8)), b))`` of ``x[B, S, K]`` (``seq`` is None then).
    """
    if len(t.inputs) != 1 or t.inputs[0].op != "Reshape" or len(t.outputs) != 1 or id(t) in outputs:
        return "a query, key or value is not a view of a projection read by the attention only"
    reshape = t.inputs[0]
    if not isinstance(reshape.inputs[1], gs.Constant) or int(reshape.attrs.get("allowzero", 0)):
        return "a view's shape is computed at run time"
    s = [int(v) for v in np.asarray(reshape.inputs[1].values).ravel()]
    made = reshape.inputs[0]
    if len(made.inputs) != 1 or len(made.outputs) != 1 or id(made) in outputs:
        return "a projection is read elsewhere too"
    layer = made.inputs[0]
    # [-1, S, N]: the input viewed as [-1, S, K] gives the same rows (a dense layer is token-wise); [0, 0, -1 | N]
    # of a [B, S, N] output: the input is [B, S, K] already
    seq = s[1] if len(s) == 3 and s[0] == -1 and s[1] > 0 else None
    if len(s) != 3 or (seq is None and s[:2] != [0, 0]):
        return "a query, key or value is not a [-1, S, N] or [0, 0, -1] view"
    if layer.op == "Gemm" and seq is not None:
        if (int(layer.attrs.get("transA", 0)) or float(layer.attrs.get("alpha", 1.0)) != 1.0
                or float(layer.attrs.get("beta", 1.0)) != 1.0):
            return "a projection Gemm has transA, alpha or beta"
        x, w_dq, trans_b = layer.inputs[0], layer.inputs[1], bool(int(layer.attrs.get("transB", 0)))
        bias_t = layer.inputs[2] if len(layer.inputs) > 2 else None
    elif layer.op in ("Add", "MatMul", "Mul"):
        matmul, bias_t = layer, None
        if layer.op == "Add":
            found = [i for i, u in enumerate(layer.inputs) if u.inputs and u.inputs[0].op in ("MatMul", "Mul")]
            if len(found) != 1 or len(layer.inputs[found[0]].outputs) != 1:
                return "a projection's bias Add does not read a MatMul"
            matmul, bias_t = layer.inputs[found[0]].inputs[0], layer.inputs[1 - found[0]]
        if matmul.op == "Mul":  # quantize's dynamic int8: Cast(MatMulInteger(x_q, W)) * (s_x * s_w)
            return _dynamic_projection(matmul, bias_t, s, seq)
        if matmul.op != "MatMul":
            return "a projection is not a MatMul"
        x, w_dq, trans_b = matmul.inputs[0], matmul.inputs[1], False
    else:
        return "a query, key or value is not a view of a Gemm or MatMul"
    if seq is None and (x.shape is None or len(x.shape) != 3):
        return "a projection's input is not known to be [batch, sequence, features]"
    source = _dq_inputs(x)
    if source is None:
        return "a projection's input is not quantized"
    weight = _int8_weight(w_dq, trans_b)
    if isinstance(weight, str):
        return weight
    w, scale = weight
    n = w.shape[1]
    if s[2] not in (-1, n):
        return "a view's width is not its projection's"
    bias = _bias(bias_t, n)
    if isinstance(bias, str):
        return bias
    return {"source": source, "w": w, "scale": scale, "bias": bias, "seq": seq}


def _dynamic_projection(mul: gs.Node, bias_t: gs.Tensor | None, view: list[int], seq: int | None) -> dict | str:
    """``Mul(Cast(MatMulInteger(x_q, W, z_x, z_w)), Mul(s_x, s_w))`` of ``DynamicQuantizeLinear(x)``: its pieces."""
    cast = next((u.inputs[0] for u in mul.inputs if u.inputs and u.inputs[0].op == "Cast"), None)
    scales = next((u.inputs[0] for u in mul.inputs if u.inputs and u.inputs[0].op == "Mul"), None)
    if cast is None or scales is None or not cast.inputs[0].inputs or cast.inputs[0].inputs[0].op != "MatMulInteger":
        return "a projection is not an integer MatMul"
    integer = cast.inputs[0].inputs[0]
    if len(integer.inputs) != 4 or any(len(u.outputs) != 1 for u in (cast.inputs[0], cast.outputs[0])):
        return "a projection's integer MatMul has no zero points or is read elsewhere too"
    x_q, q, z_x, z_w = integer.inputs
    if seq is None and (x_q.shape is None or len(x_q.shape) != 3):
        return "a projection's input is not known to be [batch, sequence, features]"
    made = x_q.inputs[0] if x_q.inputs else None
    if made is None or made.op != "DynamicQuantizeLinear" or made.outputs[2] is not z_x:
        return "a projection's input is not quantized by DynamicQuantizeLinear"
    s_x = made.outputs[1]
    s_w = [u for u in scales.inputs if u is not s_x]
    if len(s_w) != 1 or len(scales.inputs) != 2 or not isinstance(s_w[0], gs.Constant):
        return "a projection's scale is not the input's times a constant"
    if not isinstance(q, gs.Constant) or not _zero(z_w):
        return "a projection's weight is not an int8 constant with zero points 0"
    w = np.asarray(q.values)
    scale = np.asarray(s_w[0].values, np.float32).ravel()
    if w.dtype != np.int8 or w.ndim != 2 or scale.size not in (1, w.shape[1]) or view[2] not in (-1, w.shape[1]):
        return "a projection's weight is not a 2-D int8 constant quantized per column"
    bias = _bias(bias_t, w.shape[1])
    if isinstance(bias, str):
        return bias
    return {"source": (x_q, s_x, z_x), "w": w, "scale": np.broadcast_to(scale, (w.shape[1],)).astype(np.float32),
            "bias": bias, "seq": seq}


def _int8_weight(t: gs.Tensor, trans_b: bool) -> tuple[np.ndarray, np.ndarray] | str:
    """The int8 ``[K, N]`` weight and its ``[N]`` scales behind ``DQ(t)``, else why not."""
    parts = _dq_inputs(t)
    if parts is None:
        return "a projection's weight is not quantized"
    q, scale, zp = parts
    if not isinstance(q, gs.Constant) or not isinstance(scale, gs.Constant):
        return "a projection's weight is not a constant"
    w = np.asarray(q.values)
    if w.dtype != np.int8 or w.ndim != 2:
        return "a projection's weight is not a 2-D int8 constant"
    if not _zero(zp):
        return "a projection's weight has a non-zero zero point"
    dq = t.inputs[0]
    s = np.asarray(scale.values, np.float32)
    if trans_b:
        w = w.T
    if s.size not in (1, w.shape[1]) or (s.size > 1 and int(dq.attrs.get("axis", 1)) % 2 != (0 if trans_b else 1)):
        return "a projection's weight is quantized along its inputs"
    return np.ascontiguousarray(w), np.broadcast_to(s.ravel(), (w.shape[1],)).astype(np.float32)


def _bias(t: gs.Tensor | None, n: int) -> np.ndarray | str:
    """The float ``[N]`` bias: zeros, a float constant, or ``DQ(int32 constant)`` dequantized."""
    if t is None or not t.name:
        return np.zeros(n, np.float32)
    if isinstance(t, gs.Constant):
        b = np.asarray(t.values)
        return b.astype(np.float32).ravel() if b.dtype.kind == "f" and b.size == n else "a bias of another shape"
    parts = _dq_inputs(t)
    if parts is None:
        return "a projection's bias is computed at run time"
    q, scale, zp = parts
    if not isinstance(q, gs.Constant) or not isinstance(scale, gs.Constant) or np.asarray(q.values).size != n:
        return "a projection's bias is not a constant"
    if not _zero(zp):
        return "a projection's bias has a non-zero zero point"
    values = np.asarray(q.values).astype(np.float64).ravel() * np.asarray(scale.values, np.float64).ravel()
    return values.astype(np.float32)


def _dq_inputs(t: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor | None] | None:
    """``(x, scale, zero point or None)`` of the DequantizeLinear that makes ``t``, else None."""
    dq = _dq_of(t)
    if dq is None:
        return None
    return dq.inputs[0], dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 and _present(dq.inputs[2]) else None


def _zero(zp: gs.Tensor | None) -> bool:
    """Whether a zero point is absent or a constant of zeros."""
    return zp is None or (isinstance(zp, gs.Constant) and not np.any(np.asarray(zp.values)))


def _rewrite(graph: gs.Graph, mha: gs.Node, plan: dict, fresh) -> None:
    projections = plan["projections"]
    k, seq = projections[0]["w"].shape[0], projections[0]["seq"]
    name = mha.name or "attention"
    rows = plan["x_q"]  # [B, S, K] already, or token rows [B*S, K] to view as [B, S, K]
    if seq is not None:
        rows = gs.Variable(fresh(f"{name}_tokens"), dtype=np.uint8)
        graph.nodes.append(gs.Node("Reshape", name=fresh(f"{name}_tokens"), outputs=[rows],
                                   inputs=[plan["x_q"], gs.Constant(fresh(f"{name}_tokens_shape"),
                                                                    np.array([-1, seq, k], np.int64))]))
    weight = gs.Constant(fresh(f"{name}_qkv_weight"), np.concatenate([p["w"] for p in projections], axis=1))
    scale = gs.Constant(fresh(f"{name}_qkv_scale"), np.concatenate([p["scale"] for p in projections]))
    bias = gs.Constant(fresh(f"{name}_qkv_bias"), np.concatenate([p["bias"] for p in projections]))
    zero_w = gs.Constant(fresh(f"{name}_qkv_zero_point"), np.array(0, np.int8))
    z_x = plan["z_x"] if plan["z_x"] is not None else gs.Constant(fresh(f"{name}_zero_point"), np.array(0, np.uint8))
    attrs = {"num_heads": int(mha.attrs["num_heads"])}
    if "scale" in mha.attrs:
        attrs["scale"] = float(mha.attrs["scale"])
    y = mha.outputs[0]
    mha.outputs.clear()  # the attention, its views and the Gemms lose their readers and are cleaned up
    graph.nodes.append(gs.Node("QAttention", name=fresh(f"{name}_int8"), domain="com.microsoft", attrs=attrs,
                               inputs=[rows, weight, bias, plan["s_x"], scale, gs.Variable.empty(), z_x, zero_w],
                               outputs=[y]))
