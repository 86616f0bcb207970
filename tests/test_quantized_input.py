"""An already-quantized model given to a command that starts from a float one: a clear error, nothing written.

Before, ``quantize`` calibrated the dequantized values and quantized them again (an onnxruntime-quantized
1-D conv net came out 1.6x slower), ``prune`` said its weights were "computed", and ``lowrank`` wrote a model
with more parameters. The commands that take a quantized model on purpose still do: ``validate`` compares it
with its original and ``cleanup`` folds its constant subgraphs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.cli import main
from onnxpress.errors import UnsupportedModelError
from onnxpress.model_io import save_model
from tests import graphs
from tests.test_hostile import two_convs


def _qlinear_matmul() -> onnx.ModelProto:
    """X[N, 8] uint8 -> QLinearMatMul (the QOperator format onnxruntime writes) -> Y uint8."""
    inits = {
        "xs": np.float32(0.1), "xz": np.uint8(128), "W": graphs.rng(1).integers(-5, 5, (8, 4)).astype(np.int8),
        "ws": np.float32(0.05), "wz": np.int8(0), "ys": np.float32(0.2), "yz": np.uint8(128),
    }
    node = helper.make_node("QLinearMatMul", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz"], ["Y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.UINT8, ["N", 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.UINT8, ["N", 4])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _data() -> np.ndarray:
    return graphs.rng(3).standard_normal((6, 16, 8, 8)).astype(np.float32)


def _quantized(kind: str) -> onnx.ModelProto:
    """A QDQ int8 model (onnxpress's or onnxruntime's format), an int4 MatMulNBits one, or a QOperator one."""
    if kind == "qdq":
        return onnxpress.quantize(two_convs(c_out=32, c_in=16), calib=[{"X": _data()}]).model
    if kind == "int4":
        return onnxpress.quantize(graphs.gemm(m=4, k=64, n=32), weights="int4", block_size=32).model
    return _qlinear_matmul()


COMMANDS = {
    "quantize": lambda m, o, d: ["quantize", m, "-o", o, "--calib", d, "-q"],
    "prune": lambda m, o, d: ["prune", m, "-o", o, "--ratio", "0.5", "-q"],
    "lowrank": lambda m, o, d: ["lowrank", m, "-o", o, "--energy", "0.9", "-q"],
    "optimize": lambda m, o, d: ["optimize", m, "-o", o, "--calib", d, "--budget", "size=0.5", "-q"],
}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("kind", ["qdq", "int4", "qlinear"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_compressing_a_quantized_model_is_refused(tmp_path: Path, capsys, command: str, kind: str) -> None:
    model = _quantized(kind)
    path, data, out = tmp_path / "q.onnx", tmp_path / "data.npz", tmp_path / "out.onnx"
    save_model(model, path)
    np.savez(data, **{model.graph.input[0].name: _data()})
    before = _snapshot(tmp_path)
    assert main(COMMANDS[command](str(path), str(out), str(data))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxpress: error: the model is already quantized ("), lines
    assert f"onnxpress {command} starts from a float model" in lines[0]
    op = {"qdq": "QuantizeLinear", "int4": "(MatMulNBits|DequantizeLinear)", "qlinear": "QLinearMatMul"}[kind]
    assert re.search(rf"\d+ x {op}", lines[0]), lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, nothing left behind


@pytest.mark.parametrize("call", [
    lambda m: onnxpress.quantize(m, calib=[{"X": _data()}]),
    lambda m: onnxpress.prune(m, ratio=0.5),
    lambda m: onnxpress.lowrank(m, energy=0.9),
], ids=["quantize", "prune", "lowrank"])
def test_the_api_raises_the_same(call) -> None:
    with pytest.raises(UnsupportedModelError, match=r"already quantized \(\d+ x DequantizeLinear"):
        call(_quantized("qdq"))


def test_validate_and_cleanup_still_take_a_quantized_model(tmp_path: Path) -> None:
    float_model, quantized = two_convs(c_out=32, c_in=16), _quantized("qdq")
    report = onnxpress.validate(float_model, quantized, [{"X": _data()}], latency=False)
    assert report.samples == 6
    cleaned = onnxpress.cleanup(quantized).model
    assert sum(n.op_type == "QuantizeLinear" for n in cleaned.graph.node) >= 1
