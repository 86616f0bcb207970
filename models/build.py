"""Build the reference models: train on digits32, export to ONNX, verify, write the manifest.

Usage (needs the ``torch`` extra: ``pip install -e .[torch]``)::

    python -m models.build                  # everything
    python models/build.py --only resnet    # one model (resnet also rebuilds its variants)

Writes into ``models/`` (or ``--out``): ``<name>.onnx`` for each model, ``resnet_opset11.onnx``,
``resnet_constants.onnx``, ``digits32.npz``, ``digits32_calib.npz``, ``digits32_test.npz`` and
``manifest.json`` (entries of models not rebuilt are kept).

Every export is checked before it is written: ``onnx.checker.check_model(full_check=True)``,
onnxruntime vs torch logits within ``TOLERANCE`` on the whole test split at batch 64 and on a
few samples at batch 1. Training is deterministic (see ``models/train.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``models`` importable as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import onnx
import torch

from models import data as data_mod
from models import export as ex
from models.nets import NETS, count_macs
from models.train import TrainConfig, accuracy, predict, set_determinism, train

log = logging.getLogger("models.build")

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-4
CONFIGS: dict[str, TrainConfig] = {
    "resnet": TrainConfig(epochs=12, lr=3e-3),
    "mobilenet": TrainConfig(epochs=20, lr=3e-3),
    "concat": TrainConfig(epochs=15, lr=3e-3),
    "transformer": TrainConfig(epochs=30, lr=1.5e-3, weight_decay=0.05),
    "lstm": TrainConfig(epochs=20, lr=3e-3),
}


@dataclasses.dataclass
class Built:
    """What one build step produced, for the manifest and the summary table."""

    name: str
    file: str
    params: int
    macs: int
    torch_accuracy: float
    ort_accuracy: float
    max_abs_diff: float
    opset: int
    exporter: str
    sha256: str
    size_kb: float
    train_s: float
    export_s: float

    def manifest_entry(self) -> dict[str, object]:
        """The reproducible fields (no timings) for ``manifest.json``."""
        return {
            "file": self.file,
            "params": self.params,
            "macs": self.macs,
            "torch_accuracy": round(self.torch_accuracy, 6),
            "ort_accuracy": round(self.ort_accuracy, 6),
            "max_abs_diff_vs_torch": float(f"{self.max_abs_diff:.3g}"),
            "opset": self.opset,
            "exporter": self.exporter,
            "sha256": self.sha256,
        }


def _verify_and_save(
    proto: onnx.ModelProto,
    path: str,
    reference: np.ndarray,
    digits: data_mod.Digits32,
    reference_b1: np.ndarray,
) -> tuple[float, float]:
    """Check ``proto``, compare it with torch's logits, save it; return (max diff, ort accuracy)."""
    onnx.checker.check_model(proto, full_check=True)
    sess = ex.session(proto)
    got = ex.ort_logits(sess, digits.test_input, batch_size=64)
    got_b1 = ex.ort_logits(sess, digits.test_input[:8], batch_size=1)
    diff = max(ex.max_abs_diff(got, reference), ex.max_abs_diff(got_b1, reference_b1))
    if diff > TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {diff:.3g} > {TOLERANCE}")
    onnx.save_model(proto, path)
    return diff, accuracy(got, digits.test_labels)


def _describe(
    name: str,
    path: str,
    model: torch.nn.Module,
    macs: int,
    torch_acc: float,
    diff_acc: tuple[float, float],
    exporter: str,
    train_s: float,
    export_s: float,
) -> Built:
    with open(path, "rb") as f:
        blob = f.read()
    proto = onnx.load_from_string(blob)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return Built(
        name=name,
        file=os.path.basename(path),
        params=sum(p.numel() for p in model.parameters()),
        macs=macs,
        torch_accuracy=torch_acc,
        ort_accuracy=diff_acc[1],
        max_abs_diff=diff_acc[0],
        opset=opset,
        exporter=exporter,
        sha256=hashlib.sha256(blob).hexdigest(),
        size_kb=len(blob) / 1024,
        train_s=train_s,
        export_s=export_s,
    )


