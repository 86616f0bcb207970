"""hypothesis strategies that build random, valid, small CNN-like ONNX graphs.

The op set is what our passes touch: Conv (plain, grouped, depthwise), BatchNormalization,
Relu/Clip/Sigmoid/HardSigmoid, residual Add, Concat, MaxPool/AveragePool, Reshape/Flatten,
GlobalAveragePool, Flatten or Reshape, Gemm and MatMul. Each graph has one input ``X`` [N, C, H, W] with a dynamic
batch and one output ``Y`` [N, K].
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper

from tests.graphs import make_model


class _Builder:
    def __init__(self, seed: int, channels: int, size: int):
        self.r = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.count = 0
        self.x, self.c, self.hw = "X", channels, size

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        n = self.name(base)
        self.inits[n] = array.astype(np.float32) if array.dtype.kind == "f" else array
        return n

    def conv(self, x: str, c_in: int, c_out: int, k: int, group: int, bias: bool) -> str:
        w = self.const("w", self.r.standard_normal((c_out, c_in // group, k, k)) / np.sqrt(c_in * k * k / group))
        ins = [x, w] + ([self.const("b", self.r.standard_normal(c_out) * 0.1)] if bias else [])
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", ins, [y], pads=[k // 2] * 4, group=group))
        return y

    def unary(self, op: str, x: str) -> str:
        y = self.name(op.lower())
        if op == "Clip":
            lo, hi = self.const("lo", np.array(0.0)), self.const("hi", np.array(6.0))
            self.nodes.append(helper.make_node("Clip", [x, lo, hi], [y]))
        else:
            self.nodes.append(helper.make_node(op, [x], [y]))
        return y

    def bn(self, x: str, c: int) -> str:
        p = [
            self.const("g", self.r.uniform(0.5, 1.5, c)),
            self.const("be", self.r.standard_normal(c) * 0.1),
            self.const("m", self.r.standard_normal(c) * 0.1),
            self.const("v", self.r.uniform(0.5, 1.5, c)),
        ]
        y = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [x, *p], [y]))
        return y


@st.composite
def cnn_models(draw, max_layers: int = 5) -> onnx.ModelProto:
    """A random CNN: layers drawn from the op set above, then a pooled Gemm/MatMul head."""
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(seed, channels=draw(st.integers(1, 4)), size=draw(st.sampled_from([4, 6, 8])))
    c_input, hw_input = b.c, b.hw
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(["conv", "dwconv", "gconv", "bn", "act", "residual", "concat", "pool"]))
        if kind in ("conv", "dwconv", "gconv"):
            c_out = b.c if kind == "dwconv" else draw(st.integers(1, 6))
            group = b.c if kind == "dwconv" else 1
            if kind == "gconv" and b.c % 2 == 0:
                group, c_out = 2, 2 * draw(st.integers(1, 3))
            b.x = b.conv(b.x, b.c, c_out, draw(st.sampled_from([1, 3])), group, draw(st.booleans()))
            b.c = c_out
            if draw(st.booleans()):
                b.x = b.bn(b.x, b.c)
        elif kind == "bn":
            b.x = b.bn(b.x, b.c)
        elif kind == "act":
            b.x = b.unary(draw(st.sampled_from(["Relu", "Clip", "Sigmoid", "HardSigmoid"])), b.x)
        elif kind == "residual":
            h = b.unary("Relu", b.conv(b.x, b.c, b.c, 3, 1, True))
            y = b.name("add")
            b.nodes.append(helper.make_node("Add", [b.x, b.conv(h, b.c, b.c, 3, 1, False)], [y]))
            b.x = y
        elif kind == "concat":
            c1, c2 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            p1, p2 = b.conv(b.x, b.c, c1, 1, 1, True), b.conv(b.x, b.c, c2, 3, 1, True)
            y = b.name("cat")
            b.nodes.append(helper.make_node("Concat", [p1, p2], [y], axis=1))
            b.x, b.c = y, c1 + c2
        elif kind == "pool" and b.hw >= 4:
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            y = b.name("pool")
            b.nodes.append(helper.make_node(op, [b.x], [y], kernel_shape=[2, 2], strides=[2, 2]))
            b.x, b.hw = y, b.hw // 2
    gap, flat = b.name("gap"), b.name("flat")
    b.nodes.append(helper.make_node("GlobalAveragePool", [b.x], [gap]))
    if draw(st.booleans()):
        b.nodes.append(helper.make_node("Flatten", [gap], [flat]))
    else:  # Reshape to [N, C] with a constant shape (0 copies the batch)
        shape = b.const("shape", np.array([0, -1], np.int64))
        b.nodes.append(helper.make_node("Reshape", [gap, shape], [flat]))
    k = draw(st.integers(2, 6))
    if draw(st.booleans()):
        trans_b = draw(st.integers(0, 1))
        w = b.r.standard_normal((k, b.c) if trans_b else (b.c, k))
        fw, fb = b.const("fw", w), b.const("fb", b.r.standard_normal(k))
        b.nodes.append(helper.make_node("Gemm", [flat, fw, fb], ["Y"], transB=trans_b))
    else:
        b.nodes.append(helper.make_node("MatMul", [flat, b.const("mw", b.r.standard_normal((b.c, k)))], ["Y"]))
    return make_model(b.nodes, [("X", ["N", c_input, hw_input, hw_input])], [("Y", ["N", k])], b.inits)


def sample_input(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A random feed for ``X`` of a model from :func:`cnn_models`."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"X": np.random.default_rng(seed).standard_normal((batch, *shape[1:])).astype(np.float32)}

