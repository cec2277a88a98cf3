"""Speed benchmarks (pytest-benchmark): `python -m pytest bench --benchmark-json=OUT.json`.

Not part of `pytest tests` (pyproject's testpaths is tests/), and they gate nothing: a time measured on
one machine says nothing about another. bench/README.md says how to gate speed on one's own runner.
"""
import pytest
import torch

# One thread, as in tests/: stable figures on a shared machine, and the same work on every runner.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GENBENCH_INCEPTION_WEIGHTS", raising=False)
