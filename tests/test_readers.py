"""Data readers: four sources, batching, streaming, and a DataError for every documented misfit."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxpress.calibration.readers import (
    infinite_values_allowed,
    load_labels,
    model_inputs,
    open_data,
    sample_axes,
)
from onnxpress.errors import DataError, UnsupportedModelError
from tests import graphs


def _x(n: int, k: int = 8, seed: int = 0) -> np.ndarray:
    return graphs.rng(seed).standard_normal((n, k)).astype(np.float32)


def _concat(batches) -> np.ndarray:
    return np.concatenate([b["X"] for b in batches], axis=0)


def conv_dynamic_hw() -> onnx.ModelProto:
    """X[N,2,H,W] -> Relu -> Y: spatial size varies per feed."""
    dims = ["N", 2, "H", "W"]
    return graphs.make_model([helper.make_node("Relu", ["X"], ["Y"])], [("X", dims)], [("Y", dims)])


def static_batch_one() -> onnx.ModelProto:
    """X[1,8] -> Relu -> Y[1,8]: a fixed batch of 1."""
    return graphs.make_model([helper.make_node("Relu", ["X"], ["Y"])], [("X", [1, 8])], [("Y", [1, 8])])


def int64_input() -> onnx.ModelProto:
    """I[N,4] int64 -> Cast(float) -> Y[N,4]."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["I"], ["Y"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("I", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    model.ir_version = 8
    return model


def two_inputs() -> onnx.ModelProto:
    """A[N,3] + B[N,3] -> Y[N,3]."""
    return graphs.make_model(
        [helper.make_node("Add", ["A", "B"], ["Y"])], [("A", ["N", 3]), ("B", ["N", 3])], [("Y", ["N", 3])]
    )


# --- input specs --------------------------------------------------------------------------------


def test_model_inputs_skip_initializers_and_keep_symbolic_dims():
    model = graphs.gemm()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 6]))  # old-IR style
    (spec,) = model_inputs(model)
    assert spec.name == "X" and spec.dtype == np.float32 and spec.shape == ("batch", 8)
    assert spec.describe() == "X: float32[batch,8]"


def test_non_tensor_input_is_unsupported():
    model = graphs.gemm()
    seq = helper.make_tensor_sequence_value_info("S", TensorProto.FLOAT, None)
    model.graph.input.append(seq)
    with pytest.raises(UnsupportedModelError, match="'S' is a sequence_type"):
        model_inputs(model)


# --- the four sources ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("batch", [None, 1, 3, 64])
def test_npz_round_trips_in_order_for_any_batch(tmp_path, compressed, batch):
    x = _x(10)
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", X=x, labels=np.arange(10))
    reader = open_data(tmp_path / "d.npz", graphs.gemm())
    assert reader.input_names == ("X",) and reader.num_samples == 10
    out = list(reader.batches(batch))
    assert all(set(b) == {"X"} for b in out)  # labels are not fed
    assert [len(b["X"]) for b in out] == ([10] if batch is None else [min(batch, 10 - i) for i in range(0, 10, batch)])
    np.testing.assert_array_equal(_concat(out), x)
    np.testing.assert_array_equal(_concat(reader.batches(4)), x)  # a second pass reads it again


def test_npz_fortran_order_array_is_read_correctly(tmp_path):
    x = np.asfortranarray(_x(7))
    np.savez(tmp_path / "f.npz", X=x)
    np.testing.assert_array_equal(_concat(open_data(tmp_path / "f.npz", graphs.gemm()).batches(3)), x)


def test_npz_with_static_batch_is_sliced_to_that_size(tmp_path):
    x = _x(5)
    np.savez(tmp_path / "d.npz", X=x)
    out = list(open_data(tmp_path / "d.npz", static_batch_one()).batches(64))
    assert [b["X"].shape for b in out] == [(1, 8)] * 5
    np.testing.assert_array_equal(_concat(out), x)


