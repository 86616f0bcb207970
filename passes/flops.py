"""MACs and parameter accounting for Conv, ConvTranspose, Gemm, MatMul and the recurrent ops.

Multiply-accumulates per node, from shapes that onnx shape inference gives once the graph inputs'
symbolic batch dimension is set to ``batch`` (1 by default, so the count is per sample)::

    Conv           Y[N, O, *out]       MACs = N * O * prod(out) * (C / group) * prod(kernel)
    ConvTranspose  X[N, C, *in]        MACs = N * C * prod(in) * (O / group) * prod(kernel)
    Gemm           A[M, K] B[K, N]     MACs = M * N * K
    MatMul         A[..., M, K] B[..., K, N] -> Y[..., M, N]    MACs = prod(Y) * K
    LSTM/GRU/RNN   X[T, B, I], D directions, hidden H             MACs = T * B * D * G * H * (I + H)

where ``G`` is the number of gates (LSTM 4, GRU 3, RNN 1; onnxruntime's ``DynamicQuantizeLSTM`` counts as
the LSTM it replaces, so quantizing does not read as fewer MACs). The element-wise gate arithmetic is not
counted, as a Conv's bias and activation are not.

Parameters are the elements of floating-point initializers, each counted once and attributed to the
first node (in graph order) that reads it, so ``sum(count_params(m).values())`` is the model's
parameter count. Integer constants (shapes, axes) are not parameters.

Nodes are named ``node.name`` or, when empty, by their first output.

Other symbolic input dimensions (a transformer's sequence length, an image size left dynamic) have no
per-sample value: they take the sizes given as ``dims`` (keyed by the dimension's name, or
``"<input>:<axis>"`` for an unnamed one), or those set for the current call of an entry point
(:func:`assume_input_dims`, which ``lowrank``, ``prune`` and ``optimize`` fill from ``dims=`` and their
calibration data); a MAC count that still depends on one is refused with both ways to give it.
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxpress.errors import UnsupportedModelError
from onnxpress.model_io import model_bytes, shape_only_copy, symbolic_shape_inference

__all__ = [
    "MAC_OPS",
    "assume_input_dims",
    "assumed_input_dims",
    "count_macs",
    "count_params",
    "model_size_bytes",
    "node_key",
    "scoped_input_dims",
    "shapes_at",
    "symbolic_input_dims",
    "unique_keys",
]

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Op types whose multiply-accumulates are counted (and which the passes split or prune)."""

# recurrent ops, counted but not layers any pass splits or prunes: (domain, op) -> gates per step
_RECURRENT_GATES = {("", "LSTM"): 4, ("", "GRU"): 3, ("", "RNN"): 1, ("com.microsoft", "DynamicQuantizeLSTM"): 4}

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def node_key(node: onnx.NodeProto) -> str:
    """The name a node is reported under: its name, or its first output when unnamed."""
    return node.name or (node.output[0] if node.output else node.op_type)


def _as_model(model: onnx.ModelProto | gs.Graph) -> onnx.ModelProto:
    if isinstance(model, gs.Graph):
        try:
            return gs.export_onnx(model.copy(), do_type_check=False)
        except Exception as exc:  # graphsurgeon fails on optional/sequence-typed values
            raise UnsupportedModelError(
                f"cannot count MACs: onnx-graphsurgeon cannot export this graph ({type(exc).__name__}: {exc})"
            ) from None
    if isinstance(model, onnx.ModelProto):
        return model
    raise TypeError(f"expected an onnx.ModelProto or onnx_graphsurgeon.Graph, got {type(model).__name__}")


