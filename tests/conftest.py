"""Shared test configuration.

Tests run on the CPU. Models are built with `pretrained=False`; nothing is downloaded.
"""

import os

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  load triton's LLVM before any viewer loads Mesa's (they clash)

os.environ.setdefault("NAPARI_XT_NO_DOWNLOAD", "1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_torch_one_thread():
    """Seeded, and one intra-op thread: the models in tests are small, and on 2 (often
    shared) cores thread barriers cost more than they give."""
    import torch

    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
