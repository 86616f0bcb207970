"""Run the model once over the data and stream every wanted tensor into its observer.

The rewrite (on a private copy, in memory, never saved)::

    before:  X -> Conv -> a -> Relu -> b -> Gemm -> Y            outputs: Y
    after :  X -> Conv -> a -> Relu -> b -> Gemm -> Y            outputs: Y, a, b

Each wanted intermediate tensor becomes an extra graph output (its element type from shape
inference; no shape, so nothing is constrained). One onnxruntime session is built from the bytes.
Batches are stacked along axis 0 up to ``batch_size`` samples when every input's first dimension is
dynamic, and fed as stored otherwise. After each ``run`` the batch's values go to
``observers[name].update`` and are dropped, so memory does not grow with the number of samples.
The updates of batch ``k`` run on one worker thread while onnxruntime computes batch ``k+1``
(numpy releases the GIL), so at most two batches of values are alive at once.

Graph inputs are observed straight from the feeds (no extra output needed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx

from onnxpress.errors import CalibrationError, DataError

__all__ = [
    "DEFAULT_BUDGET_MB",
    "DEFAULT_OP_TYPES",
    "batch_major_tensors",
    "bytes_per_sample",
    "collect_statistics",
    "constant_values",
    "exposed_model",
    "select_tensors",
    "value_aliases",
    "value_types",
]

log = logging.getLogger(__name__)

# Ops whose float inputs and outputs a QDQ quantizer touches.
DEFAULT_OP_TYPES: frozenset[str] = frozenset(
    {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Concat",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "LeakyRelu",
        "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Softmax", "Resize", "Flatten", "Reshape",
        "Transpose", "Squeeze", "Unsqueeze", "Split", "Gather", "ReduceMean", "Pad",
        "LayerNormalization", "InstanceNormalization", "Where", "Erf", "Gelu", "HardSwish",
    }
)  # fmt: skip

DEFAULT_BUDGET_MB = 8.0  # measured: 16 -> 8 MB cut peak extra RSS ~95 -> ~60 MB on the reference CNNs at equal speed

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


_Types = dict[str, tuple[int, "tuple[int | None, ...] | None"]]


def value_types(model: onnx.ModelProto, inferred: onnx.ModelProto | None = None) -> _Types:
    """``name -> (element type, dims or None)`` of every typed value, after shape inference."""
    g = _inferred(model, inferred).graph
    types: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type:
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            types[vi.name] = (tt.elem_type, dims if tt.HasField("shape") else None)
    for init in g.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    return types


def _inferred(model: onnx.ModelProto, inferred: onnx.ModelProto | None) -> onnx.ModelProto:
    """``inferred`` when the caller has it, else ``model`` after shape inference (a copy)."""
    if inferred is not None:
        return inferred
    from onnxpress.model_io import infer_shapes

    return infer_shapes(model, weights=False)


def _elem_types(model: onnx.ModelProto, inferred: onnx.ModelProto | None = None) -> dict[str, int]:
    """Element type of every typed value (inputs, outputs, value_info, initializers)."""
    return {name: t for name, (t, _) in value_types(model, inferred).items()}


def bytes_per_sample(model: onnx.ModelProto, names: Sequence[str], types: _Types | None = None) -> int | None:
    """Bytes one sample of the tensors ``names`` takes (axis 0 = batch); None if a shape is unknown."""
    total = 0
    types = value_types(model) if types is None else types
    for name in names:
        elem, dims = types.get(name, (0, None))
        if not elem or dims is None or not dims or any(d is None for d in dims[1:]):
            return None
        size = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        total += size * onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize
    return total


def batch_major_tensors(
    model: onnx.ModelProto, names: Iterable[str], *, inferred: onnx.ModelProto | None = None
) -> set[str]:
    """The tensors of ``names`` whose axis 0 is the graph inputs' batch axis (so axis 0 = samples).

    After shape inference, a tensor qualifies when its first dimension is the same symbol as the
    sample-axis dimension of every graph input (``batch``; axis 0, or axis 1 of a sequence-first input:
    :func:`~onnxpress.calibration.readers.sample_axes`), or the same number when that is fixed. A
    Reshape that folds the batch into another axis, a Transpose that moves it, or an unknown shape
    does not qualify. Graph inputs whose samples are on axis 0 qualify by definition.

    Args:
        model: the model (not modified).
        names: the tensors to check.
        inferred: ``model`` after :func:`onnxpress.model_io.infer_shapes`, when the caller has it
            (shape inference is not repeated).
    """
    from onnxpress.calibration.readers import sample_axes

    g = _inferred(model, inferred).graph
    inits = {i.name for i in g.initializer}
    axes = sample_axes(model)

    def first_dim(vi: onnx.ValueInfoProto, axis: int = 0) -> str | int | None:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape") or len(tt.shape.dim) <= axis:
            return None
        d = tt.shape.dim[axis]
        return d.dim_value if d.HasField("dim_value") else (d.dim_param or None)

    inputs = [vi for vi in g.input if vi.name not in inits and axes.get(vi.name, 0) is not None]
    if not inputs:  # no input has a sample axis: each run is one sample, no tensor is batch-major
        return set()
    batch = {first_dim(vi, axes.get(vi.name, 0)) for vi in inputs}
    wanted = set(names)
    out = {vi.name for vi in inputs if vi.name in wanted and axes.get(vi.name, 0) == 0}
    if len(batch) != 1 or None in batch:
        return out
    (axis,) = batch
    for vi in list(g.value_info) + list(g.output):
        if vi.name in wanted and first_dim(vi) == axis:
            out.add(vi.name)
    return out


def constant_values(g: onnx.GraphProto) -> set[str]:
    """Initializers and values computed from them alone (``Constant``, ``Identity(W)``, ...)."""
    inputs = {i.name for i in g.input}
    constants = {i.name for i in g.initializer} - inputs
    for node in g.node:  # nodes are topologically sorted in a valid model
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in constants for i in ins)):
            constants.update(o for o in node.output if o)
    return constants


def select_tensors(
    model: onnx.ModelProto, op_types: Iterable[str] | None = None, *, inferred: onnx.ModelProto | None = None
) -> list[str]:
    """Float activations a quantizer needs: the inputs and outputs of ops in ``op_types``.

    Initializers and values computed from them only are weights, not activations, and are skipped; so are
    tensors whose element type is not floating point (shape tensors, indices, masks as bool).

    Args:
        model: the model (not modified).
        op_types: op types to cover; default :data:`DEFAULT_OP_TYPES`.
        inferred: ``model`` after :func:`onnxpress.model_io.infer_shapes`, when the caller has it.

    Returns:
        Names in graph order (graph inputs first), without duplicates.
    """
    wanted_ops = DEFAULT_OP_TYPES if op_types is None else frozenset(op_types)
    g = model.graph
    full = value_types(model, inferred)
    types = {name: t for name, (t, _) in full.items()}
    constants = constant_values(g)
    producer = {o: n for n in g.node for o in n.output}
    names: dict[str, None] = {}
    for node in g.node:
        if node.op_type not in wanted_ops:
            continue
        for name in list(node.input) + list(node.output):
            if not name or name in constants:
                continue
            # onnx's inference stops at onnxruntime's own ops (a model saved after its graph optimisations:
            # FusedConv): a value after one is typed as its producer's float inputs are, as the runner exposes it
            elem = types.get(name) or _guessed_type(producer, name, full, default=0)
            if elem in _FLOAT_TYPES:
                names[name] = None
    graph_inputs = [i.name for i in g.input if i.name in names]
    return graph_inputs + [n for n in names if n not in set(graph_inputs)]


# Ops whose first output holds exactly the values of their first input (same multiset).
VALUE_PRESERVING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Dropout"})


def value_aliases(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """``{name: root}`` for wanted tensors that are value-preserving ops of another wanted tensor.

    A Reshape, Transpose, ... output has the same values as its input, so one observer serves
    both. Roots map to themselves.
    """
    wanted = set(names)
    root: dict[str, str] = {n: n for n in wanted}
    for node in model.graph.node:
        if node.op_type not in VALUE_PRESERVING or not node.input or not node.output:
            continue
        src, dst = node.input[0], node.output[0]
        if src in wanted and dst in wanted:
            root[dst] = root[src]
    return root


def exposed_model(
    model: onnx.ModelProto, names: Sequence[str], types: _Types
) -> tuple[onnx.ModelProto, list[str], list[onnx.TensorProto]]:
    """A copy of ``model`` with ``names`` added as graph outputs, the fetch list, and left-out initializers.

    A model too large to serialise is copied without its big initializers (``split_large``), which are
    returned for the session to take from memory: the weights are not copied for it.
    """
    from onnxpress.model_io import is_large, split_large

    g = model.graph
    graph_inputs = {i.name for i in g.input}
    produced = {o for n in g.node for o in n.output if o}
    existing = {o.name for o in g.output}
    unknown = [n for n in names if n not in produced and n not in graph_inputs]
    if unknown:
        raise CalibrationError(
            f"tensor(s) {', '.join(map(repr, unknown[:5]))} are not produced by any node nor graph inputs; "
            "observe activations only (weights are not calibrated)"
        )
    if is_large(model):
        out, big = split_large(model)
    else:
        out, big = onnx.ModelProto(), []
        out.CopyFrom(model)
    fetch = []
    producer: dict[str, onnx.NodeProto] | None = None  # built once, for the first value left untyped
    for name in names:
        if name in graph_inputs:
            continue
        fetch.append(name)
        if name in existing:
            continue
        if name not in types and producer is None:
            producer = {o: node for node in g.node for o in node.output if o}
        elem = types[name][0] if name in types else _guessed_type(producer, name, types)
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return out, fetch, big


def _guessed_type(producer: Mapping[str, onnx.NodeProto], name: str, types: _Types,
                  default: int = onnx.TensorProto.FLOAT) -> int:
    """The element type of a value that shape inference left untyped.

    That of its producer's first float input (looked up the same way when it is untyped too), else ``default``.
    onnx's inference stops at contrib ops (``MatMulNBits``), and a float16 model's values after one are float16,
    not the float32 a guess would say (onnxruntime refuses an output declared with the wrong type).
    """
    seen: set[str] = set()
    todo = [name]
    while todo:
        node = producer.get(todo.pop(0))
        for i in node.input if node is not None else []:
            if types.get(i, (0,))[0] in _FLOAT_TYPES:
                return types[i][0]
            if i and i not in types and i not in seen:
                seen.add(i)
                todo.append(i)
    return default


def fixed_batch_inputs(model: onnx.ModelProto) -> list[tuple[str, int | None]]:
    """``(name, size)`` of each graph input whose sample axis has a fixed size.

    ``size`` is ``None`` for a scalar input, or one without a sample axis. The sample axis is axis 0, or the one
    :func:`~onnxpress.calibration.readers.sample_axes` finds.
    """
    from onnxpress.calibration.readers import sample_axes

    inits = {i.name for i in model.graph.initializer}
    axes = sample_axes(model)
    fixed = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        axis = axes.get(vi.name, 0)
        if axis is None:
            fixed.append((vi.name, None))
        elif len(dims) <= axis or dims[axis].HasField("dim_value"):
            fixed.append((vi.name, dims[axis].dim_value if len(dims) > axis else None))
    return fixed


def _batch_is_dynamic(model: onnx.ModelProto) -> bool:
    """True when every graph input has a sample axis whose size is not a fixed number."""
    return not fixed_batch_inputs(model)


def _pieces(feeds: Iterable[Mapping[str, np.ndarray]], batch_size: int,
            axes: Mapping[str, int | None]) -> Iterator[dict[str, np.ndarray]]:
    """Feeds as arrays, each cut into slices of at most ``batch_size`` samples along the sample axis.

    A feed with an input that has no sample axis is one sample: it is never cut.
    """
    from onnxpress.calibration.readers import samples_in, take_samples

    for feed in feeds:
        if not isinstance(feed, Mapping) or not feed:
            raise DataError(f"calibration data must yield non-empty dicts of input name -> array, got {type(feed)}")
        feed = {k: np.asarray(v) for k, v in feed.items()}
        n = samples_in(feed, axes)
        if n <= batch_size or any(axes.get(k, 0) is None or np.ndim(v) <= axes.get(k, 0)
                                  or v.shape[axes.get(k, 0)] != n for k, v in feed.items()):
            yield feed
            continue
        for start in range(0, n, batch_size):
            yield take_samples(feed, start, start + batch_size, axes)


def _stack(feeds: Iterable[Mapping[str, np.ndarray]], batch_size: int,
           axes: Mapping[str, int | None] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate consecutive feeds along the sample axis up to ``batch_size`` samples when shapes allow."""
    from onnxpress.calibration.readers import _rest, join_samples, samples_in

    axes = axes or {}
    pending: list[Mapping[str, np.ndarray]] = []
    count = 0

    def flush() -> dict[str, np.ndarray]:
        if len(pending) == 1:
            return dict(pending[0])
        return join_samples(pending, axes)

    for feed in _pieces(feeds, batch_size, axes):
        if pending:
            ref = pending[0]
            fits = feed.keys() == ref.keys() and all(
                axes.get(k, 0) is not None and np.ndim(v) > axes.get(k, 0)
                and _rest(v, axes.get(k, 0)) == _rest(ref[k], axes.get(k, 0))
                and v.dtype == ref[k].dtype
                for k, v in feed.items()
            )
            if not fits or count + samples_in(feed, axes) > batch_size:
                yield flush()
                pending, count = [], 0
        pending.append(feed)
        count += samples_in(feed, axes)
    if pending:
        yield flush()


