import os

import pytest
import torch

# Keep CPU tests predictable on a 2-core machine shared with other processes.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _no_download_and_quiet(monkeypatch, tmp_path):
    # Never touch the user's torch hub cache (Inception weights lookup) or the network in tests.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GENBENCH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("CI", "true")
