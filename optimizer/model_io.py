"""Model I/O: load, check, normalise and save ONNX models without ever damaging a file.

- ``load_model`` accepts a path or a ``ModelProto`` and always returns a private copy, so the
  caller's object and file are never modified. External data is resolved relative to the model.
- ``normalize_model`` rewrites what exporters leave behind into the form our passes expect:
  weights held in ``Constant`` nodes become initializers, and opsets older than ``min_opset`` are
  upgraded with onnx's version converter.
- ``save_model`` writes atomically: model (and external data, chosen automatically above ~1.8 GiB)
  go to a hidden scratch folder beside the destination, are checked with ``onnx.checker`` and loaded
  in onnxruntime, and only then renamed into place. On any failure nothing is left behind.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxpress.errors import ModelLoadError, OutputError, UnsupportedModelError

__all__ = [
    "ModelSource",
    "check_model",
    "check_output_path",
    "default_opset",
    "infer_shapes",
    "is_large",
    "load_model",
    "model_bytes",
    "model_digest",
    "move_into_place",
    "names_read",
    "normalize_model",
    "save_model",
    "shape_only_copy",
    "split_large",
    "subgraphs",
    "symbolic_shape_inference",
    "uses_external_data",
]

log = logging.getLogger(__name__)

ModelSource = Union[str, "os.PathLike[str]", onnx.ModelProto]
"""What every public API accepts as a model: a path or a ModelProto."""

# Protobuf refuses to serialise a message of 2 GiB or more; stay clear of the edge.
_EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
# Initializers of at least this many bytes are set aside when a model is too large to serialise (see
# ``split_large``): every shape or index tensor a checker, shape inference or onnxruntime's constant
# folding reads is far smaller, and what is left serialises in a few MB however large the weights are.
_SET_ASIDE_BYTES = 1 << 16


def load_model(
    source: str | os.PathLike[str] | onnx.ModelProto, *, check: bool = True, external_data: bool = True
) -> onnx.ModelProto:
    """Load a model from a path or copy a ``ModelProto``; never returns the caller's object.

    Args:
        source: path to an ``.onnx`` file (external data is resolved beside it) or a ModelProto.
        check: run ``onnx.checker`` (full check) on the loaded model.
        external_data: read a file's external data into the model; ``False`` checks it (present, inside
            the model's folder, long enough) but leaves the tensors as references to it, for callers
            that only run the model (onnxruntime reads them itself: ``make_session(external_data_folder=)``).

    Raises:
        ModelLoadError: the file is missing, a folder, empty, not an ONNX model, its external data
            is missing or truncated, or the checker rejects it.
    """
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
        where = "the given ModelProto"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelLoadError(f"{path} is a folder, not an ONNX model file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path} is empty; expected an ONNX model file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not a valid ONNX model ({_first_line(exc)})") from None
        _check_external_data(model, path)
        if external_data:
            _load_external_data(model, path)
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{where} is not an ONNX model (no graph, IR version or opset)")
    if check and not external_data and not isinstance(source, onnx.ModelProto) and uses_external_data(model):
        _check_file(path)  # the in-memory checker would look for the data files in the working folder
    elif check:
        check_model(model, where=where)
    return model


def _check_file(path: Path) -> None:
    """``onnx.checker`` (full check) on a model file whose tensors stay in their external data files."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ModelLoadError(f"{path} fails onnx.checker: {_first_line(exc)}") from None


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True when some tensor of ``model`` still refers to an external data file."""
    return any(
        onnx.external_data_helper.uses_external_data(t) for t in onnx.external_data_helper._get_all_tensors(model)
    )


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Check the external tensors beside ``path``, with a clear error for missing/short/outside files."""
    base = path.parent
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        lexical = Path(os.path.normpath(base / info.location))  # no symlinks followed: a lexical check
        if Path(info.location).is_absolute() or (base != lexical and base not in lexical.parents):
            raise ModelLoadError(
                f"external data of tensor {tensor.name!r} points outside the model's folder ({info.location!r}); "
                f"move the file beside {path.name} and give its location relative to it"
            )
        data_path = (base / info.location).resolve()
        if not data_path.is_file():
            raise ModelLoadError(
                f"external data file {info.location!r} of tensor {tensor.name!r} not found beside {path}; "
                "copy it next to the model"
            )
        needed = (info.offset or 0) + (info.length or 0)
        if info.length and data_path.stat().st_size < needed:
            raise ModelLoadError(
                f"external data file {data_path.name} is truncated: tensor {tensor.name!r} needs bytes "
                f"up to {needed}, file has {data_path.stat().st_size}"
            )


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the (checked) external tensors beside ``path`` into ``model``."""
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"cannot read external data of {path}: {_first_line(exc)}") from None


def is_large(model: onnx.ModelProto) -> bool:
    """True when ``model`` is too large for protobuf to serialise (about 1.8 GiB of initializers or more)."""
    return _approx_size(model) >= _EXTERNAL_DATA_THRESHOLD


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialised size in bytes.

    For a model too large to serialise: its light copy's size plus its big initializers' values (each
    tensor's few header bytes left out).
    """
    if not is_large(model):
        return model.ByteSize()
    light, big = split_large(model)
    return light.ByteSize() + sum(_tensor_bytes(t) for t in big)


