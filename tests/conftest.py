"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from data_prep.shared import shared_data_dir

# Duplicate config keys are errors in tests (monai-bundle.md §1.4).
os.environ.setdefault("MONAI_FAIL_ON_DUPLICATE_CONFIG", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared example data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data not found (set SHARED_DATA or place it at ../shared/data)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny tensors (2 OpenMP threads on 2 shared cores can be 10x slower).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
