"""Recurrent layers' all-zero initial states left out: ONNX's default for them is zero.

An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` called without ``h0`` exports (TorchScript and dynamo alike) with
its initial states built at run time, because their size follows the batch::

    x -> Shape -> Gather / Slice -> Concat([layers, batch, hidden]) -> Expand(0.0) -> (Slice per layer) -> h0
                                                                                                          |
    x ------------------------------------------------------------------------------------------------> LSTM

ONNX says of ``initial_h`` and ``initial_c``: "If not specified - assumed to be 0." So an initial state that is
zero by construction is dropped (the input becomes the empty name) and the shape arithmetic that only built it
dies with it. Exact: the layer computes the same numbers (tested against onnxruntime, bitwise). The reference
bidirectional LSTM in int8 loses an Expand, a Slice, a Concat and a Shape: about 2% at batch 1 (paired, 2
threads), nothing measurable at batch 64.

Zero by construction is decided on the graph alone, never on data: an all-zero constant, ``ConstantOfShape``
with a zero (or no) value, ``Expand`` / ``Tile`` of such a tensor, and ops that only move or cast its values
(``Slice``, ``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Transpose``, ``Identity``, ``Cast``, ``Flatten``,
``Concat`` of zero tensors, ``Gather`` from one). A graph input or anything else is left alone. A zero state
that is also a graph output stays one; the layer just no longer reads it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult

__all__ = ["DropZeroInitialStates", "is_zero_by_construction"]

_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
_FROM_INPUT_0 = frozenset({"Slice", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Flatten",
                           "Expand", "Tile", "Gather"})  # every output value is one of input 0's values
_DEPTH = 16  # producers followed back at most (exporters put two or three ops between the zeros and the layer)


def is_zero_by_construction(t: gs.Tensor, depth: int = _DEPTH) -> bool:
    """Whether every value of ``t`` is zero whatever the inputs (see the module docstring)."""
    if isinstance(t, gs.Constant):
        values = np.asarray(t.values)
        return values.size > 0 and values.dtype.kind in "fiub" and not np.any(values)
    if depth <= 0 or len(t.inputs) != 1:
        return False
    node = t.inputs[0]
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        values = np.asarray(value.values) if isinstance(value, gs.Constant) else np.zeros(1)
        return not np.any(values)
    if node.op in _FROM_INPUT_0:
        return bool(node.inputs) and is_zero_by_construction(node.inputs[0], depth - 1)
    if node.op == "Concat":
        return bool(node.inputs) and all(is_zero_by_construction(x, depth - 1) for x in node.inputs)
    return False


class DropZeroInitialStates:
    """Leave out the initial states of LSTM/GRU/RNN layers that are zero by construction (exact)."""

    name = "drop_zero_initial_states"

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Replace each zero initial state by the empty input; the pipeline's cleanup drops what built it."""
        dropped = 0
        notes = []
        for node in graph.nodes:
            if node.op not in _STATE_INPUTS or (node.domain or "") not in ("", "ai.onnx"):
                continue
            for index in _STATE_INPUTS[node.op]:
                if index >= len(node.inputs):
                    continue
                if not is_zero_by_construction(node.inputs[index]):  # an input left out has no producer: False
                    continue
                node.inputs[index] = gs.Variable.empty()
                dropped += 1
                notes.append(f"{node.name}: initial state {index} is zero by construction, left to ONNX's default")
        return PassResult(graph, bool(dropped), {"states": dropped}, tuple(notes))
