"""4-bit weight codes stored two to a byte, rebuilt into the int8 tensor onnxruntime's integer kernels read.

``InsertQDQ(weight_bits=4)`` gives large weights codes ``k`` in ``[-7, 7]`` (scale ``max|W_c| / 7`` per
channel) and keeps them in the int8 initializer of their DequantizeLinear, so onnxruntime fuses the layer into
its int8 kernel (QLinearConv, QGemm, MatMulInteger) as before: W4A8 on int8 kernels. This pass stores each such
initializer in half the bytes, and a constant subgraph rebuilds it::

    W_q int8 [C, ...] (k in [-8, 7])                   ==>
    packed uint8 [ceil(n / 2)]  (byte i: k_i + 8 in its low nibble, k_(i + half) + 8 in its high one)
        -> Mod(16), BitShift(4)  -> Concat -> Slice(n) -> Cast(int32) -> Gather([-8 .. 7] int8) -> Reshape
        -> W_q int8 [C, ...] -> DequantizeLinear -> Conv / Gemm / MatMul

The subgraph reads only constants, so onnxruntime's constant folding (any optimisation level above ``disable``)
evaluates it once when the session is created: the fused graph is the int8 one (every Conv of the reference
ResNet still runs as QLinearConv) and runs at its speed; only the file is smaller. With optimisations off the
rebuild runs on every call and the layers run in float. ``Gather`` over a 16-entry table takes the codes back
from their unsigned nibbles (onnxruntime has a Gather kernel for every type, not an int8 Sub in every release).

The same holds for the other readers of such codes: ``FuseQuantizedAttention`` puts a transformer's query, key
and value codes side by side in one int8 weight that ``QAttention`` reads directly, and onnxruntime folds the
rebuild in front of it too (it prepacks the folded constant).

Exact: the rebuilt tensor equals the stored one, bit for bit (tested on onnxruntime). Declined (left as it is):
an initializer with a code outside ``[-8, 7]``, one with fewer than ``min_elements`` values, and names outside
``names`` when it is given.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.passes.base import PassResult, fresh_names, graph_names
from onnxpress.passes.qdq import FOUR_BIT_MIN_ELEMENTS

__all__ = ["PackInt4Weights", "pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 ``[ceil(n / 2)]``: ``codes`` (flat, in ``[-8, 7]``) plus 8, the first half in the low nibbles.

    Raises:
        ValueError: a code outside ``[-8, 7]``.
    """
    flat = np.asarray(codes).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("4-bit codes must lie in [-8, 7]")
    half = -(-flat.size // 2)
    u = np.zeros(2 * half, np.uint8)
    u[: flat.size] = (flat + 8).astype(np.uint8)
    return (u[:half] | (u[half:] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` int8 codes :func:`pack_nibbles` stored (what the rebuild subgraph computes)."""
    p = np.asarray(packed, np.uint8)
    return (np.concatenate([p % 16, p >> 4])[:n].astype(np.int16) - 8).astype(np.int8)


class PackInt4Weights:
    """Store int8 weight initializers whose codes fit in 4 bits two to a byte (exact; see the module docstring).

    Args:
        names: only these initializers; None: every int8 one that fits (quantize's W4A8 path: its int8 weights
            all have fewer than ``min_elements`` values, and QAttention's combined weight gets a name of its own).
        min_elements: leave smaller initializers as they are (the seven rebuild nodes cost ~600 bytes).
    """

    name = "pack_int4_weights"

    def __init__(self, names: Iterable[str] | None = None, min_elements: int = FOUR_BIT_MIN_ELEMENTS) -> None:
        self.names = None if names is None else frozenset(names)
        self.min_elements = int(min_elements)

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (BitShift needs opset 11; every normalised model has 13 or more)."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every eligible initializer; count them and the bytes saved (the pipeline drops the int8 ones)."""
        fresh = fresh_names(graph_names(graph))
        shared: dict[str, gs.Constant] = {}  # the constants every rebuild reads alike, stored once
        done, saved = 0, 0
        found = {id(t): t for node in graph.nodes for t in node.inputs if isinstance(t, gs.Constant)}
        for w in found.values():
            values = np.asarray(w.values)
            if values.dtype != np.int8 or values.size < self.min_elements:
                continue
            if (self.names is not None and w.name not in self.names) or values.min() < -8 or values.max() > 7:
                continue
            rebuilt = self._rebuild(graph, w.name, values, fresh, shared)
            for reader in list(w.outputs):
                reader.inputs = [rebuilt if t is w else t for t in reader.inputs]
            done += 1
            saved += values.size - (values.size + 1) // 2
        return PassResult(graph, bool(done), {"weights": done, "bytes_saved": saved})

    @staticmethod
    def _rebuild(graph: gs.Graph, base: str, values: np.ndarray, fresh, shared: dict[str, gs.Constant]) -> gs.Variable:
        """The seven-node subgraph that turns the packed bytes back into ``values`` (int8, its shape)."""
        n = values.size

        def common(name: str, v: np.ndarray) -> gs.Constant:
            if name not in shared:
                shared[name] = gs.Constant(fresh(f"int4_{name}"), np.asarray(v))
            return shared[name]

        def var(suffix: str, dtype) -> gs.Variable:  # short names: ~600 bytes a weight instead of ~1.1 KB
            return gs.Variable(fresh(f"i4_{suffix}"), dtype=dtype)

        packed = gs.Constant(fresh(f"{base}_int4"), pack_nibbles(values))
        lo, hi, both, cut = var("lo", np.uint8), var("hi", np.uint8), var("both", np.uint8), var("cut", np.uint8)
        index, flat, out = var("index", np.int32), var("flat", np.int8), gs.Variable(fresh(f"{base}_int8"), np.int8)
        out.shape = list(values.shape)
        steps = [
            ("Mod", [packed, common("sixteen", np.uint8(16))], [lo], {"fmod": 0}),
            ("BitShift", [packed, common("four", np.uint8(4))], [hi], {"direction": "RIGHT"}),
            ("Concat", [lo, hi], [both], {"axis": 0}),
            ("Slice", [both, common("start", np.array([0], np.int64)),
                       gs.Constant(fresh("i4_n"), np.array([n], np.int64))], [cut], {}),
            ("Cast", [cut], [index], {"to": onnx.TensorProto.INT32}),
            ("Gather", [common("levels", np.arange(-8, 8, dtype=np.int8)), index], [flat], {"axis": 0}),
            ("Reshape", [flat, gs.Constant(fresh("i4_shape"), np.array(values.shape, np.int64))], [out], {}),
        ]
        for op, inputs, outputs, attrs in steps:
            graph.nodes.append(gs.Node(op, fresh(f"i4_{op}"), attrs, inputs, outputs))
        return out
