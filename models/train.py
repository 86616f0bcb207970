"""Deterministic training of the reference networks on digits32.

Determinism: a fixed seed per model (``torch.manual_seed``), ``torch.use_deterministic_algorithms``,
a fixed thread count (results of float reductions can depend on it), no DataLoader workers, and
every random draw (shuffling, shift augmentation, dropout, init) from torch's seeded generator.
Rebuilding on the same machine and versions gives the same weights bit for bit; another CPU
(other SIMD kernels) or torch version may differ in the last bits and so by a sample or two.

Recipe: AdamW with a one-cycle learning rate (warm up 20%, cosine down), cross-entropy with
label smoothing 0.05, batch 64, and random shifts of up to ``shift`` pixels (of 32) padded with
the background value.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import MEAN, STD, Digits32

__all__ = ["TrainConfig", "accuracy", "predict", "set_determinism", "train"]

log = logging.getLogger(__name__)

NUM_THREADS = 1  # robust when the 2 cores are shared; results do not depend on core count
BACKGROUND = -MEAN / STD  # a zero pixel after normalisation


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int
    lr: float
    weight_decay: float = 5e-4
    batch_size: int = 64
    shift: int = 2
    label_smoothing: float = 0.05
    seed: int = 0


def set_determinism(seed: int) -> None:
    """Seed torch, force deterministic kernels and a fixed thread count."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(NUM_THREADS)


def _shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-shift, shift]^2, filling background."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=BACKGROUND)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(model: nn.Module, data: Digits32, cfg: TrainConfig) -> nn.Module:
    """Train ``model`` in place on ``data.train_*``; return it in eval mode."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = torch.from_numpy(data.train_input)
    y_all = torch.from_numpy(data.train_labels)
    steps_per_epoch = -(-len(x_all) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = _shift(x_all[idx], cfg.shift, gen)
            loss = loss_fn(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch == cfg.epochs - 1 or epoch % 5 == 0:
            acc = accuracy(predict(model, data.test_input), data.test_labels)
            log.info(
                "epoch %3d  loss %.4f  test acc %.4f  (%.0fs)",
                epoch,
                total / len(x_all),
                acc,
                time.perf_counter() - start,
            )
    return model.eval()


def predict(model: nn.Module, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of ``model`` in eval mode, as float32 numpy."""
    model.eval()
    with torch.no_grad():
        out = [model(torch.from_numpy(inputs[i : i + batch_size])).numpy() for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out).astype(np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(axis=1) == labels).mean())
