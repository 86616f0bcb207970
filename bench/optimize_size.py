"""``onnxpress optimize --budget size=B`` on the reference models, beside uniform int8, uniform W4A8 and onnxruntime.

Rows per model and size budget: onnxruntime's ``quantize_static`` in its best configuration for these models
(QDQ, per-channel weights, uint8 activations, MinMax: ``bench/quantize.py``'s "ort-best" without the Percentile
trial), onnxpress ``quantize`` with its defaults (int8), with ``--weights int4 --activations uint8`` (W4A8 on every
large weight), and the searched mix of ``optimize`` at each ``--budgets`` fraction of the original's size
(no fine-tune, the test inputs for fidelity without labels, as ``bench/optimize.py``'s same-latency searches).

Columns: logit SQNR (dB, against the original on the test split), top-1 accuracy, size ratio, latency ratio to
the original at batch 64 on one thread (interleaved, medians over ``--repeats`` rounds: ``bench/quantize.py``'s
``latency_ratios``), whether the row is within the budget, and what the search picked per layer kind.

A size budget offers each layer int8, W4A8 (the int8 kernel on 4-bit codes), int4 weight-only (MatMul/Gemm)
and 4-bit codebook weights (float kernels), ranks and channel pruning; it plans once with all of them and once
by precision alone on int8 kernels (from uniform int8, W4A8 where bytes must go; no fp32, int4 or codebook layer,
no split or pruning), and measures both.

    python bench/optimize_size.py [--models resnet mobilenet concat transformer] [--budgets 0.15 0.2]

``--models lstm`` runs the reference LSTM (not in the default list): its W and R are most of its bytes, and a size
budget below int8's 0.261x codes them (thirty-first session: size=0.15 0.142x at 38.37 dB, size=0.2 0.153x at
38.45 dB, at 0.94-0.99x fp32 latency: a float LSTM kernel; int8 49.60 dB at 0.261x and 0.739x; onnxruntime's
best int8 leaves the LSTM float, 1.003x).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np

import onnxpress
from onnxpress.reporting import format_table
from onnxpress.runtime import make_session

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import latency_ratios, logits, ort_quantize, sqnr_db  # noqa: E402  (the sibling bench's helpers)

MODELS = Path(__file__).resolve().parents[1] / "models"


def _kinds(recipe: dict) -> str:
    """What a recipe's quantize step does per layer, in short: ``w4a8 2, cb4 1, fp32 3, rank 1``."""
    out: collections.Counter[str] = collections.Counter()
    for step in recipe["steps"]:
        if step["pass"] == "quantize":
            for key, name in (("w4a8_layers", "w4a8"), ("int4_layers", "int4"), ("codebook_layers", "cb4"),
                              ("exclude", "fp32")):
                out[name] += len(step.get(key, []))
            if step.get("weights") == "int4":
                out["int4 (all)"] += 1
        elif step["pass"] == "lowrank":
            out["rank"] += len(step["ranks"])
        elif step["pass"] == "prune":
            out["pruned groups"] += len(step["ratio"]) if isinstance(step["ratio"], dict) else 1
    return ", ".join(f"{k} {v}" for k, v in out.items() if v) or "int8"


def bench(name: str, budgets: list[float], repeats: int, work: Path) -> list[list]:
    src = MODELS / f"{name}.onnx"
    calib_path, test_path = MODELS / "digits32_calib.npz", MODELS / "digits32_test.npz"
    with np.load(calib_path) as d:
        calib = d["input"].astype(np.float32)
    with np.load(test_path) as d:
        x, labels = d["input"].astype(np.float32), d["labels"]
    from onnxruntime.quantization import QuantType

    built: dict[str, Path | str] = {}
    built["onnxruntime int8 (best)"] = ort_quantize(src, calib, work, "ort_best", per_channel=True,
                                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    onnxpress.quantize(src, work / f"{name}_int8.onnx", calib=calib_path)
    built["onnxpress int8"] = work / f"{name}_int8.onnx"
    onnxpress.quantize(src, work / f"{name}_w4a8.onnx", calib=calib_path, weights="int4", activations="uint8")
    built["onnxpress w4a8"] = work / f"{name}_w4a8.onnx"
    picked = {}
    for b in budgets:
        out = work / f"{name}_size{b:g}.onnx"
        res = onnxpress.optimize(src, out, calib=calib_path, eval_data=test_path, budget=f"size={b:g}",
                                 cache_dir=work / "cache")
        built[f"optimize size={b:g}"] = out
        picked[f"optimize size={b:g}"] = f"{res.chosen.note}: {_kinds(res.chosen.recipe)}"
    ref_sess = make_session(str(src), threads=1)
    ref = logits(ref_sess, x)
    sessions = {"fp32": ref_sess}
    rows = []
    for label, path in built.items():
        if isinstance(path, str):  # onnxruntime's quantizer failed: its error is the row
            rows.append([name, label, path, "", "", "", "", ""])
            continue
        sessions[label] = make_session(str(path), threads=1)
    ratios = latency_ratios(sessions, x, batch=64, repeats=repeats)
    size0 = src.stat().st_size
    for label, path in built.items():
        if isinstance(path, str):
            continue
        out = logits(sessions[label], x)
        size = Path(path).stat().st_size / size0
        within = "/".join("yes" if size <= b else "no" for b in budgets)
        rows.append([name, label, f"{sqnr_db(ref, out):.2f}", f"{float((out.argmax(1) == labels).mean()):.4f}",
                     f"{size:.3f}", f"{ratios[label]:.3f}", within, picked.get(label, "")])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["resnet", "mobilenet", "concat", "transformer"])
    p.add_argument("--budgets", nargs="*", type=float, default=[0.15, 0.2])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench(name, args.budgets, args.repeats, Path(tmp))
            print(f"{name} done", file=sys.stderr, flush=True)
    within = "within " + "/".join(f"{b:g}" for b in args.budgets)
    print(format_table(["model", "row", "SQNR dB", "accuracy", "size", "latency (1 thread, b64)", within,
                        "search's pick"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
