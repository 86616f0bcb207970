"""Advanced post-training methods, side by side in one run (onnxruntime CPU, test split logits).

    python bench/advanced_ptq.py [--models models] [--method mse] [--max-samples 500] [--sections abcde]
                                 [--int8-method rtn]

A. Depthwise CNN (mobilenet), int8 weights **per tensor**, uint8 activations: plain QDQ vs +BC vs
   +CLE (clip='skip' | 'split' exact | 'relu' lossy: Nagel et al.'s ReLU6 -> ReLU) vs +CLE+BC.
   Two SQNR columns: the full QDQ model (onnxpress.quantize --per-tensor; its BC is measured on the
   W8A8 model itself, advanced.correct_bias_for_qdq), and weights only (weights rounded in float,
   activations float, analytic BC) which isolates what CLE fixes; an activations-only row (weights
   float) bounds what any weight-side method can reach. Then every conv quantized (min_conv_depth=0),
   with partial CLE (strength 0.5), and the split ReLU6 (Relu -> Min) rounded on two grids (InsertQDQ
   share_bound_grid=False, the behaviour before) beside the default that rounds it once on the Min's grid.
B. Transformer: plain QDQ (int8 per-channel weights) vs SmoothQuant (alpha 0.5 / 0.8) + QDQ.
C. Weights only (activations float): k-means codebooks (4 and 6 bits per layer; 4 bits per 16 channels;
   4 bits per layer on channel-normalised weights, with the gain-keeping (default), norm-keeping or
   plain max channel scales; and with GPTQ indices from the layers' input moments E[x x^T] on the
   calibration data) vs linear symmetric int4/int8 (per tensor and per channel; int4 per channel
   also with the very same GPTQ indices + output-space gain: the fair data-aware baseline) on the
   same weights, each also with bias correction using its own reconstruction (BC column), with the
   bits per weight each really costs (indices + codebooks / scales); plus the codebook model's file
   size and its onnxruntime cost (session creation and batch-64 latency against float, interleaved
   medians, one thread, spinning off).

D. Activation-range equalization (``onnxpress.quantize(..., equalize="activations")``) on the three CNNs,
   each beside the same quantize call without it, under the default settings and six variations (method,
   activation type, calibration samples, no bias correction with round-to-nearest weights).
E. Recurrent weights as codebooks: the reference LSTM's W and R at 4 and 6 bits, nearest-level codes (no data)
   and GPTQ + refit on the moments of its input and hidden states, beside quantize's int8 default.

SQNR = 10 log10(sum y^2 / sum (y - y_hat)^2) of the logits against the float model.

Measured (2026-11-30, one run, 2 busy cores; the calibration code moved under parallel work, so
compare rows within one run): A, every conv quantized per tensor: plain 26.77 dB, +BC +6.56,
+CLE(split)+BC +6.28 (Relu and Min rounded on their own grids, as before: +5.40), CLE at half strength
+ BC +7.01; activations-only SQNR after CLE 33.19 dB on the shared grid vs 32.15 on two (plain 35.44):
CLE unbalances the per-tensor activation ranges, which is why it adds little after BC. C, 4-bit
weights only, logit SQNR mobilenet / resnet / transformer: per-channel int4 16.28 / 13.85 / 19.53;
codebook + channel scales 18.27 / 18.72 / 24.12 (without the gain fix 16.44 / 17.56 / 23.43);
codebook + GPTQ indices 22.01 / 28.12 / 34.10; per-channel int4 with the same GPTQ + gain 20.50 /
28.20 / 32.23. So against plain int4 the data-aware codebook gains +5.7 / +14.3 / +14.6 dB, but at
equal treatment (both GPTQ) only +1.5 / -0.1 / +1.9: near the Lloyd-Max limit for these weights
(normalised per channel they are close to uniform, kurtosis 2.0-4.7; per layer k-means lowers the
weight MSE of max-scaled int4 by 0.75-1.95 dB). 2026-12-03: with the codebook and channel scales fitted to
each layer's output for GPTQ's indices and GPTQ run again on them (CodebookWeights refit=1, now the default),
the codebook reads 21.89 / 31.87 / 37.14 dB; int4 given the same scale refit 20.38 / 26.15 / 35.22; the
codebook over the better int4 row +1.38 / +3.67 / +1.92 dB. E (same day): int8 0.275x the float size at
49.71 dB; codebook 4-bit 0.150x at 27.17 dB nearest, 35.60 with GPTQ + refit; 6-bit 0.272x at 38.77 / 46.94;
accuracy 0.9889 (float's) in every row.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxpress import advanced, quantize  # noqa: E402
from onnxpress.model_io import load_model, normalize_model  # noqa: E402
from onnxpress.passes.bias_correction import CorrectBias, bias_correction_inputs, quantized_weight  # noqa: E402
from onnxpress.passes.codebook import (  # noqa: E402
    CodebookWeights,
    gptq_assign,
    hessian_times,
    refit_codebook,
    weight_channel_axis,
)
from onnxpress.pipeline import cleanup_passes, run_passes  # noqa: E402
from onnxpress.quantize import DEFAULT_METHOD  # noqa: E402
from onnxpress.reporting import format_table  # noqa: E402
from onnxpress.runtime import make_session  # noqa: E402

MIN_ELEMENTS = 256


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = make_session(model, threads=2)
    return np.concatenate([sess.run(None, {"input": x[i : i + 128]})[0] for i in range(0, len(x), 128)])


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - out) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / err)


def accuracy(y: np.ndarray, labels: np.ndarray) -> float:
    return float((y.argmax(axis=1) == labels).mean())


def cleaned(path: Path) -> onnx.ModelProto:
    return run_passes(normalize_model(load_model(path)), cleanup_passes()).model


def weight_only(model: onnx.ModelProto, *, per_channel: bool = True, bits: int = 8, min_elements: int = 0,
                quantizer=None) -> onnx.ModelProto:
    """Round every Conv/Gemm/MatMul weight (>= min_elements) with InsertQDQ's quantizer (or
    ``quantizer(node, w)``), keep float."""
    graph = gs.import_onnx(model)
    done: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or w.values.dtype != np.float32 or w.values.size < min_elements:
            continue
        if w.name not in done:
            q = (quantizer(node, w.values) if quantizer is not None
                 else quantized_weight(node, w.values, per_channel=per_channel, bits=bits))
            done[w.name] = gs.Constant(w.name + "_wq", q.astype(np.float32))
        node.inputs[1] = done[w.name]
    return gs.export_onnx(graph.cleanup().toposort())


def int4_gptq(hessians, refit: int = 0):
    """Per-channel symmetric int4 (levels s_c k, k = -7..7, s_c = max|W_c| / 7) with GPTQ indices and the
    output-space gain, exactly as CodebookWeights(hessians=..., refit=...) treats its codebook: the fair baseline.
    With ``refit``, its scales (the one thing a linear grid can fit) are fitted to the output as the codebook's
    are (refit_codebook with fit_books=False), GPTQ runs again with them, and they are fitted once more."""

    def quantize(node, w: np.ndarray) -> np.ndarray:
        h = hessians.get(node.inputs[1].name)
        if h is None:
            return quantized_weight(node, w, per_channel=True, bits=4)
        axis = weight_channel_axis(node, w)
        first = np.moveaxis(w, axis, 0)
        rows = first.reshape(first.shape[0], -1).astype(np.float64)
        s = np.abs(rows).max(axis=1) / 7
        s = np.where(s > 0, s, 1.0)
        grid = np.arange(-7.0, 8.0)[None, :]
        idx = gptq_assign(rows, s[:, None] * grid, h)
        for _ in range(refit):
            _, s = refit_codebook(rows, idx, grid, s, h, fit_books=False)
            idx = gptq_assign(rows, s[:, None] * grid, h)
        if refit:  # the scales for the final indices
            _, s = refit_codebook(rows, idx, grid, s, h, fit_books=False)
        rec = s[:, None] * grid[0][idx]
        hw = hessian_times(rows, h)
        dot = np.sum(rec * hw, axis=1)
        rec *= np.where(dot > 0, np.sum(rows * hw, axis=1) / np.where(dot > 0, dot, 1.0), 1.0)[:, None]
        return np.moveaxis(rec.reshape(first.shape), 0, axis).astype(np.float32)

    return quantize


def weight_stats(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(elements, tensors, output channels) of the weights the weight-only rows touch."""
    graph = gs.import_onnx(model)
    seen, n, ch = set(), 0, 0
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        t = node.inputs[1]
        if not isinstance(t, gs.Constant) or t.values.size < MIN_ELEMENTS or t.name in seen:
            continue
        seen.add(t.name)
        n += t.values.size
        axis = 0 if node.op == "Conv" or int(node.attrs.get("transB", 0)) else t.values.ndim - 1
        ch += t.values.shape[axis]
    return n, len(seen), ch


