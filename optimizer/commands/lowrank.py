"""``onnxpress lowrank MODEL -o OUT [--rank R | --energy E | --flops F] [--calib DATA]``: low-rank splits."""

from __future__ import annotations

import argparse
import collections

from onnxpress.cli import add_common, add_dims, bounded_float, dims_of, positive_int, progress_enabled, usage_error
from onnxpress.reporting import attention_lines

_fraction = bounded_float(0.0, 1.0, include_low=False, include_high=True, what="a fraction")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``lowrank`` subcommand."""
    p = sub.add_parser(
        "lowrank",
        help="split Gemm/MatMul/Conv weights into low-rank factors (truncated SVD, plain or data-aware)",
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the split model")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=positive_int, help="the same rank for every layer")
    how.add_argument("--energy", type=_fraction, help="keep this fraction of each layer's spectral energy")
    how.add_argument("--flops", type=_fraction, help="whole-model MACs budget as a fraction of the original")
    p.add_argument("--calib", help="calibration data (.npz, folder of .npz, or .npy for one input) for the "
                   "data-aware (whitened) SVD")
    p.add_argument("--multiple", type=positive_int, default=1, help="round ranks up to a multiple of this")
    p.add_argument("--tucker", action="store_true", help="Tucker-2 (1x1, kxk core, 1x1) for Convs")
    p.add_argument("--max-samples", type=positive_int, help="calibration samples to use (default 512)")
    p.add_argument("--joint", action="store_true",
                   help="split sibling Gemm/MatMul layers that read the same input (attention Q/K/V) as one unit "
                        "with a shared first factor (one SVD of their stacked weights)")
    p.add_argument("--by-latency", action="store_true",
                   help="with --flops: time each layer and its splits on onnxruntime first and spend the MACs "
                        "budget where it saves the most time (splits that are not faster are not used)")
    p.add_argument("--latency-step", choices=["time", "macs"],
                   help="with --by-latency: rank the greedy's steps by loss per second saved (time) or per MAC "
                        "saved among the splits measured faster (macs); default time")
    p.add_argument("--latency-batch", type=positive_int,
                   help="with --by-latency: batch size the layers are timed at (default 64)")
    p.add_argument("--threads", type=positive_int, help="with --by-latency: onnxruntime threads for the timing "
                                                        "(default 1)")
    p.add_argument("--keep-ranks", action="store_true",
                   help="keep the graph's tensor ranks (do not run a transformer's token-wise ops on [rows, features])")
    p.add_argument("--keep-attention", action="store_true",
                   help="keep attention as the graph's own ops (do not run it as onnxruntime's MultiHeadAttention, "
                        "which other runtimes do not know)")
    p.add_argument("--keep-bias", action="store_true",
                   help="leave each split layer's bias as an addition over its output (do not fold it into the "
                        "second factor behind a column of ones)")
    add_dims(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Split and print the per-layer table."""
    from onnxpress.lowrank import lowrank

    if args.by_latency and args.flops is None:
        return usage_error("lowrank", "--by-latency steers a --flops budget; give --flops")
    # options that would be ignored without a word (their defaults are None so that a given one shows)
    timing = [flag for flag, value in (("--latency-step", args.latency_step), ("--latency-batch", args.latency_batch),
                                       ("--threads", args.threads)) if value is not None]
    if timing and not args.by_latency:
        return usage_error("lowrank", f"{', '.join(timing)} set{'s' if len(timing) == 1 else ''} up the layer "
                                      f"timing of --by-latency: add it, or drop {'it' if len(timing) == 1 else 'them'}")
    if args.max_samples is not None and args.calib is None:
        return usage_error("lowrank", "--max-samples caps the --calib samples of the data-aware SVD: add --calib, "
                                      "or drop it")
    step, batch, threads = args.latency_step or "time", args.latency_batch or 64, args.threads or 1
    result = lowrank(
        args.model,
        args.output,
        rank=args.rank,
        energy=args.energy,
        flops=args.flops,
        calib=args.calib,
        multiple=args.multiple,
        conv_method="tucker2" if args.tucker else "channel",
        max_samples=512 if args.max_samples is None else args.max_samples,
        joint=args.joint,
        by_latency=args.by_latency,
        latency_step=step,
        latency_batch=batch,
        threads=threads,
        dims=dims_of(args),
        flatten_tokens=not args.keep_ranks,
        fuse_attention=not args.keep_attention,
        fold_bias=not args.keep_bias,
        progress=progress_enabled(args),
    )
    print(result.table())
    if result.layer_seconds is not None:
        before, after = result.layer_seconds
        print(f"timed layers at batch {batch}, {threads} thread(s): {before * 1e3:.2f} ms -> "
              f"{after * 1e3:.2f} ms ({after / before:.3f})")
    if result.flattened:
        print(f"ran the token-wise region on [rows, features] ({result.flattened} dense layers; "
              "onnxruntime's rank-2 LayerNorm/GELU kernels are faster here; --keep-ranks to skip)")
    if result.attention_fused:
        print(f"ran {result.attention_fused} attention block(s) as onnxruntime's MultiHeadAttention (exact to float "
              "rounding; an onnxruntime-only node: --keep-attention to keep the graph's ops)")
    for line in attention_lines(result.notes):  # attention that looked fusable and was left, and why
        print(line)
    if result.biases_folded:
        print(f"folded the bias of {result.biases_folded} split layer(s) into the second factor behind a column of "
              "ones (exact; onnxruntime then adds no bias over the wide output; --keep-bias to skip)")
    # how the layers that were split were factored (the table's method column, counted)
    methods = collections.Counter(lay.method for lay in result.layers if lay.skipped is None)
    names = {"svd": "plain SVD", "whitened-svd": "data-aware (whitened) SVD", "tucker2": "plain Tucker-2"}
    how = ", ".join(f"{names.get(m, m)} for {n} layer(s)" for m, n in sorted(methods.items())) or "no layer split"
    if result.data_aware and methods.get("tucker2"):  # Tucker-2 reads no moments: say so where the data was given
        how += " (Tucker-2 keeps weight energy; the calibration data steers the SVD splits)"
    print(f"{how}; wrote {result.output}")
    return 0
