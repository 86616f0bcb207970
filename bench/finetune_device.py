"""Where the fine-tune bridge trains: CPU (1 thread, all threads) vs a CUDA GPU, same student, same seed.

``onnxpress.finetune(..., device="cuda")`` runs the converted student on the GPU; the teacher, the
export and the checks stay on onnxruntime (CPU). This prints, per model and device, the training time
per epoch, its ratio to the 1-thread CPU run, and what the written model scores on the digits test
split (accuracy, top-1 agreement and logit SQNR against the teacher), so a user can see both the speed
and that the GPU run lands where the CPU run lands.

Students: each reference model with ``--prune`` of its channels removed by ``onnxpress.prune``
(global, smallest L2 norms). The ``lstm`` model, whose recurrent layer pruning skips, gets noise of 0.3
on its LSTM input weights instead; the bridge unrolls its LSTM over the 32 time steps. Each student is
distilled from the original on the 500 calibration digits (soft targets only, ``--epochs`` epochs,
batch 64, every epoch run, the best validation epoch kept). ``wide`` is a synthetic 7-layer CNN on
3×64×64 inputs (64-256 channels, 0.61 GMAC per sample, random weights and inputs, the model itself as
teacher) standing in for a real-size network: on the 32×32 reference CNNs one step is a few
milliseconds of work and the interpreter's per-op Python cost decides.

    python bench/finetune_device.py [--models resnet,mobilenet,concat,transformer,lstm,wide] [--epochs 8]
        [--wide-epochs 2] [--devices cpu1,cpu,cuda] [--wide-samples 512] [--prune 0.1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def wide_cnn(seed: int = 0) -> onnx.ModelProto:
    """A 3×64×64 → 10 CNN: six 3×3 convs (64, 64, 128, 128, 256, 256 channels, stride 2 at 3 and 5) + pool + Gemm."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, c_in = "input", 3
    for i, (c_out, stride) in enumerate([(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)]):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(c_out, np.float32), f"b{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1],
                             strides=[stride, stride], kernel_shape=[3, 3]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]  # fmt: skip
        prev, c_in = f"r{i}", c_out
    fc = (rng.standard_normal((10, c_in)) * np.sqrt(1.0 / c_in)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # older runtimes load it


def _perturbed(model: onnx.ModelProto, name: str, scale: float = 0.3) -> onnx.ModelProto:
    """``model`` with Gaussian noise (``scale``) added to initializer ``name`` (channel pruning skips LSTMs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = next(i for i in out.graph.initializer if i.name == name)
    arr = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).standard_normal(arr.shape).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(arr + scale * noise, name))
    return out


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from onnxpress.runtime import make_session

    s = make_session(model, what="bench")
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def _devices(spec: str) -> list[tuple[str, str, int | None]]:
    """``cpu1,cpu,cuda`` → (label, torch device, threads) rows."""
    import torch

    out = []
    for item in spec.split(","):
        if item == "cpu1":
            out.append(("cpu, 1 thread", "cpu", 1))
        elif item == "cpu":
            n = os.cpu_count() or 1
            out.append((f"cpu, {n} threads", "cpu", n))
        elif item == "cuda":
            if torch.cuda.is_available():
                out.append((f"cuda ({torch.cuda.get_device_name(0)})", "cuda", None))
            else:
                print("cuda: torch sees no CUDA device; row skipped")
        else:
            raise SystemExit(f"unknown device {item!r}; use cpu1, cpu, cuda")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenet,concat,transformer,lstm,wide")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--wide-epochs", type=int, default=2)
    parser.add_argument("--prune", type=float, default=0.1, help="global channel ratio pruned from the teacher")
    parser.add_argument("--devices", default="cpu1,cpu,cuda")
    parser.add_argument("--wide-samples", type=int, default=512)
    args = parser.parse_args()

    import torch

    import onnxpress
    from onnxpress.finetune import sqnr_db
    from onnxpress.reporting import format_table

    digits = np.load(ROOT / "models" / "digits32.npz")
    rows = []
    print(
        f"torch {torch.__version__}, onnxruntime on CPU for the teacher and checks; epochs {args.epochs} "
        f"(wide: {args.wide_epochs})"
    )
    for name in args.models.split(","):
        if name == "wide":
            teacher = wide_cnn()
            rng = np.random.default_rng(1)
            train = rng.standard_normal((args.wide_samples, 3, 64, 64)).astype(np.float32)
            test, labels = rng.standard_normal((256, 3, 64, 64)).astype(np.float32), None
        else:
            teacher = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
            train, test, labels = digits["calib_input"], digits["test_input"], digits["test_labels"]
        in_name = teacher.graph.input[0].name
        student = _perturbed(teacher, "lstm.weight_ih_l0") if name == "lstm" else onnxpress.prune(
            teacher, ratio=args.prune).model  # fmt: skip
        z_teacher = _logits(teacher, test)
        base = None
        epochs = args.wide_epochs if name == "wide" else args.epochs
        for label, device, threads in _devices(args.devices):
            start = time.perf_counter()
            res = onnxpress.finetune(
                student, teacher, {in_name: train}, epochs=epochs, batch_size=64, hard_weight=0.0,
                val_fraction=0.1, patience=epochs, seed=0, exporter="writeback", threads=threads, device=device,
            )  # fmt: skip
            wall = time.perf_counter() - start
            per_epoch = res.history.train_seconds / max(1, len(res.history.train_loss))
            base = base or per_epoch
            z = _logits(res.model, test)
            acc = "-" if labels is None else f"{np.mean(z.argmax(1) == labels):.4f}"
            rows.append([
                name, label, f"{per_epoch:.2f}", f"{per_epoch / base:.3f}", f"{wall:.1f}", acc,
                f"{np.mean(z.argmax(1) == z_teacher.argmax(1)):.4f}", f"{sqnr_db(z_teacher, z):.2f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(format_table(
        ["model", "device", "train s/epoch", "vs cpu 1 thr", "finetune wall s", "test acc", "top-1 agr", "SQNR dB"],
        rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