def activations_only(qdq_model: onnx.ModelProto, float_model: onnx.ModelProto) -> onnx.ModelProto:
    """The QDQ model with each layer's weight and bias DQ replaced by the float constants: only activations rounded.

    Run it with optimisations off: onnxruntime's QDQ fusions at level "all" mis-handle a DQ -> Conv with a
    float weight here (mobilenet: 27.1 dB at "all" vs 35.5 dB at "disable" for the same graph).
    """
    graph, ref = gs.import_onnx(qdq_model), {n.name: n for n in gs.import_onnx(float_model).nodes}
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul") and node.name in ref:
            for i in range(1, min(len(node.inputs), len(ref[node.name].inputs))):
                node.inputs[i] = ref[node.name].inputs[i]
    return gs.export_onnx(graph.cleanup().toposort())


def logits_exact(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = make_session(model, threads=2, optimization="disable")
    return np.concatenate([sess.run(None, {"input": x[i : i + 128]})[0] for i in range(0, len(x), 128)])


def reference(models: Path, name: str, x: np.ndarray, label: str,
              end: str = "") -> tuple[Path, onnx.ModelProto, np.ndarray] | None:
    """Reference model ``name``: its path, the model cleaned and its float logits on ``x``; None when the file is
    missing (the section's ``label`` says it skipped)."""
    path = models / f"{name}.onnx"
    if not path.exists():
        print(f"{label} skipped: {path} not found{end}")
        return None
    base = cleaned(path)
    return path, base, logits(base, x)


def section_a(args, models: Path, calib: Path, x: np.ndarray, labels: np.ndarray) -> None:
    found = reference(models, "mobilenet", x, "A.", end="\n")
    if found is None:
        return
    from onnxpress import calibrate
    from onnxpress.passes.equalize import EqualizeCrossLayer
    from onnxpress.passes.qdq import InsertQDQ

    _, base, ref = found
    # (name, float model, pairs, bias correction). The QDQ column is onnxpress.quantize(per_channel=False,
    # bias_correction=...): BC measured on the W8A8 model itself, only the layers InsertQDQ quantizes. The W-only
    # column rounds every weight in float (activations float) and corrects with the analytic (W - Q(W)) E[x].
    variants: list[tuple[str, onnx.ModelProto, str, bool]] = [("plain", base, "-", False), ("+BC", base, "-", True)]
    float_rows = []
    for clip in ("skip", "split", "relu"):
        res = advanced.equalize(base, clip=clip)
        pairs = str(res.stats["equalize_cross_layer.pairs"])
        variants.append((f"+CLE clip={clip}", res.model, pairs, False))
        yf = logits(res.model, x)
        float_rows.append(f"clip={clip}: float SQNR {sqnr(ref, yf):.2f} dB, float acc {accuracy(yf, labels):.4f}")
        if clip != "skip":
            variants.append((f"+CLE clip={clip} +BC", res.model, pairs, True))
    rows = [["float", "-", "inf", "inf", f"{accuracy(ref, labels):.4f}"]]
    plain_db = plain_w = None
    for name, model, pairs, bc in variants:
        q = quantize(model, calib=str(calib), method=args.method, per_channel=False, max_samples=args.max_samples,
                     bias_correction=bc, int8_method=args.int8_method)
        yq = logits(q.model, x)
        w_model = advanced.correct_bias(model, str(calib), per_channel=False, max_samples=args.max_samples).model
        yw = logits(weight_only(w_model if bc else model, per_channel=False), x)
        db, dbw = sqnr(ref, yq), sqnr(ref, yw)
        plain_db = db if plain_db is None else plain_db
        plain_w = dbw if plain_w is None else plain_w
        rows.append([name, pairs, f"{db:.2f} ({db - plain_db:+.2f})", f"{dbw:.2f} ({dbw - plain_w:+.2f})",
                     f"{accuracy(yq, labels):.4f}"])
        if name == "plain":
            act = logits_exact(activations_only(q.model, model), x)
            rows.append(["  (plain, activations only: weights float)", "-", f"{sqnr(ref, act):.2f}", "-",
                         f"{accuracy(act, labels):.4f}"])
    for bc in (False, True):
        per_ch = quantize(base, calib=str(calib), method=args.method, per_channel=True, max_samples=args.max_samples,
                          bias_correction=bc, int8_method=args.int8_method)
        yc = logits(per_ch.model, x)
        yw = sqnr(ref, logits(weight_only(base, per_channel=True), x)) if not bc else float("nan")
        rows.append([f"(per-channel int8{' +BC' if bc else ''}, for reference)", "-", f"{sqnr(ref, yc):.2f}",
                     f"{yw:.2f}" if not bc else "-", f"{accuracy(yc, labels):.4f}"])
    print(f"A. mobilenet, int8 weights per tensor, uint8 activations ({args.method} calibration), "
          f"{len(x)} test samples; onnxpress.quantize(per_channel=False) as is (stem + first depthwise stay float)")
    print(format_table(["variant", "pairs", "QDQ SQNR dB (vs plain)", "W-only SQNR dB (vs plain)", "QDQ acc"], rows))
    print("   float models after CLE (before quantization), against the original float model: " + "; ".join(float_rows))
    split = next(m for name, m, _, _ in variants if name == "+CLE clip=split")
    half = run_passes(base, [EqualizeCrossLayer(clip="split", strength=0.5)]).model
    # The hard case proper: InsertQDQ keeps the stem and the first depthwise conv float by default (too
    # shallow for int8 kernels); quantizing every conv per tensor is where CLE and BC have work to do.
    # InsertQDQ(share_bound_grid=False): the split ReLU6 (Relu -> Min) rounded twice, each with its own range.
    hard_rows, hard_plain = [], None
    for name, model, bc, per_channel, share in (
        ("plain", base, False, False, True),
        ("+BC", base, True, False, True),
        ("+CLE clip=split", split, False, False, True),
        ("+CLE clip=split +BC", split, True, False, True),
        ("+CLE clip=split strength 0.5 +BC", half, True, False, True),
        ("+CLE clip=split, Relu and Min rounded on own grids", split, False, False, False),
        ("+CLE clip=split +BC, Relu and Min rounded on own grids", split, True, False, False),
        ("(per-channel int8, for reference)", base, False, True, True),
        ("(per-channel int8 +BC, for reference)", base, True, True, True),
    ):
        table = calibrate(model, str(calib), method=args.method, max_samples=args.max_samples)
        qdq = InsertQDQ(table, per_channel=per_channel, min_conv_depth=0, share_bound_grid=share)
        q_float = advanced.correct_bias_for_qdq(model, qdq, str(calib), max_samples=args.max_samples) if bc else model
        q = run_passes(q_float, [qdq]).model
        yq = logits(q, x)
        db = sqnr(ref, yq)
        hard_plain = db if hard_plain is None else hard_plain
        act = sqnr(ref, logits_exact(activations_only(q, q_float), x)) if not bc else float("nan")
        hard_rows.append([name, f"{db:.2f} ({db - hard_plain:+.2f})", f"{act:.2f}" if not bc else "-",
                          f"{accuracy(yq, labels):.4f}"])
    print("   every conv quantized (InsertQDQ min_conv_depth=0: the stem and first depthwise too), per-tensor weights:")
    print(format_table(["variant", "QDQ SQNR dB (vs plain)", "activations-only SQNR dB", "QDQ acc"], hard_rows))
    _, ratio = _timing(base, split, x, args.repeats)
    print(f"   float latency of the clip=split model (Relu + Min instead of a fused Clip), batch 64: {ratio:.2f}x")
    print()


def with_outliers(model: onnx.ModelProto, factor: float = 30.0, channels: int = 4) -> onnx.ModelProto:
    """The same function with LLM-like activation outliers: a few LayerNorm output channels scaled up
    by ``factor`` (gamma, beta) and the rows of the weights reading them scaled down (exact in float)."""
    from onnxpress.passes.smoothquant import smoothquant_targets

    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for name in smoothquant_targets(graph):
        ln = tensors[name].inputs[0]
        if ln.op != "LayerNormalization":
            continue
        k = ln.inputs[1].values.size
        f = np.ones(k, np.float32)
        f[np.linspace(0, k - 1, channels).astype(int)] = factor
        for i in (1, 2):
            if len(ln.inputs) > i and isinstance(ln.inputs[i], gs.Constant):
                ln.inputs[i] = gs.Constant(f"{ln.inputs[i].name}_outlier_{name}", ln.inputs[i].values * f)
        for reader in list(tensors[name].outputs):
            w = reader.inputs[1]
            trans = reader.op == "Gemm" and int(reader.attrs.get("transB", 0))
            scaled = w.values / (f[None, :] if trans else f[:, None])
            reader.inputs[1] = gs.Constant(f"{w.name}_outlier", scaled.astype(np.float32))
    return gs.export_onnx(graph.cleanup().toposort())


def section_b(args, models: Path, calib: Path, x: np.ndarray, labels: np.ndarray) -> None:
    found = reference(models, "transformer", x, "B.", end="\n")
    if found is None:
        return
    _, base, ref = found
    rows = []
    for label, model0 in (("reference", base), ("with 30x outliers", with_outliers(base))):
        y0 = logits(model0, x)
        assert np.max(np.abs(y0 - ref)) <= 1e-4 * np.max(np.abs(ref)), "outlier injection changed float logits"
        for alpha in (None, 0.5, 0.8):
            if alpha is None:
                model, smoothed = model0, "-"
            else:
                res = advanced.smoothquant(model0, str(calib), alpha=alpha, max_samples=args.max_samples)
                model, smoothed = res.model, str(res.stats["smoothquant.smoothed"])
                y_float = logits(model, x)
                assert np.max(np.abs(y_float - ref)) <= 1e-4 * np.max(np.abs(ref)), "SmoothQuant changed float logits"
            q = quantize(model, calib=str(calib), method=args.method, per_channel=True, max_samples=args.max_samples,
                         int8_method=args.int8_method)
            yq = logits(q.model, x)
            rows.append([label, "plain" if alpha is None else f"SmoothQuant a={alpha}", smoothed,
                         f"{sqnr(ref, yq):.2f}", f"{accuracy(yq, labels):.4f}"])
    from onnxpress.passes.smoothquant import smoothquant_targets

    names = smoothquant_targets(gs.import_onnx(base))
    stats = advanced.collect_channel_stats(base, str(calib), {n: -1 for n in names}, max_samples=args.max_samples)
    spread = ", ".join(f"{np.max(o.max_abs()) / np.median(o.max_abs()):.1f}" for o in stats.values())
    print(f"B. transformer, int8 per-channel weights, uint8 activations ({args.method} calibration); "
          f"outlier ratio max/median of per-channel max|X| at the smoothed inputs: {spread}")
    print(f"   float accuracy {accuracy(ref, labels):.4f}; 'with 30x outliers' is the same float function with 4")
    print("   channels of each LayerNorm output scaled up 30x and the weight rows reading them scaled down (synthetic)")
    print(format_table(["model", "variant", "activations smoothed", "QDQ SQNR dB", "QDQ acc"], rows))
    print()


def _timing(first: onnx.ModelProto, second: onnx.ModelProto, x: np.ndarray, repeats: int):
    """(session creation ratio, batch-64 latency ratio) of the second model over the first, interleaved medians."""
    create = {0: [], 1: []}
    for _ in range(5):
        for i, m in enumerate((first, second)):
            t = time.perf_counter()
            make_session(m, threads=1)
            create[i].append(time.perf_counter() - t)
    sessions = [make_session(m, threads=1) for m in (first, second)]
    runs = {0: [], 1: []}
    feed = {"input": x[:64]}
    for s in sessions:
        s.run(None, feed)
    for _ in range(repeats):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feed)
            runs[i].append(time.perf_counter() - t)
    med = statistics.median
    return med(create[1]) / med(create[0]), med(runs[1]) / med(runs[0])


