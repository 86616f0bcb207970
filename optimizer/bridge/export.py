"""torch → ONNX: export a fine-tuned :class:`OnnxModule`, clean it up, validate it on onnxruntime.

The rewrite is again the identity on values, ``export(M)(x) == M(x)`` within 1e-4 (checked on
onnxruntime with graph optimisations off, else :class:`ValidationError`)::

    OnnxModule (params "params.<key>")  ── torch.onnx.export(dynamo=True) ──▶  ONNX (opset 20)
        ── rename initializers back to the original ONNX names
        ── cleanup passes (fold constants, fold BatchNormalization)
        ── validate against the module on onnxruntime (max |Δ| ≤ 1e-4)

Which exporter and why: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), the default
since torch 2.9. The TorchScript exporter still works but warns that it is deprecated; dynamo keeps
readable weight names (we map them back to the original initializer names) and gives fewer nodes.
The interpreter is traceable by ``torch.export`` because shapes and axes are host values. Dynamic
dimensions of the original graph inputs (``dim_param`` or unknown) stay dynamic via
``torch.export.Dim``; ``external_data=False`` keeps one self-contained model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch

from onnxpress.bridge.convert import OnnxModule
from onnxpress.errors import UnsupportedModelError, ValidationError
from onnxpress.model_io import normalize_model
from onnxpress.pipeline import cleanup_passes, run_passes
from onnxpress.prune import sqnr_db
from onnxpress.runtime import make_session

__all__ = ["export_module", "max_abs_diff", "validate_against_module"]

log = logging.getLogger(__name__)


def _dynamic_shapes(like: onnx.ModelProto, names: Sequence[str]) -> tuple[tuple[dict[int, object], ...]]:
    """One ``{axis: Dim}`` per input for every dim the original model leaves symbolic."""
    dims: dict[str, object] = {}
    by_name = {i.name: i for i in like.graph.input}
    per_input: list[dict[int, object]] = []
    for name in names:
        spec: dict[int, object] = {}
        shape = by_name[name].type.tensor_type.shape
        for axis, dim in enumerate(shape.dim):
            if dim.HasField("dim_value"):
                continue
            key = dim.dim_param or f"{name}_dim{axis}"
            safe = "".join(c if c.isalnum() else "_" for c in key)
            if safe not in dims:
                dims[safe] = torch.export.Dim(safe if safe[0].isalpha() else f"d_{safe}")
            spec[axis] = dims[safe]
        per_input.append(spec)
    return (tuple(per_input),)  # forward(*inputs): one tuple for the var-positional argument


def export_module(
    module: OnnxModule,
    like: onnx.ModelProto,
    example: Sequence[np.ndarray],
    *,
    exporter: str = "dynamo",
    cleanup: bool = True,
) -> onnx.ModelProto:
    """Export ``module`` to ONNX with the input/output names and dynamic dims of ``like``.

    Args:
        module: the (fine-tuned) module.
        like: the model ``module`` was built from (names, dynamic dims, metadata).
        example: one array per input (``module.input_names`` order); ≥ 2 samples so that a dynamic
            batch is not specialised to 1.
        exporter: ``"dynamo"`` (default) or ``"torchscript"`` (deprecated by torch; a fallback).
        cleanup: run the cleanup passes on the export.

    Raises:
        UnsupportedModelError: torch cannot export the module (first line of torch's message).
    """
    module = module.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    kwargs: dict[str, object] = {
        "input_names": list(module.input_names),
        "output_names": list(module.output_names),
        "external_data": False,
    }
    if exporter == "dynamo":
        # torch.onnx (dynamo) names a graph output after output_names without checking that its own value
        # names are free: a re-export of a dynamo model whose output is "view_2" produced two "view_2"
        # values (a cycle; pytorch/pytorch#158094, #168211, still in torch 2.13). Export under names no
        # generated value can take and rename afterwards (_rename_outputs)
        kwargs.update(dynamo=True, dynamic_shapes=_dynamic_shapes(like, module.input_names), verbose=False,
                      output_names=[f"onnxpress.output.{i}" for i in range(len(module.output_names))])  # fmt: skip
    elif exporter == "torchscript":
        axes = {}
        for inp in like.graph.input:
            sym = [i for i, d in enumerate(inp.type.tensor_type.shape.dim) if not d.HasField("dim_value")]
            if inp.name in module.input_names and sym:
                axes[inp.name] = sym
        kwargs.update(dynamo=False, dynamic_axes=axes, opset_version=17)
    else:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', not {exporter!r}")
    torch_onnx_log = logging.getLogger("torch.onnx")
    old_level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _stderr_to_log(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                program = torch.onnx.export(module, args, **kwargs)
                proto = program.model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(module, args, buffer, **kwargs)
                proto = onnx.load_from_string(buffer.getvalue())
    except Exception as exc:  # torch raises many exporter-internal types
        raise UnsupportedModelError(f"torch.onnx.export ({exporter}) failed: {_torch_reason(exc)}") from None
    finally:
        torch_onnx_log.setLevel(old_level)
    if exporter == "dynamo":
        _rename_outputs(proto, dict(zip(kwargs["output_names"], module.output_names, strict=True)))
    _restore_names(proto, module)
    _drop_trace_metadata(proto)
    proto = normalize_model(proto, min_opset=None, name_nodes=False)
    if cleanup:
        proto = run_passes(proto, cleanup_passes()).model
    proto.producer_name = "onnxpress.finetune"
    return proto


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """File descriptor 2 into an unlinked temporary file for the block, then into the debug log.

    torch's TorchScript exporter writes its IR graph and diagnostics to the process's stderr from C++,
    past ``sys.stderr``: a failed export printed a page of IR before our one-line error. The text is
    kept at debug level (``-vv`` shows it); the temporary file lives in the system's temp folder.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (an embedded interpreter): nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("torch.onnx.export wrote to stderr:\n%s", text)


def _torch_reason(exc: BaseException, limit: int = 300) -> str:
    """torch.onnx's first message line without colour codes, plus the line its "Exception summary" starts with."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    reason = lines[0]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1 :]
        if after:
            reason += " " + after[0]
    return reason[:limit]


def _rename_outputs(proto: onnx.ModelProto, names: Mapping[str, str]) -> None:
    """Give the graph outputs their wanted names (in place), first moving any value that holds one aside."""
    graph = proto.graph
    values = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {
        i.name for i in graph.initializer}  # fmt: skip
    aside: dict[str, str] = {}
    for wanted in names.values():
        if wanted in values and wanted not in names:
            k = 1
            while f"{wanted}.{k}" in values:
                k += 1
            aside[wanted] = f"{wanted}.{k}"
            values.add(aside[wanted])
    rename = {**aside, **names}
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in seq:
            item.name = rename.get(item.name, item.name)


def _drop_trace_metadata(proto: onnx.ModelProto) -> None:
    """Remove the trace of the export from every node.

    The dynamo exporter records each node's Python stack, FX node and name scope (``pkg.torch.onnx.*``,
    ``namespace``), which here name the interpreter's own frames and file paths, not the user's model: 27.5 of
    the 38 KB a re-exported 0.2 MB EfficientNet-style CNN gained.
    """
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if not (p.key.startswith("pkg.torch.") or p.key == "namespace")]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _restore_names(proto: onnx.ModelProto, module: OnnxModule) -> None:
    """Rename exported initializers ``params.<key>`` back to the original ONNX names."""
    back = {f"params.{key}": name for name, key in module.param_names.items()}
    back.update({key: name for name, key in module._buffer_names.items()})
    taken = {i.name for i in proto.graph.initializer}
    produced = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    rename = {old: new for old, new in back.items() if old in taken and new not in produced and new not in taken}
    if not rename:
        return
    for init in proto.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for vi in proto.graph.value_info:
        vi.name = rename.get(vi.name, vi.name)


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest absolute elementwise difference over paired outputs."""
    diffs = [np.abs(x.astype(np.float64) - y.astype(np.float64)) for x, y in zip(a, b, strict=True)]
    return max((float(d.max()) if d.size else 0.0 for d in diffs), default=0.0)


