"""Channel dependency analysis and PruneZeroChannels / PruneChannels on tiny graphs (onnxruntime, exact)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxpress.passes.channel_groups import analyze_channels
from onnxpress.passes.flops import count_macs, count_params
from onnxpress.passes.prune_channels import PruneChannels, PruneZeroChannels, activation_targets, unit_importance
from onnxpress.pipeline import run_passes
from tests import graphs
from tests.graphs import make_model

F32 = np.float32


def _w(r, *shape):
    return r.standard_normal(shape).astype(F32)


def _bn(r, name, c):
    return {
        f"{name}_g": r.uniform(0.5, 1.5, c).astype(F32),
        f"{name}_b": _w(r, c),
        f"{name}_m": _w(r, c),
        f"{name}_v": r.uniform(0.5, 2.0, c).astype(F32),
    }


def _bn_node(name, x, y):
    return helper.make_node("BatchNormalization", [x, f"{name}_g", f"{name}_b", f"{name}_m", f"{name}_v"], [y])


def conv_bn_chain(seed=0):
    """X[N,3,8,8] -> Conv(8,3x3) -> BN -> Relu -> Conv(4,3x3,pad1) -> Y."""
    r = graphs.rng(seed)
    inits = {"W1": _w(r, 8, 3, 3, 3), "B1": _w(r, 8), "W2": _w(r, 4, 8, 3, 3), "B2": _w(r, 4), **_bn(r, "bn", 8)}
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        _bn_node("bn", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["Y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)


def residual(seed=0):
    """X -> Conv a(8) -> Relu -> ra; ra -> Conv b(8) -> Add(ra, b) -> Relu -> Conv(4, 1x1) -> Y (a, b coupled)."""
    r = graphs.rng(seed)
    inits = {"Wa": _w(r, 8, 3, 3, 3), "Ba": _w(r, 8), "Wb": _w(r, 8, 8, 3, 3), "Bb": _w(r, 8), "Wc": _w(r, 4, 8, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["X", "Wa", "Ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "Wb", "Bb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Add", ["ra", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["rs"]),
        helper.make_node("Conv", ["rs", "Wc"], ["Y"], name="conv_c"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)


def concat_split_slice(seed=0):
    """X -> Conv a(4), Conv b(6) -> Concat -> Relu -> Split[3,7] -> (Conv p | Slice 1:5 -> Conv q) -> Add -> Y."""
    r = graphs.rng(seed)
    inits = {
        "Wa": _w(r, 4, 3, 3, 3), "Ba": _w(r, 4), "Wb": _w(r, 6, 3, 1, 1), "Bb": _w(r, 6),
        "Wp": _w(r, 5, 3, 1, 1), "Wq": _w(r, 5, 4, 3, 3),
        "split": np.array([3, 7], np.int64),
        "st": np.array([1], np.int64), "en": np.array([5], np.int64), "ax": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["X", "Wa", "Ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Conv", ["X", "Wb", "Bb"], ["b"], name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        helper.make_node("Relu", ["cat"], ["rc"]),
        helper.make_node("Split", ["rc", "split"], ["s0", "s1"], axis=1),
        helper.make_node("Conv", ["s0", "Wp"], ["p"], name="conv_p"),
        helper.make_node("Slice", ["s1", "st", "en", "ax"], ["sl"]),
        helper.make_node("Conv", ["sl", "Wq"], ["q"], pads=[1, 1, 1, 1], name="conv_q"),
        helper.make_node("Add", ["p", "q"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 5, 8, 8])], inits)


def depthwise_mul(seed=0):
    """X -> Conv(8) -> Clip(0,6) -> DepthwiseConv(8, 3x3) -> Mul(s[1,8,1,1]) -> Add(t[8,1,1]) -> Conv(4) -> Y."""
    r = graphs.rng(seed)
    inits = {
        "W1": _w(r, 8, 3, 1, 1), "B1": _w(r, 8), "Wd": _w(r, 8, 1, 3, 3), "Bd": _w(r, 8),
        "s": _w(r, 1, 8, 1, 1), "t": _w(r, 8, 1, 1), "W2": _w(r, 4, 8, 1, 1), "B2": _w(r, 4),
        "lo": np.array(0, F32), "hi": np.array(6, F32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], name="conv1"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "Wd", "Bd"], ["d"], group=8, pads=[1, 1, 1, 1], name="dw"),
        helper.make_node("Mul", ["d", "s"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["a"]),
        helper.make_node("Conv", ["a", "W2", "B2"], ["Y"], name="conv2"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)


def flatten_gemm(reshape: bool = False, seed=0):
    """X -> Conv(6, 3x3) -> MaxPool(2) -> Flatten (or Reshape [-1, 96]) -> Gemm(transB) -> Y[N,5]."""
    r = graphs.rng(seed)
    inits = {"W1": _w(r, 6, 3, 3, 3), "B1": _w(r, 6), "Wf": _w(r, 5, 6 * 4 * 4), "Bf": _w(r, 5)}
    flat = helper.make_node("Flatten", ["p"], ["f"], axis=1)
    if reshape:
        inits["shape"] = np.array([-1, 96], np.int64)
        flat = helper.make_node("Reshape", ["p", "shape"], ["f"])
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("MaxPool", ["c1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        flat,
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["Y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 5])], inits)


def conv_transpose(seed=0):
    """X -> ConvTranspose(6, 2x2 s2) -> Relu -> Conv(6) -> Relu -> ConvTranspose(4) -> GAP -> Y[N,4,1,1]."""
    r = graphs.rng(seed)
    inits = {"Wt": _w(r, 3, 6, 2, 2), "Bt": _w(r, 6), "W1": _w(r, 6, 6, 3, 3), "B1": _w(r, 6), "Wu": _w(r, 6, 4, 3, 3)}
    nodes = [
        helper.make_node("ConvTranspose", ["X", "Wt", "Bt"], ["t"], strides=[2, 2], name="up"),
        helper.make_node("Relu", ["t"], ["rt"]),
        helper.make_node("Conv", ["rt", "W1", "B1"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("ConvTranspose", ["rc", "Wu"], ["u"], name="up2"),
        helper.make_node("GlobalAveragePool", ["u"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", 3, 4, 4])], [("Y", ["N", 4, 1, 1])], inits)


def matmul_mlp(seed=0):
    """X[N,5,8] -> MatMul(W1[8,16]) -> Add(b1) -> Relu -> Transpose -> Transpose -> MatMul(W2[16,8]) -> Add(b2) -> Y."""
    r = graphs.rng(seed)
    inits = {"W1": _w(r, 8, 16), "b1": _w(r, 16), "W2": _w(r, 16, 8), "b2": _w(r, 8)}
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("Transpose", ["hr"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["ht"], ["hu"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["hu", "W2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", 5, 8])], [("Y", ["N", 5, 8])], inits)


def gap_reshape_gemm(seed=0):
    """X -> Conv(8) -> Relu -> Conv(8) -> Add (residual) -> GlobalAveragePool -> Reshape[0,-1] -> Gemm -> Y[N,3]."""
    r = graphs.rng(seed)
    inits = {
        "W1": _w(r, 8, 3, 3, 3), "B1": _w(r, 8), "W2": _w(r, 8, 8, 3, 3), "B2": _w(r, 8),
        "shape": np.array([0, -1], np.int64), "Wf": _w(r, 8, 3), "Bf": _w(r, 3),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["Y"], name="fc"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 3])], inits)


def lrn_unknown(seed=0):
    """X -> Conv a(8) -> LRN (not understood) -> Conv(4) -> Y;  X -> Conv b(6) -> Relu -> Conv(4) -> Add -> Y."""
    r = graphs.rng(seed)
    inits = {"Wa": _w(r, 8, 3, 1, 1), "W2": _w(r, 4, 8, 1, 1), "Wb": _w(r, 6, 3, 1, 1), "W3": _w(r, 4, 6, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["X", "Wa"], ["a"], name="conv_a"),
        helper.make_node("LRN", ["a"], ["l"], size=3),
        helper.make_node("Conv", ["l", "W2"], ["y1"], name="conv_2"),
        helper.make_node("Conv", ["X", "Wb"], ["b"], name="conv_b"),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Conv", ["rb", "W3"], ["y2"], name="conv_3"),
        helper.make_node("Add", ["y1", "y2"], ["Y"]),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)


def se_block(seed=0):
    """X -> Conv(8) -> Relu -> x; x -> GAP -> Conv(4) -> Relu -> Conv(8) -> HardSigmoid -> Mul(x, .) -> Conv(4) -> Y."""
    r = graphs.rng(seed)
    inits = {
        "W1": _w(r, 8, 3, 3, 3), "B1": _w(r, 8), "Wr": _w(r, 4, 8, 1, 1), "Br": _w(r, 4),
        "We": _w(r, 8, 4, 1, 1), "Be": _w(r, 8), "W2": _w(r, 4, 8, 3, 3),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c"], ["x"]),
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        helper.make_node("Conv", ["g", "Wr", "Br"], ["gr"], name="reduce"),
        helper.make_node("Relu", ["gr"], ["grr"]),
        helper.make_node("Conv", ["grr", "We", "Be"], ["ge"], name="expand"),
        helper.make_node("HardSigmoid", ["ge"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["m"]),
        helper.make_node("Conv", ["m", "W2"], ["Y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)


def reduce_squeeze(seed=0):
    """X -> Conv(6) -> Relu -> ReduceMean(axes 2,3, keepdims 0) -> Unsqueeze(1) -> Squeeze(1) -> Gemm -> Y[N,3]."""
    r = graphs.rng(seed)
    inits = {"W1": _w(r, 6, 3, 3, 3), "B1": _w(r, 6), "Wf": _w(r, 6, 3), "ax": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c"], name="conv1"),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("ReduceMean", ["rc"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "ax"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax"], ["q"]),
        helper.make_node("Gemm", ["q", "Wf"], ["Y"], name="fc"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 3])], inits)


def grouped(seed=0):
    """X -> Conv(8) -> Conv(8, group 2) -> Relu -> Conv(6) -> Relu -> Conv(4) -> Y: the grouped conv is kept whole."""
    r = graphs.rng(seed)
    inits = {
        "W1": _w(r, 8, 3, 1, 1), "Wg": _w(r, 8, 4, 3, 3), "Bg": _w(r, 8), "W2": _w(r, 6, 8, 1, 1),
        "W3": _w(r, 4, 6, 3, 3),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c"], name="conv1"),
        helper.make_node("Conv", ["c", "Wg", "Bg"], ["g"], group=2, pads=[1, 1, 1, 1], name="gconv"),
        helper.make_node("Relu", ["g"], ["rg"]),
        helper.make_node("Conv", ["rg", "W2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3"], ["Y"], pads=[1, 1, 1, 1], name="conv3"),
    ]
    return make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)


BUILDERS = {
    "conv_bn_chain": (conv_bn_chain, (2, 3, 8, 8)),
    "residual": (residual, (2, 3, 8, 8)),
    "concat_split_slice": (concat_split_slice, (2, 3, 8, 8)),
    "depthwise_mul": (depthwise_mul, (2, 3, 8, 8)),
    "flatten_gemm": (flatten_gemm, (2, 3, 8, 8)),
    "reshape_gemm": (lambda: flatten_gemm(reshape=True), (2, 3, 8, 8)),
    "conv_transpose": (conv_transpose, (2, 3, 4, 4)),
    "matmul_mlp": (matmul_mlp, (2, 5, 8)),
    "gap_reshape_gemm": (gap_reshape_gemm, (2, 3, 8, 8)),
    "lrn_unknown": (lrn_unknown, (2, 3, 8, 8)),
    "se_block": (se_block, (2, 3, 8, 8)),
    "reduce_squeeze": (reduce_squeeze, (2, 3, 8, 8)),
    "grouped": (grouped, (2, 3, 8, 8)),
}


# ---- helpers shared with test_prune_models.py ---------------------------------------------------


def float_params(model: onnx.ModelProto) -> np.ndarray:
    """All floating-point initializer entries, concatenated."""
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    arrays = [onnx.numpy_helper.to_array(i).ravel() for i in floats]
    return np.concatenate(arrays) if arrays else np.zeros(0, F32)


def zero_units(model: onnx.ModelProto, pick) -> tuple[onnx.ModelProto, int]:
    """Zero every parameter entry of some free units; return the model and the units zeroed.

    ``pick(free_units) -> chosen`` chooses; the choice is trimmed so every tensor keeps a channel.
    Zeroed: the producers' output filters and biases, per-channel parameters on the way (BN, Mul/Add
    constants, depthwise filters) and the consumers' input slices.
    """
    graph = gs.import_onnx(model)
    a = analyze_channels(graph)
    frozen = a.frozen_units()
    free = sorted(r for r in a.unit_members() if r not in frozen)
    chosen = set(pick(free))
    for lay in a.layouts.values():  # never empty a tensor (the pass would keep one channel)
        roots = sorted({int(x) for x in a.roots(np.unique(lay.ids))})
        if roots and all(r in chosen for r in roots):
            chosen.discard(roots[0])
    gone = np.array([a.find(i) in chosen for i in range(len(a.parent))], dtype=bool)

    def zero(node, index, axis, mask):
        t = node.inputs[index]
        if not isinstance(t, gs.Constant) or not mask.any() or t.values.shape[axis] != mask.size:
            return
        v = np.array(t.values)
        idx = [slice(None)] * v.ndim
        idx[axis] = np.flatnonzero(mask)
        v[tuple(idx)] = 0
        t.values = v

    for s in a.sources:
        mask = gone[s.ids]
        zero(s.node, 1, s.weight_axis, mask)
        if s.bias_index is not None and len(s.node.inputs) > s.bias_index and s.node.inputs[s.bias_index].name:
            b = s.node.inputs[s.bias_index]
            if b.values.size == mask.size and mask.size > 1:
                zero(s.node, s.bias_index, b.values.ndim - 1, mask)
    for p in a.params:
        zero(p.node, p.input_index, p.axis, gone[p.ids])
    for c in a.consumers:
        zero(c.node, 1, c.weight_axis, gone[c.ids])
    return gs.export_onnx(graph), len(chosen)


def check_zero_pruning(model: onnx.ModelProto, pick, x: np.ndarray, input_name: str = "X") -> tuple[int, int]:
    """Zero units, prune, and check outputs (1e-5) and that exactly the zeroed entries left.

    Dead channels (computed but never read, e.g. outside a Slice) are removed first, so that what
    the pass removes afterwards is exactly what was zeroed.
    """
    model = run_passes(model, [PruneZeroChannels()]).model
    zeros_orig = int((float_params(model) == 0).sum())
    zeroed, n_units = zero_units(model, pick)
    zeroed_count = int((float_params(zeroed) == 0).sum()) - zeros_orig
    result = run_passes(zeroed, [PruneZeroChannels()])
    onnx.checker.check_model(result.model, full_check=True)
    ref = graphs.run(zeroed, {input_name: x})
    out = graphs.run(result.model, {input_name: x})
    for a, b in zip(ref, out, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    after = float_params(result.model)
    assert after.size == float_params(zeroed).size - zeroed_count
    assert int((after == 0).sum()) == zeros_orig
    return n_units, zeroed_count


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16))
def test_zeroed_units_are_removed_exactly(name, seed):
    build, shape = BUILDERS[name]
    model = build()
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape).astype(F32)
    check_zero_pruning(model, lambda free: [u for u in free if r.random() < 0.4], x)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_other_free_unit_zeroed_is_removed(name):
    build, shape = BUILDERS[name]
    x = graphs.rng(7).standard_normal(shape).astype(F32)
    n_units, zeroed = check_zero_pruning(build(), lambda free: free[::2], x)
    assert n_units > 0 and zeroed > 0


@pytest.mark.parametrize("name", sorted(set(BUILDERS) - {"concat_split_slice"}))
def test_untouched_model_is_unchanged(name):
    build, _ = BUILDERS[name]
    model = build()
    result = run_passes(model, [PruneZeroChannels()])
    assert result.stats["prune_zero_channels.channels_removed"] == 0
    assert float_params(result.model).size == float_params(model).size


def test_dead_channels_outside_a_slice_are_removed():
    """concat_split_slice: concat channels 3 (a3), 8, 9 (b4, b5) are never read, so they go (exact)."""
    model = concat_split_slice()
    result = run_passes(model, [PruneZeroChannels()])
    assert result.stats["prune_zero_channels.channels_removed"] == 3
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["Wa"] == (3, 3, 3, 3) and shapes["Wb"] == (4, 3, 1, 1) and shapes["Wq"] == (5, 4, 3, 3)
    x = graphs.rng(6).standard_normal((2, 3, 8, 8)).astype(F32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5)


def test_groups_couple_residual_branches():
    """residual: conv_a and conv_b outputs are added, so they form one group of 8 units."""
    a = analyze_channels(gs.import_onnx(residual()))
    groups = {g.name: g for g in a.groups()}
    assert set(groups) == {"conv_a", "conv_c"}
    assert len(groups["conv_a"].units) == 8 and len(groups["conv_a"].sources) == 2
    assert groups["conv_c"].is_frozen and "graph output" in groups["conv_c"].frozen[0]


def test_concat_offsets_and_slice():
    """concat: conv_a(4)+conv_b(6) -> Split[3,7]; Slice 1:5 of the second part [a3 b0..b5] is b0..b3."""
    g = gs.import_onnx(concat_split_slice())
    a = analyze_channels(g)
    ids_a = a.layouts["a"].ids
    ids_b = a.layouts["b"].ids
    np.testing.assert_array_equal(a.layouts["cat"].ids, np.concatenate([ids_a, ids_b]))
    np.testing.assert_array_equal(a.layouts["s0"].ids, ids_a[:3])
    np.testing.assert_array_equal(a.layouts["sl"].ids, ids_b[:4])


def test_unknown_op_freezes_only_its_group_and_says_why():
    """lrn_unknown: channels of conv_a reach LRN and stay; conv_b's zeroed channels go."""
    model = lrn_unknown()
    g = gs.import_onnx(model)
    for name in ("Wa", "Wb"):  # zero output channel 2 of both producers and their consumer slices
        t = g.tensors()[name]
        v = np.array(t.values)
        v[2] = 0
        t.values = v
    for name in ("W2", "W3"):
        t = g.tensors()[name]
        v = np.array(t.values)
        v[:, 2] = 0
        t.values = v
    zeroed = gs.export_onnx(g)
    result = run_passes(zeroed, [PruneZeroChannels()])
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["Wa"] == (8, 3, 1, 1) and shapes["W2"] == (4, 8, 1, 1)
    assert shapes["Wb"] == (5, 3, 1, 1) and shapes["W3"] == (4, 5, 1, 1)
    assert any("LRN" in n and "not understood" in n for n in result.notes)
    x = graphs.rng(3).standard_normal((2, 3, 8, 8)).astype(F32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(zeroed, {"X": x})[0], atol=1e-5)


