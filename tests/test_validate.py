"""validate(): every figure checked against numpy on the same onnxruntime outputs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxpress.api import cleanup
from onnxpress.errors import DataError, OutputError, ValidationError
from onnxpress.model_io import save_model
from onnxpress.runtime import time_interleaved
from onnxpress.validate import model_size, validate
from tests import graphs

MODELS = Path(__file__).resolve().parent.parent / "models"


def _x(n: int, k: int = 8, seed: int = 1) -> np.ndarray:
    return graphs.rng(seed).standard_normal((n, k)).astype(np.float32)


def perturbed(model: onnx.ModelProto, scale: float, seed: int = 5) -> onnx.ModelProto:
    """The same graph with noise of std ``scale`` added to every float initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    r = graphs.rng(seed)
    for i, init in enumerate(out.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype.kind != "f":
            continue
        out.graph.initializer[i].CopyFrom(
            numpy_helper.from_array((w + scale * r.standard_normal(w.shape)).astype(w.dtype), init.name)
        )
    return out


def two_outputs() -> onnx.ModelProto:
    """X[N,8] -> Gemm(W[8,6]) -> Y[N,6] (classifier); Y -> Unsqueeze(2) -> Z[N,6,1] (not a classifier)."""
    r = graphs.rng(0)
    nodes = [
        helper.make_node("Gemm", ["X", "W"], ["Y"]),
        helper.make_node("Unsqueeze", ["Y", "axes"], ["Z"]),
    ]
    inits = {"W": r.standard_normal((8, 6)).astype(np.float32), "axes": np.array([2], np.int64)}
    return graphs.make_model(nodes, [("X", ["N", 8])], [("Y", ["N", 6]), ("Z", ["N", 6, 1])], inits)


def test_identical_models_give_zero_error_and_full_agreement(tmp_path):
    model = graphs.gemm()
    labels = np.arange(100) % 6
    np.savez(tmp_path / "d.npz", X=_x(100), labels=labels)
    report = validate(model, model, tmp_path / "d.npz", repeats=3)
    (out,) = report.outputs
    assert out.max_abs_error == 0.0 and out.sqnr_db == math.inf and out.cosine == pytest.approx(1.0, abs=1e-12)
    assert out.top1_agreement == 1.0
    assert out.reference_accuracy == out.candidate_accuracy  # labels were picked up from the npz
    assert report.samples == 100 and report.size_ratio == 1.0
    record = json.loads(report.to_json())
    assert record["outputs"][0]["sqnr_db"] == "inf"


def test_figures_match_numpy_on_a_perturbed_candidate(tmp_path):
    ref, cand = two_outputs(), perturbed(two_outputs(), 0.05)
    x = _x(150)
    labels = graphs.rng(3).integers(0, 6, 150)
    report = validate(ref, cand, [{"X": x[:70]}, {"X": x[70:]}], labels=labels, batch_size=32, latency=False)
    r_all, c_all = graphs.run(ref, {"X": x}, optimize=True), graphs.run(cand, {"X": x}, optimize=True)
    for name, r, c in zip(["Y", "Z"], r_all, c_all, strict=True):
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        got = report.output(name)
        assert got.max_abs_error == pytest.approx(np.abs(r64 - c64).max(), rel=1e-5)
        assert got.sqnr_db == pytest.approx(10 * np.log10((r64**2).sum() / ((r64 - c64) ** 2).sum()), abs=1e-4)
        cosine = (r64 * c64).sum() / np.sqrt((r64**2).sum() * (c64**2).sum())
        assert got.cosine == pytest.approx(cosine, abs=1e-7)
    y = report.output("Y")
    assert y.top1_agreement == pytest.approx(np.mean(r_all[0].argmax(1) == c_all[0].argmax(1)))
    assert y.reference_accuracy == pytest.approx(np.mean(r_all[0].argmax(1) == labels))
    assert y.candidate_accuracy == pytest.approx(np.mean(c_all[0].argmax(1) == labels))
    assert 0.5 < y.top1_agreement < 1.0  # the perturbation is visible but not total
    assert report.output("Z").top1_agreement is None  # 3-D output: not a classifier
    assert report.samples == 150 and report.reference_latency is None


def test_bn_folded_candidate_is_within_1e_5():
    model = graphs.conv_bn_relu()
    x = graphs.rng(2).standard_normal((20, 3, 8, 8)).astype(np.float32)
    report = validate(model, cleanup(model).model, [{"X": x}], repeats=2)
    assert report.outputs[0].max_abs_error <= 1e-5
    assert report.reference_ops == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert report.candidate_ops == {"Conv": 1, "Relu": 1}


def test_latency_fields_and_ratio():
    report = validate(graphs.gemm(), graphs.gemm(), [{"X": _x(10)}], batch_size=4, repeats=5, threads=1)
    ref, cand = report.reference_latency, report.candidate_latency
    assert report.latency_batch == 4 and report.repeats == 5 and report.threads == 1
    assert 0 < ref.median_ms <= ref.p90_ms and 0 < cand.median_ms <= cand.p90_ms
    assert report.latency_ratio == pytest.approx(cand.median_ms / ref.median_ms)
    assert "latency median ms" in report.format()


def test_timing_alternates_sessions_and_excludes_warmup():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, names, feed):
            calls.append(self.name)

    a, b = Fake("a"), Fake("b")
    times = time_interleaved([a, b], {"X": _x(1)}, 4, warmup=3)  # validate warms up 3 times
    assert [len(t) for t in times] == [4, 4]
    warm, timed = calls[:-8], calls[-8:]
    assert warm == ["a"] * 3 + ["b"] * 3
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_file_size_counts_external_data(tmp_path):
    model = graphs.gemm(k=64, n=64)
    path = save_model(model, tmp_path / "ext.onnx", external_data=True)
    on_disk = path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert model_size(path) == on_disk and on_disk > 64 * 64 * 4
    assert model_size(model) == model.ByteSize()
    report = validate(model, path, [{"X": _x(3, 64)}], latency=False)
    assert report.candidate_bytes == on_disk and report.size_ratio == pytest.approx(on_disk / model.ByteSize())
    assert report.outputs[0].max_abs_error == 0.0


