"""Distillation loss and the fine-tune loop on a tiny CNN (teacher vs a perturbed student)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxpress.bridge import train as train_module  # noqa: E402
from onnxpress.bridge.convert import OnnxModule  # noqa: E402
from onnxpress.bridge.train import (  # noqa: E402
    FinetuneConfig,
    default_batch_size,
    distillation_loss,
    load_arrays,
    load_label_array,
    run_teacher,
    shift_images,
    sparsity_penalty,
    train_student,
)
from onnxpress.errors import DataError  # noqa: E402
from tests.test_bridge_graphs import tiny_cnn, tiny_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_distillation_loss_matches_numpy_formula():
    r = np.random.default_rng(0)
    zs, zt = r.standard_normal((6, 5)), r.standard_normal((6, 5)) * 3
    y = r.integers(0, 5, 6)
    t, lh, ls = 3.0, 0.7, 0.4
    lp_s, lp_t = _log_softmax(zs / t), _log_softmax(zt / t)
    kl = float(np.mean(np.sum(np.exp(lp_t) * (lp_t - lp_s), axis=1)))  # KL(p_t || p_s), batch mean
    ce = float(-np.mean(_log_softmax(zs)[np.arange(6), y]))
    want = lh * ce + ls * t * t * kl
    got = distillation_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), temperature=t, hard_weight=lh,
                            soft_weight=ls)  # fmt: skip
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_distillation_loss_is_zero_when_student_equals_teacher():
    z = torch.randn(4, 5, dtype=torch.float64)
    assert float(distillation_loss(z, z.clone(), temperature=2.0)) == pytest.approx(0.0, abs=1e-12)


def _setup(n=96):
    teacher = tiny_cnn(gain=4.0)
    student_model = tiny_cnn(noise=0.5, gain=4.0)
    arrays = {"input": tiny_data(n)}
    logits = run_teacher(teacher, arrays, ["logits"])[0]
    return teacher, student_model, arrays, logits


def test_one_step_lowers_the_kd_loss():
    """One Adam step on one batch lowers the distillation loss on that batch."""
    _, student_model, arrays, logits = _setup(32)
    student = OnnxModule(student_model)
    x, zt = torch.from_numpy(arrays["input"]), torch.from_numpy(logits)
    torch.manual_seed(0)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    before = distillation_loss(student(x), zt, temperature=4.0)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = distillation_loss(student(x), zt, temperature=4.0)
    assert float(after) < float(before.detach())


def test_training_brings_student_closer_to_teacher_and_is_deterministic():
    _, student_model, arrays, logits = _setup()
    cfg = FinetuneConfig(epochs=4, lr=3e-3, batch_size=16, val_fraction=0.25, patience=10, seed=3)
    weights, hists = [], []
    for _ in range(2):
        student = OnnxModule(student_model)
        hists.append(train_student(student, student_model, arrays, logits, None, cfg))
        weights.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    h = hists[0]
    assert h.train_samples == 72 and h.val_samples == 24
    assert len(h.train_loss) == 4
    assert min(h.val_loss) < h.val_loss[0] or h.best_epoch > 0
    with torch.no_grad():
        before = OnnxModule(student_model)(torch.from_numpy(arrays["input"])).numpy()
        after = student(torch.from_numpy(arrays["input"])).numpy()
    err = lambda z: float(np.mean((z - logits) ** 2))  # noqa: E731
    assert err(after) < 0.7 * err(before)


def test_early_stopping_keeps_the_best_epoch():
    """A learning rate far too high makes validation worse; the kept weights are the best epoch's."""
    _, student_model, arrays, logits = _setup()
    cfg = FinetuneConfig(epochs=6, lr=5.0, batch_size=16, val_fraction=0.25, patience=2, seed=0)
    student = OnnxModule(student_model)
    h = train_student(student, student_model, arrays, logits, None, cfg)
    assert h.stopped_early
    assert len(h.val_loss) < 6
    best = [h.val_loss[h.best_epoch - 1]] if h.best_epoch else []
    assert all(v >= min([*best, *h.val_loss]) for v in h.val_loss)


@pytest.mark.parametrize(("samples", "batch"), [(1, 16), (450, 16), (895, 16), (896, 32), (1791, 32), (1792, 64),
                                                (10**6, 64)])
