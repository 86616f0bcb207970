"""``onnxpress optimize MODEL -o OUT --calib DATA [--budget latency=0.3] ...``: budgeted per-layer search."""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxpress.cli import add_common, add_dims, bounded_float, dims_of, positive_int, progress_enabled
from onnxpress.reporting import format_table

# 0 used to read as "no limit" and a negative limit stopped at once: refused here, before any work
_SECONDS = bounded_float(0.0, float("inf"), include_low=False, include_high=False, what="a positive number of seconds")

MISSED_BUDGET = 3
"""Exit status when the model written (no candidate met them all) misses a --budget or --max-drop.

The epilog's "20 dB" is ``onnxpress.optimize.USABLE_SQNR_DB`` (not imported here: the CLI starts faster
without the search; tests/test_optimize.py checks the two agree)."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``optimize`` subcommand."""
    p = sub.add_parser("optimize", help="search per-layer int8/fp32 x pruning x low-rank options under a budget",
                       epilog=f"exit status: 0 the model written meets every budget (and --max-drop); "
                              f"{MISSED_BUDGET} none met them all: it is the cheapest found within --max-drop "
                              "(without one: of at least 20 dB SQNR, where any is), named in a warning; "
                              "2 an error, nothing written")
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the best model (its recipe goes beside it)")
    p.add_argument("--calib", required=True, help="calibration inputs (.npz, folder of .npz, or .npy for one input)")
    p.add_argument("--eval", dest="eval_data", help="evaluation inputs (default: the calibration data)")
    p.add_argument("--labels", help="labels for --eval (.npy or .npz with key 'labels')")
    p.add_argument("--budget", action="append",
                   help="latency=F | size=F | flops=F (fraction of the original; default latency=0.5); repeat to "
                        "add constraints: the search plans against every one, and every one must hold as measured; "
                        "a size budget also offers W4A8 (int8 kernels on 4-bit weight codes), int4 and codebook "
                        "layers (recurrent weights too), and plans once on int8 kernels only")
    p.add_argument("--max-drop", type=float, help="largest accepted accuracy drop in points (needs --labels)")
    p.add_argument("--recipe", help="apply this recipe (JSON) instead of searching (no search options with it)")
    p.add_argument("--report", help="folder for report.md, report.json and PNGs")
    p.add_argument("--time-limit", type=_SECONDS,
                   help="seconds (> 0; default no limit) for the search: each phase stops at its next step once it "
                        "has passed and the best model so far is kept; loading, the chosen model's last measurements "
                        "and --report run after it (a 5 s limit on the reference ResNet took 14 s in all)")
    p.add_argument("--cache-dir", help="sensitivity cache folder (default ~/.cache/onnxpress)")
    p.add_argument("--finetune", action="store_true",
                   help="distil the original into each pruned or split candidate on --calib, then quantize (torch)")
    p.add_argument("--finetune-epochs", type=positive_int, help="epochs of that fine-tune (default 60)")
    p.add_argument("--finetune-device",
                   help="where that fine-tune trains: cpu (default), cuda, cuda:N, or auto (recorded in the recipe)")
    p.add_argument("--probe-epochs", type=positive_int,
                   help="epochs of a probe fine-tune ranking in-budget structures (default none: most budget first)")
    p.add_argument("--latency-threads", type=positive_int,
                   help="onnxruntime threads when timing candidates (the latency budget holds there; default 1)")
    p.add_argument("--no-auto-ranges", dest="auto_ranges", action="store_false",
                   help="keep the chosen model's mse activation ranges (default: rebuild it with each tensor's range "
                        "method picked on the calibration outputs, then with its activation channels equalized, each "
                        "kept if it measures better; same kernels and cost)")
    add_dims(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the search (or the recipe) and print the chosen model's numbers."""
    from onnxpress.optimize import USABLE_SQNR_DB, optimize

    result = optimize(
        args.model, args.output, calib=args.calib, eval_data=args.eval_data, labels=args.labels,
        budget=args.budget, max_drop=args.max_drop, recipe=args.recipe, report=args.report,
        time_limit=args.time_limit, cache_dir=args.cache_dir, finetune=args.finetune,
        finetune_epochs=args.finetune_epochs, finetune_device=args.finetune_device, probe_epochs=args.probe_epochs,
        latency_threads=args.latency_threads,
        auto_ranges=args.auto_ranges, dims=dims_of(args), progress=progress_enabled(args),
    )
    rows = []
    for c in result.candidates:
        rows.append([c.note or "recipe", f"{c.sqnr_db:.2f}" if c.sqnr_db is not None else "-",
                     f"{c.accuracy:.4f}" if c.accuracy is not None else "-",
                     f"{c.latency_ratio:.3f}" if c.latency_ratio is not None else "-",
                     f"{c.size_ratio:.3f}" if c.size_ratio is not None else "-",
                     f"{c.flops_ratio:.3f}" if c.flops_ratio is not None else "-",
                     "*" if c is result.chosen else ""])
    print(format_table(["candidate", "SQNR dB", "accuracy", "latency", "size", "MACs", "chosen"], rows))
    missed = result.budget is not None and not result.feasible
    if missed:
        sqnr = result.chosen.sqnr_db if result.chosen is not None else None
        what = ("within --max-drop" if result.max_drop_kept() else
                f"of at least {USABLE_SQNR_DB:g} dB SQNR" if args.max_drop is None and sqnr is not None
                and sqnr >= USABLE_SQNR_DB else "found")
        print(f"warning: no candidate met every budget{' and --max-drop' if args.max_drop is not None else ''}; "
              f"wrote the cheapest {what}: {result.verdict()}")
    if result.timed_out:
        print(f"time limit of {args.time_limit:g} s reached: the best of the candidates above (a longer limit "
              "searches further)")
    if args.recipe and Path(args.recipe).resolve() == result.recipe_path.resolve():  # kept as given
        print(f"wrote {result.output}; its recipe is the one given, {result.recipe_path}")
    else:
        print(f"wrote {result.output} and {result.recipe_path}")
    # the model is written either way (the best found), but a script running `optimize && deploy` must not take
    # a model over its budget for one within it: a status of its own, apart from 2 (nothing written)
    return MISSED_BUDGET if missed else 0
