"""Shared set-up of the unit tests."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny GEMMs on a shared 2-core machine: OpenMP spin-waiting costs far more than the math.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
