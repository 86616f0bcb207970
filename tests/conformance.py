"""Run onnx's own node conformance cases through onnxpress and classify each outcome.

``onnx.backend.test.case.node.collect_testcases(None)`` builds ~1,900 cases (model, inputs,
expected outputs, tolerances) from the installed onnx wheel. For each case and each onnxpress
operation we record one outcome:

- ``passed``: the result loads in onnxruntime and reproduces the expected outputs within the case's
  tolerance (or, for quantizing operations, within the stated quantization bound).
- ``rejected``: onnxpress raised one of its typed errors (a clean "unsupported"/"invalid" line).
- ``ort_unsupported``: onnxruntime itself cannot load or run the original case model; onnxpress
  must then give a clean error or a model that fails in onnxruntime exactly as the original did.
- ``ort_deviates``: onnxruntime's own output of the original misses the expected values; the
  result is then compared with onnxruntime's output of the original instead.
- ``broken``: a typed error that admits a bug of ours rather than declining cleanly: a
  :class:`~onnxpress.errors.PassError` (a pass failed unexpectedly) or our own result failing
  ``onnx.checker``.
- ``mismatch`` / ``crash`` / ``hang``: failures. ``hang`` comes from SIGALRM, which cannot interrupt
  native code: a loop inside LAPACK (numpy's SVD on an inf weight never returns) would block the
  sweep instead; tests/test_hostile_corpus.py checks that case in a child process.

Operations (:data:`OPERATIONS`): ``cleanup`` (constant and BatchNorm folding), ``prune`` (zero-only,
exact), ``lowrank`` (every Gemm/MatMul/Conv split at full rank, exact up to float rounding) and
``quantize`` (int8 QDQ calibrated on the case's own inputs). Exact operations must meet the case's
tolerance. A quantized result (one with QuantizeLinear nodes) must meet :data:`QUANT_SQNR_DB`:

    SQNR(y, r) = 10 log10( sum r^2 / sum (y - r)^2 ) >= 30 dB   for every float output,
    and integer/bool outputs exactly equal.

Why 30 dB: rounding to a uniform b-bit grid adds noise of variance scale^2/12, i.e. 6.02 b + 1.76 ≈ 50 dB
for a full-range 8-bit signal. A bell-shaped tensor calibrated to its range uses a fraction of the
grid (~10 dB less), and a quantized op chains three roundings (input, weight, output; ~5 dB less),
leaving ~35 dB for one quantized op; 30 dB is 3% RMS error. The sweep measures 42-72 dB on the
quantized cases (bench/conformance.py prints the minimum).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import signal
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import onnx

from onnxpress.errors import OnnxpressError, PassError

FAILURES = ("broken", "mismatch", "crash", "hang")
OUTCOMES = ("passed", "rejected", "ort_unsupported", "ort_deviates", *FAILURES)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One case's result under one operation."""

    case: str
    op_type: str
    outcome: str
    detail: str = ""


def load_cases() -> list:
    """All node conformance cases of the installed onnx (sorted by name, deterministic)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return sorted(cases, key=lambda c: c.name)


def op_type_of(case) -> str:
    """The op type the case is about (the first non-Constant node)."""
    for node in case.model.graph.node:
        if node.op_type != "Constant":
            return node.op_type
    return case.model.graph.node[0].op_type if case.model.graph.node else "?"


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after ``seconds`` (SIGALRM; main thread on POSIX only)."""

    def _raise(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run_ort(model: onnx.ModelProto, inputs: list[np.ndarray]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs, strict=False)))


def _close(actual, expected, rtol: float, atol: float) -> bool:
    if len(actual) != len(expected):
        return False
    for a, e in zip(actual, expected, strict=True):
        if isinstance(a, (list, tuple)) or isinstance(e, (list, tuple)):  # sequence outputs
            if not (isinstance(a, (list, tuple)) and isinstance(e, (list, tuple)) and _close(a, e, rtol, atol)):
                return False
            continue
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape:
            return False
        if a.dtype.kind in "fc" or e.dtype.kind in "fc":
            if not np.allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
                return False
        elif not np.array_equal(a, e):
            return False
    return True


Operation = Callable[[onnx.ModelProto, list[np.ndarray]], onnx.ModelProto]
"""An onnxpress operation under test: (case model, case inputs) -> rewritten model."""


QUANT_SQNR_DB = 30.0
"""Per-output SQNR floor (dB) of a quantized result against the float reference (module docstring)."""


