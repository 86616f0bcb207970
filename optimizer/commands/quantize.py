"""``onnxpress quantize MODEL -o OUT --calib DATA``: int8 QDQ (or 4-bit weight-only) quantization."""

from __future__ import annotations

import argparse
import collections
import re
from typing import TYPE_CHECKING

from onnxpress.cli import add_common, progress_enabled
from onnxpress.reporting import attention_lines, format_table

if TYPE_CHECKING:
    import onnx


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` subcommand."""
    from onnxpress.quantize import DEFAULT_METHOD

    p = sub.add_parser("quantize", help="int8 QDQ quantization from calibration data (or int4 weight-only)")
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the quantized model")
    p.add_argument("--calib", help=".npz of inputs (samples on axis 0; axis 1 of a sequence-first "
                   "[seq, batch, ...] input), a folder of .npz feeds, or one .npy for a one-input model")
    p.add_argument("--table", help="a calibration table saved by 'onnxpress calibrate' (instead of --calib)")
    p.add_argument(
        "--method",
        default=None,
        choices=("kl", "minmax", "percentile", "mse", "auto"),
        help=f"calibration method (default {DEFAULT_METHOD}; with --table, its ranges as they are, or recomputed from "
        "its histograms with the method named); auto: per tensor the one whose range gives the "
        "closest outputs on the first 256 calibration samples (one onnxruntime run per trial: seconds on small "
        "models)",
    )
    p.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor (default: per channel)")
    p.add_argument(
        "--activations",
        default=None,
        choices=("uint8", "int8", "dynamic"),
        help="uint8 asymmetric (onnxruntime x86 integer kernels, default), int8 symmetric (TensorRT), or dynamic "
        "(quantized at run time, no --calib: MatMul/Gemm only; the default without data for models without convs)",
    )
    p.add_argument(
        "--weights", default="int8", choices=("int8", "int4"),
        help="int8 QDQ, or int4 weight-only MatMul/Gemm; int4 with --activations uint8|int8: 4-bit codes "
        "(weights of 4096+ elements, one scale per channel, two to a byte) on the int8 kernels, Conv too (W4A8)"
    )
    p.add_argument("--block-size", type=int, default=None,
                   help="int4 block size (power of two >= 16; default 64); only with --weights int4 or --int4-layers")
    p.add_argument("--keep-float16", action="store_true", default=None,
                   help="with --weights int4: keep a float16 export computing in float16 (no float32 copy of the "
                        "weights; slower on CPU). Default: only for models over 2 GiB")
    p.add_argument(
        "--int4-layers",
        nargs="*",
        default=[],
        metavar="NODE",
        help="with int8 weights: these MatMul/Gemm layers get 4-bit weights (MatMulNBits), the rest int8 QDQ",
    )
    p.add_argument(
        "--codebook-layers",
        nargs="*",
        default=[],
        metavar="NODE",
        help="with int8 weights: these Conv/Gemm/MatMul (or LSTM/GRU/RNN) layers keep float kernels on 4-bit "
        "codebook weights (smaller than int8, float speed), the rest int8 QDQ",
    )
    p.add_argument(
        "--w4a8-layers",
        nargs="*",
        default=[],
        metavar="NODE",
        help="with int8 weights: these layers' int8 kernels read 4-bit weight codes (weights of 4096+ elements, "
        "stored two to a byte; W4A8), the rest 8-bit ones",
    )
    p.add_argument(
        "--int4-method",
        default=None,
        choices=("gptq", "rtn"),
        help="int4 rounding: gptq (error-compensating, from --calib; the default when --calib is given) "
        "or rtn (round to nearest, no data; the default without --calib)",
    )
    p.add_argument(
        "--int8-method",
        default=None,
        choices=("gptq", "rtn"),
        help="int8 weight rounding: gptq (error-compensating, from --calib; the default when --calib is "
        "given and its input moments are cheap) or rtn (round to nearest; the default otherwise, with a "
        "line saying why when it was the cost). Same scales and kernels",
    )
    p.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        metavar="NODE",
        help="keep float: node names (an unnamed node goes by its first output's name), op:<OpType> or "
             "re:<regex on node names>",
    )
    p.add_argument(
        "--override",
        action="append",
        type=_override,
        default=[],
        metavar="TENSOR:KEY=VALUE[,KEY=VALUE]",
        dest="overrides",
        help="per-tensor setting (repeatable): dtype=uint8|int8|float, method=kl|minmax|percentile|mse, "
        "range=LO:HI (activations), per_channel=true|false (weights); e.g. --override logits:dtype=float "
        "--override attn_out:method=percentile",
    )
    p.add_argument("--keep-attention", action="store_true",
                   help="keep attention as the graph's own ops (do not run it as onnxruntime's MultiHeadAttention, "
                        "which other runtimes do not know)")
    p.add_argument(
        "--quantize-ops",
        nargs="*",
        default=[],
        choices=("LayerNormalization", "HardSigmoid", "Softmax", "MatMul", "Gelu", "SiLU"),
        help="ops kept float by default to quantize anyway (MatMul: the MatMuls of two activations, attention's; "
        "Gelu: the Mul/Add nodes of a GELU written out around Erf/Tanh; SiLU: x*sigmoid(x) on a float tensor)",
    )
    p.add_argument("--max-samples", type=int, default=None, help="calibrate on at most N samples")
    # issue 10 (onnxpress.advanced): float rewrites before calibration, or codebook weights instead of QDQ
    p.add_argument("--equalize", nargs="?", const="split", default=None,
                   choices=("split", "skip", "relu", "activations"),
                   help="cross-layer equalization first (default mode split: exact, ReLU6 -> Relu + Min); "
                   "activations: stretch each activation's channels to one range from --calib (per-channel weights)")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="correct biases for the output shift measured on the quantized model, or with --table "
                   "alone from the BatchNorm statistics before each layer (default: on for int8 where either "
                   "applies; --no-bias-correction turns it off)")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant with this alpha (0..1) before calibration")
    p.add_argument("--codebook", type=int, default=None, metavar="BITS",
                   help="k-means codebook weights, 2^BITS levels per layer on channel-normalised weights "
                   "(weight-only, replaces QDQ; Conv/Gemm/MatMul and LSTM/GRU/RNN weights; BITS 1..8, indices "
                   "packed 8/4/2 per byte at 1/2/3-4 bits; with --calib fitted to each layer's output)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every node left in float (default: one line per op and reason, a few names each)")
    p.add_argument("--no-latency-check", dest="latency_check", action="store_false",
                   help="skip the quick latency check of the written model against the original (on the first "
                        "calibration batch)")
    add_common(p)
    p.set_defaults(func=run)


def print_kept_float(decisions, *, verbose: bool = False, names: int = 3) -> None:
    """One line per node left float with ``verbose``; otherwise one line per (op, reason) with a few names.

    A transformer leaves dozens of residual Adds, Softmaxes and attention MatMuls float for the same
    few reasons: a line each buried the lines that matter (a BERT-style encoder printed 66).
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for d in decisions:
        groups.setdefault((d.op, d.reason), []).append(d.name)
    for (op, reason), members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if verbose or len(members) == 1:
            for name in members:
                print(f"float  {name} ({op}): {reason}")
            continue
        shown = ", ".join(members[:names]) + (f", ... ({len(members) - names} more; -v lists them)"
                                              if len(members) > names else "")
        print(f"float  {len(members)} x {op}: {reason}: {shown}")


_OVERRIDE_KEYS = ("dtype", "method", "range", "per_channel")


def _merged(items: list[tuple[str, dict[str, object]]]) -> dict[str, dict[str, object]]:
    """One settings dict per tensor (a later --override of the same key wins)."""
    out: dict[str, dict[str, object]] = {}
    for name, settings in items:
        out.setdefault(name, {}).update(settings)
    return out


def _override(text: str) -> tuple[str, dict[str, object]]:
    """Parse ``TENSOR:KEY=VALUE[,KEY=VALUE]`` (the tensor name may hold ``:``; the first ``:KEY=`` splits)."""
    match = re.fullmatch(rf"(.+?):((?:{'|'.join(_OVERRIDE_KEYS)})=.*)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected TENSOR:KEY=VALUE with KEY one of {', '.join(_OVERRIDE_KEYS)}, "
                                         f"got {text!r}")
    name, settings = match.groups()
    out: dict[str, object] = {}
    for item in settings.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in _OVERRIDE_KEYS:
            raise argparse.ArgumentTypeError(f"bad setting {item!r} in {text!r}: keys are {', '.join(_OVERRIDE_KEYS)}")
        if key == "range":
            lo, _, hi = value.partition(":")  # without ":" hi is "" and float() refuses it
            try:
                out[key] = (float(lo), float(hi))
            except ValueError:
                raise argparse.ArgumentTypeError(f"range must be LO:HI (two numbers), got {value!r}") from None
        elif key == "per_channel":
            if value.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"per_channel must be true or false, got {value!r}")
            out[key] = value.lower() == "true"
        else:
            out[key] = value
    return name, out


def run(args: argparse.Namespace) -> int:
    """Quantize and print what was quantized, what stayed float and why, and the sizes."""
    from onnxpress.quantize import quantize

    result = quantize(
        args.model,
        args.output,
        calib=args.calib,
        table=args.table,
        method=args.method,
        per_channel=not args.per_tensor,
        activations=args.activations,
        weights=args.weights,
        keep_float16=args.keep_float16,
        block_size=args.block_size,
        exclude=args.exclude,
        overrides=_merged(args.overrides),
        quantize_ops=args.quantize_ops,
        max_samples=args.max_samples,
        progress=progress_enabled(args),
        equalize=args.equalize,
        bias_correction=args.bias_correction,
        smoothquant=args.smoothquant,
        codebook=args.codebook,
        int4_method=args.int4_method,
        int4_layers=args.int4_layers,
        int8_method=args.int8_method,
        codebook_layers=args.codebook_layers,
        w4a8_layers=args.w4a8_layers,
        fuse_attention=not args.keep_attention,
    )
    counts = collections.Counter(d.op for d in result.quantized)
    floats = collections.Counter(d.op for d in result.kept_float)
    ops = sorted(set(counts) | set(floats))
    print(format_table(["op", "quantized", "float"], [[op, counts.get(op, 0), floats.get(op, 0)] for op in ops]))
    pools = result.stats.get("reducemean_to_global_pool.rewritten", 0)
    if pools:
        print(f"rewrote {pools} spatial-mean ReduceMean as GlobalAveragePool (same values; an integer pool in "
              "onnxruntime)")
    swish, sigmoid = (result.stats.get(f"integer_hard_activations.{k}", 0) for k in ("hardswish", "hardsigmoid"))
    if swish or sigmoid:
        what = " and ".join(f"{n} {op}" for n, op in ((swish, "HardSwish"), (sigmoid, "HardSigmoid")) if n)
        print(f"ran {what} as onnxruntime's integer Add{' + Mul' if swish else ''} (no integer kernel of their own"
              f"{'; each HardSwish gate rounded to 8 bits' if swish else ''})")
    if padded := result.stats.get("pad_input_channels.convs", 0):
        print(f"padded the input of {padded} int8 input conv(s) to 4 channels with zeros (same values; onnxruntime's "
              "integer conv is slow on 1-3 input channels)")
    if args.smoothquant is not None:
        smoothed = result.stats.get("smoothquant.smoothed", 0)
        line = f"SmoothQuant (alpha {args.smoothquant:g}): {smoothed} activation(s) smoothed"
        why = [n for n in result.notes if n.startswith("smoothquant: ")]
        print(line + (f"; none could be ({why[0][len('smoothquant: '):]})" if not smoothed and why else ""))
    if args.equalize is not None:
        key, what = (("equalize_activations", "activation-range equalization") if args.equalize == "activations"
                     else ("equalize_cross_layer", "cross-layer equalization"))
        pairs = result.stats.get(f"{key}.pairs", 0)
        why = [n for n in result.notes if n.startswith(f"{key}: ")]
        none = (f"; none found ({why[0][len(key) + 2:]})" if why else
                "; the model has no two Conv (or Gemm) layers joined only by Relu, LeakyRelu or ReLU6-like Clips")
        print(f"{what}: {pairs} layer pair(s) equalized" + (none if not pairs else ""))
        if args.verbose:  # each pair left as it was (a too-few-samples warning is logged, under its own prefix)
            for note in why if pairs else why[1:]:
                print("  " + note[len(key) + 2:])
    for note in result.notes:
        if note.startswith(("gptq: ", "float16: ", "dynamic: ")):
            print(note.split(": ", 1)[1])
        elif note.startswith(("auto ranges: ", "override: ", "table: ", "float: ")):
            print(note)
    flat = result.stats.get("flatten_tokens.layers", 0)
    if flat:
        print(f"ran {result.stats.get('flatten_tokens.regions', 0)} token-wise region(s) on [rows, features] "
              f"({flat} dense layers; {result.stats.get('flatten_tokens.nodes_added', 0)} node(s) added), "
              "so their bias Adds go into the integer kernels")
    attention = result.stats.get("fuse_attention.fused", 0)
    int8_attention = result.stats.get("quantized_attention.fused", 0)
    if attention:
        print(f"ran {attention} attention block(s) as onnxruntime's MultiHeadAttention, in float as attention stays "
              "(exact to float rounding; an onnxruntime-only node: --keep-attention to keep the graph's ops)")
    if int8_attention:
        print(f"ran {int8_attention} of them with their int8 query/key/value projections as one onnxruntime "
              "QAttention (the same int8 weights; one kernel instead of four)")
    for line in attention_lines(result.notes):  # attention that looked fusable and was left, and why
        print(line)
    gemms = result.stats.get("matmul_add_to_gemm.fused", 0)
    if gemms:
        print(f"fused {gemms} rank-2 MatMul + bias Add into Gemm (same values; an int32 bias and one integer "
              "kernel in onnxruntime)")
    if counts.get("ConvTranspose") and args.codebook is None:  # a U-Net's up-convolution ran float either way
        print(f"{counts['ConvTranspose']} ConvTranspose quantized for storage: onnxruntime's CPU provider has no "
              "integer ConvTranspose and dequantizes its int8 weights at run time (smaller file, float speed)")
    if lstms := result.stats.get("quantize_lstm_dynamic.lstm_layers", 0):
        print(f"{lstms} LSTM as onnxruntime's DynamicQuantizeLSTM: int8 weights, input and hidden state quantized "
              "at run time (ONNX has no integer recurrent op)")
    if tied := result.stats.get("quantize_weights_int4.embeddings_tied_int4", 0):
        print(f"{tied} token table(s) equal to the output layer's weight (tied embeddings): stored once, as that "
              "layer's 4-bit blocks, read by onnxruntime's GatherBlockQuantized")
    if tied := result.stats.get("share_transposed_constants.constants_transposed", 0):
        print(f"{tied} weight(s) equal to another's transpose (tied embeddings): stored once, the other read "
              "through a Transpose that onnxruntime folds at load")
    print_kept_float(result.kept_float, verbose=args.verbose)
    for name, why in sorted(result.excluded_tensors.items()):
        print(f"no range  {name}: {why}")
    kind = "int4 weight-only" if args.weights == "int4" else f"int8 weights, {args.activations or 'uint8'} activations"
    if "quantize_dynamic.layers" in result.stats:
        kind = f"int8 weights, dynamic activations ({result.stats['quantize_dynamic.layers']} MatMul/Gemm layers)"
    elif args.weights == "int4" and args.activations in ("uint8", "int8"):  # W4A8: quantize's rule for it
        weights, four = (result.stats.get(f"insert_qdq.weights_{k}", 0) for k in ("quantized", "4bit"))
        kind = (f"int4 weights on int8 kernels, {args.activations} activations ({four} of {weights} weights 4-bit, "
                f"the rest 8-bit under 4096 elements; {result.stats.get('insert_qdq.weights_gptq', 0)} GPTQ-rounded)")
    elif args.weights == "int4" and args.codebook is None:
        gptq, n4 = (result.stats.get(f"quantize_weights_int4.weights_int4{k}", 0) for k in ("_gptq", ""))
        kind += (f" ({gptq} of {n4} layers GPTQ-rounded)" if n4 else
                 " (no layer took 4-bit weights: MatMul/Gemm weights of 4096 elements or more do; see above)")
    elif args.codebook is None:
        weights = result.stats.get("insert_qdq.weights_quantized", 0)
        kind += (f" ({result.stats.get('insert_qdq.weights_gptq', 0)} of {weights} weights GPTQ-rounded)" if weights
                 else " (no weight quantized; the float layers above say why)")
        if four := result.stats.get("insert_qdq.weights_4bit", 0):
            kind += f", {four} layer weight(s) with 4-bit codes (W4A8)"
    if args.codebook is not None:
        kind = f"{args.codebook}-bit codebook weights (weight-only)"
    elif books := result.stats.get("codebook_weights.layers", 0):
        from onnxpress.quantize import CODEBOOK_LAYER_BITS

        kind += f", {books} layer(s) as {CODEBOOK_LAYER_BITS}-bit codebook weights on float kernels"
    print(
        f"{kind}: size {result.size_before / 1e6:.3f} MB -> {result.size_after / 1e6:.3f} MB "
        f"({result.size_ratio:.3f}x); wrote {result.output}"
    )
    if args.latency_check and args.calib is not None:
        # within --max-samples: the check once timed 24 samples of a run told to read 10
        latency_check(args.model, result.output, args.calib,
                      batch=32 if args.max_samples is None else min(32, args.max_samples))
    return 0


LATENCY_CHECK_MAX_BYTES = 1 << 30
"""Models larger than this (with their external data) are not timed after quantizing: loading takes long."""


def latency_check(original: str, written: str, calib: str, *, batch: int = 32, rounds: int = 10) -> float | None:
    """Time the written model against the original on the first calibration batch; print the ratio and fidelity.

    A quantized model can run slower than its original where onnxruntime lacks integer kernels for its
    ops (EfficientNet-style SiLU and squeeze-excite gates measured 1.17x fp32); a user should not learn
    that in production. Interleaved medians of ``rounds`` runs each, default threads; ``onnxpress
    validate`` measures it properly. Returns the ratio (None when skipped).
    """
    import statistics

    from onnxpress.calibration.readers import first_batch, sample_axes, samples_in
    from onnxpress.model_io import load_model
    from onnxpress.runtime import make_session, time_interleaved
    from onnxpress.validate import model_size

    if model_size(original) + model_size(written) > LATENCY_CHECK_MAX_BYTES:
        return None
    from onnxpress.errors import UnsupportedModelError

    source = load_model(original)
    feed = first_batch(calib, source, batch)
    try:
        baseline = make_session(original, what="original model")
    except UnsupportedModelError as exc:  # a file onnxruntime cannot read as saved: time the same model, cleaned
        from onnxpress.pipeline import cleanup_passes, run_passes

        baseline = make_session(run_passes(source, cleanup_passes()).model, what="cleaned original model")
        print(f"note: {exc}; the latency check times the original after onnxpress cleanup instead")
    sessions = [baseline, make_session(written, what="quantized model")]
    # the float model cleanup writes, when its exact rewrites change what onnxruntime runs (PRelu as LeakyRelu
    # made a separation net 0.42x fp32 in float, where its int8 model read 0.48x at batch 32)
    cleaned = _rewritten_float_model(source)
    if cleaned is not None:
        sessions.append(make_session(cleaned, what="cleaned model"))
    times = time_interleaved(sessions, feed, rounds, warmup=2)
    ratio = statistics.median(times[1]) / statistics.median(times[0])
    n = samples_in(feed, sample_axes(source))
    print(f"latency {ratio:.2f}x the original (first calibration batch of {n}, {rounds} interleaved runs each; "
          "onnxpress validate measures it on your data)")
    _fidelity_line(sessions[0].run(None, feed), sessions[1].run(None, feed))
    if ratio > 1.0:
        print("warning: the quantized model ran slower than the original here: onnxruntime has no fast integer "
              "kernel for some of its ops; onnxpress validate --layers and onnxpress optimize (per-layer int8 or "
              "float under a latency budget) help find which")
    elif cleaned is not None:
        float_ratio = statistics.median(times[2]) / statistics.median(times[0])
        if float_ratio < ratio:
            print(f"note: the float model that onnxpress cleanup writes (exact rewrites, no quantization) ran "
                  f"{float_ratio:.2f}x here, faster than the quantized one; onnxpress optimize keeps layers float "
                  "where int8 does not pay")
    return ratio


LOW_SQNR_DB = 20.0
"""Below this logit SQNR on the calibration batch the CLI warns: quantized models of the reference nets and of
the exports tried read 25-55 dB there, and the silent opset-upgrade bug fixed in the twelfth session read 7.9."""


def _fidelity_line(reference: list, candidate: list) -> None:
    """Print the SQNR of the float outputs (concatenated) and the top-1 agreement of the first, when 2-D."""
    import numpy as np

    from onnxpress.prune import sqnr_db

    pairs = [(r, c) for r, c in zip(reference, candidate, strict=False)
             if getattr(r, "dtype", None) is not None and r.dtype.kind == "f" and r.shape == c.shape]
    if not pairs:
        return
    db = sqnr_db(np.concatenate([r.ravel() for r, _ in pairs]), np.concatenate([c.ravel() for _, c in pairs]))
    first = pairs[0][0]
    agree = ""
    if first.ndim == 2 and first.shape[1] > 1:
        agree = f", top-1 agreement {np.mean(first.argmax(1) == pairs[0][1].argmax(1)):.1%}"
    print(f"fidelity {db:.1f} dB SQNR over the float outputs{agree} on that batch (onnxpress validate measures it "
          "on held-out data)")
    if db < LOW_SQNR_DB:
        print(f"warning: below {LOW_SQNR_DB:g} dB the quantized model's outputs are far from the original's; "
              "onnxpress validate --layers shows where the noise enters, and --exclude keeps those layers float")


def _rewritten_float_model(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` after the cleanup passes when they rewrote an op onnxruntime would run (not only folds), else None."""
    from onnxpress.pipeline import cleanup_passes, run_passes

    if not any(n.op_type == "PRelu" for n in model.graph.node):  # the one rewrite that changes the float speed
        return None
    result = run_passes(model, cleanup_passes())
    if not result.stats.get("rewrite_prelu.modified"):  # folding constants or BatchNorm: onnxruntime folds them too
        return None
    return result.model
