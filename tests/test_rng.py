import torch

from genbench.rng import SeedRNG


def test_batch_split_gives_identical_streams():
    whole = SeedRNG.for_run(3, 10)
    a = whole.randn(2, 5)
    b = whole.rand(7)
    parts = [SeedRNG.for_run(3, 10)[i:j] for i, j in ((0, 4), (4, 5), (5, 10))]
    a2 = torch.cat([p.randn(2, 5) for p in parts])
    b2 = torch.cat([p.rand(7) for p in parts])
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_offset_matches_slice_and_runs_differ():
    assert torch.equal(SeedRNG.for_run(1, 6)[2:6].randn(4), SeedRNG.for_run(1, 4, offset=2).randn(4))
    assert not torch.equal(SeedRNG.for_run(1, 4).randn(4), SeedRNG.for_run(2, 4).randn(4))


def test_moments_and_range():
    x = SeedRNG.for_run(0, 2000).randn(500)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert abs((x ** 4).mean().item() - 3) < 0.05          # Gaussian kurtosis
    u = SeedRNG.for_run(0, 2000).rand(500)
    assert 0 < u.min().item() and u.max().item() < 1
    assert abs(u.mean().item() - 0.5) < 0.005


def test_categorical_follows_probabilities():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.7])).expand(20000, 3)
    draws = SeedRNG.for_run(5, 20000).categorical(logits)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.015)
