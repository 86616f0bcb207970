"""Quantization-aware fine-tuning with learned scales (LSQ), exported as the PTQ QDQ graph.

Start from exactly what post-training quantization produces (``InsertQDQ`` with a calibration
table), make its scales and the float weights trainable, fine-tune, and write the learned values
back into the same graph. The structure never changes, so the result is the quantize issue's output
with better numbers, and onnxruntime fuses it to the same integer kernels::

    PTQ graph (InsertQDQ)                           QAT graph (trained in torch)
    x ─ Q(s_x,z_x) ─ DQ ─┐                          x ─ Q(s_x*,z_x) ─ DQ ─┐              (* = learned)
    W_q ─ DQ(s_w) ───────┼─ Conv ─ ...    ──▶       W* ─ Q(s_w*) ─ DQ ────┼─ Conv ─ ...
    b_q ─ DQ(s_x·s_w) ───┘                          b* ─ Q(s_x*·s_w*) ─ DQ┘
    export: W_q = Q(W*, s_w*), b_q = round(b* / (s_x*·s_w*)), scales = s*, zero points unchanged

Fake quantization (LSQ, Esser et al. 2020), per tensor or per channel, straight-through rounding::

    q = clamp(round(x / s) + z, q_min, q_max),   x̂ = (q − z) · s,   ∂round/∂u := 1
    ∂L/∂s is scaled by g = 1 / sqrt(n · q_max)   (n = elements per scale)

Weights start from the student's float weights (matched to each quantized weight by shape and by
lying within s/2 of its dequantized value), so epoch 0 of QAT *is* the PTQ model. Activation scales
that PTQ made equal on purpose (Concat inputs and output, MaxPool/Reshape-style scale-keeping ops)
are tied to one learned parameter so the runtime can still drop requantization there.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.bridge.convert import OnnxModule
from onnxpress.errors import UnsupportedModelError
from onnxpress.model_io import normalize_model, quantized_ops
from onnxpress.passes.base import fresh_names, proto_names
from onnxpress.passes.weight_only import _pack, _unpack, _unpack_zero_points

__all__ = ["SCALE_LR_FACTOR", "QATPlan", "check_trainable_qdq", "prepare_qat"]

log = logging.getLogger(__name__)

_INT32 = (-(2**31), 2**31 - 1)

SCALE_LR_FACTOR = 0.01
"""The quantization scales learn at this fraction of the weights' learning rate.