def test_constant_channel_folds_into_unpadded_consumer_only():
    """A zero-weight channel with bias b: folded into a 1x1 consumer (removed), kept before a padded 3x3."""
    for consumer_pad, removed in ((0, 1), (1, 0)):
        r = graphs.rng(1)
        w1, w2 = _w(r, 6, 3, 3, 3), _w(r, 4, 6, 3 if consumer_pad else 1, 3 if consumer_pad else 1)
        w1[2] = 0
        inits = {"W1": w1, "B1": _w(r, 6) + 2.0, "W2": w2, "B2": _w(r, 4)}
        nodes = [
            helper.make_node("Conv", ["X", "W1", "B1"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "W2", "B2"], ["Y"], pads=[consumer_pad] * 4),
        ]
        model = make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4, 8, 8])], inits)
        result = run_passes(model, [PruneZeroChannels()])
        assert result.stats["prune_zero_channels.channels_removed"] == removed
        if not removed:
            assert any("zero padding" in n for n in result.notes)
        x = graphs.rng(2).standard_normal((2, 3, 8, 8)).astype(F32)
        np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5)


def test_constant_channel_folds_into_gemm_through_flatten():
    """flatten_gemm with conv1 channel 1 constant (zero filter, bias 0.7): its 16 features fold into Bf."""
    model = flatten_gemm()
    g = gs.import_onnx(model)
    w = np.array(g.tensors()["W1"].values)
    w[1] = 0
    g.tensors()["W1"].values = w
    zeroed = gs.export_onnx(g)
    result = run_passes(zeroed, [PruneZeroChannels()])
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["W1"] == (5, 3, 3, 3) and shapes["Wf"] == (5, 80)
    x = graphs.rng(4).standard_normal((3, 3, 8, 8)).astype(F32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(zeroed, {"X": x})[0], atol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "act", "contrib"])
