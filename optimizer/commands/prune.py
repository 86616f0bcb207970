"""``onnxpress prune MODEL -o OUT [--zero-only | --ratio R] [--criterion C] [--calib DATA] [--multiple M]``."""

from __future__ import annotations

import argparse

from onnxpress.cli import add_common, add_dims, bounded_float, dims_of, positive_int, progress_enabled, usage_error
from onnxpress.passes.prune_channels import CRITERIA
from onnxpress.reporting import format_table

_ratio = bounded_float(0.0, 1.0, include_low=True, include_high=False, what="a ratio")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune`` subcommand."""
    p = sub.add_parser(
        "prune",
        help="remove channels: exactly (zero/unused channels) or to a target ratio by importance",
        description="Prune channels on the ONNX graph. Without --ratio only provably zero or unused "
        "channels are removed (exact); with --ratio the least important channels go too (lossy).",
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the pruned model")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--zero-only", action="store_true", help="only remove provably zero/unused channels (default)")
    mode.add_argument("--ratio", type=_ratio, help="fraction of prunable channels to remove, in [0, 1)")
    p.add_argument("--criterion", choices=CRITERIA, default="l2", help="channel importance (default l2)")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="one threshold or one per group")
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data (.npz, folder, or .npy) for act/contrib/--compensate")
    p.add_argument(
        "--compensate", action="store_true", help="fold removed channels' means (from --calib) into the next biases"
    )
    p.add_argument("--multiple", type=positive_int, default=1, help="round kept channels per group to a multiple")
    p.add_argument("--max-samples", type=positive_int,
                   help="calibration samples for act/contrib/--compensate (default 256)")
    add_dims(p)
    add_common(p)
    p.set_defaults(func=run)


def _fmt(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def _ratio_text(before: int | None, after: int | None) -> str:
    return "n/a" if not before or after is None else f"{after / before:.3f}"


def run(args: argparse.Namespace) -> int:
    """Prune and print params, MACs and size before/after per layer and in total."""
    from onnxpress.prune import prune

    if args.max_samples is not None and not (args.ratio and (args.criterion in ("act", "contrib") or args.compensate)):
        return usage_error("prune", "--max-samples caps the samples of --criterion act/contrib or --compensate "
                                    "(with --ratio > 0): add them, or drop it")
    result = prune(
        args.model,
        args.output,
        ratio=None if args.zero_only else args.ratio,
        criterion=args.criterion,
        scope=args.scope,
        multiple=args.multiple,
        calib=args.calib,
        compensate=args.compensate,
        max_samples=256 if args.max_samples is None else args.max_samples,
        dims=dims_of(args),
        progress=progress_enabled(args),
    )
    header = ["layer", "op", "params before", "params after", "MACs before", "MACs after", "MACs ratio"]
    rows = [
        [r.name, r.op, _fmt(r.params_before), _fmt(r.params_after), _fmt(r.macs_before), _fmt(r.macs_after),
         _ratio_text(r.macs_before, r.macs_after)]
        for r in (*result.layers, result.total)
    ]
    print(format_table(header, rows))
    from onnxpress.validate import model_size

    # the files on disk (with external data), not the normalised model's serialised size
    before, after = model_size(args.model), model_size(result.output)
    print(f"size: {before:,} -> {after:,} bytes ({after / before:.3f}x); MACs are per sample")
    if result.total.macs_before is None:
        print("MACs n/a: they depend on input dimensions without a size; give them with --dim NAME=SIZE (or --calib)")
    removed = result.stats.get("prune_zero_channels.channels_removed", 0)
    lossy = result.stats.get("prune_channels.channels_removed", 0)
    how = (f"{lossy} by importance ({args.criterion})" if args.ratio else
           f"none by importance ({'--ratio 0' if args.ratio == 0 else 'no --ratio'})")
    print(f"channels removed: {removed} exactly (zero or unused), {how}")
    if folded := result.stats.get("fold_constants.nodes_removed", 0):  # the size changes without a channel gone
        print(f"folded {folded} node(s) that compute constants into initializers (exact)")
    for note in result.notes:
        print(f"note: {note}")
    if args.ratio and not lossy:  # asked for a ratio and got nothing: say why
        prunable = result.stats.get("prune_channels.prunable_channels", 0)
        why = ("no channel group of this model can be pruned (an LSTM's or a graph output's channels stay; the "
               "notes say which)" if not prunable else
               f"of {prunable} prunable channels, the ratio rounded to none per group"
               + (f" (each group keeps a multiple of --multiple {args.multiple})" if args.multiple > 1 else ""))
        print(f"warning: --ratio {args.ratio:g} removed no channel: {why}")
    print(f"wrote {result.output}")
    return 0
