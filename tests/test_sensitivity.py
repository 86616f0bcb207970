"""Per-layer sensitivity: scores per (layer, option), agreement with the recipe-built model, the cache."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.errors import DataError, OnnxpressError
from onnxpress.prune import sqnr_db
from onnxpress.recipe import apply_recipe, prepare
from onnxpress.sensitivity import analyze_sensitivity, nsr, rank_options, read_feeds, run_outputs


def _digits_model(nodes: list, inits: dict, name: str) -> onnx.ModelProto:
    """A checked opset-17 model: ``input`` [N,1,8,8] -> ``logits`` [N,10], with these nodes and initializers."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """input[N,1,8,8] -> Conv(8) -> Relu -> Conv(16) -> Relu -> GAP -> Flatten -> Gemm(32) -> Relu -> Gemm(10)."""
    r = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (r.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {
        "w1": w(8, 1, 3, 3), "b1": np.zeros(8, np.float32) + 0.1,
        "w2": w(16, 8, 3, 3), "b2": np.zeros(16, np.float32),
        "w3": w(32, 16), "b3": np.zeros(32, np.float32),
        "w4": w(10, 32), "b4": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "w4", "b4"], ["logits"], name="fc2", transB=1),
    ]
    return _digits_model(nodes, inits, "tiny")


def tiny_data(path, n: int = 64, seed: int = 1):
    """An .npz of ``n`` inputs [n,1,8,8] and random labels; returns the path."""
    r = np.random.default_rng(seed)
    np.savez(path, input=r.standard_normal((n, 1, 8, 8)).astype(np.float32), labels=r.integers(0, 10, n))
    return path


def test_scores_every_layer_and_option(tmp_path):
    model = prepare(tiny_cnn())
    data = tiny_data(tmp_path / "d.npz")
    sens = analyze_sensitivity(model, data, cache_dir=tmp_path / "cache", max_samples=32)
    assert [lay.key for lay in sens.layers] == ["conv1", "conv2", "fc1", "fc2"]
    for lay in sens.layers:
        q = sens.score(lay.key, "int8", "int8")
        assert q is not None and 15.0 < q.sqnr_db < math.inf, (lay.key, q)
    # conv1 has full rank min(8, 9) = 8: ranks 4 and 2; a smaller rank never loses less signal
    r4, r2 = sens.score("conv1", "rank", "rank4"), sens.score("conv1", "rank", "rank2")
    assert r4 is not None and r2 is not None and r4.sqnr_db > r2.sqnr_db
    assert r2.macs_after < r4.macs_after < sens.layers[0].macs


def test_rank_score_matches_model_built_by_recipe(tmp_path):
    """The sensitivity of one split equals the SQNR of the same split built by a recipe, measured independently."""
    model = prepare(tiny_cnn())
    data = tiny_data(tmp_path / "d.npz")
    sens = analyze_sensitivity(model, data, cache_dir=False, max_samples=32, quantize=False)
    s = sens.score("conv2", "rank", "rank8")
    built = apply_recipe(model, {"version": 1, "steps": [{"pass": "lowrank", "ranks": {"conv2": 8}}]}, data,
                         prepared=True)
    feeds = read_feeds(model, data, 32)
    assert sqnr_db(run_outputs(model, feeds), run_outputs(built, feeds)) == pytest.approx(s.sqnr_db, abs=1e-6)


def test_cache_hit_and_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = prepare(tiny_cnn())
    data = tiny_data(tmp_path / "d.npz")
    first = analyze_sensitivity(model, data, cache_dir=tmp_path / "cache", max_samples=16, rank_fractions=(0.5,))
    files = list((tmp_path / "cache").glob("sensitivity-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == first.key
    second = analyze_sensitivity(model, data, cache_dir=tmp_path / "cache", max_samples=16, rank_fractions=(0.5,))
    assert second.cached and not first.cached and second.scores == first.scores
    other = analyze_sensitivity(prepare(tiny_cnn(seed=3)), data, cache_dir=tmp_path / "cache", max_samples=16,
                                rank_fractions=(0.5,))
    assert other.key != first.key and not other.cached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "d.npz"]  # nothing else in the cwd


def test_cache_key_covers_every_sample_the_ranges_and_moments_read(tmp_path):
    """Data equal in the SQNR samples but different after them is a cache miss (the int8 ranges read 256).

    The key used to hash only the first ``max_samples``: a file equal in those was served the other file's
    table. Samples past every count the analysis reads (here 48) change nothing, so they still hit.
    """
    model = prepare(tiny_cnn())
    x = np.random.default_rng(1).standard_normal((96, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "a.npz", input=x)
    later = x.copy()
    later[16:] *= 8.0  # only beyond the 16 SQNR samples: wider activation ranges, coarser int8 steps
    np.savez(tmp_path / "b.npz", input=later)
    past = x.copy()
    past[48:] *= 8.0  # beyond calib_samples and moment_samples below: read by no phase
    np.savez(tmp_path / "c.npz", input=past)
    kw = {"cache_dir": tmp_path / "cache", "max_samples": 16, "calib_samples": 48, "moment_samples": 32,
          "rank_fractions": (0.5,), "prune_ratios": ()}
    first = analyze_sensitivity(model, tmp_path / "a.npz", **kw)
    changed = analyze_sensitivity(model, tmp_path / "b.npz", **kw)
    assert not changed.cached and changed.key != first.key
    int8 = {s.layer: s.sqnr_db for s in first.scores if s.family == "int8"}
    assert any(s.sqnr_db != pytest.approx(int8[s.layer]) for s in changed.scores if s.family == "int8")
    same = analyze_sensitivity(model, tmp_path / "c.npz", **kw)
    assert same.cached and same.key == first.key and same.scores == first.scores
    # the settings that change what is read or measured are in the key too
    assert not analyze_sensitivity(model, tmp_path / "a.npz", **{**kw, "calib_samples": 64}).cached
    assert not analyze_sensitivity(model, tmp_path / "a.npz", **{**kw, "max_samples": 8}).cached


def test_nsr_and_rank_options():
    assert nsr(math.inf) == 0.0 and nsr(20.0) == pytest.approx(0.01)
    assert rank_options(16, (0.5, 0.25)) == [8, 4]
    assert rank_options(16, (0.5, 0.25), multiple=8) == [8]
    assert rank_options(2, (0.5, 0.25)) == [1]


def test_bad_data_and_samples(tmp_path):
    model = prepare(tiny_cnn())
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(DataError):
        analyze_sensitivity(model, tmp_path / "bad.npz", cache_dir=False)
    with pytest.raises(OnnxpressError, match="at least one sample"):
        analyze_sensitivity(model, tiny_data(tmp_path / "d.npz"), cache_dir=False, max_samples=0)


def test_prune_options_per_channel_group(tmp_path):
    """Prune rows per channel group: kept counts are multiples of 8, and each SQNR equals the recipe-built model's."""
    model = prepare(tiny_cnn())
    data = tiny_data(tmp_path / "d.npz")
    sens = analyze_sensitivity(model, data, cache_dir=False, max_samples=32, quantize=False, rank_fractions=())
    rows = [s for s in sens.scores if s.family == "prune"]
    assert rows and {s.family for s in sens.scores} == {"prune"}
    # conv1's 8 channels cannot keep a multiple of 8 below 8; conv2 (16) keeps 8; fc1 (32) keeps 24, 16, 8
    removed = {(s.layer, s.units_removed) for s in rows}
    assert {u for g, u in removed if "fc1" in g} == {8, 16, 24} and {u for g, u in removed if "conv2" in g} == {8}
    assert not any("conv1" in g and "conv2" not in g for g, _ in removed)
    total = sum(lay.macs for lay in sens.layers)
    feeds = read_feeds(model, data, 32)
    reference = run_outputs(model, feeds)
    for s in rows:
        assert s.macs_after < total and s.bytes_delta < 0
        built = apply_recipe(model, {"version": 1, "steps": [
            {"pass": "prune", "ratio": {s.layer: s.ratio}, "multiple": 8}]}, data, prepared=True)
        assert sqnr_db(reference, run_outputs(built, feeds)) == pytest.approx(s.sqnr_db, abs=1e-6)
    fc1 = sorted((s for s in rows if "fc1" in s.layer), key=lambda s: s.ratio)
    assert fc1[0].sqnr_db > fc1[-1].sqnr_db and fc1[0].macs_after > fc1[-1].macs_after
    none = analyze_sensitivity(model, data, cache_dir=False, max_samples=32, quantize=False, prune_ratios=())
    assert not any(s.family == "prune" for s in none.scores)


