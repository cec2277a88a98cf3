"""The diffusion family: schedules, posterior, samplers, guidance, likelihood, cards. Each test < 5 s."""
import math
import time

import pytest
import torch

from genbench import data
from genbench.config import load_card
from genbench.families import Batch, DataSpec, get_family
from genbench.families.diffusion import (cosine_betas, discretized_gaussian_log_likelihood, learned_logvar,
                                         make_betas, respaced_timesteps, stratum_edges)
from genbench.rng import SeedRNG



Diffusion = get_family("diffusion")
IMG = DataSpec((1, 8, 8), 10)
PTS = DataSpec((2,), 4)
TINY_UNET = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
TINY_MLP = dict(mlp_hidden=32, mlp_layers=2)
CARDS = ("ddpm", "iddpm", "adm", "adm-cfg", "adm-cg", "ddpm-mlp")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers make a fresh denoiser predict eps = 0 everywhere; give them
    weights so that samplers and guidance have something to differ on."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def image_model(**kw):
    torch.manual_seed(0)
    return randomize(Diffusion(IMG, **{**TINY_UNET, **kw}))


def point_model(**kw):
    torch.manual_seed(0)
    return randomize(Diffusion(PTS, **{**TINY_MLP, **kw}))


# ---------------------------------------------------------------- schedules and the forward process

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_T_near_zero(schedule):
    ab = torch.cumprod(1 - make_betas(schedule, 1000), 0)
    assert ab[-1] < 1e-4
    assert ab[0] > 0.999 and (ab[1:] < ab[:-1]).all()


def test_linear_schedule_is_ddpms():
    b = make_betas("linear", 1000)
    assert math.isclose(b[0].item(), 1e-4) and math.isclose(b[-1].item(), 0.02)


def test_cosine_schedule_matches_formula():
    T, s = 1000, 0.008
    betas = cosine_betas(T)
    ab = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 1, 10, 250, 500, 900, 990):   # alpha_bar after step t is f(t+1)/f(0), until the 0.999 clip
        assert math.isclose(ab[t].item(), f(t + 1) / f(0), rel_tol=1e-9), t
    assert betas.max().item() == pytest.approx(0.999)   # clipped near t = T
    assert (betas[:-1] <= betas[1:] + 1e-12).all()


def test_q_posterior_matches_closed_form():
    m = point_model(timesteps=100)
    x0, xt = torch.randn(6, 2), torch.randn(6, 2)
    for t_int in (1, 2, 37, 99):
        t = torch.full((6,), t_int)
        mean, logvar = m.q_posterior(x0, xt, t)
        # Bayes with two Gaussians: q(x_{t-1}|x_0) = N(sqrt(ab') x0, 1-ab'), q(x_t|x_{t-1}) = N(sqrt(a) x_{t-1}, b)
        b = m.betas[t_int].item()
        a = 1 - b
        abp = m.alpha_bar[t_int - 1].item()
        prec = 1 / (1 - abp) + a / b
        var = 1 / prec
        ref_mean = var * (math.sqrt(abp) * x0 / (1 - abp) + math.sqrt(a) * xt / b)
        assert torch.allclose(mean, ref_mean, atol=1e-5), t_int
        assert torch.allclose(logvar.exp(), torch.full_like(logvar, var), rtol=1e-5), t_int


def test_q_sample_moments():
    m = point_model(timesteps=1000)
    x0 = torch.full((20000, 2), 0.7)
    t = torch.full((20000,), 300)
    xt = m.q_sample(x0, t, torch.randn_like(x0))
    ab = m.alpha_bar[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.03)


# ---------------------------------------------------------------- samplers

