"""onnx's own node conformance cases through the interpreter: every supported single-op case matches.

Each case of an op the bridge claims to support either reproduces onnx's expected outputs within the
case's tolerance or is refused with UnsupportedModelError (e.g. float8 Q/DQ, cubic Resize,
LayerNormalization's extra outputs). Known gaps are listed with the reason, so a new one fails.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxpress.bridge.convert import OPS, OnnxModule  # noqa: E402
from onnxpress.errors import OnnxpressError  # noqa: E402

# Integer-only corner cases outside what a float model fine-tune meets.
KNOWN_GAPS = {
    "test_max_uint16", "test_max_uint32", "test_max_uint64",  # torch has no maximum for uint16+
    "test_min_uint16", "test_min_uint32", "test_min_uint64",
}  # fmt: skip
# Cases whose expected output onnxruntime does not give either; the bridge reproduces onnxruntime (what a
# fine-tuned model is exported back to and checked on). Downscaling align_corners cubic: onnx's reference
# takes the grid from the scale, onnxruntime (1, 2.5, 4 for a 4 -> 3 ramp) and torch from the sizes.
ORT_DIFFERS = {"test_resize_downsample_scales_cubic_align_corners"}


def _feed(a, device="cpu"):
    a = np.asarray(a)
    if (a.dtype.kind == "f" and a.dtype != np.float16) or a.dtype.kind == "b":
        return torch.from_numpy(np.array(a)).to(device)
    return a  # integer inputs stay host values, as integer initializers do


def _outcomes(device="cpu"):
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    out = {}
    for case in cases:
        nodes = case.model.graph.node
        if len(nodes) != 1 or nodes[0].op_type not in OPS or not case.data_sets:
            continue
        inputs, expected = case.data_sets[0]
        try:
            mod = OnnxModule(case.model).to(device)
            with torch.no_grad():
                got = [g.cpu() for g in mod.evaluate([_feed(a, device) for a in inputs], mod.output_names)]
        except OnnxpressError:
            out[case.name] = "rejected"
            continue
        except Exception as exc:  # noqa: BLE001 - a crash is what we are counting
            out[case.name] = f"crash: {type(exc).__name__}"
            continue
        atol, rtol = case.atol or 1e-5, case.rtol or 1e-4
        ok = len(got) == len(expected) and all(
            tuple(g.shape) == np.asarray(e).shape
            and np.allclose(g.numpy().astype(np.float64), np.asarray(e, np.float64), atol=atol, rtol=rtol)
            for g, e in zip(got, expected, strict=True)
        )
        out[case.name] = "ok" if ok else "mismatch"
    return out


@pytest.mark.slow  # builds ~1,900 case models (~20 s on 2 busy cores)
@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_conformance_cases_match_or_are_refused(device):
    """On the CPU, and on CUDA where torch sees a GPU (host constants must follow the graph there)."""
    torch.set_num_threads(1)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # full float32, as the cases
    try:
        outcomes = _outcomes(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    counts = collections.Counter(v.split(":")[0] for v in outcomes.values())
    assert counts["ok"] >= 655, counts
    bad = {k: v for k, v in outcomes.items() if v not in ("ok", "rejected") and k not in KNOWN_GAPS | ORT_DIFFERS}
    assert not bad, bad


@pytest.mark.slow  # collecting onnx's cases takes ~4 s
def test_cases_where_onnxruntime_differs_from_onnx_match_onnxruntime():
    """ORT_DIFFERS is not a list of excuses: there the bridge equals onnxruntime."""
    import onnxruntime as ort
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in collect_testcases(None) if c.name in ORT_DIFFERS]
    assert len(cases) == len(ORT_DIFFERS)
    for case in cases:
        inputs, _ = case.data_sets[0]
        want = ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {i.name: a for i, a in zip(case.model.graph.input, inputs, strict=True)})  # fmt: skip
        mod = OnnxModule(case.model)
        with torch.no_grad():
            got = mod.evaluate([_feed(a) for a in inputs], mod.output_names)
        np.testing.assert_allclose(got[0].numpy(), want[0], atol=1e-5, rtol=0)