def test_structural_options_are_timed_on_request(tmp_path):
    model = prepare(tiny_cnn())
    data = tiny_data(tmp_path / "d.npz")
    sens = analyze_sensitivity(model, data, cache_dir=False, max_samples=32, latency=True, rank_fractions=(0.5,))
    for s in sens.scores:
        if s.family == "int8":
            assert s.latency_ratio is None
        else:
            assert s.latency_ratio is not None and 0.0 < s.latency_ratio < 10.0, s
    assert {s.family for s in sens.scores} == {"int8", "rank", "prune"}


def tiny_mlp(seed: int = 0) -> onnx.ModelProto:
    """input[N,1,8,8] -> Flatten -> MatMul(W1[64,96]) -> Relu -> MatMul(W2[96,64]) -> Relu -> Gemm(10) -> logits."""
    r = np.random.default_rng(seed)
    inits = {
        "w1": (r.standard_normal((64, 96)) / 8).astype(np.float32),
        "w2": (r.standard_normal((96, 64)) / 10).astype(np.float32),
        "w3": (r.standard_normal((10, 64)) / 8).astype(np.float32), "b3": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], name="head", transB=1),
    ]
    return _digits_model(nodes, inits, "mlp")


def test_int4_option_for_large_matmuls_only(tmp_path):
    """int4 rows for the 64x96 and 96x64 MatMuls (>= 4096 weights), none for the 10x64 head or a CNN's layers."""
    model = prepare(tiny_mlp())
    data = tiny_data(tmp_path / "d.npz")
    sens = analyze_sensitivity(model, data, cache_dir=False, max_samples=32, rank_fractions=(), prune_ratios=())
    rows = {s.layer: s for s in sens.scores if s.family == "int4"}
    assert sorted(rows) == ["mm1", "mm2"]
    feeds = read_feeds(model, data, 32)
    reference = run_outputs(model, feeds)
    for key, s in rows.items():
        # K x N floats -> N x ceil(K/64) blocks of 32 packed bytes (64 4-bit weights) and one float scale
        k, n = (64, 96) if key == "mm1" else (96, 64)
        packed = n * -(-k // 64) * (32 + 4)
        assert s.bytes_delta == pytest.approx(packed - 4 * k * n, abs=200), key
        assert s.bytes_delta < sens.score(key, "int8", "int8").bytes_delta  # int4 weights are smaller than int8
        # equals the recipe's quantize step with only this layer at int4 (every other MAC layer excluded),
        # built independently (same GPTQ moments: the 64 samples are all the data)
        others = [x.key for x in sens.layers if x.key != key]
        step = {"pass": "quantize", "int4_layers": [key], "exclude": others, "max_samples": 64}
        built = apply_recipe(model, {"version": 1, "steps": [step]}, data, prepared=True)
        assert [n.op_type for n in built.graph.node].count("MatMulNBits") == 1
        assert sqnr_db(reference, run_outputs(built, feeds)) == pytest.approx(s.sqnr_db, abs=1e-6), key
    assert not any(s.family == "int4" for s in analyze_sensitivity(
        model, data, cache_dir=False, max_samples=16, rank_fractions=(), prune_ratios=(), int4=False).scores)
    cnn = analyze_sensitivity(prepare(tiny_cnn()), data, cache_dir=False, max_samples=16, rank_fractions=(),
                              prune_ratios=())
    assert {s.family for s in cnn.scores} == {"int8"}


def test_past_deadline_measures_only_int8_and_caches_nothing(tmp_path):
    """The time limit: every layer's int8 (the uniform baseline needs it), no other option, no cache file."""
    model = prepare(tiny_cnn())
    data = tiny_data(tmp_path / "d.npz")
    cut = analyze_sensitivity(model, data, cache_dir=tmp_path / "cache", max_samples=16, deadline=0.0)
    assert {(s.layer, s.family) for s in cut.scores} == {(lay.key, "int8") for lay in cut.layers}
    assert not (tmp_path / "cache").exists()
    full = analyze_sensitivity(model, data, cache_dir=False, max_samples=16)
    assert {s.family for s in full.scores} >= {"int8", "rank", "prune"}
    assert [s for s in full.scores if s.family == "int8"] == list(cut.scores)  # the same int8 numbers either way
    assert full.scores[0].family == "int8" and full.scores[1].family != "int8"  # still per layer: int8, then the rest


def test_int4_option_for_a_large_enough_matmul(tmp_path):
    """A 64x64 MatMul weight (4096 >= INT4_MIN_WEIGHTS) gets an int4 score beside its int8 one."""
    r = np.random.default_rng(4)
    w1 = numpy_helper.from_array((r.standard_normal((64, 64)) * 0.2).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((r.standard_normal((64, 10)) * 0.2).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2")]  # fmt: skip
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], [w1, w2])
    model = prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    np.savez(tmp_path / "d.npz", x=r.standard_normal((32, 64)).astype(np.float32))
    sens = analyze_sensitivity(model, tmp_path / "d.npz", cache_dir=False, max_samples=16, prune_ratios=())
    q4, q8 = sens.score("fc1", "int4", "int4"), sens.score("fc1", "int8", "int8")
    assert q4 is not None and q8 is not None and q4.sqnr_db < q8.sqnr_db
    assert sens.score("fc2", "int4", "int4") is None  # 640 weights: too small


def test_w4a8_option_for_large_weights_on_request(tmp_path):
    """The reference ResNet's seven convs of 4096+ weights get a w4a8 score (noisier than int8, fewer bytes, the
    layer's model built as the recipe builds it); its stem, 1x1 shortcut and classifier do not."""
    models = Path(__file__).resolve().parents[1] / "models"
    model = prepare(models / "resnet.onnx")
    calib = models / "digits32_calib.npz"
    sens = analyze_sensitivity(model, calib, cache_dir=False, max_samples=16, calib_samples=64, rank_fractions=(),
                               prune_ratios=(), w4a8=True)
    four = {s.layer: s for s in sens.scores if s.family == "w4a8"}
    assert sorted(four) == ["node_Conv_140", "node_Conv_142", "node_Conv_144", "node_Conv_146", "node_Conv_150",
                            "node_Conv_152", "node_Conv_154"]
    for key, s in four.items():
        q8 = sens.score(key, "int8", "int8")
        assert s.sqnr_db < q8.sqnr_db and s.bytes_delta < q8.bytes_delta
    plain = analyze_sensitivity(model, calib, cache_dir=False, max_samples=16, calib_samples=64, rank_fractions=(),
                                prune_ratios=())
    assert not any(s.family == "w4a8" for s in plain.scores)


def _whole_and_reused(model, data, monkeypatch, **kw):
    """Scores of ``analyze_sensitivity`` run whole (``REUSE_BUDGET = 0``) and reusing activations, and the runs."""
    import onnxpress.sensitivity as sens

    build, caches = sens._Reuse.build, []

    def keep(cls, *args, **kwargs):
        caches.append(build(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(sens._Reuse, "build", classmethod(keep))
    reused = analyze_sensitivity(model, data, cache_dir=False, **kw)
    monkeypatch.setattr(sens, "REUSE_BUDGET", 0)
    whole = analyze_sensitivity(model, data, cache_dir=False, **kw)
    assert caches[0] is not None and caches[1] is None
    assert [(s.layer, s.option) for s in reused.scores] == [(s.layer, s.option) for s in whole.scores]
    return whole, reused, caches[0].runs


def test_reused_activations_give_the_whole_runs_scores(tmp_path, monkeypatch):
    """Every family (int8, rank, prune; int4 on the MLP) scores the same when candidates run only what they change.

    The tolerance is 0.01 dB (onnxruntime could fuse differently across the cut); here they agree to the bit.
    """
    data = tiny_data(tmp_path / "d.npz")
    for model in (prepare(tiny_cnn()), prepare(tiny_mlp())):
        whole, reused, runs = _whole_and_reused(model, data, monkeypatch, max_samples=32)
        assert {s.family for s in reused.scores} >= {"int8", "rank"}
        for w, r in zip(whole.scores, reused.scores, strict=True):
            assert r.sqnr_db == pytest.approx(w.sqnr_db, abs=0.01), (r.layer, r.option)
            assert dataclasses.replace(r, sqnr_db=w.sqnr_db) == w  # the rest of the row is untouched
        assert runs["partial"] > 0 and runs["partial"] + runs["whole"] == len(reused.scores)
        monkeypatch.undo()


def test_only_the_changed_part_of_a_candidate_runs(tmp_path):
    """The part that runs: what differs from the reference (matched by structure, not names) and downstream."""
    from onnxpress.calibrate import calibrate
    from onnxpress.passes.qdq import InsertQDQ, Selection
    from onnxpress.pipeline import run_passes
    from onnxpress.sensitivity import _Reuse, value_keys

    model = prepare(tiny_cnn())
    data = tiny_data(tmp_path / "d.npz")
    feeds = read_feeds(model, data, 40, batch_size=16)  # batches of 16, 16, 8: the part's batch dim stays open
    reuse = _Reuse.build(model, feeds)
    assert reuse is not None and _Reuse.build(model, feeds, budget=500_000) is None  # 40 samples x 12.7 kB: over
    # int8 of conv2: its Q/DQ nodes, conv2 and everything after, fed relu1's output from the reference run
    others = frozenset(n.name for n in model.graph.node if n.name != "conv2")
    qdq = run_passes(model, [InsertQDQ(calibrate(model, data, max_samples=64), exclude=Selection(nodes=others))])
    changed, frontier, _ = reuse.plan(qdq.model)
    assert frontier == ["r1"] and "conv2" in changed and "fc2" in changed and not {"conv1", "relu1"} & set(changed)
    # every node and value renamed, fc2's weight halved: only fc2 runs (from fc1's Relu); the renames do not count
    cand = onnx.ModelProto()
    cand.CopyFrom(model)
    del cand.graph.value_info[:]
    kept = {"input", "logits"}
    for node in cand.graph.node:
        node.name = "x_" + node.name
        node.input[:] = [i if i in kept else "x_" + i for i in node.input]
        node.output[:] = [o if o in kept else "x_" + o for o in node.output]
    for init in cand.graph.initializer:
        arr = numpy_helper.to_array(init) * (0.5 if init.name == "w4" else 1.0)
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), "x_" + init.name))
    assert reuse.plan(cand)[:2] == (["x_fc2"], ["x_r3"])
    for c in (qdq.model, cand):
        assert np.array_equal(reuse.outputs(c), run_outputs(c, feeds))
    # conv1 changed: the part would read only the graph input, so the candidate runs whole
    first = onnx.ModelProto()
    first.CopyFrom(model)
    w1 = next(i for i in first.graph.initializer if i.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1) * 0.5, "w1"))
    assert reuse.plan(first) is None
    runs = dict(reuse.runs)
    assert np.array_equal(reuse.outputs(first), run_outputs(first, feeds))
    assert reuse.runs == {"partial": runs["partial"], "whole": runs["whole"] + 1}
    # a subgraph reads outer values by name, which the keys do not cover: no keys, no reuse
    branch = helper.make_graph([helper.make_node("Identity", ["r1"], ["b"])], "b", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    nested = onnx.ModelProto()
    nested.CopyFrom(model)
    nested.graph.node.append(helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch))
    assert value_keys(nested) is None and value_keys(model) is not None


