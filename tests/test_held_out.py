"""Held-out numbers (nll_bpd and the families' extra metrics) do not depend on how the held-out set
is batched, nor on which images share a batch; the diffusion bound's pieces are right; the
discretized Gaussian likelihood is accurate far into its tails. CPU, tiny models; each test < 2 s."""
import math

import pytest
import torch

from genbench import data
from genbench.families import Batch, DataSpec, get_family
from genbench.families.diffusion import discretized_gaussian_log_likelihood, normal_kl, mean_flat, stratum_edges
from genbench.rng import SeedRNG
from genbench.scoring.likelihood import HELD_OUT_SEED, likelihood_metrics

LN2 = math.log(2.0)
# The conformance test's tiny diffusion (tests/test_conformance.py: TINY), plus the bound's strata.
DIFFUSION = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], timesteps=50, nll_timesteps=10)
VAE = dict(z_dim=4, channels=8, max_channels=16)
VQVAE = dict(num_codes=16, code_dim=4, channels=8, prior_channels=8, prior_layers=2)
SMALL_IMG = DataSpec((1, 8, 8), 10)
# 8x8 images and few steps; cosine, as the linear schedule's betas (rescaled by 1000/T) reach 1 below T = 50
SMALL_UNET = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, schedule="cosine")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "test", image_size=16)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh denoisers have zero output layers (eps = 0 everywhere): give them weights, so that the
    bound and eps-MSE depend on the network and on the draws."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _build(family, spec, **kw):
    torch.manual_seed(0)
    m = get_family(family)(spec, **kw)
    return _randomize(m) if family == "diffusion" else m.eval()


def _grid_images(n, spec=SMALL_IMG, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *spec.shape), generator=g).float() / 127.5 - 1.0


# ---------------------------------------------------------------- batch-size invariance

@pytest.mark.parametrize("family, params", [("diffusion", DIFFUSION), ("vae", VAE), ("vqvae", VQVAE)])
def test_held_out_metrics_do_not_depend_on_the_batch_size(digits, family, params):
    m = _build(family, digits.spec, **params)
    small = likelihood_metrics(m, digits, ["nll"], max_n=40, batch_size=7)
    whole = likelihood_metrics(m, digits, ["nll"], max_n=40, batch_size=40)
    assert set(small) == set(whole) and small
    assert ("nll_bpd" in whole) == (family != "vqvae")
    for k in whole:
        assert math.isfinite(whole[k]), k
        assert small[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-12), k
    if family == "diffusion":
        assert set(whole) == {"nll_bpd", "eps_mse"} and 1 < whole["nll_bpd"] < 30


@pytest.mark.parametrize("family, params", [
    ("diffusion", dict(SMALL_UNET, timesteps=20, nll_timesteps=4)),
    ("diffusion", dict(SMALL_UNET, timesteps=20, nll_timesteps=4, learn_sigma=True, class_cond=True)),
    ("vae", VAE), ("vae", dict(VAE, likelihood="gaussian")), ("vae", dict(VAE, likelihood="categorical")),
])
def test_an_image_gets_the_same_bound_whatever_shares_its_batch(family, params):
    spec = SMALL_IMG if family == "diffusion" else DataSpec((1, 16, 16), 10)
    m = _build(family, spec, **params)
    x, y = _grid_images(8, spec), torch.arange(8) % 10
    rng = SeedRNG.for_run(HELD_OUT_SEED, 8)
    whole = m.nll_bpd(Batch(x, y, rng))
    assert whole.shape == (8,) and torch.isfinite(whole).all()
    part = m.nll_bpd(Batch(x[2:5], y[2:5], rng[2:5]))
    assert torch.allclose(part, whole[2:5], rtol=1e-6, atol=0)
    # other images in the batch with image 3: its value does not move
    mixed = m.nll_bpd(Batch(torch.cat([x[3:4], _grid_images(4, spec, seed=1)]), torch.cat([y[3:4], y[:4]]),
                            SeedRNG(torch.cat([rng.seeds[3:4], SeedRNG.for_run(5, 4).seeds]))))
    assert mixed[0].item() == pytest.approx(whole[3].item(), rel=1e-6)
    # the draws are the image's: other streams give other numbers
    other = m.nll_bpd(Batch(x, y, SeedRNG.for_run(1, 8)))
    assert (other - whole).abs().max() > 1e-6 * whole.abs().max()


