"""``onnxpress optimize`` on the reference models, side by side with uniform settings.

Rows per model: uniform int8; uniform int8 + 50% rank on every layer; the searched per-layer mix
(int8/fp32 × rank × per-group channel pruning, no fine-tune) under a latency budget equal to the
measured latency ratio of each uniform model (``--budget`` replaces both by one value); and the
issue's target pipeline, searched with pruning and fine-tune at ``--target`` (default latency 0.2,
``--max-drop 1``, labels of the test split; ``--target 0`` skips it). Columns: logit SQNR (dB, vs the
original on the test split), top-1 accuracy, latency ratio, size ratio, MACs ratio.

Latency: onnxruntime CPU (all graph optimisations, spinning off, 1 intra-op thread), batch 64;
the original and the three candidates are timed interleaved in one loop (order rotated every
round) and each ratio is of medians over ``--repeats`` rounds, so machine load hits all alike.

    python bench/optimize.py [--models resnet mobilenet] [--repeats 40] [--report DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxpress.optimize import optimize
from onnxpress.passes.flops import count_macs
from onnxpress.prune import sqnr_db
from onnxpress.recipe import apply_recipe, prepare
from onnxpress.reporting import format_table
from onnxpress.search import SearchSpace, measure_latency
from onnxpress.sensitivity import analyze_sensitivity, read_feeds, run_outputs

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "models" / "digits32_calib.npz"
TEST = ROOT / "models" / "digits32_test.npz"


def _acc(flat: np.ndarray, labels: np.ndarray) -> float:
    return float((flat.reshape(len(labels), -1).argmax(1) == labels).mean())


def bench(name: str, repeats: int, budget: float | None, report: Path | None, cache: Path,
          target: float = 0.2, max_drop: float = 1.0) -> list[list[str]]:
    """Build the three models for one reference model and measure them side by side."""
    path = ROOT / "models" / f"{name}.onnx"
    original = prepare(path)
    sens = analyze_sensitivity(original, str(CALIB), cache_dir=cache)
    space = SearchSpace(sens, original.ByteSize())
    uniform = {
        "uniform int8": space.recipe(space.uniform("int8")),
        "uniform int8 + 50% rank": space.recipe(space.uniform("int8", 0.5)),
    }
    models = {k: apply_recipe(original, r, str(CALIB), prepared=True) for k, r in uniform.items()}
    feeds = read_feeds(original, str(TEST), 10_000)
    labels = np.load(TEST)["labels"]
    latency_feed = read_feeds(original, str(TEST), 64)[0]
    budgets = [budget] if budget is not None else measure_latency(original, list(models.values()), latency_feed,
                                                                   repeats=repeats)
    for b in budgets:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            res = optimize(path, Path(tmp) / f"{name}.onnx", calib=str(CALIB), eval_data=str(TEST),
                           labels=str(TEST), budget=f"latency={b:.4f}", cache_dir=cache, report=report)
        models[f"searched (latency<={b:.3f})"] = res.model
        print(f"{name}: search at {b:.3f} took {time.monotonic() - t0:.0f} s, feasible={res.feasible}, "
              f"chose {res.choices}", file=sys.stderr)
    if target > 0:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            res = optimize(path, Path(tmp) / f"{name}.onnx", calib=str(CALIB), eval_data=str(TEST),
                           labels=str(TEST), budget=f"latency={target:g}", max_drop=max_drop, finetune=True,
                           cache_dir=cache, report=report)
        models[f"searched+prune+finetune (latency<={target:g}, drop<={max_drop:g})"] = res.model
        print(f"{name}: target search took {time.monotonic() - t0:.0f} s, feasible={res.feasible}, "
              f"recipe steps {[s['pass'] for s in res.recipe['steps']]}, chose {res.choices}", file=sys.stderr)
    ratios = measure_latency(original, list(models.values()), latency_feed, repeats=repeats)
    ref = run_outputs(original, feeds)
    macs0 = sum(count_macs(original).values())
    rows = [[name, "fp32 original", "inf", f"{_acc(ref, labels):.4f}", "1.000", "1.000", "1.000"]]
    for (label, model), lat in zip(models.items(), ratios, strict=True):
        out = run_outputs(model, feeds)
        rows.append([name, label, f"{sqnr_db(ref, out):.2f}", f"{_acc(out, labels):.4f}", f"{lat:.3f}",
                     f"{model.ByteSize() / original.ByteSize():.3f}",
                     f"{sum(count_macs(model).values()) / macs0:.3f}"])
    return rows


def main() -> None:
    """Parse arguments, run every model, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "mobilenet"])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--budget", type=float, help="latency budget (default: uniform int8 + 50%% rank's ratio)")
    parser.add_argument("--target", type=float, default=0.2,
                        help="latency budget of the pruning + fine-tune row (0: skip that row)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points the target row may lose")
    parser.add_argument("--report", type=Path, help="write the searched model's report here (last model)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxpress-bench-cache")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows += bench(name, args.repeats, args.budget, args.report, args.cache, args.target, args.max_drop)
    print(format_table(["model", "setting", "SQNR dB", "accuracy", "latency", "size", "MACs"], rows))


if __name__ == "__main__":
    main()
