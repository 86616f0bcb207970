"""Recipes: validation errors, JSON round trip, deterministic application, float factors of excluded layers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxpress.errors import OnnxpressError
from onnxpress.prune import sqnr_db
from onnxpress.recipe import apply_recipe, load_recipe, prepare, save_recipe, validate_recipe
from onnxpress.sensitivity import read_feeds, run_outputs
from tests.test_sensitivity import tiny_cnn, tiny_data, tiny_mlp

RECIPE = {"version": 1, "steps": [
    {"pass": "lowrank", "ranks": {"conv2": 8, "fc1": 8}},
    {"pass": "quantize", "method": "minmax", "exclude": ["conv2"], "max_samples": 32},
]}


@pytest.mark.parametrize(("recipe", "match"), [
    ([], "JSON object"),
    ({"version": 2, "steps": [{"pass": "cleanup"}]}, "version must be 1"),
    ({"version": True, "steps": [{"pass": "cleanup"}]}, "version must be 1, got True"),
    ({"version": 1, "steps": []}, "non-empty list"),
    ({"version": 1, "steps": [{"pass": "sparsify"}]}, "unknown pass 'sparsify'"),
    ({"version": 1, "steps": [{"pass": ["prune"]}]}, r"unknown pass \['prune'\]"),  # was a TypeError (unhashable)
    ({"version": 1, "steps": [{"pass": "quantize", "per_channel": "no"}]}, "per_channel must be true or false"),
    ({"version": 1, "steps": [{"pass": "lowrank", "ranks": {"a": 2}, "data_aware": 0}]},
     "data_aware must be true or false"),
    ({"version": 1, "steps": [{"pass": "lowrank", "ranks": {"a": 0}}]}, "integer >= 1"),
    ({"version": 1, "steps": [{"pass": "lowrank"}]}, "needs 'ranks'"),
    ({"version": 1, "steps": [{"pass": "prune", "ratio": 1.5}]}, r"in \[0, 1\)"),
    ({"version": 1, "steps": [{"pass": "quantize", "method": "best"}]}, "method must be"),
    ({"version": 1, "steps": [{"pass": "quantize", "bits": 4}]}, "unknown keys"),
    ({"version": 1, "steps": [{"pass": "quantize", "exclude": "conv1"}]}, "list of layer names"),
    ({"version": 1, "steps": [{"pass": "quantize", "max_samples": 0}]}, "max_samples"),
    ({"version": 1, "steps": [{"pass": "quantize", "int4_layers": "fc1"}]}, "'int4_layers' must be a list"),
    ({"version": 1, "steps": [{"pass": "quantize", "int4_layers": ["fc1"], "exclude": ["fc1"]}]},
     r"both in 'exclude' \(float\) and 'int4_layers'"),
    ({"version": 1, "steps": [{"pass": "quantize", "weights": "int2"}]}, "weights must be int8 or int4"),
    ({"version": 1, "steps": [{"pass": "quantize", "weights": "int4", "int4_layers": ["fc1"]}]},
     "'int4_layers' is for int8 models"),
    ({"version": 1, "steps": [{"pass": "quantize", "int8_method": "awq"}]}, "int8_method must be rtn, gptq or auto"),
    ({"version": 1, "steps": [{"pass": "quantize", "equalize": True}]}, "equalize must be split, skip, relu or"),
    ({"version": 1, "steps": [{"pass": "quantize", "smoothquant": 1.5}]}, r"SmoothQuant alpha, a number in \[0, 1\]"),
    ({"version": 1, "steps": [{"pass": "quantize", "codebook": 9}]}, "integer in 1..8"),
    ({"version": 1, "steps": [{"pass": "quantize", "codebook": True}]}, "integer in 1..8"),
    ({"version": 1, "steps": [{"pass": "quantize", "codebook": 4, "weights": "int4"}]},
     r"so weights='int4' would not apply"),
    ({"version": 1, "steps": [{"pass": "quantize", "codebook": 4, "int4_layers": ["fc1"], "int8_method": "gptq"}]},
     r"int4_layers=\['fc1'\], int8_method='gptq' would not apply; drop them"),
    ({"version": 1, "steps": [{"pass": "quantize", "w4a8_layers": "conv2"}]}, "'w4a8_layers' must be a list"),
    ({"version": 1, "steps": [{"pass": "quantize", "w4a8_layers": ["conv2"], "exclude": ["conv2"]}]},
     r"\['conv2'\] are in 'w4a8_layers' and in 'exclude'"),
    ({"version": 1, "steps": [{"pass": "quantize", "w4a8_layers": ["conv2"], "weights": "int4"}]},
     "'w4a8_layers' gives layers of an int8 model"),
    ({"version": 1, "steps": [{"pass": "quantize", "w4a8_layers": ["conv2"], "codebook": 4}]},
     r"w4a8_layers=\['conv2'\] would not apply"),
    ({"version": 1, "steps": [{"pass": "cleanup"}], "extra": 1}, "unknown top-level"),
])
def test_invalid_recipes_are_named(recipe, match):
    with pytest.raises(OnnxpressError, match=match):
        validate_recipe(recipe)


def test_file_round_trip_and_bad_files(tmp_path):
    path = save_recipe(RECIPE, tmp_path / "r.json")
    loaded = load_recipe(path)
    assert loaded == validate_recipe(RECIPE) and loaded["steps"][0]["max_samples"] == 64  # defaults filled in
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OnnxpressError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")
    with pytest.raises(OnnxpressError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04\xff\xfe binary")  # a data file given by mistake
    with pytest.raises(OnnxpressError, match=r"recipe .*d\.npz is not a text file \(JSON or YAML\)"):
        load_recipe(tmp_path / "d.npz")


def test_a_codebook_step_keeps_its_excluded_layers_float(tmp_path):
    model = tiny_cnn()
    recipe = {"version": 1, "steps": [{"pass": "quantize", "codebook": 4, "exclude": ["fc1"]}]}
    built = apply_recipe(model, recipe, tiny_data(tmp_path / "d.npz"))
    floats = {i.name for i in built.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert "w3" in floats and "w2" not in floats  # fc1's weight as it was; conv2's as codebook indices


def test_apply_is_deterministic_and_never_modifies_input(tmp_path):
    model = tiny_cnn()
    before = model.SerializeToString()
    data = tiny_data(tmp_path / "d.npz")
    a = apply_recipe(model, RECIPE, data).SerializeToString()
    b = apply_recipe(model, json.loads(json.dumps(RECIPE)), data).SerializeToString()
    assert a == b
    assert model.SerializeToString() == before


def test_excluded_split_layer_stays_float(tmp_path):
    data = tiny_data(tmp_path / "d.npz")
    out = apply_recipe(tiny_cnn(), RECIPE, data)
    dq_outputs = {o for n in out.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in out.graph.node}
    factors = [n for n, node in by_name.items() if n.startswith("conv2") and node.op_type == "Conv"]
    assert sorted(factors) == ["conv2", "conv2_lowrank_conv"]
    for name in factors:  # float weights: not produced by DequantizeLinear
        assert by_name[name].input[1] not in dq_outputs
    quantized = [n for n, node in by_name.items() if n.startswith("fc1") and node.op_type == "Gemm"]
    assert len(quantized) == 2 and all(by_name[n].input[1] in dq_outputs for n in quantized)


def test_full_rank_is_exact_and_low_rank_is_bounded(tmp_path):
    data = tiny_data(tmp_path / "d.npz")
    model = prepare(tiny_cnn())
    feeds = read_feeds(model, data, 64)
    ref = run_outputs(model, feeds)
    same = apply_recipe(model, {"version": 1, "steps": [{"pass": "lowrank", "ranks": {"conv2": 16}}]}, data,
                        prepared=True)
    np.testing.assert_allclose(run_outputs(same, feeds), ref, atol=1e-5)
    half = apply_recipe(model, {"version": 1, "steps": [{"pass": "lowrank", "ranks": {"fc1": 8}}]}, data,
                        prepared=True)
    assert 5.0 < sqnr_db(ref, run_outputs(half, feeds)) < 200.0


def test_quantize_step_needs_calibration_data():
    with pytest.raises(OnnxpressError, match="needs calibration data"):
        apply_recipe(tiny_cnn(), {"version": 1, "steps": [{"pass": "quantize"}]})


def test_prune_step_keeps_a_working_model(tmp_path):
    data = tiny_data(tmp_path / "d.npz")
    model = prepare(tiny_cnn())
    pruned = apply_recipe(model, {"version": 1, "steps": [{"pass": "prune", "ratio": 0.25}]}, data, prepared=True)
    feeds = read_feeds(model, data, 16)
    assert run_outputs(pruned, feeds).shape == run_outputs(model, feeds).shape
    assert pruned.ByteSize() < model.ByteSize()


def test_bundled_bench_recipes_are_valid_and_name_real_prune_groups():
    """bench/recipes/*.json load, validate, and every pruned group exists in the reference resnet."""
    from pathlib import Path

    import onnx

    from onnxpress.recipe import load_recipe, prepare
    from onnxpress.sensitivity import prune_groups

    root = Path(__file__).resolve().parent.parent
    groups = set(prune_groups(prepare(onnx.load(root / "models" / "resnet.onnx"))))
    paths = sorted((root / "bench" / "recipes").glob("*.json"))
    assert paths
    for path in paths:
        recipe = load_recipe(path)
        for step in recipe["steps"]:
            if step["pass"] == "prune":
                assert set(step["ratio"]) <= groups, path


def test_finetune_step_weights_are_the_bridges_writeback_export(tmp_path, torch_one_thread):
    """The recipe's fine-tune equals onnxpress.finetune(exporter="writeback") with the same settings, bit for bit."""
    from onnx import numpy_helper

    from onnxpress.finetune import finetune

    data = tiny_data(tmp_path / "d.npz")
    model = prepare(tiny_cnn())
    prune = {"pass": "prune", "ratio": 0.25}
    pruned = apply_recipe(model, {"version": 1, "steps": [prune]}, data, prepared=True)
    step = {"pass": "finetune", "epochs": 2, "lr": 1e-3, "temperature": 4.0, "seed": 0, "batch_size": 16}
    tuned = apply_recipe(model, {"version": 1, "steps": [prune, step]}, data, prepared=True)  # teacher: model
    ref = finetune(pruned, model, data, epochs=2, lr=1e-3, temperature=4.0, seed=0, batch_size=16, hard_weight=0.0,
                   soft_weight=1.0, threads=1, exporter="writeback").model
    assert [n.name for n in tuned.graph.node] == [n.name for n in pruned.graph.node]  # every name kept
    want = {i.name: numpy_helper.to_array(i) for i in ref.graph.initializer}
    got = {i.name: numpy_helper.to_array(i) for i in tuned.graph.initializer}
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in got)
    before = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert any(not np.array_equal(got[k], before[k]) for k in got)  # the fine-tune did train
    again = apply_recipe(model, {"version": 1, "steps": [prune, step]}, data, prepared=True)
    assert again.SerializeToString() == tuned.SerializeToString()


def test_weight_only_int4_step(tmp_path):
    """quantize.weights = int4: the eligible MatMuls become MatMulNBits, no Q/DQ anywhere, same bytes twice."""
    data = tiny_data(tmp_path / "d.npz")
    recipe = {"version": 1, "steps": [{"pass": "quantize", "weights": "int4", "exclude": [], "max_samples": 32}]}
    built = apply_recipe(prepare(tiny_mlp()), recipe, calib=data)
    ops = [n.op_type for n in built.graph.node]
    assert ops.count("MatMulNBits") == 2 and "QuantizeLinear" not in ops  # mm1, mm2 (>= 4096 weights)
    assert apply_recipe(prepare(tiny_mlp()), recipe, calib=data).SerializeToString() == built.SerializeToString()
    feeds = read_feeds(built, data, 32)
    assert sqnr_db(run_outputs(prepare(tiny_mlp()), feeds), run_outputs(built, feeds)) > 24  # measured 26.8


def test_finetune_cache_reuses_one_fine_tune_and_builds_the_same_bytes(tmp_path, torch_one_thread, monkeypatch):
    """Two recipes that differ only after their fine-tune train once with ``finetune_cache``, and each builds
    exactly what it builds without the cache."""
    import onnxpress.recipe as rec

    data = tiny_data(tmp_path / "d.npz")
    model = prepare(tiny_cnn())
    steps = [{"pass": "prune", "ratio": 0.25},
             {"pass": "finetune", "epochs": 2, "lr": 1e-3, "temperature": 4.0, "seed": 0, "batch_size": 16}]
    a = {"version": 1, "steps": [*steps, {"pass": "quantize", "max_samples": 32}]}
    b = {"version": 1, "steps": [*steps, {"pass": "quantize", "max_samples": 32, "per_channel": False}]}
    plain = [apply_recipe(model, r, data, prepared=True).SerializeToString() for r in (a, b)]
    calls = []
    real = rec.finetune_in_place
    monkeypatch.setattr(rec, "finetune_in_place", lambda *x, **k: calls.append(1) or real(*x, **k))
    cache: dict = {}
    cached = [apply_recipe(model, r, data, prepared=True, finetune_cache=cache).SerializeToString() for r in (a, b)]
    assert calls == [1] and len(cache) == 1
    assert cached == plain and plain[0] != plain[1]


def test_qat_step_is_finetune_of_the_quantized_model(tmp_path, torch_one_thread):
    """quantize -> qat equals onnxpress.finetune of the quantized model (QAT in its own graph) with the step's settings,
    bit for bit, twice; the 4-bit MatMulNBits model keeps its graph."""
    pytest.importorskip("torch")
    from onnxpress.finetune import finetune

    data = tiny_data(tmp_path / "d.npz")
    model = prepare(tiny_mlp())
    quant = {"pass": "quantize", "weights": "int4", "exclude": [], "max_samples": 32}
    qat = {"pass": "qat", "epochs": 2, "lr": 1e-3, "batch_size": 16}
    quantized = apply_recipe(model, {"version": 1, "steps": [quant]}, data, prepared=True)
    tuned = apply_recipe(model, {"version": 1, "steps": [quant, qat]}, data, prepared=True)
    ref = finetune(quantized, model, data, epochs=2, lr=1e-3, distill="mse", seed=0, batch_size=16, hard_weight=0.0,
                   threads=1).model  # fmt: skip
    assert tuned.SerializeToString() == ref.SerializeToString()
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in quantized.graph.node]
    again = apply_recipe(model, {"version": 1, "steps": [quant, qat]}, data, prepared=True)
    assert again.SerializeToString() == tuned.SerializeToString()


@pytest.mark.parametrize(("steps", "message"), [
    ([{"pass": "qat"}], "quantize step before it"),
    ([{"pass": "quantize"}, {"pass": "qat", "distill": "l1"}], "distill must be kl or mse"),
    ([{"pass": "quantize"}, {"pass": "qat", "lr": 0}], "lr must be a finite positive number"),
    ([{"pass": "quantize"}, {"pass": "qat", "lr": math.inf}], r"lr must be a finite positive number, got inf"),
    ([{"pass": "finetune", "temperature": math.inf}], r"temperature must be a finite positive number"),
    ([{"pass": "finetune", "seed": -1}], r"seed must be an integer in 0\.\.2\*\*63-1"),
    ([{"pass": "finetune", "batch_size": 0}], r"batch_size must be an integer >= 1, got 0"),
    ([{"pass": "quantize"}, {"pass": "qat", "batch_size": None}], r"batch_size must be an integer >= 1, got None"),
    ([{"pass": "finetune", "max_samples": 5}], r"max_samples 5 leaves no sample for the 10% validation split"),
    # after a quantize step only qat: the others found no float layer or grew the file, without a word
    ([{"pass": "quantize"}, {"pass": "finetune"}], r"step 2 \(finetune\): a finetune step after a quantize step"),
    ([{"pass": "quantize"}, {"pass": "prune", "ratio": 0.3}], r"a prune step after a quantize step"),
    ([{"pass": "quantize"}, {"pass": "quantize"}], r"step 2 \(quantize\): a quantize step after a quantize step"),
    ([{"pass": "quantize", "weights": "int4", "method": "kl", "bias_correction": False}],
     r"weights 'int4' is weight-only \(activations stay float\), so method='kl', bias_correction=False would not"),
    ([{"pass": "lowrank", "ranks": {"a": 2}, "data_aware": False, "max_samples": 7}],
     r"data_aware false splits by the weights alone, so max_samples=7 would not apply"),
])  # fmt: skip
def test_qat_step_is_checked(steps, message):
    with pytest.raises(OnnxpressError, match=message):
        validate_recipe({"version": 1, "steps": steps})


def test_finetune_batch_size_defaults_to_the_data_rule():
    """A finetune step's batch is null (bridge.train.default_batch_size of the samples) unless given; qat keeps 64."""
    steps = validate_recipe({"version": 1, "steps": [{"pass": "finetune"}, {"pass": "quantize"}, {"pass": "qat"}]})
    assert [s["batch_size"] for s in steps["steps"]] == [None, 64, 64]
    given = validate_recipe({"version": 1, "steps": [{"pass": "finetune", "batch_size": 8}]})
    assert given["steps"][0]["batch_size"] == 8


@pytest.mark.parametrize(("step", "message"), [
    ({"pass": "lowrank", "ranks": {"nonexistent_layer": 4, "relu1": 2, "conv2": 4}},
     r"'nonexistent_layer' \(no Conv/Gemm/MatMul of that name\), 'relu1' \(no Conv/Gemm/MatMul of that name\); "
     r"its splittable layers: conv1, conv2, fc1, fc2; .*another model's recipe"),
    ({"pass": "lowrank", "ranks": {"conv2": 100000, "fc1": 17, "conv1": 8}},
     r"above the layer's full rank .*: 'conv2': 100000 > 16, 'fc1': 17 > 16; give at most"),
    ({"pass": "prune", "ratio": {"nogroup": 0.5, "conv2": 0.5, "fc2": 0.5}},
     r"'nogroup' \(no such group\), 'fc2' \(nothing to prune: reaches graph output logits\); "
     r"its prunable groups: conv1, conv2, fc1 "),
    ({"pass": "quantize", "exclude": ["nolayer", "op:Softmax", "conv1", "re:^nomatch", "re:^fc"]},
     r"exclude \['nolayer', 're:\^nomatch'\] matches no node of this model; its layers: conv1, conv2, fc1, fc2 "),
    ({"pass": "quantize", "exclude": ["re:(("]}, "exclude pattern 're:\\(\\(' is not a valid regular expression"),
])  # fmt: skip
def test_names_the_model_lacks_are_refused(tmp_path, step, message):
    """A recipe written for another model names layers, channel groups or ranks this one lacks: refused, every
    such name listed with a few real ones, instead of a silently unchanged (or partly changed) model."""
    data = tiny_data(tmp_path / "d.npz")
    with pytest.raises(OnnxpressError, match=message):
        apply_recipe(prepare(tiny_cnn()), {"version": 1, "steps": [step]}, data, prepared=True)


def test_names_are_those_of_the_model_at_their_step(tmp_path):
    """Names are checked on the model as the steps before left it: a low-rank factor can be excluded after the
    split only; after a prune step a rank up to the layer's unpruned full rank leaves it whole (the search picks
    ranks on the unpruned model), one above that is refused."""
    data = tiny_data(tmp_path / "d.npz")
    model = prepare(tiny_cnn())
    split = {"pass": "lowrank", "ranks": {"conv2": 8}}
    factor = {"pass": "quantize", "method": "minmax", "exclude": ["conv2_lowrank_conv"], "max_samples": 16}
    built = apply_recipe(model, {"version": 1, "steps": [split, factor]}, data, prepared=True)
    dq_outputs = {o for n in built.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert next(n for n in built.graph.node if n.name == "conv2_lowrank_conv").input[1] not in dq_outputs
    with pytest.raises(OnnxpressError, match=r"exclude \['conv2_lowrank_conv'\] matches no node"):
        apply_recipe(model, {"version": 1, "steps": [factor]}, data, prepared=True)
    prune = {"pass": "prune", "ratio": {"conv2": 0.5}}  # conv2 keeps 8 of 16 outputs: full rank 16 -> 8
    pruned = apply_recipe(model, {"version": 1, "steps": [prune]}, data, prepared=True)
    whole = apply_recipe(model, {"version": 1, "steps": [prune, {"pass": "lowrank", "ranks": {"conv2": 16}}]}, data,
                         prepared=True)
    assert whole.SerializeToString() == pruned.SerializeToString()
    with pytest.raises(OnnxpressError, match=r"before the prune step for a pruned layer\): 'conv2': 17 > 16"):
        apply_recipe(model, {"version": 1, "steps": [prune, {"pass": "lowrank", "ranks": {"conv2": 17}}]}, data,
                     prepared=True)


@pytest.mark.parametrize(("name", "key", "value", "stat"), [
    ("mobilenet", "equalize", "split", "equalize_cross_layer.pairs"),
    ("mobilenet", "equalize", "activations", "equalize_activations.pairs"),
    ("transformer", "smoothquant", 0.5, "smoothquant.smoothed"),
    ("mobilenet", "codebook", 4, "codebook_weights.weights"),
])  # fmt: skip
def test_quantize_step_float_rewrites_are_quantizes(name, key, value, stat):
    """quantize.equalize / smoothquant / codebook (issue 10: optimize --recipe can rebuild them) build the bytes of
    onnxpress.quantize with that argument and the step's other settings; the reference did rewrite something."""
    import onnxpress

    root = Path(__file__).resolve().parent.parent
    model, calib = root / "models" / f"{name}.onnx", str(root / "models" / "digits32_calib.npz")
    ref = onnxpress.quantize(model, calib=calib, max_samples=32, int8_method="rtn", **{key: value})
    assert ref.stats[stat] > 0
    recipe = load_recipe({"version": 1, "steps": [{"pass": "quantize", key: value, "max_samples": 32}]})
    assert apply_recipe(model, recipe, calib).SerializeToString() == ref.model.SerializeToString()


def test_an_error_inside_a_step_names_the_step(tmp_path):
    """A step that fails on the data (too few samples for its validation split) says which step it was."""
    pytest.importorskip("torch")
    from onnxpress.errors import DataError

    data = tiny_data(tmp_path / "d.npz", n=4)
    with pytest.raises(DataError, match=r"^recipe step 2 \(finetune\): the training data holds 4 sample\(s\); a "
                                        r"finetune step holds 10% out .* needs at least 6: give more samples"):
        apply_recipe(tiny_cnn(), {"version": 1, "steps": [{"pass": "cleanup"}, {"pass": "finetune", "epochs": 1}]},
                     data)
