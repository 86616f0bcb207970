"""The digits data set at 1x32x32, with a fixed split.

scikit-learn's ``load_digits`` (1,797 images, 8x8, values 0..16) is split 80/20, stratified,
``random_state=0`` (1,437 train / 360 test). Each image is preprocessed as

    x32 = (bilinear_upsample(x8 / 16, 32x32, align_corners=False) - MEAN) / STD

with MEAN/STD fixed constants (measured once on the training split: 0.3054 / 0.3237), so the
preprocessing does not depend on which samples are present. The calibration set is the first
``N_CALIB`` samples of a seeded permutation of the training split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["MEAN", "N_CALIB", "SEED", "STD", "Digits32", "load_digits32", "upsample"]

MEAN = 0.305
STD = 0.324
SEED = 0
N_CALIB = 500
TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Digits32:
    """Preprocessed digits: float32 images [N,1,32,32] and int64 labels [N]."""

    train_input: np.ndarray
    train_labels: np.ndarray
    test_input: np.ndarray
    test_labels: np.ndarray
    calib_input: np.ndarray


def upsample(images8: np.ndarray) -> np.ndarray:
    """Map raw 8x8 digits (0..16) to normalised float32 [N,1,32,32]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images8, dtype=np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).numpy().astype(np.float32)


def load_digits32() -> Digits32:
    """Load, split and preprocess digits; deterministic for a given scikit-learn/torch."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images,
        digits.target,
        test_size=TEST_FRACTION,
        random_state=SEED,
        stratify=digits.target,
    )
    train_input = upsample(x_train)
    calib_idx = np.random.default_rng(SEED).permutation(len(train_input))[:N_CALIB]
    return Digits32(
        train_input=train_input,
        train_labels=y_train.astype(np.int64),
        test_input=upsample(x_test),
        test_labels=y_test.astype(np.int64),
        calib_input=train_input[np.sort(calib_idx)],
    )


def save_npz(data: Digits32, folder: str) -> dict[str, str]:
    """Write ``digits32.npz``, ``digits32_calib.npz`` and ``digits32_test.npz``; return paths."""
    import os

    paths = {
        "digits32": os.path.join(folder, "digits32.npz"),
        "calib": os.path.join(folder, "digits32_calib.npz"),
        "test": os.path.join(folder, "digits32_test.npz"),
    }
    _savez_reproducible(
        paths["digits32"],
        calib_input=data.calib_input,
        test_input=data.test_input,
        test_labels=data.test_labels,
    )
    _savez_reproducible(paths["calib"], input=data.calib_input)
    _savez_reproducible(paths["test"], input=data.test_input, labels=data.test_labels)
    return paths


def _savez_reproducible(path: str, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so rebuilds are byte-identical.

    ``np.load`` reads the result as usual.
    """
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
