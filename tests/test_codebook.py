"""CodebookWeights and kmeans_1d: reconstruction error on onnxruntime equals the k-means objective."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxpress.passes.codebook import CodebookWeights, kmeans_1d
from onnxpress.pipeline import run_passes
from tests import graphs


def _rebuilt_weight(model: onnx.ModelProto, node_index: int = 0) -> np.ndarray:
    """The weight the rewritten layer reads, computed by onnxruntime (exposed as an extra output)."""
    layers = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    name = model.graph.node[[i for i, n in enumerate(model.graph.node) if n.op_type in layers][
        node_index
    ]].input[1]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    feeds = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim], np.float32)
             for i in probe.graph.input}
    return graphs.run(probe, feeds)[0]


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """X[N,8,6,6] -> Conv(W[16,8,3,3], B) -> Y."""
    r = graphs.rng(seed)
    inits = {"W": r.standard_normal((16, 8, 3, 3)).astype(np.float32), "B": r.standard_normal(16).astype(np.float32)}
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], pads=[1, 1, 1, 1])
    return graphs.make_model([node], [("X", ["N", 8, 6, 6])], [("Y", ["N", 16, 6, 6])], inits)


def matmul_model(k: int = 24, n: int = 20, seed: int = 1) -> onnx.ModelProto:
    """X[N,24] -> MatMul(W[24,20]) -> Y[N,20]."""
    w = graphs.rng(seed).laplace(size=(k, n)).astype(np.float32)
    return graphs.make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [("X", ["N", k])], [("Y", ["N", n])],
                             {"W": w})


def _weight(model: onnx.ModelProto) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W"))


@settings(deadline=None, max_examples=40)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 400))
def test_kmeans_1d_is_a_lloyd_fixed_point(seed, bits, size):
    x = np.random.default_rng(seed).standard_t(3, size)
    res = kmeans_1d(x, 2**bits)
    c = res.centroids
    assert c.size <= 2**bits and np.all(np.diff(c) > 0)
    assert res.sse == pytest.approx(float(np.sum((x - c[res.labels]) ** 2)), rel=1e-12, abs=1e-12)
    # every value sits at its nearest centroid; every used centroid is the mean of its members
    nearest = np.abs(x[:, None] - c[None, :]).min(axis=1)
    np.testing.assert_allclose(np.abs(x - c[res.labels]), nearest, rtol=0, atol=1e-12)
    for j in np.unique(res.labels):
        assert c[j] == pytest.approx(x[res.labels == j].mean(), rel=1e-9, abs=1e-12)


def test_kmeans_beats_a_uniform_grid_on_heavy_tails():
    x = graphs.rng(2).laplace(size=5000)
    res = kmeans_1d(x, 16)
    grid = np.linspace(x.min(), x.max(), 16)
    uniform_sse = float(np.sum((x - grid[np.abs(x[:, None] - grid).argmin(axis=1)]) ** 2))
    assert res.sse < 0.5 * uniform_sse


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_conv_reconstruction_error_equals_kmeans_objective(bits):
    model = conv_model()
    w = _weight(model)
    pass_ = CodebookWeights(bits=bits, channel_scale=False, keep_gain=False)
    result = run_passes(model, [pass_])
    assert result.stats["codebook_weights.weights"] == 1
    w_hat = _rebuilt_weight(result.model)
    assert np.unique(w_hat).size <= 2**bits
    expected = kmeans_1d(w, 2**bits).sse
    assert float(np.sum((w.astype(np.float64) - w_hat) ** 2)) == pytest.approx(expected, rel=1e-5)
    assert pass_.objective["W"] == pytest.approx(expected, rel=1e-5)
    # and the layer really runs on the rebuilt weight
    x = graphs.rng(3).standard_normal((2, 8, 6, 6)).astype(np.float32)
    ref = graphs.make_model(list(model.graph.node), [("X", ["N", 8, 6, 6])], [("Y", ["N", 16, 6, 6])],
                            {"W": w_hat, "B": onnx.numpy_helper.to_array(model.graph.initializer[1])})
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(ref, {"X": x})[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("group_size", [None, 1, 5])
def test_matmul_groups_run_along_output_columns(group_size):
    """MatMul W[K,N]: output channels are columns; each group of columns has its own codebook."""
    model = matmul_model()
    w = _weight(model)
    result = run_passes(model, [CodebookWeights(bits=3, group_size=group_size, channel_scale=False, keep_gain=False)])
    w_hat = _rebuilt_weight(result.model)
    g = group_size or w.shape[1]
    expected = sum(kmeans_1d(w[:, j : j + g], 8).sse for j in range(0, w.shape[1], g))
    assert float(np.sum((w.astype(np.float64) - w_hat) ** 2)) == pytest.approx(expected, rel=1e-5)
    for j in range(0, w.shape[1], g):
        assert np.unique(w_hat[:, j : j + g]).size <= 8


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_both_layouts(trans_b):
    r = graphs.rng(4)
    w = r.standard_normal((12, 30) if trans_b else (30, 12)).astype(np.float32)
    model = graphs.make_model([helper.make_node("Gemm", ["X", "W"], ["Y"], transB=trans_b)],
                              [("X", ["N", 30])], [("Y", ["N", 12])], {"W": w})
    result = run_passes(model, [CodebookWeights(bits=4, group_size=4, channel_scale=False, keep_gain=False)])
    w_hat = _rebuilt_weight(result.model)
    rows = w if trans_b else w.T  # output channels first
    expected = sum(kmeans_1d(rows[j : j + 4], 16).sse for j in range(0, 12, 4))
    assert float(np.sum((w.astype(np.float64) - w_hat) ** 2)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_weights_take_codebooks_per_output_channel(group):
    """ConvTranspose W[C_in, C_out / group, k, k] (no integer kernel in onnxruntime, so int8 only stores it):
    its output channels lie on axis 1, each group of them with its own codebook; the layer runs on the rebuilt
    weight, which reconstruct() gives too."""
    import onnx_graphsurgeon as gs

    r = graphs.rng(8)
    w = r.standard_normal((8, 12 // group, 4, 4)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], strides=[2, 2], pads=[1, 1, 1, 1], group=group)
    model = graphs.make_model([node], [("X", ["N", 8, 5, 5])], [("Y", ["N", 12, 10, 10])], {"W": w})
    pass_ = CodebookWeights(bits=3, group_size=2, channel_scale=False, keep_gain=False)
    result = run_passes(model, [pass_])
    assert result.stats["codebook_weights.weights"] == 1
    w_hat = _rebuilt_weight(result.model)
    expected = sum(kmeans_1d(w[:, j : j + 2], 8).sse for j in range(0, w.shape[1], 2))
    assert float(np.sum((w.astype(np.float64) - w_hat) ** 2)) == pytest.approx(expected, rel=1e-5)
    assert all(np.unique(w_hat[:, j : j + 2]).size <= 8 for j in range(0, w.shape[1], 2))
    np.testing.assert_array_equal(pass_.reconstruct(gs.import_onnx(model).nodes[0], w), w_hat)
    x = graphs.rng(9).standard_normal((2, 8, 5, 5)).astype(np.float32)
    rebuilt = graphs.make_model([node], [("X", ["N", 8, 5, 5])], [("Y", ["N", 12, 10, 10])], {"W": w_hat})
    np.testing.assert_allclose(graphs.run(result.model, {"X": x})[0], graphs.run(rebuilt, {"X": x})[0], atol=1e-5)


@pytest.mark.parametrize(("bits", "pack", "max_ratio"), [(4, True, 0.125 + 0.02), (4, False, 0.25 + 0.02),
                                                       (6, True, 0.25 + 0.02)])
def test_stored_size_shrinks(bits, pack, max_ratio):
    model = matmul_model(k=128, n=64)
    result = run_passes(model, [CodebookWeights(bits=bits, pack=pack, channel_scale=False)])
    stored = sum(i.ByteSize() for i in result.model.graph.initializer)
    original = sum(i.ByteSize() for i in model.graph.initializer)
    assert stored < max_ratio * original + 400  # + protobuf headers of the small constants


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_narrow_indices_pack_more_per_byte_and_rebuild_exactly(bits):
    """8 / 4 / 2 / 2 indices per byte at 1 / 2 / 3 / 4 bits; the packed rebuild equals the unpacked one bit for bit.

    7747 weights (not a multiple of 8) exercise the padding of the last byte's lanes.
    """
    model = matmul_model(k=127, n=61)
    packed = run_passes(model, [CodebookWeights(bits=bits, channel_scale=False)]).model
    plain = run_passes(model, [CodebookWeights(bits=bits, pack=False, channel_scale=False)]).model
    np.testing.assert_array_equal(_rebuilt_weight(packed), _rebuilt_weight(plain))
    codes = next(i for i in packed.graph.initializer if i.name.endswith("codes_packed"))
    per_byte = {1: 8, 2: 4, 3: 2, 4: 2}[bits]
    assert int(np.prod(codes.dims)) == -(-127 * 61 // per_byte)


def test_small_weights_and_bad_settings():
    result = run_passes(graphs.gemm(), [CodebookWeights(bits=4)])  # W has 48 elements < 256
    assert not result.modified and "elements" in result.notes[0]
    with pytest.raises(ValueError, match="bits"):
        CodebookWeights(bits=9)
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(np.zeros(0), 4)


def test_public_codebook_writes_a_smaller_model(tmp_path):
    import onnxpress.advanced as adv

    model = matmul_model(k=128, n=64)
    out = tmp_path / "cb.onnx"
    result = adv.codebook(model, out, bits=4)
    assert result.stats["codebook_weights.weights"] == 1
    assert out.stat().st_size < 0.2 * len(model.SerializeToString())
    x = graphs.rng(5).standard_normal((3, 128)).astype(np.float32)
    w_hat = _rebuilt_weight(result.model)
    np.testing.assert_allclose(graphs.run(onnx.load(str(out)), {"X": x})[0], x @ w_hat, atol=1e-4, rtol=0)


def test_quantize_codebook_flag(tmp_path, capsys):
    from onnxpress.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "cb.onnx"
    onnx.save(matmul_model(k=128, n=64), str(src))
    assert main(["quantize", str(src), "-o", str(out), "--codebook", "4", "-q"]) == 0
    assert out.stat().st_size < 0.2 * src.stat().st_size
    assert "codebook" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(out), "--codebook", "12"]) == 2
    assert "bits must be in 1..8" in capsys.readouterr().err
    # --block-size is for int4 weights: with a codebook it would change nothing, so it is refused, not dropped
    assert main(["quantize", str(src), "-o", str(out), "--codebook", "4", "--block-size", "32"]) == 2
    assert "sets the scale blocks of int4 weights" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["conv", "matmul"])
def test_channel_scale_objective_is_over_normalised_weights(which):
    """With channel_scale, W_hat_c / s_c are the codebook levels and the objective is over W_c / s_c."""
    model = conv_model() if which == "conv" else matmul_model()
    w = _weight(model).astype(np.float64)
    axis = 0 if which == "conv" else 1
    first = np.moveaxis(w, axis, 0)
    scale = np.abs(first.reshape(first.shape[0], -1)).max(axis=1).astype(np.float32).astype(np.float64)
    normalised = first / scale.reshape((-1,) + (1,) * (first.ndim - 1))
    pass_ = CodebookWeights(bits=3, channel_scale=True, keep_gain=False)
    result = run_passes(model, [pass_])
    w_hat = np.moveaxis(_rebuilt_weight(result.model).astype(np.float64), axis, 0)
    levels = w_hat / scale.reshape((-1,) + (1,) * (first.ndim - 1))
    assert np.unique(np.round(levels, 5)).size <= 8
    expected = kmeans_1d(normalised, 8).sse
    assert pass_.objective["W"] == pytest.approx(expected, rel=1e-5)
    assert float(np.sum((normalised - levels) ** 2)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("which", ["conv", "matmul"])
def test_preserve_norm_keeps_each_channel_norm_and_the_codebook(which):
    """preserve_norm: same indices and levels, only the channel scales change, so that ||W_hat_c|| = ||W_c||."""
    model = conv_model() if which == "conv" else matmul_model()
    w = _weight(model).astype(np.float64)
    axis = 0 if which == "conv" else 1
    plain = np.moveaxis(_rebuilt_weight(run_passes(model, [CodebookWeights(bits=3, keep_gain=False)]).model), axis, 0)
    kept = np.moveaxis(_rebuilt_weight(run_passes(model, [CodebookWeights(bits=3, preserve_norm=True)]).model), axis, 0)
    rows = lambda a: a.reshape(a.shape[0], -1).astype(np.float64)  # noqa: E731
    norm_w = np.linalg.norm(rows(np.moveaxis(w, axis, 0)), axis=1)
    np.testing.assert_allclose(np.linalg.norm(rows(kept), axis=1), norm_w, rtol=1e-5)
    gain = np.linalg.norm(rows(kept), axis=1) / np.linalg.norm(rows(plain), axis=1)
    np.testing.assert_allclose(rows(kept), rows(plain) * gain[:, None], rtol=1e-5, atol=1e-7)
    # cluster means shrink the layer as a whole (not every channel of a shared codebook): gains > 1 on average
    assert np.mean(gain) > 1.0 and np.max(np.abs(gain - 1.0)) > 0.01
    with pytest.raises(ValueError, match="channel_scale"):
        CodebookWeights(preserve_norm=True, channel_scale=False)


@pytest.mark.parametrize("kwargs", [{}, {"group_size": 4}, {"channel_scale": False}, {"preserve_norm": True}])
def test_reconstruct_matches_the_graph_rebuild(kwargs):
    model = conv_model()
    pass_ = CodebookWeights(bits=3, **kwargs)
    import onnx_graphsurgeon as gs

    node = gs.import_onnx(model).nodes[0]
    expected = pass_.reconstruct(node, _weight(model))
    np.testing.assert_array_equal(_rebuilt_weight(run_passes(model, [pass_]).model), expected)


def test_codebook_with_bias_correction_cancels_the_mean_shift():
    """k-means levels shrink large weights; BC with the codebook's own reconstruction cancels the mean shift."""
    import onnxpress.advanced as adv

    base = conv_model(seed=3)  # X -> Relu -> r -> Conv: the observed mean is of an intermediate tensor
    model = graphs.make_model(
        [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("Conv", ["r", "W", "B"], ["Y"], pads=[1, 1, 1, 1])],
        [("X", ["N", 8, 6, 6])], [("Y", ["N", 16, 6, 6])],
        {i.name: onnx.numpy_helper.to_array(i) for i in base.graph.initializer},
    )
    r = graphs.rng(6)
    shift = r.uniform(0.5, 2.0, 8).reshape(1, 8, 1, 1)
    calib = [{"X": np.maximum(r.standard_normal((32, 8, 6, 6)) + shift, 0).astype(np.float32)}]
    held = np.maximum(r.standard_normal((64, 8, 6, 6)) + shift, 0).astype(np.float32)
    ref = graphs.run(model, {"X": held})[0].astype(np.float64)

    def mean_error(m: onnx.ModelProto) -> float:
        d = graphs.run(m, {"X": held})[0] - ref
        return float(np.abs(d.mean(axis=(0, 2, 3))).mean())

    plain = adv.codebook(model, bits=2).model
    fixed = adv.codebook(model, bits=2, data=calib, bias_correction=True).model
    assert mean_error(fixed) < 0.2 * mean_error(plain)
    from onnxpress.errors import CalibrationError

    with pytest.raises(CalibrationError):
        adv.codebook(model, bits=2, bias_correction=True)


