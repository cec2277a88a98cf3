import math

import pytest
import torch

from genbench import data, evaluators
from genbench.device_metrics import precision_recall
from genbench.modes import (MODE_KEYS, classifier_mode_stats, manifold_membership, mixture_mode_stats,
                            reference_radii, stack_probs)
from genbench.scoring.extractor import build_extractor, extract
from genbench.scoring.reference import Reference
from genbench.scoring.score import score_features


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
    # modes are counted from confident rows only (argmax 0, 1 (first of ties), 2); row 4 is left out
    assert st["modes_covered"] == 3 and st["mode_kl"] == pytest.approx(0.0, abs=1e-12)


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


# --------------------------------------------------------------------------- the k-NN manifold filter


def _gaussian(n, d, shift, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.mark.parametrize("block", [64, 10_000])
def test_manifold_membership_mean_is_precision(block):
    """Per-sample membership is precision's test: its mean equals device_metrics' precision exactly, in
    blocks or not, and it picks out the samples on the reference's side."""
    real = _gaussian(500, 16, 0.0, 0)
    fake = torch.cat([_gaussian(300, 16, 0.0, 1), _gaussian(200, 16, 8.0, 2)])   # 200 far off
    m = manifold_membership(fake, real, block=block)
    assert m.dtype == torch.bool and m.shape == (500,)
    p, _ = precision_recall(fake, real, block=block)
    assert m.float().mean().item() == p
    assert not m[300:].any() and m[:300].float().mean() > 0.5
    assert torch.equal(m, manifold_membership(fake, real, block=10_000 if block == 64 else 64))


def test_manifold_membership_edge_cases():
    real = _gaussian(50, 4, 0.0, 0)
    fake = real[:3].clone()
    fake[1, 2] = float("nan")
    assert manifold_membership(fake, real).tolist() == [True, False, True]   # a NaN sample is never on it
    assert reference_radii(real) is reference_radii(real)                     # once per reference
    with pytest.raises(ValueError, match="more than k = 3"):
        manifold_membership(fake, real[:3])


def test_classifier_stats_count_only_on_manifold_samples():
    probs = torch.nn.functional.one_hot(torch.arange(100) % 10, 10).double()
    st = classifier_mode_stats(probs, on_manifold=torch.arange(100) < 20, min_count=1)
    assert st["high_quality_frac"] == pytest.approx(0.2) and st["modes_covered"] == 10
    st = classifier_mode_stats(probs, on_manifold=torch.arange(100) % 10 < 2, min_count=1)
    assert st["modes_covered"] == 2 and st["mode_kl"] == pytest.approx(math.log(5))
    st = classifier_mode_stats(probs, on_manifold=torch.zeros(100, dtype=torch.bool))
    assert st["modes_covered"] == 0 and st["high_quality_frac"] == 0.0 and st["mode_kl"] == pytest.approx(math.log(10))
    with pytest.raises(ValueError, match="99 entries"):
        classifier_mode_stats(probs, on_manifold=torch.ones(99, dtype=torch.bool))


# --------------------------------------------------------------------------- the shipped classifiers
# A few hundred images each (bench/mode_robustness.py has the full-size numbers): noise must reach no
# mode although the classifiers are confident on it (digits: 98 % of noise images at >= 0.5).

fashion_data = pytest.mark.skipif(
    not (data.FASHION_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not in {data.FASHION_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)")


def _features(name, x):
    ext = build_extractor(name, torch.device("cpu"))
    return extract(ext, (x[i:i + 500] for i in range(0, len(x), 500)))


def _noise(like, n, seed=0):
    return torch.randint(0, 256, (n, *like.shape[1:]), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _modes(name, fake, ref):
    """The modes group as a run computes it: score_features -> modes_group."""
    return score_features(fake, Reference(ref), evaluators.EXTRACTORS[name], ["modes"], seed=0)


@pytest.fixture(scope="module")
def digits_feats():
    ref, test = data.load("digits", "train"), data.load("digits", "test")   # the smoke suite's reference
    two = test.x[test.y <= 1]
    return {"ref": _features("digits", ref.x), "noise": _features("digits", _noise(test.x, 300)),
            "held_out": _features("digits", test.x), "two": _features("digits", two)}


@pytest.fixture(scope="module")
def fashion_feats():
    ref, train = data.load("fashion", "test"), data.load("fashion", "train")
    held = train.x[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:300]]
    # sandal (5) and bag (8): the classifier keeps them apart (T-shirts it calls shirts 10 % of the time)
    two = torch.cat([train.x[train.y == 5][:150], train.x[train.y == 8][:150]])
    return {"ref": _features("fashion", ref.x[:1000]), "noise": _features("fashion", _noise(held, 300)),
            "held_out": _features("fashion", held), "two": _features("fashion", two)}


def test_digits_noise_reaches_no_mode(digits_feats):
    st = _modes("digits", digits_feats["noise"], digits_feats["ref"])
    assert st["modes_covered"] <= 1 and st["high_quality_frac"] < 0.05, st
    # the classifier alone is fooled: what the old rule counted
    old = classifier_mode_stats(torch.softmax(digits_feats["noise"]["logits"].double(), 1))
    assert old["high_quality_frac"] > 0.5


def test_digits_held_out_and_two_classes(digits_feats):
    st = _modes("digits", digits_feats["held_out"], digits_feats["ref"])
    assert st["modes_covered"] >= 9 and st["high_quality_frac"] > 0.7 and st["mode_kl"] < 0.1, st
    two = _modes("digits", digits_feats["two"], digits_feats["ref"])
    assert two["modes_covered"] == 2 and two["mode_kl"] > math.log(10) - math.log(2) - 0.1, two


@fashion_data
@pytest.mark.slow
def test_fashion_noise_reaches_no_mode(fashion_feats):
    st = _modes("fashion", fashion_feats["noise"], fashion_feats["ref"])
    assert st["modes_covered"] <= 1 and st["high_quality_frac"] < 0.05, st


@fashion_data
@pytest.mark.slow
def test_fashion_held_out_and_two_classes(fashion_feats):
    st = _modes("fashion", fashion_feats["held_out"], fashion_feats["ref"])
    assert st["modes_covered"] >= 9 and st["high_quality_frac"] > 0.6, st
    two = _modes("fashion", fashion_feats["two"], fashion_feats["ref"])
    assert two["modes_covered"] == 2, two


@fashion_data
@pytest.mark.slow
def test_stacked_fashion_noise_reaches_no_mode():
    """fashion-stacked: joint logits over the 1000 modes, 384-d features (three channels side by side)."""
    ref = data.load("stacked-fashion", "test", size=300).x
    feats = _features("fashion-stacked", torch.cat([ref, _noise(ref, 100)]))
    ref_f, noise_f = ({k: v[s] for k, v in feats.items()} for s in (slice(0, 300), slice(300, None)))
    assert ref_f["logits"].shape == (300, 1000) and ref_f["features"].shape == (300, 384)
    st = _modes("fashion-stacked", noise_f, ref_f)
    assert st["modes_total"] == 1000 and st["modes_covered"] <= 1 and st["high_quality_frac"] < 0.05, st


def test_precision_recall_convention_on_a_collapsed_generator(digits_feats):
    """Real images of 2 of the 10 classes, against the full reference: every sample is realistic (high
    precision) but most of the data is never produced (low recall). A library once shipped the two
    swapped; held-out images of every class score both high."""
    p, r = precision_recall(digits_feats["two"]["features"], digits_feats["ref"]["features"])
    assert p > 0.8 and r < 0.3, (p, r)
    p, r = precision_recall(digits_feats["held_out"]["features"], digits_feats["ref"]["features"])
    assert p > 0.8 and r > 0.8, (p, r)


@fashion_data
@pytest.mark.slow
def test_precision_recall_convention_on_fashion(fashion_feats):
    # 300 samples' k-NN balls are wide (sandals' reach the sneakers): recall 0.38 here, 0.18 for 380
    # samples against 10,000 reference images (bench/mode_robustness.py)
    p, r = precision_recall(fashion_feats["two"]["features"], fashion_feats["ref"]["features"])
    assert p > 0.8 and r < 0.5 and p - r > 0.4, (p, r)