def test_folder_stacks_equal_shapes_and_splits_at_shape_changes(tmp_path):
    shapes = [(1, 2, 4, 4), (2, 2, 4, 4), (1, 2, 6, 6), (3, 2, 6, 6), (1, 2, 4, 4)]
    arrays = [graphs.rng(i).standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)]
    for i, a in enumerate(arrays):
        np.savez(tmp_path / f"feed_{i:03d}.npz", X=a)
    (tmp_path / "notes.txt").write_text("ignored")
    reader = open_data(tmp_path, conv_dynamic_hw())
    assert reader.num_samples == 8
    out = [b["X"] for b in reader.batches(3)]
    assert [o.shape for o in out] == [(3, 2, 4, 4), (3, 2, 6, 6), (1, 2, 6, 6), (1, 2, 4, 4)]
    np.testing.assert_array_equal(out[1], np.concatenate([arrays[2], arrays[3][:2]]))
    as_stored = [b["X"] for b in reader.batches(None)]
    assert len(as_stored) == 5 and all(np.array_equal(a, b) for a, b in zip(as_stored, arrays, strict=True))


def test_iterable_of_feeds_with_two_inputs_and_max_samples():
    feeds = [{"A": _x(2, 3, i), "B": _x(2, 3, 10 + i), "extra": "ignored"} for i in range(5)]
    reader = open_data(feeds, two_inputs(), max_samples=7)
    assert reader.num_samples == 7
    out = list(reader.batches(4))
    assert [len(b["A"]) for b in out] == [4, 3]
    np.testing.assert_array_equal(np.concatenate([b["B"] for b in out]), np.concatenate([f["B"] for f in feeds])[:7])


def test_onnxruntime_calibration_data_reader_is_used_as_is():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, rewindable: bool):
            self.items = [{"X": _x(3, seed=i)} for i in range(3)]
            self.pos = 0
            if rewindable:
                self.rewind = lambda: setattr(self, "pos", 0)

        def get_next(self):
            self.pos += 1
            return self.items[self.pos - 1] if self.pos <= len(self.items) else None

    expected = np.concatenate([f["X"] for f in Reader(False).items])
    once = open_data(Reader(rewindable=False), graphs.gemm())
    np.testing.assert_array_equal(_concat(once.batches(4)), expected)
    with pytest.raises(DataError, match="already read once"):
        list(once.batches(4))
    twice = open_data(Reader(rewindable=True), graphs.gemm())
    for _ in range(2):
        np.testing.assert_array_equal(_concat(twice.batches(None)), expected)


def test_int_widening_is_lossless_and_float64_is_refused():
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    (feed,) = open_data([{"I": ids}], int64_input()).batches()
    assert feed["I"].dtype == np.int64 and np.array_equal(feed["I"], ids)
    with pytest.raises(DataError, match=r"'I' has dtype uint64, the model expects I: int64\[N,4\]"):
        list(open_data([{"I": ids.astype(np.uint64)}], int64_input()).batches())
    with pytest.raises(DataError, match=r"dtype float64.*expects X: float32\[batch,8\].*astype\(np.float32\)"):
        list(open_data([{"X": _x(2).astype(np.float64)}], graphs.gemm()).batches())


# --- streaming: nothing grows with the number of samples ----------------------------------------


def test_iterable_is_consumed_lazily():
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield {"X": _x(1, seed=i)}

    batches = open_data(gen(), graphs.gemm()).batches(4)
    first = next(batches)
    assert len(first["X"]) == 4 and len(pulled) <= 5
    batches.close()


def test_folder_is_read_one_file_at_a_time(tmp_path):
    """A broken file late in the folder only fails when it is reached: earlier batches came first."""
    for i in range(6):
        np.savez(tmp_path / f"f{i}.npz", X=_x(2, seed=i))
    (tmp_path / "f5.npz").write_bytes(b"not a zip")
    got = []
    with pytest.raises(DataError, match=r"f5.npz is not a readable .npz file \(not a zip archive of arrays\)$"):
        for batch in open_data(tmp_path, graphs.gemm()).batches(2):
            got.append(batch)
    assert len(got) == 5  # (numpy's own words were "Cannot load file containing pickled data when allow_pickle=False")


def test_npz_is_streamed_not_loaded_whole(tmp_path):
    big = graphs.rng(0).standard_normal((2000, 1, 32, 32)).astype(np.float32)  # 8 MB
    np.savez(tmp_path / "big.npz", input=big)
    del big
    model = graphs.make_model(
        [helper.make_node("Relu", ["input"], ["y"])], [("input", ["N", 1, 32, 32])], [("y", ["N", 1, 32, 32])]
    )
    reader = open_data(tmp_path / "big.npz", model)
    tracemalloc.start()
    total = sum(len(b["input"]) for b in reader.batches(32))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 2000
    assert peak < 2_000_000, f"peak {peak} bytes while streaming an 8 MB archive in batches of 32"