Adam moves every parameter by about the learning rate per step, whatever its gradient's size (LSQ's
gradient scale g does not survive Adam's normalisation), and a scale is 1e-4-1e-1 where a weight step of
1e-4 is small: at the full rate the first epoch of QAT cost 4-20 dB before training recovered. Measured on
onnxruntime's default QDQ output of the reference CNNs (QAT, MSE distillation, lr 1e-4, 20 epochs, test
split): factor 1 / 0.1 / 0.01 / scales frozen: MobileNet 26.04 dB -> 30.63 / 31.41 / 32.36 / 31.98, ResNet
36.00 -> 36.64 / 38.88 / 39.26 / 39.23."""


@dataclasses.dataclass
class _Weight:
    float_name: str  # trainable float initializer in the QAT graph
    q_name: str  # integer initializer in the PTQ graph
    scale: str
    zero_point: str
    axis: int


@dataclasses.dataclass
class _Bias:
    float_name: str
    q_name: str
    scale: str  # bias scale initializer in the PTQ graph (= s_x · s_w)
    x_scale: str
    w_scale: str


@dataclasses.dataclass
class _Packed:
    """A ``MatMulNBits`` weight: trained as a float ``[N * blocks, block]`` behind a blockwise fake-quant."""

    float_name: str  # trainable float initializer in the QAT graph, [N * blocks, block]
    b_name: str  # packed uint8 initializer of the student, [N, blocks, block / 2]
    scale_name: str  # the student's scales initializer, [N * blocks]
    scale: str  # trainable |scales| in the QAT graph
    zero_point: np.ndarray  # uint8 [N * blocks] the QAT graph uses (see ``flipped``)
    flipped: np.ndarray  # bool [N * blocks]: a negative stored scale, trained as |s| with codes 15 - q


@dataclasses.dataclass
class QATPlan:
    """The PTQ graph, its trainable twin, and how to write learned values back.

    Attributes:
        ptq: the QDQ model ``InsertQDQ`` produced (what PTQ alone would ship).
        qat: the trainable twin (float weights behind Q/DQ), run by :class:`OnnxModule`.
        module: the QAT module (learned scales), fine-tuned in place.
    """

    ptq: onnx.ModelProto
    qat: onnx.ModelProto
    module: OnnxModule
    weights: list[_Weight]
    biases: list[_Bias]
    ties: dict[str, list[str]]  # representative scale name → every PTQ scale initializer it stands for
    caps: dict[str, float]  # representative scale name → largest value keeping it inside a Clip's range
    packed: list[_Packed] = dataclasses.field(default_factory=list)  # MatMulNBits weights

    def export(self, module: OnnxModule | None = None) -> onnx.ModelProto:
        """The PTQ graph with the learned weights, biases and scales written in."""
        module = module or self.module
        out = onnx.ModelProto()
        out.CopyFrom(self.ptq)
        values: dict[str, np.ndarray] = {}

        def learned(name: str) -> np.ndarray:
            value = module.initializer(name).detach().cpu().numpy().astype(np.float32)
            if name in self.caps:
                value = np.minimum(value, np.float32(self.caps[name]))  # the Min node of the QAT graph
            return np.abs(value)

        for rep, members in self.ties.items():
            for m in members:
                values[m] = learned(rep).reshape(_init_shape(self.ptq, m))
        inits = {i.name: i for i in out.graph.initializer}
        for w in self.weights:
            s = learned(w.scale)
            if w.zero_point in inits:
                zp = numpy_helper.to_array(inits[w.zero_point])
            else:  # the PTQ graph omits it: zero of the stored integer type
                zp = np.zeros(s.shape, numpy_helper.to_array(inits[w.q_name]).dtype)
            values[w.scale] = s.reshape(_init_shape(self.ptq, w.scale))
            values[w.q_name] = _quantize(module.initializer(w.float_name).detach().numpy(), s, zp, w.axis)
        for b in self.biases:
            s_b = (learned(b.x_scale) * learned(b.w_scale)).astype(np.float32).reshape(-1)
            bias = module.initializer(b.float_name).detach().numpy().astype(np.float64).reshape(-1)
            q = np.clip(np.rint(bias / np.broadcast_to(s_b, bias.shape).astype(np.float64)), *_INT32)
            values[b.q_name] = q.astype(np.int32).reshape(_init_shape(self.ptq, b.q_name))
            if b.scale in inits:  # else the graph computes it: Mul(s_x, s_w) of the scales written here
                shape = _init_shape(self.ptq, b.scale)
                values[b.scale] = (s_b.reshape(shape) if s_b.size == math.prod(shape) else np.broadcast_to(s_b, shape))
        for p in self.packed:
            s = learned(p.scale)
            w = module.initializer(p.float_name).detach().cpu().numpy().astype(np.float32)
            q = np.clip(np.rint(w / s[:, None]) + p.zero_point[:, None], 0, 15).astype(np.uint8)
            q = np.where(p.flipped[:, None], 15 - q, q).astype(np.uint8)
            n, blocks = _init_shape(self.ptq, p.b_name)[:2]  # B is [N, blocks, block / 2]
            # the quantizer's own MatMulNBits packing, from its [K, N] codes and [blocks, N] scales
            values[p.b_name], _ = _pack(q.reshape(n, -1).T, s.reshape(n, blocks).T, q.shape[1])
            values[p.scale_name] = np.where(p.flipped, -s, s).reshape(_init_shape(self.ptq, p.scale_name))
        for name, param in module.named_onnx_parameters():  # float weights of layers PTQ left float
            if name in inits and name not in values and inits[name].data_type == onnx.TensorProto.FLOAT:
                values[name] = param.detach().cpu().numpy()
        for name, arr in values.items():
            old = inits[name]
            dtype = numpy_helper.to_array(old).dtype
            arr = np.asarray(arr)
            if np.issubdtype(dtype, np.integer) and arr.size and (
                arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max
            ):  # an int16-stored bias (read through Cast to int32) that learned past int16
                dtype = arr.dtype
            old.CopyFrom(numpy_helper.from_array(arr.astype(dtype), name))
        out.producer_name = "onnxpress.finetune.qat"
        return out


def _init_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    for i in model.graph.initializer:
        if i.name == name:
            return tuple(i.dims)
    raise KeyError(name)


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """``clip(round(w / s) + z)`` per channel along ``axis`` (or per tensor), in the zero point's type."""
    w = w.astype(np.float32)
    s, z = scale.astype(np.float32), zp.astype(np.int64)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(w / s).astype(np.int64) + z
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def prepare_qat(
    student: onnx.ModelProto,
    arrays: Mapping[str, np.ndarray],
    *,
    table: object = None,
    calibration_method: str | None = None,
    per_channel: bool = True,
) -> QATPlan:
    """Quantize a float ``student`` with ``onnxpress quantize`` (or take a quantized one as it is); build its twin.

    QAT trains the graph that ``onnxpress quantize`` ships (GPTQ weights, bias correction, the layers it leaves
    float, compact storage), so it never ships worse than ``quantize`` on the held-out split. Until the
    fourteenth session it started from a bare ``InsertQDQ`` graph, which ships worse than ``quantize`` alone: on
    the depthwise CNN (``bench/finetune.py``) that PTQ read 31.2 dB and its QAT 33.3 dB, against 38.1 dB. An LSTM
    stays float (``quantize`` makes it DynamicQuantizeLSTM, which has no fake-quant twin).

    A student that is already quantized (``onnxpress quantize``'s output, or onnxruntime's QDQ format) is
    trained in its own graph. Either way its integer weights and scales start the QAT (weights at their
    dequantized values), so before training the module computes exactly that model, and the export writes the
    learned values back into that graph, every node and name kept.

    Args:
        student: the float model (opset >= 13 is ensured here), or a quantized model (int8/uint8/int16 Q/DQ
            and 4-bit MatMulNBits; see :func:`check_trainable_qdq`).
        arrays: sample inputs: ``quantize``'s calibration data for a float student.
        table: a ``CalibrationTable`` for ``quantize`` (a float student only).
        calibration_method: ``quantize``'s range method (default: its default).
        per_channel: per-channel weight scales.

    Raises:
        UnsupportedModelError: the interpreter cannot run the model, a quantized student holds what QAT cannot
            train, or a table is given for a quantized student.
    """
    student = normalize_model(student, min_opset=13, name_nodes=False)
    if quantized_ops(student):
        if table is not None:
            raise UnsupportedModelError(
                "the student is already quantized: its own scales start the QAT; a calibration table is for "
                "a float student"
            )
    else:
        from onnxpress.quantize import quantize

        # quantized_attention=False: the bridge trains int8 Gemms behind Q/DQ, not onnxruntime's QAttention
        student = quantize(student, calib=[dict(arrays)], table=table, method=calibration_method,
                           per_channel=per_channel, exclude=["op:LSTM"], quantized_attention=False,
                           progress=False).model  # fmt: skip
    check_trainable_qdq(student)
    ptq = _private_bias_scales(student)
    qat, weights, biases, ties, caps = _trainable_twin(ptq)
    packed = _unpack_nbits(qat)
    # no integer weight is fine: float weights behind a QuantizeLinear (onnxruntime's output for weights held in
    # Constant nodes) and a codebook's levels train too; a student with nothing to train is refused by the trainer
    scales = set(ties) | {w.scale for w in weights} | {p.scale for p in packed}
    module = OnnxModule(qat, learn_scales=True, trainable=scales, narrow_constants=True)
    module.lr_factors = dict.fromkeys(scales, SCALE_LR_FACTOR)
    log.info("QAT: %d weights, %d biases, %d activation scales", len(weights), len(biases), len(ties))
    return QATPlan(ptq, qat, module, weights, biases, ties, caps, packed)


