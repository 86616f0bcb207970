"""CompactQDQ: exact storage rewrites of a QDQ graph (bit-identical on onnxruntime, same fused kernels)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import helper, numpy_helper

from onnxpress.passes.qdq import CompactQDQ, InsertQDQ
from onnxpress.pipeline import run_passes
from onnxpress.runtime import make_session
from tests.fuzz import cnn_models, sample_input
from tests.graphs import make_model, rng, run
from tests.test_qdq import MODELS, feeds_for, minmax_table, optimized_ops, quantize_graph


def relu6_cnn(c: int = 16, seed: int = 0) -> onnx.ModelProto:
    """X[N,c,8,8] -> Conv(W1,B1) -> Relu -> Conv dw(W2,B2) -> Clip(0,6) -> Conv(W3,B3) -> Relu -> GAP -> Y.

    ``c`` channels, so every bias is big enough (>= 16 elements) for a Mul/Cast node to pay.
    """
    r = rng(seed)
    inits = {
        "W1": (r.standard_normal((c, c, 3, 3)) * 0.2).astype(np.float32),
        "B1": (r.standard_normal(c) * 0.1).astype(np.float32),
        "W2": (r.standard_normal((c, 1, 3, 3)) * 0.5).astype(np.float32),
        "B2": (r.standard_normal(c) * 0.1).astype(np.float32),
        "W3": (r.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32),
        "B3": (r.standard_normal(c) * 0.1).astype(np.float32),
        "lo": np.array(0, np.float32),
        "hi": np.array(6, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="dw", group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "W3", "B3"], ["c3"], name="pw"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["Y"], name="gap"),
    ]
    return make_model(nodes, [("X", ["N", c, 8, 8])], [("Y", ["N", c, 1, 1])], inits)


def compact(model: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, dict[str, int]]:
    result = run_passes(model, [CompactQDQ(**kwargs)])
    onnx.checker.check_model(result.model, full_check=True)
    return result.model, {k.split(".", 1)[1]: v for k, v in result.stats.items()}


def optimized_signature(model: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    """onnxruntime's optimised graph as a multiset of (op, domain, attributes, constant inputs by value)."""
    path = tmp_path / "optimized_sig.onnx"
    make_session(model, optimized_model_path=str(path))
    opt = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in opt.graph.initializer}
    out: collections.Counter = collections.Counter()
    for n in opt.graph.node:
        attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
        ins = tuple((c.dtype.str, c.shape, c.tobytes()) if (c := consts.get(i)) is not None else "-" for i in n.input)
        out[(n.op_type, n.domain, attrs, ins)] += 1
    return out


