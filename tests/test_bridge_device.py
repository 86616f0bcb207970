"""Where the fine-tune bridge trains: device names, clear refusals, and the CUDA path.

The CUDA tests run only where torch sees a GPU (never in CI); they are the device checks of the
fine-tune bridge: the interpreter on CUDA reproduces onnxruntime, a CUDA fine-tune repeats byte for
byte with its seed, and lands where the CPU run lands up to float rounding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnxpress  # noqa: E402
from onnxpress.bridge.convert import OnnxModule  # noqa: E402
from onnxpress.bridge.train import resolve_device  # noqa: E402
from onnxpress.cli import main  # noqa: E402
from onnxpress.errors import DataError, DeviceError, OnnxpressError  # noqa: E402
from onnxpress.recipe import validate_recipe  # noqa: E402
from tests.graphs import run  # noqa: E402
from tests.test_bridge_graphs import tiny_cnn  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run on a GPU machine)")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


# ----------------------------------------------------------------------------- names and refusals
def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    for bad in ("gpu0", "tpu", "mps"):
        with pytest.raises(DeviceError, match=repr(bad)):
            resolve_device(bad)


@no_cuda
def test_cuda_without_a_gpu_is_a_clear_error(kd_files, tmp_path):
    with pytest.raises(DeviceError, match="sees no CUDA device; train on cpu"):
        resolve_device("cuda:0")
    out = tmp_path / "out.onnx"
    with pytest.raises(DeviceError, match="no CUDA device"):
        onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), out, device="cuda",
                           epochs=1)  # fmt: skip
    assert not out.exists()


@no_cuda
def test_cli_device_refusal_is_one_line(kd_files, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["finetune", str(kd_files["student"]), "--teacher", str(kd_files["teacher"]), "--data",
                 str(kd_files["data"]), "-o", str(out), "--device", "cuda", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and "Traceback" not in err
    assert not out.exists()


@no_cuda
def test_optimize_refuses_a_missing_gpu_before_searching(kd_files, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DeviceError, match="no CUDA device"):
        onnxpress.optimize(kd_files["teacher"], tmp_path / "o.onnx", calib=str(kd_files["data"]), budget="flops=0.5",
                           finetune=True, finetune_device="cuda")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_recipe_device_is_validated_and_defaults_to_cpu():
    step = validate_recipe({"version": 1, "steps": [{"pass": "finetune"}]})["steps"][0]
    assert step["device"] == "cpu"
    gpu = validate_recipe({"version": 1, "steps": [{"pass": "finetune", "device": "cuda:1"}]})["steps"][0]
    assert gpu["device"] == "cuda:1"
    for bad in ("gpu", "cuda:x", 0):
        with pytest.raises(OnnxpressError, match="device must be cpu, cuda, cuda:N or auto"):
            validate_recipe({"version": 1, "steps": [{"pass": "finetune", "device": bad}]})


def test_a_feed_on_another_device_is_named():
    mod = OnnxModule(tiny_cnn())
    with pytest.raises(DataError, match="an input is on meta but the module runs on cpu"):
        mod.evaluate([torch.empty(2, 1, 8, 8, device="meta")], mod.output_names)


def test_training_on_cpu_leaves_the_module_on_cpu(kd_files):
    res = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), epochs=1, batch_size=32,
                             device="cpu", exporter="writeback", val_fraction=0.0)  # fmt: skip
    again = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), epochs=1, batch_size=32,
                               exporter="writeback", val_fraction=0.0)  # fmt: skip
    assert _digest(res.model) == _digest(again.model)  # "cpu" is the default: the same bytes


# ----------------------------------------------------------------------------- CUDA (GPU machines only)
@needs_cuda
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "concat", "transformer"])  # the bridge runs no LSTM
def test_reference_models_on_cuda_match_onnxruntime(name):
    """The interpreter on CUDA: every reference model's outputs equal onnxruntime's within 1e-4."""
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    x = np.random.default_rng(7).standard_normal((5, 1, 32, 32)).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    want = run(model, feeds)[0]
    mod = OnnxModule(model).to("cuda").eval()
    with torch.no_grad(), _no_tf32():
        got = mod(torch.from_numpy(x).cuda())
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), want, atol=1e-4, rtol=0)


class _no_tf32:
    """Full float32 matmuls and convs for a block (TF32 would put 1e-3 errors into a 1e-4 comparison)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


