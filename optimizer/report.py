"""The ``--report DIR`` of ``onnxpress optimize``: ``report.md``, ``report.json`` and four PNGs.

    sensitivity.png  per-layer output SQNR of each option alone (higher = safer to apply); a second
                     panel per channel group and prune ratio when pruning was searched
    histograms.png   calibration histograms of the inputs of the most int8-sensitive layers,
                     with the chosen clipping threshold marked
    pareto.png       measured candidates: fidelity vs the budget's cost, Pareto front, chosen point
    validation table before/after (in report.md): SQNR, accuracy, latency, size of the chosen model

With ``--recipe`` no search runs: the int8 option of every layer is measured for the report (cached like
the search's table), so sensitivity.png (int8 bars only) and histograms.png are drawn; pareto.png has no
candidates to plot and is left out, which report.md and report.json (``images_absent``) say with the reason.

Plots use matplotlib's Agg backend (no display needed); nothing is written outside ``DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.errors import OutputError
from onnxpress.model_io import write_atomically
from onnxpress.reporting import format_table

if TYPE_CHECKING:
    from onnxpress.optimize import OptimizeResult

__all__ = ["IMAGES", "write_report"]

log = logging.getLogger(__name__)

IMAGES = ("sensitivity.png", "histograms.png", "pareto.png")


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sensitivity_png(result: OptimizeResult, path: Path, sens: Any = None) -> None:
    """Bars per layer and option of ``sens`` (default the search's table); without a search, int8 only."""
    plt = _plt()
    searched = result.sensitivity is not None
    sens = sens if sens is not None else result.sensitivity
    groups = list(dict.fromkeys(s.layer for s in sens.scores if s.family == "prune"))
    width_in = max(6, 0.9 * max(len(sens.layers), len(groups)) + 2)
    if groups:
        fig, (ax, gax) = plt.subplots(2, 1, figsize=(width_in, 8))
    else:
        fig, ax = plt.subplots(figsize=(width_in, 4))
    options = sorted({(s.family, s.option) for s in sens.scores}, key=lambda t: (t[0] != "int8", t[1]))
    families = sorted({s.family for s in sens.scores}, key=lambda f: f != "int8")
    labels_per_family = {f: [] for f in families}
    for fam, opt in options:
        labels_per_family[fam].append(opt)
    # bars: int8, w4a8, int4, cb4, and the two rank options per layer by order (ranks differ per layer)
    series: list[tuple[str, list[float]]] = []
    for fam, label in (("int8", "int8"), ("w4a8", "w4a8 (int8 kernel, 4-bit weight codes)"), ("int4", "int4"),
                       ("codebook", "cb4 (4-bit codebook weights)")):
        if fam in families:  # w4a8 / int4 / cb4: only the layers that offer it have a bar
            series.append((label, [_score(sens, lay.key, fam, 0) for lay in sens.layers]))
    depth = max((sum(1 for s in sens.scores if s.layer == lay.key and s.family == "rank") for lay in sens.layers),
                default=0)
    for k in range(depth):
        series.append((f"rank option {k + 1} ({'larger' if k == 0 else 'smaller'})",
                       [_score(sens, lay.key, "rank", k) for lay in sens.layers]))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(sens.layers))
    for k, (name, vals) in enumerate(series):
        ax.bar(x + k * width, [v if v is not None else 0 for v in vals], width, label=name)
    ax.set_xticks(x + width * (len(series) - 1) / 2)
    ax.set_xticklabels([f"{lay.key}\n{result.choices.get(lay.key, '')}" for lay in sens.layers],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output SQNR with only this layer changed (dB)")
    ax.set_title("Per-layer sensitivity (higher = safer); second label line = chosen option" if searched else
                 "Per-layer int8 sensitivity (higher = safer)\na recipe run measures no other option")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if groups:  # pruning is per channel group (one group spans the layers that share its channels)
        ratios = sorted({s.ratio for s in sens.scores if s.family == "prune"})
        gw = 0.8 / len(ratios)
        gx = np.arange(len(groups))
        for k, r in enumerate(ratios):
            vals = [next((s.sqnr_db for s in sens.scores if s.family == "prune" and s.layer == g and s.ratio == r),
                         None) for g in groups]
            gax.bar(gx + k * gw, [0 if v is None else (min(v, 100.0) if math.isfinite(v) else 100.0) for v in vals],
                    gw, label=f"prune {r:g} of the group")
        gax.set_xticks(gx + gw * (len(ratios) - 1) / 2)
        gax.set_xticklabels([f"{g}\n{result.choices.get(f'group {g}', '')}" for g in groups], rotation=60, ha="right",
                            fontsize=7)
        gax.set_ylabel("output SQNR, only this group pruned (dB)")
        gax.set_title("Per-channel-group pruning sensitivity, before any fine-tune (missing bar: "
                      "ratio removes nothing new after rounding)", fontsize=9)
        gax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight"))
    plt.close(fig)


def _score(sens: Any, layer: str, family: str, index: int) -> float | None:
    rows = [s for s in sens.scores if s.layer == layer and s.family == family]
    if family == "rank":
        rows.sort(key=lambda s: -(s.rank or 0))
    if index >= len(rows):
        return None
    v = rows[index].sqnr_db
    return min(v, 100.0) if math.isfinite(v) else 100.0


def shipped_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}``: the range each per-tensor ``QuantizeLinear`` of ``model`` maps onto its integers.

    ``lo = (qmin - z) s`` and ``hi = (qmax - z) s``: what the written model does, whichever method chose it
    (``method="auto"`` picks one per tensor) and whatever ran after calibration. Scales and zero points are
    initializers in every model onnxpress writes (``normalize_model`` turns Constant nodes into them).
    """
    inits = {i.name: i for i in model.graph.initializer}
    # a zero Pad before a QuantizeLinear (passes/pad_input_channels.py: a stem's input padded to 4 channels) adds
    # zeros, which every quantized range holds: the range is its input's too
    unpadded = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Pad" and len(n.input) < 3
                and all(a.name != "mode" or a.s in (b"", b"constant") for a in n.attribute)}
    ranges: dict[str, tuple[float, float]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        has_zero = len(node.input) > 2 and node.input[2]
        if has_zero and node.input[2] not in inits:
            continue
        zero = numpy_helper.to_array(inits[node.input[2]]) if has_zero else np.zeros((), np.uint8)
        if scale.size != 1 or zero.size != 1 or zero.dtype.kind not in "iu":
            continue
        info = np.iinfo(zero.dtype)
        s, z = float(scale.reshape(())), int(zero.reshape(()))
        ranges.setdefault(unpadded.get(node.input[0], node.input[0]), ((info.min - z) * s, (info.max - z) * s))
    return ranges


_RANGE_KEEPING = frozenset({"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                            "Identity"})
"""Ops whose output a QDQ model takes from its quantized input: the report looks through them for a range."""


def _histograms_png(result: OptimizeResult, m0: onnx.ModelProto, calib: object, path: Path, top: int = 4,
                    sens: Any = None) -> list[dict]:
    """Histograms of the inputs of the ``top`` most int8-sensitive layers of ``sens`` (default the search's)."""
    from onnxpress.calibrate import calibrate
    from onnxpress.range_search import METHODS as AUTO_METHODS

    plt = _plt()
    sens = sens if sens is not None else result.sensitivity
    int8 = sorted((s for s in sens.scores if s.family == "int8"), key=lambda s: s.sqnr_db)[:top]
    inputs = {n.name: n.input[0] for n in m0.graph.node if n.name}
    tensors = [(s.layer, inputs[s.layer], s.sqnr_db) for s in int8 if s.layer in inputs]
    method = _recipe_method(result)
    # "auto" chose a method per tensor: the histograms come from the first candidate's calibration, and the
    # range drawn is the one the written model quantizes with (also for the other methods, when it has it)
    binned = AUTO_METHODS[0] if method == "auto" else method
    shipped = shipped_ranges(result.model)
    producer = {o: n for n in m0.graph.node for o in n.output}

    read_in_written = {i for n in result.model.graph.node for i in n.input}
    # a bound the written model puts before the Q (quantize's Max(t, floor) where a float Relu was dropped)
    bounded = {n.input[0]: n.output[0] for n in result.model.graph.node
               if n.op_type in ("Max", "Min", "Relu", "Clip") and n.output and n.output[0] in shipped}

    def written_range(tensor: str) -> tuple[float, float] | None:
        """The written model's range of ``tensor``, or of the input of the range-keeping ops that made it.

        A QDQ model quantizes a Conv's output and drops the Relu, whose clipping the range's floor does,
        and a MaxPool or a reshape reads its input's quantized values, so the range is found there; a
        bound (Max/Min/Relu/Clip) the written model inserts right before its Q is looked through too.
        """
        for _ in range(8):
            if tensor in shipped:
                return shipped[tensor]
            if tensor in bounded:
                return shipped[bounded[tensor]]
            node = producer.get(tensor)
            if node is None or node.op_type not in _RANGE_KEEPING:
                return None
            tensor = node.input[0]
        return None

    # equalized channels are rescaled in the written model: its ranges are in other units than these values
    rescaled = any(st["pass"] == "quantize" and st.get("equalize") for st in result.recipe["steps"])
    rows = []
    fig, axes = plt.subplots(1, max(len(tensors), 1), figsize=(4 * max(len(tensors), 1), 3.2), squeeze=False)
    if tensors:
        table = calibrate(m0, calib, method=binned, tensors=[t for _, t, _ in tensors], max_samples=256)
        for ax, (layer, tensor, sq) in zip(axes[0], tensors, strict=False):
            hist = table.histograms.get(tensor)
            calibrated = table.ranges.get(tensor)
            if hist is None or calibrated is None or hist.counts is None:
                ax.set_title(f"{tensor}: no histogram")
                continue
            written = written_range(tensor)
            lo, hi = written if written is not None else (calibrated.min, calibrated.max)
            w = hist.width
            centers = (np.arange(-hist.size, hist.size) + 0.5) * w
            keep = hist.counts > 0
            ax.bar(centers[keep], hist.counts[keep], width=w, color="tab:blue")
            ax.set_yscale("log")
            if written is not None:
                where = "written model"
            else:  # not quantized where the written model reads it under this name: a layer kept float
                where = f"{binned}; float in the written model" if tensor in read_in_written else binned
            ax.axvline(lo, color="red", ls="--", label=f"range [{lo:.3g}, {hi:.3g}] ({where})")
            ax.axvline(hi, color="red", ls="--")
            ax.set_title(f"{layer} input\nint8 alone: {sq:.1f} dB", fontsize=8)
            ax.legend(fontsize=7)
            outside = (centers < lo) | (centers > hi)  # to a bin: the share of values the range clips
            clipped = float(hist.counts[outside].sum() / max(int(hist.counts.sum()), 1))
            rows.append({"layer": layer, "tensor": tensor, "int8_sqnr_db": sq, "min": lo, "max": hi,
                         "range_from": where, "amax": hist.amax, "clipped_fraction": clipped,
                         "rescaled_in_written_model": rescaled})
    else:
        axes[0][0].set_title("no int8 option measured")
    structural = any(st["pass"] in ("prune", "lowrank", "finetune") for st in result.recipe["steps"])
    fig.suptitle(f"Calibration histograms ({binned}"
                 + (", the written model's per-tensor ranges" if method == "auto" else "")
                 + ") of the most int8-sensitive layer inputs, original model"
                 + (" (the recipe prunes/splits/fine-tunes first: its quantize step's ranges differ)"
                    if structural else "")
                 + ("\n(the recipe equalizes layer pairs: the written model's tensors are rescaled per channel, "
                    "its ranges are not in these histograms' units)" if rescaled else ""), fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return rows


def _recipe_method(result: Any) -> str:
    """The calibration method of the recipe's quantize step (``"mse"`` when it has none)."""
    return next((st.get("method", "mse") for st in result.recipe["steps"] if st["pass"] == "quantize"), "mse")


def _int8_sensitivity(result: OptimizeResult, m0: onnx.ModelProto, calib: object, cache_dir: Any,
                      samples: int) -> Any:
    """Without a search (``--recipe``): the int8 option of every layer alone, cached like the search's table.

    It draws the sensitivity bars and chooses which histograms to draw, by the same measure as after a search.
    """
    from onnxpress.range_search import METHODS as AUTO_METHODS
    from onnxpress.sensitivity import analyze_sensitivity

    method = _recipe_method(result)
    return analyze_sensitivity(m0, calib, rank_fractions=(), prune_ratios=(), int4=False, codebook=False,
                               method=AUTO_METHODS[0] if method == "auto" else method, max_samples=samples,
                               cache_dir=cache_dir)


def _pareto_png(result: OptimizeResult, path: Path) -> None:
    """Fidelity against cost of every measured candidate; the baseline, the front and the chosen one numbered.

    The numbered points are named in a key under the axes, not beside them: a search leaves several variants
    of its pick at one point (+ a float layer, + QAT, auto ranges not kept), whose names written beside the
    points overprinted each other into one unreadable line.
    """
    plt = _plt()
    kind = result.budget.kind
    pts = [c for c in result.candidates if c.cost(kind) is not None and c.sqnr_db is not None]
    untuned = [c for c in pts if "before fine-tune" in c.note]  # never fine-tuned (see optimize)
    probed = [c for c in pts if "probe fine-tune" in c.note]  # after a short probe, not the full fine-tune
    done = [c for c in pts if c not in untuned and c not in probed]
    front = result.pareto
    named: list[Any] = []
    for c in [*done[:1], *front, result.chosen]:  # the first measured is the uniform baseline
        if c is not None and c.cost(kind) is not None and c.sqnr_db is not None and all(c is not n for n in named):
            named.append(c)
    named.sort(key=lambda c: (c.cost(kind), -c.sqnr_db))
    key = [f"{i}: {c.note} ({kind} {c.cost(kind):.3f}, {c.sqnr_db:.2f} dB)" + ("  <- chosen" if c is result.chosen
                                                                                 else "")
           for i, c in enumerate(named, 1)]
    key_inches = 0.16 * len(key) + 0.3
    fig, ax = plt.subplots(figsize=(7, 4 + key_inches))
    ax.scatter([c.cost(kind) for c in done], [min(c.sqnr_db, 100) for c in done], color="grey", label="measured")
    if untuned:
        ax.scatter([c.cost(kind) for c in untuned], [min(c.sqnr_db, 100) for c in untuned], facecolors="none",
                   edgecolors="grey", label="before fine-tune")
    if probed:
        ax.scatter([c.cost(kind) for c in probed], [min(c.sqnr_db, 100) for c in probed], marker="^",
                   facecolors="none", edgecolors="tab:orange", label="after a probe fine-tune")
    ax.plot([c.cost(kind) for c in front], [min(c.sqnr_db, 100) for c in front], "b-o", label="Pareto front")
    if result.chosen is not None and result.chosen.cost(kind) is not None:
        ax.scatter([result.chosen.cost(kind)], [min(result.chosen.sqnr_db, 100)], s=160, marker="*", color="red",
                   label="chosen", zorder=5)
    at: dict[tuple[float, float], int] = {}  # numbers at one point go side by side
    for i, c in enumerate(named, 1):
        xy = (c.cost(kind), min(c.sqnr_db, 100))
        k = at[xy] = at.get(xy, -1) + 1
        ax.annotate(str(i), xy, fontsize=8, xytext=(8 + 9 * k, 4), textcoords="offset points")  # clear of the star
    ax.axvline(result.budget.value, color="red", ls=":", label=f"budget {kind}={result.budget.value:g}")
    ax.set_xlabel(f"{kind} ratio (candidate / original)")
    ax.set_ylabel("output SQNR vs original (dB)")
    ax.set_title("Candidates: fidelity vs cost")
    ax.legend(fontsize=8)
    height = 4 + key_inches
    fig.tight_layout(rect=(0, key_inches / height, 1, 1))
    fig.text(0.02, 0.02 / height, "\n".join(key), fontsize=7, va="bottom", ha="left", family="monospace")
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def _candidate_dict(c: Any) -> dict[str, Any]:
    return {k: _num(getattr(c, k)) for k in ("note", "sqnr_db", "accuracy", "latency_ratio", "size_ratio",
                                              "flops_ratio", "est_cost", "est_sqnr", "feasible")}


def _metric_label(name: str | None) -> str:
    """The before/after row name of the label-based measure: top-1 accuracy or the user's metric."""
    if name is None or name.startswith("top-1"):
        return name or "accuracy"
    return f"metric: {name}"


def _threads_text(threads: int | None) -> str:
    if threads is None:
        return "onnxruntime's default threads"
    return f"{threads} thread{'s' if threads != 1 else ''}"


def check_report_folder(folder: str | os.PathLike[str]) -> Path:
    """Check, before any work, that ``write_report`` will be able to create and write ``folder``.

    Raises:
        OutputError: it is a file, or the folder (or the nearest existing one above it) is not writable.
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OutputError(f"report folder {out} is a file; give a folder (it gets report.md, report.json and PNGs)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create report folder {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write report folder {out}: no permission to write in {existing}")
    return out


def write_report(
    folder: str | os.PathLike[str],
    result: OptimizeResult,
    m0: onnx.ModelProto,
    calib: object,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    threads: int | None = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    sensitivity_samples: int = 64,
    original_bytes: int | None = None,
) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs into ``folder`` (created if missing).

    Without a search (``result.sensitivity`` is None: a recipe was applied) the int8 sensitivity of every
    layer is measured on ``sensitivity_samples`` samples (cached in ``cache_dir``, as ``analyze_sensitivity``)
    for sensitivity.png and histograms.png; pareto.png is not drawn and report.md says why.

    The before/after latency is measured at ``threads`` (the search's ``latency_threads``, what the
    budget was judged at) and again at onnxruntime's default thread count: a small int8 model gains
    less from a second thread than the original, so the two ratios differ (resnet searched at 0.2:
    0.17x at 1 thread, 0.23x at 2).

    ``original_bytes``: the size of the model as the user gave it, which the candidates' size ratios divide by;
    ``m0`` is its cleaned graph, a few hundred bytes smaller (60,251 against 59,897 on the tiny test CNN, which
    made the report's ratio 0.543 where the candidates table said 0.546). ``None``: ``m0``'s size.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    from onnxpress.validate import validate

    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report folder {out}: {exc.strerror or exc}") from None
    val = validate(m0, result.model, list(feeds), repeats=10, threads=threads)
    val_default = validate(m0, result.model, list(feeds), repeats=10) if threads is not None else val
    if original_bytes is not None:  # sizes against the user's file, as the candidates table gives them
        val, val_default = (dataclasses.replace(v, reference_bytes=original_bytes,
                                                size_ratio=v.candidate_bytes / original_bytes)
                            for v in (val, val_default))
    o = val.outputs[0]
    c = result.chosen
    user_metric = result.metric_name is not None and not result.metric_name.startswith("top-1")
    acc_spec = ".4g" if user_metric else ".3f"  # a user metric's scale is unknown: significant digits
    rows = [
        ["SQNR (dB)", "inf", _fmt(o.sqnr_db, ".2f")],
        ["top-1 agreement", "1.000", _fmt(o.top1_agreement)],
        [_metric_label(result.metric_name), _fmt(result.reference_accuracy, acc_spec),
         _fmt(c.accuracy if c else None, acc_spec)],
        [f"latency (ms, median, {_threads_text(threads)})",
         _fmt(val.reference_latency.median_ms if val.reference_latency else None, ".2f"),
         _fmt(val.candidate_latency.median_ms if val.candidate_latency else None, ".2f")],
        # re-timed here on 10 runs: it can differ by a few percent from the search's timing, which the verdict uses
        [f"latency ratio ({_threads_text(threads)}, as the budget; re-timed for this report"
         + (f", the search measured {c.latency_ratio:.3f})" if c is not None and c.latency_ratio is not None else ")"),
         "1.000", _fmt(val.latency_ratio)],
        *([[f"latency ratio ({_threads_text(None)})", "1.000", _fmt(val_default.latency_ratio)]]
          if threads is not None else []),
        ["size (bytes)", f"{val.reference_bytes:,}", f"{val.candidate_bytes:,}"],
        ["size ratio", "1.000", _fmt(val.size_ratio)],
        ["MACs ratio", "1.000", _fmt(c.flops_ratio if c else None)],
    ]
    sens = result.sensitivity
    absent: dict[str, str] = {}  # image -> why it is not drawn
    if sens is None:
        sens = _int8_sensitivity(result, m0, calib, cache_dir, sensitivity_samples)
        absent["pareto.png"] = ("no search ran (a recipe was applied): one model, no candidates or Pareto front to "
                                "plot; run optimize without --recipe for it")
    if not any(s.family == "int8" for s in sens.scores):
        absent["sensitivity.png"] = ("no layer has an int8 option (no Conv/Gemm/MatMul with a constant weight "
                                     "that InsertQDQ quantizes)")
    if "sensitivity.png" not in absent:
        _sensitivity_png(result, out / "sensitivity.png", sens)
    hist_rows = _histograms_png(result, m0, calib, out / "histograms.png", sens=sens)
    if "pareto.png" not in absent:
        _pareto_png(result, out / "pareto.png")
    written = [name for name in IMAGES if name not in absent]
    md = ["# onnxpress optimize report", ""]
    if result.budget is not None:
        every = "all" if len(result.budgets) > 1 or result.max_drop is not None else "it"
        md += [f"Budget: {result.verdict()}; chosen model {'meets' if result.feasible else 'does NOT meet'} "
               f"{every} as measured" + (" (time limit reached)" if result.timed_out else "") + ".", ""]
    md += [f"Recipe: `{result.recipe_path.name}` (rebuilds the model byte for byte with `--recipe`).", ""]
    md += ["## Before / after (validation on the evaluation data)", "", "```",
           format_table(["", "original", "optimized"], rows), "```", ""]
    if result.choices:
        md += ["## Chosen option per layer", "", "```",
               format_table(["layer", "option"], [[k, v] for k, v in result.choices.items()]), "```", ""]
    if "sensitivity.png" in written:
        md += ["## Per-layer sensitivity", ""]
        if result.sensitivity is None:
            md += ["int8 of each layer alone, measured for this report: a recipe run searches no other option.", ""]
        md += ["![sensitivity](sensitivity.png)", ""]
    md += ["## Calibration histograms of the most sensitive tensors", "", "![histograms](histograms.png)", ""]
    if "pareto.png" in written:
        md += ["## Candidates and Pareto front", "", "![pareto](pareto.png)", "", "```",
               format_table(["candidate", "SQNR dB", "acc", "latency", "size", "MACs", "within budget"],
                            [[x.note, _fmt(x.sqnr_db, ".2f"), _fmt(x.accuracy), _fmt(x.latency_ratio),
                              _fmt(x.size_ratio), _fmt(x.flops_ratio), str(x.feasible)] for x in result.candidates]),
               "```", ""]
    if absent:
        md += ["## Images not written", "", *(f"- `{name}`: {why}." for name, why in absent.items()), ""]
    try:
        write_atomically(out / "report.md", lambda tmp: tmp.write_text("\n".join(md), encoding="utf-8"))
        record = {
            "budget": None if result.budget is None else {"kind": result.budget.kind, "value": result.budget.value},
            "budgets": [{"kind": b.kind, "value": b.value} for b in result.budgets],
            "max_drop": result.max_drop,
            "feasible": result.feasible,
            "timed_out": result.timed_out,
            "output": str(result.output),
            "recipe": result.recipe,
            "choices": result.choices,
            "validation": val.to_dict(),
            "validation_default_threads": val_default.to_dict() if threads is not None else None,
            "chosen": None if c is None else _candidate_dict(c),
            "candidates": [_candidate_dict(x) for x in result.candidates],
            "pareto": [_candidate_dict(x) for x in result.pareto],
            "sensitivity": None if result.sensitivity is None else result.sensitivity.to_dict(),
            "histograms": hist_rows,
            "metric": result.metric_name,
            "images": written,
            "images_absent": absent,
        }
        text = json.dumps(record, indent=2, default=_num)
        write_atomically(out / "report.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write the report in {out}: {exc.strerror or exc}") from None
    return out