def section_c(args, models: Path, calib: Path, x: np.ndarray, labels: np.ndarray) -> None:
    for name in ("mobilenet", "resnet", "transformer"):
        found = reference(models, name, x, f"C. {name}")
        if found is None:
            continue
        _, base, ref = found
        n, tensors, channels = weight_stats(base)
        graph = gs.import_onnx(base)
        stats = advanced.collect_channel_stats(base, str(calib), dict(bias_correction_inputs(graph)), spatial=True,
                                               max_samples=args.max_samples)
        means = {k: m if (m := o.mean_map()) is not None else o.mean() for k, o in stats.items()}

        def small_float(quantizer):  # the weight-only rows leave weights below MIN_ELEMENTS float: so does BC
            return lambda node, w: quantizer(node, w) if w.size >= MIN_ELEMENTS else w

        rows = [["float", "32", "inf", "-", f"{accuracy(ref, labels):.4f}"]]
        for bits in (8, 4):
            for per_channel in (False, True):
                y = logits(weight_only(base, per_channel=per_channel, bits=bits, min_elements=MIN_ELEMENTS), x)
                q = small_float(lambda node, w, pc=per_channel, b=bits: quantized_weight(node, w, per_channel=pc,
                                                                                         bits=b))
                bc = run_passes(base, [CorrectBias(means, quantizer=q)]).model
                yb = logits(weight_only(bc, per_channel=per_channel, bits=bits, min_elements=MIN_ELEMENTS), x)
                overhead = 32 * (channels if per_channel else tensors) / n
                label = f"linear int{bits} per-{'channel' if per_channel else 'tensor'}"
                rows.append([label, f"{bits + overhead:.3f}", f"{sqnr(ref, y):.2f}", f"{sqnr(ref, yb):.2f}",
                             f"{accuracy(y, labels):.4f}"])
        hessians = advanced.collect_layer_hessians(base, str(calib), min_elements=MIN_ELEMENTS,
                                                   max_samples=args.max_samples)
        linear4 = []
        for refit in (0, 1):
            q4 = int4_gptq(hessians, refit)
            y = logits(weight_only(base, quantizer=q4, min_elements=MIN_ELEMENTS), x)
            bc = run_passes(base, [CorrectBias(means, quantizer=small_float(q4))]).model
            yb = logits(weight_only(bc, quantizer=q4, min_elements=MIN_ELEMENTS), x)
            linear4.append(sqnr(ref, y))
            rows.append([f"linear int4 per-channel, GPTQ{' + scale refit' * refit} + output-space gain",
                         f"{4 + 32 * channels / n:.3f}", f"{sqnr(ref, y):.2f}", f"{sqnr(ref, yb):.2f}",
                         f"{accuracy(y, labels):.4f}"])
        cb_models = {}
        for bits, group, scaled, keep, gain, fed, refit in (
            (6, None, False, False, True, False, 0), (4, None, False, False, True, False, 0),
            (4, 16, False, False, True, False, 0), (4, None, True, False, True, False, 0),
            (4, None, True, True, False, False, 0), (4, None, True, False, False, False, 0),
            (4, None, True, False, True, True, 0), (4, None, True, False, True, True, 1),
        ):
            settings = dict(bits=bits, group_size=group, min_elements=MIN_ELEMENTS, channel_scale=scaled,
                            preserve_norm=keep, keep_gain=gain, hessians=hessians if fed else None, refit=refit)
            res = run_passes(base, [CodebookWeights(**settings)])
            cb_models.setdefault(bits, res.model)
            y = logits(res.model, x)
            p2 = CodebookWeights(**settings)
            yb = logits(run_passes(base, [CorrectBias(means, quantizer=p2.reconstruct), p2]).model, x)
            stored_bits = 8 * res.stats["codebook_weights.bytes_after"] / n
            where = ("per layer" if group is None else f"per {group} channels") + (" + channel scales" * scaled)
            where += " (norm-kept)" * keep + " (no gain fix)" * (not keep and not gain)
            where += ", GPTQ indices" * fed + " + codebook refit" * refit + " + output-space gain" * fed
            rows.append([f"codebook {bits}-bit {where}", f"{stored_bits:.3f}", f"{sqnr(ref, y):.2f}",
                         f"{sqnr(ref, yb):.2f}", f"{accuracy(y, labels):.4f}"])
        size_f, size_cb = len(base.SerializeToString()), len(cb_models[4].SerializeToString())
        create_ratio, run_ratio = _timing(base, cb_models[4], x, args.repeats)
        print(f"C. {name}: weights only ({n:,} weights in {tensors} tensors; activations float)")
        print(format_table(["weights", "stored bits/weight", "SQNR dB", "SQNR dB +BC", "acc (no BC)"], rows))
        print(f"   codebook 4-bit (GPTQ + refit) - best linear int4 with GPTQ: {sqnr(ref, y) - max(linear4):+.2f} dB "
              f"(target +3)")
        print(f"   codebook-4 model file {size_cb / 1e3:.1f} kB vs float {size_f / 1e3:.1f} kB "
              f"({size_cb / size_f:.3f}x); onnxruntime (opt. level all, folds the rebuild at load): "
              f"session creation {create_ratio:.2f}x, batch-64 latency {run_ratio:.2f}x float\n")