def sqnr_db(actual: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(sum r^2 / sum (a - r)^2) in float64; +inf when identical, -inf for a zero reference."""
    r = np.asarray(reference, np.float64)
    d = np.asarray(actual, np.float64) - r
    noise, signal_ = float((d**2).sum()), float((r**2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal_ / noise) if signal_ > 0 else float("-inf")


def within_quant_bound(actual, reference, min_db: float = QUANT_SQNR_DB) -> bool:
    """Every float output within ``min_db`` SQNR of the reference, every other output equal."""
    if len(actual) != len(reference):
        return False
    for a, r in zip(actual, reference, strict=True):
        a, r = np.asarray(a), np.asarray(r)
        if a.shape != r.shape or a.dtype != r.dtype:
            return False
        if a.dtype.kind == "f":
            finite = np.isfinite(r)
            if not np.array_equal(np.isfinite(a), finite) or not np.array_equal(a[~finite], r[~finite], equal_nan=True):
                return False  # inf/NaN where the reference has them, and only there
            if sqnr_db(a[finite], r[finite]) < min_db:
                return False
        elif not np.array_equal(a, r):
            return False
    return True


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model holds QuantizeLinear nodes (added by a quantizer)."""
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def run_case(case, operation: Operation, *, timeout: int = 30, bound: Callable | None = None) -> Outcome:
    """Classify one case under ``operation`` (see the module docstring).

    Args:
        case: an onnx conformance TestCase.
        operation: the onnxpress operation.
        timeout: seconds before the case counts as a hang.
        bound: ``bound(result_outputs, reference_outputs) -> bool``; by default the case's own
            rtol/atol, or for a quantized result (see :func:`is_quantized`) that or
            :func:`within_quant_bound`.
    """
    name, op = case.name, op_type_of(case)
    inputs, expected = case.data_sets[0]
    inputs = list(inputs)
    try:
        reference = _run_ort(case.model, inputs)
        ort_ok, ort_error = True, ""
    except Exception as exc:  # onnxruntime's own failure on the original case
        reference, ort_ok, ort_error = None, False, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = operation(case.model, inputs)
    except TimeoutError:
        return Outcome(name, op, "hang")
    except OnnxpressError as exc:
        msg = str(exc)
        if isinstance(exc, PassError) or ("fails onnx.checker" in msg and not msg.startswith("the given")):
            return Outcome(name, op, "broken", f"{type(exc).__name__}: {msg[:300]}")
        return Outcome(name, op, "ort_unsupported" if not ort_ok else "rejected", msg[:160])
    except Exception as exc:
        return Outcome(name, op, "crash", f"{type(exc).__name__}: {str(exc)[:160]}")
    try:
        actual = _run_ort(result, inputs)
    except Exception as exc:
        if not ort_ok:
            return Outcome(name, op, "ort_unsupported", ort_error)
        return Outcome(name, op, "crash", f"result does not run in onnxruntime: {str(exc)[:160]}")
    if not ort_ok:
        return Outcome(name, op, "mismatch", f"original fails in onnxruntime ({ort_error}) but the result runs")
    quantized = is_quantized(result) and not is_quantized(case.model)

    def default_check(a, e):
        return _close(a, e, case.rtol, case.atol) or (quantized and within_quant_bound(a, e))

    check = bound or default_check
    if _close(reference, list(expected), case.rtol, case.atol):
        return Outcome(name, op, "passed" if check(actual, list(expected)) else "mismatch")
    return Outcome(name, op, "ort_deviates" if check(actual, reference) else "mismatch")


def summarize(outcomes: list[Outcome]) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    """Counts per outcome, and per op type → counts per outcome."""
    total = collections.Counter(o.outcome for o in outcomes)
    per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        per_op[o.op_type][o.outcome] += 1
    return total, dict(per_op)


def cleanup_operation(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """onnxpress's exact passes (constant and BatchNorm folding) through the public API."""
    import onnxpress

    return onnxpress.cleanup(model).model


def feed_of(model: onnx.ModelProto, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The case's inputs keyed by the model's graph inputs (initializer-backed inputs skipped)."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return dict(zip(names, inputs, strict=False))


def quantize_operation(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """``onnxpress.quantize`` (int8 QDQ, default method) calibrated on the case's own inputs."""
    import onnxpress

    return onnxpress.quantize(model, calib=[feed_of(model, inputs)]).model


def prune_zero_operation(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """``onnxpress.prune`` without a ratio: only exactly removable (all-zero) channels go."""
    import onnxpress

    return onnxpress.prune(model).model


def lowrank_full_operation(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """Every Gemm/MatMul/Conv with a constant weight split at full rank (exact up to rounding).

    ``onnxpress.lowrank`` skips splits that do not save MACs (a full-rank split never does), so this
    runs its pass through the public ``transform`` with that check off.
    """
    import onnxpress
    from onnxpress.passes.low_rank import SplitLowRank
    from onnxpress.pipeline import cleanup_passes

    return onnxpress.transform(model, [*cleanup_passes(), SplitLowRank(rank=1 << 30, only_if_cheaper=False)]).model


OPERATIONS: dict[str, Operation] = {
    "cleanup": cleanup_operation,
    "prune": prune_zero_operation,
    "lowrank": lowrank_full_operation,
    "quantize": quantize_operation,
}
"""Every onnxpress operation the sweep runs, by name."""
