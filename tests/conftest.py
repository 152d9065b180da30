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
def _seed_torch():
    import torch

    torch.manual_seed(0)
    yield
