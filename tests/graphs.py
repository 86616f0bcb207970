"""Tiny graph builders and an onnxruntime runner shared by the tests.

Each builder's docstring draws the graph in one line. Weights come from a seeded generator.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def rng(seed: int = 0) -> np.random.Generator:
    """A seeded generator."""
    return np.random.default_rng(seed)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, name: str = "g") -> onnx.ModelProto:
    """Wrap nodes into a checked model; inputs/outputs are (name, shape) pairs of float32."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def gemm(m: int = 4, k: int = 8, n: int = 6, seed: int = 0) -> onnx.ModelProto:
    """X[m,k] -> Gemm(W[k,n], B[n]) -> Y[m,n]."""
    r = rng(seed)
    return make_model(
        [helper.make_node("Gemm", ["X", "W", "B"], ["Y"])],
        [("X", ["batch", k])],
        [("Y", ["batch", n])],
        {"W": r.standard_normal((k, n)).astype(np.float32), "B": r.standard_normal(n).astype(np.float32)},
    )


def conv_bn_relu(c_in: int = 3, c_out: int = 8, k: int = 3, bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """X[N,c_in,8,8] -> Conv(W, B?) -> BatchNormalization -> Relu -> Y."""
    r = rng(seed)
    inits = {
        "W": r.standard_normal((c_out, c_in, k, k)).astype(np.float32),
        "gamma": r.uniform(0.5, 1.5, c_out).astype(np.float32),
        "beta": r.standard_normal(c_out).astype(np.float32),
        "mean": r.standard_normal(c_out).astype(np.float32),
        "var": r.uniform(0.5, 2.0, c_out).astype(np.float32),
    }
    conv_in = ["X", "W"]
    if bias:
        inits["B"] = r.standard_normal(c_out).astype(np.float32)
        conv_in.append("B")
    nodes = [
        helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", c_in, 8, 8])], [("Y", ["N", c_out, 8 + 2 - k + 1, 8 + 2 - k + 1])], inits)


def gemm_bn(k: int = 8, n: int = 6, trans_b: int = 1, seed: int = 0) -> onnx.ModelProto:
    """X[N,k] -> Gemm(W, transB) -> BatchNormalization -> Y[N,n]."""
    r = rng(seed)
    w = r.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = {
        "W": w,
        "gamma": r.uniform(0.5, 1.5, n).astype(np.float32),
        "beta": r.standard_normal(n).astype(np.float32),
        "mean": r.standard_normal(n).astype(np.float32),
        "var": r.uniform(0.5, 2.0, n).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["X", "W"], ["g"], transB=trans_b),
        helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", k])], [("Y", ["N", n])], inits)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    """Run ``model`` on onnxruntime CPU (graph optimisations off unless ``optimize``)."""
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
