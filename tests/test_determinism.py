"""Determinism: the same model, data and options give byte-identical files — across runs, across
calibration batch sizes, across sample order and data forms, and across processes with different
hash seeds (set/dict iteration order).

Measured on the reference models too (resnet, mobilenet, transformer: quantize with mse/kl/
percentile/minmax, prune ``act``, lowrank ``--flops 0.6 --calib``): identical everywhere. Why it holds:
histograms use fixed power-of-two bin edges and integer counts (merging batches is an exact sum, so
neither batch size nor order matters), ranges come from those counts, and moments/means are
accumulated in float64 before the float32 weights are written.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxpress
from onnxpress.model_io import save_model
from tests import graphs
from tests.test_hostile import two_convs

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def setup(tmp_path):
    """X[N,4,8,8] -> Conv -> BN -> Relu -> Conv -> Y, and 100 samples in calib.npz."""
    model = tmp_path / "model.onnx"
    save_model(two_convs(c_in=4), model)  # 4 channels: a 3-channel input conv stays float (a speed rule)
    x = graphs.rng(7).standard_normal((100, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=x)
    return tmp_path, model, x


@pytest.mark.parametrize("method", ["mse", "kl", "minmax", "percentile"])
def test_quantize_is_byte_identical_across_runs_and_batch_sizes(setup, method):
    tmp, model, _ = setup
    digests = set()
    for k, batch in enumerate((16, 64, 64, 7)):
        out = tmp / f"q{k}.onnx"
        onnxpress.quantize(model, out, calib=tmp / "calib.npz", method=method, batch_size=batch)
        digests.add(_sha(out))
    assert len(digests) == 1


def test_quantize_ignores_sample_order_and_data_form(setup):
    tmp, model, x = setup
    perm = graphs.rng(1).permutation(len(x))
    np.savez(tmp / "shuffled.npz", X=x[perm])
    sources = [tmp / "calib.npz", tmp / "shuffled.npz", [{"X": x[i : i + 9]} for i in range(0, len(x), 9)]]
    digests = set()
    for k, source in enumerate(sources):
        out = tmp / f"q{k}.onnx"
        onnxpress.quantize(model, out, calib=source, method="kl")
        digests.add(_sha(out))
    assert len(digests) == 1
    onnxpress.quantize(model, tmp / "other.onnx", calib=[{"X": 2 * x}], method="kl")  # the check has teeth
    assert _sha(tmp / "other.onnx") not in digests


def test_calibration_table_is_byte_identical_across_batch_sizes(setup):
    tmp, model, _ = setup
    paths = [onnxpress.calibrate(model, tmp / "calib.npz", batch_size=b).save(tmp / f"t{b}.npz") for b in (16, 64)]
    assert _sha(paths[0]) == _sha(paths[1])


def test_prune_and_lowrank_are_byte_identical_across_batch_sizes(setup):
    tmp, model, _ = setup
    for name, run in {
        "prune": lambda out, b: onnxpress.prune(model, out, ratio=0.5, criterion="act", calib=tmp / "calib.npz",
                                                compensate=True, batch_size=b),
        "lowrank": lambda out, b: onnxpress.lowrank(model, out, energy=0.8, calib=tmp / "calib.npz", batch_size=b),
    }.items():
        digests = set()
        for k, batch in enumerate((16, 64, 64)):
            run(tmp / f"{name}{k}.onnx", batch)
            digests.add(_sha(tmp / f"{name}{k}.onnx"))
        assert len(digests) == 1, name


def test_cli_is_byte_identical_across_hash_seeds(setup):
    """Two processes with different PYTHONHASHSEED: set/dict-order dependence would show here."""
    tmp, model, _ = setup
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        for cmd in (["quantize", str(model), "-o", str(tmp / f"q{seed}.onnx"), "--calib", str(tmp / "calib.npz")],
                    ["prune", str(model), "-o", str(tmp / f"p{seed}.onnx"), "--ratio", "0.5"]):
            done = subprocess.run([sys.executable, "-m", "onnxpress", *cmd, "-q"], env=env, cwd=tmp,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
        outs.append((_sha(tmp / f"q{seed}.onnx"), _sha(tmp / f"p{seed}.onnx")))
    assert outs[0] == outs[1]


@pytest.mark.skipif(not (MODELS / "resnet.onnx").exists(), reason="reference models not built")
@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_reference_model_quantize_is_byte_identical_across_batch_sizes(tmp_path, name):
    x = np.load(MODELS / "digits32_calib.npz")["input"][:96]
    np.savez(tmp_path / "calib.npz", input=x)
    digests = set()
    for batch in (16, 64):
        out = tmp_path / f"q{batch}.onnx"
        onnxpress.quantize(MODELS / f"{name}.onnx", out, calib=tmp_path / "calib.npz", batch_size=batch)
        digests.add(_sha(out))
    assert len(digests) == 1
