"""``onnxpress.finetune``: recover a compressed model's accuracy by distilling from the original.

The user has only ``.onnx`` files and data, no training code::

    student.onnx ─ onnx_to_torch ─▶ OnnxModule ─ distil from teacher.onnx (onnxruntime, cached logits)
        ─▶ fine-tuned module ─ torch.onnx.export (dynamo) ─ cleanup passes ─ validate ─▶ out.onnx
    with qat=True:  ... ─ LSQ fake-quant (scales from a calibration table, learned) ─ distil
        ─▶ write fine-tuned weights + learned scales into the student graph as QDQ ─ validate ─▶ out.onnx

torch is imported only when this function runs (``pip install onnxpress[torch]``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.calibration.readers import sample_axes
from onnxpress.errors import ArgumentError, DataError, OnnxpressError, UnsupportedModelError
from onnxpress.model_io import (
    ModelSource,
    check_output_path,
    load_model,
    normalize_model,
    quantized_ops,
    save_model,
)
from onnxpress.prune import sqnr_db  # re-exported: the bench scripts and users read it from here

__all__ = ["FLOAT_LR", "QAT_BATCH_SIZE", "QAT_LR", "FinetuneResult", "check_dynamic_batch", "finetune", "kl_nats",
           "sqnr_db", "stored_weights"]

log = logging.getLogger(__name__)

FLOAT_LR = 1e-3
"""Default learning rate of a float fine-tune (a pruned or split student far from its teacher)."""

QAT_LR = 1e-4
"""Default learning rate of QAT: the quantized model starts close to its teacher, and at 1e-3 no epoch beat
epoch 0 on onnxruntime's default QDQ MobileNet / ResNet (10 epochs, CLI defaults otherwise); at 1e-4 the
calibration-set SQNR went 26.2 -> 31.9 / 36.6 -> 40.6 dB, at 3e-5 to 31.2 / 39.8."""

QAT_BATCH_SIZE = 64
"""Default batch of QAT, at which ``QAT_LR`` and the QAT epochs were chosen. A float fine-tune's default
follows the data instead (``bridge.train.default_batch_size``: 16 on 450 training samples)."""

QAT_MIN_SQNR_DB = 35.0
"""A QAT export must reproduce the fake-quantized module's outputs at least this well (see
``onnxpress.bridge.export.validate_against_module``), or within ``QAT_FLIP_MARGIN_DB`` of how well
onnxruntime reproduces the untrained module from the PTQ graph, when that is lower: one-step rounding
flips (torch and onnxruntime round float sums differently) grow through deep networks. A random-weight
U-Net's PTQ graph agreed with its own module at 28.5 dB; the 4-layer reference CNNs agree at > 40 dB."""