@needs_cuda
def test_cuda_finetune_repeats_and_agrees_with_cpu(kd_files, tmp_path):
    kw = dict(labels=str(kd_files["data"]), epochs=6, lr=3e-3, batch_size=16, seed=0, exporter="writeback")
    gpu = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), tmp_path / "g.onnx",
                             device="cuda", **kw)  # fmt: skip
    gpu2 = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), device="cuda", **kw)
    cpu = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), device="cpu", **kw)
    assert _digest(gpu.model) == _digest(gpu2.model)  # seeded: a CUDA run repeats byte for byte
    assert gpu.export_max_diff <= 1e-4
    m_g, m_c = gpu.metrics, cpu.metrics
    assert m_g["sqnr_db_after"] > m_g["sqnr_db_before"] + 1.0
    assert abs(m_g["sqnr_db_after"] - m_c["sqnr_db_after"]) < 1.0  # the same training up to float rounding
    assert m_g["accuracy_after"] >= m_g["accuracy_before"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "g.onnx", "student.onnx", "teacher.onnx"]


@needs_cuda
def test_cuda_qat_writes_a_valid_qdq_model(kd_files, tmp_path):
    res = onnxpress.finetune(kd_files["student"], kd_files["teacher"], str(kd_files["data"]), tmp_path / "q.onnx",
                             epochs=2, batch_size=16, qat=True, val_fraction=0.0, device="cuda")  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert np.isfinite(res.metrics["sqnr_db_after"])


@needs_cuda
def test_cuda_recipe_finetune_rebuilds_byte_for_byte(kd_files):
    from onnxpress.recipe import apply_recipe

    steps = [{"pass": "prune", "ratio": 0.25}, {"pass": "finetune", "epochs": 2, "device": "cuda"}]
    recipe = {"version": 1, "steps": steps}
    a = apply_recipe(kd_files["teacher"], recipe, str(kd_files["data"]))
    b = apply_recipe(kd_files["teacher"], json.loads(json.dumps(recipe)), str(kd_files["data"]))
    assert _digest(a) == _digest(b)


@needs_cuda
def test_cuda_finetune_of_a_token_model():
    """int64 token ids go to the GPU with the batches; the student's softmax meets the teacher's."""
    from tests.test_finetune import _token_model

    ids = np.random.default_rng(3).integers(0, 50, (128, 6)).astype(np.int64)
    res = onnxpress.finetune(_token_model(0, noise=0.5), _token_model(0), {"ids": ids}, epochs=8, lr=3e-2,
                             batch_size=32, exporter="writeback", device="cuda")  # fmt: skip
    assert res.export_max_diff <= 1e-4
    assert res.metrics["kl_after"] < 0.25 * res.metrics["kl_before"]


@no_cuda
def test_a_recipe_made_on_a_gpu_is_refused_before_its_first_step(kd_files, monkeypatch):
    from onnxpress import recipe as recipe_mod

    steps = [{"pass": "prune", "ratio": 0.25}, {"pass": "finetune", "epochs": 1, "device": "cuda"}]
    monkeypatch.setattr(recipe_mod, "prepare", lambda *a, **k: pytest.fail("the model was prepared first"))
    with pytest.raises(DeviceError, match="no CUDA device"):
        recipe_mod.apply_recipe(kd_files["teacher"], {"version": 1, "steps": steps}, str(kd_files["data"]))