_TRAINABLE_INTEGERS = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                                  onnx.TensorProto.UINT16, onnx.TensorProto.INT32})


def check_trainable_qdq(model: onnx.ModelProto) -> None:
    """Raise unless every quantized op of ``model`` is a QuantizeLinear/DequantizeLinear QAT can train.

    QAT trains per-tensor and per-channel Q/DQ of 8/16-bit integers (and int32 biases), 4-bit
    ``MatMulNBits`` weights (uint8 zero points or none, no ``g_idx``) and a ``GatherBlockQuantized`` token table
    tied to one of them (an untied one is refused when the twin is built). Integer-kernel ops (QLinearConv,
    MatMulInteger, ...), dynamic quantization (DynamicQuantizeLSTM, ...) and blockwise or 4-bit/float8 Q/DQ
    have no trainable twin here: the message names them.

    Raises:
        UnsupportedModelError: naming the ops or values and what to do instead.
    """
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            zp = node.input[3] if len(node.input) > 3 else ""
            zp_float = bool(zp) and types.get(zp, onnx.TensorProto.UINT8) != onnx.TensorProto.UINT8
            if attrs.get("bits", 4) != 4 or (len(node.input) > 4 and node.input[4]) or zp_float:
                raise UnsupportedModelError(
                    f"MatMulNBits {node.name!r}: QAT trains 4-bit weights with uint8 zero points and no g_idx; "
                    "fine-tune the float model, then quantize"
                )
    trainable = ("QuantizeLinear", "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized")
    other = {op: n for op, n in quantized_ops(model).items() if op not in trainable}
    if other:
        ops = ", ".join(f"{n} x {op}" for op, n in sorted(other.items()))
        # onnxpress quantize's own int8 attention: the same int8 model with Gemms is one option away
        attention = "" if "QAttention" not in other else (
            " (onnxpress quantize writes QAttention for attention; with --keep-attention, or "
            "quantized_attention=False, it writes Q/DQ Gemms that QAT trains)")
        raise UnsupportedModelError(
            f"QAT trains QuantizeLinear/DequantizeLinear and 4-bit MatMulNBits models; this one holds {ops}: "
            "fine-tune the float model instead (--qat quantizes it to int8 QDQ first, an LSTM staying float; or "
            f"fine-tune it in float, then quantize){attention}"
        )
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(a.name == "block_size" and a.i for a in node.attribute):
            raise UnsupportedModelError(
                f"{node.op_type} {node.name!r} is blockwise (4-bit weight-only); QAT trains per-tensor and "
                "per-channel 8-bit Q/DQ: fine-tune the float model, then quantize"
            )
        integer = next((types[t] for t in (*node.input[2:3], *node.input[:1], *node.output) if t in types), None)
        if integer is not None and integer not in _TRAINABLE_INTEGERS and integer != onnx.TensorProto.FLOAT:
            raise UnsupportedModelError(
                f"{node.op_type} {node.name!r} uses {onnx.TensorProto.DataType.Name(integer)}; QAT trains 8/16-bit "
                "integer Q/DQ: fine-tune the float model, then quantize"
            )


