"""Fine-tune bridge on the reference CNNs: recover a ≤ 50%-MACs student by KD vs hard labels; QAT vs PTQ.

Part 1, per CNN: the teacher is cut to at most ``--macs`` (default 0.5) of its MACs by
``onnxpress.prune`` (global ratio 0.1 of channels by mean |activation| on the calibration set,
multiples of 8, removed channels' means folded into the next biases) followed by
``onnxpress.lowrank`` (data-aware, whole-model MACs budget). The same student is then fine-tuned twice with the same
epochs, data, seed and learning rate:

- hard: cross-entropy on the labels only (no teacher);
- KD: ``λ_hard·CE + λ_soft·T²·KL(teacher ‖ student)`` with the teacher's cached logits.

For each we print top-1 accuracy on the digits test split and the logit SQNR against the teacher
(both on onnxruntime, from the written ONNX models), and the wall and CPU time of the fine-tune run
(CPU time of all threads of this process; wall time grows with whatever else shares the cores).
The teacher's forward is timed on onnxruntime and as the converted torch module, interleaved;
the ratio is of the medians.

Part 2, on the depthwise CNN (mobilenet): int8 PTQ (``InsertQDQ`` from a KL calibration table) vs
QAT (the same QDQ graph, scales initialised from the same table and learned with LSQ, weights
fine-tuned by KD from the float model). SQNR vs the float model and accuracy on the test split
are measured on onnxruntime with all optimisations, and the integer kernels it fused are counted.

Fine-tune data: the digits *training* split (the teacher's own training data, with labels, rebuilt
by ``models.data.load_digits32``); ``--train calib`` uses only the 500 calibration samples.

Run:  python bench/finetune.py [--models models] [--names resnet mobilenet concat] [--epochs 8]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent


def _logits(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([session.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _macs(model: onnx.ModelProto) -> int:
    from onnxpress.passes.flops import count_macs

    return sum(count_macs(model).values())


def compress(teacher: onnx.ModelProto, calib: np.ndarray, target: float, prune_ratio: float) -> onnx.ModelProto:
    """Prune channels (activation criterion, removed means folded into biases), then split low-rank
    (data-aware) to reach ``target`` of the teacher's MACs."""
    import onnxpress

    base = _macs(teacher)
    pruned = onnxpress.prune(teacher, ratio=prune_ratio, criterion="act", multiple=8, calib=[{"input": calib}],
                             compensate=True).model  # fmt: skip
    ratio = _macs(pruned) / base
    if ratio <= target:
        return pruned
    split = onnxpress.lowrank(pruned, flops=min(1.0, target / ratio), calib=[{"input": calib}], multiple=4)
    return split.model