REFERENCE_MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.skipif(not (REFERENCE_MODELS / "mobilenet.onnx").exists(), reason="reference models not built")
def test_reused_activations_on_a_reference_model(monkeypatch):
    """mobilenet (int8, rank 0.5, prune 0.5 on 64 samples): the scores of the partial runs are the whole runs'."""
    model = prepare(REFERENCE_MODELS / "mobilenet.onnx")
    whole, reused, runs = _whole_and_reused(model, REFERENCE_MODELS / "digits32_calib.npz", monkeypatch,
                                            rank_fractions=(0.5,), prune_ratios=(0.5,))
    worst = max(0.0 if r.sqnr_db == w.sqnr_db else abs(r.sqnr_db - w.sqnr_db)  # inf == inf: no difference
                for w, r in zip(whole.scores, reused.scores, strict=True))
    assert worst <= 0.01
    assert runs["partial"] >= len(reused.scores) - 4  # the first conv's options and its group's prune run whole


def test_output_sqnr_reads_the_float_outputs_only():
    """Integer outputs (TopK indices) added their exactly kept values to the signal: optimize read 82 dB there."""
    from onnxpress.sensitivity import flat_outputs

    logits, indices = np.array([[1.0, -2.0]]), np.array([[1000, 2000]], np.int64)
    assert flat_outputs([[logits, indices], [logits, indices]]).tolist() == [1.0, -2.0, 1.0, -2.0]
    assert flat_outputs([[indices]]).tolist() == [1000.0, 2000.0]  # nothing else to compare