def _trainable_twin(
    ptq: onnx.ModelProto,
) -> tuple[onnx.ModelProto, list[_Weight], list[_Bias], dict[str, list[str]], dict[str, float]]:
    """The QAT graph: float weights behind Q/DQ, biases quantized with ``s_x·s_w``, tied scales.

    Every weight starts at its dequantized value, so the untrained twin computes ``ptq``.
    """
    qat = onnx.ModelProto()
    qat.CopyFrom(ptq)
    g = qat.graph
    inits = {i.name: i for i in g.initializer}
    fresh = fresh_names(proto_names(g))

    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers[name].append((n, i))

    weights: list[_Weight] = []
    biases: list[_Bias] = []
    new_nodes: list[onnx.NodeProto] = []
    act_scales: dict[str, tuple[str, str]] = {}  # Q/DQ scale name of activations → zero point name
    for node in list(g.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        stored = _stored_integers(node.input[0], inits, producer)
        if node.op_type == "QuantizeLinear" or stored is None:
            act_scales[node.input[1]] = (node.input[2] if len(node.input) > 2 else "", node.op_type)
            continue
        src, q = stored
        scale = _constant_scale(node.input[1], inits, producer)
        if len(node.input) > 2 and node.input[2]:
            zp = numpy_helper.to_array(inits[node.input[2]])
        else:  # zero point omitted (= 0 of the integer type): make it explicit so Q knows the type
            zp = np.zeros(scale.shape, q.dtype)
            zp_name = fresh(src + "_zero_point")
            g.initializer.append(numpy_helper.from_array(zp, zp_name))
            inits[zp_name] = g.initializer[-1]
            del node.input[2:]
            node.input.append(zp_name)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        deq = _dequant(q, scale, zp, axis)
        if q.dtype == np.int32:
            user = consumers[node.output[0]][0][0] if consumers[node.output[0]] else None
            x_dq = producer.get(user.input[0]) if user is not None else None
            w_dq = producer.get(user.input[1]) if user is not None and len(user.input) > 1 else None
            if x_dq is None or w_dq is None or "DequantizeLinear" not in (x_dq.op_type, w_dq.op_type):
                continue  # keep this bias as the PTQ integer constant
            fname = fresh(src + "_float")
            g.initializer.append(numpy_helper.from_array(deq.astype(np.float32), fname))
            ptq_scale = node.input[1]
            s_b, qb = fresh(src + "_scale_learned"), fresh(src + "_fakequant")
            new_nodes.append(helper.make_node("Mul", [x_dq.input[1], w_dq.input[1]], [s_b], name=fresh("bias_scale")))
            attrs = {a.name: a.i for a in node.attribute if a.name == "axis"}
            q_inputs = [fname, s_b, node.input[2]]
            q_node = helper.make_node("QuantizeLinear", q_inputs, [qb], name=fresh("bias_q"), **attrs)
            new_nodes.append(q_node)
            node.input[0], node.input[1] = qb, s_b
            biases.append(_Bias(fname, src, ptq_scale, x_dq.input[1], w_dq.input[1]))
            continue
        if q.size <= 1:  # a quantized scalar (onnxruntime quantizes attention's 1/sqrt(d)): a constant, not trained
            continue
        fname = fresh(src + "_float")
        g.initializer.append(numpy_helper.from_array(deq, fname))
        qw = fresh(src + "_fakequant")
        attrs = {a.name: a.i for a in node.attribute if a.name == "axis"}
        q_inputs = [fname, node.input[1], node.input[2]]
        new_nodes.append(helper.make_node("QuantizeLinear", q_inputs, [qw], name=fresh("weight_q"), **attrs))
        node.input[0] = qw
        weights.append(_Weight(fname, src, node.input[1], node.input[2], axis))

    # Tie activation scales that PTQ made identical (same value and zero point) to one parameter.
    groups: dict[tuple[bytes, bytes], list[str]] = collections.defaultdict(list)
    for name, (zp_name, _) in act_scales.items():
        zp_bytes = numpy_helper.to_array(inits[zp_name]).tobytes() if zp_name else b""
        key = (numpy_helper.to_array(inits[name]).tobytes(), zp_bytes)
        if name not in groups[key]:
            groups[key].append(name)
    ties = {members[0]: members for members in groups.values()}
    rename = {m: rep for rep, members in ties.items() for m in members if m != rep}
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Mul"):
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
    for node in new_nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for b in biases:
        b.x_scale = rename.get(b.x_scale, b.x_scale)
    caps = _cap_clip_scales(g, inits, ties, new_nodes, fresh)
    nodes = list(new_nodes) + list(g.node)  # the new nodes only read initializers: safe to go first
    del g.node[:]
    g.node.extend(nodes)
    return qat, weights, biases, ties, caps


def _cap_clip_scales(
    g: onnx.GraphProto,
    inits: Mapping[str, onnx.TensorProto],
    ties: Mapping[str, list[str]],
    new_nodes: list[onnx.NodeProto],
    fresh,
) -> dict[str, float]:
    """Keep a learned scale after ``Clip(lo, hi)`` inside the clip range: ``s ≤ hi / (q_max − z)``.

    onnxruntime removes the Clip (and so fuses Conv -> Q into QLinearConv) only when the quantized
    range lies inside the clip bounds; PTQ chooses such scales, and LSQ would otherwise grow out of
    them. The cap is a ``Min(s, cap)`` node in the QAT graph, so training sees exactly what ships.
    """
    producer = {o: n for n in g.node for o in n.output}
    caps: dict[str, float] = {}
    for node in g.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in ties or node.input[0] in inits:
            continue
        clip = producer.get(node.input[0])
        if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or clip.input[2] not in inits:
            continue
        hi = float(numpy_helper.to_array(inits[clip.input[2]]))
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.uint8(0)
        z, qmax = int(zp), int(np.iinfo(zp.dtype).max)
        if qmax <= z or hi <= 0:
            continue
        cap = np.float32(hi / (qmax - z))
        while np.float32(qmax - z) * cap > np.float32(hi):
            cap = np.nextafter(cap, np.float32(0))
        caps[node.input[1]] = min(caps.get(node.input[1], np.inf), float(cap))
    rename: dict[str, str] = {}
    for rep, cap in caps.items():
        cap_name, capped = fresh(rep + "_cap"), fresh(rep + "_capped")
        g.initializer.append(numpy_helper.from_array(np.asarray(cap, np.float32), cap_name))
        rename[rep] = capped
        new_nodes.insert(0, helper.make_node("Min", [rep, cap_name], [capped], name=fresh(rep + "_Min")))
    for node in [*g.node, *new_nodes]:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Mul"):
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
    return caps


def _unpack_nbits(qat: onnx.ModelProto) -> list[_Packed]:
    """Replace each 4-bit ``MatMulNBits`` of the QAT graph by a trainable float weight behind a blockwise fake-quant.

    onnxruntime's layout: ``B`` uint8 ``[N, blocks, block/2]`` (low nibble first), ``scales [N * blocks]``,
    optional packed uint8 zero points (else 8), optional bias; ``Y = A · Wᵀ (+ bias)`` with
    ``W[n, k] = (q[n, k] - z[n, b]) · s[n, b]``. In the QAT graph (standard ops, so the interpreter's
    straight-through QuantizeLinear does the rounding)::

        W[N*blocks, block] ─ Max(-z·s) ─ Min((15 - z)·s) ─ Q(s, z, axis 0) ─ DQ ─ Reshape[N, K] ─ Transpose ─┐
        A ───────────────────────────────────────────────────────────────────────────────────────── MatMul ─ (+ bias)

    The clip keeps every code in [0, 15] (QuantizeLinear would clamp to uint8's range). A block stored with a
    negative scale (``passes.weight_only`` maps a block's largest magnitude to code 0 so) trains as ``|s|`` with
    zero point ``15 - z`` and codes ``15 - q``: the same values, and the interpreter's learned scales stay positive.
    """
    g = qat.graph
    inits = {i.name: i for i in g.initializer}
    fresh = fresh_names(proto_names(g))
    packed: list[_Packed] = []
    weights: list[onnx.NodeProto] = []  # the fake-quant chains read initializers only: they go first
    nodes: list[onnx.NodeProto] = []
    rebuilt: dict[str, tuple[str, str]] = {}  # packed B -> (float [N, K] weight, scales), for tied gathers
    for node in g.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        b = numpy_helper.to_array(inits[node.input[1]])
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(-1).astype(np.float32)
        blocks = b.shape[1]
        zp = np.full(n * blocks, 8, np.uint8)
        if len(node.input) > 3 and node.input[3]:
            zp = _unpack_zero_points(numpy_helper.to_array(inits[node.input[3]]), n, blocks).reshape(-1)
        codes = _unpack(b).reshape(n * blocks, block)
        w0 = ((codes.astype(np.float32) - zp[:, None]) * scale[:, None]).astype(np.float32)
        flipped = scale < 0
        zp = np.where(flipped, 15 - zp, zp).astype(np.uint8)
        name = node.name or node.output[0]
        w_name, z_name, s_name = fresh(name + "_weight_float"), fresh(name + "_zero_point"), fresh(name + "_scale")
        # the code bounds -z and 15 - z are integers (int8 initializers cast on the host): a float initializer
        # would be a trainable parameter of the module, and the clip would drift from what the export packs
        lo_c, hi_c, shape_c, nk = (fresh(name + suffix) for suffix in ("_lo", "_hi", "_col", "_nk"))
        g.initializer.extend([
            numpy_helper.from_array(w0, w_name), numpy_helper.from_array(zp, z_name),
            numpy_helper.from_array(np.abs(scale), s_name),
            numpy_helper.from_array((-zp.astype(np.int16))[:, None].astype(np.int8), lo_c),
            numpy_helper.from_array((15 - zp.astype(np.int16))[:, None].astype(np.int8), hi_c),
            numpy_helper.from_array(np.array([-1, 1], np.int64), shape_c),
            numpy_helper.from_array(np.array([n, blocks * block], np.int64), nk),
        ])  # fmt: skip
        steps = ("col", "lof", "hif", "lo", "hi", "max", "min", "q", "dq", "w", "wk", "wt")
        t = {key: fresh(f"{name}_{key}") for key in steps}
        weights += [
            helper.make_node("Reshape", [s_name, shape_c], [t["col"]]),
            helper.make_node("Cast", [lo_c], [t["lof"]], to=onnx.TensorProto.FLOAT),
            helper.make_node("Cast", [hi_c], [t["hif"]], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [t["col"], t["lof"]], [t["lo"]]),
            helper.make_node("Mul", [t["col"], t["hif"]], [t["hi"]]),
            helper.make_node("Max", [w_name, t["lo"]], [t["max"]]),
            helper.make_node("Min", [t["max"], t["hi"]], [t["min"]]),
            helper.make_node("QuantizeLinear", [t["min"], s_name, z_name], [t["q"]], axis=0),
            helper.make_node("DequantizeLinear", [t["q"], s_name, z_name], [t["dq"]], axis=0),
            helper.make_node("Reshape", [t["dq"], nk], [t["w"]]),
        ]
        weight = t["w"]
        if blocks * block != k:  # the last block is padded with zeros
            starts, ends, axes = (fresh(name + x) for x in ("_starts", "_ends", "_axes"))
            g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), starts),
                                  numpy_helper.from_array(np.array([k], np.int64), ends),
                                  numpy_helper.from_array(np.array([1], np.int64), axes)])  # fmt: skip
            weights.append(helper.make_node("Slice", [weight, starts, ends, axes], [t["wk"]]))
            weight = t["wk"]
        rebuilt[node.input[1]] = (weight, node.input[2])
        nodes.append(helper.make_node("Transpose", [weight], [t["wt"]], perm=[1, 0]))
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        out = fresh(name + "_matmul") if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], t["wt"]], [out], name=fresh(name)))
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]]))
        packed.append(_Packed(w_name, node.input[1], node.input[2], s_name, zp, flipped))
    gathers = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    if packed or gathers:
        producer = {o: n for n in nodes for o in n.output}
        nodes = [_tied_gather(n, rebuilt, producer) if n.op_type == "GatherBlockQuantized" else n for n in nodes]
        del g.node[:]
        g.node.extend(weights + nodes)
        read = {name for n in g.node for name in n.input} | {o.name for o in g.output}
        unused = [i for i in g.initializer if i.name not in read]  # the packed weights and scales replaced here
        for init in unused:
            g.initializer.remove(init)
    return packed


