"""InsertQDQ: QuantizeLinear/DequantizeLinear pairs from a calibration table.

For a tensor ``x`` with calibrated range ``[lo, hi]`` (widened to contain 0) and an integer type
with limits ``[q_min, q_max]``::

    uint8 (asymmetric):  s = (hi - lo) / 255,          z = round(-lo / s)   clipped to [0, 255]
    int8  (symmetric):   s = max(|lo|, |hi|) / 127,    z = 0
    Q(x)  = clip(round(x / s) + z, q_min, q_max),      DQ(q) = (q - z) * s

so that ``|DQ(Q(x)) - x| <= s / 2`` inside the range. Weights are int8, symmetric, per output
channel (``s_c = max|W_c| / 127``) or per tensor; a bias becomes int32 with ``s_b,c = s_x * s_w,c``
and zero point 0, so ``Conv(DQ(x), DQ(W)) + DQ(b)`` is exactly what an integer kernel accumulates.

Before / after on a Conv -> Relu feeding another Conv::

    x -> Conv(W, b) -> Relu -> y -> Conv(W2, b2) -> ...
    x -> Q -> DQ -> Conv(DQ(Wq), DQ(bq)) -> Relu -> y -> Q -> DQ -> Conv(DQ(W2q), DQ(b2q)) -> ...

The placement follows what onnxruntime's CPU provider fuses (``QDQSelectorActionTransformer``):

- ``DQ -> Conv -> Q`` becomes QLinearConv, ``DQ -> MatMul [-> Q]`` QLinearMatMul (or
  MatMulIntegerToFloat without Q), ``DQ -> Gemm [-> Q]`` QGemm, ``DQ, DQ -> Add/Mul -> Q`` QLinearAdd /
  QLinearMul, ``DQ* -> Concat -> Q`` QLinearConcat, ``DQ -> AveragePool/GlobalAveragePool/Sigmoid/
  Softmax/LeakyRelu -> Q`` their QLinear forms. Each node output that the runtime fuses must go to
  one Q only, so a Relu/Clip after Conv/Gemm/MatMul/Add gets no Q/DQ of its own: the Q goes after the
  activation, with the activation's range, and onnxruntime's Relu/Clip-Quant fusion removes the
  activation (uint8 zero point 0 for Relu; the Clip range covers the quantized range). A constant
  bias Add after a MatMul is likewise kept inside the MatMul's epilogue.
- ``DQ -> MaxPool/Reshape/Transpose/Flatten/Squeeze/Unsqueeze/Resize/Slice/Expand/Tile -> Q`` is
  dropped to the integer op only when both sides share scale and zero point, so these outputs reuse
  their input's parameters (no requantize). Concat inputs are given the Concat's range, so
  QLinearConcat only copies.
- One Q and one DQ per tensor, shared by every quantized consumer. Graph outputs stay float.
- A tensor read only by ``Min(t, c)`` / ``Max(t, c)`` with a constant ``c`` whose output is quantized
  takes that output's scale and zero point (``share_bound_grid``): the split ReLU6 that cross-layer
  equalization leaves is then rounded once, not twice, and Conv+Relu+Q still fuses::

      Conv -> Relu -> Q(s_r) -> DQ -> Min(c_ch) -> Q(s_m) -> DQ -> ...     (two grids)
      Conv -> Relu -> Q(s_m) -> DQ -> Min(c_ch) -> Q(s_m) -> DQ -> ...     (one grid: the second Q
                                                                            only moves values at c_ch)

A node is quantized when it can be (not excluded, float, every activation input has a range) and
either it carries weights (Conv, ConvTranspose, Gemm, MatMul) or its output feeds a quantized node;
so a residual Add whose consumers are all float stays float. LayerNormalization and HardSigmoid (no
integer kernel on the CPU provider; ``IntegerHardActivations``, run after this pass, turns a HardSigmoid or
HardSwish between uint8 Q/DQ into onnxruntime's integer Add / Mul) and Softmax (QLinearSoftmax ~10x slower
than float Softmax here) stay float unless asked (``quantize_ops``), and so does a MatMul of two activations
(attention's ``Q.K^T`` and ``P.V``: no faster in int8 here, and 5 dB of logit SQNR lost on the reference
transformer; ``quantize_ops`` "MatMul" opts in), and so do the Mul/Add nodes of a GELU written out
around Erf/Tanh (onnxruntime fuses the float chain into one Gelu; ``quantize_ops`` "Gelu" opts in).
Unknown ops pass through untouched.

``CompactQDQ`` (run after it) stores the same graph in fewer bytes with exact rewrites: a ReLU/Clip
that the following Q already implies is dropped, bias scales ``s_x * s_w`` become a Mul of the two
scales, int32 biases that fit int16 are stored int16 + Cast, equal scale/zero-point constants are
shared and generated names are short (see its docstring).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.calibration.table import CalibrationTable
from onnxpress.errors import ArgumentError, UnsupportedModelError
from onnxpress.passes.base import PassResult, fresh_names, graph_names
from onnxpress.passes.codebook import weight_channel_axis
from onnxpress.passes.weight_only import gptq_rows

__all__ = [
    "ACTIVATION_TYPES",
    "CompactQDQ",
    "FLOAT_BY_DEFAULT",
    "GELU_REASON",
    "NORM_REASON",
    "SILU_REASON",
    "InsertQDQ",
    "NodeDecision",
    "QParams",
    "Selection",
    "TensorOverride",
    "activation_qparams",
    "bias_qparams",
    "dequantize_array",
    "gelu_chain_nodes",
    "silu_nodes",
    "norm_chain_nodes",
    "quantize_array",
    "weight_qparams",
]

log = logging.getLogger(__name__)

ACTIVATION_TYPES: dict[str, tuple[type[np.integer], int, int]] = {
    "uint8": (np.uint8, 0, 255),
    "int8": (np.int8, -128, 127),
}
_INT32_MAX = 2**31 - 1
PATCH_DEPTH = 192
"""A patchify stem conv on a narrow float input stays int8 from this dot-product length (``_narrow_input_reason``)."""
FOUR_BIT_MIN_ELEMENTS = 4096
"""With ``weight_bits=4``, weights of fewer elements keep 8-bit codes (as int4 weight-only keeps them int8): their
bytes are few, and a stem or a depthwise conv loses the most from 16 levels."""

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
BINARY_OPS = frozenset({"Add", "Mul"})
VARIADIC_OPS = frozenset({"Concat"})
UNARY_OPS = frozenset({"AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"})
# Ops that run in float by default (``quantize_ops`` opts in), and why. Softmax: onnxruntime 1.32's
# QLinearSoftmax took 16.0 ms against 1.5 ms for the float Softmax on the reference transformer's two
# attention Softmaxes (batch 64, 1 thread, onnxruntime profiler); keeping it float also raised logit
# SQNR by 0.8-2.6 dB over four runs (35.1-35.5 -> 35.9-38.1) and cut whole-model CPU time (1 thread, batch 64)
# from 0.77-0.79x to 0.60-0.64x fp32 (onnxruntime's best quantize_static config: 0.72-0.73x).
FLOAT_REASONS = {
    "LayerNormalization": "no integer kernel on CPU; kept float",
    "HardSigmoid": "no integer kernel on CPU; kept float",
    "Softmax": "QLinearSoftmax is ~10x slower than float Softmax on CPU; kept float",
}
FLOAT_BY_DEFAULT = frozenset(FLOAT_REASONS)
# A MatMul whose operands are both activations (attention's Q.K^T and P.V) stays float too unless
# ``quantize_ops`` names "MatMul". On the reference transformer (2 threads, 1000 / 60 interleaved
# rounds, fp32 = 1) keeping its four attention MatMuls float measured 0.724 -> 0.706 at batch 1 and
# 0.597 -> 0.569 at batch 64 (1 thread: 0.613 -> 0.595, 0.546 -> 0.518), and raised logit SQNR on the test split from
# 36.6 to 42.0 dB: the integer kernels save nothing on these small per-head products, while their
# two extra QuantizeLinear nodes per product cost time and the Softmax output loses resolution.
ACTIVATION_MATMUL_REASON = (
    "both operands are activations (attention): int8 is not faster here and costs accuracy; kept float"
)
# The elementwise nodes of a GELU written out (TorchScript and TensorFlow exports): exact
# ``0.5 * x * (1 + erf(x / sqrt(2)))`` and the tanh approximation. onnxruntime fuses the float chain
# into one Gelu / FastGelu (BiasGelu with the Add before it); Q/DQ on its Mul/Add nodes split it into
# QLinearMul / QLinearAdd plus float Div and Erf. A TorchScript export (opset 17) of the reference
# transformer's architecture, 2 threads, interleaved, fp32 = 1: chain quantized -> float 0.910 -> 0.753 at
# batch 1 and 0.795 -> 0.651 at batch 64 (BiasGelu fused), logit SQNR 41.7 -> 42.9 / 39.6 -> 39.6 dB.
GELU_REASON = "part of a GELU written out (Erf/Tanh chain): onnxruntime fuses it into one float Gelu; kept float"
_GELU_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Pow"})
# The same for a LayerNormalization (opset < 17 exports) or RMSNorm written out: the elementwise tail
# after its Sqrt (``/ sqrt(var + eps) * gamma + beta``). Quantized, its Mul/Add keep onnxruntime from
# fusing the chain into LayerNormalization / SimplifiedLayerNormalization.
NORM_REASON = "part of a normalization written out (.. Sqrt -> Div -> Mul -> Add): onnxruntime fuses it; kept float"
# x * Sigmoid(x) (SiLU / Swish, EfficientNet and YOLO activations) on a float tensor (after a float Conv):
# onnxruntime fuses it into one float QuickGelu kernel, so it stays float there. A detection backbone of
# three Conv+SiLU blocks at batch 32 (1 thread): behind its float RGB stem the first SiLU took 238 us as
# QLinearSigmoid + QLinearMul against 129 us fused; the int8 model went 1.06x -> 0.76x fp32 (stem and that
# SiLU float). After an int8 Conv the SiLU stays int8: onnxruntime gives the Sigmoid and the Mul a DQ each,
# the fusion fails, and float Sigmoid + Mul + 2 DQ + Q took 165 us against 118 us in int8.
SILU_REASON = "part of a SiLU x*sigmoid(x): onnxruntime fuses it into one float kernel (QuickGelu); kept float"
SCALE_KEEPING_OPS = frozenset(
    {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice", "Expand", "Tile"}
)
_EPILOGUE_HOSTS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})
# Ops whose output the CPU provider only fuses when a Q follows: always quantize their output.
_OUTPUT_ALWAYS = frozenset({"Conv", "Softmax"}) | BINARY_OPS | VARIADIC_OPS | UNARY_OPS
# Quantized ops whose output is quantized even where it is a graph output: a Conv has no integer kernel
# with a float output (Gemm and MatMul do: QGemm, MatMulIntegerToFloat). Left float there, onnxruntime
# ran the Conv as a float FusedConv on dequantized weights in plain NCHW: a 3-conv 32-channel net's last
# conv took 4.4 ms against 2.6 ms in the fp32 original (batch 32, 1 thread), the whole net 1.40x fp32.
_GRAPH_OUTPUT_OPS = frozenset({"Conv"})


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor (per tensor when ``axis`` is None)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def qmin(self) -> int:
        """Smallest integer of the zero point's type."""
        return int(np.iinfo(self.zero_point.dtype).min)

    @property
    def qmax(self) -> int:
        """Largest integer of the zero point's type."""
        return int(np.iinfo(self.zero_point.dtype).max)