def test_a_fixed_batch_larger_than_the_samples_kept_is_read_whole() -> None:
    """X[100, 8] fixed: sensitivity keeps 64 samples for its SQNR runs, and cut the feed to 64 rows, which
    onnxruntime refused inside optimize ("Got: 64 Expected: 100", a traceback)."""
    from onnxpress.sensitivity import _feeds_and_digest, run_outputs
    from tests.graphs import gemm

    model = gemm()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 100  # a fixed batch of 100
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 100
    data = [{"X": np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)} for _ in range(3)]
    feeds, _ = _feeds_and_digest(model, data, 64, 256)
    assert [f["X"].shape for f in feeds] == [(100, 8)]
    assert run_outputs(model, feeds).shape[0] == 100 * 6  # runs (Y is [100, 6])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_a_size_scan_lists_recurrent_layers_with_int8_and_codebook_options(op):
    """With the codebook option, an LSTM / GRU is a layer of the scan: int8 (an LSTM's DynamicQuantizeLSTM, a GRU's
    float16 weights) and cb4 (its W and R coded), cb4 the smaller; without it (latency searches) it is not listed."""
    from tests.graphs import rng
    from tests.test_codebook import _recurrent_model

    model = _recurrent_model(op, "forward")
    data = [{"X": rng(s).standard_normal((10, 8, 16)).astype(np.float32)} for s in range(60, 64)]
    sens = analyze_sensitivity(model, data, cache_dir=False, max_samples=16, codebook=True, rank_fractions=(),
                               prune_ratios=())  # fmt: skip
    assert [(lay.key, lay.op) for lay in sens.layers] == [("rec", op)]
    rows = {s.option: s for s in sens.scores if s.layer == "rec"}
    assert set(rows) == {"int8", "cb4"}
    assert rows["cb4"].bytes_delta < rows["int8"].bytes_delta < 0
    assert rows["cb4"].sqnr_db > 15 and rows["int8"].sqnr_db > rows["cb4"].sqnr_db
    plain = analyze_sensitivity(model, data, cache_dir=False, max_samples=16, rank_fractions=(), prune_ratios=())
    assert not plain.layers
