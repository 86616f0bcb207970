"""Validate a candidate model against its reference on onnxruntime: errors, agreement, latency, size.

Both models run on the same feeds (onnxruntime CPU, default graph optimisations, thread spinning
off). For every reference output ``r`` and the candidate's output of the same name ``c``, summed
over all samples in float64:

    max abs error = max |r - c|
    SQNR (dB)     = 10 log10( Σ r² / Σ (r - c)² )        (+inf when c == r everywhere)
    cosine        = Σ r·c / sqrt(Σ r² · Σ c²)             (over the whole flattened output)

A classifier output (2-D, at least 2 columns) also gets top-1 agreement, the share of samples with
argmax r == argmax c, and with labels each model's accuracy. Latency is measured on the first batch
of the data: warm-up runs first (not timed), then ``repeats`` timed runs per model, the two
sessions alternating (ref, cand), (cand, ref), ... so that noise from other processes hits both;
median and p90 of each and the ratio candidate / reference are reported.

    reference.onnx ─┐                           ┌─ per output: max|r-c|, SQNR, cosine, top-1, acc
                    ├─ same batches from data ──┤
    candidate.onnx ─┘                           └─ latency (alternating), file size, op histogram
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxpress.calibration.readers import (
    DataSource,
    load_labels,
    model_inputs,
    npz_files,
    open_data,
    sample_axes,
    sample_axis_hint,
    samples_in,
)
from onnxpress.errors import DataError, OutputError, ValidationError
from onnxpress.model_io import ModelSource, check_output_path, load_model, model_bytes, move_into_place
from onnxpress.reporting import format_table, op_histogram
from onnxpress.runtime import make_session, quiet_run_options, time_interleaved

__all__ = ["LatencyStats", "OutputComparison", "TensorComparison", "ValidationReport", "model_size", "validate"]

log = logging.getLogger(__name__)

_WARMUP = 3
_PROTO = "<ModelProto>"


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """How one candidate output compares with the reference output of the same name.

    Attributes:
        name: the output name.
        max_abs_error: max |ref - cand| over every element of every sample.
        sqnr_db: 10·log10(Σref² / Σ(ref-cand)²); +inf when identical.
        cosine: Σref·cand / sqrt(Σref²·Σcand²) over the flattened output (1.0 when both are all zero).
        top1_agreement: share of samples whose argmax agrees (classifier outputs only).
        reference_accuracy: reference top-1 accuracy against the labels (classifier outputs with labels).
        candidate_accuracy: candidate top-1 accuracy against the labels.
        nonfinite: candidate values that are NaN or infinite where the reference's are finite (then
            ``max_abs_error`` is NaN or inf and ``sqnr_db`` -inf: such a candidate fails every threshold).
    """

    name: str
    max_abs_error: float
    sqnr_db: float
    cosine: float
    top1_agreement: float | None = None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    nonfinite: int = 0


@dataclasses.dataclass(frozen=True)
class TensorComparison:
    """One intermediate tensor present in both models (``validate(layers=True)``).

    Attributes:
        name: the tensor's name (the same in both graphs).
        op: the op type that produces it in the reference.
        sqnr_db: SQNR of the candidate's values against the reference's.
        added_db: the SQNR of the noise this node adds: ``-10 log10(n - max n_in)``, where ``n`` is this
            tensor's noise-to-signal power ratio and ``n_in`` its compared inputs' (0 for graph inputs);
            ``+inf`` when it adds none. The lowest values are where the candidate loses precision: a
            quantized layer, or an op whose output is small where its input is (Gelu and Softmax on noisy
            inputs: the same noise is a larger share of a smaller signal).
        max_abs_error: largest ``|r - c|``.

    Values that are not finite in the reference (an attention mask's -inf) are left out of the sums; a
    candidate value that is NaN or infinite where the reference's is finite counts as an infinite error.
    """

    name: str
    op: str
    sqnr_db: float
    added_db: float
    max_abs_error: float


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Latency of one model over the timed repeats, in milliseconds."""

    median_ms: float
    p90_ms: float


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    """Everything :func:`validate` measured; ``to_dict()`` is the ``--json`` record.

    Attributes:
        reference: how the reference was given (path, or "<ModelProto>").
        candidate: how the candidate was given.
        samples: samples compared.
        outputs: one comparison per reference output, in graph order.
        batch_size: the most samples one run took: the batch asked for, or fewer where the reference's batch is
            fixed or the data held fewer (also the latency batch).
        latency_batch: samples in the timed batch (0 when latency was not measured).
        threads: intra-op threads of both sessions (``None``: onnxruntime's default).
        repeats: timed runs per model.
        reference_latency: latency of the reference (``None`` when not measured).
        candidate_latency: latency of the candidate.
        latency_ratio: candidate median / reference median.
        reference_bytes: on-disk size of the reference including external data (serialized size
            for a ModelProto).
        candidate_bytes: the same for the candidate.
        size_ratio: candidate bytes / reference bytes.
        reference_ops: op type -> count in the reference's main graph.
        candidate_ops: op type -> count in the candidate's main graph.
        data: how the data was given (its path, or "<list>" etc. for in-memory data).
        layers: with ``layers=True``, every intermediate float tensor both graphs produce under the same
            name and shape, in the reference's graph order (:class:`TensorComparison`).
        layer_samples: samples the per-tensor comparison ran on.
        layers_skipped: tensors of the same name left out because their shapes differ (a pruned layer).
        max_samples: the limit asked for (``samples`` exceeds it where a fixed batch cannot be cut).
    """

    reference: str
    candidate: str
    samples: int
    outputs: tuple[OutputComparison, ...]
    batch_size: int
    latency_batch: int
    threads: int | None
    repeats: int
    reference_latency: LatencyStats | None
    candidate_latency: LatencyStats | None
    latency_ratio: float | None
    reference_bytes: int
    candidate_bytes: int
    size_ratio: float
    reference_ops: Mapping[str, int]
    candidate_ops: Mapping[str, int]
    data: str = ""
    layers: tuple[TensorComparison, ...] = ()
    layer_samples: int = 0
    layers_skipped: int = 0
    max_samples: int | None = None

    def output(self, name: str) -> OutputComparison:
        """The comparison of output ``name``."""
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"no output {name!r}; outputs are {[o.name for o in self.outputs]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe record: non-finite floats become the strings "inf", "-inf", "nan"."""
        return _json_safe(dataclasses.asdict(self))

    def to_json(self) -> str:
        """The record as indented JSON (strict: no bare NaN/Infinity)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temp file beside it, then rename).

        Raises:
            OutputError: the folder is missing or not writable, the path is a folder, or it is one of
                the two models or the data file.
        """
        text = self.to_json() + "\n"
        return self._write_atomically(path, ".json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _write_atomically(self, path: str | os.PathLike[str], suffix: str, write: Any) -> Path:
        """``write(temp path)`` into a temp file beside ``path``, then rename it over ``path``.

        Raises:
            OutputError: the folder is missing or not writable, the path is a folder, or it is one of
                the two models or the data file.
        """
        inputs = [m for m in (self.reference, self.candidate, self.data) if m and not m.startswith("<")]
        out = check_output_path(path, inputs, example="report" + suffix)
        tmp = None
        try:
            with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".onnxpress-", suffix=suffix, delete=False) as fh:
                tmp = fh.name
            write(tmp)
            move_into_place(tmp, out)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
        return out

    def format(self) -> str:
        """The printed table: per-output errors, then latency/size, then op counts."""
        threads = "default" if self.threads is None else str(self.threads)
        lines = [
            f"reference: {self.reference}",
            f"candidate: {self.candidate}",
            f"{self.samples} sample{'' if self.samples == 1 else 's'}, batch {self.batch_size}, threads {threads}"
            + (f" (over --max-samples {self.max_samples}: the reference's fixed batch of {self.batch_size} runs whole)"
               if self.max_samples is not None and self.samples > self.max_samples else ""),
        ]
        if self.reference_latency is not None:
            lines.append(
                f"latency: batch {self.latency_batch}, {self.repeats} timed runs per model after {_WARMUP} warm-up, "
                "sessions alternating, spinning off"
            )
        lines.append("")
        has_top1 = any(o.top1_agreement is not None for o in self.outputs)
        has_acc = any(o.reference_accuracy is not None for o in self.outputs)
        header = ["output", "max abs err", "SQNR dB", "cosine"]
        header += ["top-1 agree"] if has_top1 else []
        header += ["ref acc", "cand acc"] if has_acc else []
        rows = []
        for o in self.outputs:
            row = [o.name, f"{o.max_abs_error:.3g}", _fmt(o.sqnr_db, ".2f"), f"{o.cosine:.6f}"]
            row += [_fmt(o.top1_agreement, ".4f")] if has_top1 else []
            row += [_fmt(o.reference_accuracy, ".4f"), _fmt(o.candidate_accuracy, ".4f")] if has_acc else []
            rows.append(row)
        lines.append(format_table(header, rows))
        for o in self.outputs:
            if o.nonfinite:
                lines.append(f"candidate output {o.name!r} holds {o.nonfinite} NaN/inf value(s) where the reference's "
                             "are finite")
        lines.append("")
        if self.layer_samples:
            lines.extend(self._format_layers())
        rows = []
        if self.reference_latency is not None and self.candidate_latency is not None:
            rows.append([
                "latency median ms",
                f"{self.reference_latency.median_ms:.3f}",
                f"{self.candidate_latency.median_ms:.3f}",
                _fmt(self.latency_ratio, ".3f"),
            ])
            rows.append([
                "latency p90 ms",
                f"{self.reference_latency.p90_ms:.3f}",
                f"{self.candidate_latency.p90_ms:.3f}",
                _fmt(_ratio(self.candidate_latency.p90_ms, self.reference_latency.p90_ms), ".3f"),
            ])
        rows.append(["file size bytes", str(self.reference_bytes), str(self.candidate_bytes), f"{self.size_ratio:.3f}"])
        lines.append(format_table(["measure", "reference", "candidate", "cand/ref"], rows))
        lines.append("")
        ref_ops, cand_ops = self.reference_ops, self.candidate_ops
        ops = sorted(set(ref_ops) | set(cand_ops), key=lambda k: (-ref_ops.get(k, 0), -cand_ops.get(k, 0), k))
        rows = [[op, str(self.reference_ops.get(op, 0)), str(self.candidate_ops.get(op, 0))] for op in ops]
        rows.append(["total", str(sum(self.reference_ops.values())), str(sum(self.candidate_ops.values()))])
        lines.append(format_table(["op", "reference", "candidate"], rows))
        return "\n".join(lines)

    def why_no_layers(self) -> str:
        """Why a per-tensor comparison that ran compared no tensor."""
        if self.layers_skipped:
            return (f"the {self.layers_skipped} tensors both models have differ in shape (a pruned or split "
                    "candidate), so none was compared")
        return "the two models share no intermediate float tensor by name"

    def plot_layers(self, path: str | os.PathLike[str], *, marked: int = 5) -> Path:
        """Write a PNG of each compared tensor's SQNR in graph order, the ``marked`` worst adders labelled.

        Needs ``validate(layers=True)``. Written atomically (a temp file beside it, then renamed).

        Raises:
            ValidationError: the report has no per-tensor comparison.
            OutputError: the path cannot be written (or is one of the inputs).
        """
        if not self.layers and self.layer_samples:
            raise ValidationError(f"no tensor to plot: {self.why_no_layers()}")
        if not self.layers:
            raise ValidationError("no per-tensor comparison to plot: run validate with layers=True (--layers)")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cap = 100.0  # exact tensors (inf dB) drawn at the top
        x = np.arange(len(self.layers))
        sqnr = [min(t.sqnr_db, cap) for t in self.layers]
        added = [min(t.added_db, cap) for t in self.layers]
        fig, ax = plt.subplots(figsize=(max(7.0, 0.12 * len(x) + 4), 4.2))
        ax.plot(x, sqnr, "-o", ms=3, label="SQNR of the tensor (dB)")
        ax.plot(x, added, "s", ms=4, alpha=0.7, label="SQNR of the noise its node adds (dB)")
        for i, t in sorted(enumerate(self.layers), key=lambda it: it[1].added_db)[:marked]:
            ax.annotate(f"{t.name} ({t.op})", (i, min(t.added_db, cap)), fontsize=7, rotation=30,
                        xytext=(4, -14), textcoords="offset points")
        ax.set_xlabel(f"intermediate tensors in graph order ({len(x)}; exact ones drawn at {cap:g} dB)")
        ax.set_ylabel("dB (lower = more error)")
        ax.set_title(f"{Path(self.candidate).name} against {Path(self.reference).name}, "
                     f"first {self.layer_samples} samples", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        try:
            return self._write_atomically(path, ".png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
        finally:
            plt.close(fig)

    def _format_layers(self, shown: int = 10) -> list[str]:
        # a node that adds no noise (added dB +inf: a reshape of a noisy tensor) is no answer to "where": left out
        worst = sorted((t for t in self.layers if t.added_db != math.inf), key=lambda t: t.added_db)[:shown]
        skipped = f"; {self.layers_skipped} left out (shapes differ)" if self.layers_skipped else ""
        rows = [[t.name, t.op, _fmt(t.sqnr_db, ".2f"), _fmt(t.added_db, ".2f"), f"{t.max_abs_error:.3g}"]
                for t in worst]
        head = f"per tensor, first {self.layer_samples} samples: {len(self.layers)} tensors compared{skipped}"
        if not worst:
            return [head + ("; no node adds noise" if self.layers else ""), ""]
        return [
            f"{head}; the {len(worst)} that add the most noise (added: SQNR of the noise each node adds; --json "
            "lists all)",
            format_table(["tensor", "op", "SQNR dB", "added dB", "max abs err"], rows),
            "",
        ]

    def require(
        self,
        *,
        max_abs_error: float | None = None,
        min_sqnr_db: float | None = None,
        min_agreement: float | None = None,
    ) -> None:
        """Raise when an output is further off than allowed (for scripts and CI gates).

        Raises:
            ValidationError: names the first output that fails and by how much; ``min_agreement`` where no
                output is a classifier's (it would hold for any candidate).
        """
        if min_agreement is not None and all(o.top1_agreement is None for o in self.outputs):
            names = ", ".join(repr(o.name) for o in self.outputs)
            raise ValidationError(
                f"no output is a classifier's ([batch, classes]: {names}), so top-1 agreement is not measured: drop "
                "min_agreement (--min-agreement), or gate on max_abs_error / min_sqnr_db (--max-abs-error, --min-sqnr)"
            )
        for o in self.outputs:
            if max_abs_error is not None and not o.max_abs_error <= max_abs_error:
                raise ValidationError(
                    f"output {o.name!r}: max abs error {o.max_abs_error:.3g} exceeds the allowed {max_abs_error:g}"
                )
            if min_sqnr_db is not None and not o.sqnr_db >= min_sqnr_db:
                raise ValidationError(
                    f"output {o.name!r}: SQNR {o.sqnr_db:.2f} dB is below the required {min_sqnr_db:g} dB"
                )
            if min_agreement is not None and o.top1_agreement is not None and not o.top1_agreement >= min_agreement:
                raise ValidationError(
                    f"output {o.name!r}: top-1 agreement {o.top1_agreement:.4f} is below the required {min_agreement:g}"
                )


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class _Accumulator:
    """Running sums for one output; nothing grows with the number of samples."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_abs = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.err_sq = 0.0
        self.dot = 0.0
        self.classifier: bool | None = None
        self.agree = 0
        self.ref_correct = 0
        self.cand_correct = 0
        self.rows = 0
        self.nonfinite = 0

    def update(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        if ref.shape != cand.shape:
            raise ValidationError(
                f"output {self.name!r}: the candidate gives shape {list(cand.shape)}, the reference {list(ref.shape)}"
            )
        r = ref.astype(np.float64, copy=False).ravel()
        c = cand.astype(np.float64, copy=False).ravel()
        diff = r - c
        if diff.size:
            worst = float(np.max(np.abs(diff)))
            if math.isnan(worst) or worst > self.max_abs:  # NaN sticks (Python's max would drop it)
                self.max_abs = worst
            self.nonfinite += int(np.count_nonzero(np.isfinite(r) & ~np.isfinite(c)))
        self.ref_sq += float(r @ r)
        self.cand_sq += float(c @ c)
        self.err_sq += float(diff @ diff)
        self.dot += float(r @ c)
        is_classifier = ref.ndim == 2 and ref.shape[1] >= 2
        self.classifier = is_classifier if self.classifier is None else (self.classifier and is_classifier)
        if self.classifier:
            r_top, c_top = np.argmax(ref, axis=1), np.argmax(cand, axis=1)
            self.agree += int(np.sum(r_top == c_top))
            self.rows += ref.shape[0]
            if labels is not None:
                if labels.shape[0] != ref.shape[0]:
                    raise DataError(
                        f"output {self.name!r} has {ref.shape[0]} rows per batch but the labels give {labels.shape[0]}"
                    )
                if labels.min() < 0 or labels.max() >= ref.shape[1]:
                    raise DataError(
                        f"labels must be class indices in 0..{ref.shape[1] - 1} for output {self.name!r}; "
                        f"got values from {labels.min()} to {labels.max()}"
                    )
                self.ref_correct += int(np.sum(r_top == labels))
                self.cand_correct += int(np.sum(c_top == labels))

    def result(self, with_labels: bool) -> OutputComparison:
        if not math.isfinite(self.err_sq):  # the candidate gave NaN or inf
            sqnr = -math.inf
        elif self.err_sq == 0.0:
            sqnr = math.inf
        elif self.ref_sq == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.ref_sq / self.err_sq)
        if self.ref_sq == 0.0 and self.cand_sq == 0.0:
            cosine = 1.0
        elif self.ref_sq == 0.0 or self.cand_sq == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.ref_sq * self.cand_sq)
        top1 = ref_acc = cand_acc = None
        if self.classifier and self.rows:
            top1 = self.agree / self.rows
            if with_labels:
                ref_acc, cand_acc = self.ref_correct / self.rows, self.cand_correct / self.rows
        return OutputComparison(self.name, self.max_abs, sqnr, cosine, top1, ref_acc, cand_acc, self.nonfinite)


def model_size(source: ModelSource) -> int:
    """Bytes on disk of a model file plus its external data files; serialized size of a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        return model_bytes(source)
    path = Path(source)
    total = path.stat().st_size
    skeleton = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(skeleton):
        if onnx.external_data_helper.uses_external_data(tensor):
            locations.add(onnx.external_data_helper.ExternalDataInfo(tensor).location)
    for loc in sorted(locations):
        data_path = path.parent / loc
        if data_path.is_file():
            total += data_path.stat().st_size
    return total


def _describe(source: ModelSource) -> str:
    return _PROTO if isinstance(source, onnx.ModelProto) else str(source)


def _check_interfaces(reference: onnx.ModelProto, candidate: onnx.ModelProto, batch_size: int) -> tuple[str, ...]:
    """Same inputs (names, dtypes, sizes the candidate fixes) and every reference output in the candidate.

    Returns the output names. A candidate's fixed batch passes when ``batch_size`` is that batch.
    """
    ref_in = {s.name: s for s in model_inputs(reference)}
    cand_in = {s.name: s for s in model_inputs(candidate)}
    if set(ref_in) != set(cand_in):
        raise ValidationError(
            f"the candidate's inputs {sorted(cand_in)} differ from the reference's {sorted(ref_in)}; "
            "both models must take the same inputs"
        )
    for name, spec in ref_in.items():
        if cand_in[name].dtype != spec.dtype:
            raise ValidationError(
                f"input {name!r}: the candidate expects {cand_in[name].dtype}, the reference {spec.dtype}"
            )
        cand = cand_in[name]
        if spec.shape is not None and cand.shape is not None and len(spec.shape) == len(cand.shape):
            for axis, (r, c) in enumerate(zip(spec.shape, cand.shape, strict=True)):
                samples = axis == spec.sample_axis
                if isinstance(c, int) and r != c and not (samples and c == batch_size):
                    # onnxruntime would refuse the reference's feeds mid-run, in a message cut to its first line
                    fix = f": compare at that batch, batch_size={c} (--batch {c})" if samples else ""
                    raise ValidationError(
                        f"input {name!r}: the candidate fixes axis {axis} to {c} where the reference takes "
                        f"{'any size' if not isinstance(r, int) else r} ({cand.describe()} against "
                        f"{spec.describe()}){fix}"
                    )
    ref_out = tuple(o.name for o in reference.graph.output)
    cand_out = {o.name for o in candidate.graph.output}
    for name in ref_out:
        if name not in cand_out:
            raise ValidationError(
                f"the candidate has no output {name!r} (it has {sorted(cand_out)}); outputs are matched by name"
            )
    return ref_out


def _run(session: Any, names: Sequence[str], feed: Mapping[str, np.ndarray], which: str, start: int,
         model: onnx.ModelProto | None = None) -> list:
    try:
        return session.run(list(names), dict(feed), quiet_run_options())
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ValidationError(
            f"onnxruntime failed to run the {which} model on the batch at sample {start}: {first}"
            f"{'' if model is None else sample_axis_hint(model)}"  # read only on failure: it walks the graph
        ) from None


def _stats(seconds: Sequence[float]) -> LatencyStats:
    ms = np.asarray(seconds) * 1e3
    return LatencyStats(float(np.median(ms)), float(np.percentile(ms, 90)))


def validate(
    reference: ModelSource,
    candidate: ModelSource,
    data: DataSource,
    *,
    labels: str | os.PathLike[str] | np.ndarray | None = None,
    batch_size: int = 64,
    repeats: int = 20,
    threads: int | None = None,
    latency: bool = True,
    max_samples: int | None = None,
    layers: bool = False,
    layer_samples: int = 64,
    progress: bool = False,
) -> ValidationReport:
    """Run both models on onnxruntime over ``data`` and measure how far the candidate is from the reference.

    Args:
        reference: the original model (path or ModelProto; never modified).
        candidate: the rewritten model; it must take the same inputs and have every reference output.
        data: any source :func:`onnxpress.calibration.readers.open_data` accepts. When it is an
            ``.npz`` holding a ``labels`` array and ``labels`` is not given, those labels are used.
        labels: class labels (``.npy``, ``.npz`` with key ``labels``, or an array), one per sample.
        batch_size: samples per run, also the latency batch.
        repeats: timed runs per model (after warm-up), alternating the two sessions.
        threads: intra-op threads of both sessions; ``None`` keeps onnxruntime's default.
        latency: measure latency.
        max_samples: compare on at most this many samples.
        layers: also compare every intermediate float tensor both graphs produce under the same name and
            shape, on the first ``layer_samples`` samples, and find where the candidate adds the most noise
            (:class:`TensorComparison`). The tensors become extra outputs of both models, so onnxruntime
            runs the candidate's Q/DQ pairs as float arithmetic there instead of fusing them into integer
            kernels: the same values up to the kernels' rounding (as onnxruntime's own ``qdq_loss_debug``).
        layer_samples: samples for ``layers`` (at most ``max_samples``).
        progress: show a progress bar over the samples.

    Returns:
        The :class:`ValidationReport`.

    Raises:
        ModelLoadError / UnsupportedModelError: a model does not load (file or onnxruntime).
        DataError: the data or labels do not fit the reference model.
        ValidationError: the candidate's inputs differ, it lacks a reference output, an output's
            shape differs, or onnxruntime fails while running.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if repeats < 1:
        raise ValidationError(f"repeats must be at least 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValidationError(f"threads must be at least 1, got {threads}")
    # the graphs only (interfaces, data, op counts): sessions read model files themselves, so a file's
    # external data is not read here too (the 2.25 GiB model against its int8 version: peak 7.2 -> 4.8 GB)
    ref_model = load_model(reference, external_data=False)
    cand_model = load_model(candidate, external_data=False)
    out_names = _check_interfaces(ref_model, cand_model, batch_size)
    reader = open_data(data, ref_model, max_samples=max_samples)
    axes = sample_axes(ref_model)
    if labels is None and isinstance(data, (str, os.PathLike)) and Path(data).is_file():
        try:
            with zipfile.ZipFile(data) as zf:
                has_labels = "labels.npy" in zf.namelist()
        except (OSError, zipfile.BadZipFile):
            has_labels = False
        if has_labels:
            labels = data
            log.info("using the labels stored in %s", data)
    label_array = load_labels(labels) if labels is not None else None
    if labels is None and isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        label_array = _folder_labels(Path(data))  # the help's "default: 'labels' in --data" for a folder too
    total = reader.total_samples
    if label_array is not None and total is not None and label_array.shape[0] != total:  # before any run
        raise DataError(f"the labels hold {label_array.shape[0]} entries but the data has {total} samples")

    def session_source(source: ModelSource, loaded: onnx.ModelProto) -> Any:
        return loaded if isinstance(source, onnx.ModelProto) else str(source)

    ref_sess = make_session(session_source(reference, ref_model), threads=threads, what="reference model")
    cand_sess = make_session(session_source(candidate, cand_model), threads=threads, what="candidate model")
    accs = [_Accumulator(name) for name in out_names]
    seen = used_batch = 0
    first_batch = None
    with tqdm(total=reader.num_samples, desc="validate", unit="sample", disable=not progress) as bar:
        for feed in reader.batches(batch_size):
            n = samples_in(feed, axes)
            used_batch = max(used_batch, n)
            if first_batch is None:
                first_batch = feed
            batch_labels = None
            if label_array is not None and seen + n <= label_array.shape[0]:
                batch_labels = label_array[seen : seen + n]
            ref_out = _run(ref_sess, out_names, feed, "reference", seen, ref_model)
            cand_out = _run(cand_sess, out_names, feed, "candidate", seen, ref_model)
            for acc, r, c in zip(accs, ref_out, cand_out, strict=True):
                acc.update(np.asarray(r), np.asarray(c), batch_labels)
            seen += n
            bar.update(n)
    n_labels = None if label_array is None else label_array.shape[0]
    if n_labels is not None and (seen > n_labels or (max_samples is None and seen != n_labels)):
        raise DataError(f"the labels hold {n_labels} entries but the data has {seen} samples")
    outputs = tuple(acc.result(label_array is not None) for acc in accs)

    ref_lat = cand_lat = ratio = None
    latency_batch = 0
    if latency and first_batch is not None:
        latency_batch = samples_in(first_batch, axes)
        ref_times, cand_times = time_interleaved([ref_sess, cand_sess], first_batch, repeats, warmup=_WARMUP)
        ref_lat, cand_lat = _stats(ref_times), _stats(cand_times)
        ratio = _ratio(cand_lat.median_ms, ref_lat.median_ms)
    compared: tuple[TensorComparison, ...] = ()
    layer_seen = skipped = 0
    if layers:
        compared, layer_seen, skipped = _compare_tensors(
            reference, candidate, ref_model, cand_model,
            open_data(data, ref_model, max_samples=min(layer_samples, max_samples or layer_samples)),
            min(batch_size, 16), threads,
        )  # fmt: skip
    ref_bytes, cand_bytes = model_size(reference), model_size(candidate)
    return ValidationReport(
        reference=_describe(reference),
        candidate=_describe(candidate),
        samples=seen,
        outputs=outputs,
        batch_size=used_batch or batch_size,  # what ran: a fixed-batch reference's feeds are split to its batch
        latency_batch=latency_batch,
        threads=threads,
        repeats=repeats if latency else 0,
        reference_latency=ref_lat,
        candidate_latency=cand_lat,
        latency_ratio=ratio,
        reference_bytes=ref_bytes,
        candidate_bytes=cand_bytes,
        size_ratio=_ratio(cand_bytes, ref_bytes),
        reference_ops=op_histogram(ref_model),
        candidate_ops=op_histogram(cand_model),
        data=str(data) if isinstance(data, (str, os.PathLike)) else f"<{type(data).__name__}>",
        layers=compared,
        layer_samples=layer_seen,
        layers_skipped=skipped,
        max_samples=max_samples,
    )


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
"""Tensor types ``layers`` compares (a float16 export against its float32-inside quantized model too)."""


def _folder_labels(folder: Path) -> np.ndarray | None:
    """The ``labels`` arrays of a folder of ``.npz`` feeds, joined in the order the folder reader reads them.

    Raises:
        DataError: some files hold labels and others do not.
    """
    files = npz_files(folder)
    parts = []
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "labels" in npz.files:
                    parts.append(np.asarray(npz["labels"]).reshape(-1))
        except (ValueError, OSError, zipfile.BadZipFile, EOFError):
            return None  # the reader reports an unreadable feed by name
    if not parts:
        return None
    if len(parts) != len(files):
        raise DataError(f"{len(parts)} of the {len(files)} .npz files in {folder} hold 'labels': give them in every "
                        "file, or pass --labels")
    log.info("using the labels stored in the .npz files of %s", folder)
    return load_labels(np.concatenate(parts))


def _compare_tensors(reference: ModelSource, candidate: ModelSource, ref_model: onnx.ModelProto,
                     cand_model: onnx.ModelProto, reader: Any, batch: int,
                     threads: int | None) -> tuple[tuple[TensorComparison, ...], int, int]:
    """Per-tensor comparison for ``validate(layers=True)``: (comparisons, samples, tensors skipped)."""
    from onnxpress.calibration.collect import _guessed_type, constant_values, exposed_model, value_types

    ref_types, cand_types = value_types(ref_model), value_types(cand_model)
    constants = constant_values(ref_model.graph)
    outputs = {o.name for o in ref_model.graph.output}
    cand_producer = {o: n for n in cand_model.graph.node for o in n.output if o}
    cand_produced = set(cand_producer)
    # onnx's shape inference stops at a contrib op (a quantized LSTM's DynamicQuantizeLSTM): the candidate's values
    # after it are untyped, and were left out, so --layers compared only what came before the LSTM. Such a value
    # takes the reference's float type where its producer's inputs say the same.
    for name in cand_produced - set(cand_types):
        want = ref_types.get(name, (0,))[0]
        if want in _FLOATS and _guessed_type(cand_producer, name, cand_types, default=0) == want:
            cand_types[name] = (want, None)
    producer: dict[str, onnx.NodeProto] = {o: node for node in ref_model.graph.node for o in node.output if o}
    names = [name for node in ref_model.graph.node for name in node.output
             if name and name in cand_produced and name not in outputs and name not in constants
             and ref_types.get(name, (0,))[0] in _FLOATS and cand_types.get(name, (0,))[0] in _FLOATS]
    if not names:
        return (), 0, 0

    def session(source: ModelSource, model: onnx.ModelProto, types: Any, what: str) -> tuple[Any, list[str]]:
        exposed, fetch, big = exposed_model(model, names, types)
        folder = None if isinstance(source, onnx.ModelProto) else str(Path(source).resolve().parent)
        return make_session(exposed, threads=threads, what=what, initializers=big, external_data_folder=folder), fetch

    ref_sess, fetch = session(reference, ref_model, ref_types, "reference model with tensor outputs")
    cand_sess, _ = session(candidate, cand_model, cand_types, "candidate model with tensor outputs")
    accs = {name: _Accumulator(name) for name in fetch}
    differ: set[str] = set()
    seen = 0
    axes = sample_axes(ref_model)
    for feed in reader.batches(batch):
        ref_out = _run(ref_sess, fetch, feed, "reference", seen)
        cand_out = _run(cand_sess, fetch, feed, "candidate", seen)
        for name, r, c in zip(fetch, ref_out, cand_out, strict=True):
            if name in differ or np.shape(r) != np.shape(c):
                differ.add(name)
                continue
            r, c = np.asarray(r, np.float64).ravel(), np.asarray(c, np.float64).ravel()
            finite = np.isfinite(r)  # an attention mask's -inf left out; the candidate's NaN/inf there counts
            accs[name].update(r[finite], c[finite], None)
        seen += samples_in(feed, axes)
    noise = {name: (math.inf if not math.isfinite(acc.err_sq) else acc.err_sq / acc.ref_sq if acc.ref_sq > 0
                    else (0.0 if acc.err_sq == 0 else math.inf))
             for name, acc in accs.items() if name not in differ}
    inherited: dict[str, float] = {}

    def upstream(tensor: str) -> float:
        """The noise ratio reaching ``tensor`` (0 at graph inputs).

        A compared tensor's own; else the worst of its producer's inputs, through tensors the candidate does
        not have (a Relu its kernel absorbed, say).
        """
        if tensor in noise:
            return noise[tensor]
        if tensor not in inherited:
            node = producer.get(tensor)
            inherited[tensor] = 0.0  # set first: a valid graph has no cycle, but the recursion stays bounded
            inherited[tensor] = max((upstream(i) for i in node.input if i), default=0.0) if node else 0.0
        return inherited[tensor]

    out = []
    for name in fetch:
        if name in differ:
            continue
        up = max((upstream(i) for i in producer[name].input if i), default=0.0)
        added = 0.0 if math.isinf(up) else noise[name] - up  # after a NaN/inf input: nothing more to measure
        res = accs[name].result(False)
        added_db = math.inf if added <= 0 else (-math.inf if math.isinf(added) else -10.0 * math.log10(added))
        out.append(TensorComparison(name, producer[name].op_type, res.sqnr_db, added_db, res.max_abs_error))
    return tuple(out), seen, len(differ)