def test_candidate_missing_an_output_is_named():
    cand = two_outputs()
    del cand.graph.output[1]
    with pytest.raises(ValidationError, match=r"the candidate has no output 'Z' \(it has \['Y'\]\)"):
        validate(two_outputs(), cand, [{"X": _x(2)}])


def test_candidate_with_other_inputs_or_output_shape():
    other = graphs.make_model([helper.make_node("Relu", ["A"], ["Y"])], [("A", ["N", 6])], [("Y", ["N", 6])])
    with pytest.raises(ValidationError, match=r"inputs \['A'\] differ from the reference's \['X'\]"):
        validate(graphs.gemm(), other, [{"X": _x(2)}])
    wide = graphs.gemm(n=7)
    wide.graph.output[0].CopyFrom(helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["batch", 7]))
    with pytest.raises(ValidationError, match=r"output 'Y': the candidate gives shape \[2, 7\], the reference \[2, 6"):
        validate(graphs.gemm(), wide, [{"X": _x(2)}], latency=False)


def test_labels_must_match_the_samples(tmp_path):
    with pytest.raises(DataError, match="labels hold 5 entries but the data has 8 samples"):
        validate(graphs.gemm(), graphs.gemm(), [{"X": _x(8)}], labels=np.zeros(5, np.int64), latency=False)
    with pytest.raises(DataError, match=r"class indices in 0..5"):
        validate(graphs.gemm(), graphs.gemm(), [{"X": _x(2)}], labels=np.array([0, 6]), latency=False)


def test_json_is_written_atomically_and_is_strict(tmp_path):
    report = validate(graphs.gemm(), graphs.gemm(), [{"X": _x(4)}], latency=False)
    out = report.write_json(tmp_path / "r.json")
    assert json.loads(out.read_text()) == report.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(OutputError, match="does not exist"):
        report.write_json(tmp_path / "missing" / "r.json")


def test_require_names_the_output_and_how_far_off():
    report = validate(two_outputs(), perturbed(two_outputs(), 0.05), [{"X": _x(50)}], latency=False)
    report.require(max_abs_error=10.0, min_sqnr_db=0.0)
    with pytest.raises(ValidationError, match=r"output 'Y': max abs error [0-9.e-]+ exceeds the allowed 1e-06"):
        report.require(max_abs_error=1e-6)
    with pytest.raises(ValidationError, match=r"output 'Y': SQNR [0-9.]+ dB is below the required 200 dB"):
        report.require(min_sqnr_db=200)
    with pytest.raises(ValidationError, match=r"output 'Y': top-1 agreement"):
        report.require(min_agreement=1.0)


