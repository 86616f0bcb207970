"""``onnxpress finetune STUDENT --teacher TEACHER --data DATA -o OUT``: distil the original into the compressed."""

from __future__ import annotations

import argparse

from onnxpress.cli import add_common, bounded_float, int_at_least, non_negative_int, positive_int, progress_enabled
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
    p.add_argument("--data", required=True, help="training inputs: .npz (keyed by input name), a folder of .npz, "
                   "or one .npy for a one-input model")
    p.add_argument("--labels", help="class labels: .npy, or .npz with key 'labels' (may be the --data file)")
    p.add_argument("-o", "--output", required=True, help="where to write the fine-tuned model")
    p.add_argument("--epochs", type=non_negative_int, default=10, help="passes over the data (default 10)")
    p.add_argument("--temperature", type=_POSITIVE, help="distillation temperature T of --distill kl (default 4)")
    p.add_argument("--lr", type=_POSITIVE, default=None,
                   help="Adam learning rate (default 1e-3; 1e-4 with --qat or a quantized student)")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="samples per step (default: 64 with --qat; else 16, 32 or 64 by the training samples, "
                        "64 from 1792)")  # fmt: skip
    p.add_argument("--hard-weight", type=_WEIGHT, help="weight of the label cross-entropy (default 1)")
    p.add_argument("--soft-weight", type=_WEIGHT, help="weight of the distillation term (default 1)")
    p.add_argument("--feature", action="append", default=[], metavar="STUDENT=TEACHER",
                   help="also distil the student's value STUDENT towards the teacher's TEACHER by MSE (same shape; "
                        "repeat for more pairs; weighted by --feature-weight)")
    p.add_argument("--feature-weight", type=_WEIGHT,
                   help="weight of the feature term when --feature is given (default 1)")
    p.add_argument("--sparsity", type=_WEIGHT, default=0.0, help="L1 weight on BN scales / channel norms (default 0)")
    p.add_argument("--val-fraction", type=_FRACTION, default=0.1, help="held out for early stopping (default 0.1)")
    p.add_argument("--patience", type=positive_int,
                   help="epochs without a validation improvement before stopping (default 3)")
    p.add_argument("--seed", type=int_at_least(0, "a seed >= 0"), default=0,
                   help="seed of split, shuffling and torch (default 0)")
    p.add_argument("--augment-shift", type=non_negative_int, default=0,
                   help="shift images by up to this many pixels each epoch (default 0 = off)")  # fmt: skip
    p.add_argument("--max-samples", type=positive_int, help="use at most this many samples")
    p.add_argument("--threads", type=positive_int, help="torch threads while training")
    p.add_argument("--device", default="cpu",
                   help="where torch trains: cpu (default), cuda, cuda:N, or auto (cuda when torch sees a GPU)")
    p.add_argument("--distill", choices=["kl", "mse"],
                   help="the soft term: kl (the default: the softened softmax over --class-axis) or mse (the "
                        "outputs regressed as they are)")
    p.add_argument("--class-axis", type=int, help="axis of the class scores for kl and the labels (default -1)")
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
    _refuse_unread(args, features)
    result = finetune(
        args.student, args.teacher, args.data, args.output, labels=args.labels, epochs=args.epochs,
        temperature=_or(args.temperature, 4.0), lr=args.lr, batch_size=args.batch_size,
        hard_weight=_or(args.hard_weight, 1.0), soft_weight=_or(args.soft_weight, 1.0), sparsity=args.sparsity,
        val_fraction=args.val_fraction, patience=_or(args.patience, 3), seed=args.seed,
        augment_shift=args.augment_shift, max_samples=args.max_samples, distill=_or(args.distill, "kl"),
        class_axis=_or(args.class_axis, -1), features=features,
        feature_weight=_or(args.feature_weight, 1.0) if features else 0.0,
        qat=args.qat, calibration=args.calibration, threads=args.threads, device=args.device, exporter=args.exporter,
        progress=progress_enabled(args),
    )  # fmt: skip
    h = result.history
    rows = [[key, f"{value:.4f}"] for key, value in sorted(result.metrics.items())]
    rows.insert(0, ["fine-tune", result.mode])
    rows.append(["epochs run / kept", f"{len(h.train_loss)} / {h.best_epoch}"])
    rows.append(["samples train / held out, per step", f"{h.train_samples} / {h.val_samples}, {h.batch_size}"])
    rows.append(["export max |diff| vs module", f"{result.export_max_diff:.2e}"])
    print(format_table(["what", "value"], rows))
    if len(h.train_loss) and not h.best_epoch:  # the student comes back as it was given
        print("warning: no epoch improved on the student (validation loss), so the written model is the student "
              "as given: a smaller --lr (or more data) may help")
    print(f"wrote {result.output}")
    return 0


def _or(value, default):
    """``value``, or ``default`` when the option was not given (None: so that a given one shows)."""
    return default if value is None else value


def _refuse_unread(args: argparse.Namespace, features: dict[str, str]) -> None:
    """Refuse loss and stopping options this run's terms would not read (they changed no byte of the model).

    Raises:
        OnnxpressError: naming the option and what it needs.
    """
    mse = args.distill == "mse"
    refusals = [
        ("--hard-weight weighs the label term: add --labels, or drop it",
         args.hard_weight is not None and not args.labels),
        ("--soft-weight, --temperature and --distill set the distillation from --teacher: add it, or drop them",
         not args.teacher and any(v is not None for v in (args.soft_weight, args.temperature, args.distill))),
        ("--temperature softens the kl term, and --distill mse reads none: drop it",
         mse and args.temperature is not None),
        ("--class-axis is the class axis of the kl term and the labels, and --distill mse without --labels reads "
         "neither: drop it", mse and not args.labels and args.class_axis is not None),
        ("--patience stops on the validation split, and --val-fraction 0 holds none: drop one",
         args.val_fraction == 0 and args.patience is not None),
        ("--feature-weight weighs the --feature pairs: add one, or drop it",
         args.feature_weight is not None and not features),
        ("--feature-weight 0 drops every --feature pair: give a weight > 0, or drop them",
         bool(features) and args.feature_weight == 0),
    ]
    for message, refused in refusals:
        if refused:
            raise OnnxpressError(message)
