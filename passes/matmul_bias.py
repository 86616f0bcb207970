"""Keep MatMul + bias layers integer in onnxruntime (rank 2: a Gemm; fixed shapes: the bias's rank).

A rank-2 layer becomes a Gemm before InsertQDQ; a fixed-shape rank > 2 one gets its bias at the
output's rank after it.

``MatMulAddToGemm`` (float model, before calibration). ``MatMul(x, W) -> Add(b)`` with ``x`` of rank 2
(a dense layer as TensorFlow exports it, an MLP head) is ``Gemm(x, W, b)``: onnxruntime makes the same
fusion at level 1, but after InsertQDQ it then sees ``Gemm(DQ(x), DQ(W), b)`` with a float bias, which
stays a float Gemm fed by DequantizeLinear nodes when no Q follows. As a Gemm before InsertQDQ the
bias is quantized to int32 like any Gemm's and ``QGemm`` takes it, float output or not. Measured on a
2-layer MLP (256 -> 512 -> 10, fixed batch; 2 threads, interleaved, fp32 = 1): 1.60 -> 0.89 at batch
1 and 0.85 -> 0.64 at batch 64. Rewritten: ``MatMul`` with a rank-2 first input (inferred shapes), a
2-D float constant weight, and a single reader that is an ``Add`` of a float constant bias of ``N``
values used nowhere else. The Gemm takes the MatMul's name and the Add's output tensor.

``MatMulBiasToOutputRank`` (QDQ graph, after InsertQDQ).

onnxruntime's level-1 ``MatMulAddFusion`` turns ``MatMul -> Add(bias)`` into ``Gemm``. When the
MatMul's input has rank > 2 and a fully known shape (an export with a fixed batch size) it wraps the
Gemm in two Reshapes. That runs before the QDQ fusions, and a ``Gemm`` whose output is not quantized
then stays a float Gemm fed by DequantizeLinear nodes, which dequantize the int8 weights on every run::

    before: DQ(x) -> MatMul(DQ(W)) -> Add(b)      -> float       (static shapes)
    ORT   : DQ(x) -> Reshape -> Gemm(DQ(W), b) -> Reshape        float kernel + weight DQ per run

With the bias stored as ``[1, ..., 1, N]`` (the output's rank; the same values, the same broadcast)
the fusion declines (it takes only a 1-D bias when it has to reshape), and onnxruntime fuses the
QDQ MatMul into ``MatMulIntegerToFloat`` / ``QLinearMatMul`` as it does for a dynamic batch.
Measured on the reference transformer exported with a fixed batch (2 threads, interleaved, fp32 of
the same static model = 1), attention MatMuls quantized: int8 latency 2.03 -> 0.87 at batch 1 and
1.04 -> 0.70 at batch 64, outputs unchanged (the same float Add); with them float (the default):
2.44 -> 0.79-0.80 and 1.13 -> 0.68 (onnxruntime's best quantize_static config: 0.99 at batch 1).

Rewritten: ``MatMul`` whose inputs are both ``DequantizeLinear`` outputs, the second of a constant
2-D weight, whose only reader is an ``Add`` with a float constant bias of ``N`` values (shape ``[N]``
or ``[1, N]``) used nowhere else, and whose output has rank > 2 and a fully known shape. Where a
dimension is dynamic the fusion declines by itself, and the 1-D bias is kept: onnxruntime's
``BiasGelu`` fusion needs it (reshaped, the reference transformer's two BiasGelu became Add + Gelu).
A rank-2 MatMul is left alone (``MatMulAddToGemm`` made it a Gemm).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, constant_bias_add, is_float_constant

__all__ = ["MatMulAddToGemm", "MatMulBiasToOutputRank"]


class MatMulAddToGemm:
    """Fold the bias Add of a rank-2 constant-weight MatMul into a Gemm (module docstring).

    Args:
        skip: nodes to leave as they are (``quantize`` passes its exclusions, so that ``op:MatMul``
            still names these layers).
    """

    name = "matmul_add_to_gemm"

    def __init__(self, skip: Callable[[gs.Node], bool] | None = None) -> None:
        self.skip = skip

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every eligible MatMul + Add; the count is ``fused``."""
        fused = 0
        for node in [n for n in graph.nodes if n.op == "MatMul" and len(n.inputs) == 2]:
            if self.skip is not None and self.skip(node):
                continue
            x, w = node.inputs
            if x.shape is None or len(x.shape) != 2 or not is_float_constant(w) or np.asarray(w.values).ndim != 2:
                continue
            found = constant_bias_add(node)
            if found is None:
                continue
            add, idx = found
            bias = np.asarray(add.inputs[idx].values)
            n = np.asarray(w.values).shape[1]
            if bias.size != n or bias.ndim > 2 or bias.shape[-1] != n:
                continue
            add.inputs[idx].values = bias.reshape(n)
            node.op, node.attrs = "Gemm", {}
            node.inputs = [x, w, add.inputs[idx]]
            node.outputs = [add.outputs[0]]
            add.inputs.clear()
            add.outputs.clear()
            fused += 1
        if fused:
            graph.cleanup().toposort()
        return PassResult(graph, fused > 0, {"fused": fused})


class MatMulBiasToOutputRank:
    """Reshape the bias of each quantized rank > 2 MatMul to its output's rank (module docstring)."""

    name = "matmul_bias_rank"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Reshape every eligible bias; the count is ``reshaped``."""
        reshaped = 0
        for node in graph.nodes:
            if node.op != "MatMul" or len(node.inputs) != 2 or not _dequantized(node.inputs[0]):
                continue
            w = node.inputs[1]
            if not _dequantized(w) or not isinstance(w.inputs[0].inputs[0], gs.Constant):
                continue
            if np.asarray(w.inputs[0].inputs[0].values).ndim != 2:
                continue
            found = constant_bias_add(node)
            shape = node.outputs[0].shape
            if found is None or shape is None or len(shape) <= 2 or not all(isinstance(d, int) for d in shape):
                continue  # ORT's fusion needs a fully known shape to reshape: with a dynamic axis it declines
            add, idx = found
            bias = add.inputs[idx]
            values = np.asarray(bias.values)
            n = values.size
            if values.ndim > 2 or values.shape[-1] != n or (isinstance(shape[-1], int) and shape[-1] != n):
                continue
            bias.values = values.reshape((1,) * (len(shape) - 1) + (n,))
            reshaped += 1
        return PassResult(graph, reshaped > 0, {"reshaped": reshaped})


def _dequantized(t: gs.Tensor) -> bool:
    """Whether ``t`` is the output of a DequantizeLinear."""
    return bool(t.inputs) and t.inputs[0].op == "DequantizeLinear"