def split_large(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """``(light, big)``: a copy of ``model`` without its big top-level initializers, and those (not copied).

    onnx's checker and shape inference and onnxruntime's session all take a model as one serialised
    protobuf, which cannot exceed 2 GiB. The light copy can: each caller gives the big initializers back
    in its own way (as typed graph inputs to the checker and to shape inference, as in-memory external
    data to onnxruntime). Initializers inside subgraphs stay in the light copy.
    """
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    big = []
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field, value)
            continue
        for tensor in value:
            if _tensor_bytes(tensor) >= _SET_ASIDE_BYTES:
                big.append(tensor)
            else:
                light.graph.initializer.append(tensor)
    return light, big


def _copy_field(dst: object, field: object, value: object) -> None:
    """Copy one protobuf field (as ``ListFields`` yields it) onto ``dst``."""
    if field.is_repeated:  # type: ignore[attr-defined]
        getattr(dst, field.name).extend(value)  # type: ignore[attr-defined]
    elif field.message_type is not None:  # type: ignore[attr-defined]
        getattr(dst, field.name).CopyFrom(value)  # type: ignore[attr-defined]
    else:
        setattr(dst, field.name, value)  # type: ignore[attr-defined]


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values from its shape and type (reading ``raw_data`` would copy it)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0  # a reference to a file: a few bytes in the model
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return tensor.ByteSize()
    count = 1
    for d in tensor.dims:
        count *= d
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def shape_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference, which serialises whatever the model's size.

    A model too large to serialise is copied without its big initializers, each declared as a graph
    input of its type and shape instead (they follow the real inputs); others are copied whole.
    """
    return _with_big_as_inputs(model)[0] if is_large(model) else copy.deepcopy(model)


def _with_big_as_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The light copy of a large model with each big initializer declared as a typed, shaped graph input.

    Returns the model and its number of real inputs (the declared ones follow them).
    """
    light, big = split_large(model)
    real = len(light.graph.input)
    listed = {i.name for i in light.graph.input}  # IR < 4 lists initializers as inputs too
    light.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big if t.name not in listed
    )
    return light, real


def check_model(model: onnx.ModelProto, *, where: str = "model") -> None:
    """Run ``onnx.checker`` with full check (shape inference included); raise ModelLoadError.

    A model too large to serialise is checked without its big initializers, each declared as a graph
    input of its type and shape instead (:func:`split_large`).
    """
    try:
        if is_large(model):
            model = _with_big_as_inputs(model)[0]
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ModelLoadError(f"{where} fails onnx.checker: {_first_line(exc)}") from None


def infer_shapes(model: onnx.ModelProto, *, weights: bool = True) -> onnx.ModelProto:
    """Return a copy with inferred value_info; the model unchanged when inference cannot run.

    A model too large to serialise is inferred without its big initializers (declared as graph inputs
    of their type and shape, :func:`split_large`), which are then put back in their order; with
    ``weights=False`` they are left out (for callers that only read types and shapes: no copy of the
    weights).
    """
    if not is_large(model):
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except (onnx.shape_inference.InferenceError, ValueError) as exc:
            log.debug("shape inference failed: %s", exc)
            return copy.deepcopy(model)
    light, real = _with_big_as_inputs(model)
    try:
        out = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        log.debug("shape inference failed: %s", exc)
        out = light
    del out.graph.input[real:]
    if weights:
        del out.graph.initializer[:]
        out.graph.initializer.extend(model.graph.initializer)
    return out


