"""Tiny teacher/student CNNs and data for the bridge tests (seeded, ~1k parameters)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.graphs import make_model, rng


def tiny_cnn(seed: int = 0, noise: float = 0.0, gain: float = 1.0, widths: tuple[int, int] = (4, 8),
             classes: int = 5) -> onnx.ModelProto:  # fmt: skip
    """input[N,1,8,8] -> Conv(4,3x3,p1) -> Relu -> Conv(8,3x3,s2,p1) -> Relu -> GAP -> Flatten -> Gemm -> logits[N,5].

    ``noise`` perturbs every weight by ``noise·std(W)`` (a stand-in for a lossy compression); ``gain``
    scales the last layer so that logits are confident. ``widths`` and ``classes`` change the 4 / 8 conv
    channels and the 5 classes (the second conv's weights shrink with its fan-in).
    """
    r = rng(seed)
    c1, c2 = widths
    w = {
        "c1.weight": r.standard_normal((c1, 1, 3, 3)) * 0.6,
        "c1.bias": r.standard_normal(c1) * 0.1,
        "c2.weight": r.standard_normal((c2, c1, 3, 3)) * 0.3 * (4 / c1) ** 0.5,
        "c2.bias": r.standard_normal(c2) * 0.1,
        "fc.weight": r.standard_normal((classes, c2)) * gain,
        "fc.bias": r.standard_normal(classes) * 0.1,
    }
    if noise:
        pr = rng(seed + 100)
        w = {k: v + noise * v.std() * pr.standard_normal(v.shape) for k, v in w.items()}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("Conv", ["input", "c1.weight", "c1.bias"], ["a1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.weight", "c2.bias"], ["a2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    return make_model(nodes, [("input", ["batch", 1, 8, 8])], [("logits", ["batch", classes])], w, opset=17)


def tiny_data(n: int = 96, seed: int = 1) -> np.ndarray:
    """Seeded float32 inputs [n,1,8,8]."""
    return rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of initializer ``name``."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def test_tiny_cnn_student_differs_from_teacher():
    from tests.graphs import run

    x = tiny_data(8)
    teacher = run(tiny_cnn(gain=4.0), {"input": x})[0]
    student = run(tiny_cnn(noise=0.5, gain=4.0), {"input": x})[0]
    assert teacher.shape == (8, 5)
    assert np.abs(teacher - student).max() > 0.1
