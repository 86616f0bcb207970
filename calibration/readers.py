"""Sample-data readers: four kinds of source behind one streaming interface.

A *feed* maps every model input name to an array whose sample axis counts samples: axis 0, or the axis
:func:`sample_axes` finds for a sequence-first input (``[seq, batch, d]``: axis 1). Each source is read
lazily and every feed is validated against the model's inputs (graph inputs minus initializers)
before anyone sees it::

    source                              held in memory at once
    ----------------------------------  ------------------------------------------------
    data.npz  {name: array[N, ...]}     one batch: arrays are streamed out of the archive
    folder/*.npz, one feed per file     one file plus one batch being assembled
    iterable of {name: array} dicts     one feed plus one batch being assembled
    onnxruntime CalibrationDataReader   the same, through ``get_next()`` until ``None``

Batching concatenates consecutive feeds along the sample axis (axis 0 below),

    batch = concat_0(feed_i, ..., feed_j)   with   n_i + ... + n_j <= batch_size,

while every input's shape beyond the sample axis stays the same and the sample axis of every input is
dynamic (a symbolic or unknown dimension). Batches are filled to exactly ``batch_size``, slicing a feed
across two batches where needed; a shape change closes the batch early. An input whose sample axis is
static (say 1) makes feeds go out as stored (and an ``.npz`` is sliced into pieces of exactly that
size). ``batch_size=None`` yields feeds as stored (an ``.npz`` as one feed).

Checks, each a :class:`DataError` naming the input and what the model expects: missing names,
rank, static dimensions, dtype, NaN or inf (calibrate and quantize take +-inf: attention masks;
:func:`infinite_values_allowed`), and no samples at all. Dtypes must match exactly, with one
exception chosen on purpose: an integer array is widened to a wider integer type the model expects
when the cast is lossless (``int32`` token ids into an ``int64`` input). Floats are never cast
(``float64`` into a ``float32`` input is an error that says how to convert), because a silent
down-cast would hide a preprocessing mismatch.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import copy
import dataclasses
import functools
import logging
import numbers
import os
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import onnx

from onnxpress.errors import ArgumentError, DataError, UnsupportedModelError

__all__ = [
    "DataReader",
    "DataSource",
    "InputSpec",
    "check_feed",
    "check_given_axes",
    "first_batch",
    "load_labels",
    "model_inputs",
    "npz_files",
    "open_data",
    "output_sample_axes",
    "sample_axes",
    "sample_axis_hint",
    "samples_on",
    "samples_in",
    "symbolic_sizes",
]

log = logging.getLogger(__name__)

Dim = int | str | None
"""A dimension of a model input: a static size, a symbolic name, or unknown (``None``)."""

DataSource = Union[str, "os.PathLike[str]", Iterable[Mapping[str, Any]], Any]
"""What :func:`open_data` accepts (see its docstring)."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input as the data must match it.

    Attributes:
        name: the graph input name.
        dtype: numpy dtype of the tensor element type.
        shape: per-axis static size (int), symbolic name (str) or unknown (None); ``None`` when
            even the rank is unknown.
        sample_axis: the axis that holds the samples, or ``None`` for an input without one (one feed is one
            sample, never stacked with another or cut: :func:`sample_axes`).
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    sample_axis: int | None = 0

    @property
    def dynamic_samples(self) -> bool:
        """Whether the sample axis can take any size (so feeds may be stacked or sliced along it)."""
        if self.sample_axis is None:
            return False
        return self.shape is None or (len(self.shape) > self.sample_axis
                                      and not isinstance(self.shape[self.sample_axis], int))

    @property
    def fixed_samples(self) -> int | None:
        """The static size of the sample axis, or ``None`` when it is dynamic, absent, or the input is a scalar."""
        if self.shape is None or self.sample_axis is None or len(self.shape) <= self.sample_axis:
            return None
        dim = self.shape[self.sample_axis]
        return dim if isinstance(dim, int) else None

    def describe(self) -> str:
        """``input: float32[batch,1,32,32]``."""
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def model_inputs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The inputs a feed must provide: graph inputs that are not initializers, with their sample axes.

    Raises:
        UnsupportedModelError: an input is not a tensor (sequence, map, optional) or has an
            element type numpy cannot hold.
    """
    inits = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise UnsupportedModelError(
                f"model input {value.name!r} is a {kind}, not a tensor; only tensor inputs are supported"
            )
        ttype = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            raise UnsupportedModelError(
                f"model input {value.name!r} has element type {ttype.elem_type}, which numpy cannot hold"
            ) from None
        shape: tuple[Dim, ...] | None = None
        if ttype.HasField("shape"):
            dims: list[Dim] = []
            for d in ttype.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            shape = tuple(dims)
        specs.append(InputSpec(value.name, dtype, shape))
    axes = sample_axes(model)
    return tuple(dataclasses.replace(s, sample_axis=axes[s.name]) if s.name in axes else s for s in specs)


# Sample axes. Hand-written because no library says where a graph's batch axis is: onnxruntime's own quantizer
# assumes axis 0 and joins sequences end to end on a sequence-first model.
_RNNS = frozenset({"RNN", "GRU", "LSTM"})
_CONTRIB_RNNS = frozenset({"DynamicQuantizeLSTM"})  # onnxruntime's int8 LSTM (quantize's): LSTM's inputs, seq-first
_PASS_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})  # a QDQ model's activations: axes kept
_SAME_AXES = frozenset({
    "Identity", "Cast", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Tanh", "Sigmoid", "HardSigmoid",
    "HardSwish", "Softplus", "Softsign", "Gelu", "Erf", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Clip", "Dropout", "Mish", "LayerNormalization",
})  # fmt: skip  (output axis k is input 0's axis k)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})


_GIVEN_AXES: contextvars.ContextVar[Mapping[str, int] | None] = contextvars.ContextVar("onnxpress_sample_axes",
                                                                                      default=None)


@contextlib.contextmanager
def samples_on(axes: Mapping[str, int | None]) -> Iterator[None]:
    """Within this block, the named model inputs hold their samples on the given axes, whatever is detected.

    For a sequence-first model that :func:`sample_axes` cannot tell (no RNN, dimensions not named like a batch):
    ``with onnxpress.samples_on({"x": 1}): onnxpress.quantize(...)``; the CLI's ``--sample-axis x=1``. An axis
    of 0 turns a detection off. ``None`` says the input has no sample axis (``--sample-axis x=none``): a model
    exported for one sample, ``x[3, 224, 224]``; each feed is then one sample, and an ``.npz`` stacks them on a
    new axis 0.

    Raises:
        ArgumentError: a name that is not a string, or an axis that is neither ``None`` nor an integer >= 0.
    """
    checked: dict[str, int | None] = {}
    for name, axis in dict(axes).items():
        if axis is None and isinstance(name, str):
            checked[name] = None
            continue
        if not isinstance(name, str) or isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or axis < 0:
            raise ArgumentError(f"sample axes map input names to axes >= 0 or None (--sample-axis x=1, x=none), got "
                                f"{name!r}: {axis!r}")
        checked[name] = int(axis)
    token = _GIVEN_AXES.set(checked)
    try:
        yield
    finally:
        _GIVEN_AXES.reset(token)


def _batch_like(dim: Dim) -> bool:
    """A symbolic dimension whose name reads as a batch: ``batch``, ``batch_size``, ``N``, ``B``, ``bs``."""
    return isinstance(dim, str) and ("batch" in dim.lower() or dim.lower() in ("n", "b", "bs"))


def sample_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """``{graph input: axis}`` for every input whose samples are not on axis 0.

    Sequence-first inputs get their axis, inputs without a sample axis ``None``. Three rules, the first that speaks
    wins:

    1. Structure. An ``RNN``/``GRU``/``LSTM`` node with ``layout=0`` (the default, torch's ``batch_first=False``)
       holds the batch on axis 1 of ``X`` and of its initial states. That axis is traced back to a graph input
       through ops that keep axes in place (activations, elementwise ops with a constant operand, ``x @ W``, an
       embedding lookup ``Gather(table, ids)``, a ``Slice`` of other axes: torch slices a stacked ``h0`` per
       layer) and through ``Transpose``, which moves it: torch's ``batch_first=True`` export transposes a
       ``[B, S, D]`` input into the node, so that input keeps axis 0. A trace that meets any other op concludes
       nothing. Another input that names the found dimension the same (``h0[layers, n, h]`` beside
       ``x[seq, n, d]``) takes the axis where it has that name.
    2. Names. A symbolic dimension named like a batch (``batch``, ``batch_size``, ``N``, ``B``, ``bs``) on an
       axis other than 0, where axis 0 is symbolic too and not named so: ``[seq, batch, d]``. A fixed axis 0
       (a point cloud ``[1, N, 3]``) keeps it: the fixed axis is the batch there.

    3. No sample axis (``None``): a scalar input (rank 0), and an input of rank 1 whose dimension is not a batch --
       not named like one, and neither the symbol nor the fixed size of a higher-rank input's sample axis. A
       scalar's ``.npz`` array is one 0-d value for every feed or ``[N]`` values, one a feed. A waveform ``x[T]`` or the
       token ids ``ids[S]`` of a model exported for one sample: each feed is one sample, never joined to the next
       or cut (they were cut into runs of 64 values and counted as that many samples). A rank-1 input beside a
       batched one that shares its dimension (``lengths[batch]`` beside ``x[batch, T]``) keeps axis 0.

    :func:`samples_on` (``--sample-axis``) overrides them. Everything else keeps axis 0. Readers stack, cut and
    count samples along this axis, so a sequence is never joined to the next one or cut in time.
    """
    g = model.graph
    ranks = {init.name: len(init.dims) for init in g.initializer}
    values = {init.name: init for init in g.initializer if len(init.dims) <= 1}  # Slice starts/axes, read lazily
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            ranks[node.output[0]] = len(value.dims) if value is not None else 0
            if value is not None and len(value.dims) <= 1:
                values[node.output[0]] = value
        elif node.op_type == "DequantizeLinear" and node.input and node.input[0] in ranks:  # a QDQ weight
            ranks[node.output[0]] = ranks[node.input[0]]
    inputs = {vi.name: vi for vi in g.input if vi.name not in ranks}
    producer = {o: node for node in g.node for o in node.output if o}
    found: dict[str, int] = {}
    for node in g.node:
        standard = node.op_type in _RNNS and node.domain in ("", "ai.onnx")
        if not standard and not (node.op_type in _CONTRIB_RNNS and node.domain == "com.microsoft"):
            continue
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        for index in (0, 5) if node.op_type in ("RNN", "GRU") else (0, 5, 6):
            if index < len(node.input) and node.input[index]:
                hit = _trace_axis(node.input[index], 0 if layout else 1, producer, ranks, values, inputs)
                if hit is not None:
                    found.setdefault(*hit)
    dims = {name: [d.dim_param or d.dim_value or None for d in vi.type.tensor_type.shape.dim]
            for name, vi in inputs.items() if vi.type.tensor_type.HasField("shape")}
    shared = {dims[name][axis] for name, axis in found.items()
              if name in dims and axis < len(dims[name]) and isinstance(dims[name][axis], str)}
    for name, shape in dims.items():
        if name in found:
            continue
        same = [k for k, d in enumerate(shape) if d in shared]
        named = [k for k, d in enumerate(shape) if _batch_like(d)]
        if len(same) == 1:
            found[name] = same[0]
        elif len(shape) >= 2 and isinstance(shape[0], str) and not _batch_like(shape[0]) and len(named) == 1:
            found[name] = named[0]
    batches = {shape[found.get(name, 0)] for name, shape in dims.items() if len(shape) >= 2}
    for name, shape in dims.items():  # rule 3 (a scalar input has no axis at all)
        if name not in found and (not shape or (len(shape) == 1 and shape[0] is not None
                                                and not _batch_like(shape[0]) and shape[0] not in batches)):
            found[name] = None
    given = _GIVEN_AXES.get()
    if given:
        check_given_axes(model, given)
        found.update(given)
    return {name: axis for name, axis in found.items() if axis != 0}


def check_given_axes(model: onnx.ModelProto, given: Mapping[str, int | None] | None = None) -> None:
    """Refuse sample axes for inputs the model does not take, or past an input's rank.

    ``given`` defaults to the axes of :func:`samples_on`.

    :func:`sample_axes` checks them where data is read; the CLI calls this before a command runs, so that a
    misspelt ``--sample-axis`` is refused by commands that read no data as well (cleanup, dynamic quantize).

    Raises:
        ArgumentError: an unknown input name, or an axis >= the input's rank.
    """
    given = _GIVEN_AXES.get() if given is None else given
    if not given:
        return
    g = model.graph
    weights = {init.name for init in g.initializer}
    inputs = {vi.name: vi for vi in g.input if vi.name not in weights}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise ArgumentError(f"sample axis given for {unknown}, which the model does not take as inputs; its "
                            f"inputs: {sorted(inputs)}")
    for name, axis in given.items():
        tt = inputs[name].type.tensor_type
        if axis is not None and tt.HasField("shape") and axis >= max(len(tt.shape.dim), 1):
            raise ArgumentError(f"sample axis {axis} of input {name!r}: it has rank {len(tt.shape.dim)}")


def sample_axis_hint(model: onnx.ModelProto) -> str:
    """What to add to an onnxruntime failure on a batch, where a sequence-first input may have gone undetected.

    An input of rank >= 3 whose first two dimensions are both dynamic, the first not named like a batch, and no
    sample axis found or given: batches joined on axis 0 may be sequences joined in time, and a traced export's
    fixed Reshapes then fail deep inside.
    """
    if sample_axes(model):
        return ""
    for spec in model_inputs(model):
        if (spec.shape is not None and len(spec.shape) >= 3 and not any(isinstance(d, int) for d in spec.shape[:2])
                and not _batch_like(spec.shape[0])):
            return (f"; if {spec.name!r} holds its samples on axis 1 (sequence-first, [seq, batch, ...]), say so: "
                    f"--sample-axis {spec.name}=1 (onnxpress.samples_on({{{spec.name!r}: 1}}) in Python)")
    return ""


def output_sample_axes(model: onnx.ModelProto) -> list[int | None]:
    """Per graph output, the axis that holds the samples.

    0, or where a sequence-first model's output names the batch dimension of its inputs' sample axes
    (``y[seq, batch, h]``: 1); ``None`` for every output of a model none of whose inputs has a sample axis
    (each run is one sample).
    """
    axes = sample_axes(model)
    if not axes:
        return [0] * len(model.graph.output)
    weights = {init.name for init in model.graph.initializer}
    fed = [vi.name for vi in model.graph.input if vi.name not in weights]
    if fed and all(name in axes and axes[name] is None for name in fed):
        return [None] * len(model.graph.output)
    batch = {vi.type.tensor_type.shape.dim[axes[vi.name]].dim_param for vi in model.graph.input
             if axes.get(vi.name) is not None and len(vi.type.tensor_type.shape.dim) > axes[vi.name]} - {""}
    out = []
    for vi in model.graph.output:
        dims = [d.dim_param for d in vi.type.tensor_type.shape.dim]
        out.append(next((k for k, d in enumerate(dims) if d in batch), 0))
    return out


def _trace_axis(name: str, axis: int, producer: Mapping[str, onnx.NodeProto], ranks: Mapping[str, int],
                values: Mapping[str, onnx.TensorProto],
                inputs: Mapping[str, onnx.ValueInfoProto]) -> tuple[str, int] | None:
    """``(graph input, axis)`` that axis ``axis`` of ``name`` comes from, or ``None`` (see :func:`sample_axes`)."""
    widest = 0  # the highest rank of a constant broadcast on the way: a higher one than the input's shifts axes
    contracted = False  # x @ W on the way: the last axis is not carried through
    for _ in range(256):
        if name in inputs:
            tt = inputs[name].type.tensor_type
            if tt.HasField("shape"):
                rank = len(tt.shape.dim)
                if axis >= rank - contracted or widest > rank:
                    return None
            return name, axis
        node = producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in _PASS_QDQ and node.input[0] not in ranks:
            name = node.input[0]
            continue
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is None or axis >= len(perm):
                return None
            name, axis = node.input[0], perm[axis]
        elif node.op_type in _SAME_AXES:
            name = node.input[0]
        elif node.op_type == "Gather":  # an embedding: table[ids] has the axes of ids, then the table's rows
            gather_axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if gather_axis != 0 or node.input[0] not in ranks or node.input[1] in ranks:
                return None
            name = node.input[1]
        elif node.op_type == "Slice":  # passes when the traced axis is not one of those sliced
            sliced = _sliced_axes(node, values)
            if sliced is None or axis in sliced:
                return None
            name = node.input[0]
        elif node.op_type in _ELEMENTWISE or node.op_type == "MatMul":
            variable = [t for t in node.input if t not in ranks]
            if len(variable) != 1 or (node.op_type == "MatMul" and variable[0] != node.input[0]):
                return None
            widest = max([widest] + [ranks[t] for t in node.input if t in ranks])
            contracted = contracted or node.op_type == "MatMul"
            name = variable[0]
        else:
            return None
    return None


def _sliced_axes(node: onnx.NodeProto, values: Mapping[str, onnx.TensorProto]) -> set[int] | None:
    """The axes a ``Slice`` cuts, when they are constant and non-negative; ``None`` otherwise."""
    attrs = {a.name: list(a.ints) for a in node.attribute}
    if "starts" in attrs:  # opset < 10: attributes
        axes = attrs.get("axes", list(range(len(attrs["starts"]))))
    else:
        def const(index: int) -> list[int] | None:
            if index >= len(node.input) or not node.input[index]:
                return None
            tensor = values.get(node.input[index])
            if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:  # not loaded: no conclusion
                return None
            return [int(v) for v in onnx.numpy_helper.to_array(tensor).ravel()]

        starts, axes = const(1), const(3)
        if axes is None:
            if starts is None or (len(node.input) > 3 and node.input[3]):
                return None
            axes = list(range(len(starts)))
    return None if any(a < 0 for a in axes) else set(axes)


def _expects(specs: Sequence[InputSpec]) -> str:
    return "; ".join(s.describe() for s in specs)


def _check_dtype(name: str, dtype: np.dtype, spec: InputSpec, where: str) -> bool:
    """Return True when an integer widening cast is needed; raise when the dtype does not fit."""
    if dtype == spec.dtype:
        return False
    if dtype.kind in "iu" and spec.dtype.kind in "iu" and np.can_cast(dtype, spec.dtype, casting="safe"):
        return True
    hint = f"; convert it with .astype(np.{spec.dtype.name})" if dtype.kind in "biufc" else ""
    raise DataError(f"{where}: input {name!r} has dtype {dtype}, the model expects {spec.describe()}{hint}")


def _check_shape(name: str, shape: tuple[int, ...], spec: InputSpec, where: str, *, sample_dim: bool) -> None:
    """Rank and static dimensions (the sample axis's only when ``sample_dim``); the sample axis must not be empty."""
    if spec.shape is not None:
        if len(shape) != len(spec.shape):
            on = "one sample per feed" if spec.sample_axis is None else f"samples on axis {spec.sample_axis}"
            raise DataError(
                f"{where}: input {name!r} has shape {list(shape)} (rank {len(shape)}), the model expects rank "
                f"{len(spec.shape)}: {spec.describe()}, {on}"
            )
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(want, int) and got != want and (axis != spec.sample_axis or sample_dim):
                raise DataError(
                    f"{where}: input {name!r} has shape {list(shape)}, the model expects {spec.describe()} "
                    f"(axis {axis} must be {want})"
                )
    if spec.sample_axis is not None and len(shape) > spec.sample_axis and shape[spec.sample_axis] == 0:
        raise DataError(f"{where}: input {name!r} has no samples (shape {list(shape)})")


_T = TypeVar("_T")
_INFINITE_OK: contextvars.ContextVar[bool] = contextvars.ContextVar("onnxpress_infinite_inputs_ok", default=False)


@contextlib.contextmanager
def infinite_values_allowed() -> Iterator[None]:
    """Within this block, float inputs may hold +-inf (NaN is still refused).

    An additive attention mask fed as an input holds -inf by design; calibration reports such a tensor
    and leaves it out of quantization (``table.excluded``), so :func:`onnxpress.calibrate` and
    :func:`onnxpress.quantize` read their data inside this block. Everywhere else (validate, prune,
    lowrank, finetune) an infinite input is corrupted data: those refuse it by name.
    """
    token = _INFINITE_OK.set(True)
    try:
        yield
    finally:
        _INFINITE_OK.reset(token)


def accepts_infinite_inputs(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Run ``fn`` inside :func:`infinite_values_allowed`."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> _T:
        with infinite_values_allowed():
            return fn(*args, **kwargs)

    return wrapper


def _check_finite(name: str, arr: np.ndarray, where: str, offset: int, axis: int | None = 0) -> None:
    if arr.dtype.kind not in "fc":
        return
    inf_ok = _INFINITE_OK.get()
    bad = np.isnan(arr) if inf_ok else ~np.isfinite(arr)
    if bad.any():
        first = np.argwhere(bad)[0]
        at = (f"sample {offset}" if axis is None else f"sample {offset + int(first[axis])}" if arr.ndim > axis
              else "the scalar")
        what, hint = ("NaN", "") if inf_ok else ("NaN or inf", " (an attention mask's -inf is taken by calibrate and "
                                                              "quantize)")
        raise DataError(f"{where}: input {name!r} holds {what} (first at {at}); clean or drop those samples{hint}")


def check_feed(
    feed: object, specs: Sequence[InputSpec], where: str, *, offset: int = 0
) -> dict[str, np.ndarray]:
    """Validate one complete feed and return it as ``{name: ndarray}`` in the model's input order.

    Keys the model does not take are dropped (``labels`` and the like); integer arrays are widened
    losslessly when the model expects a wider integer type.

    Args:
        feed: a mapping of input name to array-like.
        specs: the model's inputs (:func:`model_inputs`).
        where: how to name the feed in an error ("feed 3 of the iterable").
        offset: index of the feed's first sample in the whole source, for error messages.

    Raises:
        DataError: not a mapping, a missing input, wrong rank/static dimension/dtype, no samples, NaN (or inf outside
            :func:`infinite_values_allowed`).
    """
    if not isinstance(feed, Mapping):
        raise DataError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    missing = [s.name for s in specs if s.name not in feed]
    if missing:
        wanted = {s.name for s in specs}
        extra = sorted(str(k) for k in feed if k not in wanted)
        got = f"; it has {extra}" if extra else ""
        raise DataError(f"{where}: missing input(s) {missing}; the model expects {_expects(specs)}{got}")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            arr = np.asarray(feed[spec.name])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: input {spec.name!r} is not an array ({exc})") from None
        if _check_dtype(spec.name, arr.dtype, spec, where):
            arr = arr.astype(spec.dtype)
        _check_shape(spec.name, arr.shape, spec, where, sample_dim=True)
        _check_finite(spec.name, arr, where, offset, spec.sample_axis)
        out[spec.name] = arr
    _check_named_dims(out, specs, where)
    _check_sample_counts(out, specs, where)
    return out


def _check_sample_counts(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> None:
    """Inputs with dynamic sample axes hold as many samples, where one of them is not on axis 0.

    Only then: a model whose inputs all take axis 0 may have a second dynamic axis 0 that is not a batch (boxes),
    and its feeds run as stored. But ``x[seq, batch]`` told ``--sample-axis x=0`` beside ``h0[layers, batch]`` ran
    20 time steps as 20 samples beside 24 sequences, without a word.
    """
    if all(s.sample_axis == 0 for s in specs):
        return
    counts = {s.name: int(feed[s.name].shape[s.sample_axis]) for s in specs
              if s.dynamic_samples and s.name in feed and feed[s.name].ndim > s.sample_axis}
    if len(set(counts.values())) > 1:
        axes = ", ".join(f"{s.name}: axis {s.sample_axis}" for s in specs if s.name in counts)
        raise DataError(f"{where}: the inputs hold different numbers of samples on their sample axes ({axes}): "
                        f"{counts}; give every input the same samples, or say where they are with --sample-axis "
                        "INPUT=AXIS (onnxpress.samples_on in Python)")


def _check_named_dims(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> None:
    """Inputs that name one symbolic dimension (``input_ids`` and ``attention_mask`` on ``seq``) agree on its size.

    onnxruntime failed such a feed deep inside a kernel ("BroadcastIterator::Init axis == 1 || axis == largest
    was false") with no word on which inputs disagreed.
    """
    seen: dict[str, tuple[str, int, int]] = {}
    for spec in specs:
        if spec.shape is None or spec.name not in feed:
            continue
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str) or axis >= feed[spec.name].ndim:
                continue
            size = int(feed[spec.name].shape[axis])
            first = seen.setdefault(dim, (spec.name, axis, size))
            if first[2] != size:
                raise DataError(
                    f"{where}: inputs {first[0]!r} and {spec.name!r} share the dimension {dim!r} but have "
                    f"{first[2]} (axis {first[1]}) and {size} (axis {axis}); give them the same size there"
                )


def samples_in(feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> int:
    """Samples in a feed: the sample axis (``axes``, default 0) of its first input that has one (else 1)."""
    for name, arr in feed.items():
        axis = axes.get(name, 0) if axes else 0
        if axis is not None and np.ndim(arr) > axis:
            return int(np.shape(arr)[axis])
    return 1


def take_samples(feed: Mapping[str, np.ndarray], start: int, stop: int,
                 axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of every input of ``feed``, along each input's sample axis (a view).

    An input without a sample axis goes with every sample, whole.
    """
    out = {}
    for name, arr in feed.items():
        axis = axes.get(name, 0) if axes else 0
        out[name] = arr if axis is None else arr[(slice(None),) * axis + (slice(start, stop),)]
    return out


def join_samples(feeds: Sequence[Mapping[str, np.ndarray]],
                 axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """Feeds concatenated along each input's sample axis (every input must have one)."""
    out = {}
    for k in feeds[0]:
        axis = axes.get(k, 0) if axes else 0
        if axis is None:
            raise ValueError(f"input {k!r} has no sample axis: its feeds cannot be joined")
        out[k] = np.concatenate([f[k] for f in feeds], axis=axis)
    return out


def _axes(specs: Sequence[InputSpec]) -> dict[str, int | None]:
    return {s.name: s.sample_axis for s in specs if s.sample_axis != 0}


def _samples(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    return samples_in(feed, _axes(specs))


def _stackable(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> bool:
    """Feeds can be concatenated/sliced when every input has a dynamic sample axis of the same length."""
    if not all(s.dynamic_samples for s in specs):
        return False
    sizes = {feed[s.name].shape[s.sample_axis] if feed[s.name].ndim > s.sample_axis else None for s in specs}
    return len(sizes) == 1 and None not in sizes


def _rest(arr: np.ndarray, axis: int | None) -> tuple[int, ...]:
    """``arr``'s shape without its sample axis (all of it when it has none)."""
    return arr.shape if axis is None else arr.shape[:axis] + arr.shape[axis + 1 :]


class DataReader(abc.ABC):
    """Validated feeds from one source, batched on demand; nothing grows with the number of samples.

    Attributes:
        input_names: the model inputs every feed provides, in graph order.
    """

    def __init__(self, specs: Sequence[InputSpec], source: str, max_samples: int | None) -> None:
        if max_samples is not None and max_samples < 1:
            raise DataError(f"max_samples must be at least 1, got {max_samples}")
        self._specs = tuple(specs)
        self._source = source
        self._max_samples = max_samples
        self.input_names: tuple[str, ...] = tuple(s.name for s in self._specs)

    @property
    def specs(self) -> tuple[InputSpec, ...]:
        """The model inputs the feeds are checked against."""
        return self._specs

    @property
    def num_samples(self) -> int | None:
        """Samples one pass yields (after ``max_samples``), or ``None`` when unknown before reading."""
        total = self._count()
        if total is None:
            return None
        return total if self._max_samples is None else min(total, self._max_samples)

    @property
    def total_samples(self) -> int | None:
        """Samples in the source before ``max_samples`` (labels must match all of them), or ``None`` when unknown."""
        return self._count()

    def _count(self) -> int | None:
        return None

    @abc.abstractmethod
    def _feeds(self, chunk: int | None) -> Iterator[dict[str, np.ndarray]]:
        """Validated feeds in source order; ``chunk`` is a hint for sources that slice (``.npz``)."""

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield validated feeds, joined along the sample axis up to ``batch_size`` samples when shapes allow.

        Args:
            batch_size: most samples per feed; ``None`` yields feeds as stored.

        Raises:
            DataError: a feed does not fit the model, or the source holds no samples at all.
        """
        if batch_size is not None and batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        feeds = self._feeds(batch_size)
        try:
            yield from self._batch(feeds, batch_size)
        finally:
            feeds.close()

    def _batch(
        self, feeds: Iterator[dict[str, np.ndarray]], batch_size: int | None
    ) -> Iterator[dict[str, np.ndarray]]:
        limit = self._max_samples
        axes = _axes(self._specs)
        seen = 0
        pending: list[dict[str, np.ndarray]] = []
        pending_n = 0
        pending_key: tuple[tuple[int, ...], ...] | None = None

        def flush() -> dict[str, np.ndarray]:
            nonlocal pending, pending_n, pending_key
            out = pending[0] if len(pending) == 1 else join_samples(pending, axes)
            pending, pending_n, pending_key = [], 0, None
            return out

        for feed in feeds:
            n = _samples(feed, self._specs)
            stackable = _stackable(feed, self._specs)
            if limit is not None and seen + n > limit:
                if stackable:
                    feed, n = take_samples(feed, 0, limit - seen, axes), limit - seen
                elif seen:
                    break  # an indivisible feed would overshoot the limit
                # else: the first feed is taken whole even when it is larger than the limit
            seen += n
            if batch_size is None or not stackable:
                if pending:
                    yield flush()
                yield feed
            else:
                key = tuple(_rest(a, axes.get(k, 0)) for k, a in feed.items())
                if pending and key != pending_key:
                    yield flush()
                start = 0
                while start < n:  # fill the pending batch up to batch_size, slicing the feed as needed
                    take = min(n - start, batch_size - pending_n)
                    pending.append(feed if take == n else take_samples(feed, start, start + take, axes))
                    pending_n += take
                    pending_key = key
                    start += take
                    if pending_n == batch_size:
                        yield flush()
            if limit is not None and seen >= limit:
                break
        if pending:
            yield flush()
        if seen == 0:
            raise DataError(f"{self._source} holds no samples; the model expects {_expects(self._specs)}"
                            f"{self._empty_hint()}")

    def _empty_hint(self) -> str:
        """What to add to "holds no samples" (a reason it may be empty)."""
        return ""


class _NpzReader(DataReader):
    """One ``.npz`` whose arrays (keyed by input name) hold samples on their sample axis; streamed in slices.

    An array whose sample axis is not 0 (a sequence-first input) is read whole: its samples are not contiguous.
    An input without a sample axis has its samples stacked on a new axis 0 (``[N, *shape]``), fed one at a time;
    or one array of the input's own shape (a 0-d array for a scalar input: a temperature, a fixed mask), which goes
    with every feed while the other inputs are batched as usual.
    """

    def __init__(self, path: Path, specs: Sequence[InputSpec], max_samples: int | None, *, lone: bool = False) -> None:
        super().__init__(specs, str(path), max_samples)
        self._path = path
        self._lone = lone  # a lone .npy holding the one input's samples (see _LoneNpy)
        headers = self._headers()
        axes = _axes(self._specs)
        self._shared = _shared_inputs(self._specs, headers)
        lengths = {name: shape[_stored_axis(axes.get(name, 0))] for name, (shape, _, _) in headers.items()
                   if name not in self._shared}
        if len(set(lengths.values())) > 1:
            where = "on axis 0" if not axes else "on their sample axes " + str({s.name: s.sample_axis for s in specs})
            raise DataError(f"{path}: inputs hold different numbers of samples {where}: {lengths}; one .npz holds "
                            "samples on that axis of every input, so inputs of different fixed sizes there (or an "
                            "input shared by every sample) need a folder of .npz files or a list of feed dicts, one "
                            "per model call")
        self._n = next(iter(lengths.values())) if lengths else 1 if self._shared else 0  # all shared: one feed
        fixed = {s.fixed_samples for s in self._specs if s.fixed_samples}
        if len(fixed) > 1:  # slices of one step cannot fit them all
            raise DataError(
                f"{path}: the model's inputs have different fixed sizes on {'their sample axes' if axes else 'axis 0'} "
                f"({', '.join(s.describe() for s in self._specs if s.fixed_samples)}), which one .npz cannot "
                "feed; give a folder of .npz files or a list of feed dicts, one per model call"
            )
        if fixed and any(s.sample_axis is None and s.name not in self._shared for s in self._specs):
            raise DataError(
                f"{path}: the model has inputs with a fixed batch and inputs with no sample axis "
                f"({_expects(self._specs)}), which one .npz cannot feed; give a folder of .npz files or a list of "
                "feed dicts, one per model call"
            )
        for spec in self._specs:
            if spec.fixed_samples and self._n % spec.fixed_samples:
                raise DataError(
                    f"{path}: input {spec.name!r} holds {self._n} samples, not a multiple of the model's fixed "
                    f"axis {spec.sample_axis} ({spec.describe()})"
                )

    def _count(self) -> int | None:
        return self._n

    def _open(self) -> zipfile.ZipFile | _LoneNpy:
        if self._lone:
            return _LoneNpy(self._path, self._specs[0].name)
        try:
            return zipfile.ZipFile(self._path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self._path} is not a readable .npz archive ({exc})") from None

    def _headers(self) -> dict[str, tuple[tuple[int, ...], bool, np.dtype]]:
        """Shape, Fortran order and dtype of each model input, read from the .npy headers only."""
        out = {}
        with self._open() as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            missing = [s.name for s in self._specs if s.name not in members]
            if missing:
                raise DataError(
                    f"{self._path}: no array for input(s) {missing}; the model expects {_expects(self._specs)}; "
                    f"the file has {sorted(members)}"
                )
            for spec in self._specs:
                try:
                    with zf.open(members[spec.name]) as fp:
                        shape, fortran, dtype = _read_npy_header(fp)
                except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                    raise DataError(f"{self._path}: array {spec.name!r} is unreadable ({exc})") from None
                where = str(self._path)
                if dtype.hasobject:
                    raise DataError(f"{where}: array {spec.name!r} holds Python objects; save numeric arrays")
                _check_dtype(spec.name, dtype, spec, where)
                if _is_shared(spec, shape):  # the input's own shape: one value for every feed (a temperature)
                    _check_shape(spec.name, shape, spec, where, sample_dim=True)
                    out[spec.name] = (shape, fortran, dtype)
                    continue
                if spec.sample_axis is None:  # samples stacked on a new axis 0
                    rank = None if spec.shape is None else len(spec.shape) + 1
                    if not shape or (rank is not None and len(shape) != rank):
                        raise DataError(
                            f"{where}: array {spec.name!r} has shape {list(shape)}; {spec.name!r} has no sample axis "
                            f"({spec.describe()}), so an .npz holds its samples stacked on a new axis 0 (rank "
                            f"{rank}), or one value of its own rank ({rank - 1 if rank else '?'}) that goes with "
                            "every feed"
                        )
                    if shape[0] == 0:
                        raise DataError(f"{where}: input {spec.name!r} has no samples (shape {list(shape)})")
                    _check_shape(spec.name, shape[1:], spec, where, sample_dim=True)
                    out[spec.name] = (shape, fortran, dtype)
                    continue
                if len(shape) <= spec.sample_axis:
                    raise DataError(
                        f"{where}: array {spec.name!r} is a scalar; samples go on axis {spec.sample_axis} "
                        f"({spec.describe()})"
                    )
                _check_shape(spec.name, shape, spec, where, sample_dim=False)
                out[spec.name] = (shape, fortran, dtype)
        return out

    def _feeds(self, chunk: int | None) -> Iterator[dict[str, np.ndarray]]:
        fixed = [s.fixed_samples for s in self._specs if s.fixed_samples]
        # one sample per feed, stored [N, ...]; a shared input goes whole with every feed
        single = {s.name for s in self._specs if s.sample_axis is None and s.name not in self._shared}
        step = 1 if single else fixed[0] if fixed else (chunk or self._n)
        if self._max_samples is not None and not fixed:
            step = min(step, self._max_samples)
        headers = self._headers()
        with self._open() as zf:
            streams = {}
            try:
                shared = {}
                for spec in self._specs:
                    stream = _NpyStream(zf, spec.name + ".npy", *headers[spec.name],
                                        axis=_stored_axis(spec.sample_axis))
                    if spec.name in self._shared:
                        with contextlib.closing(stream):
                            shared[spec.name] = stream.read_all()
                    else:
                        streams[spec.name] = stream
                for start in range(0, self._n, step):
                    stop = min(self._n, start + step)
                    where = f"{self._path} (samples {start}..{stop - 1})"
                    feed = {}
                    for spec in self._specs:  # in the model's input order
                        if spec.name in shared:
                            feed[spec.name] = shared[spec.name]
                        else:
                            rows = streams[spec.name].read(stop - start)
                            feed[spec.name] = rows[0] if spec.name in single else rows
                    yield check_feed(feed, self._specs, where, offset=start)
            finally:
                for s in streams.values():
                    s.close()


def _is_shared(spec: InputSpec, stored: tuple[int, ...]) -> bool:
    """Whether an ``.npz`` array of shape ``stored`` is one value for every feed.

    So it is when the input has no sample axis and the array has the input's own rank (not the rank + 1 of samples
    stacked on a new axis 0).
    """
    return spec.sample_axis is None and spec.shape is not None and len(stored) == len(spec.shape)


def _shared_inputs(specs: Sequence[InputSpec],
                   headers: Mapping[str, tuple[tuple[int, ...], bool, np.dtype]]) -> frozenset[str]:
    """The inputs whose ``.npz`` array goes whole with every feed (:func:`_is_shared`)."""
    return frozenset(s.name for s in specs if _is_shared(s, headers[s.name][0]))


def _stored_axis(axis: int | None) -> int:
    """The axis of an ``.npz`` array that holds the samples.

    The input's sample axis, or the new axis 0 that stacks the samples of an input without one.
    """
    return 0 if axis is None else axis


class _LoneNpy:
    """A lone ``.npy`` file seen as a one-member archive (``{input}.npy``).

    ``_NpzReader`` then checks and streams it exactly as it does an ``.npz`` member: ``np.save("calib.npy", x)``
    for a one-input model.
    """

    def __init__(self, path: Path, name: str) -> None:
        self._path, self._member = path, name + ".npy"

    def namelist(self) -> list[str]:
        return [self._member]

    def open(self, member: str) -> Any:
        return open(self._path, "rb")  # noqa: SIM115 -- closed by the caller, as zipfile's members are

    def __enter__(self) -> _LoneNpy:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NPY_MAGIC = b"\x93NUMPY"


def _is_npy(path: Path) -> bool:
    """Whether the file starts as an ``.npy`` does (whatever its name)."""
    try:
        with open(path, "rb") as fp:
            return fp.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError:
        return False


def _read_npy_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


class _NpyStream:
    """Read an ``.npy`` member of a zip archive a few samples at a time.

    C order with samples on axis 0 streams rows; Fortran order, or samples on another axis, reads the array
    whole (its samples are not contiguous). ``read(k)`` returns the next ``k`` samples along ``axis``.
    """

    def __init__(self, zf: zipfile.ZipFile, member: str, shape: tuple[int, ...], fortran: bool, dtype: np.dtype,
                 axis: int = 0):
        self._shape, self._dtype, self._axis = shape, dtype, axis
        self._fp = zf.open(member)
        _read_npy_header(self._fp)
        self._whole: np.ndarray | None = None
        self._pos = 0
        if fortran or axis:  # rare (np.save of an F-contiguous array, a sequence-first input): rows are not
            # contiguous, so read it whole
            count = int(np.prod(shape))
            raw = self._read_exact(count * dtype.itemsize)
            flat = np.frombuffer(raw, dtype=dtype)
            self._whole = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)

    def _read_exact(self, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = self._fp.readinto(view[got:])
            if not n:
                raise DataError(f"array {self._fp.name!r} ends early: the file is truncated")
            got += n
        return buf

    def read(self, rows: int) -> np.ndarray:
        if self._whole is not None:
            out = self._whole[(slice(None),) * self._axis + (slice(self._pos, self._pos + rows),)]
        else:
            row_shape = self._shape[1:]
            nbytes = rows * int(np.prod(row_shape, dtype=np.int64)) * self._dtype.itemsize
            out = np.frombuffer(self._read_exact(nbytes), dtype=self._dtype).reshape((rows, *row_shape))
        self._pos += rows
        return out

    def read_all(self) -> np.ndarray:
        """The whole array, in its own shape (a 0-d one too)."""
        if self._whole is not None:
            return self._whole
        count = int(np.prod(self._shape, dtype=np.int64))
        return np.frombuffer(self._read_exact(count * self._dtype.itemsize), dtype=self._dtype).reshape(self._shape)

    def close(self) -> None:
        self._fp.close()


def npz_files(folder: Path) -> list[Path]:
    """The ``.npz`` feeds of a data folder, in the order the folder reader reads them (by name)."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".npz" and p.is_file())


class _FolderReader(DataReader):
    """A folder of ``.npz`` files, each one complete feed; one file in memory at a time, name order."""

    def __init__(self, folder: Path, specs: Sequence[InputSpec], max_samples: int | None) -> None:
        super().__init__(specs, str(folder), max_samples)
        self._files = npz_files(folder)
        if not self._files:
            raise DataError(f"data folder {folder} has no .npz files; the model expects {_expects(self._specs)}")
        self._counted: int | None = None

    def _count(self) -> int | None:
        if self._counted is None and self._specs:
            total = 0
            first, axis = self._specs[0].name + ".npy", self._specs[0].sample_axis
            for path in self._files:
                try:
                    with zipfile.ZipFile(path) as zf, zf.open(first) as fp:
                        shape = _read_npy_header(fp)[0]
                except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError):
                    return None  # a bad file is reported with a clear error when it is read
                total += 1 if axis is None else shape[axis] if len(shape) > axis else 1
            self._counted = total
        return self._counted

    def _feeds(self, chunk: int | None) -> Iterator[dict[str, np.ndarray]]:
        offset = 0
        for path in self._files:
            try:
                with np.load(path, allow_pickle=False) as npz:
                    feed = {k: npz[k] for k in self.input_names if k in npz.files}
                    extra = {k: None for k in npz.files if k not in self.input_names}
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                # numpy reads a file that is not a zip archive as a pickle and refuses it "when allow_pickle=False",
                # advice that would not help here (a text file named .npz in the folder)
                why = "not a zip archive of arrays" if "allow_pickle" in str(exc) else str(exc)
                raise DataError(f"{path} is not a readable .npz file ({why})") from None
            checked = check_feed({**extra, **feed}, self._specs, str(path), offset=offset)
            offset += _samples(checked, self._specs)
            yield checked


_READ_ONCE: weakref.WeakSet = weakref.WeakSet()  # one-shot sources (generators) some reader has started


def _mark_read(source: object) -> None:
    """Remember that ``source`` was read: a later reader of a spent generator says so instead of "no samples"."""
    with contextlib.suppress(TypeError):  # not weak-referenceable (a list iterator): the reader's own count only
        _READ_ONCE.add(source)


def _was_read(source: object) -> bool:
    try:
        return source in _READ_ONCE
    except TypeError:
        return False


class _IterableReader(DataReader):
    """An iterable of feed dicts, or an onnxruntime ``CalibrationDataReader`` (``get_next()`` until None)."""

    def __init__(self, source: Any, specs: Sequence[InputSpec], max_samples: int | None) -> None:
        ort_reader = callable(getattr(source, "get_next", None))
        what = f"CalibrationDataReader {type(source).__name__}" if ort_reader else f"iterable {type(source).__name__}"
        super().__init__(specs, what, max_samples)
        self._obj = source
        self._ort = ort_reader
        self._one_shot = ort_reader or iter(source) is source
        self._passes = [0]  # shared by the copies open_data makes for max_samples: they read the same source

    def _count(self) -> int | None:
        if self._one_shot or not isinstance(self._obj, Sequence):
            return None
        try:
            if not self._specs:
                return None
            first, axes = self.input_names[0], _axes(self._specs)
            return sum(samples_in({first: feed[first]}, axes) for feed in self._obj)
        except (KeyError, IndexError, TypeError, ValueError):
            return None  # reported with a clear error when the feed is read

    def _items(self) -> Iterator[object]:
        if self._ort:
            while (item := self._obj.get_next()) is not None:
                yield item
        else:
            yield from self._obj

    def _empty_hint(self) -> str:
        # a list iterator or map object cannot be remembered as read (no weak reference), so a second read of one
        # lands here; a generator is caught before, with its own message
        if self._one_shot and not self._ort:
            return ("; an iterator is spent after one read, and this call may read its data more than once (quantize "
                    "reads it for the ranges, then for bias correction): pass a list of feeds instead")
        return ""

    def _feeds(self, chunk: int | None) -> Iterator[dict[str, np.ndarray]]:
        if self._one_shot and (self._passes[0] or _was_read(self._obj)):
            if self._ort and callable(getattr(self._obj, "rewind", None)):
                self._obj.rewind()
            else:
                raise DataError(
                    f"the {self._source} was already read once and cannot be rewound; "
                    "pass a list of feeds (or a reader with rewind()) to read it again"
                )
        self._passes[0] += 1
        _mark_read(self._obj)
        offset = 0
        for index, item in enumerate(self._items()):
            feed = check_feed(item, self._specs, f"feed {index} of the {self._source}", offset=offset)
            offset += _samples(feed, self._specs)
            yield feed


def open_data(source: DataSource, model: onnx.ModelProto, *, max_samples: int | None = None) -> DataReader:
    """Open sample data for ``model`` from any supported source.

    Args:
        source: an ``.npz`` path (arrays keyed by input name, samples on axis 0 or, for a sequence-first
            input, axis 1: :func:`sample_axes`; other keys such as ``labels`` are ignored), an ``.npy`` path
            (the samples of a model with one input), a folder of
            ``.npz`` files each holding one complete feed, an
            iterable of ``{input name: array}`` dicts, an onnxruntime ``CalibrationDataReader``, or a
            :class:`DataReader` (returned as is, limited to ``max_samples``).
        model: the model the feeds are for; its graph inputs minus initializers are what feeds provide.
        max_samples: stop after this many samples.

    Raises:
        DataError: the path is missing or unreadable, names/rank/static dims/dtype do not fit, or the
            ``.npz``/folder is empty. Problems inside streamed feeds (NaN/inf, a bad file in a folder,
            a bad dict) are raised while iterating ``batches()``.
        UnsupportedModelError: a model input is not a tensor.
    """
    if isinstance(source, DataReader):
        if max_samples is None:
            return source
        limited = copy.copy(source)
        current = source._max_samples
        limited._max_samples = max_samples if current is None else min(current, max_samples)
        return limited
    specs = model_inputs(model)
    if not specs:
        raise DataError("the model has no inputs to feed (every graph input is an initializer)")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _FolderReader(path, specs, max_samples)
        if not path.exists():
            raise DataError(f"data not found: {path} (expected an .npz file, a folder of .npz files, or an .npy for "
                            "a one-input model)")
        if _is_npy(path):
            if len(specs) != 1:
                names = ", ".join(f"{s.name}=..." for s in specs)
                raise DataError(f"{path} is one .npy array, and the model takes {len(specs)} inputs "
                                f"({_expects(specs)}); save them together: np.savez(path, {names})")
            return _NpzReader(path, specs, max_samples, lone=True)
        return _NpzReader(path, specs, max_samples)
    if isinstance(source, (bytes, Mapping, np.ndarray)):
        raise DataError(
            f"cannot read data from a {type(source).__name__}; pass an .npz path, a folder, a list of feed dicts "
            "or a CalibrationDataReader (for one feed, wrap it in a list)"
        )
    if callable(getattr(source, "get_next", None)) or isinstance(source, Iterable):
        return _IterableReader(source, specs, max_samples)
    raise DataError(
        f"cannot read data from a {type(source).__name__}; pass an .npz path, a folder of .npz files, an iterable "
        "of feed dicts or a CalibrationDataReader"
    )


def load_labels(source: str | os.PathLike[str] | np.ndarray, key: str = "labels") -> np.ndarray:
    """Load class labels: an ``.npy`` file, an ``.npz`` holding ``key``, or an array; returned as int64 [N].

    Raises:
        DataError: the file is missing/unreadable, the key is absent (names the keys present), the
            labels are not a non-empty 1-D (or [N,1]) array of integers.
    """
    where = "labels"
    if isinstance(source, np.ndarray):
        labels = source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise DataError(f"labels file not found: {path} (expected an .npy file or an .npz with key {key!r})")
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    files = sorted(loaded.files)
                    labels = loaded[key] if key in files else None
                if labels is None:
                    raise DataError(f"{path} has no {key!r} array; it has {files}")
            else:
                labels = np.asarray(loaded)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            # numpy reads any other file as a pickle and advises unpickling it: not advice to pass on
            why = "not an .npy or .npz file" if "allow_pickle" in str(exc) else str(exc)
            raise DataError(f"{path} is not a readable .npy/.npz file ({why}); labels are an .npy array of class "
                            f"indices or an .npz with key {key!r}") from None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(
            f"{where}: labels must be a non-empty 1-D array of class indices, got shape {list(labels.shape)}"
        )
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers (class indices), got dtype {labels.dtype}")
    return labels.astype(np.int64)


def symbolic_sizes(model: onnx.ModelProto, data: DataSource | None = None,
                   given: Mapping[str, int] | None = None) -> dict[str, int]:
    """Sizes of the model inputs' symbolic dimensions but the batch axis: ``given``, then the first sample of ``data``.

    Keyed as :func:`onnxpress.passes.flops.symbolic_input_dims` keys them: the dimension's name, or
    ``"<input>:<axis>"`` for an unnamed one (a name shared by several inputs takes its first place's size).
    ``data`` is read (one sample) only for a dimension ``given`` leaves out.

    Raises:
        DataError: as :func:`open_data` and its batches do.
    """
    from onnxpress.passes.flops import symbolic_input_dims  # the keys count_macs reads

    sizes = {str(k): int(v) for k, v in (given or {}).items()}
    wanted = symbolic_input_dims(model)
    axes = sample_axes(model)
    batch = {d.dim_param for vi in model.graph.input if axes.get(vi.name, 0) is not None
             for d in vi.type.tensor_type.shape.dim[axes.get(vi.name, 0):][:1] if d.dim_param}
    unknown = sorted(set(sizes) - set(wanted))
    if unknown:  # a typo would count MACs at the first sample's size without a word
        has = f"it has {sorted(wanted)}" if wanted else "it has none (every input dimension beyond the batch is fixed)"
        what = ("the batch dimension (MACs are counted per sample, so its size changes nothing)"
                if set(unknown) <= batch else "not symbolic input dimensions of the model")
        raise DataError(f"--dim / dims name(s) {unknown}: {what}; {has}")
    if data is None or all(key in sizes for key in wanted):
        return sizes
    feed = first_batch(data, model, 1)
    for key, (name, axis) in wanted.items():
        sizes.setdefault(key, int(feed[name].shape[axis]))
    return sizes


def first_batch(data: DataSource, model: onnx.ModelProto, batch_size: int) -> dict[str, np.ndarray]:
    """The first validated feed of ``data`` (at most ``batch_size`` samples); only that much is read.

    Raises:
        DataError: as :func:`open_data` and its batches do.
    """
    batches = open_data(data, model, max_samples=batch_size).batches(batch_size)
    try:
        return next(batches)
    finally:
        batches.close()
