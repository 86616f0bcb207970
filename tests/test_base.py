"""Pass infrastructure helpers: unique names and run_passes error wrapping."""

from __future__ import annotations

import pytest

from onnxpress.errors import PassError
from onnxpress.passes.base import PassResult, fresh_names, graph_names, unique_name
from onnxpress.passes.fold import FoldBatchNorm
from onnxpress.pipeline import import_graph, run_passes
from tests import graphs


def test_fresh_names_avoid_used_and_earlier_names():
    fresh = fresh_names({"a", "a_1", "b"})
    assert [fresh("a"), fresh("a"), fresh("b"), fresh("c"), fresh("c")] == ["a_2", "a_3", "b_1", "c", "c_1"]


def test_unique_name_sees_tensors_and_nodes():
    graph = import_graph(graphs.gemm())
    assert {"X", "W", "B", "Y"} <= graph_names(graph)
    assert unique_name(graph, "W") == "W_1"
    assert unique_name(graph, "Z") == "Z"


class _Boom:
    name = "boom"

    def requires(self, graph):
        pass

    def __call__(self, graph) -> PassResult:
        raise ZeroDivisionError("bad")


def test_run_passes_names_the_failing_pass_and_its_history():
    with pytest.raises(PassError, match=r"pass 'boom' failed \(ZeroDivisionError: bad\); passes run before it: "
                                        r"\[fold_batchnorm\]"):
        run_passes(graphs.conv_bn_relu(), [FoldBatchNorm(), _Boom()])
