"""The committed reference models in ``models/``: valid ONNX, dynamic batch, accurate, as recorded.

Needs only onnx, onnxruntime and numpy (no torch): it reads the committed ``*.onnx``,
``digits32_test.npz`` and ``manifest.json`` written by ``python -m models.build``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "models"
NAMES = ("resnet", "mobilenet", "concat", "transformer", "lstm", "resnet_opset11", "resnet_constants")
VARIANTS = ("resnet_opset11", "resnet_constants")
MIN_ACCURACY = 0.95
ACCURACY_SLACK = 0.005  # half a point
VARIANT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def manifest() -> dict:
    """Parsed ``models/manifest.json``."""
    return json.loads((MODELS_DIR / "manifest.json").read_text())


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    """``(input [N,1,32,32] float32, labels [N] int64)`` from ``digits32_test.npz``."""
    with np.load(MODELS_DIR / "digits32_test.npz") as npz:
        return npz["input"], npz["labels"]


def _session(name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODELS_DIR / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])


def _logits(sess: ort.InferenceSession, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [sess.run(["logits"], {"input": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    )


@pytest.fixture(scope="module")
def resnet_logits(test_split: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Logits of ``resnet.onnx`` on the test split."""
    return _logits(_session("resnet"), test_split[0], 64)


def test_data_files_agree() -> None:
    """digits32.npz, digits32_calib.npz and digits32_test.npz hold the same arrays."""
    with (
        np.load(MODELS_DIR / "digits32.npz") as all_,
        np.load(MODELS_DIR / "digits32_calib.npz") as calib,
        np.load(MODELS_DIR / "digits32_test.npz") as test,
    ):
        assert all_["calib_input"].shape == (500, 1, 32, 32)
        assert all_["calib_input"].dtype == np.float32
        assert all_["test_input"].dtype == np.float32
        assert all_["test_labels"].dtype == np.int64
        assert len(all_["test_input"]) == len(all_["test_labels"])
        assert set(np.unique(all_["test_labels"])) == set(range(10))
        np.testing.assert_array_equal(calib["input"], all_["calib_input"])
        np.testing.assert_array_equal(test["input"], all_["test_input"])
        np.testing.assert_array_equal(test["labels"], all_["test_labels"])
        calib_rows = {row.tobytes() for row in all_["calib_input"]}
        assert not any(row.tobytes() in calib_rows for row in all_["test_input"]), (
            "a calibration sample also appears in the test split"
        )


@pytest.mark.parametrize("name", NAMES)
def test_model_valid_and_recorded(name: str, manifest: dict) -> None:
    """The file passes the full checker, has input/logits with a dynamic batch, matches its sha256."""
    path = MODELS_DIR / f"{name}.onnx"
    entry = manifest["models"][name]
    assert entry["file"] == path.name
    blob = path.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == entry["sha256"], "rebuilt without updating manifest"
    model = onnx.load_from_string(blob)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [1, 32, 32]
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == entry["opset"]
    if name == "resnet_constants":
        assert len(model.graph.initializer) == 0
        assert any(n.op_type == "Constant" for n in model.graph.node)


@pytest.mark.parametrize("name", NAMES)
def test_model_accuracy(name: str, manifest: dict, test_split: tuple[np.ndarray, np.ndarray]) -> None:
    """Batch 1 and batch 64 agree; test accuracy >= 0.95 and equals the manifest's within 0.5 pt."""
    x, labels = test_split
    sess = _session(name)
    logits64 = _logits(sess, x, 64)
    assert logits64.shape == (len(x), 10)
    logits1 = _logits(sess, x[:16], 1)
    np.testing.assert_allclose(logits1, logits64[:16], rtol=0, atol=1e-4)
    acc = float((logits64.argmax(axis=1) == labels).mean())
    assert acc >= MIN_ACCURACY
    assert abs(acc - manifest["models"][name]["ort_accuracy"]) <= ACCURACY_SLACK


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_resnet(
    name: str, resnet_logits: np.ndarray, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    """The opset-11 and Constant-node variants compute the same logits as resnet.onnx."""
    got = _logits(_session(name), test_split[0], 64)
    np.testing.assert_allclose(got, resnet_logits, rtol=0, atol=VARIANT_TOLERANCE)


def test_artifacts_small() -> None:
    """All committed artifacts together stay under 15 MB."""
    total = sum(p.stat().st_size for p in MODELS_DIR.iterdir() if p.suffix in (".onnx", ".npz"))
    assert total < 15 * 2**20
