"""float16 exports computed in float32 inside, with their float16 inputs and outputs kept.

A model exported in half precision (``model.half()`` before ``torch.onnx.export``, or an fp16
conversion tool) has nothing for the int8 passes to take: onnxruntime's CPU integer kernels sit
between float32 QuantizeLinear/DequantizeLinear pairs, and its CPU provider runs most float16 ops
through inserted Casts anyway. :func:`upcast_float16` rewrites such a model to compute in float32
while its interface stays what the user's application feeds and reads::

    X[float16] -> Cast(to=float) -> X__f32 -> ... the graph, every float16 tensor now float32 ...
               -> Y__f32 -> Cast(to=float16) -> Y[float16]

What changes inside (recursively in If/Loop/Scan bodies and local functions):
- float16 initializers, ``Constant`` values and tensor attributes (``ConstantOfShape``'s value)
  become float32 (exact: every float16 is a float32);
- ``Cast``/``RandomNormal``-style ``to``/``dtype`` attributes that name float16 name float32;
- value_info, graph inputs and outputs of float16 type are float32 (the boundary Casts aside).

Computing in float32 can only gain precision and range over float16 (a float16 overflow to ``inf``
stays finite), so the float32 model is as close to the float16 one as float16 rounding allows.

Written on the protobuf, not with onnx-graphsurgeon: the rename of a boundary tensor must reach
nodes inside subgraphs that read it from the outer scope by name, and every typed field
(value_info, attributes, functions) must change together; onnx has no float16 -> float32 converter
(onnxconverter-common converts the other way).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxpress.model_io import names_read, subgraphs
from onnxpress.passes.base import fresh_names, proto_names

__all__ = ["HalfPrecision", "half_precision_layers", "store_float16", "upcast_float16"]

_F16, _F32 = TensorProto.FLOAT16, TensorProto.FLOAT
_DTYPE_ATTRS = {"to", "dtype"}  # Cast(to), RandomNormal/RandomUniform/EyeLike/...(dtype)
_SUFFIX = "__f32"


@dataclasses.dataclass(frozen=True)
class HalfPrecision:
    """What :func:`upcast_float16` changed.

    Attributes:
        inputs: graph inputs that stay float16 and get a ``Cast`` to float32.
        outputs: graph outputs that stay float16, cast back from float32.
        tensors: float16 initializers and constant tensors made float32.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tensors: int


def half_precision_layers(model: onnx.ModelProto) -> dict[int, int]:
    """``{elem type: count}`` of the Conv/ConvTranspose/Gemm/MatMul/Einsum weight initializers of the main graph."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    out: dict[int, int] = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits:
            out[inits[n.input[1]]] = out.get(inits[n.input[1]], 0) + 1
        elif n.op_type == "Einsum" and (weight := next((i for i in n.input if i in inits), None)) is not None:
            out[inits[weight]] = out.get(inits[weight], 0) + 1  # a projection written as einsum (passes/einsum.py)
    return out


def upcast_float16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, HalfPrecision]:
    """A copy of ``model`` that computes in float32 where it computed in float16 (module docstring).

    The input model is not modified. Its float16 graph inputs and outputs keep their names and type.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    counter = [0]
    fresh = fresh_names(proto_names(g))
    rename: dict[str, str] = {}
    casts_in = []
    initializers = {i.name for i in g.initializer}
    for vi in g.input:
        if vi.type.tensor_type.elem_type == _F16 and vi.name not in initializers:
            inner = fresh(vi.name + _SUFFIX)
            rename[vi.name] = inner
            casts_in.append(helper.make_node("Cast", [vi.name], [inner], to=_F32, name=fresh("cast_in")))
    in_names = {vi.name for vi in g.input}
    half_out = [vo.type.tensor_type.elem_type == _F16 for vo in g.output]
    casts_out, outputs = [], []
    for vo in g.output:
        if vo.type.tensor_type.elem_type != _F16 or vo.name in in_names:  # a passed-through input stays float16
            continue
        inner = fresh(vo.name + _SUFFIX)
        outputs.append((vo.name, inner))
        casts_out.append(helper.make_node("Cast", [inner], [vo.name], to=_F16, name=fresh("cast_out")))
    # the producer of an output (node, initializer) now writes inner; every reader of it reads inner
    produced = {name: inner for name, inner in outputs}
    _rename_graph(g, {**rename, **produced}, produced, top=True)
    _upcast_graph(g, counter)
    for f in out.functions:
        for node in f.node:
            _upcast_node(node, counter)
    for vi in g.input:
        if vi.name in rename:
            vi.type.tensor_type.elem_type = _F16  # the interface stays float16 (upcast above made it float)
    for vo, was in zip(g.output, half_out, strict=True):
        if was:  # produced here (cast back above) or a float16 input passed through
            vo.type.tensor_type.elem_type = _F16
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    info = HalfPrecision(tuple(rename), tuple(name for name, _ in outputs), counter[0])
    return out, info