def test_respacing_to_all_steps_reproduces_the_full_sampler():
    m = point_model(timesteps=1000)
    c = m.step_constants(1000)
    assert torch.equal(respaced_timesteps(1000, 1000), torch.arange(1000))
    # respaced betas from alpha_bar ratios give back the schedule
    beta = torch.exp(c["log_beta"].double())
    assert torch.allclose(beta, m.betas, rtol=1e-5)
    assert torch.allclose(c["logvar_small"].double()[1:], m.post_logvar[1:], atol=1e-5)

    n = 8
    with torch.no_grad():
        got = m.sample(SeedRNG.for_run(3, n), steps=1000, variance="large", clip_denoised=False)
        # DDPM Algorithm 2 written out against the unrespaced schedule, same noise stream
        rng = SeedRNG.for_run(3, n)
        x = rng.randn(2)
        for t in reversed(range(1000)):
            b, ab = m.betas[t].item(), m.alpha_bar[t].item()
            eps = m.net(x, torch.full((n,), t))
            x = (x - b / math.sqrt(1 - ab) * eps) / math.sqrt(1 - b)
            if t > 0:
                x = x + math.sqrt(b) * rng.randn(2)
    assert torch.allclose(got, x, atol=1e-3), (got - x).abs().max()


def test_respaced_steps_are_fewer_and_differ():
    m = point_model(timesteps=1000)
    ts = respaced_timesteps(1000, 10)
    assert len(ts) == 10 and ts[0] == 0 and ts[-1] == 999 and (ts[1:] > ts[:-1]).all()
    assert respaced_timesteps(1000, 1).tolist() == [999]
    with torch.no_grad():
        a = m.sample(SeedRNG.for_run(0, 4), steps=10)
        b = m.sample(SeedRNG.for_run(0, 4), steps=20)
    assert a.shape == (4, 2) and not torch.allclose(a, b)


def test_ddim_eta0_is_deterministic_given_xT():
    m = image_model(timesteps=100)
    x_T = SeedRNG.for_run(0, 3).randn(1, 8, 8)
    with torch.no_grad():
        a = m.run_sampler(x_T, SeedRNG.for_run(1, 3), sampler="ddim", steps=10, eta=0.0)
        b = m.run_sampler(x_T, SeedRNG.for_run(2, 3), sampler="ddim", steps=10, eta=0.0)
        c = m.run_sampler(x_T, SeedRNG.for_run(1, 3), sampler="ddim", steps=10, eta=1.0)
        d = m.run_sampler(x_T, SeedRNG.for_run(2, 3), sampler="ddim", steps=10, eta=1.0)
        anc = m.run_sampler(x_T, SeedRNG.for_run(1, 3), sampler="ancestral", steps=10)
    assert torch.equal(a, b)
    assert not torch.allclose(c, d, atol=1e-3)
    assert not torch.allclose(a, anc, atol=1e-3)
    assert a.min() >= -1 and a.max() <= 1


def test_ddim_eta1_matches_ancestral_small_variance_on_full_schedule():
    # With eta = 1 DDIM's sigma_t^2 is exactly beta~_t and its mean is the posterior mean (DDIM paper,
    # section 4.1), so with the same noise it is DDPM ancestral sampling with variance "small".
    m = point_model(timesteps=50)
    with torch.no_grad():
        a = m.sample(SeedRNG.for_run(5, 6), sampler="ddim", eta=1.0, clip_denoised=False)
        b = m.sample(SeedRNG.for_run(5, 6), sampler="ancestral", variance="small", clip_denoised=False)
    assert torch.allclose(a, b, atol=1e-4)


def test_learned_variance_stays_between_posterior_and_beta():
    m = image_model(timesteps=100, learn_sigma=True)
    t = torch.arange(100)
    x = torch.zeros(100, 1, 8, 8)
    for v in (torch.randn(100, 1, 8, 8) * 10, torch.full((100, 1, 8, 8), 1e4), torch.full((100, 1, 8, 8), -1e4)):
        lv = m._logvar(v, t, x)
        lo = m.post_logvar[t].float().view(-1, 1, 1, 1)
        hi = m.betas[t].float().log().view(-1, 1, 1, 1)
        assert (lv >= lo - 1e-5).all() and (lv <= hi + 1e-5).all()
    # the bounds are reached at the extremes, and v = 0 is the log-space midpoint
    assert torch.allclose(m._logvar(torch.full_like(x, 1e4), t, x), hi.expand_as(x), atol=1e-5)
    assert torch.allclose(m._logvar(torch.zeros_like(x), t, x), ((lo + hi) / 2).expand_as(x), atol=1e-5)
    # the same interpolation with respaced constants (what the sampler uses)
    c = m.step_constants(10)
    v = torch.randn(10) * 5
    lv = learned_logvar(v, c["log_beta"], c["logvar_small"])
    assert (lv >= c["logvar_small"] - 1e-6).all() and (lv <= c["log_beta"] + 1e-6).all()
    with torch.no_grad():
        s = m.sample(SeedRNG.for_run(0, 2), steps=5, variance="learned")
    assert torch.isfinite(s).all()


