"""Fine-tune a converted student against a teacher: knowledge distillation with early stopping.

The loss for student logits ``z_s``, teacher logits ``z_t``, labels ``y`` and temperature ``T``::

    L = λ_hard · CE(z_s, y)
      + λ_soft · T² · KL(p_t ‖ p_s),   p_t = softmax(z_t / T),  p_s = softmax(z_s / T)
      + λ_feat · Σ_pairs mean((f_s − f_t)²)             (optional feature distillation)
      + λ_sparse · Σ_channels ‖w_c‖                     (optional: |γ| of BN scales, else the
                                                         L2 norm of each Conv output channel)

``KL(p_t ‖ p_s)`` is ``F.kl_div(log p_s, p_t, reduction="batchmean")``: torch's convention (input
= student log-probabilities, target = teacher probabilities), i.e. the teacher is the reference
distribution. ``T²`` keeps the soft gradients' scale independent of ``T`` (Hinton et al.). Without
labels the hard term is dropped. The softmax runs over ``class_axis`` (the last axis by default:
``[N, classes]`` logits, a language model's ``[N, T, vocab]``; 1 for segmentation ``[N, C, H, W]``).

``distill="mse"`` replaces the soft term by ``mean((z_s − z_t)²)``, the outputs regressed as they are
(``onnxpress.finetune``'s docstring says why the softmax stays the default for image outputs too).

Data flow::

    feeds (all samples in memory) ──split(seed)──▶ train / validation
    teacher (onnxruntime, once) ──▶ cached logits [N, classes]      (features: per batch if asked)
    for epoch: [shift-augment the train split, teacher once on the shifted copies]
               shuffled batches ──▶ student ──▶ L ──▶ Adam step ──▶ val L ──▶ keep best, stop early

The teacher runs on onnxruntime and its logits are cached: on the reference CNNs onnxruntime ran the
teacher 2.5-20x faster than the converted module in torch (medians, interleaved, three runs of
bench/finetune.py on busy shared cores). Without augmentation the teacher costs one forward pass per
sample in total; with ``augment_shift`` it runs once per epoch over that epoch's shifted training
copies (one batched onnxruntime call, never per step), and validation always uses the unshifted
samples and their cached logits.

Shift augmentation (images ``[N, C, H, W]`` only): each training sample is translated by integer
``(dy, dx)`` drawn uniformly from ``[-s, s]²``, with the border pixels replicated into the gap::

    x'[c, i, j] = x[c, clip(i - dy, 0, H-1), clip(j - dx, 0, W-1)]

The shifts come from their own seeded generator, so the hard-label and the distillation runs of one
seed see exactly the same shifted samples in the same order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from onnxpress.bridge.convert import OnnxModule
from onnxpress.errors import DataError, DeviceError, UnsupportedModelError
from onnxpress.runtime import make_session

__all__ = [
    "FinetuneConfig",
    "check_label_range",
    "check_same_inputs",
    "default_batch_size",
    "FinetuneHistory",
    "distillation_loss",
    "load_arrays",
    "load_label_array",
    "resolve_device",
    "run_teacher",
    "shift_images",
    "sparsity_penalty",
    "train_student",
]

log = logging.getLogger(__name__)

STEPS_PER_EPOCH = 28
"""Optimizer steps an epoch should give at least, which sets :func:`default_batch_size` on small data."""


def default_batch_size(train_samples: int) -> int:
    """Samples per step when none is given: the largest power of two ``<= train_samples / 28``, from 16 to 64.

    64 from 1,792 training samples up; 16 below 896 (the 450 of a 500-sample calibration set with its 10%
    held out). With 64 such a set gives 7 steps an epoch, and a pruned student stays under-trained after 60
    epochs. Measured on the 937 training digits outside the fine-tune data (bench/finetune.py's selection
    split), 60 epochs of KD on the 500 calibration digits, accuracy at batch 64 / 32 / 16: ResNet with 62.5%
    of its channels pruned 0.949 / 0.982 / 0.990, MobileNet 50% pruned 0.882 / 0.945 / 0.966 (8: 0.967 at
    1.2x the time), the Inception CNN 50% pruned 0.948 / 0.987 / 0.993; wall time within 1.2x of batch 64's.
    """
    batch = 16
    while batch < 64 and train_samples >= 2 * batch * STEPS_PER_EPOCH:
        batch *= 2
    return batch


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tune run.

    Attributes:
        epochs: passes over the training split.
        lr: Adam learning rate (cosine-decayed to 0 over the run).
        batch_size: samples per step (``None``: :func:`default_batch_size` of the training split).
        temperature: distillation temperature ``T``.
        hard_weight: ``λ_hard`` (used only when labels are given).
        soft_weight: ``λ_soft``.
        feature_weight: ``λ_feat`` for the ``features`` pairs.
        features: student value name → teacher value name, distilled with MSE (shapes must match).
        sparsity: ``λ_sparse`` (0 = off).
        weight_decay: Adam weight decay.
        val_fraction: fraction of samples held out for early stopping (0 = none).
        patience: epochs without a validation improvement before stopping.
        seed: seeds the split, the shuffling, the augmentation and torch.
        augment_shift: largest pixel shift of the per-epoch translation augmentation of image
            inputs (0 = off); with a teacher, its logits are recomputed for the shifted copies.
        distill: ``"kl"`` (softened softmax over ``class_axis``) or ``"mse"`` (dense outputs).
        class_axis: the axis of class scores for ``"kl"`` and the label cross-entropy.
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int | None = None
    temperature: float = 4.0
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    feature_weight: float = 0.0
    features: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sparsity: float = 0.0
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    patience: int = 3
    seed: int = 0
    augment_shift: int = 0
    distill: str = "kl"
    class_axis: int = -1

    def __post_init__(self) -> None:
        seed_ok = isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63
        checks = {
            "epochs must be >= 0": self.epochs >= 0,
            # an infinite lr or temperature trains nothing (the loss is NaN or 0) and still writes a model
            "lr must be a finite number > 0": 0 < self.lr < math.inf,
            "batch_size must be >= 1 or None": self.batch_size is None or self.batch_size >= 1,
            "temperature must be a finite number > 0": 0 < self.temperature < math.inf,
            # numpy and torch take seeds in 0..2**63-1: others ended in their ValueError tracebacks
            "seed must be an integer in 0..2**63-1": seed_ok,
            "loss weights must be >= 0": min(self.hard_weight, self.soft_weight, self.feature_weight, self.sparsity)
            >= 0,
            "val_fraction must be in [0, 0.5]": 0 <= self.val_fraction <= 0.5,
            "patience must be >= 1": self.patience >= 1,
            "augment_shift must be >= 0": self.augment_shift >= 0,
            "distill must be kl or mse": self.distill in ("kl", "mse"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("; ".join(bad))


@dataclasses.dataclass(frozen=True)
class FinetuneHistory:
    """What happened: per-epoch losses, the epoch kept, and timings."""

    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]
    best_epoch: int
    stopped_early: bool
    train_samples: int
    val_samples: int
    teacher_seconds: float
    train_seconds: float
    batch_size: int = 0
    """Samples per step the run used (``FinetuneConfig.batch_size`` or :func:`default_batch_size`'s choice)."""


# ----------------------------------------------------------------------------- data
def load_arrays(data: Any, model: onnx.ModelProto, *, max_samples: int | None = None) -> dict[str, np.ndarray]:
    """All samples of ``data`` as one array per model input (samples on axis 0).

    A sequence-first input (``[seq, batch, ...]``, :func:`onnxpress.calibration.readers.sample_axes`) is joined
    on its sample axis and comes back with that axis moved to the front, as
    :func:`onnxpress.finetune.batch_first_view` takes it.

    ``data`` is anything ``onnxpress.calibration.readers.open_data`` accepts (an ``.npz`` path, a
    folder, an iterable of feed dicts, a ``DataReader``); a mapping of arrays is used directly. Float
    inputs come back as float32; integer and bool inputs (token ids, masks) in the type the model
    declares for them.

    Raises:
        DataError: no samples, inputs missing, integer data for a float input (or float data for an
            integer one), NaN/inf, or different sample counts.
    """
    init = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    if isinstance(data, Mapping):
        feeds: Iterable[Mapping[str, np.ndarray]] = [data]
    elif hasattr(data, "batches"):
        feeds = data.batches(None)
    else:
        try:
            from onnxpress.calibration.readers import open_data
        except ImportError:
            feeds = _fallback_feeds(data)
        else:
            feeds = open_data(data, model, max_samples=max_samples).batches(None)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n in names:
            if n not in feed:
                raise DataError(f"data has no array for model input {n!r} (it has {sorted(feed)})")
            parts[n].append(np.asarray(feed[n]))
    if not parts[names[0]]:
        raise DataError("data holds no samples; give at least one sample per model input")
    try:
        from onnxpress.calibration.readers import sample_axes
    except ImportError:
        axes: dict[str, int] = {}
    else:
        axes = sample_axes(model)
    arrays = {}
    for n, v in parts.items():
        axis = axes.get(n, 0)
        if axis is None:  # finetune refuses such a model first (check_dynamic_batch); a direct call too
            raise DataError(f"input {n!r} has no sample axis (one sample per run): training needs a batch axis")
        try:
            arrays[n] = np.moveaxis(np.concatenate(v, axis=axis), axis, 0)
        except ValueError:  # numpy's own words named no input and no way out
            shapes = sorted({tuple(a.shape) for a in v})[:3]
            raise DataError(
                f"input {n!r}: the fine-tune holds all samples of an input in one array, and the feeds differ beyond "
                f"the sample axis (axis {axis}; shapes {[list(s) for s in shapes]}, a sequence length, say): pad or "
                "crop them to one shape"
            ) from None
    counts = {n: len(a) for n, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"inputs have different sample counts {counts}; give one sample per row of every input")
    declared = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    dtypes: dict[str, Any] = {}
    for n, a in arrays.items():
        want = declared.get(n, onnx.TensorProto.FLOAT)
        takes_float = want in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
        if takes_float != (a.dtype.kind == "f") or (not takes_float and a.dtype.kind not in "iub"):
            raise DataError(
                f"input {n!r} is {a.dtype} but the model takes {onnx.TensorProto.DataType.Name(want).lower()}; "
                "give data of that kind"
            )
        if takes_float and not np.isfinite(a).all():
            raise DataError(f"input {n!r} holds NaN or inf; clean the data first")
        dtypes[n] = np.float32 if takes_float else onnx.helper.tensor_dtype_to_np_dtype(want)
    if max_samples is not None:
        arrays = {n: a[:max_samples] for n, a in arrays.items()}
    return {n: np.ascontiguousarray(a, dtype=dtypes[n]) for n, a in arrays.items()}


def _fallback_feeds(data: Any) -> Iterator[Mapping[str, np.ndarray]]:
    """Minimal reader used only until ``onnxpress.calibration.readers`` is installed."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        try:
            with np.load(data) as npz:
                yield {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read data {data}: {exc}") from None
        return
    yield from data


def load_label_array(labels: Any, count: int, total: int | None = None) -> np.ndarray:
    """Integer class labels from an array, an ``.npy`` or an ``.npz`` (key ``labels``), for the first ``count``.

    ``total``: the samples the data holds before a ``max_samples`` cap (None: unknown); the labels must be one
    per sample read or per sample of all of them: another count (a longer file) usually belongs to other data.

    Raises:
        DataError: not 1-D integers, a negative label, or not one label per sample.
    """
    if isinstance(labels, np.ndarray):
        arr = labels
    else:
        try:
            from onnxpress.calibration.readers import load_labels
        except ImportError:
            try:
                loaded = np.load(labels)
                arr = loaded["labels"] if hasattr(loaded, "files") else loaded
            except (OSError, ValueError, KeyError) as exc:
                raise DataError(f"cannot read labels from {labels}: {exc}") from None
        else:
            arr = load_labels(labels)
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"labels must be a 1-D integer array, got {arr.dtype} with shape {arr.shape}")
    if len(arr) < count or total is not None and len(arr) not in (count, total):
        raise DataError(f"{len(arr)} labels for {count if total is None else total} samples; give one label per "
                        "sample")
    arr = arr[:count].astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DataError(f"labels must be class indices 0, 1, ...; label {int(arr.min())} is negative (sample "
                        f"{int(np.argmin(arr))})")
    return arr


def check_label_range(labels: np.ndarray, logits: np.ndarray, class_axis: int = -1) -> None:
    """Refuse a label that is not a class of ``logits`` (``[samples, classes]``): the loss would index past it.

    Raises:
        DataError: a label ``>= classes``, naming it and its sample.
    """
    classes = logits.shape[class_axis]
    if labels.size and int(labels.max()) >= classes:
        worst = int(np.argmax(labels))
        raise DataError(f"label {int(labels[worst])} (sample {worst}) is not a class of this model: its first output "
                        f"has {classes} classes, so labels run 0..{classes - 1}; check the labels file")


def check_same_inputs(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    """Refuse a teacher that cannot read the student's data: both must take the same named inputs.

    Raises:
        DataError: the graph inputs (initializers aside) differ by name, rank or a size both fix.
        UnsupportedModelError: an input is not a tensor (as the data readers refuse it).
    """
    from onnxpress.calibration.readers import model_inputs

    s_specs, t_specs = ({spec.name: spec for spec in model_inputs(m)} for m in (student, teacher))
    s_in, t_in = list(s_specs), list(t_specs)
    if set(s_in) != set(t_in):
        raise DataError(f"the teacher's inputs {t_in} differ from the student's {s_in}: the teacher is run on the "
                        "student's data, so both must take the same named inputs (a teacher exported from the "
                        "same network with the same input names)")
    for name, s in s_specs.items():  # sizes both fix: onnxruntime would refuse the data in the teacher mid-run
        t = t_specs[name]
        if s.shape is None or t.shape is None:
            continue
        if len(s.shape) != len(t.shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(s.shape, t.shape, strict=True)):
            raise DataError(f"the teacher's input {t.describe()} does not take the student's {s.describe()}: "
                            "distill from the model the student was made from")


# ----------------------------------------------------------------------------- teacher
def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``names`` (intermediate values allowed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {o.name for o in out.graph.output}
    produced = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    for name in names:
        if name not in produced:
            raise UnsupportedModelError(f"the teacher has no value named {name!r}")
        if name not in known:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def run_teacher(
    teacher: onnx.ModelProto,
    arrays: Mapping[str, np.ndarray],
    names: Sequence[str],
    *,
    batch_size: int = 256,
) -> list[np.ndarray]:
    """Values ``names`` of ``teacher`` on every sample, computed on onnxruntime in batches."""
    session = make_session(_with_outputs(teacher, names), what="teacher")
    n = len(next(iter(arrays.values())))
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, n, batch_size):
        feed = {k: v[start : start + batch_size] for k, v in arrays.items()}
        try:
            values = session.run(list(names), feed)
        except Exception as exc:  # onnxruntime's own Fail/InvalidArgument types: a traceback before
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            stop = min(n, start + batch_size) - 1
            raise DataError(f"onnxruntime failed to run the teacher on samples {start}..{stop}: {first}") from None
        for store, value in zip(chunks, values, strict=True):
            store.append(value)
    return [np.concatenate(c, axis=0) for c in chunks]


def shift_images(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image of ``x`` ``[N, C, H, W]`` translated by its own ``(dy, dx)`` in ``[-shift, shift]²``.

    The pixels the shift uncovers repeat the nearest border pixel (``x'[c,i,j] = x[c, clip(i-dy),
    clip(j-dx)]``), so a constant background stays constant. Returns a new array; ``x`` is untouched.

    Raises:
        DataError: ``x`` is not 4-D, or ``shift`` is not smaller than its height and width.
    """
    if x.ndim != 4:
        raise DataError(f"shift augmentation needs images [N, C, H, W]; got shape {x.shape}; "
                        "set augment_shift=0 (--augment-shift 0)")
    n, c, h, w = x.shape
    if shift >= min(h, w):
        raise DataError(f"augment_shift={shift} is not smaller than the image size {h}x{w}; use a smaller shift")
    d = rng.integers(-shift, shift + 1, size=(n, 2))
    rows = np.clip(np.arange(h)[None, :] - d[:, :1], 0, h - 1)  # [N, H]
    cols = np.clip(np.arange(w)[None, :] - d[:, 1:], 0, w - 1)  # [N, W]
    return x[
        np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # fmt: skip


# ----------------------------------------------------------------------------- losses
def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    distill: str = "kl",
    class_axis: int = -1,
) -> torch.Tensor:
    """``λ_hard·CE(z_s, y) + λ_soft·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (batch mean).

    The softmax runs over ``class_axis``; with ``distill="mse"`` the soft term is ``mean((z_s − z_t)²)``.
    """
    t = temperature
    if distill == "mse":
        soft = F.mse_loss(student_logits, teacher_logits)
    else:
        s_z, t_z = student_logits.movedim(class_axis, -1), teacher_logits.movedim(class_axis, -1)
        soft = F.kl_div(
            F.log_softmax(s_z / t, dim=-1), F.log_softmax(t_z / t, dim=-1), reduction="batchmean", log_target=True,
        ) * (t * t)  # fmt: skip
    loss = soft_weight * soft
    if labels is not None and hard_weight:
        loss = loss + hard_weight * F.cross_entropy(student_logits, labels)
    return loss


def sparsity_penalty(module: OnnxModule, model: onnx.ModelProto) -> torch.Tensor:
    """``Σ|γ|`` over BatchNormalization scales, or, without BN, ``Σ_c ‖W_c‖₂`` over Conv channels."""
    bn_scales = [n.input[1] for n in model.graph.node if n.op_type == "BatchNormalization"]
    terms = [module.initializer(s).abs().sum() for s in bn_scales if s in module.param_names]
    if not terms:
        convs = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
        for w in convs:
            if w in module.param_names:
                weight = module.initializer(w)
                terms.append(weight.reshape(weight.shape[0], -1).norm(dim=1).sum())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to train on: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"`` (CUDA if present).

    Raises:
        DeviceError: the name is not a device, or CUDA is asked for and torch sees no CUDA device.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {device!r} is not a torch device ({exc}); use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r}: the fine-tune bridge trains on cpu or cuda; use one of those")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise DeviceError(
                f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA device; "
                "train on cpu (device='cpu', --device cpu), or install a CUDA build of torch on a machine with a GPU"
            )
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {device!r}: torch sees {count} CUDA device(s), numbered from 0")
    return dev