def test_estimates_are_deterministic_and_leave_the_streams_alone():
    m = _build("diffusion", SMALL_IMG, **SMALL_UNET, timesteps=20, nll_timesteps=4)
    x = _grid_images(4)
    a, b = m.nll_bpd(Batch(x)), m.nll_bpd(Batch(x))         # no streams: those of SeedRNG.for_run(0, B)
    assert torch.equal(a, b)
    assert torch.equal(a, m.nll_bpd(Batch(x, rng=SeedRNG.for_run(0, 4))))
    rng = SeedRNG.for_run(HELD_OUT_SEED, 4)
    batch = Batch(x, rng=rng)
    first = m.nll_bpd(batch)
    extra = m.extra_metrics(batch)
    assert rng.counter == 0                                  # a copy is drawn from, not the caller's
    assert torch.equal(first, m.nll_bpd(batch)) and extra == m.extra_metrics(batch)
    with pytest.raises(ValueError, match="streams"):
        m.nll_bpd(Batch(x, rng=rng[0:3]))
    v = _build("vae", DataSpec((1, 16, 16)), **VAE)
    xv = _grid_images(4, DataSpec((1, 16, 16)))
    assert torch.equal(v.nll_bpd(Batch(xv)), v.nll_bpd(Batch(xv)))


def test_diffusion_held_out_numbers_are_the_eval_models():
    m = _build("diffusion", SMALL_IMG, **{**SMALL_UNET, "dropout": 0.5}, timesteps=20, nll_timesteps=4)
    x = _grid_images(4)
    want_nll, want_extra = m.nll_bpd(Batch(x)), m.extra_metrics(Batch(x))
    m.train()                                              # dropout would draw from torch's global RNG
    assert torch.equal(m.nll_bpd(Batch(x)), want_nll) and m.extra_metrics(Batch(x)) == want_extra
    assert m.training and m.net.training                   # the caller's mode comes back