def test_same_seeds_same_samples_whatever_the_batch_split():
    for m, kw in ((image_model(timesteps=50, learn_sigma=True), dict(steps=6, variance="learned")),
                  (image_model(timesteps=50), dict(sampler="ddim", steps=6, eta=1.0)),
                  (point_model(timesteps=50), dict(steps=10))):
        rng = SeedRNG.for_run(11, 5)    # sampling advances an rng's counter: slice a fresh one
        with torch.no_grad():
            whole = m.sample(SeedRNG.for_run(11, 5), **kw)
            parts = torch.cat([m.sample(rng[0:2], **kw), m.sample(rng[2:3], **kw), m.sample(rng[3:5], **kw)])
            other = m.sample(SeedRNG.for_run(12, 5), **kw)
        assert torch.allclose(whole, parts, atol=1e-5)
        assert not torch.allclose(whole, other, atol=1e-3)


# ---------------------------------------------------------------- guidance

def _cfg_model():
    return image_model(timesteps=50, class_cond=True, p_uncond=0.1, learn_sigma=True)


def test_cfg_combines_conditional_and_unconditional_passes():
    m = _cfg_model()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([3, 20, 49]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        eps_c = m.net(x, t, y)[:, :1]
        eps_u = m.net(x, t, torch.full_like(y, 10))[:, :1]
        eps_w, _ = m._denoise(x, t, y, 2.0)
        eps_0, _ = m._denoise(x, t, y, 0.0)
    assert not torch.allclose(eps_c, eps_u, atol=1e-4)
    assert torch.allclose(eps_w, eps_c + 2.0 * (eps_c - eps_u), atol=1e-5)
    assert torch.equal(eps_0, eps_c)


def test_cfg_w0_equals_the_conditional_model():
    m = _cfg_model()
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        w0 = m.sample(SeedRNG.for_run(0, 3), labels=y, steps=5)
        tiny = m.sample(SeedRNG.for_run(0, 3), labels=y, steps=5, guidance=1e-7)   # runs the 2n batch
        w3 = m.sample(SeedRNG.for_run(0, 3), labels=y, steps=5, guidance=3.0)
        other = m.sample(SeedRNG.for_run(0, 3), labels=torch.tensor([7, 8, 9]), steps=5)
    assert torch.allclose(w0, tiny, atol=1e-5)
    assert not torch.allclose(w0, w3, atol=1e-3)
    assert not torch.allclose(w0, other, atol=1e-3)


def test_nfe_doubles_with_cfg_and_counts_real_calls():
    m = _cfg_model()
    assert m.nfe(steps=25) == 25
    assert m.nfe(steps=25, guidance=1.0) == 50
    assert m.nfe() == 50 and m.nfe(sampler="ddim", steps=10) == 10
    batches = []
    h = m.net.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    with torch.no_grad():
        m.sample(SeedRNG.for_run(0, 3), labels=torch.tensor([0, 1, 2]), steps=4, guidance=1.0)
    h.remove()
    assert batches == [6] * 4        # one network call per step, on a batch of 2n
    assert len(batches) * 2 == m.nfe(steps=4, guidance=1.0)   # each call evaluates every image twice


def test_classifier_phase_trains_only_the_classifier_and_guides():
    m = image_model(timesteps=50, classifier=dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()))
    assert m.conditional
    phases = m.phases()
    assert [p.name for p in phases] == ["diffusion", "classifier"]
    assert sum(p.share for p in phases) == pytest.approx(1.0)
    ph = phases[1]
    m.start_phase(ph)
    opts = m.configure_optimizers(ph)
    net_before = [p.detach().clone() for p in m.net.parameters()]
    clf_before = [p.detach().clone() for p in m.classifier.parameters()]
    m.train()
    logs = m.train_step(Batch(torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)), ph, opts)
    assert {"loss_classifier", "acc_classifier", "grad_norm_classifier"} <= set(logs)
    assert all(torch.equal(a, b) for a, b in zip(net_before, m.net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(clf_before, m.classifier.parameters()))
    m.eval()
    randomize(m.classifier, seed=1)
    y = torch.tensor([0, 5])
    with torch.no_grad():
        plain = m.sample(SeedRNG.for_run(0, 2), labels=y, steps=5)
        s0 = m.sample(SeedRNG.for_run(0, 2), labels=y, steps=5, classifier_scale=0.0)
        s5 = m.sample(SeedRNG.for_run(0, 2), labels=y, steps=5, classifier_scale=5.0)
        d5 = m.sample(SeedRNG.for_run(0, 2), labels=y, steps=5, classifier_scale=5.0, sampler="ddim")
    assert torch.equal(plain, s0)
    assert not torch.allclose(plain, s5, atol=1e-4)
    assert torch.isfinite(d5).all()
    with pytest.raises(ValueError, match="labels"):
        m.sample(SeedRNG.for_run(0, 2), steps=2, classifier_scale=1.0)


# ---------------------------------------------------------------- options, likelihood, training

@pytest.mark.parametrize("bad, match", [
    (dict(temperature=1.0), "unknown sampler option 'temperature'"),
    (dict(sampler="euler"), "sampler must be"),
    (dict(steps=0), "steps"), (dict(steps=51), "steps"), (dict(steps=2.5), "steps"),
    (dict(eta=-1.0), "eta"),
    (dict(variance="learned"), "learn_sigma"),
    (dict(variance="huge"), "variance"),
    (dict(guidance=1.0), "guidance"),
    (dict(classifier_scale=1.0), "classifier"),
])
def test_invalid_sampler_options_raise(bad, match):
    m = point_model(timesteps=50)
    with pytest.raises(ValueError, match=match):
        m.nfe(**bad)
    with pytest.raises(ValueError, match=match):
        m.sample(SeedRNG.for_run(0, 1), **bad)


def test_discretized_gaussian_sums_to_one_over_8bit_values():
    grid = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    for mean, log_scale in ((0.0, -3.0), (0.93, -5.0), (-1.2, -1.0), (0.3, -8.0)):
        lp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale))
        assert torch.exp(lp.double()).sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("T, k", [(1000, 50), (1000, 10), (1000, 998), (1000, 5000), (100, 8), (3, 4)])