def _rename_graph(g: onnx.GraphProto, readers: dict[str, str], producers: dict[str, str], *, top: bool) -> None:
    """Readers of ``readers``' keys read the new names; at the top level, producers of ``producers``' keys write them.

    Subgraphs see outer-scope names unless they declare their own (inputs, initializers, node outputs).
    """
    if not top:
        own = {v.name for v in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
        readers = {k: v for k, v in readers.items() if k not in own}
        if not readers:
            return
    for node in g.node:
        node.input[:] = [readers.get(name, name) if name else name for name in node.input]
        if top:
            node.output[:] = [producers.get(name, name) for name in node.output]
        for attr in node.attribute:
            for sub in subgraphs(attr):
                _rename_graph(sub, readers, {}, top=False)
    if top:
        for init in g.initializer:
            init.name = producers.get(init.name, init.name)
        for vi in g.value_info:
            vi.name = producers.get(vi.name, readers.get(vi.name, vi.name))


def _upcast_graph(g: onnx.GraphProto, counter: list[int]) -> None:
    for i, init in enumerate(g.initializer):
        if init.data_type == _F16:
            g.initializer[i].CopyFrom(_upcast_tensor(init))
            counter[0] += 1
    for vi in [*g.input, *g.output, *g.value_info]:
        _upcast_type(vi.type)
    for node in g.node:
        _upcast_node(node, counter)


def _upcast_node(node: onnx.NodeProto, counter: list[int]) -> None:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _F16:
            attr.t.CopyFrom(_upcast_tensor(attr.t))
            counter[0] += 1
        elif attr.type == onnx.AttributeProto.INT and attr.name in _DTYPE_ATTRS and attr.i == _F16:
            attr.i = _F32
        elif attr.type == onnx.AttributeProto.TYPE_PROTO:
            _upcast_type(attr.tp)
        for sub in subgraphs(attr):
            _upcast_graph(sub, counter)


def _upcast_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    values = numpy_helper.to_array(t).astype(np.float32)
    return numpy_helper.from_array(values, t.name)


def _upcast_type(t: onnx.TypeProto) -> None:
    which = t.WhichOneof("value")
    if which == "tensor_type":
        if t.tensor_type.elem_type == _F16:
            t.tensor_type.elem_type = _F32
    elif which == "sparse_tensor_type":
        if t.sparse_tensor_type.elem_type == _F16:
            t.sparse_tensor_type.elem_type = _F32
    elif which == "sequence_type":
        _upcast_type(t.sequence_type.elem_type)
    elif which == "optional_type":
        _upcast_type(t.optional_type.elem_type)
    elif which == "map_type":
        _upcast_type(t.map_type.value_type)


_KEEP_TYPED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}  # scales stay float32 initializers


def store_float16(model: onnx.ModelProto, *, min_elements: int = 64) -> int:
    """Store float32 initializers whose values are all exact in float16 as float16, behind a ``Cast``.

    After :func:`upcast_float16` the layers a pass left float hold float16 values in float32 (twice the
    bytes of the export they came from); this gives the bytes back without changing a value.
    onnxruntime folds the ``Cast`` of a constant when it builds the session, so the layers run as before.
    Left alone: initializers below ``min_elements``, those read by a Q/DQ node (their scales) or by an op
    outside the standard domain (``MatMulNBits``), inside a subgraph or as a graph input/output, and any
    value that float16 would round. Modifies ``model`` in
    place and returns how many initializers it stores as float16.
    """
    g = model.graph
    boundary = {v.name for v in g.input} | {v.name for v in g.output}
    typed, nested = set(), set()
    for node in g.node:
        if node.op_type in _KEEP_TYPED or node.domain not in ("", "ai.onnx"):  # MatMulNBits reads its own scales
            typed.update(node.input)
        for attr in node.attribute:
            for sub in subgraphs(attr):
                nested.update(names_read(sub))
    fresh = fresh_names(proto_names(g))
    casts, stored = [], 0
    for init in g.initializer:
        if (init.data_type != _F32 or init.name in boundary or init.name in typed or init.name in nested
                or int(np.prod(init.dims)) < min_elements or init.data_location == TensorProto.EXTERNAL):
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values, equal_nan=True):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, fresh(name + "__f16")))
        casts.append(helper.make_node("Cast", [init.name], [name], to=_F32, name=fresh(name + "__cast")))
        stored += 1
    if casts:
        nodes = casts + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    return stored