def _against_module(
    model: onnx.ModelProto, module: OnnxModule, feeds: Mapping[str, np.ndarray]
) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(output name, onnxruntime's value with optimisations off, the module's, SQNR in dB) per output."""
    session = make_session(model, optimization="disable", what="exported model")
    got = session.run(list(module.output_names), dict(feeds))
    with torch.no_grad():
        want = module.eval().evaluate([torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in module.input_names],
                                      module.output_names)  # fmt: skip
    return [(name, g, w.numpy(), sqnr_db(w.numpy(), g)) for name, g, w in zip(module.output_names, got, want,
                                                                                strict=True)]  # fmt: skip


def module_agreement_db(model: onnx.ModelProto, module: OnnxModule, feeds: Mapping[str, np.ndarray]) -> float:
    """The lowest output SQNR (dB) of ``model`` on onnxruntime (optimisations off) against ``module``."""
    return min(sqnr for *_, sqnr in _against_module(model, module, feeds))


def validate_against_module(
    model: onnx.ModelProto,
    module: OnnxModule,
    feeds: Mapping[str, np.ndarray],
    *,
    atol: float = 1e-4,
    min_sqnr_db: float | None = None,
) -> float:
    """Run ``model`` on onnxruntime (optimisations off) and ``module`` on ``feeds``; return max |Δ|.

    Args:
        model: the exported model.
        module: the module it was exported from.
        feeds: inputs by name.
        atol: largest allowed difference (float exports), relative to the outputs' scale: ``atol·max(1, max|y|)``
            (float32 rounds logits near 1000 to 1.2e-4 steps, so an absolute bound refused a correct export).
        min_sqnr_db: instead of ``atol``, the smallest allowed ``10·log10(Σy² / Σ(y − ŷ)²)``. Used for
            quantized exports: a ~1e-7 float difference upstream of a QuantizeLinear (torch and
            onnxruntime convolutions round differently) flips a value sitting on a rounding boundary
            by one step, so equality within ``atol`` is not a property such a model can have.

    Raises:
        ValidationError: an output is further off than allowed (names it and by how much), or the module's own
            outputs are not finite (training diverged).
    """
    worst = 0.0
    for name, g, w, sqnr in _against_module(model, module, feeds):
        scale = float(np.max(np.abs(w))) if np.size(w) else 0.0
        if not math.isfinite(scale):  # not an export problem: the trained weights are
            raise ValidationError(f"the fine-tuned module's output {name!r} holds NaN or inf: training diverged; "
                                  "lower the learning rate (lr=, --lr)")
        diff = max_abs_diff([g], [w])
        worst = max(worst, diff)
        if min_sqnr_db is not None:
            if not sqnr >= min_sqnr_db:
                raise ValidationError(
                    f"exported output {name!r} matches the fine-tuned module at only {sqnr:.1f} dB SQNR "
                    f"(< {min_sqnr_db:g} dB, max |diff| {diff:.3g}); report the model"
                )
        elif not diff <= atol * max(1.0, scale):
            raise ValidationError(
                f"exported output {name!r} differs from the fine-tuned module by {diff:.3g} (> {atol:g} x "
                f"{max(1.0, scale):.3g}, its scale); try another exporter (exporter= / --exporter torchscript or "
                "writeback), or report the model"
            )
    return worst