def test_default_batch_size_gives_small_data_enough_steps(samples, batch):
    """16..64, a power of two, and at least 28 steps an epoch whenever a batch above 16 is chosen."""
    assert default_batch_size(samples) == batch
    assert batch == 16 or samples // batch >= 28


def test_unset_batch_size_follows_the_training_split():
    """No batch_size: the run takes default_batch_size of its training samples (48 - 12 held out: 16 a step)."""
    _, student_model, arrays, logits = _setup(48)
    h = train_student(OnnxModule(student_model), student_model, arrays, logits, None,
                      FinetuneConfig(epochs=1, val_fraction=0.25))
    assert (h.train_samples, h.batch_size) == (36, 16)
    h = train_student(OnnxModule(student_model), student_model, arrays, logits, None,
                      FinetuneConfig(epochs=1, val_fraction=0.25, batch_size=5))
    assert h.batch_size == 5


def test_hard_labels_only_and_nothing_to_learn():
    _, student_model, arrays, _ = _setup(48)
    labels = np.arange(48) % 5
    cfg = FinetuneConfig(epochs=1, batch_size=16, val_fraction=0.0)
    h = train_student(OnnxModule(student_model), student_model, arrays, None, labels, cfg)
    assert len(h.train_loss) == 1 and np.isfinite(h.train_loss[0])
    with pytest.raises(DataError, match="nothing to learn"):
        train_student(OnnxModule(student_model), student_model, arrays, None, None, cfg)


def test_feature_distillation_shapes_must_match():
    teacher, student_model, arrays, logits = _setup(32)
    cfg = FinetuneConfig(epochs=1, batch_size=16, val_fraction=0.0, feature_weight=1.0, features={"r2": "r2"})
    student = OnnxModule(student_model)
    h = train_student(student, student_model, arrays, logits, None, cfg, teacher_model=teacher)
    assert np.isfinite(h.train_loss[0])
    bad = FinetuneConfig(epochs=1, batch_size=16, val_fraction=0.0, feature_weight=1.0, features={"r2": "r1"})
    with pytest.raises(DataError, match="shapes differ"):
        train_student(OnnxModule(student_model), student_model, arrays, logits, None, bad, teacher_model=teacher)


def test_sparsity_penalty_shrinks_channel_norms():
    """Group-L1 on Conv output channels (no BN in the graph) lowers the summed channel norms."""
    _, student_model, arrays, logits = _setup(48)
    base = OnnxModule(student_model)
    before = float(sparsity_penalty(base, student_model).detach())
    cfg = FinetuneConfig(epochs=5, lr=5e-2, batch_size=16, val_fraction=0.0, sparsity=1.0, soft_weight=0.0)
    student = OnnxModule(student_model)
    train_student(student, student_model, arrays, logits, None, cfg)
    assert float(sparsity_penalty(student, student_model).detach()) < 0.8 * before


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        FinetuneConfig(temperature=0)


def test_load_arrays_and_labels(tmp_path):
    model = tiny_cnn()
    x = tiny_data(10)
    path = tmp_path / "d.npz"
    np.savez(path, input=x, labels=np.arange(10))
    arrays = load_arrays(str(path), model)
    np.testing.assert_array_equal(arrays["input"], x)
    assert load_label_array(str(path), 10).tolist() == list(range(10))
    with pytest.raises(DataError):
        load_label_array(np.arange(3), 10)
    with pytest.raises(DataError):
        load_arrays({"input": np.full((2, 1, 8, 8), np.nan, np.float32)}, model)