QAT_FLIP_MARGIN_DB = 6.0


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned model and the evidence.

    Attributes:
        model: the fine-tuned ONNX model.
        output: where it was written, if asked.
        history: losses per epoch, the kept epoch, timings (a ``FinetuneHistory``).
        export_max_diff: max |Δ| between the written model on onnxruntime and the fine-tuned module
            (≤ 1e-4 for float exports; QAT exports are held to SQNR ≥ ``QAT_MIN_SQNR_DB`` instead).
        metrics: teacher agreement before/after on the data given (``sqnr_db_before/after``,
            ``kl_before/after``: mean KL(teacher ‖ student) of the softmax over the last axis in nats,
            ``agreement_after``, ``accuracy_before/after`` when labels are given, ``teacher_accuracy``); the float path
            measures them on onnxruntime (student as given, written model), QAT on the module.
        mode: ``"float"``, ``"qat"`` (a float student quantized, then trained quantization-aware) or
            ``"qat in its own graph"`` (a student that was already quantized).
    """

    model: onnx.ModelProto
    output: Path | None
    history: Any
    export_max_diff: float
    metrics: dict[str, float]
    mode: str = "float"


def kl_nats(teacher: np.ndarray, student: np.ndarray, axis: int = -1) -> float:
    """Mean ``KL(softmax(teacher) ‖ softmax(student))`` over ``axis`` (class scores), in nats (float64)."""
    t = np.moveaxis(teacher.astype(np.float64), axis, -1)
    s = np.moveaxis(student.astype(np.float64), axis, -1)
    log_t = t - t.max(-1, keepdims=True)
    log_t -= np.log(np.exp(log_t).sum(-1, keepdims=True))
    log_s = s - s.max(-1, keepdims=True)
    log_s -= np.log(np.exp(log_s).sum(-1, keepdims=True))
    return float(np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)))


def check_dynamic_batch(model: onnx.ModelProto | None, which: str, *, sequence_first: bool = False) -> None:
    """Training runs batches of samples (and the teacher's logits are computed in batches): a fixed batch refused.

    A model exported with batch 1 and no dynamic axis once failed deep in onnxruntime ("Got: 64 Expected: 1");
    its Reshapes may hold that batch too, so it is not simply relabelled.
    """
    if model is None:
        return
    from onnxpress.calibration.collect import fixed_batch_inputs

    # The training loop gathers, shuffles and splits samples on axis 0 (inputs and the teacher's outputs alike); on a
    # sequence-first input that trained on time steps: a GRU distilled from itself fell from exact to 14.4 dB.
    axes = sample_axes(model)
    single = [name for name, axis in axes.items() if axis is None]
    scalars = [vi.name for vi in model.graph.input if vi.name in single and vi.type.tensor_type.HasField("shape")
               and not vi.type.tensor_type.shape.dim]
    if scalars:
        raise UnsupportedModelError(
            f"finetune trains on batches of samples, and the {which}'s input {scalars[0]!r} is a scalar (rank 0), "
            f"with no sample axis: make it a constant of the model, or export it with one value per sample "
            f"({scalars[0]}[batch])"
        )
    if single:
        raise UnsupportedModelError(
            f"finetune trains on batches of samples, and the {which}'s input {single[0]!r} has no sample axis (the "
            f"model takes one sample per run): export it with a batch axis, e.g. torch.onnx.export(model, "
            f"x.unsqueeze(0), ..., dynamic_axes={{{single[0]!r}: {{0: 'batch'}}}}), then make the student from that "
            "export"
        )
    if axes and not sequence_first:
        name, axis = next(iter(axes.items()))
        raise UnsupportedModelError(
            f"this fine-tune trains on samples on axis 0, and the {which}'s input {name!r} holds its samples on axis "
            f"{axis} (sequence-first, [seq, batch, ...]); a float `onnxpress finetune` takes it, QAT and optimize "
            "--finetune do not: export the model batch-first (e.g. nn.GRU/nn.LSTM(batch_first=True), input "
            "[batch, seq, ...]) for those"
        )
    for name, size in fixed_batch_inputs(model):
        if size is not None:  # a scalar input has no batch axis to fix
            raise UnsupportedModelError(
                f"finetune trains on batches of samples, and the {which}'s input {name!r} has a fixed batch of "
                f"{size} (axis 0): export it with a dynamic batch axis, e.g. torch.onnx.export(..., "
                f"dynamic_axes={{{name!r}: {{0: 'batch'}}}}), then make the student from that export"
            )


def finetune(
    student: ModelSource,
    teacher: ModelSource | None = None,
    data: Any = None,
    output: str | os.PathLike[str] | None = None,
    *,
    labels: Any = None,
    epochs: int = 10,
    temperature: float = 4.0,
    lr: float | None = None,
    batch_size: int | None = None,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    features: Mapping[str, str] | None = None,
    feature_weight: float | None = None,
    sparsity: float = 0.0,
    val_fraction: float = 0.1,
    patience: int = 3,
    seed: int = 0,
    augment_shift: int = 0,
    distill: str = "kl",
    class_axis: int = -1,
    max_samples: int | None = None,
    qat: bool = False,
    calibration: Any = None,
    threads: int | None = None,
    device: str = "cpu",
    exporter: str = "auto",
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune ``student`` with distillation from ``teacher`` (and labels if given); export to ONNX.

    Args:
        student: the compressed model (path or ModelProto; never modified).
        teacher: the original model; ``None`` trains on ``labels`` only. It must take the student's inputs
            (same names). The soft term distils the first output of each (a second output, an auxiliary
            head, trains only through what it shares with the first; ``features`` can add it).
        data: training inputs (``.npz`` path, folder, iterable of feeds, DataReader, or a mapping of
            arrays keyed by input name).
        output: where to write the result (atomically, checked); ``None`` to only return it.
        labels: class labels (array, ``.npy``, or ``.npz`` with key ``labels``); optional.
        epochs: passes over the training split.
        temperature: distillation temperature ``T``.
        lr: Adam learning rate (cosine-decayed); default 1e-3, and 1e-4 for QAT (``QAT_LR``).
        batch_size: samples per step. Default: ``QAT_BATCH_SIZE`` (64) with ``qat``, else by the size of the
            training split (:func:`onnxpress.bridge.train.default_batch_size`: 64 from 1,792 samples, 32 from
            896, else 16; 64 left a pruned student under-trained on 450 samples, 7 steps an epoch).
        hard_weight: weight of the label cross-entropy (only with labels).
        soft_weight: weight of ``T²·KL(teacher ‖ student)``.
        features: student value name → teacher value name, distilled with MSE.
        feature_weight: weight of the feature term (``None``: 1 with ``features``, as ``--feature-weight``; 0 with
            ``features`` is refused: it would drop every pair unread).
        sparsity: weight of the L1 penalty on BN scales / Conv channel norms.
        val_fraction: held out for early stopping.
        patience: epochs without validation improvement before stopping.
        seed: seeds the split, the shuffling, the augmentation and torch.
        augment_shift: translate image inputs by up to this many pixels, freshly each epoch (0 = off;
            the teacher's logits are recomputed once per epoch for the shifted copies).
        distill: the soft term: ``"kl"`` (default; the softened softmax over ``class_axis``: class
            logits, a language model's per-token scores, segmentation maps with ``class_axis=1``) or
            ``"mse"`` (the outputs regressed as they are). On a random-weight U-Net with 25% of its
            channels pruned (image output, 6 epochs), kl over the last axis recovered more than mse did:
            17.2 dB held-out SQNR at lr 3e-4 against mse's best 14.3 dB (lr 1e-4; mse at 1e-3 never beat
            the untrained student's 8.2 dB), so kl stays the default for every kind of output.
        class_axis: the class axis for ``"kl"`` and the metrics (default: the last).
        max_samples: use at most this many samples.
        qat: quantization-aware fine-tune with learned scales; the result is a QDQ model. A float
            student is first quantized by ``onnxpress quantize`` (defaults, on ``data``), and that graph
            is trained. A student that is already quantized (QDQ: ``onnxpress quantize``'s or onnxruntime's
            output) is always fine-tuned this way, in its own graph, starting from its own weights and
            scales, and comes back with every node and name it had.
        calibration: a ``CalibrationTable`` for that quantize step, or the path of one (else ranges are
            measured on ``data``).
        threads: torch threads while training (None keeps torch's setting).
        device: where torch trains: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, or ``"auto"`` (CUDA
            when torch sees a GPU). The teacher, the export and the checks run on the CPU
            (onnxruntime) either way. Seeded runs repeat on one device; a GPU run's weights differ from
            a CPU run's by float rounding.
        exporter: for the float path, ``"dynamo"`` (torch.onnx.export), ``"torchscript"``, or
            ``"writeback"``: copy the trained weights into the student's own graph, which keeps every
            node and tensor name (torch.onnx renames nodes) for steps that address layers by name.
            ``"auto"`` (default): writeback when the student has LSTM/GRU layers (torch.onnx unrolls
            them, see ``RECURRENT_OPS``), rebuilds weights from a compact storage (:func:`stored_weights`:
            torch.onnx would store them in float) or when torch.onnx cannot export it (logged), dynamo
            otherwise.
        progress: progress bar with the loss.

    Raises:
        UnsupportedModelError: torch is missing, or the student has ops the bridge cannot run.
        DataError: data/labels do not fit the student, or there is nothing to learn from.
        DeviceError: ``device`` is not a device, or CUDA is asked for and torch sees none.
        ValidationError: the exported model does not match the fine-tuned module within 1e-4 of its outputs' scale,
            or training diverged (the module's outputs are not finite).
        OutputError: ``output`` cannot be written.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UnsupportedModelError("fine-tuning needs torch: pip install 'onnxpress[torch]'") from None
    from onnxpress.bridge import train as tr
    from onnxpress.bridge.convert import OnnxModule
    from onnxpress.bridge.export import module_agreement_db, validate_against_module

    train_device = tr.resolve_device(device)  # before any work: a missing GPU is a one-line error
    if exporter not in ("auto", "dynamo", "torchscript", "writeback"):
        raise ArgumentError(f"exporter must be auto, dynamo, torchscript or writeback, not {exporter!r}")
    if output is not None:  # never overwrite inputs, data or the table
        check_output_path(output, [student, teacher, data, labels, calibration])
    if data is None:
        raise DataError("finetune needs data: give data=<.npz path, folder or feeds>")
    student_proto = load_model(student)
    quantized = bool(quantized_ops(student_proto))
    if quantized and not qat:  # its integer weights train only behind their fake-quant
        log.info("the student is quantized: fine-tuning it quantization-aware, in its own graph")
        qat = True
    # settings this run would not read: refused, not ignored
    if exporter != "auto" and qat:
        raise OnnxpressError(f"exporter={exporter!r} (--exporter) sets how a float model goes back to ONNX, and a "
                             "quantization-aware run writes its own QDQ graph: drop it")
    if calibration is not None and not qat:
        raise OnnxpressError("calibration (--calibration) is the table of the quantize step of qat=True (--qat) on "
                             "a float student: add that, or drop it")
    if isinstance(calibration, (str, os.PathLike)):
        from onnxpress.calibration.table import CalibrationTable

        calibration = CalibrationTable.load(calibration)
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:  # torch hung at 10000 threads and crashed at 100000
        raise OnnxpressError(f"threads (--threads) {threads} is more than this machine's {cores} cores: give at "
                             f"most {cores}")
    if features and feature_weight is not None and feature_weight == 0:  # the API once dropped them this way unread
        raise OnnxpressError("feature_weight 0 drops every features pair: give a weight > 0, or drop them")
    if feature_weight is None:
        feature_weight = 1.0 if features else 0.0
    trains = ((labels is not None and hard_weight > 0) or (teacher is not None and soft_weight > 0)
              or (bool(features) and feature_weight > 0))
    if not trains and (labels is not None or teacher is not None):
        raise OnnxpressError("every loss term has weight 0 (hard_weight / --hard-weight for the labels, soft_weight / "
                             "--soft-weight for the teacher): nothing would be trained")
    student_proto = normalize_model(student_proto, min_opset=13 if qat else None, name_nodes=False)
    if lr is None:
        lr = QAT_LR if qat else FLOAT_LR
    if batch_size is None and qat:
        batch_size = QAT_BATCH_SIZE
    try:
        config = tr.FinetuneConfig(
            epochs=epochs, lr=lr, batch_size=batch_size, temperature=temperature, hard_weight=hard_weight,
            soft_weight=soft_weight, feature_weight=feature_weight, features=dict(features or {}),
            sparsity=sparsity, val_fraction=val_fraction, patience=patience, seed=seed, augment_shift=augment_shift,
            distill=distill, class_axis=class_axis,
        )  # fmt: skip
    except ValueError as exc:  # a setting out of range: one line naming it, before any data is read
        raise OnnxpressError(f"finetune: {exc}") from None
    # a sequence-first student trains through a batch-first view, built once here (see batch_first_view)
    view = batch_first_view(student_proto) if sample_axes(student_proto) else None
    rank = _first_output_rank(student_proto if view is None else view)
    reads_axis = teacher is not None and distill == "kl" or labels is not None  # the kl term and the labels
    if rank and reads_axis and (not -rank <= class_axis < rank or class_axis % rank == 0 and rank >= 2):
        valid = ", ".join(map(str, [*range(1, rank), *range(1 - rank, 0)]))
        raise OnnxpressError(f"class_axis (--class-axis) {class_axis} is not a class axis of the first output "
                             f"(rank {rank}, axis 0 holds the samples): give one of {valid}")
    teacher_proto = None if teacher is None else load_model(teacher)
    if teacher_proto is not None:
        tr.check_same_inputs(student_proto, teacher_proto)
    for which, proto in (("student", student_proto), ("teacher", teacher_proto)):
        check_dynamic_batch(proto, which, sequence_first=not qat)
    arrays = tr.load_arrays(data, student_proto, max_samples=max_samples)  # samples moved to axis 0
    seq_student = None  # a sequence-first student: trained through its view, written back into its own graph
    if view is not None:
        seq_student, student_proto = student_proto, view
        teacher_proto = None if teacher_proto is None else batch_first_view(teacher_proto)
    n = len(next(iter(arrays.values())))
    total = n
    countable = not isinstance(data, Mapping) and not hasattr(data, "batches")
    if labels is not None and max_samples is not None and countable:
        from onnxpress.calibration.readers import open_data

        # the student as given: the batch-first view's axis 0 is a sequence-first input's time axis
        total = open_data(data, seq_student or student_proto, max_samples=None).total_samples  # None: not counted
    label_arr = None if labels is None else tr.load_label_array(labels, n, total)
    if label_arr is not None and rank not in (None, 0, 2):
        raise DataError(
            "labels are one class per sample, for [samples, classes] logits; this model's first output has "
            f"rank {rank}: fine-tune it without labels "
            "(distillation from the teacher alone)"
        )

    start = time.perf_counter()
    teacher_logits = None
    if teacher_proto is not None:
        out_name = teacher_proto.graph.output[0].name
        teacher_logits = tr.run_teacher(teacher_proto, arrays, [out_name])[0]
    teacher_seconds = time.perf_counter() - start

    plan = None
    if qat:
        from onnxpress.bridge.qat import prepare_qat

        plan = prepare_qat(student_proto, arrays, table=calibration)  # a float student: quantize's model
        module = plan.module  # its outputs before training are the PTQ model's
    else:
        module = OnnxModule(student_proto)
    # metrics are measured on onnxruntime, all optimisations on (the student as given or, with QAT, the PTQ model;
    # the written model after): 2.5-20x faster than the torch module, and the numbers of the delivered file. The
    # fake-quantized module follows onnxruntime with optimisations off; with them on, an int4 student's
    # DequantizeLinear + MatMul run fused, and the module's 47.55 dB read 45.07 in the written file
    before = _run_onnx(plan.ptq if plan is not None else student_proto, arrays)
    if teacher_logits is not None and teacher_logits.shape != before.shape:  # torch's kl_div would say it
        raise DataError(f"the teacher's first output is {list(teacher_logits.shape)} on the data and the student's "
                        f"{list(before.shape)}: distillation needs the same shape (the model the student was made "
                        "from)")
    if label_arr is not None:
        tr.check_label_range(label_arr, before, class_axis)
    check = {k: v[: min(len(v), 64)] for k, v in arrays.items()}
    floor_db = None
    if plan is not None:  # how closely onnxruntime follows this fake-quantized module before any training
        floor_db = min(QAT_MIN_SQNR_DB, module_agreement_db(plan.ptq, module, check) - QAT_FLIP_MARGIN_DB)
    history = tr.train_student(
        module, student_proto, arrays, teacher_logits, label_arr, config,
        teacher_model=teacher_proto, threads=threads, device=train_device, progress=progress,
    )  # fmt: skip
    history = dataclasses.replace(history, teacher_seconds=teacher_seconds)

    example = {k: v[: min(len(v), 4)] if len(v) >= 2 else np.concatenate([v, v]) for k, v in arrays.items()}
    if plan is not None:
        model = plan.export(module)
    elif seq_student is not None:  # the view's weights are the student's: written back into its own graph
        model = module.state_to_onnx(student_proto)
    else:
        model = _float_export(module, student_proto, [example[k] for k in module.input_names], exporter)
    # a quantized export reproduces the module up to one-step rounding flips: bounded by SQNR instead
    diff = validate_against_module(model, module, check, min_sqnr_db=floor_db)

    after = _run_onnx(model, arrays)
    if seq_student is not None:
        model = module.state_to_onnx(seq_student)
    metrics: dict[str, float] = {}
    if teacher_logits is not None:
        metrics["sqnr_db_before"] = sqnr_db(teacher_logits, before)
        metrics["sqnr_db_after"] = sqnr_db(teacher_logits, after)
        if distill == "kl":
            metrics["agreement_after"] = float(np.mean(teacher_logits.argmax(class_axis) == after.argmax(class_axis)))
            # what distillation minimises (at T = 1): the logits' SQNR can fall while the distributions meet
            # (bench/finetune_lm.py's low-rank GPT: KL 8.50 -> 0.031 nats while its SQNR went 3.73 -> 0.35 dB)
            metrics["kl_before"] = kl_nats(teacher_logits, before, class_axis)
            metrics["kl_after"] = kl_nats(teacher_logits, after, class_axis)
    if label_arr is not None:
        metrics["accuracy_before"] = float(np.mean(before.argmax(-1) == label_arr))
        metrics["accuracy_after"] = float(np.mean(after.argmax(-1) == label_arr))
        if teacher_logits is not None:
            metrics["teacher_accuracy"] = float(np.mean(teacher_logits.argmax(-1) == label_arr))
    written = save_model(model, output) if output is not None else None
    mode = "qat in its own graph" if quantized else "qat" if qat else "float"
    return FinetuneResult(model, written, history, diff, metrics, mode)


def batch_first_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every sequence-first input and output transposed to hold its samples on axis 0.

    The training loop gathers, shuffles and splits samples on axis 0 (inputs, the teacher's outputs, the labels);
    a sequence-first GRU trained that way learned from time steps (distilled from itself it fell from exact to
    14.4 dB). The view feeds each such input ``[batch, seq, ...]`` through a Transpose into the untouched graph, and
    moves each output's batch axis (:func:`~onnxpress.calibration.readers.output_sample_axes`) to the front. Its
    initializers are the model's, so the trained weights go back into the model's own graph by name.

    Raises:
        UnsupportedModelError: an output to move has no declared rank.
    """
    from onnxpress.calibration.readers import output_sample_axes

    in_axes = sample_axes(model)
    out_axes = dict(zip([o.name for o in model.graph.output], output_sample_axes(model), strict=True))
    view = onnx.ModelProto()
    view.CopyFrom(model)
    g = view.graph
    renamed: dict[str, str] = {}
    front: list[onnx.NodeProto] = []
    for vi in g.input:
        axis = in_axes.get(vi.name, 0)
        dims = vi.type.tensor_type.shape.dim
        if not axis or len(dims) <= axis:
            continue
        inner = renamed[vi.name] = f"{vi.name}__seq_first"
        order = [axis] + [j for j in range(len(dims)) if j != axis]  # the view's axis i is the model's order[i]
        perm = [order.index(j) for j in range(len(dims))]  # and back: Transpose output axis j reads input perm[j]
        front.append(onnx.helper.make_node("Transpose", [vi.name], [inner], perm=perm, name=f"{inner}_view"))
        _reorder(dims, order)
    back: list[onnx.NodeProto] = []
    for vi in g.output:
        axis = out_axes.get(vi.name, 0)
        if not axis:
            continue
        if not vi.type.tensor_type.HasField("shape"):
            raise UnsupportedModelError(f"output {vi.name!r} of the sequence-first model has no declared rank; the "
                                        "fine-tune cannot move its batch axis")
        dims = vi.type.tensor_type.shape.dim
        inner = renamed[vi.name] = f"{vi.name}__seq_first"
        order = [axis] + [j for j in range(len(dims)) if j != axis]
        back.append(onnx.helper.make_node("Transpose", [inner], [vi.name], perm=order, name=f"{inner}_view"))
        _reorder(dims, order)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for i, name in enumerate(node.output):
            if name in renamed:
                node.output[i] = renamed[name]
    nodes = front + list(g.node) + back
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return view


def _reorder(dims: Any, order: list[int]) -> None:
    """Reorder a repeated shape field in place: position ``i`` takes the dimension at ``order[i]``."""
    copies = [onnx.TensorShapeProto.Dimension() for _ in order]
    for copy, j in zip(copies, order, strict=True):
        copy.CopyFrom(dims[j])
    del dims[:]
    dims.extend(copies)


def _first_output_rank(model: onnx.ModelProto) -> int | None:
    """The rank of the model's first output as declared, or None when its shape is not given."""
    t = model.graph.output[0].type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


RECURRENT_OPS = frozenset({"LSTM", "GRU"})
"""With ``exporter="auto"`` a student holding these is written back into its own graph: torch.onnx unrolls
them (the reference LSTM model: 46 nodes became 918, 1.14x the original's latency against 1.01x)."""


_LAYOUT_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_WEIGHT_READERS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}