@pytest.mark.parametrize("fortran", [False, True])
def test_a_lone_npy_feeds_a_one_input_model_streamed_like_an_npz_member(tmp_path, fortran):
    """np.save("calib.npy", x): the samples of a model with one input, whatever the file is called."""
    x = _x(10)
    np.save(tmp_path / "d.npy", np.asfortranarray(x) if fortran else x)
    (tmp_path / "d.npy").rename(tmp_path / "calib.data")  # told apart by its contents, not its name
    reader = open_data(tmp_path / "calib.data", graphs.gemm(), max_samples=7)
    assert reader.num_samples == 7 and reader.total_samples == 10
    assert [len(b["X"]) for b in reader.batches(3)] == [3, 3, 1]
    np.testing.assert_array_equal(_concat(reader.batches(3)), x[:7])
    big = graphs.rng(0).standard_normal((200_000, 8)).astype(np.float32)  # 6.4 MB
    np.save(tmp_path / "big.npy", big)
    tracemalloc.start()
    total = sum(len(b["X"]) for b in open_data(tmp_path / "big.npy", graphs.gemm()).batches(32))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 200_000 and peak < big.nbytes / 4, f"peak {peak} bytes for a {big.nbytes}-byte .npy"


def test_a_lone_npy_is_refused_with_what_to_do_where_it_cannot_feed_the_model(tmp_path):
    np.save(tmp_path / "d.npy", _x(4, 3))
    with pytest.raises(DataError, match=r"is one \.npy array, and the model takes 2 inputs .* "
                                        r"np\.savez\(path, A=\.\.\., B=\.\.\.\)"):
        open_data(tmp_path / "d.npy", two_inputs())
    np.save(tmp_path / "d.npy", _x(4).astype(np.float64))
    with pytest.raises(DataError, match=r"'X' has dtype float64.*astype\(np.float32\)"):
        open_data(tmp_path / "d.npy", graphs.gemm())
    np.save(tmp_path / "d.npy", _x(4, k=5))
    with pytest.raises(DataError, match=r"'X' has shape \[4, 5\].*axis 1 must be 8"):
        open_data(tmp_path / "d.npy", graphs.gemm())
    np.save(tmp_path / "d.npy", _x(400))
    (tmp_path / "d.npy").write_bytes((tmp_path / "d.npy").read_bytes()[:-1000])
    with pytest.raises(DataError, match="ends early: the file is truncated"):
        list(open_data(tmp_path / "d.npy", graphs.gemm()).batches(64))


# --- errors ---------------------------------------------------------------------------------------


def _write(tmp_path, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": _x(4)}, r"no array for input\(s\) \['X'\]; the model expects X: float32\[batch,8\]; .* has \['x'\]"),
        ({"X": _x(4)[None]}, r"'X' has shape \[1, 4, 8\] \(rank 3\), the model expects rank 2"),
        ({"X": _x(4, k=5)}, r"'X' has shape \[4, 5\].*axis 1 must be 8"),
        ({"X": np.zeros((0, 8), np.float32)}, r"'X' has no samples"),
        ({"X": np.float32(1.0)}, r"'X' is a scalar"),
    ],
)
def test_npz_misfits_fail_when_opened(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        open_data(_write(tmp_path, **arrays), graphs.gemm())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_input_and_sample(tmp_path, bad):
    x = _x(10)
    x[7, 3] = bad
    reader = open_data(_write(tmp_path, X=x), graphs.gemm())
    with pytest.raises(DataError, match=r"'X' holds NaN or inf \(first at sample 7\); clean or drop those samples "
                                        r"\(an attention mask's -inf is taken by calibrate and quantize\)"):
        list(reader.batches(4))


@pytest.mark.parametrize("inf", [np.inf, -np.inf])
def test_infinite_values_pass_where_allowed_and_nan_never(tmp_path, inf):
    # an additive attention mask holds -inf on purpose; calibration reports such a tensor instead
    x = _x(10)
    x[7, 3] = inf
    with infinite_values_allowed():
        got = np.concatenate([b["X"] for b in open_data(_write(tmp_path, X=x), graphs.gemm()).batches(4)])
        assert got[7, 3] == inf
        np.testing.assert_array_equal(got, x)
        x[8, 0] = np.nan
        with pytest.raises(DataError, match=r"'X' holds NaN \(first at sample 8\); clean or drop those samples$"):
            list(open_data(_write(tmp_path, X=x), graphs.gemm()).batches(4))
    with pytest.raises(DataError, match="holds NaN or inf"):  # the block ended
        list(open_data(_write(tmp_path, X=x), graphs.gemm()).batches(4))


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ([{"x": _x(2)}], r"feed 0 of the iterable list: missing input\(s\) \['X'\].*it has \['x'\]"),
        ([{"X": _x(2)}, [1, 2]], r"feed 1 of the iterable list: expected a dict"),
        ([{"X": _x(2, k=7)}], r"axis 1 must be 8"),
        ([], r"holds no samples; the model expects X: float32\[batch,8\]"),
    ],
)
def test_iterable_misfits(feeds, message):
    with pytest.raises(DataError, match=message):
        list(open_data(feeds, graphs.gemm()).batches(4))