def test_prune_channels_hits_ratio_and_stays_valid(criterion):
    """conv_bn_chain at 50%: conv1 keeps 4 of 8 channels, MACs of conv2 halve, the model runs."""
    model = conv_bn_chain()
    acts = None
    if criterion in ("act", "contrib"):
        targets = activation_targets(gs.import_onnx(model))
        assert targets == {"r1": 1}
        acts = {"r1": np.arange(8, dtype=F32)}
    result = run_passes(model, [PruneChannels(0.5, criterion=criterion, activations=acts)])
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["W1"] == (4, 3, 3, 3) and shapes["W2"] == (4, 4, 3, 3) and shapes["bn_g"] == (4,)
    if criterion == "act":  # the four channels with the smallest mean |activation| (0..3) go
        np.testing.assert_array_equal(
            onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "B1")),
            onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "B1"))[4:],
        )
    if criterion == "contrib":  # keep the 4 largest |x_c| * ||W2[:, c]||_2
        w2 = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W2"))
        score = np.arange(8) * np.sqrt((w2.astype(np.float64) ** 2).sum(axis=(0, 2, 3)))
        b1 = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "B1"))
        kept = onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "B1"))
        np.testing.assert_array_equal(kept, b1[np.sort(np.argsort(score)[4:])])
    before, after = count_macs(model), count_macs(result.model)
    assert after["conv2"] * 2 == before["conv2"]
    x = graphs.rng(5).standard_normal((2, 3, 8, 8)).astype(F32)
    assert graphs.run(result.model, {"X": x})[0].shape == (2, 4, 8, 8)