def assert_bit_identical(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Same outputs bit for bit, with onnxruntime's optimisations off and on."""
    for optimize in (False, True):
        for x, y in zip(run(a, feeds, optimize), run(b, feeds, optimize), strict=True):
            np.testing.assert_array_equal(x, y)


def test_compact_is_bit_identical_smaller_and_fuses_the_same(tmp_path: Path) -> None:
    """All five rewrites fire on a Relu/ReLU6 CNN; outputs, fused op counts unchanged; file smaller."""
    model = relu6_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    small, stats = compact(q)
    assert_bit_identical(q, small, x)
    # same kernels with the same constants: the optimised graphs agree node for node
    assert optimized_signature(small, tmp_path) == optimized_signature(q, tmp_path)
    assert optimized_ops(small, tmp_path).count("QLinearConv") == 3
    # relu1, relu6, relu3 -> each feeds only a uint8 Q with zero point 0 whose range lies inside the bounds
    assert stats["activations_absorbed"] == 3
    assert [n.op_type for n in small.graph.node].count("Relu") == 0
    assert "Clip" not in [n.op_type for n in small.graph.node]
    assert stats["bias_scales_as_products"] == 3 and stats["biases_int16"] == 3
    assert stats["constants_shared"] >= 2  # the uint8 zero points of relu1/relu6 (relu3 and X differ)
    assert small.ByteSize() < q.ByteSize()
    # graph interface and the model's own node names are kept
    assert [i.name for i in small.graph.input] == ["X"] and [o.name for o in small.graph.output] == ["Y"]
    assert {"conv1", "dw", "pw", "gap"} <= {n.name for n in small.graph.node}
    # integer weights and biases keep the names InsertQDQ gave them (the int16 copy takes the int32's)
    names = {i.name: numpy_helper.to_array(i).dtype for i in small.graph.initializer}
    assert names["W1_q"] == names["W2_q"] == names["W3_q"] == np.int8
    assert names["B1_q"] == names["B2_q"] == names["B3_q"] == np.int16
    assert len(small.graph.value_info) == 0 and stats["value_info_dropped"] > 0


def test_bias_storage_is_int16_cast_and_scale_product() -> None:
    """A bias DQ reads Cast(int16 -> int32) of the same integers and Mul(s_x, s_w) of the same scale."""
    model = relu6_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    small, _ = compact(q)

    def bias_dqs(m: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
        """(integers, scale) of every Conv bias, evaluated through Cast/Mul where present."""
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        prod = {o: n for n in m.graph.node for o in n.output}

        def value(name: str) -> np.ndarray:
            if name in inits:
                return inits[name]
            n = prod[name]
            if n.op_type == "Cast":
                assert inits[n.input[0]].dtype == np.int16
                return value(n.input[0]).astype(np.int32)
            assert n.op_type == "Mul"
            return value(n.input[0]) * value(n.input[1])

        out = []
        for n in m.graph.node:
            if n.op_type == "Conv":
                dq = prod[n.input[2]]
                out.append((value(dq.input[0]), value(dq.input[1])))
        return out

    for (qa, sa), (qb, sb) in zip(bias_dqs(q), bias_dqs(small), strict=True):
        assert qb.dtype == np.int32 and sb.dtype == np.float32
        np.testing.assert_array_equal(qa, qb)
        assert sa.tobytes() == sb.tobytes()


@pytest.mark.parametrize(("per_channel", "activations"), [(False, "uint8"), (False, "int8"), (True, "int8")])
def test_other_granularities_stay_bit_identical(per_channel: bool, activations: str) -> None:
    """Per-tensor weights (scalar bias scales: no Mul) and int8 activations: still bit-identical."""
    model = relu6_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x, per_channel=per_channel, activations=activations)
    small, stats = compact(q)
    assert stats["bias_scales_as_products"] == (3 if per_channel else 0)
    assert small.ByteSize() < q.ByteSize()
    assert_bit_identical(q, small, x)


def test_symmetric_int8_keeps_the_clip() -> None:
    """int8 activations (z = 0, q_min = -128): the quantized range reaches below 0, so Relu/Clip stay."""
    model = relu6_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x, activations="int8")
    small, stats = compact(q)
    assert stats["activations_absorbed"] == 0
    assert [n.op_type for n in small.graph.node].count("Relu") == 2
    assert_bit_identical(q, small, x)


def test_activation_read_by_a_float_node_is_kept() -> None:
    """A Relu whose output also feeds a float node (not through its Q/DQ) is not absorbed."""
    model = relu6_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    # a second graph output reading relu1's output directly: that reader needs the Relu
    q.graph.node.append(helper.make_node("Neg", ["r1"], ["side"], name="side"))
    q.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["N", 16, 8, 8]))
    small, stats = compact(q)
    assert "relu1" in {n.name for n in small.graph.node}
    assert stats["activations_absorbed"] == 2  # relu6 and relu3 feed only their Qs
    assert_bit_identical(q, small, x)


def test_clip_with_bounds_inside_the_quantized_range_is_kept() -> None:
    """Clip(0, 6) before a Q whose range is [0, 8]: values in (6, 8] differ, so the Clip stays."""
    s = np.float32(8 / 255)
    model = make_model(
        [
            helper.make_node("Clip", ["X", "lo", "hi"], ["c"], name="clip"),
            helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["Y"]),
        ],
        [("X", [2, 64])],
        [("Y", [2, 64])],
        {"lo": np.float32(0), "hi": np.float32(6), "s": s, "z": np.uint8(0)},
        opset=17,
    )
    x = {"X": rng(2).uniform(-2, 10, (2, 64)).astype(np.float32)}
    small, stats = compact(model)
    assert stats["activations_absorbed"] == 0 and "clip" in {n.name for n in small.graph.node}
    assert_bit_identical(model, small, x)
    # widen the clip to [0, 9]: now Q's [0, 8] lies inside and the Clip goes, bit-identically
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for i in wide.graph.initializer:
        if i.name == "hi":
            i.CopyFrom(numpy_helper.from_array(np.float32(9), "hi"))
    small, stats = compact(wide)
    assert stats["activations_absorbed"] == 1
    assert_bit_identical(wide, small, x)