@pytest.mark.parametrize(("which", "kwargs"), [("conv", {}), ("matmul", {}), ("conv", {"channel_scale": False,
                                                                                        "group_size": 4})])
def test_keep_gain_makes_each_projection_exact_with_the_same_codes(which, kwargs):
    """keep_gain: <W_hat_c, W_c> = ||W_c||^2 per channel (per group without channel scales), with the indices of
    plain k-means (W_hat = g_c * plain rebuild); cluster means shrink the layer as a whole (mean g_c > 1)."""
    model = conv_model() if which == "conv" else matmul_model()
    w = _weight(model).astype(np.float64)
    axis = 0 if which == "conv" else 1
    rows = lambda a: np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).astype(np.float64)  # noqa: E731
    plain = rows(_rebuilt_weight(run_passes(model, [CodebookWeights(bits=3, keep_gain=False, **kwargs)]).model))
    kept = rows(_rebuilt_weight(run_passes(model, [CodebookWeights(bits=3, **kwargs)]).model))
    g = kwargs.get("group_size", 1)
    unit = lambda a: a.reshape(a.shape[0] // g, -1)  # noqa: E731  (one gain per channel, or per group of g)
    wr = unit(rows(w))
    np.testing.assert_allclose(np.sum(unit(kept) * wr, axis=1), np.sum(wr * wr, axis=1), rtol=1e-5)
    gain = np.sum(unit(kept) * wr, axis=1) / np.sum(unit(plain) * wr, axis=1)
    np.testing.assert_allclose(unit(kept), unit(plain) * gain[:, None], rtol=1e-5, atol=1e-6)
    assert np.mean(gain) > 1.0 and np.max(np.abs(gain - 1.0)) > 0.005


# ----------------------------------------------------------------------------- GPTQ-style indices


def _correlated(n: int, k: int, seed: int) -> np.ndarray:
    """n samples of k strongly correlated features (what makes error feedback worth it); one distribution
    (fixed mixing matrix and mean), ``seed`` draws the samples."""
    mix, mean = graphs.rng(0).standard_normal((k, k)), graphs.rng(1).standard_normal(k)
    return (graphs.rng(seed).standard_normal((n, k)) @ mix + mean).astype(np.float32)


def test_gptq_assign_lowers_the_output_error_not_the_weight_error():
    """Same levels: GPTQ indices give a smaller ||X (W - W_hat)^T||^2 than nearest levels (which minimise the
    weight error); per-row Hessians [C, M, M] give each row's own assignment."""
    from onnxpress.passes.codebook import gptq_assign

    r = graphs.rng(8)
    w = r.standard_normal((6, 12))
    levels = np.tile(np.linspace(-2.5, 2.5, 8), (6, 1)) * r.uniform(0.5, 1.5, (6, 1))
    x = _correlated(2000, 12, 9).astype(np.float64)
    h = x.T @ x / len(x)
    idx = gptq_assign(w, levels, h)
    nearest = np.abs(w[:, :, None] - levels[:, None, :]).argmin(axis=2)
    pick = lambda i: np.take_along_axis(levels, i, axis=1)  # noqa: E731
    out_err = lambda i: float(np.sum((x @ (w - pick(i)).T) ** 2))  # noqa: E731
    assert idx.shape == w.shape and idx.min() >= 0 and idx.max() < 8
    assert out_err(idx) < 0.7 * out_err(nearest)
    assert np.sum((w - pick(idx)) ** 2) > np.sum((w - pick(nearest)) ** 2)
    per_row = np.stack([h * (1 + i) for i in range(6)])  # a row's Hessian scale does not change its indices
    np.testing.assert_array_equal(gptq_assign(w, levels, per_row), idx)
    with pytest.raises(ValueError, match="hessian"):
        gptq_assign(w, levels, h[:5, :5])


@pytest.mark.parametrize(
    ("spatial", "kernel", "group", "pads", "strides", "dilations"),
    [
        ((7, 6), (3, 3), 1, [1, 1, 1, 1], [1, 1], [1, 1]),
        ((7, 6), (3, 3), 1, [0, 1, 1, 0], [2, 2], [1, 1]),
        ((7, 6), (3, 3), 4, [1, 1, 1, 1], [2, 1], [1, 1]),  # depthwise
        ((7, 6), (3, 2), 2, [2, 0, 1, 1], [1, 2], [2, 1]),  # grouped, dilated
        ((9, 7), (3, 3), 1, [2, 2, 2, 2], [1, 1], [2, 3]),  # dilated
        ((20,), (3,), 1, [4, 0], [1], [2]),  # 1-D, causal padding (a TCN)
        ((20,), (5,), 2, [2, 2], [3], [1]),  # 1-D grouped, strided
        ((5, 4, 6), (3, 2, 3), 1, [1, 0, 1, 1, 1, 0], [1, 2, 1], [1, 1, 2]),  # 3-D
    ],
)
def test_input_moments_give_the_conv_output_energy(spatial, kernel, group, pads, strides, dilations):
    """w_o^T H_g w_o = mean of y_o^2 over samples and positions, y = Conv(x, W) on onnxruntime, for 1-, 2- and
    3-D convs with strides, pads, dilations and groups (one H per group): the patches are in the weight's own
    order."""
    from onnxpress.advanced import _moment_observer, import_graph

    r = graphs.rng(10)
    w = r.standard_normal((4, 4 // group, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["X", "W"], ["Y"], group=group, pads=pads, strides=strides, dilations=dilations)
    nd = len(spatial)
    out = [(spatial[i] + pads[i] + pads[i + nd] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(nd)]
    model = graphs.make_model([node], [("X", ["N", 4, *spatial])], [("Y", ["N", 4, *out])], {"W": w})
    x = r.standard_normal((5, 4, *spatial)).astype(np.float32)
    y = graphs.run(model, {"X": x})[0].astype(np.float64)
    obs = _moment_observer(import_graph(model).nodes[0])
    obs.update(x[:2])
    obs.update(x[2:])
    h = obs.hessian()
    rows = w.reshape(4, -1).astype(np.float64)
    if group == 1:
        energy = np.einsum("om,mk,ok->o", rows, h, rows)
    else:
        assert h.shape == (group, rows.shape[1], rows.shape[1])
        energy = np.einsum("om,omk,ok->o", rows, np.repeat(h, 4 // group, axis=0), rows)
    np.testing.assert_allclose(energy, np.mean(y**2, axis=(0, *range(2, 2 + nd))), rtol=1e-5)


@pytest.mark.parametrize(("spatial", "kernel", "auto_pad", "strides", "dilations"), [
    ((7, 6), (3, 3), "SAME_UPPER", [2, 2], [1, 1]),
    ((7, 6), (4, 3), "SAME_LOWER", [2, 1], [1, 1]),  # onnxruntime runs SAME only without dilation
    ((7, 6), (3, 3), "VALID", [2, 2], [1, 1]),
    ((21,), (4,), "SAME_UPPER", [3], [1]),
    ((21,), (3,), "VALID", [1], [2]),
])
def test_auto_pad_moments_give_the_conv_output_energy(spatial, kernel, auto_pad, strides, dilations):
    """auto_pad (tf2onnx's SAME/VALID convs): the pads follow from each batch's shape, as onnxruntime sets them."""
    from onnxpress.advanced import _moment_observer, import_graph

    r = graphs.rng(13)
    w = r.standard_normal((4, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["X", "W"], ["Y"], auto_pad=auto_pad, strides=strides, dilations=dilations)
    model = graphs.make_model([node], [("X", ["N", 3, *spatial])], [("Y", ["N", 4] + ["?"] * len(spatial))], {"W": w})
    x = r.standard_normal((5, 3, *spatial)).astype(np.float32)
    y = graphs.run(model, {"X": x})[0].astype(np.float64)
    obs = _moment_observer(import_graph(model).nodes[0])
    obs.update(x)
    rows = w.reshape(4, -1).astype(np.float64)
    energy = np.einsum("om,mk,ok->o", rows, obs.hessian(), rows)
    np.testing.assert_allclose(energy, np.mean(y**2, axis=(0, *range(2, 2 + len(spatial)))), rtol=1e-5)


def test_depthwise_moments_keep_their_kind():
    """The "depthwise" kind (one group per input channel, taken from the data) equals "grouped" with G = C."""
    from onnxpress.advanced import InputMomentObserver

    x = graphs.rng(11).standard_normal((3, 4, 6, 5))
    a = InputMomentObserver("depthwise", (3, 3), (1, 1, 1, 1), (1, 1))
    b = InputMomentObserver("grouped", (3, 3), (1, 1, 1, 1), (1, 1), groups=4)
    a.update(x)
    b.update(x)
    np.testing.assert_allclose(a.hessian(), b.hessian())
    assert a.hessian().shape == (4, 9, 9)


@pytest.mark.parametrize(("kernel", "pads", "strides", "dilations"),
                         [((3,), (4, 0), (1,), (2,)), ((3, 3), (2, 2, 2, 2), (1, 1), (2, 3)),
                          ((3, 2, 3), (1, 0, 1, 1, 1, 0), (1, 2, 1), (1, 1, 2))])
def test_moments_on_some_positions_take_those_patches(kernel, pads, strides, dilations):
    """rows_per_sample: the same evenly spaced output positions of every sample, in 1-, 2- and 3-D."""
    from onnxpress.advanced import InputMomentObserver

    x = graphs.rng(12).standard_normal((3, 4, *(9, 7, 6)[: len(kernel)]))
    every = InputMomentObserver("conv", kernel, pads, strides, dilations=dilations)
    some = InputMomentObserver("conv", kernel, pads, strides, dilations=dilations, rows_per_sample=5)
    patches = every._patches(x).reshape(3, -1, 4 * int(np.prod(kernel)))
    picked = some._picked(patches.shape[1])
    assert picked is not None and len(picked) == 5
    some.update(x)
    rows = patches[:, picked].reshape(-1, patches.shape[2])
    np.testing.assert_allclose(some.hessian(), rows.T @ rows / len(rows))


def test_codebook_error_feedback_lowers_the_layer_output_error():
    """advanced.codebook(error_feedback=True): same codebook sizes, smaller output error on held-out data of the
    calibration distribution; reconstruct() agrees with the graph; no data -> CalibrationError."""
    import onnx_graphsurgeon as gs

    import onnxpress.advanced as adv
    from onnxpress.errors import CalibrationError

    model = matmul_model(k=24, n=20)
    calib = [{"X": _correlated(256, 24, 11)}]
    held = _correlated(512, 24, 12)
    ref = graphs.run(model, {"X": held})[0].astype(np.float64)
    err = lambda m: float(np.sum((graphs.run(m, {"X": held})[0] - ref) ** 2))  # noqa: E731
    plain = adv.codebook(model, bits=3).model
    fed = adv.codebook(model, bits=3, error_feedback=True, data=calib).model
    assert err(fed) < 0.7 * err(plain)
    rebuilt = _rebuilt_weight(fed)  # W[K, N]: output channels are columns, each takes at most 2^3 values
    assert max(np.unique(rebuilt[:, j]).size for j in range(rebuilt.shape[1])) <= 8
    h = adv.collect_layer_hessians(model, calib)
    p = CodebookWeights(bits=3, hessians=h)
    np.testing.assert_array_equal(_rebuilt_weight(run_passes(model, [p]).model),
                                  p.reconstruct(gs.import_onnx(model).nodes[0], _weight(model)))
    with pytest.raises(CalibrationError, match="error feedback"):
        adv.codebook(model, bits=3, error_feedback=True)


def test_codebook_weights_with_data_uses_error_feedback():
    """advanced.codebook_weights(data=...) (quantize's codebook path) gives the error-feedback weights."""
    import onnxpress.advanced as adv

    model = matmul_model(k=24, n=20)
    calib = [{"X": _correlated(128, 24, 11)}]
    fed, decisions = adv.codebook_weights(model, 3, data=calib)
    assert [d.quantized for d in decisions] == [True]
    expected = adv.codebook(model, bits=3, error_feedback=True, data=calib, max_samples=128).model
    np.testing.assert_array_equal(_rebuilt_weight(fed.model), _rebuilt_weight(expected))
    assert not np.array_equal(_rebuilt_weight(fed.model), _rebuilt_weight(adv.codebook_weights(model, 3)[0].model))


# ----------------------------------------------------------------------------- codebooks fitted to the output


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((out - ref) ** 2)))


def _output_error(x: np.ndarray, rows: np.ndarray, rec: np.ndarray) -> float:
    return float(np.sum((x @ (rows - rec).T) ** 2))


@pytest.mark.parametrize("damp", [0.0, 1e-6, 0.01])
@pytest.mark.parametrize(("groups", "hessian_groups"), [(1, 0), (2, 0), (1, 3), (3, 3)])
def test_refit_codebook_is_the_least_squares_fit_of_the_output(groups, hessian_groups, damp):
    """With scales fixed (None), each codebook is the least-squares solution of sum_c ||X_c (w_c - B[idx_c])||^2
    + lambda ||w_c - B[idx_c]||^2 (lambda = damp * mean diag of X_c^T X_c, GPTQ's damping), computed here from the
    samples themselves with lstsq, for one shared moment and for one per group of rows."""
    from onnxpress.passes.codebook import refit_codebook

    r = graphs.rng(21)
    c, m, k = 6, 10, 8
    rows = r.standard_normal((c, m))
    idx = r.integers(0, k, (c, m))
    idx[:, :k] = np.arange(k)  # every centroid used by every row
    xs = [_correlated(400, m, 30 + g).astype(np.float64) for g in range(max(hessian_groups, 1))]
    hs = np.stack([x.T @ x for x in xs])
    hessian = hs if hessian_groups else hs[0]
    books, scales = refit_codebook(rows, idx, r.standard_normal((groups, k)), None, hessian, alternations=1,
                                   damp=damp)
    assert scales is None and books.shape == (groups, k)
    x_of = lambda i: xs[i // (c // hessian_groups)] if hessian_groups else xs[0]  # noqa: E731
    ridge = lambda i: np.sqrt(damp * np.mean(np.sum(x_of(i) ** 2, axis=0))) * np.eye(m)  # noqa: E731
    for g in range(groups):
        members = range(g * c // groups, (g + 1) * c // groups)
        design = np.vstack([np.vstack([x_of(i), ridge(i)]) @ np.eye(k)[idx[i]] for i in members])
        target = np.concatenate([np.vstack([x_of(i), ridge(i)]) @ rows[i] for i in members])
        np.testing.assert_allclose(books[g], np.linalg.lstsq(design, target, rcond=None)[0], rtol=1e-6, atol=1e-8)


def test_refit_codebook_alternations_never_raise_the_output_error():
    """Scales and codebook alternate exact least-squares steps: the output error falls, step after step; a centroid no
    row uses keeps its value; fit_books=False (linear int4's grid) changes the scales only."""
    from onnxpress.passes.codebook import refit_codebook

    r = graphs.rng(22)
    c, m, k = 8, 12, 8
    x = _correlated(500, m, 40).astype(np.float64)
    h = x.T @ x
    rows = r.laplace(size=(c, m)) * r.uniform(0.2, 2.0, (c, 1))
    scales = np.abs(rows).max(axis=1)
    book = np.linspace(-1, 1, k)[None, :]
    idx = np.abs(rows[:, :, None] / scales[:, None, None] - book[0]).argmin(axis=2)
    idx[idx == 3] = 2  # centroid 3 unused
    err = lambda b, s: _output_error(x, rows, s[:, None] * b[0][idx])  # noqa: E731
    errors = [err(book, scales)]
    for n in (1, 2, 4, 8):
        b, s = refit_codebook(rows, idx, book, scales, h, alternations=n, damp=0.0)  # the objective measured here
        errors.append(err(b, s))
        assert b[0, 3] == book[0, 3]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.5 * errors[0]
    b, s = refit_codebook(rows, idx, book, scales, h, fit_books=False)
    np.testing.assert_array_equal(b, book)
    assert err(b, s) < errors[0] and not np.array_equal(s, scales)


def test_refit_codebook_on_sampled_rows_fits_almost_as_well(monkeypatch):
    """A layer too large for the work cap is refitted on evenly spaced rows (there, rows of thousands of weights):
    on rows of one distribution, 8 of 64 rows of 256 weights fit within 2% of all of them in output error."""
    import onnxpress.passes.codebook as cb

    r = graphs.rng(23)
    c, m, k = 64, 256, 8
    x = _correlated(500, m, 41).astype(np.float64)
    h = x.T @ x
    rows = r.laplace(size=(c, m))
    book = np.linspace(-3, 3, k)[None, :]
    idx = np.abs(rows[:, :, None] - book[0]).argmin(axis=2)
    full, _ = cb.refit_codebook(rows, idx, book, None, h, alternations=1)
    monkeypatch.setattr(cb, "_REFIT_WORK", 8 * (m * m * k + m * k * k))  # 8 of the 64 rows
    sampled, _ = cb.refit_codebook(rows, idx, book, None, h, alternations=1)
    assert not np.allclose(sampled, full)
    err = lambda b: _output_error(x, rows, b[0][idx])  # noqa: E731
    assert err(full) <= err(sampled) < 1.02 * err(full)


@pytest.mark.parametrize("group", [1, 2])
def test_refit_lowers_the_output_error_of_gptq_codebooks(group):
    """CodebookWeights(hessians=..., refit=1) against refit=0: the same codes per layer, lower output error on
    held-out data of the calibration distribution; a grouped conv (one moment per group) takes it too."""
    import onnxpress.advanced as adv
    from onnxpress.errors import ArgumentError

    r = graphs.rng(24)
    w = r.laplace(size=(16, 8 // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1], group=group)
    model = graphs.make_model([node], [("X", ["N", 8, 6, 6])], [("Y", ["N", 16, 6, 6])], {"W": w})
    mix = graphs.rng(25).standard_normal((8, 8))
    sample = lambda seed, n: np.einsum(  # noqa: E731  channel-correlated images
        "nchw,cd->ndhw", graphs.rng(seed).standard_normal((n, 8, 6, 6)), mix).astype(np.float32)
    h = adv.collect_layer_hessians(model, [{"X": sample(26, 256)}])
    held = sample(27, 256)
    ref = graphs.run(model, {"X": held})[0].astype(np.float64)
    err = lambda m: float(np.sum((graphs.run(m, {"X": held})[0] - ref) ** 2))  # noqa: E731
    before = run_passes(model, [CodebookWeights(bits=3, hessians=h, refit=0)]).model
    after = run_passes(model, [CodebookWeights(bits=3, hessians=h)]).model
    assert err(after) < 0.96 * err(before)  # measured 0.93 / 0.91
    with pytest.raises(ArgumentError, match="refit"):
        CodebookWeights(refit=-1)


def test_refit_after_layer_norm_keeps_the_codebook_in_place():
    """A MatMul behind LayerNorm: its inputs sum to zero, so a constant added to every level changes no output on
    the calibration moments. Undamped, the refit moved the levels along that direction and the held-out logits
    fell from ~21.5 dB to between -3.7 and 3.1; damped (1e-6 of the mean diagonal), the refit keeps or improves
    them."""
    import onnxpress.advanced as adv

    for seed in range(2):
        r = graphs.rng(seed)
        w = (r.standard_normal((48, 192)) * 0.1).astype(np.float32)
        nodes = [helper.make_node("LayerNormalization", ["X", "g", "b"], ["L"], axis=-1),
                 helper.make_node("MatMul", ["L", "W"], ["Y"])]  # fmt: skip
        model = graphs.make_model(nodes, [("X", ["N", 16, 48])], [("Y", ["N", 16, 192])],
                                  {"W": w, "g": np.ones(48, np.float32), "b": np.zeros(48, np.float32)})
        h = adv.collect_layer_hessians(model, [{"X": r.standard_normal((32, 16, 48)).astype(np.float32)}])
        held = r.standard_normal((64, 16, 48)).astype(np.float32)
        ref = graphs.run(model, {"X": held})[0].astype(np.float64)
        plain, refit = (_sqnr(ref, graphs.run(run_passes(model, [CodebookWeights(hessians=h, refit=n)]).model,
                                               {"X": held})[0]) for n in (0, 1))
        assert plain > 20 and refit > plain - 0.1


# ----------------------------------------------------------------------------- recurrent weights


def _recurrent_model(op: str, direction: str, seed: int = 0) -> onnx.ModelProto:
    """X[T=10, N, 16] -> op(hidden 24, W, R, Bias) -> Y."""
    gates, d, hidden = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 2 if direction == "bidirectional" else 1, 24
    r = graphs.rng(seed)
    inits = {"W": (r.standard_normal((d, gates * hidden, 16)) * 0.3).astype(np.float32),
             "R": (r.standard_normal((d, gates * hidden, hidden)) * 0.2).astype(np.float32),
             "Bias": (r.standard_normal((d, 2 * gates * hidden)) * 0.1).astype(np.float32)}  # fmt: skip
    node = helper.make_node(op, ["X", "W", "R", "Bias"], ["Y"], hidden_size=hidden, direction=direction, name="rec")
    return graphs.make_model([node], [("X", [10, "N", 16])], [("Y", [10, d, "N", hidden])], inits)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_input_and_recurrence_weights_take_codebooks(op, direction):
    """W and R of an LSTM / GRU / RNN become codes: each gate unit (row of [directions, gates * hidden, inputs], both
    directions together) takes at most 2^b values; the bias stays float; the outputs follow the float layer."""
    model = _recurrent_model(op, direction)
    result = run_passes(model, [CodebookWeights(bits=4)])
    assert result.stats["codebook_weights.weights"] == 2
    out = result.model
    (rec,) = [n for n in out.graph.node if n.op_type == op]
    floats = {i.name for i in out.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert rec.input[1] not in floats and rec.input[2] not in floats and rec.input[3] in floats
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(rec.input[i], onnx.TensorProto.FLOAT, None) for i in (1, 2))
    for name, rebuilt in zip(("W", "R"), graphs.run(probe, {"X": np.zeros((10, 1, 16), np.float32)}), strict=True):
        w = _init(model, name)
        assert rebuilt.shape == w.shape
        units = np.moveaxis(rebuilt, 1, 0).reshape(w.shape[1], -1)
        assert max(np.unique(u).size for u in units) <= 16
        assert 0 < np.sum((rebuilt - w) ** 2) < 0.02 * np.sum(w**2)
    x = graphs.rng(5).standard_normal((10, 4, 16)).astype(np.float32)
    ref, got = graphs.run(model, {"X": x})[0], graphs.run(out, {"X": x})[0]
    assert _sqnr(ref.astype(np.float64), got) > 15


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_quantize_codebook_shrinks_the_reference_lstm(tmp_path, capsys):
    """onnxpress quantize --codebook 4 on the reference LSTM (digit rows, real data): its W and R were left float
    (0.94x the float file); now 0.15x, with the test split's accuracy unchanged, and GPTQ-rounded on the moments of
    the LSTM's input and hidden states (35.6 dB on the whole test split; nearest-level codes 29.1)."""
    from pathlib import Path

    from onnxpress.cli import main

    src = Path(__file__).resolve().parents[1] / "models" / "lstm.onnx"
    data = src.parent / "digits32_calib.npz"
    out = tmp_path / "cb.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data), "--codebook", "4", "--quiet"]) == 0
    assert out.stat().st_size < 0.16 * src.stat().st_size
    onnx.checker.check_model(onnx.load(out))
    with np.load(src.parent / "digits32_test.npz") as t:
        x, labels = t["input"][:256].astype(np.float32), t["labels"][:256]
    ref = graphs.run(onnx.load(src), {"input": x})[0]
    got = graphs.run(onnx.load(out), {"input": x})[0]
    assert np.mean(got.argmax(1) == labels) >= np.mean(ref.argmax(1) == labels) - 0.005
    assert _sqnr(ref.astype(np.float64), got) > 33


@pytest.mark.parametrize("layout", [0, 1])
def test_recurrent_moments_are_block_diagonal_per_direction(layout):
    """RecurrentMomentObserver: W's moment is X's own, once per direction; R's is each direction's hidden states
    (Y's D axis), block-diagonal in the order CodebookWeights lays a gate unit's row out (direction-major)."""
    from onnxpress.advanced import RecurrentMomentObserver

    r = graphs.rng(30)
    t, d, b, k = 5, 2, 3, 4
    x = r.standard_normal((b, t, k) if layout else (t, b, k))
    y = r.standard_normal((b, t, d, k) if layout else (t, d, b, k))
    obs_x = RecurrentMomentObserver(d, hidden=False, layout=layout)
    obs_y = RecurrentMomentObserver(d, hidden=True, layout=layout)
    for half in (slice(0, 1), slice(1, None)):  # two batches along the batch axis
        obs_x.update(x[half] if layout else x[:, half])
        obs_y.update(y[half] if layout else y[:, :, half])
    rows = x.reshape(-1, k)
    hx = rows.T @ rows / len(rows)
    np.testing.assert_allclose(obs_x.hessian(), np.kron(np.eye(d), hx))
    per_dir = [(y[:, :, i] if layout else y[:, i]).reshape(-1, k) for i in range(d)]
    want = np.zeros((d * k, d * k))
    for i, v in enumerate(per_dir):
        want[i * k : (i + 1) * k, i * k : (i + 1) * k] = v.T @ v / len(v)
    np.testing.assert_allclose(obs_y.hessian(), want)


@pytest.mark.parametrize(("op", "direction"), [("LSTM", "bidirectional"), ("GRU", "forward")])
def test_recurrent_codebooks_with_data_lower_the_output_error(op, direction):
    """advanced.codebook_weights(data=...) measures the recurrent moments too: the layer's outputs on held-out inputs
    of the calibration distribution come closer than with nearest-level codes."""
    import onnxpress.advanced as adv

    model = _recurrent_model(op, direction)
    mix = graphs.rng(31).standard_normal((16, 16)) * 0.5
    sample = lambda seed, n: (graphs.rng(seed).standard_normal((10, n, 16)) @ mix).astype(np.float32)  # noqa: E731
    held = sample(33, 64)
    ref = graphs.run(model, {"X": held})[0].astype(np.float64)
    plain = adv.codebook_weights(model, 4)[0].model
    fed, decisions = adv.codebook_weights(model, 4, data=[{"X": sample(32, 128)}])
    assert [d.quantized for d in decisions] == [True]
    got = lambda m: graphs.run(m, {"X": held})[0]  # noqa: E731
    assert _sqnr(ref, got(fed.model)) > _sqnr(ref, got(plain)) + 1.5  # measured +2.2 / +2.3 dB


def test_an_lstm_named_in_codebook_layers_takes_data_aware_codes_in_an_int8_model(tmp_path, monkeypatch, capsys):
    """quantize(codebook_layers=[the LSTM]): no DynamicQuantizeLSTM; its W and R become 4-bit codes, GPTQ-rounded on
    the moments of its input and hidden states in the int8 model, closer than nearest-level codes of the same size
    (reference LSTM: 29.65 -> 38.89 dB at 0.142x)."""
    import onnxpress
    import onnxpress.advanced as adv
    from tests.test_lstm_quant import _x, lstm_model

    model = lstm_model("bidirectional", extras=True)
    onnx.save(model, tmp_path / "m.onnx")
    mix = graphs.rng(40).standard_normal((16, 16)).astype(np.float32) * 0.5  # correlated features: what GPTQ uses
    calib = [{"X": _x(seed=s) @ mix} for s in range(2, 10)]
    held = _x(seed=20) @ mix
    ref = graphs.run(model, {"X": held})[0].astype(np.float64)
    res = onnxpress.quantize(tmp_path / "m.onnx", calib=calib, codebook_layers=["lstm"])
    ops = {n.op_type for n in res.model.graph.node}
    assert "LSTM" in ops and "DynamicQuantizeLSTM" not in ops and "GatherElements" in ops
    assert [d.reason for d in res.quantized if d.name == "lstm"] == ["4-bit codebook weights"]
    monkeypatch.setattr(adv, "collect_layer_hessians", lambda *a, **k: {})  # the recurrent moments left out
    plain = onnxpress.quantize(tmp_path / "m.onnx", calib=calib, codebook_layers=["lstm"])
    assert plain.model.ByteSize() == res.model.ByteSize()
    fed, nearest = (_sqnr(ref, graphs.run(r.model, {"X": held})[0]) for r in (res, plain))
    assert fed > nearest + 1  # measured 20.36 against 18.26 dB
    from onnxpress.cli import main

    np.savez(tmp_path / "calib.npz", X=np.concatenate([f["X"] for f in calib], axis=1))
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "calib.npz"), "--codebook-layers", "lstm", "--no-latency-check"]) == 0
    assert "1 layer(s) as 4-bit codebook weights" in capsys.readouterr().out  # one LSTM, two weights (W and R)


def test_a_gru_named_in_codebook_layers_is_coded_not_stored_float16(tmp_path):
    """An int8 model stores a GRU's weights in float16 (no integer GRU); a GRU named in codebook_layers keeps them
    float32 for the codebook pass, which codes them (it was refused: 'a weight that is not a float constant')."""
    import onnxpress

    model = _recurrent_model("GRU", "forward")
    onnx.save(model, tmp_path / "m.onnx")
    calib = [{"X": graphs.rng(s).standard_normal((10, 8, 16)).astype(np.float32)} for s in range(40, 44)]
    res = onnxpress.quantize(tmp_path / "m.onnx", calib=calib, codebook_layers=["rec"])
    (gru,) = [n for n in res.model.graph.node if n.op_type == "GRU"]
    producers = {o: n.op_type for n in res.model.graph.node for o in n.output}
    assert producers[gru.input[1]] != "Cast" and producers[gru.input[2]] != "Cast"
    assert [d.reason for d in res.quantized if d.name == "rec"] == ["4-bit codebook weights"]
    plain = onnxpress.quantize(tmp_path / "m.onnx", calib=calib)  # float16 weights
    assert res.size_after < 0.8 * plain.size_after  # measured 0.378 against 0.541 of the float file
    x = graphs.rng(50).standard_normal((10, 4, 16)).astype(np.float32)
    assert _sqnr(graphs.run(model, {"X": x})[0].astype(np.float64), graphs.run(res.model, {"X": x})[0]) > 15