@pytest.mark.parametrize(("ratio", "kept"), [(0.4, 4), (0.3, 8), (0.7, 4)])
def test_prune_channels_multiple_and_layer_scope(ratio, kept):
    """residual per layer, multiple 4: keep 8 - round(8 * ratio) rounded to the nearest multiple of 4 (>= 4)."""
    result = run_passes(residual(), [PruneChannels(ratio, scope="layer", multiple=4)])
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["Wa"][0] == shapes["Wb"][0] == shapes["Wb"][1] == shapes["Wc"][1] == kept


def test_l2_importance_sums_coupled_filters():
    """residual: a unit's l2 score is ||Wa[c]|| + ||Wb[c]|| (the two coupled producers)."""
    model = residual()
    a = analyze_channels(gs.import_onnx(model))
    scores = unit_importance(a, "l2")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    root = a.find(int(a.layouts["a"].ids[3]))
    expected = np.linalg.norm(inits["Wa"][3]) + np.linalg.norm(inits["Wb"][3])
    assert scores[root] == pytest.approx(expected, rel=1e-6)


def test_bn_criterion_without_bn_is_a_clear_error():
    from onnxpress.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="BatchNormalization"):
        run_passes(residual(), [PruneChannels(0.5, criterion="bn")])


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="ratio"):
        PruneChannels(1.0)
    with pytest.raises(ValueError, match="criterion"):
        PruneChannels(0.5, criterion="taylor")


