"""Sensitivity with and without reused reference activations: wall time and the largest score difference.

For each reference model, ``analyze_sensitivity`` (default options, no cache) runs ``--rounds`` times
each way, alternating which goes first: *whole* (``REUSE_BUDGET = 0``: every candidate model runs from
the graph inputs, as before the reuse) and *reuse* (only the nodes a candidate changed, fed the cached
reference values). Prints the median and every wall time, the ratio of the medians, how many candidates
ran in part, and the largest |difference| of a score between the two (dB; equal infinities count 0).
Absolute times on a shared machine vary; the interleaving is what makes the two comparable.

Run:  python bench/sensitivity_reuse.py [--models resnet mobilenet transformer] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet", "mobilenet", "transformer"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib", default=str(ROOT / "models" / "digits32_calib.npz"))
    args = ap.parse_args(argv)

    import onnxpress.sensitivity as sens
    from onnxpress.recipe import prepare

    budget = sens.REUSE_BUDGET
    runs: dict[str, int] = {}
    build = sens._Reuse.build

    def counting(*a, **k):  # keep the last cache's counts of partial and whole runs
        reuse = build(*a, **k)
        if reuse is not None:
            runs.clear()
            runs.update(reuse.runs)  # the same dict: filled in as the candidates run
            reuse.runs = runs
        return reuse

    sens._Reuse.build = counting
    print(f"{'model':12} {'whole s (median; all)':28} {'reuse s (median; all)':28} {'speedup':>8} "
          f"{'in part':>8} {'max |d| dB':>11}")
    for name in args.models:
        model = prepare(ROOT / "models" / f"{name}.onnx")
        walls: dict[str, list[float]] = {"whole": [], "reuse": []}
        scores: dict[str, tuple] = {}
        for r in range(args.rounds):
            for how in ("whole", "reuse") if r % 2 == 0 else ("reuse", "whole"):
                sens.REUSE_BUDGET = 0 if how == "whole" else budget
                start = time.perf_counter()
                result = sens.analyze_sensitivity(model, args.calib, cache_dir=False)
                walls[how].append(time.perf_counter() - start)
                scores[how] = result.scores
        diff = 0.0
        for a, b in zip(scores["whole"], scores["reuse"], strict=True):
            assert (a.layer, a.option) == (b.layer, b.option)
            if not (math.isinf(a.sqnr_db) and a.sqnr_db == b.sqnr_db):
                diff = max(diff, abs(a.sqnr_db - b.sqnr_db))
        med = {k: statistics.median(v) for k, v in walls.items()}
        fmt = {k: f"{med[k]:.2f}; " + " ".join(f"{x:.2f}" for x in v) for k, v in walls.items()}
        print(f"{name:12} {fmt['whole']:28} {fmt['reuse']:28} {med['whole'] / med['reuse']:7.2f}x "
              f"{runs.get('partial', 0):>3}/{sum(runs.values()):<4} {diff:11.2e}", flush=True)
    sens.REUSE_BUDGET = budget
    return 0


if __name__ == "__main__":
    sys.exit(main())