def _expand(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def quantize_array(x: np.ndarray, qp: QParams) -> np.ndarray:
    """``clip(round(x / s) + z)`` as onnxruntime's QuantizeLinear computes it (round half to even)."""
    s = _expand(qp.scale.astype(np.float32), qp.axis, x.ndim)
    z = _expand(qp.zero_point.astype(np.int64), qp.axis, x.ndim)
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z
    return np.asarray(np.clip(q, qp.qmin, qp.qmax), dtype=qp.zero_point.dtype)


def dequantize_array(q: np.ndarray, qp: QParams) -> np.ndarray:
    """``(q - z) * s`` in float32."""
    s = _expand(qp.scale.astype(np.float32), qp.axis, q.ndim)
    z = _expand(qp.zero_point.astype(np.int64), qp.axis, q.ndim)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def activation_qparams(lo: float, hi: float, dtype: str = "uint8") -> QParams:
    """Per-tensor parameters for a range: asymmetric uint8 or symmetric int8 (see module docstring).

    Raises:
        ValueError: unknown dtype, or a range of zero width (nothing to quantize).
    """
    if dtype not in ACTIVATION_TYPES:
        raise ArgumentError(f"activation type must be one of {sorted(ACTIVATION_TYPES)}, got {dtype!r}")
    np_type, qmin, qmax = ACTIVATION_TYPES[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0.0:
        raise ValueError("range has zero width")
    if dtype == "uint8":
        scale = np.float32((hi - lo) / (qmax - qmin))
        zp = int(np.clip(np.rint(qmin - lo / float(scale)), qmin, qmax))
    else:
        scale = np.float32(max(-lo, hi) / qmax)
        zp = 0
    return QParams(np.asarray(scale, np.float32), np.asarray(zp, np_type))


def weight_qparams(w: np.ndarray, axis: int | None, *, bits: int = 8) -> QParams:
    """Symmetric signed parameters (``s = max|W| / (2^(bits-1) - 1)``), per channel along ``axis``.

    An all-zero channel gets the smallest scale of the other channels (its values are exact with
    any scale; a tiny one keeps its bias representable in int32).
    """
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.asarray(np.max(np.abs(w)) if w.size else 0.0, np.float64)
    else:
        amax = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1).astype(np.float64)
    scale = amax / qmax
    positive = scale[scale > 0] if scale.ndim else scale[None][scale[None] > 0]
    fill = float(positive.min()) if positive.size else 1.0
    scale = np.where(scale > 0, scale, fill).astype(np.float32)
    zp_type = np.int8 if bits == 8 else np.int8
    return QParams(scale, np.zeros(scale.shape, zp_type), axis if scale.ndim else None)


def bias_qparams(x_scale: np.ndarray, w: QParams, n_out: int, *, group: int = 1) -> QParams:
    """int32 bias parameters ``s_b = s_x * s_w`` (per channel when the weight is), zero point 0.

    Each output channel's bias gets the scale of its own channel's weight. A grouped ConvTranspose's
    weight is ``[C_in, C_out / group, k...]``: its per-channel scale (axis 1) has ``C_out / group``
    entries, and entry ``j`` is the scale of output channel ``g * C_out / group + j`` of every group
    ``g`` (onnxruntime's reference ConvTranspose reads ``W[g * C_in / group + c, j]`` for that channel),
    so the bias scale is the weight scale repeated ``group`` times.

    Raises:
        ValueError: a per-channel weight scale whose length times ``group`` is not ``n_out``.
    """
    if w.scale.ndim and w.scale.size * group != n_out:
        raise ValueError(
            f"bias of {n_out} channels does not match a per-channel weight scale of {w.scale.size} entries"
            f" x {group} group(s)"
        )
    s_w = np.tile(w.scale.astype(np.float32).reshape(-1), group) if w.scale.ndim else w.scale
    scale = (np.float32(x_scale) * s_w).astype(np.float32)
    axis = 0 if scale.ndim else None
    return QParams(scale, np.zeros(scale.shape, np.int32), axis)


@dataclasses.dataclass(frozen=True)
class TensorOverride:
    """Per-tensor choice that replaces the pass defaults.

    Attributes:
        dtype: "uint8" or "int8" for an activation, "float" to leave the tensor unquantized.
        range: (min, max) to use instead of the table's.
        per_channel: for a weight, per channel (True) or per tensor (False).
        method: calibration method for this tensor (used by ``onnxpress.quantize``; the pass
            itself only reads the table).
    """

    dtype: str | None = None
    range: tuple[float, float] | None = None
    per_channel: bool | None = None
    method: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in (*ACTIVATION_TYPES, "float"):
            raise ArgumentError(f"override dtype must be uint8, int8 or float, got {self.dtype!r}")
        if self.range is not None:  # a reversed or non-finite range would quantize to garbage without a word
            try:
                lo, hi = (float(v) for v in self.range)
            except (TypeError, ValueError):
                raise ArgumentError(f"override range must be two numbers (min, max), got {self.range!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ArgumentError(f"override range must be finite with min < max, got ({lo:g}, {hi:g})")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which nodes must stay float: by node name, op type, or a regular expression on node names."""

    nodes: frozenset[str] = frozenset()
    op_types: frozenset[str] = frozenset()
    pattern: str | None = None

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> Selection:
        """Parse ``--exclude`` items: ``op:Conv``, ``re:^/head/``, otherwise a node name."""
        nodes, ops, patterns = set(), set(), []
        for item in items:
            if item.startswith("op:"):
                ops.add(item[3:])
            elif item.startswith("re:"):
                patterns.append(item[3:])
            else:
                nodes.add(item)
        pattern = "|".join(f"(?:{p})" for p in patterns) or None
        if pattern:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ArgumentError(f"invalid exclude pattern {pattern!r}: {exc}") from None
        return cls(frozenset(nodes), frozenset(ops), pattern)

    def reason(self, node: gs.Node) -> str | None:
        """Why ``node`` is excluded, or None."""
        return self.reason_of(node.name, node.op)

    def reason_of(self, name: str, op: str) -> str | None:
        """Why a node named ``name`` of type ``op`` is excluded, or None (for onnx's NodeProto too)."""
        if name and name in self.nodes:
            return "excluded by name"
        if op in self.op_types:
            return f"excluded op type {op}"
        if self.pattern and name and re.search(self.pattern, name):
            return f"excluded by pattern {self.pattern!r}"
        return None


@dataclasses.dataclass(frozen=True)
class NodeDecision:
    """What the pass did with one candidate node: quantized, or left float and why."""

    name: str
    op: str
    quantized: bool
    reason: str = ""


def _is_float_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and np.issubdtype(np.asarray(t.values).dtype, np.floating)


def _is_float_var(t: gs.Tensor) -> bool:
    """A float32 (or untyped) activation; the driver infers dtypes first, so float16/double stay float."""
    if not isinstance(t, gs.Variable):
        return False
    return t.dtype is None or np.dtype(t.dtype) == np.float32


def _maybe_float(t: gs.Tensor) -> bool:
    """A tensor of a floating-point (or unknown) element type."""
    if isinstance(t, gs.Constant):
        return _is_float_const(t)
    return t.dtype is None or np.issubdtype(np.dtype(t.dtype), np.floating)


def _present(t: gs.Tensor | None) -> bool:
    return t is not None and bool(t.name)


class InsertQDQ:
    """Insert Q/DQ pairs for weights, biases and activations from a calibration table.

    Args:
        table: calibrated activation ranges (tensor name -> range); ``table.excluded`` tensors stay float.
        per_channel: per-output-channel weight scales (else one scale per weight tensor).
        activations: "uint8" (asymmetric; what onnxruntime's x86 integer kernels want) or "int8"
            (symmetric; what TensorRT wants).
        exclude: nodes that stay float.
        overrides: per-tensor dtype / range / per-channel choices.
        quantize_ops: ops from ``FLOAT_BY_DEFAULT`` to quantize anyway (e.g. {"Softmax"}), "MatMul" to
            quantize the MatMuls whose operands are both activations as well, and "Gelu" the Mul/Add nodes
            of a GELU written out (``gelu_chain_nodes``). An opted-in op is then placed like any other
            unary op: quantized where a quantized node reads its output, and left float (its reason says
            so) where none does. HardSigmoid and LayerNormalization have no integer kernel on the CPU
            provider, so between two quantized nodes (Conv -> HardSigmoid -> Conv) the graph is the same
            either way, DQ -> HardSigmoid -> Q; the opt-in adds a Q/DQ on an input that would stay float
            (a graph input, a float op's output), for runtimes that fuse that unit.
        min_conv_depth: a Conv whose dot products are shorter than this (``C_in/group * kH * kW``)
            stays float when its input is float anyway (a 1-channel stem, a depthwise conv after it):
            onnxruntime's fp32 kernel beats the int8 one there (mobilenet stem + first depthwise
            kept float: 0.50-0.58x fp32 latency at batch 64 instead of 0.83-0.89x). 0 disables.
        quantize_joins: also quantize an Add/Mul whose activation inputs are outputs of quantized
            Conv/Add/... nodes anyway, even when its own output only feeds float ops (the last
            residual Add of the ResNet before ReduceMean: one DQ instead of two, 0.32x vs 0.40x fp32
            at batch 1, same SQNR).
        share_bound_grid: a tensor read only by ``Min(t, c)`` / ``Max(t, c)`` with a constant ``c``
            is quantized with that output's scale and zero point instead of its own range (one
            rounding instead of two: the split ReLU6 of ``EqualizeCrossLayer(clip="split")``,
            ``Conv -> Relu -> Q -> DQ -> Min(c_ch) -> Q``, still fuses Conv+Relu+Q to QLinearConv).
            Mobilenet, every conv per-tensor int8, CLE(split)+BC over plain (26.77 dB logit SQNR):
            +5.40 dB on two grids -> +6.28 dB on one (bench/advanced_ptq.py, one run).
        hessians: ``E[x xᵀ]`` of each layer's input, by weight name (``onnxpress.advanced.
            collect_layer_hessians``): those weights are rounded by GPTQ (``weight_only.gptq_rows``,
            columns in their own order: activation order measured 0.2 dB worse on resnet and
            mobilenet, equal on concat, 0.1 dB better on the transformer) onto the same int8 grid
            instead of to nearest; the scales, and so the kernels, are the same.
        gptq_cache: where GPTQ codes are kept between calls (by weight name, axis and a digest of the
            values, for the same moments object); a dict of this pass's own by default, so that bias
            correction's repeated runs reuse them. Pass one dict to several passes to share it.
        weight_bits: 4 gives weights of at least ``four_bit_min_elements`` 4-bit codes, ``k`` in ``[-7, 7]``
            with ``s = max|W_c| / 7`` per channel, stored in the int8 initializer onnxruntime's integer kernels
            read (the same kernels: W4A8 on int8 ones); ``PackInt4Weights`` then stores them two to a byte. The
            names of those initializers are in ``four_bit_weights`` after a call, the layers that read them (node
            name, or first output name) in ``four_bit_layers_done``.
        four_bit_min_elements: smallest weight given 4-bit codes with ``weight_bits=4``.
        four_bit_layers: with ``weight_bits=4``, only the weights of these layers (node names, or first output
            names) get 4-bit codes, the rest 8-bit ones (``optimize``'s per-layer W4A8 choice); None: every weight
            of ``four_bit_min_elements`` or more.

    After a call, ``decisions`` lists every candidate node and whether it was quantized.
    """

    name = "insert_qdq"

    def __init__(
        self,
        table: CalibrationTable,
        *,
        per_channel: bool = True,
        activations: str = "uint8",
        exclude: Selection | None = None,
        overrides: Mapping[str, TensorOverride] | None = None,
        quantize_ops: Iterable[str] = (),
        min_conv_depth: int = 16,
        quantize_joins: bool = True,
        share_bound_grid: bool = True,
        hessians: Mapping[str, np.ndarray] | None = None,
        gptq_cache: dict | None = None,
        weight_bits: int = 8,
        four_bit_min_elements: int = FOUR_BIT_MIN_ELEMENTS,
        four_bit_layers: Iterable[str] | None = None,
    ) -> None:
        if activations not in ACTIVATION_TYPES:
            raise ArgumentError(f"activations must be one of {sorted(ACTIVATION_TYPES)}, got {activations!r}")
        if weight_bits not in (4, 8):
            raise ArgumentError(f"weight_bits must be 8 or 4, got {weight_bits!r}")
        if four_bit_layers is not None and weight_bits != 4:
            raise ArgumentError("four_bit_layers names the layers of weight_bits=4; it needs weight_bits=4")
        self.table = table
        self.per_channel = per_channel
        self.activations = activations
        self.exclude = exclude or Selection()
        self.overrides = dict(overrides or {})
        self.quantized_tensors: set[str] = set()  # activations and weights the last run quantized (by name)
        extra = set(quantize_ops)
        chains = {"MatMul", "Gelu", "SiLU"}
        unknown = extra - FLOAT_BY_DEFAULT - chains
        if unknown:
            raise ArgumentError(
                f"quantize_ops accepts only {sorted(FLOAT_BY_DEFAULT | chains)}, got {sorted(unknown)}"
            )
        self.activation_matmuls = "MatMul" in extra
        self.quantize_gelu = "Gelu" in extra
        self.quantize_silu = "SiLU" in extra
        self.quantize_norm = "LayerNormalization" in extra  # the op, and the tails of written-out ones
        self.unary_ops = UNARY_OPS | frozenset(extra - chains)
        self.min_conv_depth = min_conv_depth
        self.quantize_joins = quantize_joins
        self.share_bound_grid = share_bound_grid
        self.bound_grids_shared = 0
        self.hessians = dict(hessians or {})
        self._gptq_cache: dict = {} if gptq_cache is None else gptq_cache
        self.weight_bits = weight_bits
        self.four_bit_min_elements = int(four_bit_min_elements)
        self.four_bit_layers = None if four_bit_layers is None else frozenset(four_bit_layers)
        self.four_bit_weights: set[str] = set()  # the int8 initializers the last run filled with 4-bit codes
        self.four_bit_layers_done: set[str] = set()  # the layers (node name, or first output) that read them
        self.decisions: list[NodeDecision] = []

    # ------------------------------------------------------------------ requires
    def requires(self, graph: gs.Graph) -> None:
        """QDQ with per-axis scales needs opset >= 13.

        Raises:
            UnsupportedModelError: opset below 13 (normalise the model first).
        """
        if graph.opset < 13:
            raise UnsupportedModelError(
                f"InsertQDQ needs opset >= 13 (model has {graph.opset}); normalise it with "
                "onnxpress.normalize_model(model, min_opset=13) first"
            )

    # ------------------------------------------------------------------ analysis helpers
    def _act_dtype(self, name: str) -> str | None:
        ov = self.overrides.get(name)
        if ov is not None and ov.dtype is not None:
            return None if ov.dtype == "float" else ov.dtype
        return self.activations

    def _own_range(self, name: str) -> tuple[float, float] | None:
        ov = self.overrides.get(name)
        if ov is not None and ov.range is not None:
            return (float(ov.range[0]), float(ov.range[1]))
        if name in self.table:
            r = self.table[name]
            return (r.min, r.max)
        return None

    def _roles(self, node: gs.Node) -> list[tuple[int, str]] | str:
        """(input index, role) pairs to quantize, or a reason the node cannot be quantized."""
        ins = node.inputs
        op = node.op
        roles: list[tuple[int, str]] = []
        if op in ("Conv", "ConvTranspose"):
            if len(ins) < 2 or not _is_float_const(ins[1]):
                return "weight is not a float constant"
            if not _is_float_var(ins[0]):
                return "input is not a float activation"
            roles = [(0, "act"), (1, "weight")]
            if len(ins) > 2 and _present(ins[2]):
                if not _is_float_const(ins[2]):
                    return "bias is not a float constant"
                roles.append((2, "bias"))
            return roles
        if op == "Gemm":
            if not _is_float_var(ins[0]):
                return "A is not a float activation"
            roles = [(0, "act")]
            if _is_float_const(ins[1]):
                roles.append((1, "weight"))
                if len(ins) > 2 and _present(ins[2]):
                    if not _is_float_const(ins[2]):
                        return "C is not a float constant"
                    n_out = ins[1].values.shape[0 if int(node.attrs.get("transB", 0)) else 1]
                    unit = float(node.attrs.get("alpha", 1.0)) == 1.0 and float(node.attrs.get("beta", 1.0)) == 1.0
                    if unit and np.asarray(ins[2].values).size == n_out and np.asarray(ins[2].values).ndim == 1:
                        roles.append((2, "bias"))
            elif _is_float_var(ins[1]):
                roles.append((1, "act"))
            else:
                return "B is neither a float constant nor a float activation"
            return roles
        if op == "MatMul":
            for i in (0, 1):
                if _is_float_const(ins[i]):
                    roles.append((i, "weight"))
                elif _is_float_var(ins[i]):
                    roles.append((i, "act"))
                else:
                    return f"input {i} is not float"
            if all(r == "weight" for _, r in roles):
                return "both inputs are constants"
            if all(r == "act" for _, r in roles) and not self.activation_matmuls:
                return ACTIVATION_MATMUL_REASON
            return roles
        if op in BINARY_OPS or op in VARIADIC_OPS:
            for i, t in enumerate(ins):
                if _is_float_var(t):
                    roles.append((i, "act"))
                elif _is_float_const(t):
                    roles.append((i, "const"))
                else:
                    return f"input {i} is not float"
            if not any(r == "act" for _, r in roles):
                return "all inputs are constants"
            return roles
        if op in self.unary_ops or op in SCALE_KEEPING_OPS:
            if ins and _is_float_const(ins[0]):
                return "input is a constant (nothing to quantize at run time)"
            if not ins or not _is_float_var(ins[0]):
                return "input is not a float activation"
            if len(node.outputs) != 1:
                return "more than one output"
            if op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
                return "cubic Resize can leave the input's range"
            return [(0, "act")]
        return "no quantized form"

    def _epilogue_end(self, graph_outputs: set[int], node: gs.Node) -> tuple[gs.Tensor, list[gs.Node]]:
        """The tensor after the activations/bias the runtime fuses into ``node``, and those nodes."""
        t = node.outputs[0]
        chain: list[gs.Node] = []
        if node.op not in _EPILOGUE_HOSTS:
            return t, chain
        while id(t) not in graph_outputs and len(t.outputs) == 1:
            c = t.outputs[0]
            if self.exclude.reason(c):
                break
            if not _fusable_epilogue(node, c, first=not chain):
                break
            chain.append(c)
            t = c.outputs[0]
        return t, chain

    # ------------------------------------------------------------------ the pass
    def __call__(self, graph: gs.Graph) -> PassResult:
        """Plan which nodes and tensors to quantize, then insert the Q/DQ nodes."""
        graph.toposort()
        self.four_bit_layers_done.clear()
        self.four_bit_weights.clear()  # this run's only (bias correction runs the pass once per layer)
        graph_outputs = {id(t) for t in graph.outputs}
        nodes = list(graph.nodes)
        roles: dict[int, list[tuple[int, str]]] = {}
        ends: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
        reasons: dict[int, str] = {}
        in_epilogue: set[int] = set()
        candidates = WEIGHTED_OPS | BINARY_OPS | VARIADIC_OPS | self.unary_ops | SCALE_KEEPING_OPS | FLOAT_BY_DEFAULT
        gelu = set() if self.quantize_gelu else gelu_chain_nodes(graph)
        norm = set() if self.quantize_norm else norm_chain_nodes(graph)
        silu = {} if self.quantize_silu else silu_nodes(graph)
        for node in nodes:
            if node.op not in candidates or node.domain not in (None, "", "ai.onnx"):
                continue
            if not any(_present(t) and _maybe_float(t) for t in node.inputs):
                continue  # integer shape arithmetic (Unsqueeze/Concat of Shape outputs): not a decision to report
            why = self.exclude.reason(node)
            r = why or (GELU_REASON if id(node) in gelu else NORM_REASON if id(node) in norm else self._roles(node))
            if isinstance(r, str):
                if node.op in FLOAT_BY_DEFAULT and not why:
                    x = node.inputs[0] if node.inputs else None
                    unusable = x is not None and (x.name in self.table.excluded or self._act_dtype(x.name) is None)
                    r = self._missing_reason(x.name) if unusable else FLOAT_REASONS[node.op]
                reasons[id(node)] = r
                continue
            roles[id(node)] = r
            ends[id(node)] = self._epilogue_end(graph_outputs, node)
        for _, chain in ends.values():
            in_epilogue.update(id(c) for c in chain)
        for nid in list(roles):
            if nid in in_epilogue:  # a bias Add folded into a MatMul epilogue is not a node of its own
                del roles[nid]
                ends.pop(nid, None)

        by_id = {id(n): n for n in nodes}

        # Ranges: own table ranges, plus scale-keeping outputs inheriting from their input.
        def available(t: gs.Tensor) -> bool:
            seen = 0
            while True:
                if self._act_dtype(t.name) is None:
                    return False
                if self._own_range(t.name) is not None:
                    return True
                prod = t.inputs[0] if t.inputs else None
                if prod is None or prod.op not in SCALE_KEEPING_OPS or id(prod) not in roles or seen > 1000:
                    return False
                t, seen = prod.inputs[0], seen + 1

        def eligible(n: gs.Node) -> str | None:
            for i, role in roles[id(n)]:
                if role == "act" and not available(n.inputs[i]):
                    return self._missing_reason(n.inputs[i].name)
            if n.op in _OUTPUT_ALWAYS or n.op in SCALE_KEEPING_OPS:
                end = ends[id(n)][0]
                if n.op in SCALE_KEEPING_OPS:
                    return None
                if self._own_range(end.name) is None or self._act_dtype(end.name) is None:
                    return self._missing_reason(end.name)
            return None

        quantized: set[int] = set()
        host_of = {id(c): nid for nid, (_, chain) in ends.items() for c in chain}
        float_convs: set[int] = set()
        ends_of = {nid: end for nid, (end, _) in ends.items()}
        for nid in roles:  # topological order
            n = by_id[nid]
            if n.op in WEIGHTED_OPS:
                why = (eligible(n) or self._shallow_reason(n, host_of, float_convs, ends_of)
                       or self._narrow_input_reason(n, roles, ends_of, host_of, silu) or self._narrow_group_reason(n))
                if why:
                    reasons[nid] = why
                    if n.op == "Conv":
                        float_convs.add(nid)
                else:
                    quantized.add(nid)
        for nid, x in silu.items():  # a SiLU on a float tensor stays float, where onnxruntime fuses it
            prod = x.inputs[0] if x.inputs else None
            float_x = prod is None or host_of.get(id(prod), id(prod)) not in quantized
            if nid in roles and nid not in reasons and float_x:
                reasons[nid] = SILU_REASON
        changed = True
        while changed:
            changed = False
            for nid in roles:
                if nid in quantized or nid in reasons:
                    continue
                n = by_id[nid]
                end = ends[nid][0]
                if id(end) in graph_outputs or not any(id(c) in quantized for c in end.outputs):
                    continue
                prod = n.inputs[0].inputs[0] if n.inputs and n.inputs[0].inputs else None
                if n.op == "MaxPool" and prod is not None and host_of.get(id(prod), id(prod)) in float_convs:
                    reasons[nid] = "reads a float Conv: pooled in float (blocked layout), quantized after the pool"
                    continue
                why = eligible(n)
                if why:
                    reasons[nid] = why
                    continue
                quantized.add(nid)
                changed = True
        if self.quantize_joins:
            self._add_joins(by_id, roles, ends, reasons, quantized, host_of, graph_outputs, eligible)

        # Tensors to quantize, with the node that fixes their parameters.
        act_needed: dict[str, gs.Tensor] = {}
        produced_by_quantized: set[str] = set()
        for n in nodes:
            nid = id(n)
            if nid not in quantized:
                continue
            for i, role in roles[nid]:
                if role == "act":
                    act_needed[n.inputs[i].name] = n.inputs[i]
            end = ends[nid][0]
            wants_out = n.op in _OUTPUT_ALWAYS or any(id(c) in quantized for c in end.outputs)
            if n.op in SCALE_KEEPING_OPS:
                wants_out = any(id(c) in quantized for c in end.outputs)
            # A Conv has no integer kernel with a float output: one that ends on a graph output gets
            # Q/DQ there too (the DQ takes the output's name), or onnxruntime would run it as a float conv
            # on dequantized weights, slower than the fp32 original (_GRAPH_OUTPUT_OPS)
            to_output = id(end) in graph_outputs and n.op in _GRAPH_OUTPUT_OPS
            if wants_out and (id(end) not in graph_outputs or to_output) and self._act_dtype(end.name) is not None:
                act_needed[end.name] = end
                produced_by_quantized.add(end.name)

        self.bound_grids_shared = 0
        params = self._activation_params(nodes, quantized, roles, ends, act_needed)
        stats = self._insert(graph, nodes, quantized, roles, params, produced_by_quantized)
        stats["bound_grids_shared"] = self.bound_grids_shared

        self.decisions = []
        notes = []
        for n in nodes:
            nid = id(n)
            label = n.name or n.outputs[0].name
            if nid in quantized:
                self.decisions.append(NodeDecision(label, n.op, True))
            elif nid in reasons or nid in roles:
                why = reasons.get(nid, "its output feeds no quantized node")
                if nid not in reasons and n.op in FLOAT_BY_DEFAULT:
                    # opted in, and still float: say that the opt-in was seen, or it looks ignored (a
                    # HardSigmoid feeding a Mul before a float conv showed no change and no word why)
                    why += f" (opted in by quantize_ops, {n.op} is quantized only where a quantized node reads it)"
                if n.op in SCALE_KEEPING_OPS and nid not in reasons:
                    continue  # a float Reshape between float ops is not worth a report line
                self.decisions.append(NodeDecision(label, n.op, False, why))
                notes.append(f"{label} ({n.op}): float ({why})")
        stats["nodes_quantized"] = len(quantized)
        stats["nodes_kept_float"] = sum(1 for d in self.decisions if not d.quantized)
        return PassResult(graph, bool(quantized), stats, tuple(notes))

    @staticmethod
    def _add_joins(by_id, roles, ends, reasons, quantized, host_of, graph_outputs, eligible) -> None:
        """Quantize Add/Mul (and GlobalAveragePool) whose activation inputs all come from quantized nodes anyway.

        The pool's output, not its input, is then what gets dequantized (and, in onnxruntime's NHWC int8
        region, transposed back): a pooled vector instead of the whole feature map. The pruned ResNet of
        ``bench/recipes/resnet_prune_ft_int8.json`` (classifier float), fp32 = 1, four interleaved runs: 2 threads
        0.255-0.305 -> 0.250-0.292 (2-4% faster in each run), 1 thread a tie; the same 6.93 dB logit SQNR.
        """
        for nid in roles:
            n = by_id[nid]
            if n.op not in BINARY_OPS and n.op != "GlobalAveragePool":
                continue
            if nid in quantized or nid in reasons or id(ends[nid][0]) in graph_outputs:
                continue
            ok = True
            for i, role in roles[nid]:
                if role != "act":
                    continue
                prod = n.inputs[i].inputs[0] if n.inputs[i].inputs else None
                host = host_of.get(id(prod), id(prod)) if prod is not None else None
                if host not in quantized or by_id[host].op not in _OUTPUT_ALWAYS:
                    ok = False
                    break
            if ok and not eligible(n):
                quantized.add(nid)

    def _shallow_reason(
        self, n: gs.Node, host_of: dict[int, int], float_convs: set[int], ends_of: dict[int, gs.Tensor]
    ) -> str | None:
        """Keep a run of shallow Convs at the input float when int8 does not pay there.

        A Conv is shallow when its dot products are short (``C_in/group * kH * kW`` below
        ``min_conv_depth``). A shallow Conv on the graph input stays float only if every consumer of
        its output is a shallow Conv too (a 1-channel stem feeding a depthwise conv); a shallow Conv
        fed by such a float Conv stays float as well (both looking through the per-channel
        ``Min/Max(t, c)`` that ``EqualizeCrossLayer(clip="split")`` puts after a Relu). Nothing else is
        touched, so no quantized producer loses its fusion. Measured (2 threads, batch 64, fp32 = 1): MobileNet stem +
        first depthwise float 0.50-0.58 vs 0.83-0.89 all int8; a lone stem before deep convs gains
        nothing (ResNet 0.28-0.31 vs 0.25-0.32, and 0.47 vs 0.35 at batch 1). A shallow input Conv whose
        output only goes through a downsampling MaxPool stays float too, and so does the pool (see
        ``_POOL_BARRIER``): the float-to-int8 handover then happens on a quarter of the values
        (ConcatNet, 2 threads: 0.480 -> 0.337 at batch 64, 0.547 -> 0.454 at batch 1, +2.85 dB).
        """
        if n.op != "Conv" or not self.min_conv_depth or _conv_depth(n) >= self.min_conv_depth:
            return None
        prod = n.inputs[0].inputs[0] if n.inputs[0].inputs else None
        while prod is not None and _bounded_input(prod) is not None:  # through CLE's per-channel Min/Max
            t = _bounded_input(prod)
            prod = t.inputs[0] if t.inputs else None
        if prod is not None and prod.op == "Cast" and not prod.inputs[0].inputs:
            prod = None  # a Cast of a graph input (a float16 export computed in float32) is still the input
        if prod is not None:
            if host_of.get(id(prod), id(prod)) not in float_convs:
                return None
        else:
            end = ends_of.get(id(n))
            while end is not None and len(end.outputs) == 1 and _bounded_input(end.outputs[0]) is end:
                end = end.outputs[0].outputs[0]
            consumers = end.outputs if end is not None else []
            if consumers and all(c.op == "MaxPool" and _downsamples(c) for c in consumers):
                return (f"reduction depth {_conv_depth(n)} < {self.min_conv_depth} at the input, before a pool: "
                        "fp32 conv and pool, quantized after the pool")
            if not consumers or not all(
                c.op == "Conv" and isinstance(c.inputs[1], gs.Constant) and _conv_depth(c) < self.min_conv_depth
                for c in consumers
            ):
                return None
        return f"reduction depth {_conv_depth(n)} < {self.min_conv_depth} at the input: fp32 kernel is faster here"

    def _narrow_input_reason(
        self, n: gs.Node, roles: dict[int, list[tuple[int, str]]], ends_of: dict[int, gs.Tensor],
        host_of: dict[int, int], silu: Mapping[int, gs.Tensor],
    ) -> str | None:
        """Keep a Conv on the float input float when its input channels are not a multiple of 4 (RGB stems).

        onnxruntime 1.32's NHWC int8 conv is slow for such channel counts on this x86 box. A 3-conv
        32-channel net at batch 32 with its stem float vs int8 (fp32 = 1, 1 / 2 threads): C_in 1, 2, 3, 6:
        0.44 / 0.54 vs 0.52-0.65 / 0.70-0.80, even with a 7x7 stride-2 RGB stem (0.54 / 0.62 vs 0.59 / 0.75);
        C_in 4: a tie; C_in 8, 12, 16: int8 is faster. A U-Net (RGB stem feeding a conv and a skip Concat):
        0.59 -> 0.53 (1 thread), 0.84 -> 0.74 (2 threads) at batch 32, better at batches 1 and 8 too.
        A stem whose output a residual Add or Mul reads stays int8: the Add would then meet a float NCHW
        input, and onnxruntime wraps it in transposes (ResNet at batch 1: 0.47 vs 0.35 with the stem int8).
        Only plain convs (group 1) whose input arrives float anyway (a graph input, or an op left float).
        A 1-channel stem is left to ``_shallow_reason`` (measured on the reference digit models); in the
        3-conv net above it too was faster float, which that rule does not cover yet.

        A patchify stem (stride = kernel, no padding: ViT, Swin) with dot products of ``PATCH_DEPTH`` or more
        stays int8: an RGB stem, then a 3x3 conv, pooled, fp32 = 1, 2 threads, batch 1 / 16, stem float vs
        int8 (eleventh session): 16x16 at 224 px, depth 768: 0.571 / 0.524 vs 0.408 / 0.394; 8x8 at 128 px,
        depth 192: 0.518 / 0.418 vs 0.445 / 0.401; 4x4 (ConvNeXt's, depth 48): 0.461 / 0.384 vs 0.382 / 0.364
        at 128 px and 96 channels, but 0.596 / 0.658 vs 0.783 / 0.817 at 64 px and 48 channels, so it stays
        float. A 4-layer ViT export (224 px): 0.736 / 0.747 -> 0.714 / 0.646 at batch 1 / 8, size 0.461 ->
        0.293 (its 16x16 patch weight is 22% of the model).
        """
        if n.op != "Conv" or not self.min_conv_depth or int(n.attrs.get("group", 1)) != 1:
            return None
        w = np.asarray(n.inputs[1].values)
        if w.ndim < 3 or w.shape[1] % 4 == 0 or w.shape[1] == 1:  # 1 channel: _shallow_reason's rules
            return None
        if _patchify(n, w) and _conv_depth(n) >= PATCH_DEPTH:
            return None
        prod = n.inputs[0].inputs[0] if n.inputs[0].inputs else None
        if prod is not None and host_of.get(id(prod), id(prod)) in roles:  # through a fused Relu to its Conv
            return None
        end = ends_of.get(id(n))
        if end is None or any(c.op in BINARY_OPS and id(c) not in silu for c in end.outputs):  # a SiLU's Mul is fine
            return None
        return f"{w.shape[1]} input channels (not a multiple of 4) at the input: fp32 kernel is faster here"

    def _narrow_group_reason(self, n: gs.Node) -> str | None:
        """Keep a grouped (not depthwise) Conv float when each group has fewer than 16 input channels.

        onnxruntime 1.32 runs such an int8 conv as many tiny integer GEMMs. A 3-conv net whose middle conv is
        grouped (batch 32, 32x32, fp32 = 1, 1 / 2 threads), everything int8 vs that conv float (between
        int8 neighbours, on its own per-channel DQ: ``_float_layer_dq``): 2 channels per group 2.27 / 3.82
        vs 0.77 / 0.89; 3: 1.36 / 2.03 vs 0.60 / 0.70; 4 (ResNeXt's first stage): 1.18 / 1.38 vs 0.61 / 0.74;
        6: 0.90 / 1.13 vs 0.60 / 0.72; 8: 0.75 / 0.95 vs 0.62 / 0.72; 16: 0.67 / 0.89 vs 0.72 / 0.87 (2 groups)
        and 0.60 / 0.68 vs 0.71 / 0.84 (4 groups); 32: 0.47 / 0.55 vs 0.76 / 0.86. Depthwise convs have
        their own fast integer kernel.
        """
        if n.op != "Conv" or not self.min_conv_depth:
            return None
        w = np.asarray(n.inputs[1].values)
        per_group = int(w.shape[1]) if w.ndim > 1 else 0
        if int(n.attrs.get("group", 1)) == 1 or per_group == 1 or per_group >= 16:
            return None
        return f"grouped conv with {per_group} input channels per group: onnxruntime's int8 kernel is slower here"

    def _missing_reason(self, name: str) -> str:
        if self._act_dtype(name) is None:
            return f"tensor {name!r} kept float by override"
        why = self.table.excluded.get(name)
        if why:
            return f"tensor {name!r} has no usable range ({why})"
        return f"tensor {name!r} has no calibrated range"

    def _activation_params(
        self,
        nodes: list[gs.Node],
        quantized: set[int],
        roles: dict[int, list[tuple[int, str]]],
        ends: dict[int, tuple[gs.Tensor, list[gs.Node]]],
        act_needed: dict[str, gs.Tensor],
    ) -> dict[str, QParams]:
        ranges: dict[str, tuple[float, float]] = {}
        for name in act_needed:
            r = self._own_range(name)
            if r is not None:
                ranges[name] = r
        # Clip epilogues: the quantized range must sit inside the clip bounds for the runtime to drop it.
        clip_bounds: dict[str, tuple[float, float]] = {}
        for n in nodes:
            if id(n) in quantized:
                end, chain = ends[id(n)]
                for c in chain:
                    if c.op == "Clip" and end.name in ranges:
                        lo_b, hi_b = _clip_bounds(c)
                        lo, hi = ranges[end.name]
                        ranges[end.name] = (max(lo, lo_b), min(hi, hi_b))
                        clip_bounds[end.name] = (lo_b, hi_b)
        # Concat: every input and the output share one range, so QLinearConcat only copies. Except an
        # input that a quantized producer's fused Relu (or Clip from >= 0) ends while the shared range goes
        # below 0: with a zero point above the grid's bottom the Q no longer does the Relu's work, the Relu
        # stays between the Conv and its Q, and onnxruntime runs that Conv in float on dequantized inputs.
        # Such an input keeps its own range; QLinearConcat requantizes it (a U-Net's encoder conv feeding
        # a skip Concat beside a ConvTranspose: 549 us float vs ~90 us as QLinearConv at batch 32).
        rectified = {
            end.name
            for nid, (end, chain) in ends.items()
            if nid in quantized and any(c.op == "Relu" or (c.op == "Clip" and _clip_bounds(c)[0] >= 0) for c in chain)
        }
        for n in nodes:
            if id(n) in quantized and n.op == "Concat":
                names = [n.inputs[i].name for i, role in roles[id(n)] if role == "act"] + [n.outputs[0].name]
                own = [ranges[x] for x in names if x in ranges]
                if own:
                    common = (min(r[0] for r in own), max(r[1] for r in own))
                    for x in names:
                        if x in ranges and not self._has_range_override(x):
                            if x in rectified and common[0] < 0 <= ranges[x][0]:
                                continue
                            ranges[x] = common
        params: dict[str, QParams] = {}
        for name, (lo, hi) in ranges.items():
            dtype = self._act_dtype(name) or self.activations
            try:
                qp = activation_qparams(lo, hi, dtype)
            except ValueError:
                log.debug("tensor %s has a zero-width range; left float", name)
                continue
            if name in clip_bounds:
                qp = _fit_inside(qp, *clip_bounds[name])
            params[name] = qp
        if self.share_bound_grid:
            self.bound_grids_shared = self._share_bound_grids(act_needed, params, clip_bounds)
        # Scale-keeping ops: output reuses the input's parameters (in topological order).
        for n in nodes:
            if id(n) in quantized and n.op in SCALE_KEEPING_OPS:
                src, dst = n.inputs[0].name, n.outputs[0].name
                if src in params:
                    params[dst] = params[src]
        return params

    def _share_bound_grids(
        self,
        act_needed: dict[str, gs.Tensor],
        params: dict[str, QParams],
        clip_bounds: dict[str, tuple[float, float]],
    ) -> int:
        """Quantize ``t`` with the parameters of ``Min(t, c)`` / ``Max(t, c)`` (``c`` constant) when that reads it.

        Every consumer of ``t`` must be such a Min/Max whose output is quantized with the same
        parameters (one consumer in practice: the split ReLU6 ``Relu -> Min(c_ch)`` of
        ``EqualizeCrossLayer(clip="split")``). Values of ``t`` that the Q then clips are clipped by
        the Min/Max anyway, and the second Q re-rounds a grid value (or the bound ``c``) onto the same
        grid, so the pair costs one rounding instead of two. An explicit range override on ``t`` wins.
        """
        count = 0
        for name, t in act_needed.items():
            if name not in params or self._has_range_override(name) or not t.outputs:
                continue
            prod = t.inputs[0] if t.inputs else None
            if prod is not None and prod.op in SCALE_KEEPING_OPS:
                continue  # its parameters are its input's
            outs = []
            for c in t.outputs:
                bounded = c.op in ("Min", "Max") and len(c.inputs) == 2 and len(c.outputs) == 1
                if not bounded or sum(x is t for x in c.inputs) != 1 or not any(_is_float_const(x) for x in c.inputs):
                    break
                outs.append(c.outputs[0].name)
            else:
                shared = [params.get(o) for o in outs]
                if shared[0] is None or any(
                    q is None or q.scale.tobytes() != shared[0].scale.tobytes() or q.zero_point != shared[0].zero_point
                    for q in shared
                ):
                    continue
                qp = shared[0]
                if name in clip_bounds:
                    qp = _fit_inside(qp, *clip_bounds[name])
                    for o in outs:
                        params[o] = qp
                params[name] = qp
                count += 1
        return count

    def _has_range_override(self, name: str) -> bool:
        ov = self.overrides.get(name)
        return ov is not None and ov.range is not None

    # ------------------------------------------------------------------ graph edits
    def _insert(
        self,
        graph: gs.Graph,
        nodes: list[gs.Node],
        quantized: set[int],
        roles: dict[int, list[tuple[int, str]]],
        params: dict[str, QParams],
        produced_by_quantized: set[str],
    ) -> dict[str, int]:
        fresh = fresh_names(graph_names(graph))

        tensors = graph.tensors()
        self.quantized_tensors = set()
        dq_of: dict[str, gs.Variable] = {}
        dq_params: dict[int, QParams] = {}
        new_nodes: list[gs.Node] = []

        def qp_consts(base: str, qp: QParams) -> tuple[gs.Constant, gs.Constant]:
            return (
                gs.Constant(fresh(f"{base}_s"), np.asarray(qp.scale, np.float32)),
                gs.Constant(fresh(f"{base}_zp"), np.asarray(qp.zero_point)),
            )

        def attrs(qp: QParams) -> dict[str, int]:
            return {} if qp.axis is None else {"axis": int(qp.axis)}

        # Activations: one Q and one DQ per tensor.
        for name, qp in params.items():
            t = tensors.get(name)
            if t is None or not isinstance(t, gs.Variable):
                continue
            scale, zp = qp_consts(name, qp)
            q_out = gs.Variable(fresh(f"{name}_q"), dtype=qp.zero_point.dtype, shape=t.shape)
            dq_out = gs.Variable(fresh(f"{name}_dq"), dtype=np.float32, shape=t.shape)
            q_in = t
            prod = t.inputs[0] if t.inputs else None
            if prod is not None and prod.op == "MaxPool" and id(prod) not in quantized and qp.axis is None:
                q_in = gs.Variable(fresh(f"{name}_kept_float"), dtype=np.float32, shape=t.shape)
                new_nodes.append(_pool_barrier(t, q_in, qp, fresh))
            # the DQ output becomes the graph output, under its name and type; a graph input passed through as an
            # output stays the output as it is (renaming it renamed the model's input: inp -> inp_float)
            if t in graph.outputs and t not in graph.inputs:
                pos = graph.outputs.index(t)
                t.name = fresh(f"{name}_float")
                dq_out = gs.Variable(name, dtype=t.dtype or np.float32, shape=t.shape)
                graph.outputs[pos] = dq_out
            q_node = gs.Node("QuantizeLinear", fresh(f"{name}_Q"), attrs(qp), [q_in, scale, zp], [q_out])
            dq_node = gs.Node("DequantizeLinear", fresh(f"{name}_DQ"), attrs(qp), [q_out, scale, zp], [dq_out])
            consumers = [c for c in t.outputs if c is not q_node]
            redirect_all = name in produced_by_quantized
            for c in consumers:
                # Float consumers of a quantized producer's output, explicitly excluded ones too, read the
                # dequantized tensor, so that the producer's output goes to one Q only (needed to fuse):
                # an excluded conv reading the float tensor left the conv before it to run in float on
                # dequantized weights (ResNet, one mid conv excluded: that producer 5.4 ms against 0.7 ms
                # as QLinearConv, batch 64). An excluded node keeps its float weights and float kernel.
                if id(c) in quantized or redirect_all:
                    src = dq_out
                    if id(c) not in quantized and qp.axis is None:
                        src = _float_layer_dq(c, q_out, qp, fresh, new_nodes) or dq_out
                    for i, x in enumerate(c.inputs):
                        if x is t:
                            c.inputs[i] = src
            dq_of[name] = dq_out
            dq_params[id(dq_out)] = qp
            new_nodes += [q_node, dq_node]

        weights = biases = consts = gptq = 0
        w_cache: dict[tuple[str, int | None, int], tuple[gs.Variable, QParams]] = {}
        for n in nodes:
            nid = id(n)
            if nid not in quantized:
                continue
            w_qp: QParams | None = None
            for i, role in roles[nid]:
                t = n.inputs[i]
                if role == "weight":
                    axis = self._weight_axis(n, i, t) if self._per_channel(t.name) else None
                    bits = 4 if (self.weight_bits == 4 and math.prod(t.shape) >= self.four_bit_min_elements
                                 and (self.four_bit_layers is None
                                      or (n.name or n.outputs[0].name) in self.four_bit_layers)) else 8
                    key = (t.name, axis, bits)
                    if key not in w_cache:
                        w = np.asarray(t.values, np.float32)
                        qp = weight_qparams(w, axis, bits=bits)
                        wq = self._gptq_codes(n, t.name, w, qp, qmax=2 ** (bits - 1) - 1)
                        gptq += wq is not None
                        wq = quantize_array(w, qp) if wq is None else wq
                        if bits == 4:
                            wq = np.clip(wq, -7, 7)  # quantize_array clips to int8's range
                        dq = self._const_dq(t.name, wq, qp, fresh, new_nodes, omit_zero=n.op == "Conv")
                        if bits == 4:
                            self.four_bit_weights.add(dq.inputs[0].inputs[0].name)
                        w_cache[key] = (dq, qp)
                        weights += 1
                        self.quantized_tensors.add(t.name)
                    if bits == 4:
                        self.four_bit_layers_done.add(n.name or n.outputs[0].name)
                    n.inputs[i], w_qp = w_cache[key]
                elif role == "const":
                    vals = np.asarray(t.values, np.float32)
                    try:
                        qp = activation_qparams(float(vals.min()), float(vals.max()), self.activations)
                    except ValueError:
                        continue  # an all-zero constant: leave it float
                    n.inputs[i] = self._const_dq(t.name, quantize_array(vals, qp), qp, fresh, new_nodes)
                    consts += 1
            for i, role in roles[nid]:
                if role != "bias":
                    continue
                x_qp = dq_params.get(id(n.inputs[0]))
                if x_qp is None or w_qp is None:
                    continue  # input or weight left float: bias stays float
                b = np.asarray(n.inputs[i].values, np.float32).reshape(-1)
                # only ConvTranspose's per-channel weight scale repeats over groups (Conv's weight is [C_out, ...])
                group = int(n.attrs.get("group", 1)) if n.op == "ConvTranspose" and w_qp.axis is not None else 1
                b_qp = bias_qparams(x_qp.scale, w_qp, b.size, group=group)
                q = np.rint(b.astype(np.float64) / b_qp.scale.astype(np.float64))
                if np.any(np.abs(q) > _INT32_MAX):
                    log.debug("bias of %s overflows int32; left float", n.name)
                    continue
                q_b = q.astype(np.int32)
                n.inputs[i] = self._const_dq(n.inputs[i].name, q_b, b_qp, fresh, new_nodes, omit_zero=n.op == "Conv")
                biases += 1
        graph.nodes.extend(new_nodes)
        self.quantized_tensors.update(dq_of)
        return {
            "activations_quantized": len(dq_of),
            "weights_quantized": weights,
            "weights_4bit": len(self.four_bit_weights),
            "weights_gptq": gptq,
            "biases_quantized": biases,
            "constants_quantized": consts,
        }

    def _per_channel(self, name: str) -> bool:
        ov = self.overrides.get(name)
        if ov is not None and ov.per_channel is not None:
            return ov.per_channel
        return self.per_channel

    def _gptq_codes(self, node: gs.Node, name: str, w: np.ndarray, qp: QParams, qmax: int = 127) -> np.ndarray | None:
        """GPTQ codes in ``[-qmax, qmax]`` of a Conv/Gemm/MatMul weight with a known input moment, else None."""
        h = self.hessians.get(name)
        if h is None or node.op not in ("Conv", "Gemm", "MatMul") or w.ndim < 2:
            return None
        layout = weight_channel_axis(node, w)
        if qp.axis is not None and qp.axis != layout:
            return None
        moved = np.moveaxis(w, layout, 0)
        rows = moved.reshape(moved.shape[0], -1)
        if np.asarray(h).shape[-1] != rows.shape[1]:
            return None
        # the weights may differ between calls (and between models, with a shared cache): key on their bytes;
        # the scales follow from them
        key = (name, qp.axis, qmax, hashlib.blake2b(w.tobytes(), digest_size=16).digest())
        hit = self._gptq_cache.get(key)
        if hit is None or hit[0] is not h:
            scale = np.asarray(qp.scale, np.float64)
            codes = gptq_rows(rows, scale if qp.axis is not None else float(scale), h, qmax=qmax, act_order=False)
            hit = (h, np.moveaxis(codes.reshape(moved.shape), 0, layout).astype(np.int8))
            self._gptq_cache[key] = hit
        return hit[1]

    @staticmethod
    def _weight_axis(node: gs.Node, index: int, t: gs.Constant) -> int | None:
        ndim = np.asarray(t.values).ndim
        if node.op == "Conv":
            return 0
        if node.op == "ConvTranspose":
            return 1
        if node.op == "Gemm":
            return 0 if int(node.attrs.get("transB", 0)) else 1
        if node.op == "MatMul" and index == 1 and ndim >= 2:
            return ndim - 1
        return None  # a constant left operand of MatMul: per tensor

    @staticmethod
    def _const_dq(
        base: str, q: np.ndarray, qp: QParams, fresh, new_nodes: list[gs.Node], *, omit_zero: bool = False
    ) -> gs.Variable:
        q = np.asarray(q)
        q_const = gs.Constant(fresh(f"{base}_q"), q)
        inputs: list[gs.Tensor] = [q_const, gs.Constant(fresh(f"{base}_s"), np.asarray(qp.scale, np.float32))]
        # A zero point of 0 is the default; onnxruntime's Conv fusion accepts it omitted (its Gemm fusion does not).
        if not omit_zero or q.dtype == np.uint8 or np.any(qp.zero_point):
            inputs.append(gs.Constant(fresh(f"{base}_zp"), np.asarray(qp.zero_point)))
        out = gs.Variable(fresh(f"{base}_dq"), dtype=np.float32, shape=list(q.shape))
        a = {} if qp.axis is None else {"axis": int(qp.axis)}
        new_nodes.append(gs.Node("DequantizeLinear", fresh(f"{base}_DQ"), a, inputs, [out]))
        return out


def _fit_inside(qp: QParams, lo_b: float, hi_b: float) -> QParams:
    """Shrink the scale (by ulps) until the dequantized range lies inside the clip bounds."""
    scale = np.float32(qp.scale)
    z = int(qp.zero_point)
    for _ in range(8):
        lo = np.float32(qp.qmin - z) * scale
        hi = np.float32(qp.qmax - z) * scale
        if lo >= lo_b and hi <= hi_b:
            break
        scale = np.nextafter(scale, np.float32(0))
    return QParams(np.asarray(scale, np.float32), qp.zero_point, qp.axis)


def _clip_bounds(clip: gs.Node) -> tuple[float, float]:
    ins = clip.inputs
    lo = float(np.asarray(ins[1].values)) if len(ins) > 1 and _present(ins[1]) else -np.inf
    hi = float(np.asarray(ins[2].values)) if len(ins) > 2 and _present(ins[2]) else np.inf
    return lo, hi


def _fusable_epilogue(host: gs.Node, c: gs.Node, *, first: bool) -> bool:
    """Whether the runtime folds ``c`` into ``host``: Relu, Clip with constant bounds, MatMul's bias Add."""
    if c.op == "Relu":
        return True
    if c.op == "Clip":
        return len(c.inputs) > 1 and all(_is_float_const(x) for x in c.inputs[1:3] if _present(x))
    if c.op == "Add" and host.op == "MatMul" and first and len(c.inputs) == 2:
        return any(_is_float_const(x) and np.asarray(x.values).ndim <= 1 for x in c.inputs)
    return False


def _float_layer_dq(
    layer: gs.Node, q_out: gs.Variable, qp: QParams, fresh, new_nodes: list[gs.Node]
) -> gs.Variable | None:
    """A DQ of its own for a Conv/ConvTranspose/Gemm kept float, with its one scale spread per channel.

    onnxruntime 1.32 (``WeightBiasQuantization``) quantizes the float weights of a Conv, ConvTranspose or
    Gemm whose input comes from a per-tensor DQ, per tensor, and then fuses it into an integer kernel:
    a layer kept float for speed (``_narrow_group_reason``) came back as the slow int8 one (6.5 ms
    against 1.0 ms in float, a 2-channels-per-group conv at batch 32). The same values on a per-channel
    DQ (axis 1, every entry equal) are not picked up; the layer needs a DQ anyway. None where the
    channel count is not known from the layer's weight.
    """
    if layer.op not in ("Conv", "ConvTranspose", "Gemm") or len(layer.inputs) < 2:
        return None
    w = layer.inputs[1]
    if not isinstance(w, gs.Constant) or np.asarray(w.values).ndim < 2:
        return None
    shape = np.asarray(w.values).shape
    if layer.op == "Conv":
        channels = shape[1] * int(layer.attrs.get("group", 1))
    elif layer.op == "ConvTranspose":
        channels = shape[0]
    else:
        if int(layer.attrs.get("transA", 0)):
            return None
        channels = shape[1] if int(layer.attrs.get("transB", 0)) else shape[0]
    base = q_out.name
    scale = gs.Constant(fresh(f"{base}_s_ch"), np.full(channels, np.asarray(qp.scale).reshape(()), np.float32))
    zp = gs.Constant(fresh(f"{base}_zp_ch"), np.full(channels, qp.zero_point, qp.zero_point.dtype))
    out = gs.Variable(fresh(f"{base}_dq_ch"), dtype=np.float32, shape=q_out.shape)
    new_nodes.append(gs.Node("DequantizeLinear", fresh(f"{base}_DQ_ch"), {"axis": 1}, [q_out, scale, zp], [out]))
    return out


def silu_nodes(graph: gs.Graph) -> dict[int, gs.Tensor]:
    """``{id: x}`` for the ``Sigmoid`` and ``Mul`` of every ``x * Sigmoid(x)`` in ``graph``.

    Only a Sigmoid whose output that Mul alone reads (what onnxruntime's QuickGelu fusion needs).
    """
    out: dict[int, gs.Tensor] = {}
    for sig in graph.nodes:
        if sig.op != "Sigmoid" or len(sig.inputs) != 1 or len(sig.outputs[0].outputs) != 1:
            continue
        mul = sig.outputs[0].outputs[0]
        x = sig.inputs[0]
        if mul.op == "Mul" and len(mul.inputs) == 2 and {id(t) for t in mul.inputs} == {id(x), id(sig.outputs[0])}:
            out[id(sig)] = out[id(mul)] = x
    return out


def gelu_chain_nodes(graph: gs.Graph) -> set[int]:
    """Ids of the elementwise nodes of every GELU written out around an ``Erf`` or ``Tanh`` in ``graph``.

    From the ``Erf``/``Tanh`` node ``E``: forward, ``Add(1)`` then a ``Mul`` by a variable ``y``, and
    optionally a ``Mul`` by a constant (the 0.5); ``x`` is ``y``, or the input of ``y = Mul(x, c)``.
    Backward from ``E``, every node up to ``x`` must be a Div/Mul/Add/Sub/Pow whose inputs are constants,
    ``x`` or outputs of such nodes (``x / sqrt(2)``; ``c1 * (x + c2 * x**3)``). Every intermediate
    output must be read inside the chain only (and not be a graph output). Anything else: not a GELU,
    nothing marked.
    """
    out: set[int] = set()
    graph_outputs = {id(t) for t in graph.outputs}
    for e in graph.nodes:
        if e.op not in ("Erf", "Tanh") or len(e.inputs) != 1 or len(e.outputs[0].outputs) != 1:
            continue
        if len(e.inputs[0].outputs) != 1:
            continue
        add = e.outputs[0].outputs[0]
        if add.op != "Add" or not any(isinstance(t, gs.Constant) for t in add.inputs):
            continue
        if len(add.outputs[0].outputs) != 1 or add.outputs[0].outputs[0].op != "Mul":
            continue
        mul = add.outputs[0].outputs[0]
        ys = [t for t in mul.inputs if t is not add.outputs[0]]
        if len(ys) != 1 or isinstance(ys[0], gs.Constant):
            continue
        chain = [add, mul]
        y = ys[0]
        candidates = [y]
        half = y.inputs[0] if y.inputs else None
        if half is not None and half.op == "Mul" and len(y.outputs) == 1:
            var = [t for t in half.inputs if not isinstance(t, gs.Constant)]
            if len(var) == 1 and len(half.inputs) == 2:
                candidates.insert(0, var[0])  # 0.5 * x computed first
        last = mul.outputs[0]
        if len(last.outputs) == 1 and last.outputs[0].op == "Mul" and any(
            isinstance(t, gs.Constant) for t in last.outputs[0].inputs
        ):
            chain.append(last.outputs[0])
        for x in candidates:
            back = _chain_back(e.inputs[0], x)
            if back is None:
                continue
            if x is not y:
                back.append(y.inputs[0])
            nodes = [*back, e, *chain]
            if any(id(n.outputs[0]) in graph_outputs for n in nodes[:-1]):
                break
            out.update(id(n) for n in nodes)
            break
    return out


def norm_chain_nodes(graph: gs.Graph) -> set[int]:
    """Ids of the Div/Reciprocal/Mul/Add nodes after each ``Sqrt`` of a normalization written out.

    From the ``Sqrt``, follow single readers through Div, Reciprocal, Mul and Add (at most four:
    ``/ s``, ``* gamma``, ``+ beta``; RMSNorm's ``1 / s``, ``x * r``, ``* w``); a Mul or Add with no
    constant operand ends the walk unless it multiplies by the chain itself (``x * r``). Intermediate
    outputs must have one reader and not be graph outputs.
    """
    out: set[int] = set()
    graph_outputs = {id(t) for t in graph.outputs}
    for sq in graph.nodes:
        if sq.op != "Sqrt" or len(sq.outputs[0].outputs) != 1:
            continue
        t, chain = sq.outputs[0], []
        while len(chain) < 4 and len(t.outputs) == 1 and id(t) not in graph_outputs:
            c = t.outputs[0]
            if c.op not in ("Div", "Reciprocal", "Mul", "Add"):
                break
            constant = any(isinstance(x, gs.Constant) for x in c.inputs)
            after_div = chain and chain[-1].op in ("Div", "Reciprocal")
            if c.op in ("Add", "Mul") and chain and not constant and (c.op == "Add" or not after_div):
                break
            chain.append(c)
            t = c.outputs[0]
        if any(n.op in ("Mul", "Add") for n in chain) and chain[0].op in ("Div", "Reciprocal"):
            out.update(id(n) for n in chain)
    return out


def _chain_back(t: gs.Tensor, x: gs.Tensor) -> list[gs.Node] | None:
    """The elementwise nodes between ``x`` and ``t`` (inputs constants, ``x`` or their outputs), or None."""
    seen: dict[int, gs.Node] = {}
    todo = [t]
    while todo:
        cur = todo.pop()
        if cur is x or isinstance(cur, gs.Constant):
            continue
        prod = cur.inputs[0] if cur.inputs else None
        if prod is None or prod.op not in _GELU_OPS or len(prod.outputs) != 1:
            return None
        if id(prod) not in seen:
            seen[id(prod)] = prod
            todo.extend(prod.inputs)
    inside = {id(n.outputs[0]) for n in seen.values()}
    for n in seen.values():
        if n.outputs[0] is not t and not all(id(c.outputs[0]) in inside or c.op in ("Erf", "Tanh")
                                             for c in n.outputs[0].outputs):
            return None
    return list(seen.values()) if seen else None


def _bounded_input(node: gs.Node) -> gs.Tensor | None:
    """The variable operand of ``Min(t, c)`` / ``Max(t, c)`` with a constant ``c``, else None."""
    if node.op not in ("Min", "Max") or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    var = [x for x in node.inputs if not isinstance(x, gs.Constant)]
    if len(var) != 1 or not any(_is_float_const(x) for x in node.inputs):
        return None
    return var[0]


def _downsamples(pool: gs.Node) -> bool:
    """A pool with strides of product >= 4 (2x2): it leaves at most a quarter of the values."""
    return int(np.prod(pool.attrs.get("strides", [1]))) >= 4


# onnxruntime's QDQ propagation moves a Q that follows a MaxPool above it, so the pool would run on
# uint8 in NCHW (ConcatNet stem at batch 64: 1920 us, against a float pool fused into the blocked
# layout). A Max between them stops that: Max(x, c) with c the real value of the lowest quantized
# level changes nothing Q can see (below c, Q saturates to that level anyway), and onnxruntime
# neither removes it nor moves a Q through it (tests/test_qdq.py checks both).
_POOL_BARRIER = "Max"


def _pool_barrier(t: gs.Variable, out: gs.Variable, qp: QParams, fresh) -> gs.Node:
    """``out = Max(t, lowest level of qp)``: the float pool's output as its Q will see it."""
    qmin = np.iinfo(np.asarray(qp.zero_point).dtype).min
    low = np.asarray((float(qmin) - float(np.asarray(qp.zero_point))) * float(np.asarray(qp.scale)), np.float32)
    return gs.Node(_POOL_BARRIER, fresh(f"{t.name}_floor"), inputs=[t, gs.Constant(fresh(f"{t.name}_floor_c"), low)],
                   outputs=[out])


def _patchify(conv: gs.Node, w: np.ndarray) -> bool:
    """A Conv that cuts its input into non-overlapping patches: stride = kernel, no padding or dilation."""
    kernel = list(w.shape[2:])
    pads = conv.attrs.get("pads") or [0] * (2 * len(kernel))
    dilations = conv.attrs.get("dilations") or [1] * len(kernel)
    auto = conv.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return (list(conv.attrs.get("strides") or [1] * len(kernel)) == kernel and not any(pads)
            and all(d == 1 for d in dilations) and auto in ("NOTSET", "VALID") and any(k > 1 for k in kernel))


def _conv_depth(conv: gs.Node) -> int:
    """Length of one output's dot product: C_in/group * kH * kW (from the weight's shape)."""
    return int(np.prod(np.asarray(conv.inputs[1].values).shape[1:]))


# ============================================================================ storage compaction

_SCALE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_BIAS_HOSTS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_INT16 = np.iinfo(np.int16)
_NARROW_SUFFIX = "_int16"


class CompactQDQ:
    """Exact storage rewrites of a QDQ graph: the same numbers, the same fused kernels, fewer bytes.

    On a small model the quantization metadata is a large part of the file (MobileNet-style CNN with
    0.28 MB of fp32 weights: 26 KB of scales, int32 biases, names and nodes beside 70 KB of int8
    weights). Each rewrite leaves every output bit-identical (checked on onnxruntime with and without
    graph optimisations) and onnxruntime's optimised graph unchanged:

    - ``absorb_activations``: ``Q(Clip(x, lo, hi)) == Q(x)`` when the quantized range
      ``[(q_min - z) s, (q_max - z) s]`` lies inside ``[lo, hi]`` (``InsertQDQ`` chooses such scales
      so that onnxruntime can drop the Clip; ``Relu`` is ``Clip(0, inf)``, so uint8 with ``z = 0``).
      The Relu/Clip node goes when all its consumers are such Qs.
    - ``bias_scale_products``: an int32 bias's scale vector ``s_b = s_x * s_w`` is stored as
      ``Mul(s_x, s_w)`` of the two scales already in the graph (after checking that float32
      multiplication reproduces the stored vector bit for bit); onnxruntime folds it back at load.
    - ``narrow_biases``: an int32 bias whose values fit int16 is stored int16 behind ``Cast(to=INT32)``.
    - ``share_constants``: Q/DQ scale and zero-point constants with equal dtype, shape and bytes
      become one initializer (all the uint8 zero points of ReLU/ReLU6 outputs, a Reshape's reused scale).
    - ``short_names``: the tensors and nodes of the quantization machinery (Q/DQ nodes, their
      outputs, scales and zero points, the Mul/Cast above) get short generated names (``q3``, ``dq3``,
      ``s3``, ...); integer weights and biases keep theirs (``W_q``), as do the input model's
      tensors and nodes and the graph inputs/outputs.
    - ``drop_value_info``: intermediate tensors lose their declared shapes (``value_info``), which
      onnxruntime and ``onnx.shape_inference`` recompute from the graph.

    Before / after (one Conv of the depthwise CNN)::

        x -> Clip(0,6) -> Q(s_x, z_x) -> DQ -> Conv(DQ(Wq, s_w), DQ(bq:int32, s_b)) -> ...
        x -> Q(s3, z0) -> DQ -> Conv(DQ(W_q, s4), DQ(Cast(b_q:int16), Mul(s3, s4))) -> ...

    Args:
        absorb_activations: drop Relu/Clip nodes that a following Q makes redundant.
        bias_scale_products: store per-channel bias scales as ``Mul(s_x, s_w)``.
        narrow_biases: int32 biases that fit int16 are stored as int16 + Cast.
        share_constants: deduplicate equal Q/DQ scale and zero-point constants.
        short_names: short names for generated tensors and nodes.
        drop_value_info: no ``value_info`` for intermediate tensors.
        min_elements: smallest bias (elements) worth a Mul or Cast node (each node costs ~20-30 bytes).
    """

    name = "compact_qdq"

    def __init__(
        self,
        *,
        absorb_activations: bool = True,
        bias_scale_products: bool = True,
        narrow_biases: bool = True,
        share_constants: bool = True,
        short_names: bool = True,
        drop_value_info: bool = True,
        min_elements: int = 16,
    ) -> None:
        self.absorb_activations = absorb_activations
        self.bias_scale_products = bias_scale_products
        self.narrow_biases = narrow_biases
        self.share_constants = share_constants
        self.short_names = short_names
        self.drop_value_info = drop_value_info
        self.min_elements = min_elements

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions: a graph without Q/DQ nodes is left as it is."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Apply the enabled rewrites in order; count each."""
        if not any(n.op in _SCALE_OPS for n in graph.nodes):
            return PassResult(graph, False, {})
        graph.toposort()
        outputs = {id(t) for t in graph.outputs}
        made: list[gs.Node] = []  # Mul/Cast nodes created here (renamed with the Q/DQ machinery)
        stats = {
            "activations_absorbed": self._absorb(graph, outputs) if self.absorb_activations else 0,
            "bias_scales_as_products": self._bias_products(graph, made) if self.bias_scale_products else 0,
            "biases_int16": self._narrow(graph, made) if self.narrow_biases else 0,
            "constants_shared": self._share(graph) if self.share_constants else 0,
        }
        graph.nodes.extend(made)
        graph.cleanup()
        stats["names_shortened"] = self._rename(graph, made) if self.short_names else 0
        stats["value_info_dropped"] = self._drop_value_info(graph) if self.drop_value_info else 0
        return PassResult(graph, any(stats.values()), stats)

    # ------------------------------------------------------------------ rewrites
    @staticmethod
    def _absorb(graph: gs.Graph, outputs: set[int]) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.op not in ("Relu", "Clip") or not node.outputs or not node.inputs:
                continue
            t = node.outputs[0]
            if id(t) in outputs or not t.outputs:
                continue
            if node.op == "Relu":
                lo, hi = 0.0, np.inf
            elif all(x is None or not x.name or _is_float_const(x) for x in node.inputs[1:3]):
                lo, hi = _clip_bounds(node)
            else:
                continue
            if not all(_q_range_inside(c, t, lo, hi) for c in t.outputs):
                continue
            src = node.inputs[0]
            for c in list(t.outputs):
                c.inputs[0] = src
            node.inputs.clear()
            node.outputs.clear()
            count += 1
        return count

    def _bias_products(self, graph: gs.Graph, made: list[gs.Node]) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.op not in _BIAS_HOSTS or len(node.inputs) < 3:
                continue
            b_dq, x_dq, w_dq = (_dq_of(node.inputs[i]) for i in (2, 0, 1))
            if b_dq is None or x_dq is None or w_dq is None:
                continue
            s_b, s_x, s_w = b_dq.inputs[1], x_dq.inputs[1], w_dq.inputs[1]
            if not all(isinstance(s, gs.Constant) for s in (s_b, s_x, s_w)):
                continue
            vb = np.asarray(s_b.values)
            if vb.size < self.min_elements or vb.dtype != np.float32:
                continue
            prod = np.asarray(s_x.values, np.float32) * np.asarray(s_w.values, np.float32)
            if prod.dtype != np.float32 or prod.shape != vb.shape or prod.tobytes() != vb.tobytes():
                log.debug("bias scale of %s is not s_x * s_w bit for bit; kept", node.name)
                continue
            out = gs.Variable(f"{s_b.name}_mul", dtype=np.float32, shape=list(vb.shape))
            made.append(gs.Node("Mul", f"{s_b.name}_Mul", inputs=[s_x, s_w], outputs=[out]))
            b_dq.inputs[1] = out
            count += 1
        return count

    def _narrow(self, graph: gs.Graph, made: list[gs.Node]) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.op != "DequantizeLinear" or not isinstance(node.inputs[0], gs.Constant):
                continue
            q = node.inputs[0]
            v = np.asarray(q.values)
            if v.dtype != np.int32 or v.size < self.min_elements or len(q.outputs) != 1:
                continue
            if v.min() < _INT16.min or v.max() > _INT16.max:
                continue
            small = gs.Constant(f"{q.name}{_NARROW_SUFFIX}", v.astype(np.int16))
            out = gs.Variable(f"{q.name}_32", dtype=np.int32, shape=list(v.shape))
            made.append(gs.Node("Cast", f"{q.name}_Cast", {"to": onnx.TensorProto.INT32}, [small], [out]))
            node.inputs[0] = out
            count += 1
        return count

    @staticmethod
    def _share(graph: gs.Graph) -> int:
        canon: dict[tuple, gs.Constant] = {}
        count = 0
        for node in graph.nodes:
            if node.op not in _SCALE_OPS:
                continue
            for i in (1, 2):
                if i >= len(node.inputs) or not isinstance(node.inputs[i], gs.Constant):
                    continue
                c = node.inputs[i]
                v = np.asarray(c.values)
                key = (v.dtype.str, v.shape, v.tobytes())
                first = canon.setdefault(key, c)
                if first is not c:
                    node.inputs[i] = first
                    count += 1
        return count

    @staticmethod
    def _drop_value_info(graph: gs.Graph) -> int:
        """Forget dtype and shape of intermediate tensors, so that no value_info is written for them."""
        io = {id(t) for t in (*graph.inputs, *graph.outputs)}
        count = 0
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and id(t) not in io and (t.dtype is not None or t.shape is not None):
                t.dtype, t.shape = None, None
                count += 1
        return count

    @staticmethod
    def _rename(graph: gs.Graph, made: list[gs.Node]) -> int:
        """Short names for Q/DQ nodes, their outputs and constants, and the Mul/Cast nodes made here."""
        made_ids = {id(m) for m in made}
        machinery = [n for n in graph.nodes if n.op in _SCALE_OPS or id(n) in made_ids]
        keep = {id(t) for t in (*graph.inputs, *graph.outputs)}
        owned: dict[int, tuple[gs.Tensor, str]] = {}
        own_nodes: list[tuple[gs.Node, str]] = []
        for k, n in enumerate(machinery):
            tag = {"QuantizeLinear": "q", "DequantizeLinear": "dq", "Mul": "m", "Cast": "c"}.get(n.op, "x")
            own_nodes.append((n, f"{tag.upper()}{k}"))
            for t in n.outputs:
                owned.setdefault(id(t), (t, f"{tag}{k}"))
            for j, t in enumerate(n.inputs):
                if isinstance(t, gs.Constant) and all(c.op in _SCALE_OPS or id(c) in made_ids for c in t.outputs):
                    if j == 0:  # integer data keeps its name (``W_q``); an int16 copy takes the int32's
                        short = t.name[: -len(_NARROW_SUFFIX)] if t.name.endswith(_NARROW_SUFFIX) else t.name
                    else:
                        short = f"{'sz'[min(j, 2) - 1]}{k}"
                    owned.setdefault(id(t), (t, short))
        owned = {i: v for i, v in owned.items() if i not in keep}
        used = {t.name for t in graph.tensors().values() if id(t) not in owned}
        renamed = {id(n) for n, _ in own_nodes}
        used |= {n.name for n in graph.nodes if n.name and id(n) not in renamed}
        fresh = fresh_names(used)
        count = 0
        for t, short in owned.values():
            t.name = fresh(short)
            count += 1
        for n, short in own_nodes:
            n.name = fresh(short)
        return count


def _dq_of(t: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear producing ``t`` (with a scale input), or None."""
    prod = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
    return prod if prod is not None and prod.op == "DequantizeLinear" and len(prod.inputs) >= 2 else None


def _q_range_inside(q: gs.Node, t: gs.Tensor, lo: float, hi: float) -> bool:
    """Whether ``q`` quantizes ``t`` per tensor with ``[(q_min - z) s, (q_max - z) s]`` inside ``[lo, hi]``."""
    if q.op != "QuantizeLinear" or q.inputs[0] is not t or not isinstance(q.inputs[1], gs.Constant):
        return False
    s = np.asarray(q.inputs[1].values)
    if s.size != 1 or s.dtype != np.float32 or not float(s.reshape(())) > 0:
        return False
    if len(q.inputs) > 2 and _present(q.inputs[2]):
        if not isinstance(q.inputs[2], gs.Constant):
            return False
        z = np.asarray(q.inputs[2].values)
    elif "output_dtype" in q.attrs:
        return False
    else:
        z = np.zeros((), np.uint8)
    if z.size != 1 or z.dtype not in (np.uint8, np.int8):
        return False
    info = np.iinfo(z.dtype)
    zi = int(z.reshape(()))
    s32 = np.float32(s.reshape(()))
    return bool(np.float32(info.min - zi) * s32 >= lo and np.float32(info.max - zi) * s32 <= hi)
