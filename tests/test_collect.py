"""Runner: extra outputs in one in-memory session, batching, max_samples, tensor selection."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxpress.calibration.collect import collect_statistics, select_tensors
from onnxpress.calibration.observers import MinMaxObserver, make_observer
from onnxpress.errors import CalibrationError, DataError
from tests.graphs import conv_bn_relu, gemm, make_model, rng, run


class Recorder:
    """Keeps the shapes it saw and the concatenated values (test-only: grows with data)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.values: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        self.shapes.append(x.shape)
        self.values.append(np.array(x, copy=True))


def feeds(n: int, shape=(1, 3, 8, 8), seed: int = 0) -> list[dict[str, np.ndarray]]:
    r = rng(seed)
    return [{"X": r.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_intermediates_match_onnxruntime_and_batches_are_stacked() -> None:
    """X[N,3,8,8] -> Conv -> c -> BatchNormalization -> bn -> Relu -> Y."""
    model = conv_bn_relu()
    before = model.SerializeToString()
    data = feeds(10)
    obs = {name: Recorder() for name in ("X", "c", "bn", "Y")}
    assert collect_statistics(model, data, obs, batch_size=4) == 10
    assert [s[0] for s in obs["c"].shapes] == [4, 4, 2]
    assert model.SerializeToString() == before  # the caller's model is untouched
    x = np.concatenate([d["X"] for d in data])
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    y_ref, c_ref = run(probe, {"X": x})
    np.testing.assert_array_equal(np.concatenate(obs["X"].values), x)
    np.testing.assert_allclose(np.concatenate(obs["c"].values), c_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(obs["Y"].values), y_ref, rtol=1e-5, atol=1e-5)


def test_minmax_of_gemm_output_matches_numpy() -> None:
    """X[batch,8] -> Gemm(W[8,6], B[6]) -> Y[batch,6]."""
    model = gemm()
    r = rng(1)
    data = [{"X": r.standard_normal((3, 8)).astype(np.float32)} for _ in range(5)]
    obs = {"Y": MinMaxObserver()}
    assert collect_statistics(model, data, obs, batch_size=64) == 15
    (y,) = run(model, {"X": np.concatenate([d["X"] for d in data])})
    assert obs["Y"].min == pytest.approx(float(y.min()), abs=1e-5)
    assert obs["Y"].max == pytest.approx(float(y.max()), abs=1e-5)


def test_max_samples_cuts_the_last_batch() -> None:
    obs = {"Y": Recorder()}
    assert collect_statistics(conv_bn_relu(), feeds(10), obs, batch_size=4, max_samples=6) == 6
    assert [s[0] for s in obs["Y"].shapes] == [4, 2]


def test_fixed_batch_dimension_feeds_one_by_one() -> None:
    """X[1,8] -> Gemm -> Y[1,6]: a static batch of 1 is never stacked."""
    r = rng(2)
    model = make_model(
        [helper.make_node("Gemm", ["X", "W"], ["Y"])],
        [("X", [1, 8])],
        [("Y", [1, 6])],
        {"W": r.standard_normal((8, 6)).astype(np.float32)},
    )
    obs = {"Y": Recorder()}
    data = [{"X": r.standard_normal((1, 8)).astype(np.float32)} for _ in range(5)]
    assert collect_statistics(model, data, obs, batch_size=64) == 5
    assert obs["Y"].shapes == [(1, 6)] * 5


def test_a_fixed_batch_larger_than_max_samples_is_taken_whole() -> None:
    """X[512,8] (a fixed batch of 512 rows) with max_samples=256: the first feed cannot be cut, and is run
    whole rather than skipped (quantize's GPTQ moments read 256 samples: 'no calibration samples' before)."""
    r = rng(4)
    model = make_model([helper.make_node("Gemm", ["X", "W"], ["Y"])], [("X", [512, 8])], [("Y", [512, 6])],
                       {"W": r.standard_normal((8, 6)).astype(np.float32)})
    obs = {"Y": Recorder()}
    data = [{"X": r.standard_normal((512, 8)).astype(np.float32)} for _ in range(2)]
    assert collect_statistics(model, data, obs, batch_size=64, max_samples=256) == 512
    assert obs["Y"].shapes == [(512, 6)]
    import onnxpress

    assert onnxpress.quantize(model, calib=data[:1]).stats["insert_qdq.nodes_quantized"] == 1


def test_select_tensors_skips_weights_and_values_computed_from_them() -> None:
    """X -> Conv(Identity(W)) -> c -> Relu -> Y; Identity(W) is a weight, not an activation."""
    r = rng(3)
    model = make_model(
        [
            helper.make_node("Identity", ["W"], ["W2"]),
            helper.make_node("Conv", ["X", "W2"], ["c"]),
            helper.make_node("Relu", ["c"], ["Y"]),
        ],
        [("X", ["N", 2, 4, 4])],
        [("Y", ["N", 3, 2, 2])],
        {"W": r.standard_normal((3, 2, 3, 3)).astype(np.float32)},
    )
    assert select_tensors(model) == ["X", "c", "Y"]
    assert select_tensors(model, op_types=["Relu"]) == ["c", "Y"]


def test_errors_name_the_problem() -> None:
    model = conv_bn_relu()
    with pytest.raises(CalibrationError, match="'W'"):
        collect_statistics(model, feeds(2), {"W": MinMaxObserver()})
    with pytest.raises(CalibrationError, match="no calibration samples"):
        collect_statistics(model, [], {"Y": MinMaxObserver()})
    with pytest.raises(DataError, match="onnxruntime rejected"):
        collect_statistics(model, feeds(2, shape=(1, 5, 8, 8)), {"Y": MinMaxObserver()})
    with pytest.raises(CalibrationError, match="update"):
        collect_statistics(model, feeds(2), {"Y": object()})
    with pytest.raises(CalibrationError, match="batch_size"):
        collect_statistics(model, feeds(2), {"Y": MinMaxObserver()}, batch_size=0)


def test_a_batch_onnxruntime_rejects_is_said_once_in_our_words(capfd) -> None:
    """A token id past the embedding table: onnxruntime also printed its own red error line on stderr (fd 2)
    before our DataError carried the same message; calibration and validation now run quietly."""
    from onnx import TensorProto, numpy_helper

    from onnxpress.validate import validate

    table = numpy_helper.from_array(rng(1).standard_normal((10, 8)).astype(np.float32), "T")
    graph = helper.make_graph([helper.make_node("Gather", ["T", "ids"], ["e"]),
                               helper.make_node("ReduceMean", ["e"], ["Y"], axes=[1], keepdims=0)], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    bad = [{"ids": np.array([[1, 2, 3, 50]], np.int64)}]
    capfd.readouterr()
    with pytest.raises(DataError, match="onnxruntime rejected a calibration batch: .*out of data bounds"):
        collect_statistics(model, bad, {"Y": MinMaxObserver()})
    with pytest.raises(Exception, match="failed to run the reference model .*out of data bounds"):
        validate(model, model, bad, latency=False)
    assert "onnxruntime" not in capfd.readouterr().err


def test_observer_errors_propagate_from_the_worker_thread() -> None:
    class Broken:
        def update(self, x: np.ndarray) -> None:
            raise CalibrationError("broken observer")

    with pytest.raises(CalibrationError, match="broken observer"):
        collect_statistics(conv_bn_relu(), feeds(3), {"Y": Broken()}, batch_size=1)


@pytest.mark.parametrize("method", ["minmax", "kl"])
def test_memory_does_not_grow_with_samples(method: str) -> None:
    """Peak Python-side allocation (numpy is traced) for 400 samples is that of 40 samples.

    KL too: its histograms are a fixed number of bins, whatever the sample count.
    """
    import tracemalloc

    def stream(n: int):
        r = rng(4)
        for _ in range(n):
            yield {"X": r.standard_normal((1, 3, 8, 8)).astype(np.float32)}

    peaks = []
    for n in (40, 400):
        obs = {name: make_observer(method, name) for name in ("X", "c", "bn", "Y")}
        tracemalloc.start()
        collect_statistics(conv_bn_relu(), stream(n), obs, batch_size=8)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_a_large_feed_is_sliced_into_batches() -> None:
    obs = {"Y": Recorder()}
    x = np.concatenate([d["X"] for d in feeds(10)])
    assert collect_statistics(conv_bn_relu(), [{"X": x}], obs, batch_size=4) == 10
    assert [s[0] for s in obs["Y"].shapes] == [4, 4, 2]


def test_memory_budget_shrinks_the_batch() -> None:
    """Y is 8x8x8 float32 = 2 KiB per sample; X, c, bn similar: a 0.01 MB budget allows 1 sample."""
    obs = {"Y": Recorder(), "c": MinMaxObserver()}
    collect_statistics(conv_bn_relu(), feeds(5), obs, batch_size=64, memory_budget_mb=0.005)
    assert [s[0] for s in obs["Y"].shapes] == [1] * 5
    obs = {"Y": Recorder()}
    collect_statistics(conv_bn_relu(), feeds(5), obs, batch_size=64, memory_budget_mb=None)
    assert [s[0] for s in obs["Y"].shapes] == [5]


def test_observing_only_graph_inputs() -> None:
    """X -> Gemm -> Y, observing X alone (no extra outputs to fetch)."""
    model = gemm()
    x = rng(5).standard_normal((10, 8)).astype(np.float32)
    obs = MinMaxObserver()
    assert collect_statistics(model, [{"X": x}], {"X": obs}) == 10
    r = obs.compute_range()
    assert (r.min, r.max) == (float(x.min()), float(x.max()))


def test_progress_bar_counts_samples_and_no_bar_is_built_when_off(capsys, monkeypatch) -> None:
    """X[batch,8] -> Gemm(W[8,6], B[6]) -> Y[batch,6]; tqdm writes to stderr only when progress is on."""
    import tqdm.auto

    made: list[object] = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        bar = real(*args, **kwargs)
        made.append(bar)
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    data = [{"X": rng(2).standard_normal((3, 8)).astype(np.float32)} for _ in range(4)]
    assert collect_statistics(gemm(), data, {"Y": MinMaxObserver()}, batch_size=5, progress=False) == 12
    assert made == []  # off: not even a disabled bar (its first use imports multiprocessing)
    assert collect_statistics(gemm(), data, {"Y": MinMaxObserver()}, batch_size=5, progress=True) == 12
    assert len(made) == 1 and made[0].n == 12
    assert "calibrating" in capsys.readouterr().err