def test_count_params_and_macs_by_hand():
    """conv_bn_chain: conv1 8*3*9 MACs per pixel, conv2 4*8*9; params split per first reader."""
    model = conv_bn_chain()
    macs = count_macs(model)
    assert macs == {"conv1": 8 * 64 * 27, "conv2": 4 * 64 * 72}
    assert count_macs(model, batch=3)["conv2"] == 3 * 4 * 64 * 72
    params = count_params(model)
    assert params["conv1"] == 8 * 27 + 8 and params["conv2"] == 4 * 72 + 4 and params["b1"] == 32
    assert sum(params.values()) == float_params(model).size


def test_grouped_conv_freezes_its_input_only():
    """grouped: conv1's channels enter a group-2 conv and are kept (reason given); gconv's outputs open no
    group (removing one would unbalance the groups); conv2's channels are free."""
    a = analyze_channels(gs.import_onnx(grouped()))
    groups = {g.name: g for g in a.groups()}
    assert set(groups) == {"conv1", "conv2", "conv3"}
    assert groups["conv1"].is_frozen and "grouped Conv" in groups["conv1"].frozen[0]
    assert not groups["conv2"].is_frozen and len(groups["conv2"].units) == 6


def test_se_block_couples_scale_and_features():
    """se_block: Mul(x, s) couples conv1's and expand's channels into one group of 8 units."""
    a = analyze_channels(gs.import_onnx(se_block()))
    groups = {g.name: g for g in a.groups()}
    assert len(groups["conv1"].sources) == 2 and len(groups["conv1"].units) == 8
    assert not groups["reduce"].is_frozen and len(groups["reduce"].units) == 4