def teacher_speed(teacher: onnx.ModelProto, x: np.ndarray, repeats: int = 5) -> float:
    """Median torch-module time / median onnxruntime time for the teacher forward on ``x``, interleaved."""
    import torch

    from onnxpress.bridge.convert import OnnxModule
    from onnxpress.runtime import make_session

    session = make_session(teacher)
    module = OnnxModule(teacher).eval()
    xt = torch.from_numpy(x)

    def run_ort() -> float:
        t = time.perf_counter()
        _logits(session, x)
        return time.perf_counter() - t

    def run_torch() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(x), 256):
                module(xt[i : i + 256])
        return time.perf_counter() - t

    run_ort(), run_torch()
    ort_t, torch_t = [], []
    for i in range(repeats):
        pair = (run_ort, run_torch) if i % 2 == 0 else (run_torch, run_ort)
        for fn in pair:
            (ort_t if fn is run_ort else torch_t).append(fn())
    return statistics.median(torch_t) / statistics.median(ort_t)


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    """Print the tables; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="folder with the reference models")
    parser.add_argument("--names", nargs="*", default=["resnet", "mobilenet", "concat"])
    parser.add_argument("--macs", type=float, default=0.5, help="student MACs budget (fraction of the teacher)")
    parser.add_argument("--prune-ratio", type=float, default=0.1, help="channel ratio pruned before low-rank")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--hard-weight", type=float, default=0.5, help="λ_hard of the KD run")
    parser.add_argument("--train", choices=["train", "calib"], default="train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qat-model", default="mobilenet")
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--skip-qat", action="store_true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch

    import onnxpress
    from models.data import load_digits32
    from onnxpress.finetune import sqnr_db
    from onnxpress.reporting import format_table
    from onnxpress.runtime import make_session

    torch.set_num_threads(args.threads)
    digits = load_digits32()
    if args.train == "train":
        x_train, y_train = digits.train_input, digits.train_labels
    else:
        pos = {x.tobytes(): i for i, x in enumerate(digits.train_input)}
        idx = np.array([pos[x.tobytes()] for x in digits.calib_input])
        x_train, y_train = digits.calib_input, digits.train_labels[idx]
    x_test, y_test = digits.test_input, digits.test_labels
    calib = digits.calib_input
    print(f"fine-tune data: {len(x_train)} samples ({args.train} split); test: {len(x_test)}; "
          f"epochs {args.epochs}, lr {args.lr}, T {args.temperature}, torch threads {args.threads}")  # fmt: skip

    rows = []
    speed_rows = []
    with tempfile.TemporaryDirectory(prefix="onnxpress-bench-") as tmp:
        for name in args.names:
            path = args.models / f"{name}.onnx"
            if not path.exists():
                print(f"note: {path} missing; skipped")
                continue
            teacher = onnxpress.load_model(path)
            t_logits = _logits(make_session(teacher), x_test)
            t_acc = float(np.mean(t_logits.argmax(1) == y_test))
            speed_rows.append([name, f"{teacher_speed(teacher, x_train[:512]):.2f}x"])
            start = time.perf_counter()
            student = compress(teacher, calib, args.macs, args.prune_ratio)
            compress_s = time.perf_counter() - start
            macs = _macs(student) / _macs(teacher)

            def evaluate(model: onnx.ModelProto, t_logits: np.ndarray = t_logits) -> tuple[float, float]:
                z = _logits(make_session(model), x_test)
                return float(np.mean(z.argmax(1) == y_test)), sqnr_db(t_logits, z)

            rows.append([name, "teacher", "1.00", f"{t_acc:.4f}", "-", "-", "-"])
            acc, sq = evaluate(student)
            rows.append([name, "student, no fine-tune", f"{macs:.2f}", f"{acc:.4f}", f"{sq:.1f}", "-",
                         f"{compress_s:.0f}s compress"])  # fmt: skip
            runs = {
                "hard-label fine-tune": dict(teacher=None, hard_weight=1.0, soft_weight=0.0),
                "KD fine-tune": dict(teacher=teacher, hard_weight=args.hard_weight, soft_weight=1.0),
            }
            for label, kw in runs.items():
                start, cpu = time.perf_counter(), time.process_time()
                res = onnxpress.finetune(
                    student, kw["teacher"], {"input": x_train}, f"{tmp}/{name}-{label[:2]}.onnx", labels=y_train,
                    epochs=args.epochs, lr=args.lr, temperature=args.temperature, hard_weight=kw["hard_weight"],
                    soft_weight=kw["soft_weight"], batch_size=64, val_fraction=0.1, patience=3, seed=0,
                    threads=args.threads,
                )  # fmt: skip
                wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
                acc, sq = evaluate(res.model)
                h = res.history
                rows.append([name, label, f"{macs:.2f}", f"{acc:.4f}", f"{sq:.1f}",
                             f"{h.best_epoch}/{len(h.train_loss)}", f"{wall:.0f}s / {cpu_s:.0f}s"])  # fmt: skip
    print()
    print(format_table(["model", "variant", "MACs", "test acc", "SQNR dB", "epoch kept/run", "wall / cpu"], rows))
    print()
    print(format_table(["teacher", "torch module / onnxruntime time"], speed_rows))

    if args.skip_qat:
        return 0
    path = args.models / f"{args.qat_model}.onnx"
    if not path.exists():
        print(f"note: {path} missing; QAT skipped")
        return 0
    from onnxpress.bridge.qat import prepare_qat

    teacher = onnxpress.load_model(path)
    table = onnxpress.calibrate(teacher, [{"input": calib}], method="kl")
    ptq = prepare_qat(teacher, {"input": calib}, table=table).ptq
    start, cpu = time.perf_counter(), time.process_time()
    res = onnxpress.finetune(
        teacher, teacher, {"input": x_train}, None, labels=y_train, epochs=args.qat_epochs, lr=1e-4,
        temperature=args.temperature, hard_weight=args.hard_weight, qat=True, calibration=table,
        val_fraction=0.1, seed=0, threads=args.threads,
    )  # fmt: skip
    qat_wall = f"{time.perf_counter() - start:.0f}s / {time.process_time() - cpu:.0f}s"
    t_logits = _logits(make_session(teacher), x_test)
    q_rows = [[args.qat_model + " float", f"{np.mean(t_logits.argmax(1) == y_test):.4f}", "-", "-", "-"]]
    with tempfile.TemporaryDirectory(prefix="onnxpress-bench-") as tmp:
        for label, model, wall in [("int8 PTQ (KL)", ptq, None), ("int8 QAT (LSQ + KD)", res.model, qat_wall)]:
            opt_path = f"{tmp}/{label[:8].replace(' ', '_')}.onnx"
            session = make_session(model, optimized_model_path=opt_path)
            z = _logits(session, x_test)
            fused = collections.Counter(n.op_type for n in onnx.load(opt_path).graph.node)
            kernels = ", ".join(f"{k} {v}" for k, v in sorted(fused.items()) if k.startswith("QLinear") or k == "QGemm")
            q_rows.append([label, f"{np.mean(z.argmax(1) == y_test):.4f}", f"{sqnr_db(t_logits, z):.1f}",
                           kernels or "none", "-" if wall is None else wall])  # fmt: skip
    print()
    print(format_table(["variant", "test acc", "SQNR dB vs float", "integer kernels", "wall / cpu"], q_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