def unique_keys(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """Each node's :func:`node_key`, repeats made unique with ``#k`` (the keys ``layer_keys`` gives a graph)."""
    seen: dict[str, int] = {}
    keys = []
    for node in nodes:
        key = node_key(node)
        if key in seen:
            seen[key] += 1
            key = f"{key}#{seen[key]}"
        else:
            seen[key] = 0
        keys.append(key)
    return keys


_DIMS: contextvars.ContextVar[Mapping[str, int]] = contextvars.ContextVar(
    "onnxpress_input_dims", default=types.MappingProxyType({})
)
_F = TypeVar("_F", bound=Callable)


def assume_input_dims(dims: Mapping[str, int] | None) -> None:
    """Set the sizes :func:`count_macs` gives symbolic input dimensions, until the enclosing call ends.

    The enclosing call is the innermost :func:`scoped_input_dims` function (outside one, until reset).
    """
    _DIMS.set(types.MappingProxyType({str(k): int(v) for k, v in (dims or {}).items()}))


def assumed_input_dims() -> dict[str, int]:
    """The sizes :func:`assume_input_dims` set for the current call (``{}`` when none)."""
    return dict(_DIMS.get())


def scoped_input_dims(fn: _F) -> _F:
    """Run ``fn`` in a copy of the current context: the sizes it sets with :func:`assume_input_dims` end with it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return contextvars.copy_context().run(fn, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def symbolic_input_dims(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """``{key: (input, axis)}`` of the graph inputs' dimensions without a static size, the batch axis left out.

    The batch axis is axis 0, or axis 1 of a sequence-first input (``[seq, batch, d]``:
    :func:`onnxpress.calibration.readers.sample_axes`), whose ``seq`` is then listed. The key is the
    dimension's name (``dim_param``), or ``"<input>:<axis>"`` when it has none; a name shared by several inputs
    is listed once (its first place).
    """
    from onnxpress.calibration.readers import sample_axes  # the readers' notion of the batch axis

    inits = {i.name for i in model.graph.initializer}
    samples = sample_axes(model)
    out: dict[str, tuple[str, int]] = {}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if axis != samples.get(vi.name, 0) and not d.HasField("dim_value"):
                out.setdefault(d.dim_param or f"{vi.name}:{axis}", (vi.name, axis))
    return out


def shapes_at(model: onnx.ModelProto, batch: int = 1, dims: Mapping[str, int] | None = None, *,
              need: Iterable[str] = ()) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's shape (``None`` for an unknown dim) at batch ``batch``, from onnx's shape inference.

    The inputs' symbolic batch dimension (axis 0, or 1 of a sequence-first input) takes ``batch``, the others
    ``dims`` (``None``: those of :func:`assume_input_dims`). Where a tensor named in ``need`` is left incomplete,
    onnxruntime's symbolic inference fills in what it knows, as :func:`count_macs` does (a legacy export of
    ``scaled_dot_product_attention`` loses onnx's shapes after its Reshape).

    Raises:
        UnsupportedModelError: onnx's shape inference fails.
    """
    sized = _sized_copy(model, batch, _DIMS.get() if dims is None else dims)
    shapes = _onnx_shapes(sized)
    if not all(_known(shapes.get(name)) for name in need):
        _add_symbolic_shapes(shapes, sized)
    return shapes


def _sized_copy(model: onnx.ModelProto, batch: int, sizes: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference (a large model without its weights).

    Its symbolic input dims take ``batch`` and ``sizes``, its value_info is dropped, and quantized LSTMs read
    as LSTMs.
    """
    from onnxpress.calibration.readers import sample_axes

    samples = sample_axes(model)
    model = _standard_recurrent(shape_only_copy(model))
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            size = batch if axis == samples.get(vi.name, 0) else sizes.get(d.dim_param or f"{vi.name}:{axis}")
            if size is not None:
                d.Clear()
                d.dim_value = size
    del model.graph.value_info[:]
    return model


def _onnx_shapes(sized: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shapes onnx's inference gives ``sized`` (a :func:`_sized_copy`), initializers' included."""
    try:
        inferred = onnx.shape_inference.infer_shapes(sized, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot count MACs: shape inference fails ({exc})") from None
    shapes: dict[str, tuple[int | None, ...]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _add_symbolic_shapes(shapes: dict[str, tuple[int | None, ...]], sized: onnx.ModelProto) -> None:
    """Take onnxruntime's symbolic inference's shape where it knows more dims than onnx's.

    A dynamo export that reshapes to a ``Shape`` * ``Shape`` product loses onnx's shapes there, data
    propagation or not.
    """
    for name, shape in _symbolic_shapes(sized).items():
        known = shapes.get(name)
        if known is None or sum(d is not None for d in shape) > sum(d is not None for d in known):
            shapes[name] = shape


def _standard_recurrent(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a private copy) with each ``DynamicQuantizeLSTM`` as the ``LSTM`` it was, for shape inference only.

    Neither onnx nor onnxruntime's symbolic inference knows the contrib op, and every shape after it (the
    classifier's) was lost. An LSTM's output shapes follow from ``X`` and its attributes; its W and R
    here are a placeholder (the int8 ones are transposed and of another type).
    """
    quantized = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM" and n.domain == "com.microsoft"]
    if not quantized:
        return model
    placeholder = "__onnxpress_shape_placeholder"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), placeholder))
    for node in quantized:
        inputs = list(node.input[:8])
        inputs[1] = inputs[2] = placeholder
        while inputs and not inputs[-1]:
            inputs.pop()
        node.op_type, node.domain = "LSTM", ""
        del node.input[:]
        node.input.extend(inputs)
    return model


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shapes from onnxruntime's symbolic inference, complete or not; empty where it fails."""
    inferred, _ = symbolic_shape_inference(model)
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output] if inferred is not None else []:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return out


def _known(shape: tuple[int | None, ...] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def count_macs(model: onnx.ModelProto | gs.Graph, *, batch: int = 1,
               dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """Multiply-accumulates of every Conv / ConvTranspose / Gemm / MatMul / recurrent node (module docstring).

    Args:
        model: a ModelProto or an onnx-graphsurgeon Graph (neither is modified).
        batch: value given to a symbolic leading dimension of the graph inputs.
        dims: sizes of the other symbolic input dimensions (:func:`symbolic_input_dims` keys); ``None``:
            those of :func:`assume_input_dims`, if any.

    Returns:
        node key (:func:`node_key`, made unique with ``#k``) -> MACs, in graph order.

    Raises:
        UnsupportedModelError: a counted node's shapes cannot be inferred (names the node).
    """
    proto = _as_model(model)
    sizes = _DIMS.get() if dims is None else dims
    sized = _sized_copy(proto, batch, sizes)
    shapes, thorough = _onnx_shapes(sized), False
    out: dict[str, int] = {}
    for key, node in zip(unique_keys(proto.graph.node), proto.graph.node, strict=True):
        gates = _RECURRENT_GATES.get((node.domain or "", node.op_type))
        if gates is None and (node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx")):
            continue
        names = [node.input[0], node.input[1]] + ([] if gates else [node.output[0]])  # a recurrent op: Y_h alone
        needed = [shapes.get(n) for n in names]
        if not all(_known(s) for s in needed) and not thorough:  # the slower second opinion, once, when needed
            _add_symbolic_shapes(shapes, sized)
            thorough = True
            needed = [shapes.get(n) for n in names]
        if not all(_known(s) for s in needed):
            open_dims = [f"{k} ({i} axis {a})" for k, (i, a) in symbolic_input_dims(proto).items() if k not in sizes]
            if open_dims:
                raise UnsupportedModelError(
                    f"cannot count MACs of {node.op_type} {key!r}: its shapes depend on the inputs' symbolic "
                    f"dimension(s) {', '.join(open_dims)}; give their sizes (--dim NAME=SIZE, dims={{NAME: SIZE}}) "
                    "or calibration data, whose first sample sets them"
                )
            foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
            if foreign:  # the usual cause: a model saved after onnxruntime's graph optimisations (FusedConv)
                raise UnsupportedModelError(
                    f"cannot count MACs of {node.op_type} {key!r}: shape inference stops at the model's "
                    f"{', '.join(foreign[:3])} node(s), which are not ONNX ops; give the model as exported (before "
                    "onnxruntime's graph optimisations fused its layers)"
                )
            raise UnsupportedModelError(
                f"cannot count MACs of {node.op_type} {key!r}: its shapes are unknown after shape inference; "
                "give the model static shapes apart from the batch"
            )
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if gates:
            x, w = needed
            steps_batch = x[0] * x[1]  # [T, B, I], or [B, T, I] with layout=1
            hidden = int(attrs["hidden_size"])
            out[key] = steps_batch * w[0] * gates * hidden * (x[2] + hidden)
            continue
        x, w, y = needed
        if node.op_type == "Conv":
            group = int(attrs.get("group", 1))
            out[key] = int(np.prod(y, dtype=np.int64)) * (x[1] // group) * int(np.prod(w[2:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":
            # W is [C, O/group, k...]: each input element meets O/group * prod(k) weights
            out[key] = int(np.prod(x, dtype=np.int64)) * w[1] * int(np.prod(w[2:], dtype=np.int64))
        elif node.op_type == "Gemm":
            k = x[0] if int(attrs.get("transA", 0)) else x[1]
            out[key] = int(np.prod(y, dtype=np.int64)) * k
        else:
            out[key] = int(np.prod(y, dtype=np.int64)) * x[-1]
    return out


def count_params(model: onnx.ModelProto | gs.Graph) -> dict[str, int]:
    """Floating-point parameters per node: each initializer counted once, at its first reader.

    Initializers that no node reads are reported under their own name.

    Args:
        model: a ModelProto or an onnx-graphsurgeon Graph (neither is modified).
    """
    proto = _as_model(model)
    sizes = {
        init.name: int(np.prod(init.dims, dtype=np.int64))
        for init in proto.graph.initializer
        if init.data_type in _FLOAT_TYPES
    }
    out: dict[str, int] = {}
    claimed: set[str] = set()
    for key, node in zip(unique_keys(proto.graph.node), proto.graph.node, strict=True):
        total = 0
        for name in node.input:
            if name in sizes and name not in claimed:
                claimed.add(name)
                total += sizes[name]
        if total:
            out[key] = total
    for name, size in sizes.items():
        if name not in claimed:
            out[name] = size
    return out


def model_size_bytes(model: onnx.ModelProto | gs.Graph) -> int:
    """Serialised size of the model in bytes (initializers included)."""
    return model_bytes(_as_model(model))
