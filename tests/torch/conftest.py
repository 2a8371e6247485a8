"""Fixtures the torch tests share."""

import pytest
import torch


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
