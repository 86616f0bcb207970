"""onnx's node conformance cases through onnxpress: no crash, no hang, no silent change.

The default run takes a deterministic tenth of the cases; ``-m slow`` (run by .ci/run) takes all.
Each operation of ``tests/conformance.py`` (cleanup, zero-only prune, full-rank lowrank, quantize)
runs over the cases; failures that match a bug in :data:`KNOWN_BUGS` (modules owned by other
developers, each with a minimal strict-xfail reproduction below) are tolerated, and the full sweep
checks every known bug still shows (so a fix is noticed and its entry dropped).
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from tests import conformance as cf
from tests import graphs

CASES = cf.load_cases()

KNOWN_BUGS: dict[str, dict[str, str]] = {
    # operation -> {regex on "<case> <outcome> <detail>": the bug (its reproduction is in this file)}
}


def _known(operation: str, o: cf.Outcome) -> str | None:
    text = f"{o.case} {o.outcome} {o.detail}"
    for pattern in KNOWN_BUGS.get(operation, {}):
        if re.search(pattern, text):
            return pattern
    return None


def _check(cases, operation: str, *, require_known: bool) -> None:
    outcomes = [cf.run_case(case, cf.OPERATIONS[operation]) for case in cases]
    failures = [o for o in outcomes if o.outcome in cf.FAILURES and _known(operation, o) is None]
    assert not failures, "\n".join(f"{o.case} [{o.op_type}]: {o.outcome} {o.detail}" for o in failures[:20])
    total, _ = cf.summarize(outcomes)
    if operation == "quantize":  # most cases hold no op quantize handles; enough must quantize and pass
        assert total["passed"] > 0.25 * len(cases)
    else:  # exact operations: the plain float graphs must pass through
        assert total["passed"] > 0.6 * len(cases)
    if require_known:
        seen = {_known(operation, o) for o in outcomes if o.outcome in cf.FAILURES}
        fixed = set(KNOWN_BUGS.get(operation, {})) - seen
        assert not fixed, f"known bugs no longer seen (fixed? drop them from KNOWN_BUGS): {sorted(fixed)}"


@pytest.mark.parametrize("operation", sorted(cf.OPERATIONS))
def test_conformance_subset(operation):
    _check(CASES[::10], operation, require_known=False)


@pytest.mark.slow
@pytest.mark.parametrize("operation", sorted(cf.OPERATIONS))
def test_conformance_full_sweep(operation):
    _check(CASES, operation, require_known=True)


def test_classifier_flags_a_wrong_rewrite():
    """The harness must catch an operation that changes outputs, and one that crashes."""

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

    def pass_error(model, inputs):
        raise onnxpress.PassError("pass 'x' failed (TypeError: y); passes run before it: [none]")

    case = next(c for c in CASES if c.name == "test_relu")
    assert cf.run_case(case, cf.cleanup_operation).outcome == "passed"
    assert cf.run_case(case, shift_output).outcome == "mismatch"
    assert cf.run_case(case, crash).outcome == "crash"
    assert cf.run_case(case, pass_error).outcome == "broken"


def test_quantized_case_is_judged_by_the_bound_not_the_case_tolerance():
    """test_gemm_default_matrix_bias quantizes; it misses the case's rtol but meets 30 dB SQNR."""
    case = next(c for c in CASES if c.name == "test_gemm_default_matrix_bias")
    inputs, expected = case.data_sets[0]
    result = cf.quantize_operation(case.model, list(inputs))
    assert cf.is_quantized(result)
    actual = graphs.run(result, cf.feed_of(case.model, list(inputs)))
    assert not np.allclose(actual[0], expected[0], rtol=case.rtol, atol=case.atol)
    assert cf.sqnr_db(actual[0], expected[0]) >= cf.QUANT_SQNR_DB
    assert cf.run_case(case, cf.quantize_operation).outcome == "passed"


def test_quant_bound_rejects_a_3_percent_error_and_integer_changes():
    r = graphs.rng(0).standard_normal((64, 16)).astype(np.float32)
    assert cf.within_quant_bound([r + 0.01 * r.std()], [r])  # 40 dB
    assert not cf.within_quant_bound([r + 0.04 * r.std()], [r])  # 28 dB
    assert not cf.within_quant_bound([np.array([1, 2])], [np.array([1, 3])])
    assert not cf.within_quant_bound([r.astype(np.float16)], [r])
    assert cf.sqnr_db(r, r) == float("inf")


def test_opset8_scan_is_refused_not_silently_changed():
    """onnx's version converter drops Scan-8's batch axis: the model's input ranks would change."""
    case = next(c for c in CASES if c.name == "test_scan_sum")
    for op in ("prune", "lowrank", "quantize"):
        outcome = cf.run_case(case, cf.OPERATIONS[op])
        assert outcome.outcome == "rejected", outcome
        assert "would change its interface (graph input 'initial': float32[1,2] -> float32[2])" in outcome.detail


# --- minimal reproductions of bugs found by the sweep (modules owned by other developers; reported to the lead) ---


def test_quantize_graph_whose_only_activation_is_the_input():
    """X[N,6] -> Flatten -> Y: calibrate observes only X (found by the sweep: 40 crashes, fixed in f5fb73d)."""
    model = graphs.make_model([helper.make_node("Flatten", ["X"], ["Y"])], [("X", ["N", 6])], [("Y", ["N", 6])])
    feed = {"X": graphs.rng(1).standard_normal((4, 6)).astype(np.float32)}
    with contextlib.suppress(onnxpress.OnnxpressError):  # a clean refusal is fine; the bug was a ValueError
        onnxpress.quantize(model, calib=[feed])


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_bug_quantize_float16_or_double_graph(dtype):
    """X[N,4] (fp16|f64) -> Identity -> MatMul(W[4,3]) -> Y at opset 17: float or quantized, never invalid."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w = numpy_helper.from_array(graphs.rng(0).standard_normal((4, 3)).astype(np_dtype), "W")
    nodes = [helper.make_node("Identity", ["X"], ["x1"]), helper.make_node("MatMul", ["x1", "W"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", dtype, ["N", 4])],
                              [helper.make_tensor_value_info("Y", dtype, ["N", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    feed = {"X": graphs.rng(1).standard_normal((8, 4)).astype(np_dtype)}
    try:
        onnxpress.quantize(model, calib=[feed])
    except onnxpress.UnsupportedModelError:
        return  # a clean "unsupported" is fine
    except onnxpress.ModelLoadError as exc:  # the bug was: "the quantized model fails onnx.checker"
        raise AssertionError(str(exc)) from None


def test_bug_lowrank_model_with_optional_input():
    """X: optional(float[2]) -> OptionalHasElement -> Y: nothing to split; lowrank must not raise PassError."""
    opt = helper.make_value_info("X", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT,
                                                                                                    [2])))
    graph = helper.make_graph([helper.make_node("OptionalHasElement", ["X"], ["Y"])], "g", [opt],
                              [helper.make_tensor_value_info("Y", TensorProto.BOOL, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    try:
        onnxpress.lowrank(model, energy=0.9)
    except onnxpress.PassError as exc:
        raise AssertionError(str(exc)) from None
    except onnxpress.OnnxpressError:
        pass
