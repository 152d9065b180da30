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


@pytest.fixture(autouse=True)
def _no_modal_dialogs(monkeypatch):
    """A message box would wait for a click that never comes: in tests it fails instead.
    Tests that expect a question answer it by replacing the function that asks (e.g.
    `run_widget.confirm_replace`)."""
    try:
        from qtpy.QtWidgets import QMessageBox
    except Exception:  # no Qt binding in this environment: nothing can be shown
        return

    def modal(*args, **kwargs):
        raise AssertionError(f"a modal dialog would block the test: {args[1:3]}")

    for name in ("question", "warning", "critical", "information"):
        monkeypatch.setattr(QMessageBox, name, staticmethod(modal))


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of 2 worker processes for a test module (made as `--workers 2`
    makes it), reached by its scheduler's address as `--scheduler` does. Not one for the
    whole session: its scheduler's threads would run beside every other test."""
    import distributed  # installed with the test extras

    from napari_xt.distributed.cluster import local_cluster

    local = local_cluster(distributed.LocalCluster, 2)
    yield local.scheduler_address
    local.close()
