"""Give an int8 MatMul's bias the rank of its output, so that onnxruntime keeps a fixed-shape MatMul integer.

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
A rank-2 MatMul is left alone (``passes/matmul_to_gemm.py`` made it a Gemm before InsertQDQ).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, constant_bias_add

__all__ = ["MatMulBiasToOutputRank"]


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
            if values.ndim > 2 or values.shape[-1] != n or shape[-1] != n:
                continue
            bias.values = values.reshape((1,) * (len(shape) - 1) + (n,))
            reshaped += 1
        return PassResult(graph, reshaped > 0, {"reshaped": reshaped})


def _dequantized(t: gs.Tensor) -> bool:
    """Whether ``t`` is the output of a DequantizeLinear."""
    return bool(t.inputs) and t.inputs[0].op == "DequantizeLinear"