def build_model(name: str, digits: data_mod.Digits32, out: str) -> list[Built]:
    """Train, export and verify one model (and, for ``resnet``, its two variants)."""
    cfg = CONFIGS[name]
    set_determinism(cfg.seed)
    model = NETS[name]()
    t0 = time.perf_counter()
    train(model, digits, cfg)
    train_s = time.perf_counter() - t0
    reference = predict(model, digits.test_input)
    reference_b1 = predict(model, digits.test_input[:8], batch_size=1)
    torch_acc = accuracy(reference, digits.test_labels)
    example = torch.from_numpy(digits.test_input[:4])
    macs = count_macs(model, example)
    log.info("%s: trained in %.0fs, torch test accuracy %.4f", name, train_s, torch_acc)

    built = []
    t0 = time.perf_counter()
    proto = ex.export_dynamo(model, example)
    export_s = time.perf_counter() - t0
    path = os.path.join(out, f"{name}.onnx")
    res = _verify_and_save(proto, path, reference, digits, reference_b1)
    built.append(_describe(name, path, model, macs, torch_acc, res, "dynamo", train_s, export_s))

    if name == "resnet":
        t0 = time.perf_counter()
        proto11 = ex.export_torchscript(model, example, opset=11)
        export_s = time.perf_counter() - t0
        path = os.path.join(out, "resnet_opset11.onnx")
        res = _verify_and_save(proto11, path, reference, digits, reference_b1)
        built.append(_describe("resnet_opset11", path, model, macs, torch_acc, res, "torchscript", 0.0, export_s))

        t0 = time.perf_counter()
        proto_c = ex.initializers_to_constants(proto)
        export_s = time.perf_counter() - t0
        path = os.path.join(out, "resnet_constants.onnx")
        res = _verify_and_save(proto_c, path, reference, digits, reference_b1)
        built.append(
            _describe(
                "resnet_constants",
                path,
                model,
                macs,
                torch_acc,
                res,
                "dynamo+initializers_to_constants",
                0.0,
                export_s,
            )
        )
    for b in built:
        log.info(
            "%s: %s, %.0f KB, max |ort - torch| %.2g, ort accuracy %.4f",
            b.name,
            b.file,
            b.size_kb,
            b.max_abs_diff,
            b.ort_accuracy,
        )
    return built


def _write_manifest(path: str, built: list[Built], data_paths: dict[str, str]) -> None:
    manifest: dict[str, object] = {}
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
    models = dict(manifest.get("models", {}))  # type: ignore[arg-type]
    for b in built:
        models[b.name] = b.manifest_entry()
    data_files = {}
    for key, p in sorted(data_paths.items()):
        with open(p, "rb") as f:
            data_files[key] = {"file": os.path.basename(p), "sha256": hashlib.sha256(f.read()).hexdigest()}
    manifest = {
        "data": {
            "source": "sklearn.datasets.load_digits",
            "split": f"train_test_split(test_size={data_mod.TEST_FRACTION}, random_state={data_mod.SEED}, stratify=y)",
            "preprocess": f"(bilinear_upsample(x / 16, 32x32, align_corners=False) - {data_mod.MEAN}) / {data_mod.STD}",
            "input": "input: float32 [batch,1,32,32]",
            "output": "logits: float32 [batch,10]",
            "files": data_files,
        },
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ex.ort.__version__,
            "numpy": np.__version__,
        },
        "models": dict(sorted(models.items())),
    }
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(NETS), action="append", help="model(s) to build")
    parser.add_argument("--out", default=HERE, help="output folder (default: models/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)

    digits = data_mod.load_digits32()
    data_paths = data_mod.save_npz(digits, args.out)
    log.info(
        "digits32: %d train, %d calib, %d test",
        len(digits.train_input),
        len(digits.calib_input),
        len(digits.test_input),
    )
    built: list[Built] = []
    for name in args.only or list(NETS):
        built += build_model(name, digits, args.out)
    _write_manifest(os.path.join(args.out, "manifest.json"), built, data_paths)

    print(
        f"\n{'model':<18}{'params':>9}{'MMACs':>8}{'torch acc':>11}{'ort acc':>9}"
        f"{'KB':>7}{'train s':>9}{'export s':>10}"
    )
    for b in built:
        print(
            f"{b.name:<18}{b.params:>9}{b.macs / 1e6:>8.1f}{b.torch_accuracy:>11.4f}"
            f"{b.ort_accuracy:>9.4f}{b.size_kb:>7.0f}{b.train_s:>9.0f}{b.export_s:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
