import math

import pytest
import torch

from genbench import data
from genbench.modes import MODE_KEYS, classifier_mode_stats, mixture_mode_stats, stack_probs


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_true_mixture_covers_every_mode(name):
    d = data.load(name, "test", seed=3, size=2500)
    st = mixture_mode_stats(d.x, d.mode_centers, d.mode_std)
    assert set(st) == set(MODE_KEYS)
    k = len(d.mode_centers)
    assert st["modes_total"] == k and st["modes_covered"] == k
    # P(|N(0, s^2 I_2)| <= 3s) = 1 - exp(-9/2) = 0.9889 for a 2-D Gaussian
    assert st["high_quality_frac"] == pytest.approx(1 - math.exp(-4.5), abs=0.01)
    assert st["mode_kl"] < 0.03


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_single_gaussian_covers_one_mode(name):
    centers, std = data.mixture_centers(name)
    g = torch.Generator().manual_seed(0)
    pts = centers[2] + std * torch.randn(2500, 2, generator=g)
    st = mixture_mode_stats(pts, centers, std)
    assert st["modes_covered"] == 1
    assert st["mode_kl"] == pytest.approx(math.log(len(centers)), abs=1e-9)   # total collapse


def test_high_quality_fraction_on_constructed_points():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    std = 0.1
    pts = torch.tensor([
        [0.0, 0.0], [0.29, 0.0], [10.0, 0.2], [10.0, -0.299],   # within 3 std: high quality
        [0.31, 0.0], [5.0, 5.0], [10.0, 0.4],                   # beyond 3 std
        [float("nan"), 0.0],                                     # a diverged sample
    ])
    st = mixture_mode_stats(pts, centers, std, min_count=1)
    assert st["high_quality_frac"] == pytest.approx(4 / 8)
    assert st["modes_covered"] == 2
    assert st["mode_kl"] == pytest.approx(0.0, abs=1e-12)       # 2 and 2: even
    # 3 of 4 high-quality samples in one mode: KL = .75 log(1.5) + .25 log(.5)
    pts3 = torch.cat([pts, torch.tensor([[0.0, 0.1], [0.1, 0.0]])])
    st3 = mixture_mode_stats(pts3, centers, std, min_count=1)
    assert st3["mode_kl"] == pytest.approx(4 / 6 * math.log(4 / 6 * 2) + 2 / 6 * math.log(2 / 6 * 2))


def test_default_threshold_is_20_of_2500():
    centers, std = data.mixture_centers("ring8")
    pts = torch.cat([centers[0].expand(2481, 2), centers[1].expand(19, 2)])   # 2500 points
    assert mixture_mode_stats(pts, centers, std)["modes_covered"] == 1        # 19 < 20
    pts = torch.cat([centers[0].expand(2480, 2), centers[1].expand(20, 2)])
    assert mixture_mode_stats(pts, centers, std)["modes_covered"] == 2


def test_no_high_quality_samples_scores_like_collapse():
    centers, std = data.mixture_centers("grid25")
    st = mixture_mode_stats(torch.full((100, 2), 1.0), centers, std)          # between modes
    assert st["modes_covered"] == 0 and st["high_quality_frac"] == 0.0
    assert st["mode_kl"] == pytest.approx(math.log(25))


def test_classifier_stats_uniform_collapsed_and_confidence():
    k = 10
    labels = torch.arange(1000) % k
    probs = torch.nn.functional.one_hot(labels, k).double()
    st = classifier_mode_stats(probs)
    assert st == {"modes_covered": 10, "modes_total": 10, "high_quality_frac": 1.0,
                  "mode_kl": pytest.approx(0.0, abs=1e-12)}
    collapsed = classifier_mode_stats(torch.nn.functional.one_hot(torch.zeros(1000, dtype=torch.long), k).double())
    assert collapsed["modes_covered"] == 1 and collapsed["mode_kl"] == pytest.approx(math.log(10))
    # 3 of 4 rows confident at 0.5; row 4 spreads its mass (top prob 0.4)
    p = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.5, 0.5], [0.2, 0.2, 0.6], [0.4, 0.3, 0.3]])
    st = classifier_mode_stats(p, confidence=0.5, min_count=1)
    assert st["high_quality_frac"] == pytest.approx(0.75)
    assert st["modes_covered"] == 3        # argmax: 0, 1 (first of ties), 2, 0


def test_classifier_min_count_ignores_stray_predictions():
    # 995 samples of class 0, 5 strays of class 1: default threshold ceil(0.1*1000/10) = 10
    labels = torch.cat([torch.zeros(995, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    st = classifier_mode_stats(torch.nn.functional.one_hot(labels, 10).double())
    assert st["modes_covered"] == 1


def test_stack_probs_matches_stacked_mode_index():
    oh = lambda i: torch.nn.functional.one_hot(torch.tensor([i]), 10).double()   # noqa: E731
    joint = stack_probs(oh(3), oh(0), oh(7))
    assert joint.shape == (1, 1000) and int(joint.argmax()) == 307 and float(joint.sum()) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    ps = [torch.softmax(torch.randn(5, 10, generator=g), 1) for _ in range(3)]
    j = stack_probs(*ps)
    assert torch.allclose(j.sum(1), torch.ones(5, dtype=torch.float64))
    assert j[2, 123] == pytest.approx(float(ps[0][2, 1] * ps[1][2, 2] * ps[2][2, 3]))
    # 10,000 samples from the true stacked distribution reach (almost) all 1000 modes
    y = torch.randint(1000, (10_000,), generator=g)
    st = classifier_mode_stats(torch.nn.functional.one_hot(y, 1000).float())
    assert st["modes_covered"] >= 995 and st["mode_kl"] < 0.06
