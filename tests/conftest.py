from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread: on a 2-core CI box the test processes (and the subprocesses some tests start)
# otherwise oversubscribe the cores, and small ops get ~10x slower. Results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """Tiny random-init SD-shaped components (real diffusers/transformers classes), built once."""
    from tokencompose.models import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random-init SD-shaped pipeline saved in diffusers layout (what users point --model at)."""
    from tokencompose.models import tiny_components

    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_components(seed=0).save(path)
    return path
