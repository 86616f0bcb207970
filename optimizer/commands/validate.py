"""``onnxpress validate REF CAND --data DATA``: compare a candidate with its reference on onnxruntime."""

from __future__ import annotations

import argparse
import os

from onnxpress.cli import add_common, bounded_float, positive_int, progress_enabled, usage_error
from onnxpress.model_io import check_output_path

# gates a typo could make impossible (--min-agreement 99: a percentage) or meaningless (nan): refused up front
_ERROR = bounded_float(0.0, float("inf"), include_low=True, include_high=False, what="a number")
_FRACTION = bounded_float(0.0, 1.0, include_low=True, include_high=True, what="a fraction")
_DB = bounded_float(float("-inf"), float("inf"), include_low=False, include_high=False, what="a number of dB")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``validate`` subcommand."""
    p = sub.add_parser(
        "validate",
        help="compare a candidate model with its reference: errors, top-1 agreement, accuracy, latency, size",
        description="Run both models on onnxruntime CPU over the data; print per-output max abs error, "
        "SQNR, cosine, top-1 agreement (and accuracy with labels), latency, file size and op counts.",
    )
    p.add_argument("reference", help="the reference .onnx model")
    p.add_argument("candidate", help="the candidate .onnx model (same inputs, every reference output)")
    p.add_argument("--data", required=True, help=".npz (arrays keyed by input name), a folder of .npz feeds, "
                   "or one .npy for a one-input model")
    p.add_argument("--labels", help="class labels (.npy, or .npz with key 'labels'); default: 'labels' in --data")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT (atomically)")
    p.add_argument("--batch", type=positive_int, default=64, help="samples per run and for latency (default 64)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads of both sessions (default: onnxruntime's)")
    p.add_argument("--repeats", type=positive_int, help="timed runs per model (default 20)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--max-samples", type=positive_int, help="compare on at most this many samples")
    p.add_argument("--max-abs-error", type=_ERROR, help="fail (exit 2) when an output's max abs error is larger")
    p.add_argument("--min-sqnr", type=_DB, help="fail (exit 2) when an output's SQNR in dB is lower")
    p.add_argument("--min-agreement", type=_FRACTION,
                   help="fail (exit 2) when a top-1 agreement (a fraction in [0, 1]) is lower")
    p.add_argument("--layers", action="store_true",
                   help="also compare every intermediate tensor both models produce under the same name and show "
                        "where the candidate adds the most noise (Q/DQ pairs run as float arithmetic there)")
    p.add_argument("--layer-samples", type=positive_int,
                   help="samples for --layers (default 64, at most --max-samples)")
    p.add_argument("--plot", metavar="PNG", help="with --layers: also draw each tensor's SQNR in graph order")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate, print the table, write the JSON record, then apply the thresholds."""
    from onnxpress.validate import validate

    inputs = [p for p in (args.reference, args.candidate, args.data, args.labels) if p]
    # options that would be ignored, and two outputs in one file, refused before any work
    refusals = [("--plot draws the per-tensor comparison: add --layers", args.plot and not args.layers),
                ("--layer-samples sets the per-tensor comparison's samples: add --layers, or drop it",
                 args.layer_samples is not None and not args.layers),
                ("--repeats sets the latency runs, which --no-latency skips: drop one",
                 args.repeats is not None and args.no_latency),
                (f"--json and --plot name the same file {args.json}: give two paths",
                 args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot))]
    for message, refused in refusals:
        if refused:
            return usage_error("validate", message)
    for out, example in ((args.json, "report.json"), (args.plot, "layers.png")):
        if out:
            check_output_path(out, inputs, example)
    report = validate(
        args.reference,
        args.candidate,
        args.data,
        labels=args.labels,
        batch_size=args.batch,
        repeats=20 if args.repeats is None else args.repeats,
        threads=args.threads,
        latency=not args.no_latency,
        max_samples=args.max_samples,
        layers=args.layers,
        layer_samples=64 if args.layer_samples is None else args.layer_samples,
        progress=progress_enabled(args),
    )
    print(report.format())
    if args.json:
        print(f"wrote {report.write_json(args.json)}")
    if args.plot and not report.layers:  # the comparison ran and found no tensor to draw: the gates still apply
        print(f"warning: no {args.plot} written: {report.why_no_layers()}")
    elif args.plot:
        print(f"wrote {report.plot_layers(args.plot)}")
    report.require(max_abs_error=args.max_abs_error, min_sqnr_db=args.min_sqnr, min_agreement=args.min_agreement)
    return 0
