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
- ``mismatch`` / ``crash`` / ``hang``: failures.
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

from onnxpress.errors import OnnxpressError

FAILURES = ("mismatch", "crash", "hang")


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


def run_case(case, operation: Operation, *, timeout: int = 30, bound: Callable | None = None) -> Outcome:
    """Classify one case under ``operation`` (see the module docstring).

    Args:
        case: an onnx conformance TestCase.
        operation: the onnxpress operation.
        timeout: seconds before the case counts as a hang.
        bound: for lossy operations, ``bound(result_outputs, reference_outputs) -> bool``; by
            default the case's own rtol/atol.
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
        return Outcome(name, op, "ort_unsupported" if not ort_ok else "rejected", str(exc)[:160])
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
    check = bound or (lambda a, e: _close(a, e, case.rtol, case.atol))
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