def test_diffusion_extra_metrics_chunks_change_nothing(monkeypatch):
    import genbench.families.diffusion as diffusion

    m = _build("diffusion", SMALL_IMG, **SMALL_UNET, timesteps=20,
               classifier=dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()))
    _randomize(m.classifier, seed=1)
    x, y = _grid_images(10), torch.arange(10) % 10
    batch = Batch(x, y, SeedRNG.for_run(HELD_OUT_SEED, 10))
    whole = m.extra_metrics(batch)
    monkeypatch.setattr(diffusion, "EXTRA_CHUNK", 3)
    chunked = m.extra_metrics(batch)
    assert set(whole) == {"eps_mse", "noisy_classifier_acc"}
    assert chunked["eps_mse"] == pytest.approx(whole["eps_mse"], rel=1e-6)
    assert chunked["noisy_classifier_acc"] == whole["noisy_classifier_acc"]
    # timesteps by index in the held-out set: image k of n at k * T // n, with its own noise
    rng = SeedRNG.for_run(HELD_OUT_SEED, 10)
    noise = rng.randn(1, 8, 8)
    t = torch.arange(10) * 20 // 10
    with torch.no_grad():
        eps = m.net(m.q_sample(x, t, noise), t)
    assert whole["eps_mse"] == pytest.approx(((eps - noise) ** 2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- the diffusion bound

def _exact_bound(m, x, rng):
    """prior + sum over every t of L_t, with the draws nll_bpd makes: its timestep uniforms first
    (one per stratum; unused, all strata are one step wide), then x_t noise for t = 0, T-1, 1..T-2."""
    n, T = x.shape[0], m.T
    rng.rand(len(stratum_edges(T, m.nll_timesteps)))
    order = [0, T - 1] + list(range(1, T - 1))
    total = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for t_int in order:
            t = torch.full((n,), t_int)
            xt = m.q_sample(x, t, rng.randn(*x.shape[1:]))
            eps, v = m._denoise(xt, t, None, 0.0)
            total += m._vb_terms(x, xt, t, eps, v, clip=True).double()
        t = torch.full((n,), T - 1)
        mean_T = m._coef("sqrt_ab", t, x) * x
        logvar_T = torch.log(1 - m._coef("alpha_bar", t, x)).expand_as(x)
        prior = mean_flat(normal_kl(mean_T, logvar_T, torch.zeros_like(x), torch.zeros_like(x))) / LN2
    return total + prior.double()


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_bound_with_every_timestep_is_the_exact_sum_of_terms(learn_sigma):
    T = 12
    m = _build("diffusion", SMALL_IMG, **SMALL_UNET, timesteps=T, nll_timesteps=T - 2, learn_sigma=learn_sigma)
    x = _grid_images(5)
    rng = SeedRNG.for_run(HELD_OUT_SEED, 5)
    got = m.nll_bpd(Batch(x, rng=rng))
    want = _exact_bound(m, x, rng[:])
    assert torch.allclose(got, want, rtol=1e-9, atol=0), (got - want).abs().max()
    m.nll_timesteps = 1000                                 # more strata than steps: the same exact bound
    assert torch.equal(m.nll_bpd(Batch(x, rng=rng)), got)


def test_stratified_bound_is_unbiased():
    # One image, many streams: the stratified estimate's mean matches the exact bound's mean.
    T, n = 20, 48
    exact = _build("diffusion", SMALL_IMG, **SMALL_UNET, timesteps=T, nll_timesteps=T - 2)
    strat = _build("diffusion", SMALL_IMG, **SMALL_UNET, timesteps=T, nll_timesteps=3)
    x = _grid_images(1).expand(n, -1, -1, -1)
    a = exact.nll_bpd(Batch(x, rng=SeedRNG.for_run(1, n)))
    b = strat.nll_bpd(Batch(x, rng=SeedRNG.for_run(2, n)))
    assert b.std() > 0                                     # the timesteps really are drawn per image
    se = math.sqrt(a.var().item() / n + b.var().item() / n)
    assert abs(a.mean().item() - b.mean().item()) < 4 * se + 1e-9


# ---------------------------------------------------------------- the discretized Gaussian

def _reference(x, mean, log_scale):
    """log P(x) in 50-digit arithmetic: edges from the tails, middle bins as CDF differences taken
    in the lower tails (Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)), which mpmath resolves exactly."""
    import mpmath

    mpmath.mp.dps = 50
    out = []
    for xi, mi, li in zip(x.tolist(), mean.tolist(), log_scale.tolist()):
        s = mpmath.exp(mpmath.mpf(li))
        hi = (mpmath.mpf(xi) - mpmath.mpf(mi) + mpmath.mpf(1) / 255) / s
        lo = (mpmath.mpf(xi) - mpmath.mpf(mi) - mpmath.mpf(1) / 255) / s
        if xi < -0.999:
            p = mpmath.ncdf(hi)
        elif xi > 0.999:
            p = mpmath.ncdf(-lo)
        elif lo > 0:
            p = mpmath.ncdf(-lo) - mpmath.ncdf(-hi)
        else:
            p = mpmath.ncdf(hi) - mpmath.ncdf(lo)
        out.append(float(mpmath.log(p)))
    return torch.tensor(out, dtype=torch.float64)


def test_discretized_gaussian_matches_a_high_precision_reference():
    pytest.importorskip("mpmath")
    values = sorted(set(range(0, 256, 15)) | {1, 2, 127, 128, 253, 254, 255})
    xs = torch.tensor(values, dtype=torch.float32) / 127.5 - 1            # the 8-bit grid
    means = torch.tensor([-1.3, -1.0, -0.6, 0.0, 0.31, 0.9, 1.0, 1.2])
    log_scales = torch.tensor([-9.0, -6.0, -4.5, -3.0, -1.0, 0.5, 4.0])
    x, mean, ls = (g.flatten() for g in torch.meshgrid(xs, means, log_scales, indexing="ij"))
    ref = _reference(x, mean, ls)
    assert torch.isfinite(ref).all() and ref.min() < -1e6    # far tails, many nats below -27.6

    got64 = discretized_gaussian_log_likelihood(x.double(), mean.double(), ls.double())
    assert got64.dtype == torch.float64
    assert torch.allclose(got64, ref, rtol=1e-10, atol=1e-9), (got64 - ref).abs().max()

    got = discretized_gaussian_log_likelihood(x, mean, ls)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # 1e-4 nats, or float32's own resolution (about 6e-8 relative) for values beyond -1e3 nats
    err = (got.double() - ref).abs()
    assert (err <= 1e-4 + 1.2e-7 * ref.abs()).all(), err.max()
    small = ref > -1e3
    assert err[small].max() < 1e-4
    # upper-tail cases (bin far above the mean), where 1 - Phi vanished in float32
    upper = (x - mean) * torch.exp(-ls) > 8
    assert upper.sum() > 50 and (err[upper] <= 1e-4 + 1.2e-7 * ref[upper].abs()).all()
    # nothing is floored at log(1e-12) = -27.63 any more
    floor = math.log(1e-12)
    assert not ((got - floor).abs() < 1e-3)[(ref - floor).abs() > 1e-2].any()


def test_discretized_gaussian_is_a_distribution_and_keeps_tiny_masses():
    grid = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    for mean, log_scale in ((0.0, 3.0), (0.5, -2.0), (1.0, -6.0), (-1.0, -9.0)):
        lp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale))
        assert torch.isfinite(lp).all()
        assert torch.exp(lp.double()).sum().item() == pytest.approx(1.0, abs=1e-5)
    # a wide Gaussian: each inner bin holds about width * pdf(0), a difference of two CDFs near 1/2
    # that float32 resolves only to a few percent
    sigma = math.exp(8.0)
    lp = discretized_gaussian_log_likelihood(grid, torch.zeros(256), torch.full((256,), 8.0)).double()
    want = math.log(2 / 255 / (sigma * math.sqrt(2 * math.pi)))
    assert (lp[1:-1] - want).abs().max() < 1e-6