def _feeds(data: object, batch_size: int, dynamic: bool,
           axes: Mapping[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches from a ``DataReader`` (has ``batches``) or a plain iterable of feed dicts."""
    batches = getattr(data, "batches", None)
    if callable(batches):
        yield from batches(batch_size if dynamic else None)
        return
    if isinstance(data, Mapping):
        data = [data]
    if dynamic:
        yield from _stack(data, batch_size, axes)  # type: ignore[arg-type]
    else:
        for feed in data:  # type: ignore[union-attr]
            yield {k: np.asarray(v) for k, v in feed.items()}


class _NoBar:
    """Stands in for a disabled tqdm bar.

    A disabled tqdm bar still costs 3-7 ms in a fresh process (it imports ``multiprocessing`` for its lock).
    """

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        """Ignore progress."""


def _progress_bar(total: int | None, progress: bool) -> object:
    """A tqdm bar (samples/s) when ``progress`` is on, else a do-nothing stand-in."""
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating", unit="sample")


def _observe(observers: Mapping[str, object], batch: Sequence[tuple[str, np.ndarray]]) -> None:
    """Stream one batch's values into their observers (runs on the observer thread)."""
    for name, value in batch:
        observers[name].update(value)  # type: ignore[attr-defined]


def collect_statistics(
    model: onnx.ModelProto,
    data: object,
    observers: Mapping[str, object],
    *,
    batch_size: int = 64,
    max_samples: int | None = None,
    progress: bool = False,
    memory_budget_mb: float | None = DEFAULT_BUDGET_MB,
    threads: int | None = None,
    inferred: onnx.ModelProto | None = None,
    external_data_folder: str | None = None,
) -> int:
    """Run ``model`` over ``data`` once and stream each observed tensor into its observer.

    Args:
        model: the model (not modified; a copy with extra outputs is built in memory).
        data: a ``DataReader`` (from ``onnxpress.calibration.readers.open_data``) or an iterable of
            feed dicts ``{input name: array with samples on axis 0}``.
        observers: ``{tensor name: observer}``; each observer needs ``update(x)``.
        batch_size: samples per inference call when the batch dimension is dynamic.
        max_samples: stop after this many samples (the last batch is cut).
        progress: show a tqdm bar (samples/s).
        memory_budget_mb: cap on the observed values of one batch: the batch is reduced to
            ``budget // bytes_per_sample`` samples (at least 1) when the shapes are known, because
            all observed tensors of a batch are alive at once (in onnxruntime, in numpy, and on the
            observer thread). ``None``: always ``batch_size``.
        threads: onnxruntime intra-op threads (``None``: its default, one per core).
        inferred: ``model`` after :func:`onnxpress.model_io.infer_shapes`, when the caller has it
            (shape inference is not repeated).
        external_data_folder: where the data files of ``model``'s external tensors are, when it was
            loaded without them (onnxruntime reads them from there).

    Returns:
        The number of samples run.

    Raises:
        CalibrationError: an observed name is not an activation of the model; no samples.
        DataError: onnxruntime rejects a feed (names the reason).
    """
    from onnxpress.runtime import make_session, quiet_run_options

    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise CalibrationError(f"max_samples must be >= 1, got {max_samples}")
    for name, obs in observers.items():
        if not callable(getattr(obs, "update", None)):
            raise CalibrationError(f"observer for {name!r} has no update(x) method")
    names = list(observers)
    types = value_types(model, inferred)
    exposed, fetch, big = exposed_model(model, names, types)
    session = make_session(exposed, threads=threads, what="model with calibration outputs", initializers=big,
                           external_data_folder=external_data_folder)
    del exposed, big
    input_names = {i.name for i in session.get_inputs()}
    from onnxpress.calibration.readers import sample_axes, samples_in, take_samples

    dynamic = _batch_is_dynamic(model)
    axes = sample_axes(model)
    per_sample = bytes_per_sample(model, names, types)
    if dynamic and memory_budget_mb is not None and per_sample:
        fitted = max(1, int(memory_budget_mb * 2**20 // per_sample))
        if fitted < batch_size:
            log.info("batch %d -> %d samples (%.1f MB observed per sample)", batch_size, fitted, per_sample / 2**20)
            batch_size = fitted
    total = max_samples if max_samples is not None else getattr(data, "num_samples", None)
    seen = 0
    quiet = quiet_run_options()  # a failed batch becomes our DataError, which carries onnxruntime's message
    pending: Future[None] | None = None
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxpress-observe") as pool,
        _progress_bar(total, progress) as bar,
    ):
        for feed in _feeds(data, batch_size, dynamic, axes):
            n = samples_in(feed, axes)
            if max_samples is not None and seen + n > max_samples:
                keep = max_samples - seen
                if not dynamic and keep < n:
                    if seen:
                        break
                    # a fixed-batch model's first feed is taken whole even when it holds more samples than the
                    # limit (as the readers do): cut, it would not run; skipped, nothing would be observed
                else:
                    feed = take_samples(feed, 0, keep, axes)
                    n = keep
            feed = {k: v for k, v in feed.items() if k in input_names}
            try:
                # run([]) would return every graph output; observing only inputs needs no run
                values = session.run(fetch, feed, quiet) if fetch else []
            except Exception as exc:  # onnxruntime raises its own InvalidArgument/Fail types
                msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                from onnxpress.calibration.readers import sample_axis_hint

                raise DataError(f"onnxruntime rejected a calibration batch: {msg}{sample_axis_hint(model)}") from None
            if pending is not None:
                pending.result()  # the previous batch is observed (re-raises its error)
            batch = list(zip(fetch, values, strict=True)) + [(k, feed[k]) for k in names if k in feed]
            pending = pool.submit(_observe, observers, batch)
            del values, batch
            seen += n
            bar.update(n)
            if max_samples is not None and seen >= max_samples:
                break
        if pending is not None:
            pending.result()
    if seen == 0:
        raise CalibrationError("no calibration samples were provided; pass a non-empty data source")
    log.info("calibrated %d tensors on %d samples", len(names), seen)
    return seen