def stored_weights(model: onnx.ModelProto) -> list[str]:
    """Layer weights the graph rebuilds from a compact storage (a codebook, float16 + Cast), by reader node name.

    A weight read by Conv/ConvTranspose/Gemm/MatMul (or a Gather's table) that is computed from initializers
    alone through more than layout ops. torch.onnx would write the computed float weight instead (a codebook
    ResNet's fine-tune came out 6.8x the student's file), so ``exporter="auto"`` writes the trained values back
    into the student's graph, which keeps the storage.
    """
    constant = {i.name for i in model.graph.initializer}
    rebuilt: set[str] = set()
    for node in model.graph.node:
        if node.input and all(not name or name in constant for name in node.input):
            constant.update(node.output)
            if node.op_type not in _LAYOUT_OPS or any(name in rebuilt for name in node.input):
                rebuilt.update(node.output)
        elif node.op_type == "Constant":
            constant.update(node.output)
    return [node.name or node.output[0] for node in model.graph.node
            if node.op_type in _WEIGHT_READERS and len(node.input) > _WEIGHT_READERS[node.op_type]
            and node.input[_WEIGHT_READERS[node.op_type]] in rebuilt]


def _float_export(module: Any, student: onnx.ModelProto, example: list[np.ndarray], exporter: str) -> onnx.ModelProto:
    """The fine-tuned float model: re-exported by torch, or the student graph with the new weights."""
    if exporter == "auto":
        if any(n.op_type in RECURRENT_OPS for n in student.graph.node) or stored_weights(student):
            return module.state_to_onnx(student)
        from onnxpress.bridge.export import export_module

        try:
            return export_module(module, student, example, exporter="dynamo")
        except UnsupportedModelError as exc:  # torch.onnx cannot export some ops (a stable sort, ...)
            log.warning("%s; writing the trained weights back into the student's graph instead", exc)
            return module.state_to_onnx(student)
    if exporter == "writeback":
        return module.state_to_onnx(student)
    from onnxpress.bridge.export import export_module

    return export_module(module, student, example, exporter=exporter)


def _run_onnx(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """First output of ``model`` on every sample, run on onnxruntime."""
    from onnxpress.runtime import make_session

    session = make_session(model, what="fine-tune metrics model")
    name = session.get_outputs()[0].name
    n = len(next(iter(arrays.values())))
    out = [
        session.run([name], {k: v[s : s + batch_size] for k, v in arrays.items()})[0] for s in range(0, n, batch_size)
    ]
    return np.concatenate(out).astype(np.float32)