def _tied_gather(node: onnx.NodeProto, rebuilt: Mapping[str, tuple[str, str]],
                 producer: Mapping[str, onnx.NodeProto]) -> onnx.NodeProto:  # fmt: skip
    """A ``GatherBlockQuantized`` reading a 4-bit output layer's packed weight, as a Gather of its trained weight.

    ``onnxpress quantize`` ties a language model's token table to its 4-bit output layer so; gathering rows of
    that layer's float weight (behind its fake-quant) keeps the two one weight while it trains.

    Raises:
        UnsupportedModelError: a 4-bit table of its own (not tied to a MatMulNBits weight).
    """
    rows = producer.get(node.input[0])
    source = rows.input[0] if rows is not None and rows.op_type == "Reshape" else node.input[0]
    if source not in rebuilt or node.input[2] != rebuilt[source][1]:
        raise UnsupportedModelError(
            f"GatherBlockQuantized {node.name!r} has a 4-bit table of its own; QAT trains one tied to a 4-bit "
            "output layer: fine-tune the float model, then quantize"
        )
    return helper.make_node("Gather", [rebuilt[source][0], node.input[1]], list(node.output), name=node.name, axis=0)


def _private_bias_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every int32 bias's DequantizeLinear has a scale initializer of its own.

    QAT learns ``s_x · s_w`` per bias, so a bias scale that ``CompactQDQ`` shared with an equal constant
    (two layers with equal per-tensor scales) must come apart before the learned values are written.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers = collections.Counter(name for n in g.node for name in n.input)
    fresh = fresh_names(proto_names(g))
    for node in g.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2 or readers[node.input[1]] < 2:
            continue
        stored = _stored_integers(node.input[0], inits, producer)
        if stored is None or stored[1].dtype != np.int32 or node.input[1] not in inits:
            continue
        name = fresh(node.input[1])
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[1]]), name))
        inits[name] = g.initializer[-1]
        readers[node.input[1]] -= 1
        node.input[1] = name
    return out


