"""Shared fixtures. Helpers that tests import live in tests/helpers/."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("single_thread")`): tiny models
    run several times faster (no thread contention) and reductions are summed in one fixed order, so exact-equality
    checks do not depend on the machine's core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 0, 3, 3])