def test_static_batch_must_match_in_feeds():
    with pytest.raises(DataError, match="axis 0 must be 1"):
        list(open_data([{"X": _x(2)}], static_batch_one()).batches())


def test_generator_can_only_be_read_once():
    reader = open_data(({"X": _x(2)} for _ in range(2)), graphs.gemm())
    assert len(list(reader.batches(8))) == 1
    with pytest.raises(DataError, match="already read once"):
        list(reader.batches(8))
    # a second reader of the same spent generator (a command that reads its data twice opens it twice; so
    # does a max_samples copy) says so too, instead of "holds no samples"
    gen = ({"X": _x(2)} for _ in range(2))
    assert len(list(open_data(gen, graphs.gemm()).batches(8))) == 1
    with pytest.raises(DataError, match="generator was already read once and cannot be rewound"):
        list(open_data(gen, graphs.gemm(), max_samples=2).batches(8))


def test_a_spent_list_iterator_or_map_says_why_it_may_be_empty():
    """A list iterator or map cannot be weakly referenced, so it is not remembered as read: its second reader
    finds it empty, and the error says that an iterator is spent after one read (it once said only "no samples")."""
    import onnxpress

    feeds = [{"X": _x(2)} for _ in range(2)]
    for spent in (iter(feeds), map(dict, feeds)):
        assert len(list(open_data(spent, graphs.gemm()).batches(8))) == 1
        with pytest.raises(DataError, match=r"holds no samples; .*an iterator is spent after one read.*pass a list"):
            list(open_data(spent, graphs.gemm()).batches(8))
    with pytest.raises(DataError, match="an iterator is spent after one read"):  # quantize reads its data twice
        onnxpress.quantize(graphs.gemm(), calib=iter(feeds))
    onnxpress.quantize(graphs.gemm(), calib=feeds)  # the list it names works
    with pytest.raises(DataError, match=r"holds no samples; the model expects X: float32\[\w+,8\]$"):
        list(open_data([], graphs.gemm()).batches(8))  # an empty list is just empty


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.npz", "data not found"),
        (lambda p: (p / "t.npz").write_text("hello") and p / "t.npz", "not a readable .npz archive"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no .npz files"),
    ],
)
def test_bad_paths(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        open_data(make(tmp_path), graphs.gemm())


def test_unsupported_source_types():
    with pytest.raises(DataError, match="wrap it in a list"):
        open_data({"X": _x(2)}, graphs.gemm())
    with pytest.raises(DataError, match="cannot read data from a int"):
        open_data(3, graphs.gemm())


def test_npz_inputs_with_different_sample_counts(tmp_path):
    with pytest.raises(DataError, match="different numbers of samples.*a folder of .npz files or a list of feed"):
        open_data(_write(tmp_path, A=_x(3, 3), B=_x(4, 3)), two_inputs())


def test_npz_cannot_feed_inputs_of_two_fixed_batches_and_says_what_can(tmp_path):
    """A[8,3] and B[4,3]: equal sample counts in the .npz then failed on B's slice of 8 rows ("axis 0 must be
    4"), the message before asked for equal counts: the two contradicted each other."""
    model = graphs.make_model([helper.make_node("ReduceSum", ["A"], ["Y"], keepdims=0),
                               helper.make_node("ReduceSum", ["B"], ["Z"], keepdims=0)],
                              [("A", [8, 3]), ("B", [4, 3])], [("Y", []), ("Z", [])])
    with pytest.raises(DataError, match=r"different fixed sizes on axis 0 \(A: float32\[8,3\], B: float32\[4,3\]\).*"
                                        "a folder of .npz files or a list of feed dicts"):
        open_data(_write(tmp_path, A=_x(16, 3), B=_x(16, 3)), model)
    feeds = [{"A": _x(8, 3), "B": _x(4, 3)}] * 2  # what works: one feed per model call
    assert len(list(open_data(feeds, model).batches(64))) == 2


# --- labels ---------------------------------------------------------------------------------------


def test_load_labels_from_npy_npz_and_array(tmp_path):
    y = np.arange(6, dtype=np.int32)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "d.npz", X=_x(6), labels=y[:, None])
    for src in (tmp_path / "y.npy", tmp_path / "d.npz", y):
        got = load_labels(src)
        assert got.dtype == np.int64 and np.array_equal(got, y)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": _x(2)}, r"has no 'labels' array; it has \['X'\]"),
        ({"labels": np.array([0.5, 1.0])}, "must be integers"),
        ({"labels": np.zeros((2, 3), np.int64)}, "non-empty 1-D"),
    ],
)
def test_bad_labels(tmp_path, arrays, message):
    np.savez(tmp_path / "l.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_labels(tmp_path / "l.npz")


def test_open_data_on_a_reader_limits_a_copy(tmp_path):
    np.savez(tmp_path / "d.npz", X=_x(10))
    reader = open_data(tmp_path / "d.npz", graphs.gemm())
    limited = open_data(reader, graphs.gemm(), max_samples=3)
    assert open_data(reader, graphs.gemm()) is reader
    assert limited.num_samples == 3 and reader.num_samples == 10
    np.testing.assert_array_equal(_concat(limited.batches(2)), _x(10)[:3])
    assert open_data(({"X": _x(1)} for _ in range(3)), graphs.gemm()).num_samples is None


def test_a_scalar_model_input_takes_one_value_or_one_per_sample(tmp_path):
    """A rank-0 input has no sample axis: a 0-d array goes with every batch of the other inputs, an [N] one gives
    each sample its own value (one a feed). Both were refused ("give a folder of .npz") before."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "n"], ["y"])], "s",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info(
            "n", TensorProto.FLOAT, [])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert sample_axes(model) == {"n": None}
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    np.savez(tmp_path / "one.npz", x=x, n=np.float32(2))
    reader = open_data(str(tmp_path / "one.npz"), model)
    feeds = list(reader.batches(5))
    assert reader.total_samples == 8 and [f["x"].shape for f in feeds] == [(5, 4), (3, 4)]
    assert all(f["n"].shape == () and f["n"] == 2 for f in feeds)
    np.savez(tmp_path / "each.npz", x=x, n=np.arange(8, dtype=np.float32))
    feeds = list(open_data(str(tmp_path / "each.npz"), model).batches(5))
    assert [f["x"].shape for f in feeds] == [(1, 4)] * 8 and [float(f["n"]) for f in feeds] == list(range(8))
    np.savez(tmp_path / "bad.npz", x=x, n=np.ones((8, 2), np.float32))
    with pytest.raises(DataError, match=r"'n' has no sample axis .*stacked on a new axis 0 \(rank 1\), or one value "
                                        r"of its own rank \(0\)"):
        open_data(str(tmp_path / "bad.npz"), model)
    (tmp_path / "feeds").mkdir()
    np.savez(tmp_path / "feeds" / "a.npz", x=x, n=np.float32(2))
    (feed,) = list(open_data(str(tmp_path / "feeds"), model).batches())
    assert feed["n"].shape == () and feed["x"].shape == (8, 4)


def test_inputs_that_share_a_named_dimension_must_agree_on_its_size():
    """input_ids [batch, seq] and attention_mask [batch, seq] of 12 and 8 tokens failed inside onnxruntime."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Mul", ["ids", "mask"], ["y"])], "g",
        [vi("ids", TensorProto.FLOAT, ["batch", "seq"]), vi("mask", TensorProto.FLOAT, ["batch", "seq"])],
        [vi("y", TensorProto.FLOAT, ["batch", "seq"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ok = {"ids": np.ones((2, 12), np.float32), "mask": np.ones((2, 12), np.float32)}
    assert len(list(open_data([ok], model).batches())) == 1
    bad = {"ids": np.ones((2, 12), np.float32), "mask": np.ones((2, 8), np.float32)}
    with pytest.raises(DataError, match=r"inputs 'ids' and 'mask' share the dimension 'seq' but have 12 \(axis 1\) "
                                        r"and 8 \(axis 1\)"):
        list(open_data([bad], model).batches())