SECTION_D_SETTINGS = (
    ("defaults", {}),
    ("method minmax", {"method": "minmax"}),
    ("method percentile", {"method": "percentile"}),
    ("activations int8", {"activations": "int8"}),
    ("max_samples 128", {"max_samples": 128}),
    ("max_samples 32", {"max_samples": 32}),
    ("no bias correction, rtn", {"bias_correction": False, "int8_method": "rtn"}),
)


def section_d(args, models: Path, calib: Path, x: np.ndarray, labels: np.ndarray) -> None:
    """Activation-range equalization (quantize equalize="activations") against the same settings without it."""
    rows = []
    for name in ("mobilenet", "resnet", "concat"):
        found = reference(models, name, x, f"D. {name}")
        if found is None:
            continue
        path, _, ref = found
        for label, kwargs in SECTION_D_SETTINGS:
            got = []
            for eq in (None, "activations"):
                res = quantize(str(path), calib=str(calib), equalize=eq, **kwargs)
                got.append(logits(res.model, x))
            a, b = sqnr(ref, got[0]), sqnr(ref, got[1])
            rows.append([name, label, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}", f"{accuracy(got[1], labels):.4f}"])
    print("D. activation-range equalization (onnxpress.quantize, int8 per-channel weights, logit SQNR on the test "
          "split): without vs with equalize='activations', every other setting as named")
    print(format_table(["model", "settings", "SQNR dB", "SQNR dB equalized", "gain", "acc equalized"], rows))


def section_e(args, models: Path, calib: Path, x: np.ndarray, labels: np.ndarray) -> None:
    """Recurrent weights as codebooks: the reference LSTM's W and R (most of its bytes), with and without data."""
    found = reference(models, "lstm", x, "E.")
    if found is None:
        return
    path, base, ref = found
    size = len(base.SerializeToString())
    rows = [["float", "1.000", "inf", f"{accuracy(ref, labels):.4f}"]]
    for label, kwargs in (("int8 (quantize defaults: DynamicQuantizeLSTM)", {"calib": str(calib)}),
                          ("codebook 4-bit, nearest level (no data)", {"codebook": 4}),
                          ("codebook 4-bit, GPTQ + refit on the input / hidden-state moments", {"codebook": 4,
                                                                                               "calib": str(calib)}),
                          ("codebook 6-bit, nearest level (no data)", {"codebook": 6}),
                          ("codebook 6-bit, GPTQ + refit", {"codebook": 6, "calib": str(calib)})):
        res = quantize(str(path), **kwargs)
        y = logits(res.model, x)
        rows.append([label, f"{len(res.model.SerializeToString()) / size:.3f}", f"{sqnr(ref, y):.2f}",
                     f"{accuracy(y, labels):.4f}"])
    print("E. reference LSTM (digit rows through a bidirectional LSTM): its W and R as codebook indices "
          "(onnxpress.quantize(codebook=B)), beside the int8 default; size against the cleaned float model")
    print(format_table(["weights", "size", "SQNR dB", "accuracy"], rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"), help="folder with the reference models and data")
    ap.add_argument("--method", default=DEFAULT_METHOD, help="activation calibration method for the QDQ rows")
    ap.add_argument("--max-samples", type=int, default=500, help="calibration samples")
    ap.add_argument("--repeats", type=int, default=30, help="timing repeats (interleaved)")
    ap.add_argument("--sections", default="abcde", help="which sections to run (subset of 'abcde')")
    ap.add_argument("--int8-method", default="rtn", choices=("rtn", "gptq"),
                    help="int8 weight rounding of sections A and B (rtn: the rounding their comparisons were "
                         "published with; quantize's default with data is gptq)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    models = Path(args.models)
    calib, test = models / "digits32_calib.npz", models / "digits32_test.npz"
    if not (calib.exists() and test.exists()):
        print(f"need {calib} and {test}")
        return 2
    with np.load(test) as t:
        x, labels = t["input"].astype(np.float32), t["labels"]
    if "a" in args.sections:
        section_a(args, models, calib, x, labels)
    if "b" in args.sections:
        section_b(args, models, calib, x, labels)
    if "c" in args.sections:
        section_c(args, models, calib, x, labels)
    if "d" in args.sections:
        section_d(args, models, calib, x, labels)
    if "e" in args.sections:
        section_e(args, models, calib, x, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
