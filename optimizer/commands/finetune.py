"""``onnxpress finetune STUDENT --teacher TEACHER --data DATA -o OUT``: distil the original into the compressed."""

from __future__ import annotations

import argparse

from onnxpress.cli import add_common, bounded_float, non_negative_int, positive_int, progress_enabled
from onnxpress.errors import OnnxpressError
from onnxpress.reporting import format_table

_POSITIVE = bounded_float(0.0, float("inf"), include_low=False, include_high=False, what="a positive number")
_WEIGHT = bounded_float(0.0, float("inf"), include_low=True, include_high=False, what="a weight")
_FRACTION = bounded_float(0.0, 0.5, include_low=True, include_high=True, what="a fraction")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` subcommand."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a compressed model with distillation from the original (needs onnxpress[torch])",
    )
    p.add_argument("student", help="compressed .onnx model to fine-tune (never modified)")
    p.add_argument("--teacher", help="original .onnx model to distil from (same inputs; its first output is the "
                                     "distillation target)")
    p.add_argument("--data", required=True, help="training inputs: .npz (keyed by input name) or a folder of .npz")
    p.add_argument("--labels", help="class labels: .npy, or .npz with key 'labels' (may be the --data file)")
    p.add_argument("-o", "--output", required=True, help="where to write the fine-tuned model")
    p.add_argument("--epochs", type=non_negative_int, default=10, help="passes over the data (default 10)")
    p.add_argument("--temperature", type=_POSITIVE, default=4.0, help="distillation temperature T (default 4)")
    p.add_argument("--lr", type=_POSITIVE, default=None,
                   help="Adam learning rate (default 1e-3; 1e-4 with --qat or a quantized student)")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per step (default 64)")
    p.add_argument("--hard-weight", type=_WEIGHT, default=1.0, help="weight of the label cross-entropy (default 1)")
    p.add_argument("--soft-weight", type=_WEIGHT, default=1.0, help="weight of the distillation term (default 1)")
    p.add_argument("--feature", action="append", default=[], metavar="STUDENT=TEACHER",
                   help="also distil the student's value STUDENT towards the teacher's TEACHER by MSE (same shape; "
                        "repeat for more pairs; weighted by --feature-weight)")
    p.add_argument("--feature-weight", type=_WEIGHT, default=1.0,
                   help="weight of the feature term when --feature is given (default 1)")
    p.add_argument("--sparsity", type=_WEIGHT, default=0.0, help="L1 weight on BN scales / channel norms (default 0)")
    p.add_argument("--val-fraction", type=_FRACTION, default=0.1, help="held out for early stopping (default 0.1)")
    p.add_argument("--patience", type=positive_int, default=3, help="epochs without improvement before stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of split, shuffling and torch (default 0)")
    p.add_argument("--augment-shift", type=non_negative_int, default=0,
                   help="shift images by up to this many pixels each epoch (default 0 = off)")  # fmt: skip
    p.add_argument("--max-samples", type=positive_int, help="use at most this many samples")
    p.add_argument("--threads", type=positive_int, help="torch threads while training")
    p.add_argument("--device", default="cpu",
                   help="where torch trains: cpu (default), cuda, cuda:N, or auto (cuda when torch sees a GPU)")
    p.add_argument("--distill", choices=["kl", "mse"], default="kl",
                   help="the soft term: kl (the default: the softened softmax over --class-axis) or mse (the "
                        "outputs regressed as they are)")
    p.add_argument("--class-axis", type=int, default=-1, help="axis of the class scores for kl (default -1)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript", "writeback"], default="auto",
                   help="how the float model goes back to ONNX: torch.onnx (dynamo|torchscript), or writeback: the "
                        "trained weights into the student's own graph (auto, the default: writeback for LSTM/GRU "
                        "models, which torch.onnx unrolls; dynamo otherwise)")  # fmt: skip
    p.add_argument("--qat", action="store_true",
                   help="quantization-aware fine-tune: quantize with onnxpress quantize, then train that int8 QDQ "
                        "graph (a student that is already quantized, QDQ, is always fine-tuned this way, in its "
                        "own graph)")  # fmt: skip
    p.add_argument("--calibration",
                   help="calibration table for the quantize step of --qat on a float model (default: calibrate "
                        "on --data)")  # fmt: skip
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Fine-tune and print what changed."""
    from onnxpress.finetune import finetune

    features = {}
    for pair in args.feature:
        student_name, sep, teacher_name = pair.partition("=")
        if not sep or not student_name or not teacher_name:
            raise OnnxpressError(f"--feature takes STUDENT=TEACHER value names, got {pair!r}")
        features[student_name] = teacher_name
    table = None
    if args.calibration:
        from onnxpress.calibration.table import CalibrationTable

        table = CalibrationTable.load(args.calibration)
    result = finetune(
        args.student, args.teacher, args.data, args.output, labels=args.labels, epochs=args.epochs,
        temperature=args.temperature, lr=args.lr, batch_size=args.batch_size, hard_weight=args.hard_weight,
        soft_weight=args.soft_weight, sparsity=args.sparsity, val_fraction=args.val_fraction,
        patience=args.patience, seed=args.seed, augment_shift=args.augment_shift, max_samples=args.max_samples,
        distill=args.distill, class_axis=args.class_axis, features=features,
        feature_weight=args.feature_weight if features else 0.0,
        qat=args.qat, calibration=table, threads=args.threads, device=args.device, exporter=args.exporter,
        progress=progress_enabled(args),
    )  # fmt: skip
    h = result.history
    rows = [[key, f"{value:.4f}"] for key, value in sorted(result.metrics.items())]
    rows.insert(0, ["fine-tune", result.mode])
    rows.append(["epochs run / kept", f"{len(h.train_loss)} / {h.best_epoch}"])
    rows.append(["export max |diff| vs module", f"{result.export_max_diff:.2e}"])
    print(format_table(["what", "value"], rows))
    print(f"wrote {result.output}")
    return 0