def infer_shapes_thoroughly(model: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`infer_shapes`, or onnxruntime's symbolic shape inference where that knows more.

    onnx's inference (even with data propagation) gives no shape past a ``Reshape`` whose target is
    computed from ``Shape`` dims at opset < 17 (``Unsqueeze`` with axes as an input): TorchScript
    exports of transformers lose every shape from their first such Reshape on. onnxruntime's
    ``SymbolicShapeInference`` (shipped with onnxruntime, in memory, no files) follows those with
    symbolic dims. Its result is used when it shapes more node outputs; any failure keeps onnx's.
    """
    base = infer_shapes(model)
    if is_large(model):
        return base
    symbolic, complete = symbolic_shape_inference(model)
    if symbolic is None or not complete or _shaped_outputs(symbolic) <= _shaped_outputs(base):
        return base
    return symbolic


def symbolic_shape_inference(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, bool]:
    """Run onnxruntime's ``SymbolicShapeInference`` on a copy of ``model`` in memory: (inferred model, complete?).

    Its public ``infer_shapes`` saves ``sym_shape_infer_temp.onnx`` and an external-data file into the
    current folder whenever some shape stays unknown (onnxruntime 1.32; seen beside a user's model after
    ``optimize`` on an LSTM export) and then raises; so its four steps are driven here, which keeps the
    partial result too. ``(None, False)`` when onnxruntime is missing, its API changed, or inference fails.
    """
    try:
        module = _symbolic_shape_infer()
        SymbolicShapeInference, get_opset = module.SymbolicShapeInference, module.get_opset  # noqa: N806

        opset = get_opset(model)
        if not opset or opset < 7:
            return None, False
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess rank, verbose
        inference._preprocess(model)  # it copies the model first (out_mp_), so no copy of ours
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_, bool(complete)
    except Exception as exc:  # noqa: BLE001 -- a best-effort second opinion; onnx's shapes stand
        log.debug("symbolic shape inference failed: %s", exc)
        return None, False


def _symbolic_shape_infer() -> Any:
    """The module ``onnxruntime/tools/symbolic_shape_infer.py``, loaded without the ``onnxruntime.tools`` package.

    That package's ``__init__`` imports torch whenever torch is installed (for an export helper we do not use):
    1.4 s of a 5 s ``onnxpress quantize`` of the reference ResNet went to it. The module itself imports only
    onnx, numpy, sympy and packaging, so its file is loaded on its own (once; under a private name).
    """
    if "onnxruntime.tools.symbolic_shape_infer" in sys.modules:  # imported the usual way already: the same code
        return sys.modules["onnxruntime.tools.symbolic_shape_infer"]
    name = "onnxpress._ort_symbolic_shape_infer"
    if name not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        path = Path(spec.origin).parent / "tools" / "symbolic_shape_infer.py" if spec and spec.origin else None
        if path is None or not path.is_file():
            from onnxruntime.tools import symbolic_shape_infer  # a layout we do not know: the usual import

            return symbolic_shape_infer
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _shaped_outputs(model: onnx.ModelProto) -> int:
    """How many node outputs have a known rank in ``model``'s value_info (or as graph outputs)."""
    ranked = {vi.name for vi in [*model.graph.value_info, *model.graph.output]
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    return sum(1 for n in model.graph.node for o in n.output if o in ranked)


def subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The graphs an attribute holds (an If branch, a Loop/Scan body), else ``[]``."""
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def names_read(g: onnx.GraphProto) -> set[str]:
    """Every name a node of ``g`` or of its subgraphs reads (a body's reads of the outer scope among them)."""
    return {name for sub in _graphs(g) for node in sub.node for name in node.input}


QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",  # ai.onnx
    "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",  # com.microsoft
    "MatMulIntegerToFloat", "QGemm", "QAttention", "QEmbedLayerNormalization",
})
"""Ops that only a quantized model holds (with every ``QLinear*`` op): see :func:`refuse_quantized`."""


def quantized_ops(model: onnx.ModelProto) -> collections.Counter[str]:
    """How many nodes of each quantized op type (:data:`QUANTIZED_OPS`, ``QLinear*``) the model holds, subgraphs too."""
    return collections.Counter(n.op_type for g in _graphs(model.graph) for n in g.node
                               if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear"))


def refuse_quantized(model: onnx.ModelProto, command: str) -> None:
    """Raise when ``model`` is already quantized: ``command`` (quantize, prune, ...) starts from a float model.

    Run on a QDQ model, quantize would calibrate the dequantized values and quantize them a second time
    (an onnxruntime-quantized export came out 1.6x slower), and pruning and low-rank see no constant weight
    behind a DequantizeLinear. onnxruntime's quantizer gives no such warning.

    Raises:
        UnsupportedModelError: names the quantized ops found and what to run instead.
    """
    found = quantized_ops(model)
    if found:
        ops = ", ".join(f"{n} x {op}" for op, n in found.most_common())
        raise UnsupportedModelError(
            f"the model is already quantized ({ops}); onnxpress {command} starts from a float model: run it on "
            "the float model this one was made from (onnxpress validate compares the two; onnxpress finetune "
            "trains a quantized model further)"
        )


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default (``ai.onnx``) domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UnsupportedModelError("model imports no ai.onnx opset")


def normalize_model(model: onnx.ModelProto, *, min_opset: int | None = 13, in_place: bool = False,
                    name_nodes: bool = True) -> onnx.ModelProto:
    """Return a normalised copy: Constant-node weights as initializers, opset >= ``min_opset``, nodes named.

    ``in_place``: normalise ``model`` itself (a caller's private working copy; spares a copy of the
    weights, 2.3 s and 2.4 GB on a 2.4 GB model). A model too large to serialise is upgraded without
    its big initializers (:func:`split_large`), which are put back afterwards. ``name_nodes``: name unnamed
    nodes after their first output (off where a graph is written back as it came: the fine-tune bridge).

    Raises:
        UnsupportedModelError: the opset cannot be upgraded (names the versions and the reason).
    """
    model = model if in_place else copy.deepcopy(model)
    _constants_to_initializers(model.graph)
    has_default_domain = any(imp.domain in ("", "ai.onnx") for imp in model.opset_import)
    if min_opset is not None and has_default_domain:
        current = default_opset(model)
        if current < min_opset:
            if current < 13 <= min_opset:
                _hardmax_on_rows(model)
            try:
                upgraded = _convert_version(model, min_opset)
            except Exception as exc:  # the converter raises bare RuntimeError/IndexError on failure
                raise UnsupportedModelError(
                    f"cannot upgrade the model from opset {current} to {min_opset} "
                    f"({_first_line(exc)}); re-export it with opset >= {min_opset}"
                ) from None
            for a, b in zip(model.graph.output, upgraded.graph.output, strict=False):
                if (a.name == b.name and a.type.HasField("tensor_type") and not a.type.tensor_type.HasField("shape")
                        and a.type.tensor_type.elem_type == b.type.tensor_type.elem_type):
                    b.type.CopyFrom(a.type)  # the converter's shape inference filled in an undeclared shape
            changed = _signature_change(model, upgraded)
            if changed:
                raise UnsupportedModelError(
                    f"upgrading the model from opset {current} to {min_opset} would change its interface "
                    f"({changed}); re-export it with opset >= {min_opset}"
                )
            if current < 11 and min_opset >= 11:
                _resize_as_before(upgraded, current, min_opset,
                                  from_resize=any(n.op_type == "Resize" for g in _graphs(model.graph) for n in g.node))
            log.info("upgraded opset %d -> %d", current, min_opset)
            model = upgraded
            _constants_to_initializers(model.graph)
    _initializers_off_inputs(model)  # after the version converter, which wants IR 3's listed
    if name_nodes:
        _name_unnamed_nodes(model.graph)
    # IR 3 requires every initializer among the inputs; the opset in use may need a newer IR too (13: IR 7)
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, 4, needed)
    return model


def _name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    """Name each unnamed node of ``graph`` after its first output (in place; unique among the node names).

    Layers are keyed ``node.name or node.output[0]`` (sensitivity, the search, recipes), and ``exclude`` matches
    node names: an unnamed Conv keyed by its output ``a`` was excluded by a recipe that quantize then refused
    ("exclude ['a'] matches no node"). Named after that key, the two agree.
    """
    taken = {n.name for n in graph.node if n.name}
    for node in graph.node:
        if node.name:
            continue
        base = next((o for o in node.output if o), "") or node.op_type
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)


