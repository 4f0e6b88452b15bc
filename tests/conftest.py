from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    """Tiny random-init SD-shaped components (real diffusers/transformers classes), built once."""
    from tokencompose.models import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
