"""ONNX export of the reference networks, the two resnet variants, and their verification.

Exporter choice: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, opset 20).
Measured on the resnet and the transformer (torch 2.13, onnxscript 0.7.2), both exporters give
opset 20, fold BatchNormalization into Conv, match torch within ~2e-7 and keep the batch
dimension dynamic. The dynamo graph is the smaller and the cleaner one: resnet 22 nodes vs 28
(no ``Identity`` nodes), transformer 67 vs 195 (Reshape targets are constants instead of
``Shape -> Gather -> Unsqueeze -> Concat`` chains), and initializers keep readable names
(``blocks.1.body.0.weight``). Costs: export takes a few seconds instead of under one, and global
average pooling comes out as ``ReduceMean(axes=[2,3]) -> Reshape`` instead of
``GlobalAveragePool -> Flatten``. The TorchScript exporter is kept for the ``resnet_opset11``
variant, which needs an old opset.

Post-processing: node metadata ``pkg.torch.onnx.stack_trace`` is dropped, since it holds absolute
source paths (they would make the file depend on where the repo is checked out).

Variants used by robustness tests:

- ``resnet_opset11.onnx``: same weights, TorchScript exporter, ``opset_version=11``.
- ``resnet_constants.onnx``: ``resnet.onnx`` with each initializer ``W`` replaced by a node
  ``W = Constant(value=W)`` at the top of the graph (no initializers left).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = [
    "OPSET",
    "export_dynamo",
    "export_torchscript",
    "initializers_to_constants",
    "max_abs_diff",
    "ort_logits",
]

log = logging.getLogger(__name__)

OPSET = 20
INPUT = "input"
OUTPUT = "logits"
_DROPPED_METADATA = frozenset({"pkg.torch.onnx.stack_trace"})


def export_dynamo(model: nn.Module, example: torch.Tensor, opset: int = OPSET) -> onnx.ModelProto:
    """Export with the dynamo exporter, batch dimension dynamic and named ``batch``."""
    model.eval()
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        external_data=False,
        opset_version=opset,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = program.model_proto
    _strip_metadata(proto)
    return proto


def export_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """Export with the TorchScript exporter (``dynamo=False``), batch dimension dynamic."""
    import io

    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def initializers_to_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy where every initializer ``W`` is produced by ``Constant(value=W)`` instead."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    names = {init.name for init in graph.initializer}
    constants = [
        onnx.helper.make_node("Constant", [], [init.name], name=f"{init.name}_const", value=init)
        for init in graph.initializer
    ]
    kept_inputs = [i for i in graph.input if i.name not in names]
    nodes = constants + list(graph.node)
    del graph.initializer[:]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _strip_metadata(proto: onnx.ModelProto) -> None:
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _DROPPED_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def session(model: onnx.ModelProto | bytes | str) -> ort.InferenceSession:
    """A single-threaded CPU session with graph optimizations off (the graph as exported)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def ort_logits(sess: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``sess`` over ``inputs`` in batches of ``batch_size``; concatenated logits."""
    return np.concatenate(
        [sess.run([OUTPUT], {INPUT: inputs[i : i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    )


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference."""
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