def _initializers_off_inputs(model: onnx.ModelProto) -> None:
    """Take initializers off the graph's inputs (in place): the passes treat them as constant weights.

    IR 3 (opset <= 8 exporters, torch's ``keep_initializers_as_inputs``) lists every initializer as an input;
    IR >= 4 allows it to mark a weight a caller may override. graphsurgeon dropped them from the inputs of every
    model a pass wrote, and an IR-3 model then failed the checker ("in initializer but not in graph input"). They
    leave the inputs here, once, with a warning where the model marks them overridable (IR >= 4).
    """
    inits = {i.name for i in model.graph.initializer}
    listed = [vi.name for vi in model.graph.input if vi.name in inits]
    if not listed:
        return
    if model.ir_version >= 4:
        log.warning("%d initializer(s) are also graph inputs (%s%s): onnxpress treats them as constant weights, and "
                    "the models it writes do not take them as inputs", len(listed), ", ".join(listed[:3]),
                    ", ..." if len(listed) > 3 else "")
    keep = [vi for vi in model.graph.input if vi.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def _graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``g`` and every graph nested in its nodes' attributes (If branches, Loop/Scan bodies)."""
    out = [g]
    for node in g.node:
        for attr in node.attribute:
            for sub in subgraphs(attr):
                out.extend(_graphs(sub))
    return out


def _hardmax_on_rows(model: onnx.ModelProto) -> None:
    """Rewrite each Hardmax of opset < 13 as Flatten -> Hardmax(axis=1) -> Reshape (in place, exact).

    Before opset 13, Hardmax(axis=a) took the arg-max over all axes from ``a`` on (the input coerced to 2-D);
    from 13 on, over axis ``a`` alone. onnx's version converter wraps Softmax and LogSoftmax to keep their
    meaning but only renumbers Hardmax: [2, 3, 4] with axis 1 gave a different one-hot (measured on
    onnxruntime). On the 2-D Flatten output both meanings agree, so the upgrade keeps this form exact.
    """
    for g in _graphs(model.graph):
        nodes = []
        for node in g.node:
            axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            if node.op_type != "Hardmax" or node.domain not in ("", "ai.onnx") or axis == -1:
                nodes.append(node)
                continue
            x, y = node.input[0], node.output[0]
            base = node.name or y
            flat, shape, out = f"{base}__rows", f"{base}__shape", f"{base}__row_hardmax"
            nodes += [
                onnx.helper.make_node("Flatten", [x], [flat], axis=axis, name=f"{base}__flatten"),
                onnx.helper.make_node("Hardmax", [flat], [out], axis=1, name=node.name),
                onnx.helper.make_node("Shape", [x], [shape], name=f"{base}__shape_of_input"),
                onnx.helper.make_node("Reshape", [out, shape], [y], name=f"{base}__reshape"),
            ]
        del g.node[:]
        g.node.extend(nodes)


def nearest_mode_before_opset11(scales: Iterable[float]) -> str | None:
    """How nearest Resize-10 / Upsample rounded on onnxruntime (``upsamplebase.h``; the ONNX spec is silent).

    ``"floor"`` when every scale is >= 1, ``"ceil"`` when every one is <= 1, None for a mix: no nearest mode
    of opset 11 or later rounds like that.
    """
    values = np.asarray(scales, dtype=np.float64)
    if (values >= 1).all():
        return "floor"
    if (values <= 1).all():
        return "ceil"
    return None


def _resize_as_before(upgraded: onnx.ModelProto, current: int, target: int, *, from_resize: bool) -> None:
    """Give the Resize nodes made from Upsample-7/9 and Resize-10 the sampling grid they had (in place).

    Before opset 11 the grid was always "asymmetric" (``x_in = x_out / scale``), and nearest rounded down when
    scaling up and up when scaling down (onnxruntime's ``upsamplebase.h``; the ONNX spec is silent). onnx's
    version converter leaves Resize-11's defaults, half_pixel and round_prefer_floor: a U-Net exported at opset
    9 or 10 with a bilinear upsample came out of the upgrade up to 0.67 off (outputs of magnitude 1.4), and
    quantized at 7.9 dB against 28.4 at opset 11. Measured on onnxruntime, "asymmetric" reproduces every linear
    case, and with nearest_mode floor (all scales >= 1) or ceil (all <= 1) every nearest one; a nearest Resize
    that scales up along one axis and down along another has no Resize-11 equivalent.

    Raises:
        UnsupportedModelError: such a nearest Resize, or one whose scales are computed (Resize-10 only:
            Upsample's are >= 1 by its spec).
    """
    for g in _graphs(upgraded.graph):
        consts = {t.name: t for t in g.initializer}
        consts.update({n.output[0]: a.t for n in g.node if n.op_type == "Constant"
                       for a in n.attribute if a.name == "value"})
        for node in g.node:
            if node.op_type != "Resize":
                continue
            attrs = {a.name: a for a in node.attribute}
            mode = onnx.helper.get_attribute_value(attrs["mode"]) if "mode" in attrs else b"nearest"
            settings = {"coordinate_transformation_mode": "asymmetric"}
            if mode == b"nearest":
                name = node.input[2] if len(node.input) > 2 else ""
                scales = numpy_helper.to_array(consts[name]) if name in consts else None
                rounding = nearest_mode_before_opset11(scales) if scales is not None else None
                if scales is None and not from_resize:
                    settings["nearest_mode"] = "floor"  # only Upsample made these: its scales are >= 1
                elif rounding is not None:
                    settings["nearest_mode"] = rounding
                else:
                    why = "computed scales" if scales is None else f"scales {scales.tolist()}"
                    raise UnsupportedModelError(
                        f"cannot upgrade the model from opset {current} to {target} exactly: nearest Resize "
                        f"{node.name or node.output[0]!r} ({why}) rounds as no Resize of opset 11 or later can; "
                        f"re-export it with opset >= {target}"
                    )
            for key, value in settings.items():
                if key in attrs:
                    node.attribute.remove(attrs[key])
                node.attribute.append(onnx.helper.make_attribute(key, value))


def _convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Run onnx's version converter; a large model's big initializers go round it (declared as inputs)."""
    if not is_large(model):
        return onnx.version_converter.convert_version(model, opset)
    light, real = _with_big_as_inputs(model)
    upgraded = onnx.version_converter.convert_version(light, opset)
    del upgraded.graph.input[real:]
    by_name = {t.name: t for t in upgraded.graph.initializer}
    before = {t.name for t in model.graph.initializer}
    added = [t for t in upgraded.graph.initializer if t.name not in before]
    order = [by_name.get(t.name, t) for t in model.graph.initializer] + added  # the big ones in their places
    del upgraded.graph.initializer[:]
    upgraded.graph.initializer.extend(order)
    return upgraded


def _signature_change(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    """Describe the first graph input/output whose name, type or shape differs ('' when none).

    onnx's version converter can change what a model means: Scan-8 (with a batch axis) becomes
    Scan-9+ (without one) and the graph's declared input ranks change with it.
    """
    for kind in ("input", "output"):
        old, new = getattr(before.graph, kind), getattr(after.graph, kind)
        if [v.name for v in old] != [v.name for v in new]:
            return f"graph {kind} names {[v.name for v in old]} -> {[v.name for v in new]}"
        for a, b in zip(old, new, strict=True):
            if a.type.SerializeToString(deterministic=True) != b.type.SerializeToString(deterministic=True):
                return f"graph {kind} {a.name!r}: {_type_str(a.type)} -> {_type_str(b.type)}"
    return ""


def _type_str(t: onnx.TypeProto) -> str:
    if not t.HasField("tensor_type"):
        return t.WhichOneof("value") or "?"
    elem = onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type).name if t.tensor_type.elem_type else "?"
    if not t.tensor_type.HasField("shape"):
        return elem
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.tensor_type.shape.dim]
    return f"{elem}[{','.join(dims)}]"


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Turn main-graph ``Constant`` nodes that hold tensors into initializers; return how many."""
    keep, moved = [], 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            tensor = None
            if attr.name == "value":
                tensor = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                import numpy as np

                value = onnx.helper.get_attribute_value(attr)
                dtype = np.float32 if "float" in attr.name else np.int64
                tensor = np.asarray(value, dtype=dtype)
            if tensor is not None:
                init = numpy_helper.from_array(tensor, node.output[0])
                graph.initializer.append(init)
                moved += 1
                continue
        keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def model_digest(model: onnx.ModelProto) -> str:
    """A stable hex digest of the model's serialised bytes (for caches).

    A model too large to serialise is hashed without its big initializers, whose bytes are hashed one by one.
    """
    h = hashlib.sha256()
    h.update((split_large(model)[0] if is_large(model) else model).SerializeToString(deterministic=True))
    for init in model.graph.initializer:
        h.update(init.name.encode())
        h.update(init.raw_data)
    return h.hexdigest()[:16]


def check_output_path(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | object] = (),
    example: str = "model.onnx",
) -> Path:
    """Check that ``output`` can be written and is none of ``inputs``; return it as a Path.

    ``example`` is the file name the error for a folder suggests (``table.npz`` for a calibration table).

    Raises:
        OutputError: the folder is missing or not writable, the path is a folder, or it equals an input.
    """
    out = Path(output)
    if len(out.name.encode()) > _NAME_MAX:  # Path.exists() raised "File name too long" from deep inside
        raise OutputError(f"output file name {out.name[:40]}... is {len(out.name.encode())} bytes long; file systems "
                          f"take at most {_NAME_MAX}: use a shorter name")
    if out.is_dir() or not out.name:  # first: "." or "/" has no name to put ".data" beside
        raise OutputError(f"output path {out} is a folder; give a file name such as {out / example}")
    if out.exists() and not out.is_file():  # renaming the result over /dev/null or a FIFO replaced the device
        raise OutputError(f"output path {out} is not a regular file (a device, pipe or socket); the result is "
                          "written to a scratch file and renamed into place: give a file path")
    # what writing would replace: the output, and the <output>.data a large model's weights go to (save_model);
    # only existing files can be an input's (its external weights read only then, without the weights)
    data = out.with_name(out.name + ".data")
    existing = {t.resolve(): t for t in (out, data) if len(t.name.encode()) <= _NAME_MAX and t.exists()}
    for k, src in enumerate(inputs):
        if not existing or not isinstance(src, (str, os.PathLike)) or not Path(src).is_file():
            continue
        for i, path in enumerate([Path(src), *_external_files(Path(src))]):
            target = existing.get(path.resolve())
            if target is None:
                continue
            if i:
                raise OutputError(f"output path {out} would overwrite {path.name}, the external weights of "
                                  f"the input model {src}; write the result to another path")
            # the first input is the model the command works on; a later .onnx is another one it reads (a teacher)
            what = ("an input file (it would be overwritten)" if path.suffix != ".onnx" else "the input model"
                    if k == 0 else f"an input model ({path.name}, which the command reads)")
            raise OutputError(f"output path {out} {'is' if target == out else 'writes'} {what}"
                              f"{'' if target == out else f' ({target.name})'}; write the result to another path")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: no permission to write in {parent}")
    return out