def test_constant_channel_folds_into_matmul_bias_add():
    """matmul_mlp with W1[:, 3] = 0 and b1[3] = 0.5: Relu gives 0.5 on hidden unit 3, folded into b2."""
    model = matmul_mlp()
    g = gs.import_onnx(model)
    w = np.array(g.tensors()["W1"].values)
    w[:, 3] = 0
    g.tensors()["W1"].values = w
    b = np.array(g.tensors()["b1"].values)
    b[3] = 0.5
    g.tensors()["b1"].values = b
    zeroed = gs.export_onnx(g)
    result = run_passes(zeroed, [PruneZeroChannels()])
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["W1"] == (8, 15) and shapes["b1"] == (15,) and shapes["W2"] == (15, 8)
    x = graphs.rng(8).standard_normal((2, 5, 8)).astype(F32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(zeroed, {"X": x})[0], atol=1e-5)


def test_constant_channel_folds_into_gemm_without_bias_and_split_gets_sizes():
    """Opset 18: Conv(6) -> Relu -> Split(num_outputs=2) -> GAP -> Flatten -> Gemm(no C) for each half.

    Channel 1 (zero filter, bias 1.0 -> Relu -> GAP -> constant 1.0) folds into a new Gemm bias; the
    Split gets explicit sizes [2, 3].
    """
    r = graphs.rng(9)
    w = _w(r, 6, 3, 3, 3)
    w[1] = 0
    b = _w(r, 6)
    b[1] = 1.0
    inits = {"W": w, "B": b, "G1": _w(r, 3, 4), "G2": _w(r, 3, 4)}
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("Split", ["rc"], ["s1", "s2"], axis=1, num_outputs=2),
        helper.make_node("GlobalAveragePool", ["s1"], ["p1"]),
        helper.make_node("GlobalAveragePool", ["s2"], ["p2"]),
        helper.make_node("Flatten", ["p1"], ["f1"]),
        helper.make_node("Flatten", ["p2"], ["f2"]),
        helper.make_node("Gemm", ["f1", "G1"], ["y1"]),
        helper.make_node("Gemm", ["f2", "G2"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["Y"]),
    ]
    model = make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 4])], inits, opset=18)
    result = run_passes(model, [PruneZeroChannels()])
    assert result.stats["prune_zero_channels.channels_removed"] == 1
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    sizes = next(i for i in result.model.graph.initializer if i.name == split.input[1])
    assert onnx.numpy_helper.to_array(sizes).tolist() == [2, 3]
    x = graphs.rng(10).standard_normal((2, 3, 8, 8)).astype(F32)
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5)