def _stored_integers(
    name: str, inits: Mapping[str, onnx.TensorProto], producer: Mapping[str, onnx.NodeProto]
) -> tuple[str, np.ndarray] | None:
    """``(initializer, values as DequantizeLinear reads them)`` when ``name`` is stored integer data, else None.

    The data is an integer initializer, or one behind a ``Cast`` (``CompactQDQ`` stores an int32 bias that
    fits as int16 + ``Cast``); the returned values have the Cast's type.
    """
    if name in inits:
        values = numpy_helper.to_array(inits[name])
        return (name, values) if np.issubdtype(values.dtype, np.integer) else None
    cast = producer.get(name)
    if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits:
        return None
    values = numpy_helper.to_array(inits[cast.input[0]])
    to = helper.tensor_dtype_to_np_dtype(next(a.i for a in cast.attribute if a.name == "to"))
    if not (np.issubdtype(values.dtype, np.integer) and np.issubdtype(to, np.integer)):
        return None
    return cast.input[0], values.astype(to)


def _constant_scale(
    name: str, inits: Mapping[str, onnx.TensorProto], producer: Mapping[str, onnx.NodeProto]
) -> np.ndarray:
    """A scale's value: an initializer, or ``Mul`` of two (``CompactQDQ``'s bias scale ``s_x · s_w``)."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    mul = producer.get(name)
    if mul is not None and mul.op_type == "Mul" and all(i in inits for i in mul.input):
        a, b = (numpy_helper.to_array(inits[i]).astype(np.float32) for i in mul.input)
        return a * b
    raise UnsupportedModelError(
        f"the scale {name!r} of a quantized weight is computed in the graph; QAT needs it constant"
    )


def _dequant(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    s, z = scale.astype(np.float32), zp.astype(np.int64)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)
