"""Graph passes: one rewrite per module, each a small object ``pass_(graph) -> PassResult``.

Passes edit an onnx-graphsurgeon ``Graph``, do no file I/O and run no inference; the driver
(:func:`onnxpress.pipeline.run_passes`) owns cleanup, toposort, progress and error wrapping.
"""

from __future__ import annotations

from onnxpress.passes.base import GraphPass, PassResult, unique_name

__all__ = ["GraphPass", "PassResult", "unique_name"]