def test_nll_strata_cover_the_middle_timesteps_once(T, k):
    e = stratum_edges(T, k)
    covered = [t for a, b in e for t in range(a, b)]
    assert covered == list(range(1, T - 1))                    # 0 and T-1 are computed exactly
    assert len(e) == min(k, T - 2)
    widths = [b - a for a, b in e]
    assert widths[0] == 1 and widths == sorted(widths)        # dense where the terms are largest


def test_nll_bpd_is_a_finite_deterministic_bound_per_image():
    m = image_model(timesteps=100, learn_sigma=True, nll_timesteps=8)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    a = m.nll_bpd(Batch(x))
    assert a.shape == (4,) and torch.equal(a, m.nll_bpd(Batch(x)))
    assert torch.isfinite(a).all() and (a > 0).all() and (a < 50).all()
    # nll_timesteps = T-2 visits every t once (the exact bound); few strata estimate it closely
    full = Diffusion(IMG, **TINY_UNET, timesteps=100, learn_sigma=True, nll_timesteps=98)
    full.load_state_dict(m.state_dict())
    full.eval()
    assert full.nll_bpd(Batch(x)).mean().item() == pytest.approx(a.mean().item(), rel=0.25)
    assert point_model().nll_bpd(Batch(torch.randn(4, 2))) is None


