"""onnx's node conformance cases through onnxpress and through onnxruntime's ``quantize_static``.

Every case is quantized on its own inputs (one calibration sample) by both tools with the same
settings (uint8 activations, int8 per-channel weights, QDQ) and classified by ``tests/conformance.py``
(a quantized result must keep every float output within 30 dB SQNR of the reference, integer
outputs equal). onnxruntime's quantizer has no typed errors: any exception it raises is counted as
``raised`` (ours would be a ``crash``). It runs in a temporary folder (it drops files in the cwd).

    python bench/conformance.py                  # all 1,884 cases, both tools, plus the exact operations
    python bench/conformance.py --step 10        # a tenth (as the default test run)
    python bench/conformance.py --per-op         # the per-op-type table as well
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import conformance as cf  # noqa: E402


class _OrtReader:
    """onnxruntime CalibrationDataReader over one feed."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feeds = iter([feed])

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self) -> None:  # pragma: no cover - not called for one pass
        pass


def ort_quantize_operation(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` (QDQ, QUInt8 activations, QInt8 per-channel weights, MinMax)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        old = os.getcwd()
        os.chdir(tmp)
        try:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save_model(model, src)
            quantize_static(
                str(src), str(dst), _OrtReader(cf.feed_of(model, inputs)), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            return onnx.load_model(dst)
        finally:
            os.chdir(old)


class _Recording:
    """Wraps an operation and keeps its last result (to measure SQNR of quantized passes)."""

    def __init__(self, op) -> None:
        self.op, self.last = op, None

    def __call__(self, model, inputs):
        self.last = None
        self.last = self.op(model, inputs)
        return self.last


def _sweep(cases, op, *, ort: bool) -> tuple[list[cf.Outcome], list[float], int]:
    """Outcomes, the minimum output SQNR (dB) of each quantized passing case, and quantized-result count."""
    rec = _Recording(op)
    outcomes, sqnrs, quantized = [], [], 0
    for case in cases:
        o = cf.run_case(case, rec)
        if ort and o.outcome == "crash" and not o.detail.startswith("result does not run"):
            o = cf.Outcome(o.case, o.op_type, "raised", o.detail)
        outcomes.append(o)
        if rec.last is not None and cf.is_quantized(rec.last) and not cf.is_quantized(case.model):
            quantized += 1
            if o.outcome in ("passed", "ort_deviates"):
                inputs, expected = case.data_sets[0]
                with contextlib.suppress(Exception):
                    actual = cf._run_ort(rec.last, list(inputs))
                    ref = expected if o.outcome == "passed" else cf._run_ort(case.model, list(inputs))
                    floats = [cf.sqnr_db(a, r) for a, r in zip(actual, ref, strict=True)
                              if np.asarray(r).dtype.kind == "f" and np.isfinite(r).all()]
                    if floats:
                        sqnrs.append(min(floats))
    return outcomes, sqnrs, quantized


def _row(total: collections.Counter, keys) -> list[str]:
    return [str(total.get(k, 0)) for k in keys]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=1, help="take every STEP-th case (default: all)")
    parser.add_argument("--per-op", action="store_true", help="print the per-op-type table")
    parser.add_argument("--no-exact", action="store_true", help="skip cleanup/prune/lowrank")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    os.environ.setdefault("ORT_LOGGING_LEVEL", "4")
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    cases = cf.load_cases()[:: args.step]
    print(f"{len(cases)} conformance cases (onnx {onnx.__version__}, onnxruntime {ort.__version__})")

    results: dict[str, list[cf.Outcome]] = {}
    info: dict[str, tuple[list[float], int, float]] = {}
    runs = [("onnxpress quantize", cf.quantize_operation, False), ("ORT quantize_static", ort_quantize_operation, True)]
    if not args.no_exact:
        runs += [(f"onnxpress {n}", cf.OPERATIONS[n], False) for n in ("cleanup", "prune", "lowrank")]
    for label, op, is_ort in runs:
        t0 = time.perf_counter()
        outcomes, sqnrs, quantized = _sweep(cases, op, ort=is_ort)
        results[label] = outcomes
        info[label] = (sqnrs, quantized, time.perf_counter() - t0)

    keys = [*cf.OUTCOMES[:4], "raised", *cf.FAILURES]
    width = max(len(k) for k in results) + 2
    print("\ncounts per outcome")
    print("".ljust(width) + "".join(k.rjust(16) for k in keys) + "quantized".rjust(11) + "min SQNR dB".rjust(13))
    for label, outcomes in results.items():
        total, _ = cf.summarize(outcomes)
        sqnrs, quantized, _secs = info[label]
        low = f"{min(sqnrs):.1f}" if sqnrs else "-"
        print(label.ljust(width) + "".join(v.rjust(16) for v in _row(total, keys)) + str(quantized).rjust(11)
              + low.rjust(13))
    print("(quantized: results holding QuantizeLinear; min SQNR: lowest per-case output SQNR among those that passed)")

    ours, theirs = results["onnxpress quantize"], results["ORT quantize_static"]
    both = collections.Counter((a.outcome, b.outcome) for a, b in zip(ours, theirs, strict=True))
    print("\nonnxpress quantize vs ORT quantize_static, same case (ours -> theirs: count)")
    for (a, b), n in sorted(both.items(), key=lambda kv: -kv[1]):
        print(f"  {a:>16} -> {b:<16} {n}")

    for label in ("onnxpress quantize", "ORT quantize_static"):
        rank = {k: i for i, k in enumerate(("mismatch", "crash", "hang", "broken", "raised"))}
        bad = sorted((o for o in results[label] if o.outcome in rank), key=lambda o: rank[o.outcome])
        if bad:
            print(f"\n{label}: {len(bad)} failures/raises (first 12)")
            for o in bad[:12]:
                print(f"  {o.case} [{o.op_type}] {o.outcome}: {o.detail[:150]}")

    if args.per_op:
        short = {"passed": "p", "rejected": "r", "ort_unsupported": "u", "ort_deviates": "d", "raised": "x",
                 "broken": "b", "mismatch": "M", "crash": "C", "hang": "H"}
        _, per_ours = cf.summarize(ours)
        _, per_theirs = cf.summarize(theirs)
        print("\nper op type (p passed, r rejected, u ort_unsupported, d ort_deviates, x raised, b broken, "
              "M mismatch, C crash, H hang)")
        print(f"{'op type':<34}{'onnxpress quantize':<32}ORT quantize_static")
        for op in sorted(set(per_ours) | set(per_theirs)):
            def fmt(c):
                return " ".join(f"{short[k]}{c[k]}" for k in short if c.get(k))
            print(f"{op:<34}{fmt(per_ours.get(op, {})):<32}{fmt(per_theirs.get(op, {}))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