def test_shift_images_translates_with_replicated_borders():
    """Each image moves by its own (dy, dx) in [-s, s]²; uncovered pixels repeat the border."""
    x = np.arange(3 * 2 * 5 * 6, dtype=np.float32).reshape(3, 2, 5, 6)
    np.testing.assert_array_equal(shift_images(x, 0, np.random.default_rng(0)), x)
    got = shift_images(x, 2, np.random.default_rng(4))
    d = np.random.default_rng(4).integers(-2, 3, size=(3, 2))  # the draws shift_images makes
    assert (np.abs(d) > 0).any()
    for k, (dy, dx) in enumerate(d):
        rows = np.clip(np.arange(5) - dy, 0, 4)
        cols = np.clip(np.arange(6) - dx, 0, 5)
        np.testing.assert_array_equal(got[k], x[k][:, rows][:, :, cols])
        # the interior is a plain translation of the original
        np.testing.assert_array_equal(
            got[k, :, max(dy, 0) : 5 + min(dy, 0), max(dx, 0) : 6 + min(dx, 0)],
            x[k, :, max(-dy, 0) : 5 + min(-dy, 0), max(-dx, 0) : 6 + min(-dx, 0)],
        )
    assert x[0, 0, 0, 0] == 0  # input untouched
    with pytest.raises(DataError, match="images"):
        shift_images(x[0], 1, np.random.default_rng(0))
    with pytest.raises(DataError, match="smaller"):
        shift_images(x, 5, np.random.default_rng(0))


def test_augmented_distillation_relabels_the_shifted_samples():
    """Student == teacher: with the teacher re-run on each epoch's shifted copies the KD loss stays 0.

    Stale (unshifted) teacher logits would give a clearly positive loss on the same samples. The
    learning rate is tiny because Adam's steps have size ~lr even for the ~1e-7 gradients that the
    torch vs onnxruntime rounding leaves.
    """
    teacher, _, arrays, logits = _setup(48)
    shifted = shift_images(arrays["input"], 2, np.random.default_rng(0))
    stale = run_teacher(teacher, {"input": shifted}, ["logits"])[0]
    assert float(distillation_loss(torch.from_numpy(stale), torch.from_numpy(logits))) > 0.05
    cfg = FinetuneConfig(epochs=2, lr=1e-9, batch_size=16, val_fraction=0.25, augment_shift=2, hard_weight=0.0)
    student = OnnxModule(teacher)
    h = train_student(student, teacher, arrays, logits, None, cfg, teacher_model=teacher)
    assert max(h.train_loss) < 1e-6 and max(h.val_loss) < 1e-6


def test_hard_and_kd_runs_see_the_same_shifted_samples(monkeypatch):
    """Augmentation has its own seeded stream: a label-only run and a KD run of one seed shift alike."""
    teacher, student_model, arrays, logits = _setup(48)
    labels = np.arange(48) % 5
    seen: list[list[bytes]] = [[], []]
    real = train_module.shift_images
    for k, (t_logits, t_model) in enumerate([(None, None), (logits, teacher)]):
        def spy(x, shift, rng, store=seen[k]):
            out = real(x, shift, rng)
            store.append(out.tobytes())
            return out

        monkeypatch.setattr(train_module, "shift_images", spy)
        cfg = FinetuneConfig(epochs=2, batch_size=16, val_fraction=0.25, augment_shift=1, seed=5)
        train_student(OnnxModule(student_model), student_model, arrays, t_logits, labels, cfg, teacher_model=t_model)
    assert len(seen[0]) == 2 and seen[0] == seen[1]
    assert seen[0][0] != seen[0][1]  # fresh shifts each epoch


def test_augmentation_errors():
    teacher, student_model, arrays, logits = _setup(32)
    cfg = FinetuneConfig(epochs=1, batch_size=16, val_fraction=0.0, augment_shift=1)
    with pytest.raises(DataError, match="teacher model"):
        train_student(OnnxModule(student_model), student_model, arrays, logits, None, cfg)
    flat = {"input": arrays["input"].reshape(32, 64)}
    with pytest.raises(DataError, match="image input"):
        train_student(OnnxModule(student_model), student_model, flat, logits, None, cfg, teacher_model=teacher)
    with pytest.raises(ValueError, match="augment_shift"):
        FinetuneConfig(augment_shift=-1)


def test_distillation_loss_over_a_class_axis_and_mse():
    """class_axis=1 on [N, C, H, W] equals the same logits with C moved last; mse is the plain mean square."""
    zs, zt = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, dtype=torch.float64)
    moved = distillation_loss(zs.movedim(1, -1), zt.movedim(1, -1), temperature=2.0)
    assert float(distillation_loss(zs, zt, temperature=2.0, class_axis=1)) == pytest.approx(float(moved), rel=1e-12)
    mse = distillation_loss(zs, zt, distill="mse", temperature=2.0)
    assert float(mse) == pytest.approx(float(((zs - zt) ** 2).mean()), rel=1e-12)