def test_state_dict_round_trip_and_no_schedule_in_checkpoint():
    m = image_model(timesteps=50, learn_sigma=True)
    sd = m.state_dict()
    assert "steps_done" in sd and "betas" not in sd and "alpha_bar" not in sd
    m2 = Diffusion(IMG, **TINY_UNET, timesteps=50, learn_sigma=True)
    m2.load_state_dict(sd)
    m2.eval()
    with torch.no_grad():
        assert torch.equal(m.sample(SeedRNG.for_run(0, 2), steps=3), m2.sample(SeedRNG.for_run(0, 2), steps=3))


def _tiny_card_params(card):
    """The card's params shrunk to CPU size; everything else (schedule, objective, guidance) kept."""
    p = dict(card.params)
    shrink = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4])
    if "mlp_hidden" in p:
        p.update(mlp_hidden=32, mlp_layers=2)
    else:
        p.update(shrink)
        if p.get("head_channels", -1) > 0:
            p["head_channels"] = 8
    if p.get("classifier"):
        p["classifier"] = {**p["classifier"], **shrink, "head_channels": 8}
    return p


@pytest.mark.parametrize("name", CARDS)
def test_training_step_without_nan_for_each_card(name):
    card = load_card(name)
    spec = PTS if name.endswith("mlp") else IMG
    torch.manual_seed(0)
    m = Diffusion(spec, **_tiny_card_params(card))
    x = torch.randn(8, 2) if spec == PTS else torch.round((torch.rand(8, 1, 8, 8)) * 255) / 127.5 - 1
    y = torch.arange(8) % spec.num_classes
    for ph in m.phases():
        m.start_phase(ph)
        opts = m.configure_optimizers(ph)
        m.train()
        for _ in range(2):
            logs = m.train_step(Batch(x, y), ph, opts)
            assert logs and all(math.isfinite(v) for v in logs.values()), (ph.name, logs)
    m.eval()
    sampler = {**card.sampler, "steps": 3}
    labels = torch.tensor([0, 1]) if m.conditional else None
    with torch.no_grad():
        s = m.sample(SeedRNG.for_run(0, 2), labels=labels, **sampler)
    assert s.shape == (2, *spec.shape) and torch.isfinite(s).all()
    if spec.is_image:
        assert s.min() >= -1 and s.max() <= 1


def test_ddpm_card_has_35_7m_parameters():
    card = load_card("ddpm")
    with torch.device("meta"):
        m = Diffusion(DataSpec((3, 32, 32), 10), **card.params)
    n = sum(p.numel() for p in m.net.parameters())
    assert abs(n - 35.7e6) <= 0.1e6, n


def test_learn_sigma_doubles_output_and_hybrid_loss_logs_vb():
    m = image_model(timesteps=50, learn_sigma=True, warmup_steps=10, lr=1e-3)
    ph = m.phases()[0]
    opts = m.configure_optimizers(ph)
    m.train()
    logs = m.train_step(Batch(torch.rand(4, 1, 8, 8) * 2 - 1), ph, opts)
    assert {"loss", "mse", "vb", "grad_norm_net"} <= set(logs)
    assert logs["loss"] == pytest.approx(logs["mse"] + 0.001 * 50 * logs["vb"], rel=1e-4)
    assert opts["net"].param_groups[0]["lr"] == pytest.approx(1e-4)   # warm-up: step 1 of 10
    assert int(m.steps_done) == 1


def test_small_config_trains_a_step_fast_on_16px_digits():
    d = data.load("digits", "train", image_size=16)
    m = Diffusion(d.spec, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], timesteps=1000)
    ph = m.phases()[0]
    opts = m.configure_optimizers(ph)
    m.train()
    batch = Batch(d.model_input(slice(0, 16)), d.y[:16])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        logs = m.train_step(batch, ph, opts)
        times.append(time.perf_counter() - t0)
    assert math.isfinite(logs["loss"])
    assert min(times) < 1.0, times
    m.eval()
    with torch.no_grad():
        s = m.sample(SeedRNG.for_run(0, 2), steps=10)
    assert s.shape == (2, 1, 16, 16)
