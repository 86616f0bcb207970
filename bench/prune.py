"""Channel pruning on the reference CNNs: MACs, latency, size, accuracy and logit SQNR before fine-tune.

For each model and each global ratio (default 30% and 50% of prunable channels, kept counts
rounded to a multiple of 8), prints side by side against the unpruned model:

- MACs ratio (Conv/Gemm/MatMul, per sample) and size ratio (serialised bytes);
- latency ratio at batch 1 and batch 64 on onnxruntime (all graph optimisations, 2 intra-op threads,
  spinning off): the two sessions are timed back to back, alternating which goes first, and the
  ratio reported is the median of the per-pair ratios — absolute times on a shared machine are
  not comparable between runs;
- top-1 accuracy of both on the digits test split and the logit SQNR of the pruned model.

With ``--compensate`` each ratio is also run with mean compensation (removed channels' means on the
calibration split folded into the next layer's bias).

Run:  python bench/prune.py [--models models] [--ratios 0.3 0.5] [--criterion l2] [--repeats 31] [--compensate]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent


def _time(session, feed, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return (time.perf_counter() - start) / runs


def latency_ratio(base, cand, feed, repeats: int, runs: int) -> float:
    """Median over repeats of (candidate time / base time), the two timed back to back, order alternating.

    A ratio per adjacent pair cancels slow drifts of the machine's load (other processes share the
    cores); the median discards the pairs a burst of load hit.
    """
    _time(base, feed, 2)
    _time(cand, feed, 2)
    ratios = []
    for i in range(repeats):
        if i % 2:
            c = _time(cand, feed, runs)
            b = _time(base, feed, runs)
        else:
            b = _time(base, feed, runs)
            c = _time(cand, feed, runs)
        ratios.append(c / b)
    return statistics.median(ratios)


def _logits(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([session.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="folder with the reference models")
    parser.add_argument("--names", nargs="+", default=["resnet", "mobilenet", "concat"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--criterion", default="l2", choices=["l1", "l2", "bn", "act", "contrib"])
    parser.add_argument("--multiple", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=31, help="interleaved timing pairs per batch size")
    parser.add_argument("--compensate", action="store_true", help="also rows with mean compensation (needs calib)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from onnxpress.passes.flops import count_macs, model_size_bytes
    from onnxpress.prune import prune, sqnr_db
    from onnxpress.reporting import format_table
    from onnxpress.runtime import make_session

    test_path = args.models / "digits32_test.npz"
    calib_path = args.models / "digits32_calib.npz"
    if test_path.exists():
        test = np.load(test_path)
        x_test, labels = test["input"].astype(np.float32), test["labels"]
    else:
        print(f"note: {test_path} missing; accuracy not measured, SQNR on random inputs")
        x_test, labels = np.random.default_rng(0).standard_normal((360, 1, 32, 32)).astype(np.float32), None
    x1 = x_test[:1]
    x64 = x_test[:64] if len(x_test) >= 64 else np.repeat(x_test, 64 // len(x_test) + 1, axis=0)[:64]

    header = ["model", "ratio", "comp", "MACs", "lat b1", "lat b64", "size", "acc before", "acc after", "SQNR dB"]
    rows = []
    for name in args.names:
        path = args.models / f"{name}.onnx"
        if not path.exists():
            print(f"note: {path} missing; skipped")
            continue
        base_model = onnx.load(path)
        base = make_session(base_model, threads=2)
        ref = _logits(base, x_test)
        macs0 = sum(count_macs(base_model).values())
        size0 = model_size_bytes(base_model)
        variants = [(r, c) for r in args.ratios for c in ((False, True) if args.compensate else (False,))]
        for ratio, comp in variants:
            result = prune(
                base_model, ratio=ratio, criterion=args.criterion, multiple=args.multiple,
                calib=calib_path if args.criterion in ("act", "contrib") or comp else None, compensate=comp,
            )
            cand = make_session(result.model, threads=2)
            out = _logits(cand, x_test)
            lat1 = latency_ratio(base, cand, {"input": x1}, args.repeats, runs=20)
            lat64 = latency_ratio(base, cand, {"input": x64}, args.repeats, runs=2)
            acc = (lambda y: f"{(y.argmax(1) == labels).mean():.4f}") if labels is not None else (lambda y: "n/a")
            rows.append([
                name, f"{ratio:.0%}", "yes" if comp else "no",
                f"{sum(count_macs(result.model).values()) / macs0:.3f}x",
                f"{lat1:.3f}x", f"{lat64:.3f}x",
                f"{model_size_bytes(result.model) / size0:.3f}x",
                acc(ref), acc(out), f"{sqnr_db(ref, out):.1f}",
            ])
            print(format_table(header, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"global ratio, criterion {args.criterion}, kept channels rounded to {args.multiple}; no fine-tune;")
    print(f"latency: onnxruntime ORT_ENABLE_ALL, 2 threads, median ratio of {args.repeats} back-to-back pairs")
    print(format_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