def test_forced_external_data_with_only_small_tensors_saves_inline(tmp_path):
    """save_model(external_data=True) on a model whose tensors are all under the threshold: no .data file."""
    path = save_model(graphs.gemm(), tmp_path / "small.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]
    assert model_size(path) == path.stat().st_size


def unfold_batchnorm(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Put a BatchNormalization back after every Conv without changing the function.

    Conv(x; W, b) = BN(Conv(x; W/s, (b - beta)/s + mean)) with s = gamma / sqrt(var + eps) per
    output channel, for random gamma, beta, mean, var: what an export that kept BN looks like.
    """
    r = graphs.rng(seed)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    new_nodes, new_inits, eps = [], [], 1e-5
    for node in model.graph.node:
        new_nodes.append(node)
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        b = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32)
        c = w.shape[0]
        gamma, beta = r.uniform(0.5, 2.0, c), r.standard_normal(c)
        mean, var = r.standard_normal(c), r.uniform(0.5, 2.0, c)
        s = gamma / np.sqrt(var + eps)
        tag = node.output[0]
        arrays = {
            f"{tag}.w": (w / s[:, None, None, None]).astype(np.float32),
            f"{tag}.b": ((b - beta) / s + mean).astype(np.float32),
            f"{tag}.gamma": gamma.astype(np.float32),
            f"{tag}.beta": beta.astype(np.float32),
            f"{tag}.mean": mean.astype(np.float32),
            f"{tag}.var": var.astype(np.float32),
        }
        new_inits += [numpy_helper.from_array(v, k) for k, v in arrays.items()]
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        del conv.input[:]
        conv.input.extend([node.input[0], f"{tag}.w", f"{tag}.b"])
        conv.output[0] = f"{tag}.pre_bn"
        new_nodes[-1] = conv
        bn_in = [conv.output[0], *list(arrays)[2:]]
        new_nodes.append(helper.make_node("BatchNormalization", bn_in, [tag], epsilon=eps, name=f"{tag}.bn"))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    used = {name for n in new_nodes for name in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    return out


@pytest.mark.skipif(not (MODELS / "resnet.onnx").is_file(), reason="reference models not built yet")
def test_bn_fold_on_the_reference_resnet_is_within_1e_5():
    """resnet.onnx comes with BN folded by the exporter; put BN back, then cleanup must fold it exactly."""
    with_bn = unfold_batchnorm(onnx.load(str(MODELS / "resnet.onnx")))
    folded = cleanup(with_bn)
    assert folded.stats["fold_batchnorm.folded"] == 9
    report = validate(with_bn, folded.model, MODELS / "digits32_test.npz", max_samples=128, latency=False)
    (logits,) = report.outputs
    assert logits.max_abs_error <= 1e-5 and logits.top1_agreement == 1.0
    assert report.reference_ops["BatchNormalization"] == 9 and "BatchNormalization" not in report.candidate_ops


def _chain() -> onnx.ModelProto:
    """X[N,8] -> Gemm(W1) -> Relu -> a -> Gemm(W2) -> b -> Relu -> c -> Gemm(W3) -> Y."""
    r = graphs.rng(21)
    nodes = [helper.make_node("Gemm", ["X", "W1"], ["g1"], name="fc1"), helper.make_node("Relu", ["g1"], ["a"]),
             helper.make_node("Gemm", ["a", "W2"], ["b"], name="fc2"), helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("Gemm", ["c", "W3"], ["Y"], name="fc3")]
    inits = {k: r.standard_normal(s).astype(np.float32) / 3 for k, s in (("W1", (8, 16)), ("W2", (16, 16)),
                                                                          ("W3", (16, 4)))}
    return graphs.make_model(nodes, [("X", ["N", 8])], [("Y", ["N", 4])], inits)


def test_layers_find_the_one_changed_layer(tmp_path):
    """Only fc2's weight is perturbed: tensors before it are exact, and fc2's output is where the noise enters."""
    model = _chain()
    cand = onnx.ModelProto()
    cand.CopyFrom(model)
    for i, init in enumerate(cand.graph.initializer):
        if init.name == "W2":
            w = numpy_helper.to_array(init)
            cand.graph.initializer[i].CopyFrom(numpy_helper.from_array(w + 0.01 * graphs.rng(3).standard_normal(w.shape)
                                                                       .astype(np.float32), "W2"))
    report = validate(model, cand, [{"X": _x(40)}], latency=False, layers=True, layer_samples=32)
    assert report.layer_samples == 32 and report.layers_skipped == 0
    by_name = {t.name: t for t in report.layers}
    assert list(by_name) == ["g1", "a", "b", "c"]  # graph order; Y is an output (compared above)
    assert by_name["g1"].sqnr_db == by_name["a"].sqnr_db == math.inf and by_name["a"].added_db == math.inf
    assert math.isfinite(by_name["b"].sqnr_db) and by_name["b"].op == "Gemm"
    assert min(report.layers, key=lambda t: t.added_db).name == "b"  # noise enters at fc2
    assert by_name["b"].added_db == pytest.approx(by_name["b"].sqnr_db)  # its input was exact
    text = report.format()  # g1 and a add no noise (exact): not listed among those that add the most
    assert "the 2 that add the most noise" in text and "\ng1 " not in text and "\na " not in text
    assert report.to_dict()["layers"][2]["name"] == "b"
    same = validate(model, model, [{"X": _x(8)}], latency=False, layers=True)
    assert all(t.sqnr_db == math.inf and t.added_db == math.inf for t in same.layers)
    assert "4 tensors compared; no node adds noise" in same.format()
    png = report.plot_layers(tmp_path / "layers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["layers.png"]
    with pytest.raises(ValidationError, match="layers=True"):
        validate(model, model, [{"X": _x(8)}], latency=False).plot_layers(tmp_path / "none.png")


def test_layers_leave_out_tensors_whose_shapes_differ(tmp_path, capsys):
    """A pruned candidate: every hidden tensor has fewer channels there, so all four are left out (counted)."""
    from onnxpress.cli import main
    from onnxpress.prune import prune

    model = _chain()
    src, pruned = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, src)
    prune(model, pruned, ratio=0.25, scope="layer")
    np.savez(tmp_path / "d.npz", X=_x(16))
    assert main(["validate", str(src), str(pruned), "--data", str(tmp_path / "d.npz"), "--no-latency", "--layers",
                 "--layer-samples", "8", "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "per tensor, first 8 samples: 0 tensors compared; 4 left out (shapes differ)" in out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["layers_skipped"] == 4 and record["layers"] == []
    assert main(["validate", str(src), str(pruned), "--data", str(tmp_path / "d.npz"), "--plot", "p.png"]) == 2
    assert "--plot draws the per-tensor comparison: add --layers" in capsys.readouterr().err
    # --layers given and nothing comparable: a warning after the report (the gates still run), no PNG
    assert main(["validate", str(src), str(pruned), "--data", str(tmp_path / "d.npz"), "--no-latency", "--layers",
                 "--plot", str(tmp_path / "p.png")]) == 0
    assert ("warning: no " + str(tmp_path / "p.png") + " written: the 4 tensors both models have differ in shape"
            in capsys.readouterr().out) and not (tmp_path / "p.png").exists()


def test_layers_compare_masked_tensors_where_both_are_finite():
    """An attention-style -inf mask: the masked tensor is exact (inf dB) instead of NaN; the change is found."""
    r = graphs.rng(4)
    mask = np.where(np.arange(8) < 6, 0.0, -np.inf).astype(np.float32)
    nodes = [helper.make_node("Add", ["X", "M"], ["masked"]), helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "W"], ["Y"])]
    w = r.standard_normal((8, 4)).astype(np.float32)
    model = graphs.make_model(nodes, [("X", ["N", 8])], [("Y", ["N", 4])], {"M": mask, "W": w})
    cand = graphs.make_model(nodes, [("X", ["N", 8])], [("Y", ["N", 4])], {"M": mask, "W": w * 1.01})
    report = validate(model, cand, [{"X": _x(16)}], latency=False, layers=True)
    by_name = {t.name: t for t in report.layers}
    assert by_name["masked"].sqnr_db == math.inf and by_name["p"].sqnr_db == math.inf
    assert not any(math.isnan(t.sqnr_db) or math.isnan(t.added_db) for t in report.layers)


def test_layers_carry_noise_through_tensors_the_candidate_lacks():
    """The candidate's Relu output has another name (as when a kernel absorbs it): fc2 inherits fc1's noise
    through it instead of being charged with all of it."""
    model = _chain()
    cand = onnx.ModelProto()
    cand.CopyFrom(model)
    for node in cand.graph.node:
        node.input[:] = ["a_renamed" if i == "a" else i for i in node.input]
        node.output[:] = ["a_renamed" if o == "a" else o for o in node.output]
    for i, init in enumerate(cand.graph.initializer):
        if init.name == "W1":
            w = numpy_helper.to_array(init)
            cand.graph.initializer[i].CopyFrom(numpy_helper.from_array(w * 1.01, "W1"))
    report = validate(model, cand, [{"X": _x(32)}], latency=False, layers=True)
    by_name = {t.name: t for t in report.layers}
    assert set(by_name) == {"g1", "b", "c"}  # "a" is not in the candidate
    assert math.isfinite(by_name["g1"].added_db) and by_name["g1"].added_db == pytest.approx(by_name["g1"].sqnr_db)
    assert by_name["b"].added_db > by_name["b"].sqnr_db + 10  # fc2 itself is exact: little or nothing added there


def _sqrt_twice(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """``model`` with ``tensor`` rebuilt as sqrt(t) * sqrt(t): equal where t >= 0, NaN where t < 0."""
    cand = onnx.ModelProto()
    cand.CopyFrom(model)
    nodes = list(cand.graph.node)
    at = next(i for i, n in enumerate(nodes) if tensor in n.output)
    nodes[at].output[:] = [f"{tensor}_raw" if o == tensor else o for o in nodes[at].output]
    nodes[at + 1:at + 1] = [helper.make_node("Sqrt", [f"{tensor}_raw"], [f"{tensor}_root"]),
                            helper.make_node("Mul", [f"{tensor}_root", f"{tensor}_root"], [tensor])]
    del cand.graph.node[:]
    cand.graph.node.extend(nodes)
    return cand


def test_a_candidate_that_outputs_nan_fails_every_gate_and_is_named():
    """Python's max dropped NaN: max abs err read 0 and --max-abs-error passed a broken model."""
    model = graphs.gemm()
    cand = _sqrt_twice(model, "Y")
    report = validate(model, cand, [{"X": _x(40)}], latency=False)
    (out,) = report.outputs
    assert math.isnan(out.max_abs_error) and out.sqnr_db == -math.inf and out.nonfinite > 0
    assert f"candidate output 'Y' holds {out.nonfinite} NaN/inf value(s) where the reference's are finite" in (
        report.format())
    with pytest.raises(ValidationError, match=r"max abs error nan exceeds the allowed 0\.001"):
        report.require(max_abs_error=1e-3)
    with pytest.raises(ValidationError, match=r"SQNR -inf dB is below"):
        report.require(min_sqnr_db=0)


def test_layers_charge_a_tensor_that_turns_nan_in_the_candidate():
    """Values finite in the reference and NaN in the candidate were left out, so the tensor read as exact."""
    model = _chain()
    report = validate(model, _sqrt_twice(model, "b"), [{"X": _x(40)}], latency=False, layers=True)
    by_name = {t.name: t for t in report.layers}
    assert by_name["a"].sqnr_db == math.inf  # before the change: exact
    assert by_name["b"].sqnr_db == -math.inf and by_name["b"].added_db == -math.inf and math.isnan(
        by_name["b"].max_abs_error)
    assert min(report.layers, key=lambda t: t.added_db).name == "b"  # where it goes wrong
    assert by_name["c"].added_db == math.inf  # after it: nothing more to measure, no NaN in the table


def test_min_agreement_without_a_classifier_output_is_refused():
    model = graphs.make_model([helper.make_node("Unsqueeze", ["X", "axes"], ["Z"])], [("X", ["N", 8])],
                              [("Z", ["N", 8, 1])], {"axes": np.array([2], np.int64)})
    report = validate(model, model, [{"X": _x(4)}], latency=False)
    with pytest.raises(ValidationError, match=r"no output is a classifier's .*'Z'.* drop min_agreement"):
        report.require(min_agreement=0.99)


def test_labels_are_checked_against_all_the_data_and_read_from_a_folder(tmp_path):
    np.savez(tmp_path / "d.npz", X=_x(30))
    with pytest.raises(DataError, match="labels hold 60 entries but the data has 30 samples"):  # was taken with a cap
        validate(graphs.gemm(), graphs.gemm(), tmp_path / "d.npz", labels=np.zeros(60, np.int64), max_samples=10,
                 latency=False)
    (tmp_path / "feeds").mkdir()
    for i in range(3):
        np.savez(tmp_path / "feeds" / f"{i}.npz", X=_x(5, seed=i), labels=np.arange(5) % 6)
    (out,) = validate(graphs.gemm(), graphs.gemm(), tmp_path / "feeds", latency=False).outputs
    assert out.reference_accuracy is not None and out.candidate_accuracy == out.reference_accuracy
    np.savez(tmp_path / "feeds" / "3.npz", X=_x(5))
    with pytest.raises(DataError, match=r"3 of the 4 \.npz files in .*feeds hold 'labels'"):
        validate(graphs.gemm(), graphs.gemm(), tmp_path / "feeds", latency=False)


@pytest.mark.parametrize(("extra", "match"), [
    (["--json", "r.json", "--plot", "r.json", "--layers"], r"--json and --plot name the same file"),
    (["--repeats", "5", "--no-latency"], r"--repeats sets the latency runs, which --no-latency skips"),
    (["--layer-samples", "8"], r"--layer-samples sets the per-tensor comparison's samples: add --layers"),
    (["--min-agreement", "99"], r"--min-agreement: expected a fraction in \[0, 1\], got 99"),
    (["--max-abs-error", "nan"], r"--max-abs-error: expected a number in \[0, inf\), got nan"),
    (["--batch", "0"], r"--batch: expected a positive integer"),
])
def test_cli_refuses_gates_and_options_that_could_not_hold_before_any_work(tmp_path, capsys, monkeypatch, extra,
                                                                           match):
    monkeypatch.chdir(tmp_path)
    onnx.save(graphs.gemm(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", X=_x(8))
    from onnxpress.cli import main

    try:
        rc = main(["validate", "m.onnx", "m.onnx", "--data", "d.npz", *extra])
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    assert rc == 2 and re.search(match, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]


def test_fixed_batches_are_named_and_the_batch_shown_is_the_one_that_ran(tmp_path):
    fixed = graphs.make_model([helper.make_node("Gemm", ["X", "W"], ["Y"])], [("X", [1, 8])], [("Y", [1, 6])],
                              {"W": numpy_helper.to_array(graphs.gemm().graph.initializer[0])})
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [1, 8]
    # a fixed-batch candidate: named before any run (onnxruntime's message was cut to its first line)
    with pytest.raises(ValidationError, match=r"input 'X': the candidate fixes axis 0 to 1 where the reference takes "
                                              r"any size .*batch_size=1 \(--batch 1\)"):
        validate(graphs.gemm(), fixed, [{"X": _x(8)}], latency=False)
    assert validate(graphs.gemm(), fixed, [{"X": _x(8)}], latency=False, batch_size=1).samples == 8
    # a fixed-batch reference: its feeds go one sample at a time, and the header says so
    np.savez(tmp_path / "d.npz", X=_x(8))
    report = validate(fixed, graphs.gemm(), tmp_path / "d.npz", latency=False, batch_size=32)
    assert report.batch_size == 1 and "8 samples, batch 1," in report.format()


def test_a_fixed_batch_over_max_samples_is_compared_whole_and_said_so():
    """X[100, 8] fixed, --max-samples 30: the first batch runs whole (it cannot be cut) and the header said
    "100 samples" with no word on the limit."""
    model = graphs.gemm()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 100
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 100
    data = [{"X": graphs.rng(2).standard_normal((100, 8)).astype(np.float32)} for _ in range(2)]
    report = validate(model, model, data, max_samples=30, latency=False)
    assert report.samples == 100 and report.max_samples == 30
    assert ("100 samples, batch 100, threads default (over --max-samples 30: the reference's fixed batch of 100 "
            "runs whole)") in report.format()
    plain = validate(model, model, data, latency=False)
    assert plain.samples == 200 and "over --max-samples" not in plain.format()
