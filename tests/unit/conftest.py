"""Fixtures for the unit tests."""

from __future__ import annotations

import faiss
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: threading only adds contention on the shared 2-core machine."""
    before, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)
    faiss.omp_set_num_threads(before_faiss)