@contextlib.contextmanager
def _deterministic(seed: int, threads: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch, force deterministic kernels (and a thread count) for a block; restore after.

    On CUDA, cuBLAS is deterministic only with a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set
    here unless the user set it), and an op with no deterministic CUDA kernel warns instead of
    failing (``warn_only``): the run still trains, and the warning names the op.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    old_threads = torch.get_num_threads()
    cuda = device is not None and device.type == "cuda"
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------- the loop
def train_student(
    student: OnnxModule,
    student_model: onnx.ModelProto,
    arrays: Mapping[str, np.ndarray],
    teacher_logits: np.ndarray | None,
    labels: np.ndarray | None,
    config: FinetuneConfig,
    *,
    teacher_model: onnx.ModelProto | None = None,
    threads: int | None = None,
    device: str | torch.device | None = "cpu",
    progress: bool = False,
) -> FinetuneHistory:
    """Fine-tune ``student`` in place; on return it holds the weights of the best validation epoch.

    Training runs on ``device``; the samples and the teacher's logits go there once per epoch and
    the batches are cut there. On return the student is back on the CPU, where export and
    onnxruntime validation run.

    Args:
        student: the converted student.
        student_model: the graph ``student`` was built from (for the sparsity penalty).
        arrays: every sample, one array per student input.
        teacher_logits: cached teacher logits per sample, or None (hard labels only).
        labels: class per sample, or None (distillation only).
        config: hyper-parameters.
        teacher_model: needed only for feature distillation (teacher values per batch).
        threads: torch threads during training (None keeps torch's setting).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (see :func:`resolve_device`).
        progress: tqdm bar over steps with the running loss.

    Raises:
        DataError: neither teacher logits nor labels; too few samples for a validation split.
        DeviceError: ``device`` is not available.
    """
    dev = resolve_device(device)
    if teacher_logits is None and labels is None:
        raise DataError("nothing to learn from: give a teacher model, labels, or both")
    n = len(next(iter(arrays.values())))
    n_val = int(round(n * config.val_fraction)) if config.val_fraction else 0
    if config.val_fraction and (n_val < 1 or n - n_val < 1):
        raise DataError(f"{n} samples are too few for a validation split of {config.val_fraction}: give more "
                        "samples, or --val-fraction 0 (val_fraction=0) to keep the last epoch without one")
    feature_pairs = list(config.features.items()) if config.feature_weight else []
    if feature_pairs and teacher_model is None:
        raise DataError("feature distillation (--feature) needs the teacher model: add --teacher (teacher=)")
    shift = config.augment_shift
    if shift and not any(a.ndim == 4 for a in arrays.values()):
        shapes = {k: a.shape for k, a in arrays.items()}
        raise DataError(f"augment_shift needs an image input [N, C, H, W]; inputs are {shapes}; "
                        "set augment_shift=0 (--augment-shift 0)")
    if shift and teacher_logits is not None and teacher_model is None:
        raise DataError("distilling on shifted samples needs the teacher model to label them; pass teacher_model")
    feature_session = (
        make_session(_with_outputs(teacher_model, [t for _, t in feature_pairs]), what="teacher")
        if feature_pairs else None
    )  # fmt: skip
    logit_session = (
        make_session(teacher_model, what="teacher") if shift and teacher_logits is not None else None
    )  # fmt: skip
    rng = np.random.default_rng(config.seed)
    aug_rng = np.random.default_rng([config.seed, 1])  # its own stream: shuffling is the same with/without it
    order = rng.permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
    t_all = None if teacher_logits is None else np.ascontiguousarray(teacher_logits, np.float32)
    y_all = None if labels is None else torch.from_numpy(labels).to(dev)
    hard_w = config.hard_weight if y_all is not None else 0.0
    soft_w = config.soft_weight if t_all is not None else 0.0
    wanted = [student.output_names[0]] + [s for s, _ in feature_pairs]
    x_train = {k: np.ascontiguousarray(arrays[k][train_idx]) for k in student.input_names}
    x_val = {k: np.ascontiguousarray(arrays[k][val_idx]) for k in student.input_names}
    t_train = None if t_all is None else torch.from_numpy(t_all[train_idx]).to(dev)
    t_val = None if t_all is None else torch.from_numpy(t_all[val_idx]).to(dev)
    y_train = None if y_all is None else y_all[torch.from_numpy(train_idx).to(dev)]
    y_val = None if y_all is None else y_all[torch.from_numpy(val_idx).to(dev)]

    def on_device(xs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(xs[k]).to(dev) for k in student.input_names}

    x_train_t, x_val_t = on_device(x_train), on_device(x_val)  # once: an unshifted epoch reuses them

    def epoch_data() -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], torch.Tensor | None]:
        """The training split for one epoch, on the host and on the device: shifted copies or as is."""
        if not shift:
            return x_train, x_train_t, t_train
        xs = {k: shift_images(a, shift, aug_rng) if a.ndim == 4 else a for k, a in x_train.items()}
        if logit_session is None:
            return xs, on_device(xs), None
        out = logit_session.get_outputs()[0].name
        z = [
            logit_session.run([out], {k: a[s : s + 256] for k, a in xs.items()})[0]
            for s in range(0, len(train_idx), 256)
        ]
        return xs, on_device(xs), torch.from_numpy(np.concatenate(z).astype(np.float32)).to(dev)

    def batch_loss(
        xs: Mapping[str, np.ndarray], xt: Mapping[str, torch.Tensor], pos: np.ndarray,
        z_t_all: torch.Tensor | None, y_all_: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        it = torch.from_numpy(pos).to(dev)
        outs = student.evaluate([xt[k][it] for k in student.input_names], wanted)
        z_s = outs[0]
        z_t = z_t_all[it] if z_t_all is not None else z_s.detach()
        y = y_all_[it] if y_all_ is not None else None
        loss = distillation_loss(
            z_s, z_t, y, temperature=config.temperature, hard_weight=hard_w, soft_weight=soft_w,
            distill=config.distill, class_axis=config.class_axis,
        )
        if feature_pairs:
            feeds = {k: xs[k][pos] for k in student.input_names}
            teacher_feats = feature_session.run([t for _, t in feature_pairs], feeds)
            for f_s, f_t in zip(outs[1:], teacher_feats, strict=True):
                if tuple(f_s.shape) != f_t.shape:
                    raise DataError(
                        f"feature pair shapes differ: student {tuple(f_s.shape)} vs teacher {f_t.shape}; "
                        "distil only values whose shapes the compression kept"
                    )
                loss = loss + config.feature_weight * F.mse_loss(f_s, torch.from_numpy(f_t).to(dev))
        if config.sparsity:
            loss = loss + config.sparsity * sparsity_penalty(student, student_model)
        return loss

    def val_loss() -> float:
        if not n_val:
            return math.nan
        student.eval()
        total = 0.0
        with torch.no_grad():
            for s in range(0, n_val, 256):
                pos = np.arange(s, min(s + 256, n_val))
                total += float(batch_loss(x_val, x_val_t, pos, t_val, y_val)) * len(pos)
        return total / n_val

    train_hist: list[float] = []
    val_hist: list[float] = []
    batch_size = config.batch_size or default_batch_size(len(train_idx))
    steps_per_epoch = -(-len(train_idx) // batch_size)
    start = time.perf_counter()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UnsupportedModelError("the student has no trainable float weights (Conv/Gemm/MatMul/norm parameters)")
    student.to(dev)
    with _deterministic(config.seed, threads, dev):
        few = min(2, len(train_idx))  # one tiny forward: does the loss reach the weights at all?
        probe = batch_loss(x_train, x_train_t, np.arange(few), t_train, y_train)
        if not probe.requires_grad:
            raise UnsupportedModelError(
                f"the student's first output {student.output_names[0]!r} does not depend on its weights through "
                "differentiable ops (an ArgMax or TopK index, a Cast to int); fine-tune a model that outputs logits"
            )
        factor = {id(p): student.lr_factors.get(name, 1.0) for name, p in student.named_onnx_parameters()}
        by_factor: dict[float, list] = {}  # one Adam group per learning-rate factor (QAT's scales: 0.01)
        for p in params:
            by_factor.setdefault(factor.get(id(p), 1.0), []).append(p)
        groups = [{"params": ps, "lr": config.lr * f} for f, ps in by_factor.items()]
        opt = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        total_steps = max(1, config.epochs * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
        best = val_loss()
        best_state = copy.deepcopy(student.state_dict())
        best_epoch, bad_epochs, stopped = 0, 0, False
        bar = tqdm(total=total_steps, desc="finetune", unit="step", disable=not progress, leave=False)
        for epoch in range(1, config.epochs + 1):
            student.train()
            perm = rng.permutation(len(train_idx))
            xs, xt, z_t = epoch_data()
            running = 0.0
            for s in range(0, len(perm), batch_size):
                idx = perm[s : s + batch_size]
                loss = batch_loss(xs, xt, idx, z_t, y_train)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach()) * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", epoch=epoch)
            train_hist.append(running / len(perm))
            current = val_loss()
            val_hist.append(current)
            log.info("epoch %d: train loss %.4f, validation loss %.4f", epoch, train_hist[-1], current)
            if not n_val or current < best:
                best, best_epoch, bad_epochs = current, epoch, 0
                best_state = copy.deepcopy(student.state_dict())
            else:
                bad_epochs += 1
                if bad_epochs >= config.patience:
                    stopped = True
                    break
        bar.close()
        student.load_state_dict(best_state)
    student.to("cpu")
    student.eval()
    return FinetuneHistory(
        tuple(train_hist), tuple(val_hist), best_epoch, stopped, len(train_idx), n_val, 0.0,
        time.perf_counter() - start, batch_size,
    )  # fmt: skip