@pytest.mark.parametrize("op", ["BatchNormalization", "Mul"])
def test_a_shared_per_channel_constant_keeps_its_channels(op):
    """Two branches read one BN parameter set (or one per-channel Mul scale): removing branch a's zero channel
    would need a sliced copy beside the kept original, 56 -> 63 parameters for BN. It stays, and says why;
    with private constants it goes."""
    for shared in (True, False):
        r = graphs.rng(5)
        wa, wb = _w(r, 4, 3, 1, 1), _w(r, 4, 3, 1, 1)
        wa[1] = 0
        inits = {"Wa": wa, "Wb": wb, "Wc": _w(r, 2, 4, 1, 1), "Wd": _w(r, 2, 4, 1, 1)}
        names = {}
        for branch in ("a", "b"):
            key = "p" if shared else f"p{branch}"
            if op == "BatchNormalization":
                inits.update(_bn(graphs.rng(6), key, 4))
                names[branch] = _bn_node(key, f"c{branch}", f"n{branch}")
            else:
                inits[key] = graphs.rng(6).uniform(0.5, 1.5, (1, 4, 1, 1)).astype(F32)
                names[branch] = helper.make_node("Mul", [f"c{branch}", key], [f"n{branch}"])
        nodes = [
            helper.make_node("Conv", ["X", "Wa"], ["ca"]), names["a"], helper.make_node("Conv", ["na", "Wc"], ["ya"]),
            helper.make_node("Conv", ["X", "Wb"], ["cb"]), names["b"], helper.make_node("Conv", ["nb", "Wd"], ["yb"]),
            helper.make_node("Add", ["ya", "yb"], ["Y"]),
        ]
        model = make_model(nodes, [("X", ["N", 3, 8, 8])], [("Y", ["N", 2, 8, 8])], inits)
        result = run_passes(model, [PruneZeroChannels()])
        assert result.stats["prune_zero_channels.channels_removed"] == (0 if shared else 1)
        assert sum(count_params(result.model).values()) <= sum(count_params(model).values()) - (0 if shared else 5)
        if shared:
            reasons = [why for g in analyze_channels(gs.import_onnx(model)).groups() for why in g.frozen]
            assert any("shares its" in why for why in reasons), reasons
        x = graphs.rng(2).standard_normal((2, 3, 8, 8)).astype(F32)
        np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(model, {"X": x})[0], atol=1e-5)
