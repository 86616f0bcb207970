"""onnx's node conformance cases through onnxpress: no crash, no hang, no silent change.

The default run takes a deterministic tenth of the cases; ``-m slow`` (run by .ci/run) takes all.
"""

from __future__ import annotations

import pytest

from tests import conformance as cf

CASES = cf.load_cases()
OPERATIONS = {"cleanup": cf.cleanup_operation}


def _check(cases, operation):
    outcomes = [cf.run_case(case, operation) for case in cases]
    failures = [o for o in outcomes if o.outcome in cf.FAILURES]
    assert not failures, "\n".join(f"{o.case} [{o.op_type}]: {o.outcome} {o.detail}" for o in failures[:20])
    total, _ = cf.summarize(outcomes)
    assert total["passed"] > 0.6 * len(cases)  # most cases are plain float graphs that must pass through


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_conformance_subset(operation):
    _check(CASES[::10], OPERATIONS[operation])


@pytest.mark.slow
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_conformance_full_sweep(operation):
    _check(CASES, OPERATIONS[operation])


def test_classifier_flags_a_wrong_rewrite():
    """The harness must catch an operation that changes outputs, and one that crashes."""
    import numpy as np
    from onnx import helper, numpy_helper

    def shift_output(model, inputs):
        out = model.__class__()
        out.CopyFrom(model)
        y = out.graph.output[0].name
        out.graph.node[-1].output[0] = y + "_raw"
        out.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
        out.graph.node.append(helper.make_node("Add", [y + "_raw", "one"], [y]))
        return out

    def crash(model, inputs):
        raise RuntimeError("boom")

    case = next(c for c in CASES if c.name == "test_relu")
    assert cf.run_case(case, cf.cleanup_operation).outcome == "passed"
    assert cf.run_case(case, shift_output).outcome == "mismatch"
    assert cf.run_case(case, crash).outcome == "crash"
