import pytest
import torch

# One thread: the tiny test networks gain nothing from two, and two threads per process slow
# everything down many times over when anything else runs on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_download_and_quiet(monkeypatch, tmp_path):
    # Never touch the user's torch hub cache (Inception weights lookup) or the network in tests.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GENBENCH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("CI", "true")
