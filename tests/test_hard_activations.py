"""IntegerHardActivations: uint8 QDQ HardSwish / HardSigmoid as integer Add (+ Mul), checked on onnxruntime."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxpress
from onnxpress.passes.hard_activations import IntegerHardActivations
from onnxpress.passes.qdq import Selection
from onnxpress.pipeline import run_passes
from tests import graphs
from tests.test_qdq import optimized_ops


def _sandwich(op: str, *, x_range: tuple[float, float] = (-8.0, 8.0), y_range: tuple[float, float] = (0.0, 1.0),
              dtype=np.uint8, attrs: dict | None = None, extra_reader: bool = False) -> onnx.ModelProto:
    """X -> Q(x) -> DQ -> op -> y -> Q(y) -> DQ -> Y, per-tensor ``dtype`` grids covering the ranges (0 included)."""
    info = np.iinfo(dtype)

    def grid(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if dtype == np.int8:  # symmetric, zero point 0
            return np.array(max(-lo, hi) / 127, np.float32), np.array(0, dtype)
        s = (hi - lo) / 255
        return np.array(s, np.float32), np.array(round(-lo / s), dtype)

    sx, zx = grid(*x_range)
    sy, zy = grid(*y_range)
    inits = {"sx": sx, "zx": zx, "sy": sy, "zy": zy}
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["x"]),
        helper.make_node(op, ["x"], ["y"], **(attrs or {})),
        helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["Y"]),
    ]
    outputs = [("Y", [2, 4, 6, 6])]
    if extra_reader:  # y is also read in float
        nodes.append(helper.make_node("Relu", ["y"], ["Z"]))
        outputs.append(("Z", [2, 4, 6, 6]))
    assert info.min <= int(zx) <= info.max
    return graphs.make_model(nodes, [("X", [2, 4, 6, 6])], outputs, inits)


def _x(scale: float = 5.0, seed: int = 0) -> np.ndarray:
    return (graphs.rng(seed).standard_normal((2, 4, 6, 6)) * scale).astype(np.float32)


def test_hardsigmoid_becomes_one_add_with_the_same_codes():
    """Q_s(clip(a x + b, 0, 1)) == Q_{s/a}(x + b/a): the uint8 codes agree (ties aside: at most one code)."""
    model = _sandwich("HardSigmoid", attrs={"alpha": 0.2, "beta": 0.5})
    p = IntegerHardActivations()
    out = run_passes(model, [p]).model
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert "HardSigmoid" not in ops and ops.count("Add") == 1
    assert p.rewritten == [(model.graph.node[2].name or "y", "HardSigmoid")]
    x = _x()
    want, got = graphs.run(model, {"X": x})[0], graphs.run(out, {"X": x})[0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.abs(got - want).max() <= float(inits["sy"]) * 1.001
    # codes differ only where the exact value sits on a rounding tie (x on its grid makes ties common here)
    x_seen = (np.clip(np.round(x / inits["sx"]) + int(inits["zx"]), 0, 255) - int(inits["zx"])) * inits["sx"]
    codes = np.clip(0.2 * x_seen.astype(np.float64) + 0.5, 0, 1) / float(inits["sy"])
    ties = np.abs(codes - np.floor(codes) - 0.5) < 1e-3
    assert np.all((got == want) | ties)


def test_hardswish_error_stays_inside_the_gate_rounding_bound():
    """|x * g_q - x * h(x)| <= |x| u / 3060 before the output Q (half a step of the gate grid, u = 6 here)."""
    model = _sandwich("HardSwish", y_range=(-0.375, 8.0))
    out = run_passes(model, [IntegerHardActivations()]).model
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert "HardSwish" not in ops and ops.count("Add") == 1 and ops.count("Mul") == 1
    x = _x()
    want, got = graphs.run(model, {"X": x})[0], graphs.run(out, {"X": x})[0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    step_y = float(inits["sy"])
    x_seen = np.clip(np.round(x / inits["sx"]) + int(inits["zx"]), 0, 255).astype(np.float32)
    x_seen = (x_seen - int(inits["zx"])) * inits["sx"]  # what the DQ hands the activation
    bound = np.abs(x_seen) * 6 / 3060 + step_y  # gate rounding, then the output grid's one step at most
    assert np.all(np.abs(got - want) <= bound + 1e-6)
    exact = x_seen * np.clip(x_seen + 3, 0, 6) / 6
    assert np.abs(got - exact).max() <= np.abs(want - exact).max() + float(np.max(bound))


def test_hardswish_runs_as_integer_add_and_mul_in_onnxruntime(tmp_path):
    """After the rewrite onnxruntime fuses the Add and the Mul into QLinearAdd and QLinearMul: no float op is left."""
    model = _sandwich("HardSwish", y_range=(-0.375, 8.0))
    out = run_passes(model, [IntegerHardActivations()]).model
    fused = optimized_ops(out, tmp_path)
    assert "QLinearAdd" in fused and "QLinearMul" in fused
    assert not {"HardSwish", "HardSigmoid", "Mul", "Add"} & set(fused)
    assert {"HardSigmoid", "Mul"} & set(optimized_ops(model, tmp_path)) or "HardSwish" in optimized_ops(model, tmp_path)


def test_gate_grid_is_as_narrow_as_the_input_allows():
    """x never above 1: the gate x + 3 never above 4, so its grid is [0, 4] (finer than [0, 6])."""
    model = _sandwich("HardSwish", x_range=(-2.0, 1.0), y_range=(-0.375, 1.0))
    out = run_passes(model, [IntegerHardActivations()]).model
    added = next(n.output[0] for n in out.graph.node if n.op_type == "Add")
    gate_q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == added)
    scale = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}[gate_q.input[1]]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    top = float(inits["sx"]) * (255 - int(inits["zx"])) + 3  # the largest x + 3 the grid holds: 4
    assert top == pytest.approx(4.0, rel=1e-5)
    assert float(scale) == pytest.approx(top / 255, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"op": "HardSwish", "dtype": np.int8, "y_range": (-8.0, 8.0)}, "uint8"),
        ({"op": "HardSigmoid", "y_range": (0.0, 1.5)}, "does not cover"),  # the grid reaches past 1: no clip at 1
        ({"op": "HardSigmoid", "y_range": (-0.5, 1.0)}, "does not cover"),  # zero point above 0: no clip at 0
        ({"op": "HardSigmoid", "attrs": {"alpha": -0.2, "beta": 0.5}}, "alpha"),
        ({"op": "HardSwish", "y_range": (-0.375, 8.0), "extra_reader": True}, "read by other nodes"),
    ],
)
def test_other_nodes_are_kept_with_a_reason(kwargs, why):
    model = _sandwich(**kwargs)
    result = run_passes(model, [IntegerHardActivations()])
    assert not result.modified
    assert kwargs["op"] in [n.op_type for n in result.model.graph.node]
    assert any(why in note for note in result.notes), result.notes


def test_a_float_region_is_left_without_a_note():
    model = graphs.make_model([helper.make_node("HardSwish", ["X"], ["Y"])], [("X", [2, 3])], [("Y", [2, 3])])
    result = run_passes(model, [IntegerHardActivations()])
    assert not result.modified and not result.notes


def test_excluded_nodes_are_left_as_they_are():
    model = _sandwich("HardSwish", y_range=(-0.375, 8.0))
    model.graph.node[2].name = "act"
    result = run_passes(model, [IntegerHardActivations(exclude=Selection.from_strings(["act"]))])
    assert not result.modified
    assert "HardSwish" in [n.op_type for n in result.model.graph.node]


def _mobile_block(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """X[n,8,10,10] -> Conv -> HardSwish -> dw Conv -> HardSwish -> h2 -> GAP-Conv-HardSigmoid -> Mul(h2) -> Conv."""
    r = graphs.rng(seed)

    def w(*shape: int, gain: float) -> np.ndarray:
        return (r.standard_normal(shape) * gain).astype(np.float32)

    inits = {"W1": w(16, 8, 1, 1, gain=0.4), "B1": w(16, gain=1.0), "W2": w(16, 1, 3, 3, gain=0.4),
             "B2": w(16, gain=1.0), "W3": w(16, 16, 1, 1, gain=0.3), "B3": np.zeros(16, np.float32),
             "W4": w(8, 16, 1, 1, gain=0.3), "B4": np.zeros(8, np.float32)}
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"]),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="hswish_a"),
        helper.make_node("Conv", ["h1", "W2", "B2"], ["c2"], group=16, pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c2"], ["h2"], name="hswish_b"),
        helper.make_node("GlobalAveragePool", ["h2"], ["m"]),
        helper.make_node("Conv", ["m", "W3", "B3"], ["c3"]),
        helper.make_node("HardSigmoid", ["c3"], ["g"], name="gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["h2", "g"], ["s"]),
        helper.make_node("Conv", ["s", "W4", "B4"], ["Y"]),
    ]
    model = graphs.make_model(nodes, [("X", ["n", 8, 10, 10])], [("Y", ["n", 8, 10, 10])], inits)
    return model, r.standard_normal((64, 8, 10, 10)).astype(np.float32)


def test_quantize_runs_hardswish_and_hardsigmoid_as_integer_kernels():
    """End to end: no float HardSwish / HardSigmoid is left, each is listed quantized, and the error stays put."""
    model, x = _mobile_block()
    result = onnxpress.quantize(model, calib=[{"X": x[:48]}])
    ops = [n.op_type for n in result.model.graph.node]
    assert "HardSwish" not in ops and "HardSigmoid" not in ops
    quantized = {(d.name, d.op) for d in result.quantized}
    assert {("hswish_a", "HardSwish"), ("hswish_b", "HardSwish"), ("gate", "HardSigmoid")} <= quantized
    assert not [d for d in result.kept_float if d.op in ("HardSwish", "HardSigmoid")]
    assert result.stats["integer_hard_activations.hardswish"] == 2
    kept = onnxpress.quantize(model, calib=[{"X": x[:48]}], exclude=["hswish_a", "hswish_b", "gate"])
    ref = graphs.run(model, {"X": x[48:]})[0]

    def sqnr(y: np.ndarray) -> float:
        return float(10 * np.log10(np.sum(ref**2) / np.sum((y - ref) ** 2)))

    got = sqnr(graphs.run(result.model, {"X": x[48:]}, optimize=True)[0])
    base = sqnr(graphs.run(kept.model, {"X": x[48:]}, optimize=True)[0])
    assert got > 30 and got >= base - 1.0, (got, base)  # the 8-bit gate costs at most a dB against float activations


def test_cli_says_what_it_ran_as_integer_kernels(tmp_path, capsys):
    from onnxpress.cli import main
    from onnxpress.model_io import save_model

    model, x = _mobile_block()
    src = save_model(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=x[:32])
    argv = ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"),
            "--no-latency-check", "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ran 2 HardSwish and 1 HardSigmoid as onnxruntime's integer Add + Mul" in out, out
    assert re.search(r"^HardSwish\s+2\s+0$", out, flags=re.MULTILINE), out