_NAME_MAX = 255  # bytes in one path component on Linux file systems (ext4, xfs, tmpfs), and on macOS


def _external_files(path: Path) -> list[Path]:
    """The external-data files an ``.onnx`` file's tensors point to (read without its weights); [] for others."""
    if path.suffix.lower() != ".onnx":
        return []
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: loading it later says why
        return []
    found = {
        onnx.external_data_helper.ExternalDataInfo(t).location
        for t in onnx.external_data_helper._get_all_tensors(proto)
        if onnx.external_data_helper.uses_external_data(t)
    }
    return [path.parent / loc for loc in sorted(found) if loc]


def move_into_place(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Rename the finished scratch file ``tmp`` over ``out``, with the mode a plain ``open`` would give.

    ``tempfile.mkstemp`` creates files readable by their owner only (0600); an output renamed from
    one would keep that, so a table or report written for other users or workers could not be read.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """``write(temp path)`` into a scratch file beside ``path`` (same suffix), then rename it over ``path``.

    An interrupted or failed write leaves neither a truncated ``path`` nor the scratch file (a report's PNG cut
    by Ctrl-C was 124 bytes of an 81 KB image). The caller checks ``path`` first (:func:`check_output_path`).

    Raises:
        OSError: from ``write`` or the rename (the scratch file is removed).
    """
    out = Path(path)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".onnxpress-", suffix=out.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        move_into_place(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    verify: bool = True,
) -> Path:
    """Write ``model`` atomically, checked by ``onnx.checker`` and loaded in onnxruntime first.

    Args:
        model: the model; it is not modified.
        path: destination file. With external data the tensors go to ``<name>.data`` beside it.
        external_data: force (True) or forbid (False) external data; by default it is used only
            when the model would exceed protobuf's 2 GiB limit.
        verify: load the written model in onnxruntime before moving it into place.

    Raises:
        OutputError: the destination cannot be written.
        ModelLoadError / UnsupportedModelError: the model fails the checker or does not load.
    """
    out = check_output_path(path)
    if external_data is None:
        external_data = is_large(model)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".onnxpress-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror}") from None
    try:
        tmp_model = scratch / out.name
        data_name = out.name + ".data"
        to_write = copy.deepcopy(model)
        if external_data:
            onnx.save_model(
                to_write,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.external_data_helper.convert_model_from_external_data(to_write)
            onnx.save_model(to_write, str(tmp_model))
        try:
            onnx.checker.check_model(str(tmp_model), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ModelLoadError(f"refusing to write {out}: result fails onnx.checker: {_first_line(exc)}") from None
        if verify:
            from onnxpress.runtime import make_session

            make_session(str(tmp_model), what=f"result for {out}")
        if external_data and (scratch / data_name).exists():  # absent when every tensor is under the threshold
            os.replace(scratch / data_name, out.parent / data_name)
        os.replace(tmp_model, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("wrote %s", out)
    _warn_stale_scratch(out.parent)
    return out


STALE_SCRATCH_SECONDS = 3600  # older scratch entries are not a run still writing


def _warn_stale_scratch(folder: Path) -> None:
    """Warn about ``.onnxpress-*`` scratch entries an hour old or more in ``folder``.

    A run killed with SIGKILL (or a machine that went down) cannot remove its scratch. They are only named, never
    removed: another run may share the folder, and a user's file is not ours to delete on a guess.
    """
    now = time.time()

    def touched(entry: Path) -> float:  # a folder's own time stays put while a file inside it grows
        inside = [c.lstat().st_mtime for c in entry.iterdir()] if entry.is_dir() and not entry.is_symlink() else []
        return max([entry.lstat().st_mtime, *inside])

    try:
        stale = sorted(p.name for p in folder.glob(".onnxpress-*") if now - touched(p) >= STALE_SCRATCH_SECONDS)
    except OSError:
        return
    if stale:
        log.warning("%s holds %d scratch entr%s an hour old or more, left by an interrupted onnxpress run (%s%s): "
                    "unless another run is writing there, delete %s", folder, len(stale),
                    "y" if len(stale) == 1 else "ies", ", ".join(stale[:3]), " ..." if len(stale) > 3 else "",
                    "it" if len(stale) == 1 else "them")


def _approx_size(model: onnx.ModelProto) -> int:
    """Bytes of initializer data plus a margin; cheap, and safe to call on >2 GiB models."""
    return sum(_tensor_bytes(init) for init in model.graph.initializer) + 1_000_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300] + external_small_tensors_hint(text)


EXTERNAL_SMALL_TENSORS = "Cannot parse data from external tensors"
"""What onnx's shape inference and onnxruntime say of a shape input (Reshape's shape, ReduceMean's axes) kept in
external data: a legal file (``onnx.save(..., size_threshold=0)``) that neither reads."""


def external_small_tensors_hint(text: str) -> str:
    """What to do when ``text`` is the complaint about small tensors in external data, else ""."""
    if EXTERNAL_SMALL_TENSORS not in text:
        return ""
    return ("; the model keeps small tensors (shapes, axes) in its external data file, which onnx's checker and "
            "onnxruntime cannot read there: onnxpress cleanup MODEL -o FIXED.onnx writes them into the model")
