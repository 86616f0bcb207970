"""``onnxpress calibrate MODEL --data DATA -o table.npz``: activation ranges from sample data."""

from __future__ import annotations

import argparse
import collections
import statistics

from onnxpress.cli import add_common, progress_enabled
from onnxpress.reporting import format_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` subcommand."""
    p = sub.add_parser("calibrate", help="calibrate activation ranges (KL, minmax, percentile, MSE) into a table")
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("--data", required=True, help=".npz of inputs (samples on axis 0; axis 1 of a sequence-first "
                   "[seq, batch, ...] input), a folder of .npz feeds, or one .npy for a one-input model")
    p.add_argument("-o", "--output", required=True, help="where to write the calibration table (.npz)")
    p.add_argument("--method", default="mse", choices=("kl", "minmax", "percentile", "mse"),
                   help="range rule (default mse, as quantize's; kl: TensorRT-style entropy search)")
    p.add_argument("--percentile", type=float, help="percentile of |x| kept (--method percentile; default 99.99)")
    p.add_argument("--bins", type=int, help="minimum histogram resolution, a power of two (not --method minmax; "
                   "default 2048)")
    p.add_argument("--bits", type=int, help="quantization bit width the search assumes (--method kl or mse; "
                   "default 8)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most N samples")
    p.add_argument("--batch", type=int, default=64, help="samples per inference call")
    add_common(p)
    p.set_defaults(func=run)


def family_rows(model: object, table: object) -> list[list[str]]:
    """One row per producing op type: tensors, excluded, median threshold/amax, median |range|."""
    from onnxpress.model_io import load_model

    m = load_model(model, check=False)  # type: ignore[arg-type]
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    fams: dict[str, dict[str, list]] = collections.defaultdict(lambda: {"ok": [], "excluded": [], "clip": []})
    for name in list(table.ranges) + list(table.excluded):  # type: ignore[attr-defined]
        fam = producer.get(name, "graph input")
        if name in table.excluded:  # type: ignore[attr-defined]
            fams[fam]["excluded"].append(name)
            continue
        rng = table.ranges[name]  # type: ignore[attr-defined]
        fams[fam]["ok"].append(rng.amax)
        if name in table.histograms:  # type: ignore[attr-defined]
            fams[fam]["clip"].append(table.summary(name).clip_ratio)  # type: ignore[attr-defined]
    rows = []
    for fam, d in sorted(fams.items()):
        clip = f"{statistics.median(d['clip']):.3f}" if d["clip"] else "-"
        amax = f"{statistics.median(d['ok']):.4g}" if d["ok"] else "-"
        rows.append([fam, str(len(d["ok"])), str(len(d["excluded"])), amax, clip])
    return rows


def run(args: argparse.Namespace) -> int:
    """Calibrate, print a summary per tensor family, save the table."""
    from onnxpress.calibrate import calibrate
    from onnxpress.model_io import check_output_path, load_model

    check_output_path(args.output, [args.model, args.data], example="table.npz")
    model = load_model(args.model, external_data=False)  # the graph, for the summary; calibrate reads the file
    table = calibrate(
        args.model,
        args.data,
        method=args.method,
        bits=args.bits,
        bins=args.bins,
        percentile=args.percentile,
        batch_size=args.batch,
        max_samples=args.max_samples,
        progress=progress_enabled(args),
    )
    header = ["producer", "tensors", "excluded", "median |range|", "median thr/amax"]
    print(format_table(header, family_rows(model, table)))
    for name, why in sorted(table.excluded.items()):
        print(f"excluded {name}: {why}")
    out = table.save(args.output)
    print(f"{args.method}: {len(table)} ranges from {table.meta['samples']} samples; wrote {out}")
    return 0
