"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def torch_one_thread():
    """Run a torch test on one thread (deterministic and kind to the 2 shared cores), then restore."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture()
def kd_files(tmp_path):
    """A fine-tune set-up under tmp_path: teacher.onnx, a perturbed student.onnx, d.npz (96 inputs + labels).

    The labels are the teacher's own predictions, so the teacher is right by construction.
    """
    import numpy as np
    import onnx

    from tests.graphs import run
    from tests.test_bridge_graphs import tiny_cnn, tiny_data

    teacher, student = tiny_cnn(gain=4.0), tiny_cnn(noise=0.5, gain=4.0)
    paths = {"teacher": tmp_path / "teacher.onnx", "student": tmp_path / "student.onnx", "data": tmp_path / "d.npz"}
    onnx.save(teacher, str(paths["teacher"]))
    onnx.save(student, str(paths["student"]))
    x = tiny_data(96)
    np.savez(paths["data"], input=x, labels=run(teacher, {"input": x})[0].argmax(1))
    return paths