def test_bias_scale_that_is_not_the_product_is_kept() -> None:
    """A stored bias scale that differs from fl(s_x * s_w) in one ulp stays an initializer."""
    model = relu6_cnn()
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    prod = {o: n for n in q.graph.node for o in n.output}
    conv = next(n for n in q.graph.node if n.name == "pw")
    scale_name = prod[conv.input[2]].input[1]
    for i in q.graph.initializer:
        if i.name == scale_name:
            v = numpy_helper.to_array(i).copy()
            v[0] = np.nextafter(v[0], np.float32(1))
            i.CopyFrom(numpy_helper.from_array(v, scale_name))
    small, stats = compact(q, absorb_activations=False, narrow_biases=False, short_names=False, drop_value_info=False)
    assert stats["bias_scales_as_products"] == 2
    assert scale_name in {i.name for i in small.graph.initializer}
    assert_bit_identical(q, small, x)


def test_bias_outside_int16_stays_int32() -> None:
    """Bias integers beyond int16 (a large bias over tiny scales) keep their int32 storage."""
    model = relu6_cnn()
    for i in model.graph.initializer:
        if i.name == "B3":
            i.CopyFrom(numpy_helper.from_array(np.full(16, 50.0, np.float32), "B3"))
    x = feeds_for(model)
    _, q = quantize_graph(model, x)
    small, stats = compact(q)
    assert stats["biases_int16"] == 2
    assert sum(numpy_helper.to_array(i).dtype == np.int32 for i in small.graph.initializer) == 1
    assert_bit_identical(q, small, x)


def test_every_rewrite_can_be_turned_off() -> None:
    """With every option off the pass changes nothing (and says so)."""
    model = relu6_cnn()
    _, q = quantize_graph(model, feeds_for(model))
    off = dict(
        absorb_activations=False,
        bias_scale_products=False,
        narrow_biases=False,
        share_constants=False,
        short_names=False,
        drop_value_info=False,
    )
    result = run_passes(q, [CompactQDQ(**off)])
    assert result.stats["compact_qdq.modified"] == 0
    assert result.model.SerializeToString() == q.SerializeToString()


def test_float_graph_is_left_alone() -> None:
    """No Q/DQ nodes: nothing to compact, the Relu stays."""
    model = relu6_cnn()
    result = run_passes(model, [CompactQDQ()])
    assert result.stats["compact_qdq.modified"] == 0
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(model=cnn_models(max_layers=4))
def test_compaction_is_bit_identical_on_random_graphs(model: onnx.ModelProto) -> None:
    """Random CNN-like graphs (grouped/depthwise convs, Relu/Clip/Sigmoid, Add, Concat, pools, Gemm/MatMul):
    InsertQDQ then CompactQDQ gives the same outputs bit for bit, optimised or not."""
    x = sample_input(model, batch=4, seed=1)
    _, q = quantize_graph(model, x)
    small, stats = compact(q, min_elements=1)  # every bias rewrite, however small the layer
    assert stats["names_shortened"] > 0
    assert_bit_identical(q, small, sample_input(model, batch=3, seed=2))


def test_input_model_is_not_modified() -> None:
    """run_passes works on a copy: the QDQ model handed in is byte-identical afterwards."""
    model = relu6_cnn()
    _, q = quantize_graph(model, feeds_for(model))
    before = q.SerializeToString()
    compact(q)
    assert q.SerializeToString() == before


@pytest.mark.skipif(not (MODELS / "mobilenet.onnx").exists(), reason="models/mobilenet.onnx not built yet")
def test_reference_mobilenet_int8_size_at_most_027(tmp_path: Path) -> None:
    """Depthwise CNN, InsertQDQ (+ int8 constants) + CompactQDQ: <= 0.27x the fp32 file, bit-identical,
    every quantized Conv still a QLinearConv."""
    from onnxpress.model_io import infer_shapes, load_model, normalize_model
    from onnxpress.pipeline import cleanup_passes

    fp32 = load_model(MODELS / "mobilenet.onnx")
    model = run_passes(normalize_model(fp32), cleanup_passes()).model
    data = {"input": np.load(MODELS / "digits32_calib.npz")["input"][:64]}
    q = run_passes(infer_shapes(model), [InsertQDQ(minmax_table(model, data))]).model
    small, _ = compact(q)
    assert small.ByteSize() <= 0.27 * fp32.ByteSize() < q.ByteSize()
    assert_bit_identical(q, small, data)
    assert optimized_ops(small, tmp_path).count("QLinearConv") == 11
    assert optimized_signature(small, tmp_path) == optimized_signature(q, tmp_path)
