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
